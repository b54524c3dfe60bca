"""Other people's pruning methods, on the same job as AMP: prune only the MLP hidden units, no fine-tuning.

AMP's claim is that it beats "other pruning methods without fine-tuning". This module puts such methods behind one
interface so that notebook 08 can compare them with AMP *at the same kept units* (so the same parameters and FLOPs,
checked by :func:`check_same_cost`), evaluated by amp's own :class:`amp.EvalSuite`:

* Torch-Pruning 1.6.1 (optional dependency, ``pip install torch-pruning==1.6.1``; extra ``peers``) importances on
  each MLP's dependency group (fc_in rows, fc_out columns, gate rows, hidden norm): ``magnitude``
  (``MagnitudeImportance``, L2), ``taylor`` (``TaylorImportance``: Σ|w·∂E/∂w| with E amp's label-free criterion on
  the same scoring images as AMP) and ``hessian`` (``HessianImportance``: Σ w²·E[(∂E/∂w)²], the empirical Fisher
  diagonal over micro-batches). Torch-Pruning's own gradient accumulator (``accumulate_grad``) keeps only the last
  sample in 1.6.1 (its keys are parameters, its test is on names), so the Fisher is averaged here and handed to
  ``HessianImportance`` as the parameters' ``.grad``, which is the path its ``__call__`` takes when nothing was
  accumulated. ``normalizer`` is Torch-Pruning's per-group normaliser (default ``"mean"``; None = raw), which only
  matters for a global allocation.
* ``flap``: FLAP (An et al., AAAI 2024, "Fluctuation-based adaptive structured pruning"), implemented from the paper:
  fluctuation metric Var_tokens(h_j)·‖W_out[:, j]‖², standardised per layer for its adaptive (global) structure, and
  the bias compensation b' = b + W_R E[h_R] (:mod:`amp.recovery`'s ``bias``).
* ``random``: a seeded random ranking.

Allocations at a budget of ``total`` kept units (the AMP model's): ``widths`` (given per-layer widths, e.g. AMP's),
``uniform`` (each layer the same fraction, largest remainder so the total is exact) and ``global`` (the ``total``
best scores of the whole model, ≥ 1 per layer). Every result is a sliced copy of the dense model.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from amp.accounting import model_stats
from amp.api import search
from amp.criteria import Criterion, check_finite
from amp.presets import preset
from amp.recovery import HiddenStats, compensate_model
from amp.scoring import Scores, random_scores
from amp.surgery import prune as slice_sites
from amp.surgery import snapshot

TP_IMPORTANCES = ("magnitude", "taylor", "hessian")
METHODS = (*TP_IMPORTANCES, "flap", "random", "amp")
ALLOCATIONS = ("widths", "uniform", "global")
TP_VERSION = "1.6.1"


@dataclass
class PeerResult:
    """One peer's pruned model, the widths it chose, and what it cost (wall seconds: scoring + allocation + slicing)."""

    name: str
    backbone: Any
    widths: list[int]
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def kept_units(self) -> int:
        return sum(self.widths)


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise ImportError(
            f"the Torch-Pruning peers need torch-pruning=={TP_VERSION}: "
            f"pip install --no-deps torch-pruning=={TP_VERSION} (or the extra amp-prune[peers])"
        ) from None
    return torch_pruning


# --- allocations at an exact budget --------------------------------------------------------------------------------


def uniform_allocation(dense_widths: Sequence[int], total: int) -> list[int]:
    """Widths proportional to the dense widths that sum to exactly ``total`` (largest remainder), each ≥ 1."""
    _check_total(total, dense_widths)
    shares = [total * w / sum(dense_widths) for w in dense_widths]
    widths = [max(1, int(s)) for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: shares[i] - int(shares[i]), reverse=True)
    i = 0
    while sum(widths) != total:
        layer = by_remainder[i % len(widths)]
        step = 1 if sum(widths) < total else -1
        if 1 <= widths[layer] + step <= dense_widths[layer]:
            widths[layer] += step
        i += 1
    return widths


def global_allocation(scores: Scores, total: int) -> list[int]:
    """Keep the ``total`` best units of the whole model (ties by layer order), at least one per layer."""
    _check_total(total, scores.widths)
    layers = torch.cat([torch.full((len(v),), i) for i, v in enumerate(scores.values)])
    flat = torch.cat([v.double() for v in scores.values])
    best_first = torch.sort(flat, descending=True, stable=True).indices
    widths = torch.bincount(layers[best_first[:total]], minlength=len(scores.values)).tolist()
    for layer in range(len(widths)):  # a layer left empty takes one unit from the layer with the most
        if widths[layer] == 0:
            widths[widths.index(max(widths))] -= 1
            widths[layer] = 1
    return widths


