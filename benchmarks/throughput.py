"""Dense versus AMP-pruned inference speed, measured side by side, next to the ideal (FLOP) speedup.

For each model (random weights: speed does not depend on them), batch size and precision, the dense
model and a copy pruned to a realistic AMP width profile are timed in alternating rounds by
:func:`amp.evaluation.compare_throughput`. The FLOP ratio comes from :func:`amp.accounting.model_stats`
(counted on the ``meta`` device, so it is free); ``speedup / FLOP ratio`` says how much of the ideal
speedup the hardware turns into images per second.

Width profile (``--profile``): the per-layer widths of real AMP runs are not published (METHOD.md §2), only
averages of ~44-49 % kept. The default ``u`` profile is an assumed shape with that average: the first and
last blocks keep the most, the middle ones the least, kept(l) = a + 0.4·u(l)², u(l) = |2l/(L-1) - 1|,
``a`` chosen so the mean is ``--keep`` (0.45: ~32 % in the middle, ~72 % at both ends). ``uniform`` keeps
``--keep`` everywhere, ``--widths FILE`` takes a search result (``widths`` in a JSON file). Widths are
rounded up to a multiple of ``--round-to`` (8 on CPU, 64 on GPU by default; 1 disables it).

bf16 runs under ``torch.autocast`` (the fp32 model is not cast; that is what ``compare_throughput`` does).

    python benchmarks/throughput.py                       # CPU: ~5 min on 2 idle cores (see README)
    python benchmarks/throughput.py --device cuda         # GPU: ViT-B-16 and ViT-L-14, batch 1 and 64
    python benchmarks/throughput.py --models ViT-B-16 --batch-sizes 64 --dtypes bf16 --steps 2
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amp.accounting import model_stats
from amp.evaluation import compare_throughput
from amp.models import build_architecture, load_model
from amp.surgery import prune, set_width
from amp.width_search import round_width

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# On CPU the default skips ViT-L-14 at batch 64 (one step is minutes on 2 cores); naming batch sizes runs all.
CPU_DEFAULT = {"ViT-B-16": (1, 64), "ViT-L-14": (1,)}


def profile_fractions(depth: int, keep: float, shape: str) -> list[float]:
    """Kept fraction per layer with mean ``keep`` (before rounding)."""
    if not 0 < keep <= 1:
        raise ValueError(f"--keep must be in (0, 1], got {keep}")
    if shape == "uniform" or depth == 1:
        return [keep] * depth
    if shape != "u":
        raise ValueError(f"unknown profile {shape!r}")
    bowl = [(2 * layer / (depth - 1) - 1) ** 2 for layer in range(depth)]
    amplitude = min(0.4, keep, 1 - keep)  # stays within (0, 1]
    base = keep - amplitude * sum(bowl) / depth
    return [base + amplitude * b for b in bowl]


def profile_widths(dense: list[int], keep: float, shape: str, round_to: int) -> list[int]:
    return [round_width(f * h, round_to, h) for f, h in zip(profile_fractions(len(dense), keep, shape), dense)]


def spec_of(name: str) -> str:
    return name if ":" in name else f"open_clip:{name}"


def flop_ratio(backbone, widths: list[int]) -> tuple[float, float, float]:
    """(dense GFLOPs, pruned GFLOPs, dense/pruned) per image, counted on the meta device."""
    model = build_architecture(backbone.arch, "meta")
    view = types.SimpleNamespace(model=model, adapter=backbone.adapter)
    dense = model_stats(view).flops
    for site, width in zip(backbone.adapter.sites(model), widths):
        set_width(site, width)
    pruned = model_stats(view).flops
    return dense / 1e9, pruned / 1e9, dense / pruned


def auto_steps(backbone, batch: int, dtype: torch.dtype, device: torch.device, seconds: float) -> int:
    """Steps so that each model's timed part of a round lasts about ``seconds`` (≥ 1), from one untimed-for-
    the-result call (it is also the dense model's first warm-up; a first call is slower, so this errs low)."""
    x = torch.randn(batch, *backbone.adapter.input_size(backbone.model), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.no_grad(), autocast:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        backbone.embed(x, project=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return max(1, math.floor(seconds / (time.perf_counter() - start)))


def machine() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()}
    try:
        cpu = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
        info["cpu"] = cpu.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    import os

    info["nproc"] = os.cpu_count()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["ViT-B-16", "ViT-L-14"], help="open_clip names or specs")
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="default: 1 64 (CPU: ViT-L-14 only 1)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--keep", type=float, default=0.45, help="mean kept fraction of MLP units")
    parser.add_argument("--profile", choices=["u", "uniform"], default="u")
    parser.add_argument("--widths", type=Path, help="JSON file with a 'widths' list (a search result)")
    parser.add_argument("--round-to", type=int, help="default 8 on CPU, 64 on GPU")
    parser.add_argument("--steps", type=int, help="timed forward passes per model per round (default: auto)")
    parser.add_argument("--seconds", type=float, help="auto steps: seconds per model per round (CPU 4, GPU 2)")
    parser.add_argument("--warmup", type=int, help="untimed passes per model (default: CPU 1, GPU 5)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating dense/pruned rounds")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    round_to = args.round_to or (64 if gpu else 8)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    seconds = args.seconds or (2.0 if gpu else 4.0)
    print(json.dumps({"machine": machine(), "device": str(device)}))
    header = (
        f"{'model':<10} {'batch':>5} {'dtype':<5} {'kept':>5} {'steps':>5} {'dense/s':>9} {'pruned/s':>9} "
        f"{'speedup':>7} {'FLOPx':>6} {'sp/FLOPx':>8}"
    )
    results = []
    for name in args.models:
        dense = load_model(spec_of(name), device="cpu")
        dense_widths = dense.widths()
        if args.widths:
            widths = [int(w) for w in json.loads(args.widths.read_text())["widths"]]
            widths = [round_width(w, round_to, h) for w, h in zip(widths, dense_widths)]
        else:
            widths = profile_widths(dense_widths, args.keep, args.profile, round_to)
        pruned = copy.deepcopy(dense)
        order = [torch.arange(h) for h in dense_widths]  # which units does not matter for speed
        prune(pruned.sites(), order, widths)
        gflops, pruned_gflops, ratio = flop_ratio(dense, widths)
        kept = sum(widths) / sum(dense_widths)
        print(f"\n{name}: widths {widths} of {dense_widths[0]} (kept {kept:.1%}, round_to {round_to})")
        print(f"GFLOPs/image dense {gflops:.2f} pruned {pruned_gflops:.2f} ratio {ratio:.3f}\n{header}")
        batch_sizes = args.batch_sizes or ([1, 64] if gpu else list(CPU_DEFAULT.get(name, (1, 64))))
        for batch in batch_sizes:
            for dtype_name in args.dtypes:
                dtype = DTYPES[dtype_name]
                dense.model.to(device)
                pruned.model.to(device)
                steps = args.steps or auto_steps(dense, batch, dtype, device, seconds)
                r = compare_throughput(
                    dense, pruned, batch, steps=steps, warmup=warmup, rounds=args.rounds, device=device, dtype=dtype
                )
                row = {
                    "model": name,
                    "batch": batch,
                    "dtype": dtype_name,
                    "steps": steps,
                    "rounds": args.rounds,
                    "kept": kept,
                    "widths": widths,
                    "dense_img_s": r["dense"],
                    "pruned_img_s": r["pruned"],
                    "speedup": r["speedup"],
                    "flop_ratio": ratio,
                    "speedup_over_flop_ratio": r["speedup"] / ratio,
                }
                results.append(row)
                print(
                    f"{name:<10} {batch:>5} {dtype_name:<5} {kept:>5.1%} {steps:>5} {r['dense']:>9.2f} "
                    f"{r['pruned']:>9.2f} {r['speedup']:>7.3f} {ratio:>6.3f} {r['speedup'] / ratio:>8.3f}",
                    flush=True,
                )
        del dense, pruned
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "device": str(device), "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
