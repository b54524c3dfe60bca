"""``zoo:tiny-clip``: a small CLIP trained here on captioned Fashion-MNIST (the project's offline default model).

Architecture ``amp-tiny-clip`` (``amp/zoo/configs/amp-tiny-clip.json``, registered with open_clip when this module is
imported, so ``open_clip.create_model("amp-tiny-clip", device="meta")`` works): a ViT for 64 px input with MLP ratio 4
and a small text transformer with open_clip's default (offline) tokenizer and a context of 32 tokens.

Weights: ``data/zoo/tiny-clip.safetensors``, described by ``data/zoo/tiny-clip.json`` (sha256, seed, steps, measured
quality); both are written by ``python -m amp.zoo.train_tiny_clip --out data/zoo``. ``$AMP_ZOO_DIR`` overrides the
directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import open_clip
import torch

from amp.adapters import OpenClipAdapter, quiet_open_clip
from amp.models import Backbone, ModelSpecError, backbone_from
from amp.zoo.fashion import fashion_transform, shipped_dir

ARCH = "amp-tiny-clip"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
WEIGHTS_NAME = "tiny-clip.safetensors"
META_NAME = "tiny-clip.json"
REBUILD = "python -m amp.zoo.train_tiny_clip --out data/zoo"

open_clip.add_model_config(CONFIG_DIR)


def zoo_dir() -> Path:
    """``$AMP_ZOO_DIR``, or ``<repo>/data/zoo`` (in an installed wheel: ``amp/_data/zoo``)."""
    env = os.environ.get("AMP_ZOO_DIR")
    return Path(env).expanduser() if env else shipped_dir("zoo")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_meta(directory: str | Path | None = None) -> dict[str, Any]:
    directory = Path(directory) if directory is not None else zoo_dir()
    meta_path = directory / META_NAME
    if not meta_path.is_file():
        raise ModelSpecError(f"zoo:tiny-clip: {meta_path} not found; build the weights with `{REBUILD}`")
    return json.loads(meta_path.read_text())


def verified_weights(directory: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """The weights file and its metadata, after checking the file's sha256 against the metadata."""
    directory = Path(directory) if directory is not None else zoo_dir()
    meta = read_meta(directory)
    weights = directory / meta.get("weights", WEIGHTS_NAME)
    if not weights.is_file():
        raise ModelSpecError(f"zoo:tiny-clip: weights {weights} not found; build them with `{REBUILD}`")
    actual = sha256_file(weights)
    if actual != meta.get("sha256"):
        raise ModelSpecError(
            f"zoo:tiny-clip: sha256 of {weights} is {actual}, but {directory / META_NAME} expects "
            f"{meta.get('sha256')}; the file is corrupt or stale: re-run `{REBUILD}`"
        )
    return weights, meta


class TinyClipAdapter(OpenClipAdapter):
    """The tiny CLIP is an open_clip CLIP whose eval transform is the Fashion one (grey 28 px items fill the frame)."""

    family = "tiny-clip"

    def preprocess_config(self, model: torch.nn.Module) -> dict[str, Any]:
        return {}  # fixed by the family: nothing to record

    def eval_transform(self, config: dict[str, Any]):
        """PIL → 64 px RGB tensor in [-1, 1]."""
        return fashion_transform(64)


def wrap(model: torch.nn.Module, spec: str = "zoo:tiny-clip", info: dict[str, Any] | None = None) -> Backbone:
    """A :class:`Backbone` around an ``amp-tiny-clip`` model (trained or not)."""
    return backbone_from(model, {"family": TinyClipAdapter.family, "name": ARCH, "kwargs": {}}, spec, info)


def load_tiny_clip(device: str | torch.device = "cpu", directory: str | Path | None = None, **kwargs) -> Backbone:
    """The trained tiny CLIP (sha256-verified, strictly loaded) as a :class:`Backbone`."""
    from safetensors.torch import load_file

    if kwargs:
        raise ModelSpecError(f"zoo:tiny-clip takes no builder arguments, got {sorted(kwargs)}")
    weights, meta = verified_weights(directory)
    with quiet_open_clip():
        model = open_clip.create_model(ARCH, pretrained=None, device="cpu")
    state = load_file(str(weights))
    model.load_state_dict(state, strict=True)
    model = model.to(device)
    try:
        shown = str(weights.relative_to(Path(__file__).resolve().parents[2]))
    except ValueError:
        shown = str(weights)
    info = {
        "weights": shown,
        "sha256": meta.get("sha256"),
        "seed": meta.get("seed"),
        "steps": meta.get("steps"),
        "quality": meta.get("quality", {}),
    }
    return wrap(model, info=info)
