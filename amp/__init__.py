"""amp: Adaptive MLP Pruning of vision transformers (arXiv 2603.08100).

Front door (plain names and paths in, results out)::

    import amp
    model = amp.load_model("open_clip:ViT-B-32:openai")          # or timm:..., zoo:tiny-clip, a pruned dir
    scores = amp.score(model, "imagefolder:/imagenet/train", criterion="entropy", max_images=10_000)
    result = amp.search(model, scores, "imagefolder:/imagenet/val", threshold=0.01, max_images=2_000)
    amp.save_pruned(model, "runs/vit-b-32-amp")
    amp.model_stats(amp.load_pruned("runs/vit-b-32-amp"))

The pieces are separate modules: :mod:`amp.adapters` (a uniform view of each backbone family's MLPs),
:mod:`amp.criteria`, :mod:`amp.scoring`, :mod:`amp.width_search` (the AMP search and preset allocations),
:mod:`amp.surgery`, :mod:`amp.io`,
:mod:`amp.accounting`, :mod:`amp.evaluation`, :mod:`amp.data`.
"""

from amp import api, zoo  # noqa: F401  zoo registers the offline models and data sets
from amp.api import *  # noqa: F403  the front door, listed in amp.api.__all__

__version__ = "0.1.0"
__all__ = list(api.__all__)
