"""The main job, end to end: load → score → search → prune → save → evaluate dense vs pruned → report.

``amp demo`` runs it on the offline default (the tiny CLIP and captioned Fashion-MNIST); the same function
prunes a real model with real data (``--model open_clip:ViT-B-32:openai --data imagefolder:/imagenet/train ...``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from amp import api
from amp.data import load_dataset, make_loader
from amp.evaluation import compare_throughput, embedding_fidelity, knn_eval, retrieval, zero_shot_classification
from amp.io import atomic_write, write_json


@dataclass
class EvalData:
    """What to measure quality on; any of them may be None."""

    classification: str | None = None  # labelled data set (zero-shot for CLIP models, else kNN with knn_train)
    retrieval: str | None = None  # captioned data set (CLIP models)
    knn_train: str | None = None  # neighbours for kNN classification
    fidelity: str | None = None  # images for dense-vs-pruned embedding cosine (default: classification)
    max_images: int | None = None
    templates: list[str] | None = None


@dataclass
class PipelineConfig:
    model: str = "zoo:tiny-clip"
    score_data: str = "fmnist-captions:train-subset"
    val_data: str = "fmnist-captions:val-subset"
    criterion: str = "entropy"
    temp_inv: float = 15.0
    threshold: float = 0.01
    steps: int = 6
    rule: str = "increase"
    reference: str = "previous"
    round_to: int = 1
    batch_size: int = 64
    score_images: int | None = 1024
    val_images: int | None = 256
    seed: int = 0
    device: str = "cpu"
    throughput_batch: int = 64
    eval: EvalData = field(
        default_factory=lambda: EvalData(
            classification="fashion-mnist:test-subset", retrieval="fmnist-captions:test-subset"
        )
    )


class _Timer:
    def __init__(self):
        self.stages: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.stages[name] = timer.stages.get(name, 0.0) + time.perf_counter() - self.start

        return _Stage()


def _loader(backbone, spec: str, batch_size: int, max_images: int | None):
    dataset = load_dataset(spec, backbone.preprocess)
    if max_images is not None and max_images < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(max_images))
        for attribute in ("classes", "captions", "templates"):  # Subset hides the data set's metadata
            if hasattr(dataset.dataset, attribute):
                setattr(dataset, attribute, getattr(dataset.dataset, attribute))
    return make_loader(dataset, batch_size, shuffle=False)


def quality(backbone, data: EvalData, batch_size: int = 64, device: str = "cpu", dense=None) -> dict[str, float]:
    """The quality metrics that apply to this model and these data sets, as a flat dict."""
    metrics: dict[str, float] = {}
    if data.classification:
        loader = _loader(backbone, data.classification, batch_size, data.max_images)
        classes = getattr(loader.dataset, "classes", None)
        if backbone.is_clip and classes:
            templates = data.templates or getattr(loader.dataset, "templates", None)
            zs = zero_shot_classification(backbone, loader, list(classes), templates, device=device)
            metrics.update({"zero_shot_top1": zs["top1"], "zero_shot_top5": zs["top5"]})
        if data.knn_train:
            train = _loader(backbone, data.knn_train, batch_size, data.max_images)
            knn = knn_eval(backbone, train, loader, device=device, project=backbone.is_clip)
            metrics["knn_top1"] = knn["top1"]
    if data.retrieval and backbone.is_clip:
        loader = _loader(backbone, data.retrieval, batch_size, data.max_images)
        metrics.update(retrieval(backbone, loader, device=device))
    fidelity_data = data.fidelity or data.classification
    if dense is not None and fidelity_data:
        loader = _loader(backbone, fidelity_data, batch_size, data.max_images)
        metrics["fidelity_cosine"] = embedding_fidelity(dense, backbone, loader, device=device)["mean_cosine"]
    return metrics


def run(config: PipelineConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Prune ``config.model`` and compare it with the dense model; writes the pruned model and REPORT.md to ``out``."""
    out = Path(out)
    timer = _Timer()
    torch.manual_seed(config.seed)
    with timer("load"):
        dense = api.load_model(config.model, device=config.device)
        pruned = copy.deepcopy(dense)
    with timer("score"):
        scores = api.score(
            pruned,
            config.score_data,
            criterion=config.criterion,
            temp_inv=config.temp_inv,
            batch_size=config.batch_size,
            max_images=config.score_images,
            seed=config.seed,
            device=config.device,
        )
        api.save_scores(scores, out / "scores.safetensors")
    with timer("search"):
        search = api.search(
            pruned,
            scores,
            config.val_data,
            threshold=config.threshold,
            criterion=config.criterion,
            temp_inv=config.temp_inv,
            batch_size=config.batch_size,
            max_images=config.val_images,
            seed=config.seed,
            device=config.device,
            steps=config.steps,
            rule=config.rule,
            reference=config.reference,
            round_to=config.round_to,
            state_path=out / "search_state.json",
            progress=progress,
        )
        write_json(out / "search.json", search)
    with timer("save"):
        api.save_pruned(pruned, out, search=search["config"], scores=scores.meta)
    rows = {}
    for name, backbone in (("dense", dense), ("pruned", pruned)):
        with timer(f"evaluate {name}"):
            stats = api.model_stats(backbone)
            rows[name] = {
                "params_M": stats.params / 1e6,
                "mlp_params_M": stats.mlp_params / 1e6,
                "gflops": stats.flops / 1e9,
                **quality(backbone, config.eval, config.batch_size, config.device, dense if name == "pruned" else None),
            }
    with timer("throughput"):
        speed = compare_throughput(dense, pruned, batch_size=config.throughput_batch, device=config.device)
    rows["dense"]["images_per_s"], rows["pruned"]["images_per_s"] = speed["dense"], speed["pruned"]
    report = {
        "model": config.model,
        "config": _plain(config),
        "widths": search["widths"],
        "dense_widths": search["dense_widths"],
        "kept_fraction": search["kept_fraction"],
        "loss": {"dense": search["dense_loss"], "pruned": search["final_loss"]},
        "results": rows,
        "seconds": timer.stages,
    }
    write_json(out / "report.json", report)
    atomic_write(out / "REPORT.md", lambda tmp: tmp.write_text(markdown(report)))
    return report


