"""The front door: plain names and paths in, results out. The CLI and the notebooks call these."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

import torch

from amp import distributed
from amp.accounting import model_stats
from amp.adapters import BackboneAdapter, MLPSite, register_backbone
from amp.criteria import Criterion, build_criterion, check_batch_size
from amp.data import check_option, load_dataset, make_loader
from amp.distill import augment_name, distill, train_transform
from amp.evaluation import EvalSuite, evaluate, zero_shot_classifier
from amp.io import write_json as _write_json
from amp.models import Backbone, load_model, load_pruned, save_pruned
from amp.recovery import calibration_stats, compensate_model
from amp.scoring import (
    Scores,
    check_scores_for,
    load_scores,
    magnitude_scores,
    random_scores,
    save_scores,
    taylor_scores,
)
from amp.surgery import prune as slice_sites
from amp.surgery import snapshot
from amp.width_search import amp_search, apply_widths, check_round_to, global_widths, materialise, uniform_widths

ALLOCATIONS = ("amp", "uniform", "global")
RECOVERIES = ("bias", "lstsq", "distill")

__all__ = [
    "Backbone",
    "BackboneAdapter",
    "EvalSuite",
    "MLPSite",
    "evaluate",
    "load_model",
    "load_pruned",
    "load_scores",
    "loader",
    "model_stats",
    "prune",
    "recover",
    "register_backbone",
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


def _data_name(data) -> str:
    """How messages and provenance name a data source: its spec, or the type of a Dataset or loader's data set."""
    return data if isinstance(data, str) else type(_dataset_of(data)).__name__


def _check_loading(batch_size: int, max_images: int | None, what: str = "max_images") -> None:
    check_option("batch_size", batch_size, 1, integer=True)
    check_option(what, max_images, 1, integer=True, optional=True)


def _check_criterion_data(criterion: Criterion, data, batch_size: int, name: str) -> None:
    """Before any work: batches (and the data set) large enough for the criterion, named in the message."""
    dataset = _dataset_of(data)
    size = len(dataset) if isinstance(dataset, torch.utils.data.Dataset) and hasattr(dataset, "__len__") else None
    check_batch_size(criterion, batch_size, name, size)


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
    chunk_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> Scores:
    """Importance of every MLP hidden unit: ``taylor`` under a criterion, or the ``magnitude``/``random`` baselines.

    ``batch_size`` is the criterion's (global) batch; ``chunk_size`` runs it through the model that many images at a
    time with the same scores (:func:`amp.scoring.taylor_scores`); ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs
    the model under autocast, the criterion in fp32."""
    if method == "magnitude":
        return magnitude_scores(backbone)
    if method == "random":
        return random_scores(backbone, seed)
    if method != "taylor":
        raise ValueError(f"unknown scoring method {method!r}; choose taylor, magnitude or random")
    _check_loading(batch_size, max_images)
    name = _data_name(data)
    data = loader(backbone, data, batch_size, seed)
    crit = build_criterion(
        criterion, backbone, temp_inv, _dataset_of(data), device or "cpu", zero_shot_head=zero_shot_classifier
    )
    _check_criterion_data(crit, data, batch_size, name)
    scores = taylor_scores(
        backbone,
        data,
        crit,
        signed=signed,
        max_images=max_images,
        device=device,
        checkpoint=checkpoint,
        data_name=name,
        chunk_size=chunk_size,
        autocast_dtype=autocast_dtype,
    )
    scores.meta["data"] = name
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
    chunk_size: int | None = None,
    cache_gb: float = 4.0,
    autocast_dtype: torch.dtype | None = None,
    **amp_options: Any,
) -> dict[str, Any]:
    """Choose widths (``amp`` bisection, or ``uniform``/``global`` at ``ratio``) and prune ``backbone`` in place.

    ``batch_size`` is the criterion's (global) batch, run ``chunk_size`` images at a time; ``cache_gb`` bounds the
    memory the search holds (the validation images take at most half of it in memory, the rest goes to disk; see
    :func:`amp.width_search.amp_search`); ``autocast_dtype`` runs the model under autocast, the criterion in fp32."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; choose amp, uniform or global")
    if allocation == "amp" and threshold is None:
        raise ValueError("the amp allocation needs a threshold")
    if allocation != "amp" and ratio is None:
        raise ValueError(f"the {allocation} allocation needs a ratio")
    _check_loading(batch_size, max_images)
    check_scores_for(scores, backbone)
    check_round_to(amp_options.get("round_to", 1), scores.widths, [site.name for site in backbone.sites()])
    dense_widths = backbone.widths()
    name = _data_name(data)
    val = loader(backbone, data, batch_size, seed)
    crit = build_criterion(
        criterion, backbone, temp_inv, _dataset_of(val), device or "cpu", zero_shot_head=zero_shot_classifier
    )
    _check_criterion_data(crit, val, batch_size, name)
    if distributed.world_size() > 1:  # the loss of the global batch, identical on every rank
        crit = distributed.GlobalCriterion(crit)
    check_option("cache_gb", cache_gb, 0, low_open=True)
    batches = materialise(val, max_images, memory_gb=cache_gb / 2)
    precision = {"chunk_size": chunk_size, "autocast_dtype": autocast_dtype}
    if allocation == "amp":
        result = amp_search(
            backbone, scores, batches, crit, threshold, device=device, cache_gb=cache_gb, **precision, **amp_options
        )
    else:
        round_to = amp_options.get("round_to", 1)
        if allocation == "uniform":
            widths = uniform_widths(dense_widths, ratio, round_to)
        else:
            widths = global_widths(scores, ratio, round_to)
        compensation = {k: amp_options[k] for k in ("compensation", "ridge") if k in amp_options}
        result = apply_widths(backbone, scores, widths, batches, crit, device=device, **precision, **compensation)
        result.config.update({"method": allocation, "ratio": ratio, "round_to": round_to})
    backbone.info["dense_widths"] = dense_widths
    backbone.info.setdefault("base_model", backbone.spec)
    return result.to_json()


def write_json(path, data) -> None:
    _write_json(path, asdict(data) if is_dataclass(data) else data)


def prune(
    backbone: Backbone,
    scores: Scores,
    widths: Sequence[int] | None = None,
    allocation: str = "uniform",
    ratio: float | None = None,
    round_to: int = 1,
    inplace: bool = False,
) -> Backbone:
    """Scores → widths → sliced model: keep each MLP's ``widths[l]`` best units (or a ``uniform``/``global``
    allocation at ``ratio``). Returns a pruned copy unless ``inplace``; the search itself is :func:`search`."""
    if widths is None:
        if ratio is None:
            raise ValueError("prune needs widths, or an allocation ('uniform' or 'global') with a ratio")
        if allocation == "uniform":
            widths = uniform_widths(backbone.widths(), ratio, round_to)
        elif allocation == "global":
            widths = global_widths(scores, ratio, round_to)
        else:
            raise ValueError(f"unknown allocation {allocation!r}; choose uniform or global (or run amp.search)")
    if list(scores.widths) != backbone.widths():
        raise ValueError(f"scores are for MLP widths {scores.widths}, the model has {backbone.widths()}")
    check_scores_for(scores, backbone)
    pruned = backbone if inplace else copy.deepcopy(backbone)
    slice_sites(pruned.sites(), scores.orders(), list(widths))
    pruned.info["dense_widths"] = list(scores.widths)
    pruned.info.setdefault("base_model", backbone.spec)
    return pruned


def _check_sliced_from(pruned: Backbone, dense: Backbone, scores: Scores) -> None:
    """Compensation refits from the dense weights, so the pruned model must keep the scores' best units."""
    for site, dense_site, order in zip(pruned.sites(), dense.sites(), scores.orders()):
        expected = dense_site.fc_in.weight[order[: site.hidden].to(dense_site.fc_in.weight.device)]
        kept = site.fc_in.weight[: site.hidden]
        if kept.shape != expected.shape or not torch.equal(kept.detach().cpu(), expected.detach().cpu()):
            raise ValueError(
                f"{site.name}: the pruned model does not keep the best units of these scores; compensate with the "
                "scores it was pruned with"
            )