def _check_total(total: int, dense_widths: Sequence[int]) -> None:
    if not isinstance(total, int) or not len(dense_widths) <= total <= sum(dense_widths):
        raise ValueError(
            f"total kept units must be an integer in [{len(dense_widths)}, {sum(dense_widths)}], got {total!r}"
        )


def allocate(
    scores: Scores, allocation: str, total: int | None = None, widths: Sequence[int] | None = None
) -> list[int]:
    """Per-layer widths for ``allocation``: ``widths`` as given, ``uniform`` or ``global`` at ``total`` units."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; choose one of {ALLOCATIONS}")
    if allocation == "widths":
        if widths is None or len(widths) != len(scores.widths):
            raise ValueError(f"allocation 'widths' needs {len(scores.widths)} widths, got {widths}")
        return [int(w) for w in widths]
    if total is None:
        raise ValueError(f"allocation {allocation!r} needs a total of kept units")
    return uniform_allocation(scores.widths, total) if allocation == "uniform" else global_allocation(scores, total)


# --- gradients of amp's criterion on the MLP weights -------------------------------------------------------------


def _mlp_parameters(backbone) -> list[torch.nn.Parameter]:
    return [p for site in backbone.sites() for linear in site.linears() for p in linear.parameters()]


def _loss(backbone, images: torch.Tensor, targets: Any, criterion: Criterion) -> torch.Tensor:
    features = backbone.embed(images, project=criterion.needs_projection)
    with torch.no_grad():
        context = criterion.context(targets, features.detach())
    return check_finite(criterion(features, context), "peer scoring")


def criterion_gradients(
    backbone, batches: Sequence[tuple[torch.Tensor, Any]], criterion: Criterion, device=None, squared_per: int = 0
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """∂E/∂w of every MLP parameter summed over ``batches`` (``squared_per=0``), or the empirical Fisher
    E[(∂E/∂w)²] over micro-batches of ``squared_per`` images (≥ 2: the entropy needs a batch). Other parameters
    get no gradient; ``requires_grad`` is restored afterwards."""
    device = torch.device(device or next(backbone.model.parameters()).device)
    model, params = backbone.model, _mlp_parameters(backbone)
    requires = {p: p.requires_grad for p in model.parameters()}
    model.eval().requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    totals = {p: torch.zeros_like(p, dtype=torch.float64) for p in params}
    samples = 0
    try:
        for images, targets in batches:
            images = images.to(device)
            step = squared_per or len(images)
            for start in range(0, len(images) - step + 1, step):
                part = targets[start : start + step] if targets is not None and squared_per else targets
                _loss(backbone, images[start : start + step], part, criterion).backward()
                for p in params:
                    grad = p.grad.double()
                    totals[p] += grad.pow(2) if squared_per else grad
                    p.grad = None
                samples += 1
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)
    if samples == 0:
        raise ValueError(f"no batch of ≥ {squared_per or 2} images to compute gradients on")
    return {p: (t / samples if squared_per else t) for p, t in totals.items()}


# --- Torch-Pruning importances ------------------------------------------------------------------------------------


def tp_scores(
    backbone,
    importance: str,
    batches: Sequence[tuple[torch.Tensor, Any]] | None = None,
    criterion: Criterion | None = None,
    normalizer: str | None = "mean",
    fisher_batch: int = 8,
    device=None,
) -> Scores:
    """Torch-Pruning's ``importance`` of every MLP hidden unit, on each MLP's dependency group.

    ``taylor`` and ``hessian`` need the scoring ``batches`` and amp's ``criterion`` (the gradients are amp's
    label-free loss); ``hessian`` averages squared gradients over micro-batches of ``fisher_batch`` images.
    """
    tp = _torch_pruning()
    if importance not in TP_IMPORTANCES:
        raise ValueError(f"unknown Torch-Pruning importance {importance!r}; choose one of {TP_IMPORTANCES}")
    if importance != "magnitude" and (batches is None or criterion is None):
        raise ValueError(f"the {importance} importance needs scoring batches and a criterion")
    if importance == "hessian" and fisher_batch < 2:
        raise ValueError(f"fisher_batch must be ≥ 2 (the criterion needs a batch), got {fisher_batch}")
    grads = {}
    if importance != "magnitude":
        squared = fisher_batch if importance == "hessian" else 0
        grads = criterion_gradients(backbone, batches, criterion, device, squared_per=squared)
    scorer = {
        "magnitude": lambda: tp.importance.MagnitudeImportance(p=2, normalizer=normalizer),
        "taylor": lambda: tp.importance.TaylorImportance(normalizer=normalizer),
        "hessian": lambda: tp.importance.HessianImportance(normalizer=normalizer),
    }[importance]()
    values = []
    try:
        for p, g in grads.items():
            p.grad = g.to(p.dtype)
        for site in backbone.sites():
            values.append(scorer(_hidden_group(tp, site)).detach().float().cpu())
    finally:
        for p in grads:
            p.grad = None
    meta = {"method": f"torch-pruning:{importance}", "normalizer": normalizer, "torch_pruning": tp.__version__}
    if criterion is not None and importance != "magnitude":
        meta |= {"criterion": criterion.describe(), "images": sum(len(images) for images, _ in batches)}
    return Scores(values, meta)


def _hidden_group(tp, site):
    """Torch-Pruning's dependency group of the site's hidden units: fc_in's outputs and everything tied to them."""
    if site.packed:  # one fc_in holds both halves: Torch-Pruning would see 2·hidden channels, not hidden units
        raise ValueError(f"{site.name}: packed gated MLPs are not supported by the Torch-Pruning peers")
    weight = site.fc_in.weight
    example = torch.zeros(1, 2, site.fc_in.in_features, device=weight.device, dtype=weight.dtype)
    graph = tp.DependencyGraph().build_dependency(site.module, example_inputs=example)
    return graph.get_pruning_group(site.fc_in, tp.prune_linear_out_channels, idxs=list(range(site.hidden)))


