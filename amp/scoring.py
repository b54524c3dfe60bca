"""Scoring: one importance number per MLP hidden unit.

Taylor scores use per-sample *gates*: every fc_out input h is multiplied by a tensor m of ones,
shape [B, 1, H], that requires grad. Then ∂E/∂m[b, 0, j] = Σ_tokens h[b, t, j]·∂E/∂h[b, t, j] exactly,
the first-order estimate of the loss change when unit j is removed for image b. No activations are
kept by amp, no hook order is assumed, and activation checkpointing keeps working (the gates exist
before the forward pass, so a recomputed block multiplies by the same tensors).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint as run_checkpointed
from tqdm.auto import tqdm

from amp import distributed
from amp.adapters import MLPSite
from amp.criteria import Criterion, check_finite
from amp.io import atomic_write


@dataclass
class Scores:
    """Per-layer importance (higher = more important) with where it came from."""

    values: list[torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def orders(self) -> list[torch.Tensor]:
        """Unit indices per layer, most important first (stable, so ties keep their original order)."""
        return [torch.sort(v, descending=True, stable=True).indices for v in self.values]

    @property
    def widths(self) -> list[int]:
        return [len(v) for v in self.values]


def save_scores(scores: Scores, path: str | Path) -> None:
    """Write the scores, with their provenance as metadata, to one safetensors file (atomically)."""
    tensors = {f"layer.{i}": v.contiguous() for i, v in enumerate(scores.values)}
    metadata = {"amp_scores": json.dumps(scores.meta)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_scores(path: str | Path) -> Scores:
    """Scores written by :func:`save_scores`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scores file not found: {path}")
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("amp_scores", "{}"))
    tensors = load_file(str(path))
    return Scores([tensors[f"layer.{i}"] for i in range(len(tensors))], meta)