def recover(
    pruned: Backbone,
    method: str,
    data,
    dense: Backbone,
    scores: Scores | None = None,
    calib_images: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    device: str | None = None,
    ridge: float = 1e-4,
    **distill_options: Any,
) -> Backbone:
    """A recovered copy of ``pruned``: ``bias``/``lstsq`` compensation calibrated on ``data`` (needs the ``scores``
    it was pruned with), or ``distill`` from ``dense`` on ``data`` (options as :func:`amp.distill.distill`)."""
    if method not in RECOVERIES:
        raise ValueError(f"unknown recovery {method!r}; choose bias, lstsq or distill")
    _check_loading(batch_size, calib_images, "calib_images")
    if method in ("bias", "lstsq"):
        if scores is None:
            raise ValueError(f"{method} compensation needs the scores the model was pruned with")
        check_option("ridge", ridge, 0)
        check_scores_for(scores, dense)
        _check_sliced_from(pruned, dense, scores)
        recovered = copy.deepcopy(dense)
        states = [snapshot(site) for site in recovered.sites()]
        calibration = materialise(loader(dense, data, batch_size, seed), calib_images)
        stats = calibration_stats(dense, calibration, device=device)
        compensate_model(recovered, states, scores.orders(), pruned.widths(), stats, method=method, ridge=ridge)
        recovered.info = {**pruned.info, "recovery": {"method": method, "calib_images": calib_images, "ridge": ridge}}
        return recovered
    return _distilled(pruned, dense, data, batch_size=batch_size, seed=seed, device=device, **distill_options)


def _distilled(
    pruned: Backbone,
    dense: Backbone,
    data,
    seed: int,
    device: str | None,
    augment: bool | str | None = None,
    **options: Any,
) -> Backbone:
    """``augment`` (True or "clip", "dino"; default: a ``config``'s) is applied to data given by name, and recorded."""
    student = copy.deepcopy(pruned)
    config = options.get("config")
    asked = augment_name(augment)
    augment = asked or (config.augment if config is not None else None)
    if isinstance(data, str):  # the training transform follows the student's own preprocessing
        data = load_dataset(data, train_transform(student, augment) if augment else student.preprocess)
    elif asked:
        raise ValueError(f"augment={augment!r} applies to data given by name; build the dataset with train_transform")
    report = distill(student, dense, data, seed=seed, device=device, augment=augment, **options)
    student.info["recovery"] = {
        "method": "distill",
        "steps": report["steps"],
        "wall_time_s": report["wall_time_s"],
        "loss": [entry["loss"] for entry in report["history"]],  # the curve notebooks plot
        "settings": report["settings"],  # the recipe as run: schedule, batch, precision, augmentation
    }
    return student
