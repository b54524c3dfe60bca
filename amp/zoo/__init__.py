"""Models that work offline, by short name: ``zoo:<name>`` (see :data:`ZOO`).

Each zoo module registers a loader ``(device, **kwargs) -> Backbone`` in :data:`ZOO` when imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from amp.models import Backbone, ModelSpecError, register_source
from amp.zoo import fashion  # noqa: F401  registers the fashion-mnist:... and fmnist-captions:... data sets

ZOO: dict[str, Callable[..., Backbone]] = {}
# name -> (model -> eval transform): lets a pruned zoo model, rebuilt without its loader, preprocess as its base did
ZOO_PREPROCESS: dict[str, Callable] = {}
_ZOO_MODULES = ("amp.zoo.tiny_clip", "amp.zoo.dinov2_s")


def register_zoo_model(name: str, loader: Callable[..., Backbone], preprocess: Callable | None = None) -> None:
    ZOO[name] = loader
    if preprocess is not None:
        ZOO_PREPROCESS[name] = preprocess


def import_zoo_modules() -> None:
    """Import every zoo module, so that their models and architectures are registered."""
    for module in _ZOO_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # a missing dependency inside the module is a real error
                raise


def _load_zoo(rest: str, device: str, **kwargs) -> Backbone:
    import_zoo_modules()
    if rest not in ZOO:
        raise ModelSpecError(f"unknown zoo model {rest!r}; available: {sorted(ZOO)}")
    backbone = ZOO[rest](device=device, **kwargs)
    backbone.arch = {**backbone.arch, "zoo": rest}
    return backbone


register_source("zoo", _load_zoo)