# --- FLAP ------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def hidden_moments(backbone, batches: Sequence[tuple[torch.Tensor, Any]], device=None) -> dict[int, HiddenStats]:
    """Per site, the fp64 mean and variance of each hidden unit over all calibration tokens of ``backbone``
    (``HiddenStats`` with ``second=None``, enough for ``bias`` compensation; the variance in ``meta``)."""
    device = torch.device(device or next(backbone.model.parameters()).device)
    sites = backbone.sites()
    sums = {s.index: torch.zeros(s.hidden, dtype=torch.float64) for s in sites}
    squares = {s.index: torch.zeros(s.hidden, dtype=torch.float64) for s in sites}
    counts = dict.fromkeys(sums, 0)

    def hook_for(index: int):
        def hook(_module, args):
            h = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()
            sums[index] += h.sum(0)
            squares[index] += h.pow(2).sum(0)
            counts[index] += h.shape[0]

        return hook

    handles = [s.fc_out.register_forward_pre_hook(hook_for(s.index)) for s in sites]
    try:
        backbone.model.eval()
        for images, _ in batches:
            backbone.embed(images.to(device))
    finally:
        for handle in handles:
            handle.remove()
    stats = {}
    for index, total in sums.items():
        mean = total / counts[index]
        variance = (squares[index] / counts[index] - mean.pow(2)).clamp_min(0)
        stats[index] = HiddenStats(mean, None, counts[index], meta={"variance": variance})
    return stats


def flap_scores(backbone, stats: dict[int, HiddenStats], standardize: bool = True) -> Scores:
    """FLAP's fluctuation metric Var(h_j)·‖W_out[:, j]‖², standardised per layer (mean 0, std 1) when
    ``standardize`` so that one global threshold sets each layer's width (FLAP's adaptive structure)."""
    values = []
    for site in backbone.sites():
        column_norm = site.fc_out.weight.detach().double().pow(2).sum(0).cpu()
        metric = stats[site.index].meta["variance"] * column_norm
        if standardize:
            metric = (metric - metric.mean()) / metric.std().clamp_min(1e-12)
        values.append(metric.float())
    return Scores(values, {"method": "flap", "standardized": standardize})


# --- pruning a copy -------------------------------------------------------------------------------------------------


