"""amp: Adaptive MLP Pruning of vision transformers (arXiv 2603.08100).

Front door (plain names and paths in, results out)::

    import amp
    model = amp.load_model("open_clip:ViT-B-32:openai")          # or timm:..., zoo:tiny-clip, a pruned dir
    scores = amp.score(model, "imagefolder:/imagenet/train", criterion="entropy", max_images=10_000)
    result = amp.search(model, scores, "imagefolder:/imagenet/val", threshold=0.01, max_images=2_000)
    amp.save_pruned(model, "runs/vit-b-32-amp")
    amp.model_stats(amp.load_pruned("runs/vit-b-32-amp"))

The pieces are separate modules: :mod:`amp.adapters` (a uniform view of each backbone family's MLPs),
:mod:`amp.criteria`, :mod:`amp.scoring`, :mod:`amp.search`, :mod:`amp.surgery`, :mod:`amp.io`,
:mod:`amp.accounting`, :mod:`amp.evaluate`, :mod:`amp.data`.
"""

from amp.api import (
    Backbone,
    evaluate,
    load_model,
    load_pruned,
    load_scores,
    loader,
    model_stats,
    save_pruned,
    save_scores,
    score,
    search,
)

__version__ = "0.1.0"
__all__ = [
    "Backbone",
    "evaluate",
    "load_model",
    "load_pruned",
    "load_scores",
    "loader",
    "model_stats",
    "save_pruned",
    "save_scores",
    "score",
    "search",
]
