"""What the paper profile will cost, before it runs: peak GPU memory and GPU-hours per model and phase.

    amp reproduce --profile paper --plan [--gpu A100-80GB|H100-80GB|H200]

For every model of the profile (each notebook's ``model``, or each entry of its ``models``) the plan counts, on the
``meta`` device (no weights, seconds even for ViT-g), the parameters, the FLOPs of one image (:mod:`amp.accounting`,
every matmul) and the token grid, and combines them with the data sizes (:data:`DATA_SIZES`, the real sets'), the
profile's caps (``score_images``, ``val_images``, ...), batches and chunks. **An estimate**: GPU-hours assume the GPU
runs at :data:`EFFICIENCY` of its dense bf16 peak, an assumption until :data:`CALIBRATION` holds a measured point.

FLOPs (F: one image's forward through the vision tower, F_b: block b's, N: images):

* scoring: ``N_score × 3F`` with chunks (gradient cache: a forward without graph, a forward with it, a backward to the
  activations only, ≈ F: the weights need no gradient), ``N_score × 2F`` without; once per scoring criterion.
* search: ``N_val × (F + steps × Σ_l Σ_{b≥l} F_b)``: the dense reference pass, then ``steps`` probes per layer, each a
  forward from the probed layer on (the block inputs are cached; a ``cache_gb`` too small for every block's inputs
  makes probes start at the nearest stashed block: more FLOPs than counted); layers already pruned are counted dense;
  once per searched threshold / criterion.
* distillation: ``epochs × N_train × (3F + F)``: student forward + backward (≈ 2F), teacher forward, and one more
  student forward when activations are checkpointed; the student counted dense (an upper bound).
* evaluation: ``variants × Σ_sets N_set × F`` (dense, pruned and each recovered model, every set), plus the zero-shot
  heads' text prompts (``classes × 80 × 2 × text weight-matrix parameters × 77 tokens``, once per model).

Peak memory (bytes; P: parameters of the whole model, d: width, h: MLP hidden units, T: tokens, L: blocks, c: images
per forward, the chunk or ``device_batch``; A = 2 (9d + 2h): the bf16 activations autograd keeps per token and block
with fused attention: the inputs of both norms, qkv, the attention output and projection, the fc1 input, the hidden
units before and after the activation):

* weights: ``2P`` (bf16);
* scoring: ``2P + c·T·L·A``;
* search: ``2P + min(cache_gb, N_val·T·d·2·L) + c·T·2(4d + 2h)``: the stash of block inputs (every block's for the
  validation images, unless ``cache_gb`` bounds it; without a bound the plan counts it all, on the device), and one
  block's working set;
* distillation: ``16 P_v / G + 2P + 2(P - P_v) + c·T·(2d·L + A)`` with checkpointing (the block inputs and one block
  recomputed), ``c·T·L·A`` without: fp32 master weights (4), fp32 gradients (4) and AdamW's two fp32 moments (8) per
  parameter of the student's vision tower (P_v), divided over the G GPUs under FSDP (``sharding: fsdp``), replicated
  under DDP; the teacher (2P, bf16) and the student's frozen text tower (bf16);
* evaluation: ``2P + c·T·2(4d + 2h)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from amp.accounting import model_stats
from amp.distill import RECIPES
from amp.models import load_model
from amp.reproduce import load_profile

# dense bf16 tensor-core peak (FLOP/s) and memory (bytes) per GPU, from the vendors' data sheets (SXM parts)
GPUS: dict[str, dict[str, float]] = {
    "A100-80GB": {"bf16_flops": 312e12, "memory": 80e9},
    "H100-80GB": {"bf16_flops": 989e12, "memory": 80e9},
    "H200": {"bf16_flops": 989e12, "memory": 141e9},
}
DEFAULT_GPU = "H100-80GB"
EFFICIENCY = 0.4  # ASSUMED fraction of the bf16 peak reached (model FLOPs utilisation); not measured here
# a measured point, when there is one: {"machine": ..., "gpu": ..., "model": ..., "phase": ..., "efficiency": ...}
CALIBRATION: dict[str, Any] | None = None
GPUS_PER_NODE = 8  # the paper's machines: what FSDP shards over
TEMPLATES = 80  # OpenAI ImageNet prompts per class
TEXT_CONTEXT = 77
VARIANTS = 4  # dense, AMP pruned, + compensation, + distillation: each evaluated on every set

# images per data set (the real sets), by path placeholder; captioned sets by Karpathy split
DATA_SIZES: dict[str, Any] = {
    "imagenet_train": 1_281_167,
    "imagenet_val": 50_000,
    "imagenet_a": 7_500,
    "imagenet_r": 30_000,
    "imagenet_v2": 10_000,
    "imagenet_sketch": 50_889,
    "objectnet_root": 18_574,  # the 113 classes shared with ImageNet
    "coco_root": {"train": 82_783, "restval": 30_504, "val": 5_000, "test": 5_000},
    "flickr_root": {"train": 29_000, "val": 1_014, "test": 1_000},
}
CLASSES = {"imagenet_a": 200, "imagenet_r": 200, "objectnet_root": 113}  # others: 1000
PLACEHOLDER = re.compile(r"\{(\w+)\??\}")
# a notebook's ``<model>_data`` roles → the parameter names the plan reads
DATA_ROLES = {"score": "score_data", "val": "val_data"}


@dataclass
class ModelShape:
    """What the plan needs of one model, counted on the meta device."""

    params: int  # the whole model (both towers of a CLIP)
    vision_params: int
    text_params: int  # the text tower's weight matrices (CLIP models; 0 otherwise)
    flops: int  # one image through the vision tower, every matmul
    block_flops: list[int]
    width: int
    hidden: int  # MLP hidden units of the first block (dense)
    tokens: int


def model_shape(spec: str, **kwargs: Any) -> ModelShape:
    """Count ``spec`` on the meta device: parameters, one image's FLOPs per block, width, MLP width, tokens."""

    backbone = load_model(spec, device="meta", pretrained=False, **kwargs)
    stats = model_stats(backbone)
    blocks = backbone.adapter.blocks(backbone.model)
    seen: list[torch.Size] = []
    handle = blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
    try:
        with torch.no_grad():
            backbone.adapter.embed(backbone.model, torch.zeros(1, *backbone.adapter.input_size(backbone.model),
                                                               device="meta"))  # fmt: skip
    finally:
        handle.remove()
    width = int(seen[0][-1])
    total = sum(p.numel() for p in backbone.model.parameters())
    vision = {id(p) for p in backbone.vision.parameters()}
    # the text tower's matrices (2 FLOPs per weight per token); its token and position tables do no arithmetic
    text = 0
    if backbone.is_clip:
        matrices = [p for n, p in backbone.model.named_parameters() if p.dim() == 2 and "embedding" not in n]
        text = sum(p.numel() for p in matrices if id(p) not in vision)
    return ModelShape(
        params=total,
        vision_params=stats.params,
        text_params=text,
        flops=stats.flops,
        block_flops=[b.flops for b in stats.blocks],
        width=width,
        hidden=stats.blocks[0].width,
        tokens=int(math.prod(seen[0]) // width),
    )


# --- data sizes ------------------------------------------------------------------------------------------------


def data_size(spec: Any, cap: int | None = None) -> int:
    """Images of a data-set spec of the profile (``imagefolder:{imagenet_val}``, ``coco:{coco_root}:test``), capped."""
    if not isinstance(spec, str):
        return 0
    found = PLACEHOLDER.search(spec)
    if not found or found.group(1) not in DATA_SIZES:
        raise ValueError(f"plan: no known size for data set {spec!r}; known placeholders: {sorted(DATA_SIZES)}")
    size = DATA_SIZES[found.group(1)]
    if isinstance(size, dict):
        split = spec[found.end() :].lstrip(":") or "test"
        size = sum(size[s] for s in split.split("+"))
    return min(size, cap) if cap else size


def _classes(spec: str) -> int:
    found = PLACEHOLDER.search(spec)
    return CLASSES.get(found.group(1), 1000) if found else 1000


def _sets(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [v for v in value.values() if isinstance(v, str)]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


# --- one model in one notebook ---------------------------------------------------------------------------------


@dataclass
class PhasePlan:
    flops: float
    gpu_hours: float
    peak_gb: float


def _hours(flops: float, gpu: str, efficiency: float) -> float:
    return flops / (GPUS[gpu]["bf16_flops"] * efficiency) / 3600


def _recipe(block: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """The distillation settings a notebook would use: the named recipe (amp.distill.RECIPES), then the profile's."""
    recipe: dict[str, Any] = {}
    name = settings.get("distill_recipe") or block.get("distill_recipe") or (block.get("distill") or {}).get("recipe")
    if name:
        recipe = dict(RECIPES.get(name, {}))
    given = dict(block.get("distill") or {})
    if "steps" in given:
        recipe.pop("epochs", None)
    return {**recipe, **given}


def plan_model(
    spec: str,
    block: Mapping[str, Any],
    settings: Mapping[str, Any] | None = None,
    shape: ModelShape | None = None,
    gpu: str = DEFAULT_GPU,
    efficiency: float = EFFICIENCY,
) -> dict[str, Any]:
    """The plan of one model inside one notebook's parameters ``block`` (``settings``: its entry of ``models``)."""
    settings = dict(settings or {})
    cfg = {**block, **settings}
    shape = shape or model_shape(spec, **dict(cfg.get("model_kwargs") or {}))
    f, d, h, t, n_layers = shape.flops, shape.width, shape.hidden, shape.tokens, len(shape.block_flops)
    act = 2 * (9 * d + 2 * h)  # bytes per token and block kept for backward (bf16)
    working = 2 * (4 * d + 2 * h)  # bytes per token of one block's forward working set
    weights = 2 * shape.params
    batch = int(cfg.get("batch_size") or 128)
    chunk = int(cfg.get("chunk_size") or batch)
    gb = 1e9
    phases: dict[str, PhasePlan] = {}

    criteria = block.get("criteria")
    score_runs = sum(1 for c in criteria.values() if "criterion" in c) if isinstance(criteria, Mapping) else 1
    n_score = data_size(cfg.get("score_data"), cfg.get("score_images"))
    score_flops = score_runs * n_score * (3 if chunk < batch else 2) * f
    phases["scoring"] = PhasePlan(
        score_flops, _hours(score_flops, gpu, efficiency), (weights + chunk * t * n_layers * act) / gb
    )

    searches = block.get("search_criteria") or block.get("thresholds") or block.get("searches") or [None]
    steps = int(cfg.get("steps") or 6)
    n_val = data_size(cfg.get("val_data"), cfg.get("val_images"))
    probes = sum(sum(shape.block_flops[layer:]) for layer in range(n_layers))
    search_flops = len(searches) * n_val * (f + steps * probes)
    stash = n_val * t * d * 2 * n_layers
    cache = min(stash, float(cfg["cache_gb"]) * gb) if cfg.get("cache_gb") is not None else stash
    search_peak = (weights + cache + chunk * t * working) / gb
    phases["search"] = PhasePlan(search_flops, _hours(search_flops, gpu, efficiency), search_peak)

    distill = _recipe(block, settings) if (block.get("distill") or settings.get("distill_recipe")) else {}
    if distill and block.get("with_recovery", True) is not False:
        n_train = data_size(block.get("distill_data") or cfg.get("score_data"))
        d_batch = int(distill.get("batch_size") or batch)
        epochs = distill.get("epochs")
        epochs = float(epochs) if epochs is not None else float(distill.get("steps", 0)) * d_batch / max(n_train, 1)
        checkpointing = bool(distill.get("activation_checkpointing"))
        distill_flops = epochs * n_train * ((4 if checkpointing else 3) * f + f)
        shards = GPUS_PER_NODE if distill.get("sharding") == "fsdp" else 1
        per_forward = int(distill.get("device_batch") or d_batch)
        acts = per_forward * t * ((2 * d * n_layers + act) if checkpointing else n_layers * act)
        trained, frozen = shape.vision_params, shape.params - shape.vision_params  # the text tower stays frozen
        peak = (16 * trained / shards + 2 * shape.params + 2 * frozen + acts) / gb
        phases["distillation"] = PhasePlan(distill_flops, _hours(distill_flops, gpu, efficiency), peak)

    caps = {"classification": cfg.get("eval_images"), "retrieval": cfg.get("eval_images"),
            "knn_train": cfg.get("knn_images"), "knn_test": cfg.get("knn_queries")}  # fmt: skip
    images = sum(data_size(s, cap) for key, cap in caps.items() for s in _sets(cfg.get(key)))
    classes = sum(_classes(s) for s in _sets(cfg.get("classification")))
    text_flops = classes * TEMPLATES * 2 * shape.text_params * TEXT_CONTEXT if shape.text_params else 0
    variants = VARIANTS if block.get("distill") or "compensation" in block else 2
    eval_flops = variants * images * f + text_flops
    eval_batch = int(cfg.get("eval_batch_size") or batch)
    phases["evaluation"] = PhasePlan(
        eval_flops, _hours(eval_flops, gpu, efficiency), (weights + eval_batch * t * working) / gb
    )

    return {
        "model": spec,
        "params_m": shape.params / 1e6,
        "gflops_per_image": f / 1e9,
        "batch": batch,
        "chunk": chunk,
        "phases": {name: asdict(p) for name, p in phases.items()},
        "gpu_hours": sum(p.gpu_hours for p in phases.values()),
        "peak_gb": max(p.peak_gb for p in phases.values()),
        "fits": max(p.peak_gb for p in phases.values()) * gb <= GPUS[gpu]["memory"],
    }


def _models_of(block: Mapping[str, Any]) -> list[tuple[str, str | None, dict[str, Any]]]:
    """(label, spec, per-model settings) of every model a notebook's parameters name; spec None: a declared gap."""
    found: list[tuple[str, str | None, dict[str, Any]]] = []
    if isinstance(block.get("model"), str):
        found.append((block["model"], block["model"], {}))
    for label, entry in (block.get("models") or {}).items() if isinstance(block.get("models"), Mapping) else []:
        if isinstance(entry, Mapping) and "model" in entry:
            found.append((label, entry["model"] if isinstance(entry["model"], str) else None, dict(entry)))
    for key, spec in block.items():  # ``clip_model`` with its ``clip_data`` ({"score", "val", ...}) and ``sizes``
        prefix = key[: -len("_model")] if key.endswith("_model") else None
        if prefix and isinstance(spec, str):
            data = block.get(f"{prefix}_data") or {}
            settings = {DATA_ROLES.get(role, role): value for role, value in data.items()}
            for name, value in (block.get("sizes") or {}).items():
                name = name[len(prefix) + 1 :] if name.startswith(f"{prefix}_") else name
                settings.setdefault(name, value)
            if isinstance(block.get(f"{prefix}_kwargs"), Mapping):
                settings["model_kwargs"] = dict(block[f"{prefix}_kwargs"])
            found.append((key, spec, settings))
    return found


def plan(
    profile: str = "paper", gpu: str = DEFAULT_GPU, efficiency: float | None = None, only: str | None = None
) -> dict[str, Any]:
    """The plan of every model of ``profile``: ``{"gpu", "efficiency", "assumed", "rows": [...], "markdown"}``."""

    if gpu not in GPUS:
        raise ValueError(f"--gpu {gpu!r} is not one of {', '.join(GPUS)}")
    measured = CALIBRATION is not None and CALIBRATION.get("gpu") == gpu
    efficiency = efficiency if efficiency is not None else (CALIBRATION["efficiency"] if measured else EFFICIENCY)
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency must be in (0, 1], got {efficiency!r}")
    wanted = {w.strip().zfill(2) for w in only.split(",")} if only else None
    shapes: dict[tuple[str, str], ModelShape] = {}
    rows = []
    for stem, block in load_profile(profile).items():
        if wanted and stem[:2] not in wanted:
            continue
        for label, spec, settings in _models_of(block):
            if spec is None:  # the profile keeps the row, says why no spec loads it
                rows.append(
                    {"notebook": stem, "label": label, "model": None, "unavailable": settings.get("unavailable")}
                )
                continue
            kwargs = dict(settings.get("model_kwargs") or block.get("model_kwargs") or {})
            key = (spec, repr(sorted(kwargs.items())))
            if key not in shapes:
                shapes[key] = model_shape(spec, **kwargs)
            row = plan_model(spec, block, settings, shapes[key], gpu, efficiency)
            rows.append({"notebook": stem, "label": label, **row})
    result = {"gpu": gpu, "efficiency": efficiency, "assumed": not measured, "calibration": CALIBRATION, "rows": rows}
    result["markdown"] = markdown(result)
    return result


def markdown(result: Mapping[str, Any]) -> str:
    """The plan as a Markdown table (GPU-hours and peak GB per phase), with what it assumes."""
    phases = ("scoring", "search", "distillation", "evaluation")
    head = ["notebook", "model", "params (M, both towers)", "GFLOPs/img (vision)", "batch / chunk"]
    head += [f"{p} h / GB" for p in phases] + ["total GPU-h", f"fits {result['gpu']}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 3) + ["---"]) + "|"]
    for r in result["rows"]:
        if r["model"] is None:
            gap = ["no model spec: " + str(r.get("unavailable") or "none given").split(";")[0].replace("|", "/")]
            lines.append("| " + " | ".join([r["notebook"][:2], r["label"], *gap, *["–"] * (len(head) - 3)]) + " |")
            continue
        name = f"`{r['model']}`" if r["label"] == r["model"] else f"{r['label']} (`{r['model']}`)"
        cells = [r["notebook"][:2], name, f"{r['params_m']:,.0f}",
                 f"{r['gflops_per_image']:,.0f}", f"{r['batch']} / {r['chunk']}"]  # fmt: skip
        for p in phases:
            ph = r["phases"].get(p)
            cells.append(f"{ph['gpu_hours']:,.1f} / {ph['peak_gb']:,.0f}" if ph else "–")
        cells += [f"{r['gpu_hours']:,.1f}", "yes" if r["fits"] else "**no**"]
        lines.append("| " + " | ".join(cells) + " |")
    source = (
        f"measured on {result['calibration']['machine']}"
        if not result["assumed"]
        else "ASSUMED, not measured (amp.plan.CALIBRATION is empty)"
    )
    lines += [
        "",
        f"GPU-hours on {result['gpu']} at {result['efficiency']:.0%} of its dense bf16 peak ({source}); peak memory "
        "per GPU in GB (weights bf16, activations of one chunk, AdamW states sharded over 8 GPUs under FSDP). "
        "Estimates from counted FLOPs: see amp/plan.py for the formulas.",
    ]
    return "\n".join(lines)
