"""amp: Adaptive MLP Pruning of vision transformers (arXiv 2603.08100).

Front door (plain names and paths in, results out; nothing else is needed for the paper's pipeline)::

    import amp
    dense = amp.load_model("open_clip:ViT-B-32:openai")           # or timm:..., zoo:tiny-clip, a pruned dir
    scores = amp.score(dense, "imagefolder:/imagenet/train", criterion="entropy", max_images=10_000)
    pruned = amp.prune(dense, scores, ratio=0.5)                    # scores → widths → sliced copy (uniform)
    searched = amp.load_model("open_clip:ViT-B-32:openai")         # the search prunes its model in place
    result = amp.search(searched, scores, "imagefolder:/imagenet/val", threshold=0.01)  # AMP's own widths
    fixed = amp.recover(pruned, "lstsq", "imagefolder:/imagenet/train", dense, scores)  # or "bias", "distill"
    suite = amp.EvalSuite(dense, classification={"ImageNet": "imagefolder:/imagenet/val"})
    row = suite.measure(fixed)                                      # metrics with per-item outcomes
    amp.save_pruned(fixed, "runs/vit-b-32-amp"); amp.load_pruned("runs/vit-b-32-amp")
    amp.register_backbone(MyAdapter)                                # a new backbone family in one call

The method is four small modules: :mod:`amp.criteria` (what a batch of embeddings costs), :mod:`amp.scoring`
(Taylor importance per MLP unit), :mod:`amp.width_search` (the AMP bisection and preset allocations) and
:mod:`amp.surgery` (slicing). Around them, each with one job: :mod:`amp.adapters` (one adapter per backbone family),
:mod:`amp.models` (one build path for dense and pruned models), :mod:`amp.recovery` and :mod:`amp.distill`,
:mod:`amp.evaluation` and :mod:`amp.stats`, :mod:`amp.accounting`, :mod:`amp.data`, :mod:`amp.distributed`,
:mod:`amp.zoo` (offline models and data), :mod:`amp.reproduce` and :mod:`amp.notebook` (the notebooks' runner and
helpers), :mod:`amp.pipeline` (``amp demo``) and :mod:`amp.cli`.
"""

from __future__ import annotations

from importlib import import_module, metadata
from importlib.util import find_spec
from typing import Any

try:
    __version__ = metadata.version("amp-prune")  # the one version string: pyproject.toml, via the installed metadata
except metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    """The front door (``amp.api.__all__``) and the submodules, imported on first use.

    Deliberately lazy: torch, open_clip and timm take seconds to import, and ``amp --help`` or ``amp --version`` need
    none of them. ``from amp import *`` and every ``amp.<name>`` still see the whole front door.
    """
    if name.startswith("__") and name != "__all__":
        raise AttributeError(f"module 'amp' has no attribute {name!r}")
    if find_spec(f"amp.{name}") is not None:  # a submodule (``from amp import io`` asks here first): only it
        return import_module(f"amp.{name}")
    api = import_module("amp.api")
    import_module("amp.zoo")  # registers the offline models and data sets
    globals().update({key: getattr(api, key) for key in api.__all__}, __all__=list(api.__all__))
    if name not in globals():
        raise AttributeError(f"module 'amp' has no attribute {name!r}")
    return globals()[name]
