"""Wall time of AMP's bisection with cached block inputs (``cache=True``) versus full-model probes.

Both searches run on copies of the same model with the same validation batches, scores, criterion and
threshold; they must find the same widths (asserted) and the same probe losses (reported). To keep the
ratio honest on a shared machine the two searches are *interleaved*: each runs in its own thread and they
take turns layer by layer (a baton passed in ``on_layer_done``), so both see the same background load;
each search's time is summed only while it holds the baton.

Cost model (L blocks, S steps, B validation batches): full probes run L blocks each; cached probes at
layer l run blocks l..L-1 (already pruned: the search goes last to first) plus the patch embedding. The
block inputs are stashed during the dense-loss pass, so the cache costs no extra forward. Fixed costs (dense
and final loss, 2 forwards) are paid by both.

Defaults: open_clip ViT-B-16 (random init) at 224 px, 2 batches of 8 synthetic low-frequency images,
the paper's 6 steps, ``kl_to_dense`` (a random-init model's entropy *drops* under pruning, so an entropy
search would accept every probe; the KL to the dense model behaves like a trained model's entropy and
with ``--threshold 2e-4`` keeps roughly half the units), magnitude scores (free; scores do not change
the cost). That is ~150 full forward passes of 8 images: tens of minutes on 2 CPU cores, so shrink it:

    python benchmarks/search_cost.py --image-size 112 --steps 6          # ~4x cheaper per forward
    python benchmarks/search_cost.py --batches 1 --steps 3
    python benchmarks/search_cost.py --model timm:vit_base_patch16_224 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import threading
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amp.accounting import model_stats
from amp.criteria import build_criterion
from amp.models import build_architecture, load_model
from amp.scoring import magnitude_scores, random_scores
from amp.width_search import amp_search


class Baton:
    """Lets named threads run one at a time, in turn, and sums each one's time while it runs."""

    def __init__(self, names: list[str]):
        self.names, self.turn, self.done = names, 0, set()
        self.elapsed = dict.fromkeys(names, 0.0)
        self.cond = threading.Condition()
        self.started = 0.0

    def take(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.names[self.turn] == name)
            self.started = time.perf_counter()

    def give(self, name: str, finished: bool = False) -> None:
        with self.cond:
            self.elapsed[name] += time.perf_counter() - self.started
            if finished:
                self.done.add(name)
            for _ in self.names:  # next unfinished thread (possibly this one again)
                self.turn = (self.turn + 1) % len(self.names)
                if self.names[self.turn] not in self.done:
                    break
            self.cond.notify_all()


def predicted_speedup(backbone, probes, dense_widths: list[int], stride: int = 1) -> float:
    """full / cached cost in FLOPs, replaying the probes: the ratio a perfectly efficient machine would show.

    Full: dense loss, every probe and the final loss run the whole model at the widths of that moment.
    Cached: the dense-loss pass (which also stashes the inputs of every ``stride``-th block), the recomputation of
    each searched block's inputs from the nearest stash below it (or from the images: stem and blocks 0..l-1, all
    still dense), each probe at layer l runs blocks l..L-1, final loss. Both pay the stem and head per pass (the
    cached probes run the stem on a zero image).
    """
    model = build_architecture(backbone.arch, "meta")
    stats = model_stats(types.SimpleNamespace(model=model, adapter=backbone.adapter))
    other = stats.flops - sum(b.flops for b in stats.blocks)

    def block(layer: int, width: int) -> float:
        b = stats.blocks[layer]
        return b.flops - b.mlp_flops * (1 - width / dense_widths[layer])

    def forward(widths: list[int], start: int = 0) -> float:
        return other + sum(block(layer, widths[layer]) for layer in range(start, len(widths)))

    widths = list(dense_widths)
    full = cached = forward(widths)  # dense loss; the cached search stashes its block inputs in the same pass
    stash = set(range(stride, len(dense_widths), stride))
    for layer in sorted({p.layer for p in probes}, reverse=True):
        below = [s for s in stash if s <= layer]
        start = max(below) if below else 0
        cached += (0 if below else other) + sum(block(i, dense_widths[i]) for i in range(start, layer))
        mine = [p for p in probes if p.layer == layer]
        for probe in mine:
            trial = [*widths[:layer], probe.width, *widths[layer + 1 :]]
            full += forward(trial)
            cached += forward(trial, start=layer)
        accepted = [p.width for p in mine if p.accepted]
        widths[layer] = min(accepted) if accepted else dense_widths[layer]
    full += forward(widths)
    cached += forward(widths)
    return full / cached


