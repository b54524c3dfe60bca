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

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from amp.adapters import ADAPTERS, BackboneAdapter, ModelSpecError, adapter_for, adapter_named
from amp.hub import HUB_PREFIX, snapshot
from amp.io import FileFormatError, atomic_write, safetensors_header, versions, write_dir, write_json
from amp.surgery import set_width

__all__ = [
    "Backbone",
    "ModelSpecError",
    "build_architecture",
    "load_model",
    "load_pruned",
    "save_pruned",
    "write_pruned",
]

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
        # data loaders give float32 images; a model kept in half precision (saved as fp16/bf16) takes its own dtype
        dtype = next(self.vision.parameters()).dtype
        if images.is_floating_point() and dtype.is_floating_point and images.dtype != dtype:
            images = images.to(dtype)
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
    _check_tensors(model, tensors, source)
    model.load_state_dict(tensors, strict=True, assign=True)
    for name, value in buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner).register_buffer(leaf, value, persistent=False)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left and not all(t.is_meta for t in tensors.values()):  # a meta load (shapes only) stays on meta
        raise ModelSpecError(f"{source}: tensors missing: {left[:5]}")
    return model.eval()


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """The tensors are exactly the model's, shape for shape; else one message naming what differs."""
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    found = {k: list(v.shape) for k, v in tensors.items()}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} is {found[k]}, expected {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
    problems = [
        f"{len(items)} {what} ({'; '.join(items[:3])}{'; ...' if len(items) > 3 else ''})"
        for what, items in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong))
        if items
    ]
    if problems:
        raise ModelSpecError(
            f"{source}: the weights do not fit the architecture and widths recorded for them: tensors "
            + ", ".join(problems)
            + "; the weights were written for another model (or the widths were edited): save the model again"
        )


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


def write_pruned(backbone: Backbone, directory: str | Path, **provenance: Any) -> None:
    """The files of a pruned model, written into ``directory`` as they are (:func:`save_pruned` makes it atomic)."""
    directory = Path(directory)
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
    }
    # what the model's info adds (a loaded model's provenance); what is measured above is never taken from it
    meta.update({k: v for k, v in backbone.info.items() if k not in meta and k != "pruned_path"})
    meta.update(provenance)
    tensors = _tensors_for_file(backbone.model)  # atomic_write: the permissions open() gives (save_file's are 0600)
    atomic_write(directory / MODEL_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"amp": "pruned model"}))
    write_json(directory / META_FILE, meta)


def save_pruned(
    backbone: Backbone, path: str | Path, overwrite: bool = False, keep: Iterable[str] = (), **provenance: Any
) -> Path:
    """Save a (pruned) backbone as a directory, all or nothing; ``provenance`` (criterion, threshold, ...) goes into
    amp.json.

    The directory is written whole beside ``path`` and renamed into place: a kill at any moment leaves the old
    directory or the new one. An existing non-empty ``path`` needs ``overwrite=True`` and is then replaced whole;
    ``keep`` names entries of it to carry over (see :func:`amp.io.write_dir`).
    """
    return write_dir(path, lambda tmp: write_pruned(backbone, tmp, **provenance), overwrite=overwrite, keep=keep)


def _read_meta(path: Path) -> dict[str, Any]:
    """amp.json, schema-checked: its format version, the architecture record, positive integer widths."""
    file = path / META_FILE
    try:
        meta = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelSpecError(f"{file}: not valid JSON ({err}); save the model again") from None

    def bad(reason: str) -> ModelSpecError:
        return ModelSpecError(f"{file}: {reason}; save the model again (amp.json is written by amp.save_pruned)")

    if not isinstance(meta, dict):
        raise bad("not a JSON object")
    if "format" not in meta:
        raise bad("no 'format' version")
    if meta["format"] != FORMAT_VERSION:
        newer = isinstance(meta["format"], int) and meta["format"] > FORMAT_VERSION
        raise ModelSpecError(
            f"{file}: format {meta['format']!r}, but this amp reads format {FORMAT_VERSION}"
            + ("; upgrade amp to load it" if newer else "; save the model again")
        )
    for key in ("arch", "widths"):
        if key not in meta:
            raise bad(f"no {key!r}")
    arch = meta["arch"]
    if not isinstance(arch, dict) or not isinstance(arch.get("family"), str) or not isinstance(arch.get("name"), str):
        raise bad(f"'arch' must be a record with 'family' and 'name', got {arch!r}")
    for key in ("widths", "dense_widths"):
        widths = meta.get(key, [])
        if not isinstance(widths, list) or not all(type(w) is int and w > 0 for w in widths):
            raise bad(f"{key!r} must be a list of positive integers, got {widths!r}")
    dense = meta.get("dense_widths")
    if dense is not None and (len(dense) != len(meta["widths"]) or any(w > d for w, d in zip(meta["widths"], dense))):
        raise bad(f"'widths' {meta['widths']} do not fit 'dense_widths' {dense}")
    return meta


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}  # fmt: skip


