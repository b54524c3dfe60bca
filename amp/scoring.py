"""Scoring: one importance number per MLP hidden unit.

Taylor scores use per-sample *gates*: every fc_out input h is multiplied by a tensor m of ones,
shape [B, 1, H], that requires grad. Then ∂E/∂m[b, 0, j] = Σ_tokens h[b, t, j]·∂E/∂h[b, t, j] exactly,
the first-order estimate of the loss change when unit j is removed for image b. No activations are
kept by amp, no hook order is assumed, and activation checkpointing keeps working (the gates exist
before the forward pass, so a recomputed block multiplies by the same tensors).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

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
    import json

    tensors = {f"layer.{i}": v.contiguous() for i, v in enumerate(scores.values)}
    metadata = {"amp_scores": json.dumps(scores.meta)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_scores(path: str | Path) -> Scores:
    import json

    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scores file not found: {path}")
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("amp_scores", "{}"))
    tensors = load_file(str(path))
    return Scores([tensors[f"layer.{i}"] for i in range(len(tensors))], meta)


@contextlib.contextmanager
def gated(sites: list[MLPSite], gates: dict[int, torch.Tensor]) -> Iterator[None]:
    """Multiply each site's fc_out input by ``gates[site.index]`` (in fp32: its gradient sums in fp32)."""

    def hook_for(site: MLPSite):
        def hook(_module, args):
            x = args[0]
            gate = gates[site.index]
            if x.shape[0] != gate.shape[0] or x.shape[-1] != gate.shape[-1]:
                raise RuntimeError(
                    f"{site.name}: fc_out input {tuple(x.shape)} is not batch-first [B, ..., {gate.shape[-1]}]"
                )
            return ((x.float() * gate.view(gate.shape[0], *[1] * (x.dim() - 2), -1)).to(x.dtype), *args[1:])

        return hook

    handles = [site.fc_out.register_forward_pre_hook(hook_for(site)) for site in sites]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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
) -> Scores:
    """First-order Taylor importance of every MLP hidden unit under ``criterion``.

    Paper definition (default): per image, Σ over tokens of h·∂E/∂h, then |·|, then the mean over images.
    ``signed=True`` keeps the sign (mean of the per-image sums) for analysis.
    """
    if not criterion.scores_dense_model:
        raise ValueError(
            f"criterion {criterion.name!r} is minimal at the dense model, so its gradient there is zero and "
            "cannot rank units; score with 'entropy' or 'cross_entropy' and use it in the search instead"
        )
    model = backbone.model
    device = torch.device(device or next(model.parameters()).device)
    sites = backbone.sites()
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
            with gated(sites, gates), autocast:
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