def slice_copy(dense, scores: Scores, widths: Sequence[int]):
    """A copy of ``dense`` whose every MLP keeps its ``widths[l]`` best units under ``scores`` (best first)."""
    pruned = copy.deepcopy(dense)
    slice_sites(pruned.sites(), scores.orders(), list(widths))
    pruned.info["dense_widths"] = list(scores.widths)
    pruned.info.setdefault("base_model", dense.spec)
    return pruned


def bias_compensated_copy(dense, scores: Scores, widths: Sequence[int], stats: dict[int, HiddenStats]):
    """:func:`slice_copy` with FLAP's bias compensation b' = b + W_R E[h_R] (amp.recovery's ``bias``)."""
    pruned = copy.deepcopy(dense)
    states = [snapshot(site) for site in pruned.sites()]
    compensate_model(pruned, states, scores.orders(), list(widths), stats, method="bias")
    pruned.info["dense_widths"] = list(scores.widths)
    pruned.info.setdefault("base_model", dense.spec)
    return pruned


def check_same_cost(pruned, reference, name: str = "peer") -> None:
    """Refuse a comparison at unequal cost: the same total of kept MLP units and the same parameter count."""

    if sum(pruned.widths()) != sum(reference.widths()):
        raise ValueError(f"{name} keeps {sum(pruned.widths())} MLP units, the reference {sum(reference.widths())}")
    params, expected = model_stats(pruned).params, model_stats(reference).params
    if params != expected:
        raise ValueError(f"{name} has {params} parameters, the reference {expected}")


class PeerBench:
    """Every peer for one dense model, scoring once and pruning to any budget.

    Scores (and their wall time) are computed on first use and reused: an allocation at another budget costs only
    the slicing. ``batches`` are the scoring images (the same as AMP's), ``criterion`` amp's label-free loss.
    """

    def __init__(self, dense, batches, criterion: Criterion, device=None, fisher_batch: int = 8, seed: int = 0,
                 amp_scores: Scores | None = None, amp_seconds: float = 0.0):  # fmt: skip
        self.dense, self.batches, self.criterion = dense, list(batches), criterion
        self.device, self.fisher_batch, self.seed = device, fisher_batch, seed
        self._scores: dict[tuple, tuple[Scores, float]] = {}
        if amp_scores is not None:  # amp's own Taylor scores, for amp's uniform/global allocations at the same budget
            self._scores[("amp", None)] = amp_scores, amp_seconds
        self._stats: tuple[dict[int, HiddenStats], float] | None = None

    def scores(self, method: str, normalizer: str | None = "mean") -> tuple[Scores, float]:
        """The scores of ``method`` and the seconds they took (Torch-Pruning's ``normalizer``; FLAP standardises)."""
        if method not in METHODS:
            raise ValueError(f"unknown peer method {method!r}; choose one of {METHODS}")
        key = (method, normalizer if method in TP_IMPORTANCES else None)
        if key not in self._scores:
            start = time.perf_counter()
            if method in TP_IMPORTANCES:
                scores = tp_scores(self.dense, method, self.batches, self.criterion, normalizer, self.fisher_batch,
                                   self.device)  # fmt: skip
            elif method == "flap":
                stats, seconds = self.stats()
                scores = flap_scores(self.dense, stats)
                start -= seconds  # FLAP's cost includes its calibration pass
            elif method == "random":
                scores = random_scores(self.dense, self.seed)
            else:
                raise ValueError("method 'amp' needs the amp_scores given to PeerBench")
            self._scores[key] = scores, time.perf_counter() - start
        return self._scores[key]

    def stats(self) -> tuple[dict[int, HiddenStats], float]:
        if self._stats is None:
            start = time.perf_counter()
            stats = hidden_moments(self.dense, self.batches, self.device)
            self._stats = stats, time.perf_counter() - start
        return self._stats

    def prune(
        self,
        method: str,
        allocation: str,
        reference,
        normalizer: str | None = "mean",
        name: str | None = None,
    ) -> PeerResult:
        """``method`` pruned to the cost of ``reference`` (a pruned model, e.g. AMP's): its widths
        (``allocation='widths'``) or its total kept units (``uniform``/``global``); asserts equal cost."""
        scores, seconds = self.scores(method, normalizer)
        start = time.perf_counter()
        widths = allocate(scores, allocation, sum(reference.widths()), reference.widths())
        if method == "flap":
            pruned = bias_compensated_copy(self.dense, scores, widths, self.stats()[0])
        else:
            pruned = slice_copy(self.dense, scores, widths)
        seconds += time.perf_counter() - start
        label = name or f"{method} {allocation}" + ("" if normalizer == "mean" or method not in TP_IMPORTANCES else
                                                    f" (normalizer {normalizer})")  # fmt: skip
        check_same_cost(pruned, reference, label)
        config = {"method": method, "allocation": allocation, "normalizer": normalizer, **scores.meta}
        return PeerResult(label, pruned, widths, seconds, config)


