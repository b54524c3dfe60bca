"""Peak memory of one Taylor-scoring batch: amp's gates versus storing h and ∂E/∂h per layer.

Each variant runs in its own subprocess (a fresh allocator, nothing shared). After the model and the
images are in memory the kernel's peak-RSS counter is reset (``/proc/self/clear_refs`` ← 5; falls back to
``ru_maxrss``), one batch is scored, and the peak RSS above the post-load RSS is reported. Every variant
also saves its scores so the parent checks they agree, and counts the bytes autograd keeps for backward
(``torch.autograd.graph.saved_tensors_hooks``, distinct storages), which says *why* the peaks are what
they are.

Variants:

* ``reference`` (the paper's hooks, as in tests/test_scoring.py::reference_scores): a forward pre-hook on
  every fc_out keeps h (``retain_grad``); the first h is made the autograd leaf, parameters stay frozen;
  after backward the per-image Σ_t h·∂E/∂h is reduced from the stored h and h.grad.
* ``gate``: :func:`amp.scoring.taylor_scores` as it is (the ``_Gate`` autograd function saves h once, in
  its own dtype, and reduces Σ_t h·g in fp32 in backward).
* ``gate_ckpt``: ``taylor_scores(..., checkpoint=True)``: every block under non-reentrant activation
  checkpointing, the gate hooks kept open through backward.

    python benchmarks/scoring_memory.py                         # ViT-B-16, batch 32, fp32, CPU
    python benchmarks/scoring_memory.py --autocast bf16         # the paper's precision
    python benchmarks/scoring_memory.py --batch 8 --variants reference gate
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("reference", "gate", "gate_ckpt")


# --- measuring ------------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux ≥ 4.0); False when not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_kb(reset_worked: bool) -> int:
    hwm = _status_kb("VmHWM")
    if reset_worked and hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux; includes the load


@contextlib.contextmanager
def saved_bytes(counter: dict, model: torch.nn.Module):
    """Count distinct storages autograd saves for backward (bytes by dtype), the model's parameters excepted."""
    seen: set[int] = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and storage.nbytes() > 0:
            seen.add(key)
            counter[str(t.dtype)] = counter.get(str(t.dtype), 0) + storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


# --- variants ---------------------------------------------------------------------------------------


def reference_scores(backbone, images, criterion, autocast_dtype, counter) -> list[torch.Tensor]:
    """Store every fc_out input h (retain_grad) and its gradient; reduce after backward."""
    sites = backbone.sites()
    backbone.model.eval().requires_grad_(False)
    stored: dict[int, torch.Tensor] = {}

    def keep(site):
        def hook(_module, args):
            h = args[0]
            if h.requires_grad:
                h.retain_grad()
            else:  # the first MLP: nothing upstream needs a gradient, so h is made the leaf (as the paper does)
                h.requires_grad_(True)
            stored[site.index] = h

        return hook

    handles = [s.fc_out.register_forward_pre_hook(keep(s)) for s in sites]
    autocast = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    try:
        with saved_bytes(counter, backbone.model), autocast:
            loss = criterion(backbone.embed(images), None)
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    values = []
    with torch.no_grad():
        for site in sites:
            h = stored.pop(site.index)
            per_image = (h * h.grad).sum(dim=1, dtype=torch.float64)  # Σ over tokens
            values.append((per_image.abs().sum(0) / len(images)).float())
            del h
    return values


def gate_scores(backbone, images, criterion, autocast_dtype, counter, checkpoint: bool) -> list[torch.Tensor]:
    """amp.scoring.taylor_scores on the one batch, optionally with per-block activation checkpointing."""
    from amp.scoring import taylor_scores

    with saved_bytes(counter, backbone.model):
        scores = taylor_scores(
            backbone, [(images, None)], criterion, autocast_dtype=autocast_dtype, progress=False, checkpoint=checkpoint
        )
    return scores.values


def worker(args) -> None:
    from amp.criteria import Entropy
    from amp.models import load_model

    torch.manual_seed(0)
    backbone = load_model(args.model)
    size = backbone.adapter.input_size(backbone.model)
    images = torch.randn(args.batch, *size, generator=torch.Generator().manual_seed(1))
    criterion = Entropy(args.temp_inv)
    autocast_dtype = {"none": None, "bf16": torch.bfloat16}[args.autocast]
    gc.collect()
    reset = reset_peak()
    before_kb = _status_kb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    counter: dict[str, int] = {}
    start = time.perf_counter()
    if args.worker == "reference":
        values = reference_scores(backbone, images, criterion, autocast_dtype, counter)
    else:
        values = gate_scores(backbone, images, criterion, autocast_dtype, counter, args.worker == "gate_ckpt")
    seconds = time.perf_counter() - start
    peak = peak_kb(reset)
    torch.save(values, args.out)
    print(
        json.dumps(
            {
                "variant": args.worker,
                "peak_mib": (peak - before_kb) / 1024,
                "baseline_mib": before_kb / 1024,
                "peak_reset": reset,
                "saved_mib": {k: v / 2**20 for k, v in counter.items()},
                "seconds": seconds,
            }
        )
    )


# --- parent -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="open_clip:ViT-B-16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--autocast", choices=["none", "bf16"], default="none")
    parser.add_argument("--temp-inv", type=float, default=15.0)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return {}

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            out = os.path.join(tmp, f"{variant}.pt")
            command = [sys.executable, __file__, "--worker", variant, "--out", out, "--model", args.model]
            command += ["--batch", str(args.batch), "--autocast", args.autocast, "--temp-inv", str(args.temp_inv)]
            run = subprocess.run(command, capture_output=True, text=True, check=False)
            if run.returncode != 0:
                raise RuntimeError(f"{variant} failed:\n{run.stderr[-4000:]}")
            results[variant] = json.loads(run.stdout.strip().splitlines()[-1])
            results[variant]["scores"] = torch.load(out)
            r = results[variant]
            saved = sum(r["saved_mib"].values())
            print(
                f"{variant:<10} peak +{r['peak_mib']:8.1f} MiB  (autograd saved {saved:8.1f} MiB: "
                + ", ".join(f"{k.replace('torch.', '')} {v:.0f}" for k, v in sorted(r["saved_mib"].items()))
                + f")  {r['seconds']:.0f} s",
                flush=True,
            )
    first = args.variants[0]
    for variant in args.variants[1:]:  # all variants compute the same scores
        for got, want in zip(results[variant]["scores"], results[first]["scores"]):
            rtol = 1e-3 if args.autocast == "none" else 5e-2
            torch.testing.assert_close(got, want, rtol=rtol, atol=1e-6 * float(want.abs().max()))
    print(f"scores agree across {', '.join(args.variants)}")
    if "reference" in results:
        base = results["reference"]["peak_mib"]
        for variant in args.variants:
            if variant != "reference":
                print(f"{variant:<10} / reference peak: {results[variant]['peak_mib'] / base:.2f}x")
    summary = {
        "model": args.model,
        "batch": args.batch,
        "autocast": args.autocast,
        "torch": torch.__version__,
        "results": {k: {kk: vv for kk, vv in v.items() if kk != "scores"} for k, v in results.items()},
    }
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
