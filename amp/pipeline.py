"""The main job, end to end: load → score → search → prune → save → evaluate dense vs pruned → report.

``amp demo`` runs it on the offline default (the tiny CLIP and captioned Fashion-MNIST); the same function
prunes a real model with real data (``--model open_clip:ViT-B-32:openai --data imagefolder:/imagenet/train ...``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from amp import api, hub
from amp.evaluation import EvalRow, EvalSuite
from amp.io import atomic_write, check_output_dir, write_dir, write_json
from amp.models import write_pruned
from amp.stats import paired_difference


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
    # what quality is measured on (any may be None); see amp.evaluation.EvalSuite
    classification: str | None = "fashion-mnist:test-subset"  # labelled: zero-shot (CLIP), k-NN queries
    retrieval: str | None = "fmnist-captions:test-subset"  # captioned (CLIP models)
    knn_train: str | None = None  # neighbours for k-NN classification
    fidelity: str | None = None  # images for the dense-vs-pruned cosine (default: classification)
    eval_images: int | None = None
    templates: list[str] | None = None


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


RUN_FILES = ("scores.safetensors", "search_state.json")  # written before the model, carried into its directory


def run(config: PipelineConfig, out: str | Path, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Prune ``config.model`` and compare it with the dense model; writes the pruned model and REPORT.md to ``out``.

    A non-empty ``out`` needs ``overwrite=True`` (checked before any work) and is then replaced whole; the pruned model
    and its search.json enter ``out`` all or nothing (:func:`amp.io.write_dir`).
    """
    out = check_output_dir(out, overwrite=overwrite, inputs=[config.model])
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
    with timer("save"):

        def write(tmp: Path) -> None:
            write_json(tmp / "search.json", search)
            commands = hub.command_provenance(pruned.info)  # the amp demo command line, for the model card
            write_pruned(pruned, tmp, search=search["config"], scores=scores.meta, **commands)

        write_dir(out, write, overwrite=overwrite, keep=RUN_FILES)
    suite = EvalSuite(
        dense,
        config.classification,
        config.retrieval,
        config.knn_train,
        fidelity=config.fidelity,
        max_images=config.eval_images,
        batch_size=config.batch_size,
        device=config.device,
        templates=config.templates,
    )
    rows: dict[str, EvalRow] = {}
    for name, backbone in (("dense", dense), ("pruned", pruned)):
        with timer(f"evaluate {name}"):
            rows[name] = suite.measure(backbone, name)
    with timer("throughput"):  # one side-by-side measurement for both rows (the CPU is noisy)
        speed = suite.speed(pruned, {"batch_size": config.throughput_batch})
    rows["dense"].metrics["images_per_s"] = speed["dense_images_per_s"]
    rows["pruned"].metrics["images_per_s"] = speed["images_per_s"]
    report = {
        "model": config.model,
        "config": _plain(config),
        "widths": search["widths"],
        "dense_widths": search["dense_widths"],
        "kept_fraction": search["kept_fraction"],
        "loss": {"dense": search["dense_loss"], "pruned": search["final_loss"]},
        "results": {name: row.to_dict() for name, row in rows.items()},
        "intervals": {name: {k: list(bounds) for k, bounds in row.intervals().items()} for name, row in rows.items()},
        "comparisons": comparisons(rows["dense"], rows["pruned"]),
        "seconds": timer.stages,
    }
    write_json(out / "report.json", report)
    atomic_write(out / "REPORT.md", lambda tmp: tmp.write_text(markdown(report)))
    # the card amp push uploads, from the saved model (its amp.json: base, widths, commands) on meta: no weights read
    hub.write_model_card(out, api.load_pruned(out, device="meta"), markdown(report), config=report["config"])
    return report


def _plain(config: PipelineConfig) -> dict[str, Any]:
    return asdict(config)


def comparisons(dense: EvalRow, pruned: EvalRow) -> list[dict[str, Any]]:
    """Pruned minus dense for each reported metric measured item by item on both (paired, 95 % CI, p-value)."""
    keys = [k for k in METRIC_NAMES if k in dense.outcomes and k in pruned.outcomes]
    return [{**asdict(d), "verdict": d.verdict} for d in (paired_difference(dense, pruned, k) for k in keys)]


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
    """The report as a Markdown table (dense vs pruned, 95 % intervals) with widths and wall time per stage."""
    rows, intervals = report["results"], report.get("intervals", {})
    keys = [k for k in METRIC_NAMES if any(k in r for r in rows.values())]
    lines = [
        f"# AMP pruning report: {report['model']}",
        "",
        "| model | " + " | ".join(METRIC_NAMES[k] for k in keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for name, row in rows.items():
        cells = [_fmt(k, row.get(k), intervals.get(name, {}).get(k)) for k in keys]
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
    ]
    if report.get("comparisons"):
        lines += [
            "Brackets: 95 % intervals (Wilson for proportions, bootstrap over images for the cosine). Pruned vs dense "
            "on the same items (paired bootstrap of the difference, exact McNemar p-value):",
            "",
            *(f"- {c['verdict']}" for c in report["comparisons"]),
            "",
        ]
    lines += [
        "Wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items()),
        "",
    ]
    return "\n".join(lines)


def _fmt(key: str, value: float | None, bounds: list[float] | None = None) -> str:
    if value is None:
        return "–"
    if key in {"params_M", "gflops"}:
        return f"{value:.2f}"
    if key == "images_per_s":
        return f"{value:.0f}"
    if key == "fidelity_cosine":
        return f"{value:.3f}" + (f" [{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else "")
    return f"{100 * value:.1f}%" + (f" [{100 * bounds[0]:.1f}, {100 * bounds[1]:.1f}]" if bounds else "")
