"""The front door: plain names and paths in, results out. The CLI and the notebooks call these."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any

import torch

from amp import distributed
from amp.accounting import model_stats
from amp.criteria import build_criterion
from amp.data import load_dataset, make_loader
from amp.io import load_pruned, save_pruned
from amp.io import write_json as _write_json
from amp.models import Backbone, load_model
from amp.scoring import Scores, load_scores, magnitude_scores, random_scores, save_scores, taylor_scores
from amp.width_search import amp_search, apply_widths, global_widths, materialise, uniform_widths

__all__ = [
    "Backbone",
    "evaluate",
    "load_model",
    "load_pruned",
    "load_scores",
    "loader",
    "model_stats",
    "save_pruned",
    "save_scores",
    "score",
    "search",
]


def loader(backbone: Backbone, data, batch_size: int = 32, seed: int = 0, shuffle: bool = True):
    """A data loader from a data-set name (with the model's own transform), a Dataset, or a loader as is."""
    if isinstance(data, str):
        data = load_dataset(data, backbone.preprocess)
    if isinstance(data, torch.utils.data.Dataset):
        if distributed.world_size() > 1:  # under torchrun: this rank's slice of every global batch
            return distributed.sharded(data, batch_size, seed=seed, shuffle=shuffle)
        return make_loader(data, batch_size, shuffle=shuffle, seed=seed)
    return data


def _dataset_of(data):
    return getattr(data, "dataset", data)


def score(
    backbone: Backbone,
    data,
    method: str = "taylor",
    criterion: str = "entropy",
    temp_inv: float = 15.0,
    batch_size: int = 32,
    max_images: int | None = None,
    seed: int = 0,
    signed: bool = False,
    device: str | None = None,
    checkpoint: bool = False,
) -> Scores:
    """Importance of every MLP hidden unit: ``taylor`` under a criterion, or the ``magnitude``/``random`` baselines."""
    if method == "magnitude":
        return magnitude_scores(backbone)
    if method == "random":
        return random_scores(backbone, seed)
    if method != "taylor":
        raise ValueError(f"unknown scoring method {method!r}; choose taylor, magnitude or random")
    data = loader(backbone, data, batch_size, seed)
    crit = build_criterion(criterion, backbone, temp_inv, _dataset_of(data), device or "cpu")
    scores = taylor_scores(
        backbone, data, crit, signed=signed, max_images=max_images, device=device, checkpoint=checkpoint
    )
    scores.meta["data"] = data if isinstance(data, str) else type(_dataset_of(data)).__name__
    return scores


def search(
    backbone: Backbone,
    scores: Scores,
    data,
    allocation: str = "amp",
    ratio: float | None = None,
    threshold: float | None = None,
    criterion: str = "entropy",
    temp_inv: float = 15.0,
    batch_size: int = 32,
    max_images: int | None = None,
    seed: int = 0,
    device: str | None = None,
    **amp_options: Any,
) -> dict[str, Any]:
    """Choose widths (``amp`` bisection, or ``uniform``/``global`` at ``ratio``) and prune ``backbone`` in place."""
    dense_widths = backbone.widths()
    val = loader(backbone, data, batch_size, seed)
    crit = build_criterion(criterion, backbone, temp_inv, _dataset_of(val), device or "cpu")
    if distributed.world_size() > 1:  # the loss of the global batch, identical on every rank
        crit = distributed.GlobalCriterion(crit)
    batches = materialise(val, max_images)
    if allocation == "amp":
        if threshold is None:
            raise ValueError("the amp allocation needs a threshold")
        result = amp_search(backbone, scores, batches, crit, threshold, device=device, **amp_options)
    else:
        if ratio is None:
            raise ValueError(f"the {allocation} allocation needs a ratio")
        round_to = amp_options.get("round_to", 1)
        if allocation == "uniform":
            widths = uniform_widths(dense_widths, ratio, round_to)
        elif allocation == "global":
            widths = global_widths(scores, ratio, round_to)
        else:
            raise ValueError(f"unknown allocation {allocation!r}; choose amp, uniform or global")
        compensation = {k: amp_options[k] for k in ("compensation", "ridge") if k in amp_options}
        result = apply_widths(backbone, scores, widths, batches, crit, device=device, **compensation)
        result.config.update({"method": allocation, "ratio": ratio, "round_to": round_to})
    backbone.info["dense_widths"] = dense_widths
    backbone.info.setdefault("base_model", backbone.spec)
    return result.to_json()


def evaluate(
    backbone: Backbone,
    classification: str | None = None,
    retrieval: str | None = None,
    knn_train: str | None = None,
    dense: Backbone | None = None,
    batch_size: int = 64,
    max_images: int | None = None,
    device: str = "cpu",
    throughput_batch: int = 64,
) -> dict[str, Any]:
    """Size, speed and quality of a model; with ``dense`` also its fidelity and speed-up against it."""
    from amp.evaluation import compare_throughput, throughput
    from amp.pipeline import EvalData, quality

    stats = model_stats(backbone)
    data = EvalData(classification, retrieval, knn_train, max_images=max_images)
    report: dict[str, Any] = {
        "params_M": stats.params / 1e6,
        "mlp_params_M": stats.mlp_params / 1e6,
        "gflops": stats.flops / 1e9,
        "widths": backbone.widths(),
        **quality(backbone, data, batch_size, device, dense),
    }
    if dense is not None:
        speed = compare_throughput(dense, backbone, batch_size=throughput_batch, device=device)
        report.update({"images_per_s": speed["pruned"], "dense_images_per_s": speed["dense"]})
        report["speedup"] = speed["speedup"]
    else:
        report["images_per_s"] = throughput(backbone, batch_size=throughput_batch, device=device)
    return report


def write_json(path, data) -> None:
    _write_json(path, asdict(data) if is_dataclass(data) else data)