class _Gate(torch.autograd.Function):
    """y = x · gate, gate [B, H] broadcast over tokens. Saves x once, in its own dtype (under bf16 autocast no
    fp32 copy of every h is kept for backward), and reduces ∂E/∂gate = Σ_tokens x·g in fp32, one image at a
    time, so the fp32 temporaries are [T, H]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, gate)
        return x * gate.view(gate.shape[0], *[1] * (x.dim() - 2), -1).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, gate = ctx.saved_tensors
        grad_x = grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_x = grad * gate.view(gate.shape[0], *[1] * (x.dim() - 2), -1).to(grad.dtype)
        if ctx.needs_input_grad[1]:
            tokens = tuple(range(x.dim() - 2))  # token dims of one image [..., H]
            grad_gate = torch.stack([(xi.float() * gi.float()).sum(dim=tokens) for xi, gi in zip(x, grad)])
        return grad_x, grad_gate


@contextlib.contextmanager
def gated(sites: list[MLPSite], gates: dict[int, torch.Tensor]) -> Iterator[None]:
    """Multiply each site's fc_out input by ``gates[site.index]`` (its gradient reduced in fp32).

    Keep this context open through ``backward()`` when blocks are checkpointed: recomputed blocks need the hooks.
    """

    def hook_for(site: MLPSite):
        def hook(_module, args):
            x = args[0]
            gate = gates[site.index]
            if x.shape[0] != gate.shape[0] or x.shape[-1] != gate.shape[-1]:
                raise RuntimeError(
                    f"{site.name}: fc_out input {tuple(x.shape)} is not batch-first [B, ..., {gate.shape[-1]}]"
                )
            return (_Gate.apply(x, gate), *args[1:])

        return hook

    handles = [site.fc_out.register_forward_pre_hook(hook_for(site)) for site in sites]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def checkpointed(blocks) -> Iterator[None]:
    """Every block under non-reentrant activation checkpointing: autograd keeps only block inputs (plus one
    block's activations while it is recomputed). The gates exist before the forward pass, so a recomputed
    block multiplies by the same tensors and the scores are unchanged."""
    blocks = list(blocks)
    for block in blocks:

        def forward(*args, _forward=block.forward, **kwargs):
            return run_checkpointed(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = forward  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def _batches(loader: Iterable, max_images: int | None) -> Iterator[tuple[torch.Tensor, Any]]:
    seen = 0
    for images, targets in loader:
        if max_images is not None and seen >= max_images:
            return
        yield images, targets
        seen += len(images)


def taylor_scores(
    backbone,
    loader: Iterable,
    criterion: Criterion,
    signed: bool = False,
    max_images: int | None = None,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    checkpoint: bool = False,
) -> Scores:
    """First-order Taylor importance of every MLP hidden unit under ``criterion``.

    Paper definition (default): per image, Σ over tokens of h·∂E/∂h, then |·|, then the mean over images.
    ``signed=True`` keeps the sign (mean of the per-image sums) for analysis. ``checkpoint=True`` recomputes
    each block in backward (~0.4x the peak memory for ViT-B-16, ~10 % more time; benchmarks/README.md).

    Under torchrun (:mod:`amp.distributed`), ``loader`` must be this rank's :func:`amp.distributed.sharded`
    loader: the criterion is evaluated on the global batch of all ranks, and the scores, summed over
    ranks, equal single-process scores of the same global batches.
    """
    if not criterion.scores_dense_model:
        raise ValueError(
            f"criterion {criterion.name!r} is minimal at the dense model, so its gradient there is zero and "
            "cannot rank units; score with 'entropy' or 'cross_entropy' and use it in the search instead"
        )
    model = backbone.model
    device = torch.device(device or next(model.parameters()).device)
    sites = backbone.sites()
    several = distributed.world_size() > 1
    if several:
        if max_images is not None:
            raise ValueError("max_images counts local images; under torchrun limit the data set given to sharded()")
        distributed.check_same_length(loader)
        criterion = distributed.GlobalCriterion(criterion)
        progress = progress and distributed.rank() == 0
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval().requires_grad_(False)  # only the gates need gradients
    sums = [torch.zeros(site.hidden, dtype=torch.float64) for site in sites]
    images_seen, batches = 0, 0
    bar = tqdm(_batches(loader, max_images), desc=f"score ({criterion.name})", unit="batch", disable=not progress)
    try:
        for images, targets in bar:
            images = images.to(device)
            gates = {s.index: torch.ones(len(images), s.hidden, device=device, requires_grad=True) for s in sites}
            autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
            blocks = backbone.adapter.blocks(model) if checkpoint else ()
            with gated(sites, gates), checkpointed(blocks):  # open through backward: recomputation needs them
                with autocast:
                    features = backbone.embed(images, project=criterion.needs_projection)
                    with torch.no_grad():
                        context = criterion.context(targets, features.detach())
                    loss = check_finite(criterion(features, context), f"scoring batch {batches}")
                loss.backward()
            for site, total in zip(sites, sums):
                per_image = gates[site.index].grad.double()  # [B, H] = Σ_t h·∂E/∂h per image
                total += (per_image if signed else per_image.abs()).sum(0).cpu()
            images_seen += len(images)
            batches += 1
            bar.set_postfix(loss=f"{loss.item():.4f}")
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(requires[name])
    if several:  # every rank returns the scores of all ranks' images
        sums = [distributed.all_reduce_sum(total) for total in sums]
        images_seen = int(distributed.all_reduce_sum(torch.tensor(float(images_seen), dtype=torch.float64)))
    if images_seen == 0:
        raise ValueError("the scoring data set yielded no images")
    meta = {
        "method": "taylor",
        "signed": signed,
        "criterion": criterion.describe(),
        "images": images_seen,
        "batches": batches,
        "model": backbone.spec,
        "dense_widths": [s.hidden for s in sites],
        "world_size": distributed.world_size(),
    }
    return Scores([(total / images_seen).float() for total in sums], meta)


def magnitude_scores(backbone) -> Scores:
    """Weight magnitude: ‖incoming rows‖₂ · ‖outgoing column‖₂ per unit (gate and value rows together)."""
    values = []
    for site in backbone.sites():
        w_in = site.fc_in.weight.detach().float()
        incoming = w_in.view(2, site.hidden, -1).pow(2).sum((0, 2)) if site.packed else w_in.pow(2).sum(1)
        if site.fc_gate is not None:
            incoming = incoming + site.fc_gate.weight.detach().float().pow(2).sum(1)
        outgoing = site.fc_out.weight.detach().float().pow(2).sum(0)
        values.append((incoming.sqrt() * outgoing.sqrt()).cpu())
    return Scores(values, {"method": "magnitude", "model": backbone.spec, "dense_widths": [len(v) for v in values]})


def random_scores(backbone, seed: int = 0) -> Scores:
    """Seeded random scores: the baseline any criterion must beat."""
    generator = torch.Generator().manual_seed(seed)
    values = [torch.rand(site.hidden, generator=generator) for site in backbone.sites()]
    return Scores(values, {"method": "random", "seed": seed, "model": backbone.spec})