def _read_tensors(file: Path, device: str) -> dict[str, torch.Tensor]:
    """The tensors of a checked safetensors file; on ``meta`` only their shapes (the header, no data read)."""
    try:
        header = safetensors_header(file)
        if str(device) == "meta":
            return {
                name: torch.empty(info["shape"], dtype=_DTYPES.get(info["dtype"], torch.float32), device="meta")
                for name, info in header.items()
                if name != "__metadata__"
            }
        return load_file(str(file), device=str(device))
    except (FileFormatError, SafetensorError) as err:
        raise ModelSpecError(str(err) if isinstance(err, FileFormatError) else f"{file}: unreadable ({err})") from None


def load_pruned(path: str | Path, device: str = "cpu") -> Backbone:
    """Rebuild a model saved by :func:`save_pruned`, with the dense model's preprocessing (``meta``: shapes only).

    ``path`` is a directory or ``hf-hub:<repo id>[@<revision>]`` (a model pushed by ``amp push``, read from the local
    Hub cache, downloaded there once; see :mod:`amp.hub`). amp.json and model.safetensors are checked where they
    enter: the format version and schema, a truncated or foreign weights file, widths that do not match the tensors;
    each refusal names the file.
    """
    register_zoo()
    from_hub = str(path).startswith(f"{HUB_PREFIX}:") and not Path(path).is_dir()
    spec = str(path) if from_hub else str(Path(path))
    path = snapshot(spec) if from_hub else Path(path)
    if not (path / META_FILE).is_file() or not (path / MODEL_FILE).is_file():
        raise ModelSpecError(f"{path} is not a pruned amp model (expected {MODEL_FILE} and {META_FILE})")
    meta = _read_meta(path)
    tensors = _read_tensors(path / MODEL_FILE, device)
    source = f"{path / MODEL_FILE} (with {META_FILE})"
    model = build_with_weights(meta["arch"], tensors, meta["widths"], source=source)
    info = {k: v for k, v in meta.items() if k not in {"arch", "format", "versions"}}
    info["pruned_path"] = str(path)
    return backbone_from(model, meta["arch"], spec, info)


# --- models by name ---------------------------------------------------------------------------------

# name sources other than the backbone families (the offline zoo registers ``zoo``): (rest, device, **kwargs)
SOURCES: dict[str, Callable[..., Backbone]] = {}


def register_zoo() -> None:
    """Import :mod:`amp.zoo`, which registers ``zoo:`` and its families. ``import amp`` is lazy (a fast ``amp
    --help``), so a caller of ``amp.models`` alone may not have; a function-level import because amp.zoo imports us."""
    import_module("amp.zoo")
    import_module("amp.hf")  # registers hf: and the transformers families (transformers is imported on first use)


def register_source(prefix: str, loader: Callable[..., Backbone]) -> None:
    """Make ``<prefix>:<rest>`` loadable by :func:`load_model` (used by :mod:`amp.zoo`)."""
    SOURCES[prefix] = loader


def load_model(spec: str, device: str = "cpu", pretrained: bool = True, **kwargs: Any) -> Backbone:
    """Load a model by name (see module docstring); ``kwargs`` go to the family's model builder.

    ``pretrained=False`` builds a tagged model without its weights but with the tag's preprocessing
    (``timm:vit_small_patch16_224.dino``, ``open_clip:ViT-L-14:laion2b_s32b_b82k``): offline, random init.
    """
    register_zoo()
    if Path(spec).is_dir() or spec.startswith(f"{HUB_PREFIX}:"):
        return load_pruned(spec, device)
    prefix, sep, rest = spec.partition(":")
    families = [adapter.family for adapter in ADAPTERS]
    if not sep or (prefix not in SOURCES and prefix not in families):
        raise ModelSpecError(
            f"cannot resolve model {spec!r}: expected one of "
            + ", ".join(f"'{p}:...'" for p in [*families, *SOURCES, HUB_PREFIX])
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
