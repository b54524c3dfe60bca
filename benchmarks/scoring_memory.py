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
* ``chunkN`` (``--chunks N ...``): ``taylor_scores(..., chunk_size=N)``, the two-pass gradient cache: the batch is
  the criterion's global batch, run through the model N images at a time (``chunkN_ckpt``: with checkpointing too).
  Its peak should stay near that of an N-image batch whatever ``--batch``: ``--alone`` adds ``aloneN``, the
  unchunked ``gate`` on the batch's first N images only, to measure that in the same run (its scores are not compared).

On ``--device cuda`` the peak is torch's allocator high-water mark (``torch.cuda.max_memory_allocated`` above the
memory after loading) instead of the process's RSS.

    python benchmarks/scoring_memory.py                         # ViT-B-16, batch 32, fp32, CPU
    python benchmarks/scoring_memory.py --autocast bf16         # the paper's precision
    python benchmarks/scoring_memory.py --batch 8 --variants reference gate
    python benchmarks/scoring_memory.py --model zoo:tiny-clip --batch 256 --variants gate --chunks 32 64
    python benchmarks/scoring_memory.py --model open_clip:ViT-g-14 --batch 1024 --variants gate_ckpt \
        --chunks 64 128 --ckpt-chunks --autocast bf16 --device cuda   # the paper's global batch on one GPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
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


def gate_scores(
    backbone, images, criterion, autocast_dtype, counter, checkpoint: bool, chunk_size: int | None = None
) -> list[torch.Tensor]:
    """amp.scoring.taylor_scores on the one batch, optionally with per-block activation checkpointing and chunks."""
    from amp.scoring import taylor_scores

    with saved_bytes(counter, backbone.model):
        scores = taylor_scores(
            backbone,
            [(images, None)],
            criterion,
            autocast_dtype=autocast_dtype,
            progress=False,
            checkpoint=checkpoint,
            chunk_size=chunk_size,
        )
    return scores.values


def parse_variant(name: str) -> tuple[str, int | None, bool]:
    """(kind, chunk size, checkpoint) of a variant name: reference, gate, gate_ckpt, chunkN[_ckpt], aloneN[_ckpt]
    (kind ``alone``: the first N images as a batch of their own)."""
    match = re.fullmatch(r"(chunk|alone)(\d+)(_ckpt)?", name)
    if match:
        return ("gate" if match.group(1) == "chunk" else "alone"), int(match.group(2)), bool(match.group(3))
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS} or chunkN[_ckpt]")
    return ("reference" if name == "reference" else "gate"), None, name == "gate_ckpt"


def worker(args) -> None:
    from amp.criteria import Entropy
    from amp.models import load_model

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    backbone = load_model(args.model, device=args.device)
    size = backbone.adapter.input_size(backbone.model)
    images = torch.randn(args.batch, *size, generator=torch.Generator().manual_seed(1)).to(args.device)
    criterion = Entropy(args.temp_inv)
    autocast_dtype = {"none": None, "bf16": torch.bfloat16}[args.autocast]
    kind, chunk_size, checkpoint = parse_variant(args.worker)
    if kind == "alone":  # an N-image batch of its own: the memory one chunk would need
        images, kind, chunk_size = images[:chunk_size], "gate", None
    gc.collect()
    reset = reset_peak()
    before_kb = _status_kb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before_kb = torch.cuda.memory_allocated() / 1024
    counter: dict[str, int] = {}
    start = time.perf_counter()
    if kind == "reference":
        values = reference_scores(backbone, images, criterion, autocast_dtype, counter)
    else:
        values = gate_scores(backbone, images, criterion, autocast_dtype, counter, checkpoint, chunk_size)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 1024 if cuda else peak_kb(reset)
    torch.save([v.cpu() for v in values], args.out)
    print(
        json.dumps(
            {
                "variant": args.worker,
                "measure": "cuda allocator" if cuda else "rss",
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
    parser.add_argument("--variants", nargs="*", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--chunks", nargs="*", type=int, default=[], help="chunk sizes: adds variants chunkN")
    parser.add_argument("--ckpt-chunks", action="store_true", help="chunkN variants with checkpointing (chunkN_ckpt)")
    parser.add_argument("--alone", action="store_true", help="add aloneN: a batch of only N images, for comparison")
    parser.add_argument("--device", default="cpu", help="cpu (peak RSS) or cuda (allocator peak)")
    parser.add_argument("--threads", type=int, help="CPU threads per worker (1 on a shared, loaded machine)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    for chunk in args.chunks:
        if not 1 <= chunk < args.batch:
            parser.error(f"--chunks {chunk}: a chunk size must be in [1, --batch) = [1, {args.batch})")
    ckpt = "_ckpt" if args.ckpt_chunks else ""
    args.variants = list(args.variants) + [f"chunk{c}{ckpt}" for c in args.chunks]
    args.variants += [f"alone{c}{ckpt}" for c in args.chunks] if args.alone else []
    if not args.variants:
        parser.error("no variants: give --variants and/or --chunks")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            out = os.path.join(tmp, f"{variant}.pt")
            command = [sys.executable, __file__, "--worker", variant, "--out", out, "--model", args.model]
            command += ["--batch", str(args.batch), "--autocast", args.autocast, "--temp-inv", str(args.temp_inv)]
            command += ["--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
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
    compared = [v for v in args.variants if not v.startswith("alone")]  # aloneN scores other images
    first = compared[0]
    for variant in compared[1:]:  # all variants compute the same scores
        for got, want in zip(results[variant]["scores"], results[first]["scores"]):
            rtol = 1e-3 if args.autocast == "none" else 5e-2
            torch.testing.assert_close(got, want, rtol=rtol, atol=1e-6 * float(want.abs().max()))
    print(f"scores agree across {', '.join(compared)}")
    for base_name in ("reference", "gate", "gate_ckpt"):  # ratios to each unchunked variant measured in this run
        if base_name not in results:
            continue
        base = results[base_name]["peak_mib"]
        for variant in args.variants:
            if variant != base_name and (base_name == "reference" or variant.startswith("chunk")):
                ratio = results[variant]["peak_mib"] / base
                print(f"{variant:<12} / {base_name} peak: {ratio:.2f}x   time {results[variant]['seconds']:.1f} s "
                      f"vs {results[base_name]['seconds']:.1f} s")  # fmt: skip
    for variant in args.variants:  # a chunked global batch against one chunk's batch alone
        if variant.startswith("chunk") and variant.replace("chunk", "alone") in results:
            alone = variant.replace("chunk", "alone")
            ratio = results[variant]["peak_mib"] / results[alone]["peak_mib"]
            print(f"{variant:<12} / {alone} peak: {ratio:.2f}x (global batch {args.batch} vs a batch of one chunk)")
    summary = {
        "model": args.model,
        "batch": args.batch,
        "chunks": args.chunks,
        "device": args.device,
        "threads": args.threads,
        "autocast": args.autocast,
        "torch": torch.__version__,
        "results": {k: {kk: vv for kk, vv in v.items() if kk != "scores"} for k, v in results.items()},
    }
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
