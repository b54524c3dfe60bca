"""Models by name, and the one path that saves and rebuilds them.

Names: ``<family>:<name>`` for every registered backbone family (``open_clip:<arch>[:<tag or file>]``,
``timm:<name>[.<tag>][:<file>]``, a custom family's ``<family>:<name>``), ``zoo:<name>`` for the offline models, or the
directory of a pruned model. Every loader returns a :class:`Backbone`: the model plus its adapter, its image transform,
its tokenizer for CLIP models, and an *architecture record* (``{"family", "name", "kwargs", "preprocess"}``) from which
the family's adapter rebuilds the same network without weights and the same eval transform.

A pruned model is a directory::

    model.safetensors   every parameter and persistent buffer, plus non-persistent buffers under "__buffer__."
    amp.json            architecture record, per-layer widths, how they were found, library versions

:func:`load_pruned` (and the zoo) rebuild through :func:`build_with_weights`: the architecture on the meta device (no
dense weights are allocated or downloaded), each MLP resized to its width, the tensors loaded strictly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from amp.adapters import ADAPTERS, BackboneAdapter, ModelSpecError, adapter_for, adapter_named
from amp.io import atomic_write, read_json, versions, write_json
from amp.surgery import set_width

__all__ = ["Backbone", "ModelSpecError", "build_architecture", "load_model", "load_pruned", "save_pruned"]

BUFFER_PREFIX = "__buffer__."
MODEL_FILE, META_FILE = "model.safetensors", "amp.json"
FORMAT_VERSION = 1


@dataclass
class Backbone:
    model: nn.Module
    adapter: BackboneAdapter
    spec: str  # what the user asked for
    arch: dict[str, Any]  # {"family", "name", "kwargs", "preprocess"}: rebuilds the network and its transform
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


# --- one path: record -> architecture -> widths -> weights -> Backbone -------------------------------


def build_architecture(arch: dict[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """The network described by an architecture record, randomly initialised (or shapes only on ``meta``)."""
    return adapter_named(arch["family"]).build(arch, device).eval()


def backbone_from(model: nn.Module, arch: dict[str, Any], spec: str, info: dict[str, Any] | None = None) -> Backbone:
    """Wrap a model of record ``arch``: its family's adapter (or the one that matches the model), transform, tokenizer.

    The record keeps the preprocessing of the model's weights (a timm or open_clip tag's own mean/std), so a model
    rebuilt from it preprocesses exactly like the one it was saved from.
    """
    family = adapter_named(arch["family"])
    adapter = family if family.matches(model) else adapter_for(model)  # e.g. open_clip with a timm trunk
    preprocess = arch.get("preprocess") or family.preprocess_config(model)
    if preprocess:
        arch = {**arch, "preprocess": preprocess}
    transform = family.eval_transform(preprocess)
    return Backbone(model.eval(), adapter, spec, arch, transform, family.tokenizer(model, arch), dict(info or {}))


def _add_compensation_biases(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Compensation may give a bias-less fc_out a bias; make room for it so the strict load still checks the rest."""
    expected = set(model.state_dict())
    for key in tensors:
        owner, _, leaf = key.rpartition(".")
        if key in expected or leaf != "bias":
            continue
        module = model.get_submodule(owner)
        if isinstance(module, nn.Linear) and module.bias is None:
            module.bias = nn.Parameter(torch.empty(module.out_features, device="meta"))


def build_with_weights(
    arch: dict[str, Any], tensors: dict[str, torch.Tensor], widths: list[int] | None = None, source: str = "weights"
) -> nn.Module:
    """Architecture on meta → MLP widths (dense: ``None``) → ``tensors`` loaded strictly; nothing is left on meta."""
    model = build_architecture(arch, device="meta")
    if widths is not None:
        sites = adapter_for(model).sites(model)
        if len(sites) != len(widths):
            raise ModelSpecError(f"{source}: {len(widths)} widths for {len(sites)} MLPs of {arch}")
        for site, width in zip(sites, widths):
            set_width(site, width)
    tensors = dict(tensors)
    buffers = {k[len(BUFFER_PREFIX) :]: tensors.pop(k) for k in list(tensors) if k.startswith(BUFFER_PREFIX)}
    _add_compensation_biases(model, tensors)
    model.load_state_dict(tensors, strict=True, assign=True)
    for name, value in buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner).register_buffer(leaf, value, persistent=False)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelSpecError(f"{source}: tensors missing: {left[:5]}")
    return model.eval()