def _plain(config: PipelineConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(config)


METRIC_NAMES = {
    "params_M": "params (M)",
    "gflops": "GFLOPs",
    "images_per_s": "images/s",
    "zero_shot_top1": "zero-shot top-1",
    "knn_top1": "k-NN top-1",
    "i2t_R@1": "image→text R@1",
    "t2i_R@1": "text→image R@1",
    "fidelity_cosine": "cosine to dense",
}


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table (dense vs pruned) with widths and wall time per stage."""
    rows = report["results"]
    keys = [k for k in METRIC_NAMES if any(k in r for r in rows.values())]
    lines = [
        f"# AMP pruning report: {report['model']}",
        "",
        "| model | " + " | ".join(METRIC_NAMES[k] for k in keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for name, row in rows.items():
        cells = [_fmt(k, row.get(k)) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cfg = report["config"]
    lines += [
        "",
        f"Criterion `{cfg['criterion']}` (temp_inv {cfg['temp_inv']}), threshold {cfg['threshold']}, "
        f"rule `{cfg['rule']}`, reference `{cfg['reference']}`, {cfg['steps']} bisection steps.",
        f"MLP units kept: {report['kept_fraction']:.1%}; criterion loss {report['loss']['dense']:.5f} (dense) → "
        f"{report['loss']['pruned']:.5f} (pruned).",
        "",
        "Widths per layer: " + ", ".join(f"{w}/{d}" for w, d in zip(report["widths"], report["dense_widths"])),
        "",
        "Wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items()),
        "",
    ]
    return "\n".join(lines)


def _fmt(key: str, value: float | None) -> str:
    if value is None:
        return "–"
    if key in {"params_M", "gflops"}:
        return f"{value:.2f}"
    if key == "images_per_s":
        return f"{value:.0f}"
    return f"{value:.3f}" if key == "fidelity_cosine" else f"{100 * value:.1f}%"
