"""Files: atomic writes, pruned models (safetensors + JSON), and nothing half-written after a crash.

A pruned model is a directory::

    model.safetensors   every parameter and persistent buffer, plus non-persistent buffers under "__buffer__."
    amp.json            architecture record, per-layer widths, how they were found, library versions

:func:`load_pruned` rebuilds the base architecture on the meta device (no dense weights are allocated or
downloaded), resizes each MLP to its width, and loads the tensors strictly.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

BUFFER_PREFIX = "__buffer__."
MODEL_FILE, META_FILE = "model.safetensors", "amp.json"
FORMAT_VERSION = 1


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` then rename tmp over ``path``: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the result the permissions open() would
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {}
    for package in ("amp-prune", "torch", "open_clip_torch", "timm"):
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return found


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


def save_pruned(backbone, path: str | Path, **provenance: Any) -> Path:
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


def load_pruned(path: str | Path, device: str = "cpu"):
    """Rebuild a model saved by :func:`save_pruned`: architecture on meta, widths applied, tensors loaded strictly."""
    from amp.adapters import adapter_for
    from amp.models import Backbone, ModelSpecError, build_architecture, preprocess_for
    from amp.surgery import set_width

    path = Path(path)
    if not (path / META_FILE).is_file() or not (path / MODEL_FILE).is_file():
        raise ModelSpecError(f"{path} is not a pruned amp model (expected {MODEL_FILE} and {META_FILE})")
    meta = read_json(path / META_FILE)
    model = build_architecture(meta["arch"], device="meta")
    adapter = adapter_for(model)
    sites = adapter.sites(model)
    if len(sites) != len(meta["widths"]):
        raise ModelSpecError(f"{path}: {len(meta['widths'])} widths for {len(sites)} MLPs of {meta['arch']}")
    for site, width in zip(sites, meta["widths"]):
        set_width(site, width)
    tensors = load_file(str(path / MODEL_FILE), device=str(device))
    buffers = {k[len(BUFFER_PREFIX) :]: tensors.pop(k) for k in list(tensors) if k.startswith(BUFFER_PREFIX)}
    _add_compensation_biases(model, tensors)
    model.load_state_dict(tensors, strict=True, assign=True)
    for name, value in buffers.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        module.register_buffer(leaf, value, persistent=False)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelSpecError(f"{path}: tensors missing from the file: {left[:5]}")
    model.eval()
    info = {k: v for k, v in meta.items() if k not in {"arch", "format", "versions"}}
    info["pruned_path"] = str(path)
    preprocess, tokenizer = preprocess_for(meta["arch"], model)
    return Backbone(model, adapter, str(path), meta["arch"], preprocess, tokenizer, info)