# --- pruned models on disk ----------------------------------------------------------------------------


def _non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    persistent = set(model.state_dict())
    return {name: b for name, b in model.named_buffers() if name not in persistent}


def _tensors_for_file(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.state_dict())
    tensors.update({BUFFER_PREFIX + k: v for k, v in _non_persistent_buffers(model).items()})
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach()
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        # safetensors refuses tensors that share memory; a copy keeps each key self-contained
        out[key] = tensor.clone().contiguous() if ident in seen else tensor.contiguous()
        seen.add(ident)
    return out


def save_pruned(backbone: Backbone, path: str | Path, **provenance: Any) -> Path:
    """Save a (pruned) backbone; ``provenance`` (criterion, threshold, temperature, ...) goes into amp.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT_VERSION,
        "arch": backbone.arch,
        "base_model": backbone.info.get("base_model", backbone.spec),
        "weights": backbone.info.get("weights"),
        "family": backbone.adapter.family,
        "widths": backbone.widths(),
        "dense_widths": backbone.info.get("dense_widths", backbone.widths()),
        "dtype": str(next(backbone.model.parameters()).dtype).replace("torch.", ""),
        "versions": versions(),
        **{k: v for k, v in backbone.info.items() if k not in {"base_model", "weights", "dense_widths"}},
        **provenance,
    }
    tensors = _tensors_for_file(backbone.model)
    atomic_write(path / MODEL_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"amp": "pruned model"}))
    write_json(path / META_FILE, meta)
    return path


def load_pruned(path: str | Path, device: str = "cpu") -> Backbone:
    """Rebuild a model saved by :func:`save_pruned`, with the dense model's preprocessing."""
    path = Path(path)
    if not (path / META_FILE).is_file() or not (path / MODEL_FILE).is_file():
        raise ModelSpecError(f"{path} is not a pruned amp model (expected {MODEL_FILE} and {META_FILE})")
    meta = read_json(path / META_FILE)
    tensors = load_file(str(path / MODEL_FILE), device=str(device))
    model = build_with_weights(meta["arch"], tensors, meta["widths"], source=str(path))
    info = {k: v for k, v in meta.items() if k not in {"arch", "format", "versions"}}
    info["pruned_path"] = str(path)
    return backbone_from(model, meta["arch"], str(path), info)


# --- models by name ---------------------------------------------------------------------------------

# name sources other than the backbone families (the offline zoo registers ``zoo``): (rest, device, **kwargs)
SOURCES: dict[str, Callable[..., Backbone]] = {}


def register_source(prefix: str, loader: Callable[..., Backbone]) -> None:
    """Make ``<prefix>:<rest>`` loadable by :func:`load_model` (used by :mod:`amp.zoo`)."""
    SOURCES[prefix] = loader


def load_model(spec: str, device: str = "cpu", pretrained: bool = True, **kwargs: Any) -> Backbone:
    """Load a model by name (see module docstring); ``kwargs`` go to the family's model builder.

    ``pretrained=False`` builds a tagged model without its weights but with the tag's preprocessing
    (``timm:vit_small_patch16_224.dino``, ``open_clip:ViT-L-14:laion2b_s32b_b82k``): offline, random init.
    """
    if Path(spec).is_dir():
        return load_pruned(spec, device)
    prefix, sep, rest = spec.partition(":")
    families = [adapter.family for adapter in ADAPTERS]
    if not sep or (prefix not in SOURCES and prefix not in families):
        raise ModelSpecError(
            f"cannot resolve model {spec!r}: expected one of "
            + ", ".join(f"'{p}:...'" for p in [*families, *SOURCES])
            + " or the directory of a pruned model"
        )
    if not rest:
        raise ModelSpecError(f"model {spec!r} names no architecture after '{prefix}:'")
    if prefix in SOURCES:
        if not pretrained:
            raise ModelSpecError(f"{prefix}: models always come with their weights")
        return SOURCES[prefix](rest, device, **kwargs)
    model, arch, info = adapter_named(prefix).load(rest, device, pretrained=pretrained, **kwargs)
    return backbone_from(model, arch, spec, info)
