"""Training-free recovery after slicing an MLP: compensate the removed hidden units from calibration statistics.

For a site with hidden activations ``h`` (what ``fc_out`` receives) the dense MLP outputs ``y = W h + b``.
After :func:`amp.surgery.keep_units` only the kept units ``K`` remain; the removed ones ``R`` contributed
``W_R h_R``. Two closed-form compensations use the dense model's activations on calibration images:

``bias``
    ``b' = b + W_R E[h_R]``: the removed units' mean contribution moves into ``fc_out``'s bias.
``lstsq``
    ``fc_out``'s kept columns and bias refitted by ridge least squares to reproduce the dense output,
    ``min E‖(W h + b) − (W' h_K + b')‖² + λ‖W'‖²``, from the fp64 moments of ``h`` alone:
    ``W' = W C[:, K] (C[K, K] + λ I)⁻¹`` and ``b' = b + W μ − W' μ_K`` with ``C`` the covariance of ``h``,
    ``μ`` its mean and ``λ = ridge · tr(C[K, K]) / |K|``. If removed units are linear combinations of kept
    ones the output is restored exactly (up to the ridge); with every unit kept ``W' → W``.

Sites with a norm over the hidden units (EVA ``scale_mlp``, NormFormer ``scale_fc``) are different: the norm
is recomputed over the kept units only, so after slicing the kept units no longer hold their dense values and
moments of the dense ``h`` do not describe the pruned site. For those sites :func:`calibration_stats` also keeps
a sample of the MLP's inputs ``x`` and dense outputs ``y`` (``max_tokens`` tokens), and :func:`compensate`
recomputes the pruned site's hidden units on that sample *after* slicing, then fits to ``y`` (``bias``: the mean
output error moves into the bias; ``lstsq``: the same ridge fit with the pruned ``h'_K`` as regressors).

Statistics are collected once on the **dense** model. They stay valid while the AMP search runs from the last
layer to the first, because the input of layer ``l`` depends only on the (still dense) layers before it.

Compensation always starts from the dense snapshot: the new bias is ``original bias + correction`` rather than
an increment of the current one, so repeated probes of a search never accumulate corrections (``method="none"``
restores the original bias).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from amp import distributed
from amp.adapters import MLPSite
from amp.surgery import SiteState, keep_units

METHODS = ("none", "bias", "lstsq")


@dataclass
class HiddenStats:
    """fp64 moments of one site's hidden activations over the calibration tokens of the dense model.

    ``mean`` is E[h] ([H]), ``second`` is E[h hᵀ] ([H, H]; None when collected with ``second=False``, enough for
    ``bias``), ``count`` the number of tokens. For sites with a
    hidden norm, ``inputs`` and ``outputs`` hold the MLP's inputs and dense outputs on (up to ``max_tokens``)
    calibration tokens, [N, D] in fp32, so the pruned site can be re-evaluated after slicing.
    """

    mean: torch.Tensor
    second: torch.Tensor | None
    count: int
    inputs: torch.Tensor | None = None
    outputs: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def covariance(self) -> torch.Tensor:
        if self.second is None:
            raise ValueError("these statistics hold no second moments (collected with second=False)")
        return self.second - torch.outer(self.mean, self.mean)


class _Accumulator:
    def __init__(self, hidden: int, keep_io: bool, max_tokens: int, second: bool):
        self.sum = torch.zeros(hidden, dtype=torch.float64)
        self.outer = torch.zeros(hidden, hidden, dtype=torch.float64) if second else None
        self.count = 0
        self.keep_io, self.max_tokens = keep_io, max_tokens
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.batches: list[int] = []  # the batch each kept slice of tokens came from
        self.batch = 0  # the batch now running
        self.io_tokens = 0

    def add_hidden(self, h: torch.Tensor) -> None:
        h = h.detach().reshape(-1, h.shape[-1]).double()
        self.sum += h.sum(0).cpu()
        if self.outer is not None:
            self.outer += (h.T @ h).cpu()
        self.count += h.shape[0]

    def add_io(self, x: torch.Tensor, y: torch.Tensor) -> None:
        room = self.max_tokens - self.io_tokens
        if not self.keep_io or room <= 0:
            return
        x = x.detach().reshape(-1, x.shape[-1])[:room].float().cpu()
        y = y.detach().reshape(-1, y.shape[-1])[:room].float().cpu()
        self.inputs.append(x)
        self.outputs.append(y)
        self.batches.append(self.batch)
        self.io_tokens += x.shape[0]

    def reduce_over_ranks(self) -> None:
        """Sum the moments over ranks, and keep the first ``max_tokens`` tokens of the global batches in the order one
        process would meet them: batch by batch, each batch's rows in rank order (a global batch is its ranks' slices
        concatenated, :func:`amp.distributed.sharded`). Every rank then holds the statistics one process would have
        of the union of the data. (Each rank kept its own first ``max_tokens``: all the global first ones.)"""
        self.sum = distributed.all_reduce_sum(self.sum)
        if self.outer is not None:
            self.outer = distributed.all_reduce_sum(self.outer)
        self.count = int(distributed.all_reduce_sum(torch.tensor(float(self.count), dtype=torch.float64)))
        if not self.keep_io:
            return
        every = distributed.gather_objects([(self.batches, self.inputs, self.outputs)])  # in rank order
        parts = sorted(
            ((batch, rank, k), x, y)
            for rank, (batches, xs, ys) in enumerate(every)
            for k, (batch, x, y) in enumerate(zip(batches, xs, ys))
        )
        self.inputs = [torch.cat([x for _, x, _ in parts])[: self.max_tokens]]
        self.outputs = [torch.cat([y for _, _, y in parts])[: self.max_tokens]]
        self.io_tokens = self.inputs[0].shape[0]

    def result(self) -> HiddenStats:
        if self.count == 0:
            raise RuntimeError("no calibration tokens reached this MLP")
        second = None if self.outer is None else self.outer / self.count
        stats = HiddenStats(self.sum / self.count, second, self.count)
        if self.keep_io:
            stats.inputs, stats.outputs = torch.cat(self.inputs), torch.cat(self.outputs)
        return stats


def _images(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def calibration_stats(
    backbone,
    batches: Iterable,
    layers: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    max_tokens: int = 32768,
    second: bool = True,
    progress: bool = False,
    chunk_size: int | None = None,
) -> dict[int, HiddenStats]:
    """Per-site fp64 moments of the ``fc_out`` inputs over all calibration tokens of ``backbone`` (dense).

    ``batches`` yields images or ``(images, targets)``. ``layers`` restricts the sites (default: all).
    For sites with a hidden norm, the first ``max_tokens`` tokens' MLP inputs and outputs are kept as well.
    The statistics live on the CPU: E[h hᵀ] takes 8·H² bytes per site (ViT-L 134 MB, ViT-g 302 MB, bigG 537 MB);
    ``second=False`` skips it when only ``bias`` compensation is wanted. ``chunk_size`` runs each batch through the
    model that many images at a time (the same statistics, less memory).

    Under torchrun (``batches`` this rank's slices of the global batches, :func:`amp.distributed.sharded`) the
    statistics are summed over ranks, so every rank returns those of the union of the data (and every rank then
    compensates the same model); every rank must call this.
    """
    from tqdm.auto import tqdm

    model = backbone.model
    device = torch.device(device) if device is not None else next(model.parameters()).device
    sites = backbone.sites()
    layers = list(range(len(sites))) if layers is None else sorted(set(layers))
    accumulators = {
        layer: _Accumulator(sites[layer].hidden, sites[layer].hidden_norm is not None, max_tokens, second)
        for layer in layers
    }
    handles = []
    for layer in layers:
        site, acc = sites[layer], accumulators[layer]
        handles.append(site.fc_out.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add_hidden(args[0])))
        if site.hidden_norm is not None:
            handles.append(site.module.register_forward_hook(lambda _m, args, out, acc=acc: acc.add_io(args[0], out)))
    was_training = model.training
    model.eval()
    try:
        for index, batch in enumerate(tqdm(batches, desc="calibration", unit="batch", disable=not progress)):
            for acc in accumulators.values():
                acc.batch = index
            images = _images(batch)
            for chunk in images.split(chunk_size) if chunk_size else (images,):
                backbone.embed(chunk.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if distributed.world_size() > 1:  # every rank compensates the same model: the statistics of all ranks' images
        for acc in accumulators.values():
            acc.reduce_over_ranks()
    return {layer: acc.result() for layer, acc in accumulators.items()}


# --- closed forms ----------------------------------------------------------------------------------


def _ridge_solve(cov_kk: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """``rhs (cov_kk + λ I)⁻¹`` for ``rhs`` [O, K], λ = ridge · tr(cov_kk) / K (fp64)."""
    k = cov_kk.shape[0]
    lam = ridge * float(torch.trace(cov_kk)) / k if ridge > 0 else 0.0
    a = cov_kk + lam * torch.eye(k, dtype=cov_kk.dtype, device=cov_kk.device)
    if ridge > 0:
        factor, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            return torch.cholesky_solve(rhs.T, factor).T
    return torch.linalg.lstsq(a, rhs.T).solution.T  # semi-definite or ridge 0: least-norm solution


def lstsq_refit(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    second: torch.Tensor,
    keep: torch.Tensor,
    ridge: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge refit of ``fc_out`` on the kept units from the dense moments (the dense-``h`` case, fp64).

    ``weight`` [O, H] and ``bias`` [O] are the dense fc_out; ``mean`` [H] and ``second`` [H, H] the moments of h.
    Returns ``(W' [O, len(keep)], b' [O])``: the columns in the order of ``keep``.
    """
    w = weight.double()
    b = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if bias is None else bias.double()
    mu, keep = mean.double(), torch.as_tensor(keep, dtype=torch.long, device=w.device)
    cov = second.double() - torch.outer(mu, mu)
    cov_kk = cov[keep][:, keep]
    new_w = _ridge_solve(cov_kk, w @ cov[:, keep], ridge)
    new_b = b + w @ mu - new_w @ mu[keep]
    return new_w, new_b


def lstsq_fit(hidden: torch.Tensor, target: torch.Tensor, ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares ``target ≈ W hidden + b`` over tokens (rows), centred, in fp64."""
    h, y = hidden.double(), target.double()
    mu_h, mu_y = h.mean(0), y.mean(0)
    hc, yc = h - mu_h, y - mu_y
    n = h.shape[0]
    new_w = _ridge_solve(hc.T @ hc / n, yc.T @ hc / n, ridge)
    return new_w, mu_y - new_w @ mu_h


# --- applying to a site -------------------------------------------------------------------------------


def _set_param(module: nn.Module, name: str, value: torch.Tensor | None, like: torch.Tensor) -> None:
    if value is None:
        if getattr(module, name, None) is not None:
            module.register_parameter(name, None)
        return
    old = getattr(module, name, None)
    requires_grad = old.requires_grad if isinstance(old, nn.Parameter) else like.requires_grad
    value = value.to(dtype=like.dtype, device=like.device).contiguous()
    setattr(module, name, nn.Parameter(value, requires_grad=requires_grad))


@torch.no_grad()
def _pruned_hidden(site: MLPSite, inputs: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """The sliced site's fc_out inputs on ``inputs`` [N, D] (run through the site's own module)."""
    weight = site.fc_out.weight
    found: list[torch.Tensor] = []

    def grab(_module, args):
        found.append(args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu())

    handle = site.fc_out.register_forward_pre_hook(grab)
    training = site.module.training
    site.module.eval()
    try:
        for start in range(0, inputs.shape[0], chunk):
            site.module(inputs[start : start + chunk].to(device=weight.device, dtype=weight.dtype))
    finally:
        handle.remove()
        site.module.train(training)
    return torch.cat(found)


@torch.no_grad()
def compensate(
    site: MLPSite,
    original: SiteState,
    keep: torch.Tensor | Sequence[int],
    stats: HiddenStats,
    method: str = "bias",
    ridge: float = 1e-4,
) -> None:
    """Compensate the units removed from ``site``; call right after ``keep_units(site, keep, original)``.

    ``original`` is the dense :func:`amp.surgery.snapshot` of the site, ``keep`` the kept unit indices in the
    original numbering (in the order they were kept), ``stats`` the site's dense :class:`HiddenStats`.
    ``method``: ``none`` (restore the dense bias), ``bias`` or ``lstsq`` (see the module docstring). The new
    parameters are computed from ``original``, never from the site's current ones, so it is safe to call for
    every probe. Where fc_out has no bias and a method needs one, a bias is created.
    """
    if method not in METHODS:
        raise ValueError(f"unknown compensation {method!r}; choose one of {METHODS}")
    hidden = int(original["hidden"])
    keep = torch.as_tensor(keep, dtype=torch.long).flatten().cpu()
    if site.hidden != keep.numel():
        raise ValueError(f"{site.name}: the site has {site.hidden} units but keep lists {keep.numel()}; slice first")
    if stats.mean.numel() != hidden:
        raise ValueError(f"{site.name}: statistics are for {stats.mean.numel()} units, the dense site has {hidden}")
    fc_out = site.fc_out
    w0 = original["out.weight"]
    b0 = original.get("out.bias")
    removed = torch.ones(hidden, dtype=torch.bool)
    removed[keep] = False
    if method == "none" or not removed.any():
        # nothing to correct: keep_units already restored the dense columns; put back the dense bias
        _set_param(fc_out, "bias", None if b0 is None else b0.clone(), w0)
        return
    if site.hidden_norm is not None:
        new_w, new_b = _compensate_normed(site, w0, b0, keep, stats, method, ridge)
    elif method == "bias":
        w = w0.double().cpu()
        base = torch.zeros(w.shape[0], dtype=torch.float64) if b0 is None else b0.double().cpu()
        new_w, new_b = None, base + w[:, removed] @ stats.mean.double()[removed]
    else:
        if stats.second is None:
            raise ValueError(f"{site.name}: lstsq needs second moments; collect statistics with second=True")
        work = w0.device if w0.device.type == "cuda" else torch.device("cpu")  # fp64 solve next to the weights
        b = None if b0 is None else b0.to(work)
        mean, second = stats.mean.to(work), stats.second.to(work)
        new_w, new_b = lstsq_refit(w0.to(work), b, mean, second, keep.to(work), ridge)
    if new_w is not None:
        _set_param(fc_out, "weight", new_w, w0)
    _set_param(fc_out, "bias", new_b, w0)


def _compensate_normed(site, w0, b0, keep, stats: HiddenStats, method: str, ridge: float):
    """Hidden-norm sites: re-evaluate the sliced site on the stored inputs, fit to the stored dense outputs."""
    if stats.inputs is None or stats.outputs is None:
        raise ValueError(
            f"{site.name} normalises its hidden units, so its kept units change after slicing; its statistics "
            "need the MLP inputs and outputs (collect them with calibration_stats on the dense model)"
        )
    h = _pruned_hidden(site, stats.inputs)  # [N, K] fp64, the kept units as the pruned site computes them
    y = stats.outputs.double()
    if method == "bias":
        w_k = w0.double().cpu()[:, keep]
        base = torch.zeros(w0.shape[0], dtype=torch.float64) if b0 is None else b0.double().cpu()
        error = y.mean(0) - (h.mean(0) @ w_k.T + base)  # mean output error of the uncompensated pruned site
        return None, base + error
    return lstsq_fit(h, y, ridge)


def slice_and_compensate(
    site: MLPSite,
    keep: torch.Tensor | Sequence[int],
    original: SiteState,
    stats: HiddenStats | None = None,
    method: str = "none",
    ridge: float = 1e-4,
) -> None:
    """One search probe: :func:`amp.surgery.keep_units` from the dense ``original``, then :func:`compensate`.

    With ``method="none"`` this is exactly ``keep_units(site, keep, original)`` (``stats`` may be None).
    """
    keep_units(site, keep, original)
    if method == "none":
        return
    if stats is None:
        raise ValueError(f"{site.name}: {method} compensation needs calibration statistics")
    compensate(site, original, keep, stats, method, ridge)


def compensate_model(
    backbone,
    dense_states: Sequence[SiteState],
    orders: Sequence[torch.Tensor],
    widths: Sequence[int],
    stats: dict[int, HiddenStats],
    method: str = "bias",
    ridge: float = 1e-4,
) -> None:
    """Slice every site to ``orders[l][:widths[l]]`` from ``dense_states[l]`` and compensate it (in place).

    ``dense_states`` are :func:`amp.surgery.snapshot` of the dense sites (taken before any slicing); ``stats``
    comes from :func:`calibration_stats` on the dense model. Layers without statistics are sliced only.
    """
    sites = backbone.sites()
    if not (len(sites) == len(dense_states) == len(orders) == len(widths)):
        raise ValueError(f"{len(sites)} MLPs, {len(dense_states)} states, {len(orders)} orders, {len(widths)} widths")
    for layer, (site, state, order, width) in enumerate(zip(sites, dense_states, orders, widths)):
        keep = torch.as_tensor(order)[:width]
        if method != "none" and layer not in stats:
            raise ValueError(f"no calibration statistics for layer {layer}")
        keep_units(site, keep, state)
        if layer in stats:
            compensate(site, state, keep, stats[layer], method, ridge)  # "none" also restores the dense bias
