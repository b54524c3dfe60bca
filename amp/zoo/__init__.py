"""Models that work offline, by short name: ``zoo:<name>`` (see :data:`ZOO`), plus the offline data sets."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from amp.adapters import register_backbone
from amp.models import Backbone, ModelSpecError, register_source
from amp.zoo import (
    dinov2_s,
    fashion,  # noqa: F401  registers the fashion-mnist:... and fmnist-captions:... data sets
    standins,
    tiny_clip,
)

ZOO: dict[str, Callable[..., Backbone]] = {"tiny-clip": tiny_clip.load_tiny_clip, "dinov2-s": dinov2_s.load_dinov2_s}
# random stand-ins of the paper's model families, for `amp reproduce --profile paper --dry-run` (amp.zoo.standins)
ZOO.update({f"standin-{family}": partial(standins.load_standin, family) for family in standins.STANDINS})

# after the built-in families: a tiny CLIP is matched as plain open_clip, its own records name this family
register_backbone(tiny_clip.TinyClipAdapter, first=False)


def _load_zoo(rest: str, device: str, **kwargs) -> Backbone:
    if rest not in ZOO:
        raise ModelSpecError(f"unknown zoo model {rest!r}; available: {sorted(ZOO)}")
    return ZOO[rest](device=device, **kwargs)


register_source("zoo", _load_zoo)
