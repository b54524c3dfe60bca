"""Models by name: ``open_clip:<arch>[:<tag or file>]``, ``timm:<name>[:<file>]``, ``zoo:<name>``, a pruned dir.

Every loader returns a :class:`Backbone`: the model plus what amp needs around it (its adapter,
its image transform, its tokenizer for CLIP models, and an *architecture record* from which
:func:`build_architecture` rebuilds the same network without weights, e.g. on the meta device).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amp.adapters import BackboneAdapter, adapter_for


class ModelSpecError(ValueError):
    """A model name or weights path that cannot be resolved."""


@dataclass
class Backbone:
    model: nn.Module
    adapter: BackboneAdapter
    spec: str  # what the user asked for
    arch: dict[str, Any]  # {"family": ..., "name": ..., "kwargs": {...}}: rebuilds the network without weights
    preprocess: Callable | None = None
    tokenizer: Callable | None = None
    info: dict[str, Any] = field(default_factory=dict)  # provenance: weights source, pruning metadata

    @property
    def is_clip(self) -> bool:
        return hasattr(self.model, "encode_text") and self.tokenizer is not None

    @property
    def vision(self) -> nn.Module:
        return self.adapter.vision(self.model)

    def sites(self):
        return self.adapter.sites(self.model)

    def embed(self, images: torch.Tensor, project: bool = False) -> torch.Tensor:
        return self.adapter.embed(self.model, images, project=project)

    def widths(self) -> list[int]:
        return [site.hidden for site in self.sites()]


# --- architectures ------------------------------------------------------------------------------


def _build_open_clip(name: str, kwargs: dict, device: str | torch.device) -> nn.Module:
    import open_clip

    if name not in open_clip.list_models():
        raise ModelSpecError(f"unknown open_clip architecture {name!r}; see open_clip.list_models()")
    return open_clip.create_model(name, pretrained=None, device=device, **kwargs)


def _build_timm(name: str, kwargs: dict, device: str | torch.device) -> nn.Module:
    import timm

    arch = name.split(".")[0]
    if not timm.is_model(arch):
        raise ModelSpecError(f"unknown timm model {name!r}; see timm.list_models()")
    with torch.device(device):
        return timm.create_model(arch, pretrained=False, **kwargs)


ARCH_BUILDERS: dict[str, Callable[[str, dict, str | torch.device], nn.Module]] = {
    "open_clip": _build_open_clip,
    "timm": _build_timm,
}


def build_architecture(arch: dict[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """The network described by an architecture record, randomly initialised (or shapes only on ``meta``)."""
    import amp.zoo

    amp.zoo.import_zoo_modules()
    family = arch["family"]
    if family not in ARCH_BUILDERS:
        raise ModelSpecError(f"unknown architecture family {family!r}; known: {sorted(ARCH_BUILDERS)}")
    model = ARCH_BUILDERS[family](arch["name"], dict(arch.get("kwargs", {})), device)
    return model.eval()


def preprocess_for(arch: dict[str, Any], model: nn.Module) -> tuple[Callable | None, Callable | None]:
    """The eval image transform and (for CLIP models) the tokenizer of an architecture, without its weights."""
    from amp.zoo import ZOO_PREPROCESS

    zoo_preprocess = ZOO_PREPROCESS.get(arch.get("zoo", ""))
    if arch["family"] == "open_clip":
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        visual = adapter_for(model).vision(model)
        cfg = PreprocessCfg(**getattr(visual, "preprocess_cfg", {}))
        tokenizer = open_clip.get_tokenizer(arch["name"]) if hasattr(model, "encode_text") else None
        return (zoo_preprocess or (lambda _: image_transform_v2(cfg, is_train=False)))(model), tokenizer
    if arch["family"] == "timm":
        from timm.data import create_transform, resolve_data_config

        if zoo_preprocess is not None:
            return zoo_preprocess(model), None
        input_size = adapter_for(model).input_size(model)
        return create_transform(**resolve_data_config({"input_size": input_size}, model=model)), None
    return None, None


# --- loaders by source ------------------------------------------------------------------------


def _is_file_ref(ref: str) -> bool:
    return os.sep in ref or ref.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def _load_open_clip(rest: str, device: str, **kwargs) -> Backbone:
    import open_clip

    name, _, pretrained = rest.partition(":")
    arch = {"family": "open_clip", "name": name, "kwargs": kwargs}
    if pretrained and _is_file_ref(pretrained) and not Path(pretrained).is_file():
        raise ModelSpecError(f"weights file not found: {pretrained}")
    if name not in open_clip.list_models():
        raise ModelSpecError(f"unknown open_clip architecture {name!r}; see open_clip.list_models()")
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=pretrained or None, device=device, **kwargs
    )
    source = pretrained or "random-init"
    return Backbone(
        model.eval(),
        adapter_for(model),
        f"open_clip:{rest}",
        arch,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(name),
        info={"weights": source},
    )


def _load_timm(rest: str, device: str, **kwargs) -> Backbone:
    """``timm:<name>`` is random init; ``timm:<name>.<tag>`` downloads that tag; ``timm:<name>:<file>`` loads a file."""
    import timm

    name, _, weights = rest.partition(":")
    kwargs.setdefault("num_classes", 0)  # amp works on features; the classifier is not part of the backbone
    arch = {"family": "timm", "name": name.split(".")[0], "kwargs": kwargs}
    if not timm.is_model(name.split(".")[0]):
        raise ModelSpecError(f"unknown timm model {name!r}; see timm.list_models()")
    if weights:
        if not Path(weights).is_file():
            raise ModelSpecError(f"weights file not found: {weights}")
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": weights}, **kwargs)
    else:
        model = timm.create_model(name, pretrained="." in name, **kwargs)
    model = model.to(device).eval()
    return Backbone(
        model,
        adapter_for(model),
        f"timm:{rest}",
        arch,
        preprocess=preprocess_for(arch, model)[0],
        info={"weights": weights or (name if "." in name else "random-init")},
    )


def _load_path(path: str, device: str, **kwargs) -> Backbone:
    from amp.io import load_pruned

    return load_pruned(path, device=device)


SOURCES: dict[str, Callable[..., Backbone]] = {"open_clip": _load_open_clip, "timm": _load_timm}


def register_source(prefix: str, loader: Callable[..., Backbone]) -> None:
    """Make ``<prefix>:<rest>`` loadable by :func:`load_model` (used by :mod:`amp.zoo`)."""
    SOURCES[prefix] = loader


def load_model(spec: str, device: str = "cpu", **kwargs) -> Backbone:
    """Load a model by name (see module docstring); ``kwargs`` go to the family's model builder."""
    import amp.zoo  # noqa: F401  registers the zoo: source

    if Path(spec).is_dir():
        return _load_path(spec, device)
    prefix, sep, rest = spec.partition(":")
    if not sep or prefix not in SOURCES:
        raise ModelSpecError(
            f"cannot resolve model {spec!r}: expected one of "
            + ", ".join(f"'{p}:...'" for p in SOURCES)
            + " or the directory of a pruned model"
        )
    if not rest:
        raise ModelSpecError(f"model {spec!r} names no architecture after '{prefix}:'")
    return SOURCES[prefix](rest, device, **kwargs)