# --- the comparison of notebook 08 -----------------------------------------------------------------------------------


def parse_peer(spec: str) -> tuple[str, str, str | None]:
    """``"taylor/global"`` → (method, allocation, normaliser): ``-raw`` on the allocation drops Torch-Pruning's
    per-layer normaliser (``"taylor/global-raw"``); ``widths`` means the reference model's own per-layer widths."""
    method, _, allocation = spec.partition("/")
    raw = allocation.endswith("-raw")
    allocation = allocation.removesuffix("-raw")
    if method not in METHODS or allocation not in ALLOCATIONS or (raw and method not in TP_IMPORTANCES):
        raise ValueError(
            f"peer {spec!r}: write method/allocation with a method of {METHODS} and an allocation of {ALLOCATIONS} "
            "(-raw only after a Torch-Pruning allocation)"
        )
    return method, allocation, None if raw else "mean"


def peer_label(spec: str) -> str:
    """How tables name a peer: Torch-Pruning's importances as ``TP <importance>``, FLAP, random, amp's own scores."""
    method, allocation, normalizer = parse_peer(spec)
    who = {"magnitude": "TP magnitude", "taylor": "TP Taylor", "hessian": "TP Hessian", "flap": "FLAP",
           "random": "random", "amp": "amp entropy-Taylor"}[method]  # fmt: skip
    where = "AMP's widths" if allocation == "widths" else allocation
    return f"{who}, {where}" + (", no normaliser" if normalizer is None and method in TP_IMPORTANCES else "")


def run_peers(bench: PeerBench, reference, specs: Sequence[str], measure) -> list[tuple[PeerResult, Any]]:
    """Each peer in ``specs`` pruned to the cost of ``reference`` (asserted) and measured: ``measure(backbone, name)``
    returns its evaluation row (an :class:`amp.evaluation.EvalRow`); the pruned copies are not kept."""
    out = []
    for spec in specs:
        method, allocation, normalizer = parse_peer(spec)
        result = bench.prune(method, allocation, reference, normalizer, name=peer_label(spec))
        out.append((result, measure(result.backbone, result.name)))
        result.backbone = None  # the row holds what the tables need; free the copy
    return out


def compare_testbed(
    dense,
    scores: Scores,
    score_seconds: float,
    val_data,
    searches: Sequence[dict[str, Any]],
    peer_specs: Sequence[str],
    measure,
    bench: PeerBench,
    **search_options: Any,
) -> list[dict[str, Any]]:
    """Notebook 08 on one testbed: each AMP search of ``searches`` (``{"preset", "threshold"}``, options of
    :mod:`amp.presets`) sets a budget, and every peer of ``peer_specs`` is pruned to it and measured.

    One entry per model: ``level`` (the search's name), ``method``, ``row`` (``measure(backbone, name)``), ``widths``,
    ``seconds`` (AMP: scoring + search; a peer: its scoring + slicing, see :class:`PeerBench`) and, for AMP, the
    search result. ``search_options`` go to every :func:`amp.search` (data size, batch size, temperature, ...).
    """

    entries = []
    for spec in searches:
        options = {key: value for key, value in spec.items() if key not in ("preset", "threshold")}
        name = f"AMP {spec['preset']} Δ={spec['threshold']:g}"
        pruned, start = copy.deepcopy(dense), time.perf_counter()
        result = search(pruned, scores, val_data, threshold=spec["threshold"],
                        **{**search_options, **preset(spec["preset"], **options)})  # fmt: skip
        seconds = score_seconds + time.perf_counter() - start
        entries.append({"level": name, "method": name, "row": measure(pruned, name), "widths": result["widths"],
                        "seconds": seconds, "search": result, "preset": spec["preset"]})  # fmt: skip
        for peer, row in run_peers(bench, pruned, peer_specs, measure):
            entries.append({"level": name, "method": peer.name, "row": row, "widths": peer.widths,
                            "seconds": peer.seconds, "search": None, "preset": None})  # fmt: skip
        del pruned
    return entries
