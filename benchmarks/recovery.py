"""Recovery after pruning: plain slicing vs bias / least-squares compensation vs distillation.

    python benchmarks/recovery.py                                   # zoo:tiny-clip on Fashion-MNIST
    python benchmarks/recovery.py --threshold 0.02                  # AMP search widths instead of a uniform ratio
    python benchmarks/recovery.py --model open_clip:ViT-B-32:laion2b_s34b_b79k --data imagefolder:/imagenet/val \\
        --calib-data imagefolder:/imagenet/train --train-data imagefolder:/imagenet/train --distill-steps 500

The model is scored (Taylor, entropy criterion) and pruned on ``--calib-data``, either uniformly (``--ratio``) or by
the AMP search (``--threshold``); the same widths are then recovered in each way and evaluated on ``--data``:
embedding fidelity to the dense model (mean / min cosine of the projected embeddings) and, for a CLIP on a labelled
data set, zero-shot top-1. The last column is the wall time of the recovery itself (statistics collection included
for the compensations). ``--model`` defaults to ``zoo:tiny-clip`` and falls back to a randomly initialised
``open_clip:amp-tiny-clip`` when the zoo weights are not built.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amp import api
from amp.data import load_dataset, make_loader
from amp.distill import distill
from amp.evaluate import DEFAULT_TEMPLATES, embedding_fidelity, zero_shot_classification, zero_shot_classifier
from amp.models import ModelSpecError
from amp.recovery import calibration_stats, compensate_model
from amp.search import materialise, uniform_widths
from amp.surgery import snapshot


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="zoo:tiny-clip")
    p.add_argument("--data", default="fashion-mnist:test-subset", help="evaluation images (labelled: zero-shot too)")
    p.add_argument("--calib-data", default="fashion-mnist:train-subset", help="scoring, search and statistics")
    p.add_argument("--train-data", default="fashion-mnist:train-subset", help="distillation images")
    p.add_argument("--ratio", type=float, default=0.5, help="uniform kept fraction (without --threshold)")
    p.add_argument("--threshold", type=float, default=None, help="run the AMP search with this threshold instead")
    p.add_argument("--score-method", choices=("taylor", "magnitude"), default="taylor")
    p.add_argument("--calib-images", type=int, default=512)
    p.add_argument("--eval-images", type=int, default=500)
    p.add_argument("--distill-steps", type=int, default=100, help="0: skip distillation")
    p.add_argument("--distill-lr", type=float, default=3e-4)
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
        import amp.zoo

        amp.zoo.import_zoo_modules()  # registers the amp-tiny-clip architecture with open_clip
        return api.load_model(fallback, device=device), fallback


def templates_for(data: str):
    if data.startswith(("fashion-mnist", "fmnist-captions")):
        from amp.fashion import FASHION_TEMPLATES

        return list(FASHION_TEMPLATES)
    return list(DEFAULT_TEMPLATES)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    dense, spec = load(args.model, args.device)
    dense.model.eval()
    calib = materialise(api.loader(dense, args.calib_data, args.batch_size, args.seed), args.calib_images)
    eval_set = load_dataset(args.data, dense.preprocess)
    eval_set = torch.utils.data.Subset(eval_set, range(min(args.eval_images, len(eval_set))))
    eval_loader = make_loader(eval_set, args.batch_size)
    classes = getattr(eval_set.dataset, "classes", None)
    classifier = None
    if dense.is_clip and classes:
        classifier = zero_shot_classifier(dense, classes, templates_for(args.data), device=args.device)

    # widths: AMP search or a uniform ratio, both from the same scores
    start = time.perf_counter()
    scores = api.score(dense, calib, method=args.score_method, batch_size=args.batch_size, device=args.device)
    orders = scores.orders()
    if args.threshold is not None:
        searched = copy.deepcopy(dense)
        result = api.search(searched, scores, calib, threshold=args.threshold, device=args.device)
        widths, how = result["widths"], f"AMP search, threshold {args.threshold}"
        del searched
    else:
        widths, how = uniform_widths(dense.widths(), args.ratio), f"uniform ratio {args.ratio}"
    prune_time = time.perf_counter() - start
    kept = sum(widths) / sum(dense.widths())
    print(f"{spec}: {how}; kept {kept:.1%} of MLP units; widths {widths} ({prune_time:.1f} s to score/search)")

    states = [snapshot(site) for site in dense.sites()]
    rows = []

    def evaluate(name: str, backbone, seconds: float | None) -> None:
        fid = embedding_fidelity(dense, backbone, eval_loader, device=args.device)
        row = {"variant": name, "mean_cos": fid["mean_cosine"], "min_cos": fid["min_cosine"], "time_s": seconds}
        if classifier is not None:
            zs = zero_shot_classification(backbone, eval_loader, classes, device=args.device, classifier=classifier)
            row["top1"] = zs["top1"]
        rows.append(row)

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
        train = load_dataset(args.train_data, dense.preprocess)
        for base in ("none", "lstsq"):
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

    header = f"{'variant':<32} {'mean cos':>9} {'min cos':>9}" + (f" {'top-1':>7}" if classifier is not None else "")
    print(f"\n{spec}  ({how}, {kept:.1%} of MLP units kept, {len(eval_set)} eval images, device {args.device})")
    print(header + f" {'time (s)':>9}")
    for row in rows:
        line = f"{row['variant']:<32} {row['mean_cos']:9.4f} {row['min_cos']:9.4f}"
        if classifier is not None:
            line += f" {100 * row['top1']:6.1f}%"
        line += f" {row['time_s']:9.2f}" if row["time_s"] is not None else f" {'-':>9}"
        print(line)
    if args.json:
        meta = {"model": spec, "widths": widths, "how": how, "kept": kept, "device": args.device, "rows": rows}
        Path(args.json).write_text(json.dumps(meta, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
