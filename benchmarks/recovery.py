"""Recovery after pruning: plain slicing vs bias / least-squares compensation vs distillation.

    python benchmarks/recovery.py                                   # zoo:tiny-clip on Fashion-MNIST
    python benchmarks/recovery.py --threshold 0.02                  # AMP search widths instead of a uniform ratio
    python benchmarks/recovery.py --model zoo:dinov2-s --threshold 0.02 --rule absolute --reference dense
    python benchmarks/recovery.py --model open_clip:ViT-B-32:laion2b_s34b_b79k --data imagefolder:/imagenet/val \\
        --calib-data imagefolder:/imagenet/train --train-data imagefolder:/imagenet/train --distill-steps 500

The model is scored (Taylor, entropy criterion) and pruned on ``--calib-data``, either uniformly (``--ratio``) or by
the AMP search (``--threshold``); the same widths are then recovered in each way and evaluated on ``--data``:
embedding fidelity to the dense model (mean / min cosine of the projected embeddings), k-NN top-1 with neighbours
from ``--knn-train`` (labelled data), and, for a CLIP, zero-shot top-1 and image-text retrieval R@1 on
``--retrieval-data``. ``recovered`` is the share of the pruning drop (dense minus pruned-only) won back, per metric.
The time column is the wall time of the recovery itself (statistics collection included for the compensations).
``--model`` defaults to ``zoo:tiny-clip`` and falls back to a randomly initialised ``open_clip:amp-tiny-clip`` when the
zoo weights are not built.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amp import api
from amp.data import load_dataset
from amp.distill import distill
from amp.evaluation import EvalRow, EvalSuite
from amp.models import ModelSpecError
from amp.notebook import add_mean_recall
from amp.recovery import calibration_stats, compensate_model
from amp.stats import paired_difference
from amp.surgery import snapshot
from amp.width_search import materialise, uniform_widths


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="zoo:tiny-clip")
    p.add_argument("--data", default="fashion-mnist:test", help="evaluation images (labelled: zero-shot too)")
    p.add_argument(
        "--calib-data", nargs="+", default=["fashion-mnist:train-subset"], help="scoring, search and statistics"
    )
    p.add_argument("--train-data", nargs="+", default=["fashion-mnist:train-subset"], help="distillation images")
    p.add_argument("--knn-train", default="fashion-mnist:train-subset", help="k-NN neighbours ('' to skip k-NN)")
    p.add_argument("--knn-images", type=int, default=1000, help="k-NN neighbours used")
    p.add_argument(
        "--retrieval-data", default="fmnist-captions:test-hard", help="captioned images for a CLIP ('' to skip)"
    )
    p.add_argument("--ratio", type=float, default=0.5, help="uniform kept fraction (without --threshold)")
    p.add_argument("--threshold", type=float, default=None, help="run the AMP search with this threshold instead")
    p.add_argument("--rule", choices=("increase", "absolute"), default="increase", help="search rule")
    p.add_argument("--reference", choices=("previous", "dense"), default="previous", help="search reference")
    p.add_argument("--temp-inv", type=float, default=15.0, help="inverse temperature of the entropy criterion")
    p.add_argument("--search-images", type=int, default=256, help="images the search probes on")
    p.add_argument("--score-method", choices=("taylor", "magnitude"), default="taylor")
    p.add_argument("--calib-images", type=int, default=512)
    p.add_argument("--eval-images", type=int, default=10000)
    p.add_argument("--distill-steps", type=int, default=100, help="0: skip distillation")
    p.add_argument("--distill-lr", type=float, default=1e-4)
    p.add_argument(
        "--distill-from", nargs="+", choices=("none", "lstsq"), default=["none", "lstsq"], help="distillation starts"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--ridge", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the table to this JSON file")
    return p.parse_args(argv)


def load(spec: str, device: str):
    try:
        return api.load_model(spec, device=device), spec
    except ModelSpecError as err:
        if spec != "zoo:tiny-clip":
            raise
        fallback = "open_clip:amp-tiny-clip"
        print(f"[{spec} unavailable ({err}); using a randomly initialised {fallback}]", file=sys.stderr)
        return api.load_model(fallback, device=device), fallback


def calibration_batches(dense, args) -> list:
    """``--calib-images`` images, split evenly over the ``--calib-data`` sets, their batches interleaved."""
    share = args.calib_images // len(args.calib_data)
    sources = [materialise(api.loader(dense, spec, args.batch_size, args.seed), share) for spec in args.calib_data]
    return [batch for group in itertools.zip_longest(*sources) for batch in group if batch is not None]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    dense, spec = load(args.model, args.device)
    dense.model.eval()
    calib = calibration_batches(dense, args)
    labelled = bool(getattr(load_dataset(args.data), "classes", None))  # zero-shot and k-NN need class labels
    # one suite: the evaluation images loaded once, the zero-shot head and the dense embeddings computed once
    suite = EvalSuite(
        dense,
        classification=args.data if labelled else None,
        retrieval=args.retrieval_data or None,
        knn_train=args.knn_train if labelled else None,
        knn_test=args.data,
        fidelity=args.data,
        max_images=args.eval_images,
        knn_images=args.knn_images,
        batch_size=args.batch_size,
        device=args.device,
    )

    # widths: AMP search or a uniform ratio, both from the same scores
    start = time.perf_counter()
    scores = api.score(
        dense, calib, method=args.score_method, temp_inv=args.temp_inv, batch_size=args.batch_size, device=args.device
    )
    orders = scores.orders()
    if args.threshold is not None:
        searched = copy.deepcopy(dense)
        result = api.search(
            searched,
            scores,
            calib,
            threshold=args.threshold,
            temp_inv=args.temp_inv,
            batch_size=args.batch_size,
            max_images=args.search_images,
            rule=args.rule,
            reference=args.reference,
            device=args.device,
        )
        widths = result["widths"]
        how = f"AMP search, threshold {args.threshold} ({args.rule}/{args.reference})"
        del searched
    else:
        widths, how = uniform_widths(dense.widths(), args.ratio), f"uniform ratio {args.ratio}"
    prune_time = time.perf_counter() - start
    kept = sum(widths) / sum(dense.widths())
    print(f"{spec}: {how}; kept {kept:.1%} of MLP units; widths {widths} ({prune_time:.1f} s to score/search)")

    states = [snapshot(site) for site in dense.sites()]
    rows, measured = [], []

    def evaluate(name: str, backbone, seconds: float | None) -> None:
        result = suite.measure(backbone, name)
        cosine = result.outcomes.get("fidelity_cosine", torch.ones(1))  # the dense model is its own reference
        row = {"variant": name, "mean_cos": cosine.mean().item(), "min_cos": cosine.min().item(), "time_s": seconds}
        if "zero_shot_top1" in result.metrics:
            row["top1"] = result["zero_shot_top1"]
        if "i2t_R@1" in result.outcomes:  # per image: the mean of its two directions, so R@1 gets paired tests too
            add_mean_recall(result)
            row["R@1"] = result["mean_R@1"]
        if "knn_top1" in result.metrics:
            row["knn"] = result["knn_top1"]
        row["interval"] = {m: result.interval(key) for m, key in KEYS.items() if key in result.outcomes}
        rows.append(row)
        measured.append(result)
        print(json.dumps(row), file=sys.stderr, flush=True)

    evaluate("dense", dense, None)
    stats_time = time.perf_counter()
    stats = calibration_stats(dense, calib, device=args.device)
    stats_time = time.perf_counter() - stats_time
    variants = {}
    for method in ("none", "bias", "lstsq"):
        backbone = copy.deepcopy(dense)
        start = time.perf_counter()
        compensate_model(backbone, states, orders, widths, stats, method, ridge=args.ridge)
        seconds = time.perf_counter() - start + (stats_time if method != "none" else 0.0)
        variants[method] = backbone
        evaluate({"none": "pruned only", "bias": "+ bias", "lstsq": "+ lstsq"}[method], backbone, seconds)

    if args.distill_steps > 0:
        train = torch.utils.data.ConcatDataset([load_dataset(spec, dense.preprocess) for spec in args.train_data])
        for base in args.distill_from:
            student = copy.deepcopy(variants[base])
            out = distill(
                student,
                dense,
                train,
                args.distill_steps,
                batch_size=args.batch_size,
                lr=args.distill_lr,
                seed=args.seed,
                device=args.device,
            )
            prefix = "" if base == "none" else "+ lstsq "
            evaluate(f"{prefix}+ distill {args.distill_steps} steps", student, out["wall_time_s"])
            rows[-1]["distill_loss"] = [out["history"][0]["loss"], out["final_loss"]]
            rows[-1]["images_per_s"] = out["images_per_s"]

    metrics = [m for m in ("top1", "R@1", "knn", "mean_cos") if m in rows[0]]
    for row in rows[2:]:  # share of the drop (dense - pruned only) won back, per metric
        row["recovered"] = {m: recovered(rows[0][m], rows[1][m], row[m]) for m in metrics}
    print(f"\n{spec}  ({how}, {kept:.1%} of MLP units kept, {args.eval_images} eval images, device {args.device})")
    print(table(rows, metrics))
    print(
        "\n".join(
            [
                "",
                "Paired on the same images (95 % CI): vs dense, vs pruned, vs each distillation's start, by start:",
                *comparisons(measured),
            ]
        )
    )
    if args.json:
        meta = {"model": spec, "widths": widths, "how": how, "kept": kept, "args": vars(args), "rows": rows}
        Path(args.json).write_text(json.dumps(meta, indent=2) + "\n")
    return 0


def comparisons(measured: list[EvalRow]) -> list[str]:
    """``pruned only`` against ``dense``, each recovered variant against ``pruned only``, each distilled one against
    ``dense`` (is it back?), each ``+ lstsq + distill`` against ``+ lstsq`` (did the steps help?) and against the plain
    distillation (did the start help?): is the difference in each metric measurable on the same items?"""
    by_name = {row.name: row for row in measured}
    pairs = [(measured[0], measured[1])] + [(measured[1], row) for row in measured[2:]]
    pairs += [(measured[0], row) for row in measured[2:] if "distill" in row.name]
    pairs += [(by_name["+ lstsq"], row) for row in measured if row.name.startswith("+ lstsq +")]  # vs its start
    pairs += [
        (by_name[row.name.removeprefix("+ lstsq ")], row)
        for row in measured
        if row.name.startswith("+ lstsq +") and row.name.removeprefix("+ lstsq ") in by_name
    ]
    keys = [k for k in KEYS.values() if k in measured[1].outcomes]
    return [
        f"- {paired_difference(a, b, key).verdict}"
        for a, b in pairs
        for key in keys
        if key in a.outcomes  # dense has no cosine outcomes (it is the reference)
    ]


def recovered(dense: float, pruned: float, value: float) -> float | None:
    """Share of the pruning drop won back: 0 = no better than pruned only, 1 = back at dense (None: no drop)."""
    drop = dense - pruned
    return None if abs(drop) < 1e-9 else (value - pruned) / drop


LABELS = {"top1": "zero-shot", "R@1": "mean R@1", "knn": "k-NN", "mean_cos": "cos"}
KEYS = {"top1": "zero_shot_top1", "R@1": "mean_R@1", "knn": "knn_top1", "mean_cos": "fidelity_cosine"}


def table(rows: list[dict], metrics: list[str]) -> str:
    """A Markdown table: each metric and, after pruning, the share of its drop recovered."""
    names = [LABELS[m] for m in metrics]
    head = ["variant", *names, "min cos", f"recovered ({', '.join(names)})", "time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for row in rows:
        cells = [row["variant"], *(with_interval(row, m) for m in metrics), f"{row['min_cos']:.3f}"]
        share = row.get("recovered")
        cells.append(", ".join("–" if share[m] is None else f"{share[m]:.0%}" for m in metrics) if share else "–")
        cells.append("–" if row["time_s"] is None else f"{row['time_s']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def with_interval(row: dict, metric: str) -> str:
    """``0.873 [0.866, 0.879]``: the value and its 95 % interval over the evaluation items (none for dense cosine)."""
    low, high = row["interval"].get(metric, (None, None))
    if low is None or (row["variant"] == "dense" and metric == "mean_cos"):
        return f"{row[metric]:.3f}"
    return f"{row[metric]:.3f} [{low:.3f}, {high:.3f}]"


if __name__ == "__main__":
    sys.exit(main())