def validation_batches(count: int, batch: int, size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Smooth random images (upsampled 7x7 noise): less alike under a random-init model than white noise."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        coarse = torch.randn(batch, 3, 7, 7, generator=generator)
        out.append((F.interpolate(coarse, size=size, mode="bicubic", align_corners=False), torch.full((batch,), -1)))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="open_clip:ViT-B-16", help="amp model spec (random init)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--criterion", default="kl_to_dense", choices=["kl_to_dense", "entropy"])
    parser.add_argument("--temp-inv", type=float, default=15.0)
    parser.add_argument("--threshold", type=float, default=2e-4)
    parser.add_argument("--scores", choices=["magnitude", "random"], default="magnitude")
    parser.add_argument("--round-to", type=int, default=1)
    parser.add_argument("--cache-gb", type=float, default=4.0, help="a small bound: stash thinned, inputs on disk")
    parser.add_argument("--chunk-size", type=int, default=None, help="run each batch this many images at a time")
    parser.add_argument("--autocast", choices=["none", "bf16"], default="none")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    kwargs = {}
    if args.model.startswith("open_clip:") and args.image_size != 224:
        kwargs["force_image_size"] = args.image_size
    elif args.model.startswith("timm:"):
        kwargs["img_size"] = args.image_size
    torch.manual_seed(0)
    base = load_model(args.model, device=args.device, **kwargs)
    scores = magnitude_scores(base) if args.scores == "magnitude" else random_scores(base)
    criterion = build_criterion(args.criterion, temp_inv=args.temp_inv)
    batches = validation_batches(args.batches, args.batch_size, args.image_size)
    models = {"cached": base, "full": copy.deepcopy(base)}
    baton = Baton(list(models))
    results, errors = {}, {}

    def run(name: str) -> None:
        baton.take(name)
        try:

            def next_turn(_layer: int) -> None:
                baton.give(name)
                baton.take(name)

            results[name] = amp_search(
                models[name],
                scores,
                batches,
                criterion,
                args.threshold,
                steps=args.steps,
                round_to=args.round_to,
                cache=name == "cached",
                cache_gb=args.cache_gb,
                chunk_size=args.chunk_size,
                autocast_dtype=torch.bfloat16 if args.autocast == "bf16" else None,
                device=args.device,
                progress=False,
                on_layer_done=next_turn,
            )
        except BaseException as error:  # reported below; the other thread must not wait forever
            errors[name] = error
        finally:
            baton.give(name, finished=True)

    threads = [threading.Thread(target=run, args=(name,)) for name in models]
    wall = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - wall
    if errors:
        raise next(iter(errors.values()))

    cached, full = results["cached"], results["full"]
    assert cached.widths == full.widths, f"widths differ:\n cached {cached.widths}\n full   {full.widths}"
    loss_diff = max(abs(a.loss - b.loss) for a, b in zip(cached.probes, full.probes))
    depth, kept = len(cached.widths), cached.kept_fraction
    stride = cached.config["memory"]["stride"]
    report = {
        "model": args.model,
        "image_size": args.image_size,
        "images": args.batches * args.batch_size,
        "batches": args.batches,
        "steps": args.steps,
        "probes": len(cached.probes),
        "criterion": args.criterion,
        "threshold": args.threshold,
        "widths": cached.widths,
        "kept": kept,
        "max_probe_loss_diff": loss_diff,
        "cached_s": baton.elapsed["cached"],
        "full_s": baton.elapsed["full"],
        "speedup": baton.elapsed["full"] / baton.elapsed["cached"],
        "flop_model_speedup": predicted_speedup(base, cached.probes, cached.dense_widths, stride),
        "cache_gb": args.cache_gb,
        "chunk_size": args.chunk_size,
        "memory": cached.config["memory"],
        "wall_s": wall,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(
        f"{args.model} @ {args.image_size}px, {report['images']} images in {args.batches} batches, {args.steps} steps"
    )
    print(f"widths {cached.widths} (kept {kept:.1%} of {depth} MLPs), {len(cached.probes)} probes")
    print(f"identical widths: yes; max |probe loss difference| {loss_diff:.2e}")
    print(f"full-model probes {report['full_s']:.1f} s, cached tail {report['cached_s']:.1f} s")
    speed, model = report["speedup"], report["flop_model_speedup"]
    print(f"speedup (full / cached) {speed:.2f}x; FLOP model of the same probes {model:.2f}x")
    print(f"cache: stash stride {stride}, peak GB {cached.config['memory']['peak_gb']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
