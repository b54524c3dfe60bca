"""Scoring: one importance number per MLP hidden unit.

Taylor scores use per-sample *gates*: every fc_out input h is multiplied by a tensor m of ones,
shape [B, 1, H], that requires grad. Then ∂E/∂m[b, 0, j] = Σ_tokens h[b, t, j]·∂E/∂h[b, t, j] exactly,
the first-order estimate of the loss change when unit j is removed for image b. No activations are
kept by amp, no hook order is assumed, and activation checkpointing keeps working (the gates exist
before the forward pass, so a recomputed block multiplies by the same tensors).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint as run_checkpointed
from tqdm.auto import tqdm

from amp import distributed
from amp.adapters import MLPSite
from amp.criteria import Criterion, check_finite, usable_batches
from amp.data import check_option
from amp.io import atomic_write


@dataclass
class Scores:
    """Per-layer importance (higher = more important) with where it came from."""

    values: list[torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = field(default="scores", compare=False)  # where they came from, for messages (a file's path)

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
    """Scores written by :func:`save_scores`, checked (:func:`check_scores`); a foreign or damaged file is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scores file not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            names = list(f.keys())
            tensors = {key: f.get_tensor(key) for key in names}
        meta = json.loads(metadata["amp_scores"]) if "amp_scores" in metadata else None
    except (SafetensorError, OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable scores file ({error}); write it again with amp score") from None
    layers = [f"layer.{i}" for i in range(len(tensors))]
    if not isinstance(meta, dict) or sorted(tensors) != sorted(layers):
        raise ValueError(
            f"{path} is not an amp scores file (expected 'amp_scores' metadata and tensors layer.0..layer.N, got "
            f"{sorted(tensors)[:4]}); write scores with amp score"
        )
    scores = Scores([tensors[key] for key in layers], meta, source=str(path))
    check_scores(scores)
    return scores


def check_scores(scores: Scores) -> None:
    """Refuse scores that cannot rank units: no layers, a non-finite value, or one value everywhere (e.g. all 0)."""
    where = scores.source
    if not scores.values:
        raise ValueError(f"{where}: no layers of scores")
    for i, v in enumerate(scores.values):
        if v.dim() != 1 or v.numel() == 0 or not v.is_floating_point():
            raise ValueError(f"{where}: layer {i} is a {v.dtype} tensor of shape {tuple(v.shape)}, not 1-d scores")
        if not torch.isfinite(v).all():
            raise ValueError(f"{where}: layer {i} has non-finite scores (NaN or inf); score the model again")
    flat = torch.cat([v.float() for v in scores.values])
    if bool((flat == flat[0]).all()):
        raise ValueError(
            f"{where}: every score is {flat[0].item()}, so they rank no unit above another (a one-image batch, or a "
            "criterion that does not depend on the MLPs); score again with batches of ≥ 2 images"
        )
    recorded = scores.meta.get("dense_widths")
    if recorded is not None and list(recorded) != scores.widths:
        raise ValueError(f"{where}: records MLP widths {recorded} but holds scores for {scores.widths}")


def model_fingerprint(backbone) -> str | None:
    """A short hash of the model's MLP weights (an evenly strided sample of each tensor, as float32 bytes, so the
    same weights give the same hash on any device); None on the meta device."""
    digest = hashlib.sha256()
    for site in backbone.sites():
        for tensor in [t for linear in site.linears() for t in (linear.weight, linear.bias) if t is not None]:
            if tensor.is_meta:
                return None
            flat = tensor.detach().reshape(-1)
            digest.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def weights_identity(backbone) -> str | None:
    """:func:`model_fingerprint` of a model with real weights; None for a random init, which no later load of the same
    name reproduces (so nothing made from it can be matched to it)."""
    return None if backbone.info.get("weights") == "random-init" else model_fingerprint(backbone)


def check_scores_for(scores: Scores, backbone) -> None:
    """Refuse scores made for another model: other MLP widths, or (for a model with real weights) other MLP weights
    than the ones they record."""
    check_scores(scores)
    widths = backbone.widths()
    if scores.widths != widths:
        raise ValueError(f"{scores.source}: scores are for widths {scores.widths}, the model has {widths}")
    recorded, current = scores.meta.get("model_fingerprint"), weights_identity(backbone)
    if recorded and current and current != recorded:
        raise ValueError(
            f"{scores.source}: the scores were made for the model {scores.meta.get('model')!r} (MLP weights "
            f"{recorded}), not for {backbone.spec!r} (MLP weights {current}); score this model, or use the model "
            "they were made for"
        )


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


class _ScoringPass:
    """Gate gradients of one batch, whole or chunked (the two-pass gradient cache of :func:`taylor_scores`)."""

    def __init__(self, backbone, criterion: Criterion, device, autocast_dtype, checkpoint: bool, what: str):
        self.backbone, self.criterion, self.device, self.what = backbone, criterion, device, what
        self.autocast_dtype, self.checkpoint = autocast_dtype, checkpoint
        self.sites = backbone.sites()

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _gates(self, count: int) -> dict[int, torch.Tensor]:
        return {s.index: torch.ones(count, s.hidden, device=self.device, requires_grad=True) for s in self.sites}

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.embed(images, project=self.criterion.needs_projection)

    def _blocks(self):
        return self.backbone.adapter.blocks(self.backbone.model) if self.checkpoint else ()

    def whole(self, images: torch.Tensor, targets: Any) -> tuple[dict[int, list[torch.Tensor]], torch.Tensor]:
        """One forward and backward pass of the whole batch."""
        images = images.to(self.device)
        gates = self._gates(len(images))
        with gated(self.sites, gates), checkpointed(self._blocks()):  # open through backward: recomputation needs them
            with self._autocast():
                features = self._embed(images)
            with torch.no_grad():  # the criterion outside autocast: in fp32 (autocast would run its matmuls in bf16)
                context = self.criterion.context(targets, features.detach())
            loss = check_finite(self.criterion(features, context), self.what)
            loss.backward()
        return {index: [gate.grad.double()] for index, gate in gates.items()}, loss.detach()

    def chunked(
        self, images: torch.Tensor, targets: Any, chunk_size: int
    ) -> tuple[dict[int, list[torch.Tensor]], torch.Tensor]:
        """Pass 1: the features chunk by chunk without a graph (the gates would multiply by one: left out), then the
        criterion and its gradient on the whole batch's features. Pass 2: every chunk again, with its gates, back-
        propagating its rows of ∂E/∂features; the gates' gradients are then those of the whole batch."""
        chunks = images.split(chunk_size)
        with torch.no_grad(), self._autocast():
            features = torch.cat([self._embed(chunk.to(self.device)) for chunk in chunks])
        features.requires_grad_(True)
        with torch.no_grad():
            context = self.criterion.context(targets, features.detach())
        loss = check_finite(self.criterion(features, context), self.what)  # the criterion in fp32, as unchunked
        loss.backward()
        grads = features.grad.split(chunk_size)
        del features
        per_image: dict[int, list[torch.Tensor]] = {s.index: [] for s in self.sites}
        for chunk, grad in zip(chunks, grads):
            gates = self._gates(len(chunk))
            with gated(self.sites, gates), checkpointed(self._blocks()):
                with self._autocast():
                    chunk_features = self._embed(chunk.to(self.device))
                chunk_features.backward(grad.to(chunk_features.dtype))  # = (chunk_features · grad).sum().backward()
            for index, gate in gates.items():
                per_image[index].append(gate.grad.double())
        return per_image, loss.detach()


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
    data_name: str = "the scoring data",
    chunk_size: int | None = None,
) -> Scores:
    """First-order Taylor importance of every MLP hidden unit under ``criterion``.

    Paper definition (default): per image, Σ over tokens of h·∂E/∂h, then |·|, then the mean over images.
    ``signed=True`` keeps the sign (mean of the per-image sums) for analysis. ``checkpoint=True`` recomputes
    each block in backward (~0.4x the peak memory for ViT-B-16, ~10 % more time; benchmarks/README.md).

    Under torchrun (:mod:`amp.distributed`), ``loader`` must be this rank's :func:`amp.distributed.sharded`
    loader: the criterion is evaluated on the global batch of all ranks, and the scores, summed over
    ranks, equal single-process scores of the same global batches.

    Each loader batch is the criterion's batch (the paper's *global* batch, 1024 images for ViT-g). With
    ``chunk_size`` smaller than a batch, the batch goes through the model ``chunk_size`` images at a time in two
    passes (a "gradient cache"): first every chunk's features without a graph, then the criterion and
    ∂E/∂features on the whole batch, then each chunk again, with the gates, back-propagating its slice of that
    gradient. The gates' gradients are those of the whole batch (to fp32 rounding), at the peak memory of one
    chunk plus the batch's features; the cost is one more forward pass per batch. Under torchrun each rank chunks its
    own share of the global batch.

    A batch too small for the criterion (one image for entropy) is left out with a warning, and scores that are all
    zero (nothing the criterion sees depends on the MLPs) are an error; ``data_name`` names the data in messages.
    """
    if not criterion.scores_dense_model:
        raise ValueError(
            f"criterion {criterion.name!r} is minimal at the dense model, so its gradient there is zero and "
            "cannot rank units; score with 'entropy' or 'cross_entropy' and use it in the search instead"
        )
    check_option("chunk_size", chunk_size, 1, integer=True, optional=True)
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
    todo = _batches(loader, max_images)
    todo = todo if several else usable_batches(todo, criterion, data_name)
    bar = tqdm(todo, desc=f"score ({criterion.name})", unit="batch", disable=not progress)
    try:
        for images, targets in bar:
            pass_ = _ScoringPass(backbone, criterion, device, autocast_dtype, checkpoint, f"scoring batch {batches}")
            if chunk_size is None or chunk_size >= len(images):
                per_image, loss = pass_.whole(images, targets)
            else:
                per_image, loss = pass_.chunked(images, targets, chunk_size)
            for site, total in zip(sites, sums):
                for grads in per_image[site.index]:  # [chunk, H] = Σ_t h·∂E/∂h per image
                    total += (grads if signed else grads.abs()).sum(0).cpu()
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
    if not any(bool(total.any()) for total in sums):
        raise ValueError(
            f"{data_name}: every Taylor score is 0 over {images_seen} images: the {criterion.name} loss does not "
            "change with any MLP unit (constant images, or a temperature that saturates the softmax); check the data "
            "and --temp-inv"
        )
    meta = {
        "method": "taylor",
        "signed": signed,
        "criterion": criterion.describe(),
        "images": images_seen,
        "batches": batches,
        "model": backbone.spec,
        "model_fingerprint": model_fingerprint(backbone),
        "dense_widths": [s.hidden for s in sites],
        "world_size": distributed.world_size(),
        "chunk_size": chunk_size,  # information only: chunking does not change the scores
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
    meta = {"method": "magnitude", "model": backbone.spec, "model_fingerprint": model_fingerprint(backbone)}
    return Scores(values, {**meta, "dense_widths": [len(v) for v in values]})


def random_scores(backbone, seed: int = 0) -> Scores:
    """Seeded random scores: the baseline any criterion must beat."""
    generator = torch.Generator().manual_seed(seed)
    values = [torch.rand(site.hidden, generator=generator) for site in backbone.sites()]
    meta = {"method": "random", "seed": seed, "model": backbone.spec, "model_fingerprint": model_fingerprint(backbone)}
    return Scores(values, meta)
