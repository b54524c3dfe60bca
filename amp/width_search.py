"""Search: how many hidden units each MLP keeps.

:func:`amp_search` is the paper's adaptive bisection (last layer to first, the smallest width whose loss
increase stays within a threshold). :func:`uniform_widths` and :func:`global_widths` are the preset-ratio
baselines computed from the same scores.

While layer ``l`` is searched, the layers before it are untouched, so the validation inputs of block ``l``
are cached once and each probe runs only blocks ``l..L-1`` (``cache=True``); the probes give exactly the
numbers a full forward pass gives.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from amp import distributed
from amp.criteria import Criterion, check_finite, usable_batches
from amp.data import check_option
from amp.io import read_json, write_json
from amp.recovery import METHODS as COMPENSATIONS
from amp.recovery import calibration_stats, slice_and_compensate
from amp.scoring import Scores, check_scores_for, weights_identity
from amp.surgery import snapshot

logger = logging.getLogger(__name__)

RULES = ("increase", "absolute")
REFERENCES = ("previous", "dense")


@dataclass
class Probe:
    layer: int
    width: int
    loss: float
    reference: float
    accepted: bool


@dataclass
class SearchResult:
    widths: list[int]
    dense_widths: list[int]
    dense_loss: float
    final_loss: float
    probes: list[Probe] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def kept_fraction(self) -> float:
        return sum(self.widths) / sum(self.dense_widths)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "kept_fraction": self.kept_fraction}


def round_width(width: float, round_to: int, hidden: int) -> int:
    """``width`` rounded up to a multiple of ``round_to``, within [round_to, hidden]."""
    return int(min(hidden, max(round_to, math.ceil(width / round_to) * round_to)))


def check_round_to(round_to: int, widths: Sequence[int], names: Sequence[str] | None = None) -> None:
    """Refuse a ``round_to`` that leaves a layer nothing to prune: widths are multiples of it within
    ``[round_to, width]``, so a layer no wider than ``round_to`` would silently keep all its units."""
    check_option("round_to", round_to, 1, integer=True)
    for i, width in enumerate(widths):
        if 1 < round_to >= width:
            layer = f"layer {i}" + (f" ({names[i]})" if names else "")
            raise ValueError(
                f"round_to (--round-to) {round_to} is not smaller than the MLP width {width} of {layer}: that layer "
                f"would keep all its units whatever the ratio or threshold; use a round_to below {min(widths)}"
            )


def uniform_widths(dense_widths: Sequence[int], ratio: float, round_to: int = 1) -> list[int]:
    """Every MLP keeps the same fraction ``ratio`` of its units."""
    _check_ratio(ratio)
    check_round_to(round_to, dense_widths)
    return [round_width(ratio * h, round_to, h) for h in dense_widths]


def global_widths(scores: Scores, ratio: float, round_to: int = 1) -> list[int]:
    """Keep the ``ratio`` best-scored units of the whole model, across layers; ≥ ``round_to`` per layer."""
    _check_ratio(ratio)
    check_round_to(round_to, scores.widths)
    flat = torch.cat([v.float() for v in scores.values])
    budget = max(1, round(ratio * flat.numel()))
    threshold = torch.sort(flat, descending=True).values[budget - 1]
    counts = [int((v.float() >= threshold).sum()) for v in scores.values]
    return [round_width(c, round_to, len(v)) for c, v in zip(counts, scores.values)]


def _check_ratio(ratio: float) -> None:
    check_option("ratio", ratio, 0, 1, low_open=True)


def _fingerprint(scores: Scores) -> str:
    digest = hashlib.sha256()
    for v in scores.values:
        digest.update(v.float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def data_fingerprint(batches: Sequence[tuple[torch.Tensor, Any]]) -> str:
    """A short hash of the validation batches (their shapes and an evenly strided sample of each batch's pixels):
    a resumed search must see the same images, not only as many."""
    digest = hashlib.sha256()
    for images, _ in batches:
        flat = images.detach().reshape(-1)
        digest.update(str(tuple(images.shape)).encode())
        digest.update(flat[:: max(1, flat.numel() // 65536)].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class _Evaluator:
    """Mean criterion over the (materialised) validation batches, running only blocks ``layer..`` per probe.

    Block inputs of the dense model are stashed once, every ``stride``-th layer, within ``cache_gb``; the
    inputs of block ``l`` are then recomputed from the nearest stash below it (nothing when stride is 1).
    """

    def __init__(self, backbone, batches, criterion: Criterion, device, cache: bool, cache_gb: float = 4.0):
        self.backbone, self.criterion, self.device, self.cache = backbone, criterion, device, cache
        self.images = [images.to(device) for images, _ in batches]
        self.layer: int | None = None
        self.inputs: list[torch.Tensor] = []
        self.stash: dict[int, list[torch.Tensor]] = {}
        with torch.no_grad():
            layers = self._stash_layers(cache_gb) if cache else []
            dense = []
            for images in self.images:  # one dense pass per batch gives both its features and its stash
                features, found = self._dense_pass(images, layers)
                dense.append(features)
                for layer in layers:
                    self.stash.setdefault(layer, []).append(found[layer])
            self.contexts = [criterion.context(targets, f) for (_, targets), f in zip(batches, dense)]
            self.dense_loss = self._mean(dense)
        if criterion.scores_dense_model and self.dense_loss == 0:  # only KL to dense is 0 at the dense model
            raise ValueError(
                f"the {criterion.name} loss of the dense model is 0 on the validation data, so no width can be judged "
                "(one image per batch, or a saturated softmax): use batches of ≥ 2 varied images or a smaller temp_inv"
            )

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.embed(images, project=self.criterion.needs_projection)

    def _mean(self, features: Iterable[torch.Tensor]) -> float:
        losses = [check_finite(self.criterion(f, c), "search") for f, c in zip(features, self.contexts)]
        return float(torch.stack(losses).mean())

    def _stash_layers(self, cache_gb: float) -> list[int]:
        """Every ``stride``-th layer, the stride keeping the stash within ``cache_gb``."""
        adapter, model = self.backbone.adapter, self.backbone.model
        depth = len(adapter.blocks(model))
        first = adapter.block_inputs(model, self.images[0][:1], [0])[0]  # one image: the size of a block input
        per_layer = first.numel() * first.element_size() * sum(len(images) for images in self.images)
        self.stride = max(1, math.ceil(depth * per_layer / (cache_gb * 2**30)))
        return list(range(0, depth, self.stride))

    def _dense_pass(self, images: torch.Tensor, layers: list[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The embedding of ``images`` and, from the same forward pass, the inputs of blocks ``layers``."""
        blocks, found = self.backbone.adapter.blocks(self.backbone.model), {}

        def grab(layer: int):
            def hook(_module, args):
                found[layer] = args[0]

            return hook

        handles = [blocks[layer].register_forward_pre_hook(grab(layer)) for layer in layers]
        try:
            return self._embed(images), found
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def cache_inputs(self, layer: int) -> None:
        """Inputs of block ``layer`` while the blocks before it are still dense; drops stashes above it."""
        if not self.cache:
            return
        adapter, model = self.backbone.adapter, self.backbone.model
        start = max(s for s in self.stash if s <= layer)
        self.inputs = [
            adapter.block_input_from(model, x, start, layer, images.shape)
            for x, images in zip(self.stash[start], self.images)
        ]
        for stashed in [s for s in self.stash if s > layer]:
            del self.stash[stashed]
        self.layer = layer

    @torch.no_grad()
    def loss(self) -> float:
        if not self.cache:
            return self._mean(self._embed(images) for images in self.images)
        adapter, model, project = self.backbone.adapter, self.backbone.model, self.criterion.needs_projection
        return self._mean(
            adapter.embed_from(model, x, self.layer, images.shape, project=project)
            for x, images in zip(self.inputs, self.images)
        )


def _accept(loss: float, reference: float, threshold: float, rule: str) -> bool:
    change = loss - reference
    return (change if rule == "increase" else abs(change)) <= threshold


def amp_search(
    backbone,
    scores: Scores,
    batches: Sequence[tuple[torch.Tensor, Any]],
    criterion: Criterion,
    threshold: float,
    steps: int = 6,
    rule: str = "increase",
    reference: str = "previous",
    round_to: int = 1,
    compensation: str = "none",
    ridge: float = 1e-4,
    cache: bool = True,
    cache_gb: float = 4.0,
    state_path: str | Path | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_layer_done: Callable[[int], None] | None = None,
) -> SearchResult:
    """AMP's adaptive widths; prunes ``backbone.model`` in place and returns what it found.

    For each layer from last to first, units ranked by ``scores``, a bisection of ``steps`` probes looks for
    the smallest width whose loss passes the ``rule`` against the ``reference`` loss:

    * rule ``increase`` (the paper): loss − reference ≤ threshold; ``absolute``: |loss − reference| ≤ threshold;
    * reference ``previous`` (the paper): the loss of the model as pruned so far, so the budget is per layer
      and compounds; ``dense``: the unpruned model's loss, a global budget.

    ``batches`` is the validation set as a list of (images, targets), kept in memory so every probe sees the
    same batches. ``compensation`` (``bias``/``lstsq``, :mod:`amp.recovery`) corrects fc_out for the removed
    units in every probe and in the result, from calibration statistics of the dense model on ``batches``.
    ``cache_gb`` bounds the memory of stashed block inputs. With ``state_path`` each finished
    layer is written atomically; ``resume=True`` continues from it to the same widths.
    """
    check_option("threshold", threshold, 0)
    if rule not in RULES or reference not in REFERENCES:
        raise ValueError(f"rule must be one of {RULES} and reference one of {REFERENCES}")
    check_option("steps", steps, 1, integer=True)
    check_option("cache_gb", cache_gb, 0, low_open=True)
    if compensation not in COMPENSATIONS:
        raise ValueError(f"compensation must be one of {COMPENSATIONS}, got {compensation!r}")
    check_option("ridge", ridge, 0)
    batches = _validation_batches(batches, criterion)
    device = torch.device(device or next(backbone.model.parameters()).device)
    sites = backbone.sites()
    check_scores_for(scores, backbone)
    check_round_to(round_to, scores.widths, [site.name for site in sites])
    orders = scores.orders()
    config = {
        "method": "amp",
        "threshold": threshold,
        "steps": steps,
        "rule": rule,
        "reference": reference,
        "round_to": round_to,
        "compensation": compensation,
        "ridge": ridge,
        "criterion": criterion.describe(),
        "scores": _fingerprint(scores),
        "model": weights_identity(backbone),
        "images": sum(len(images) for images, _ in batches),
        "data": data_fingerprint(batches),
    }
    backbone.model.eval()
    evaluator = _Evaluator(backbone, batches, criterion, device, cache, cache_gb)
    stats = _calibrate(backbone, batches, compensation, device)

    def cut(layer: int, width: int, original) -> None:
        slice_and_compensate(sites[layer], orders[layer][:width], original, stats.get(layer), compensation, ridge)

    state = {"config": config, "dense_loss": evaluator.dense_loss, "reference": evaluator.dense_loss, "done": {}}
    state["probes"] = []
    if resume and state_path and Path(state_path).is_file():
        state = _resume(state_path, config, sites, cut, evaluator.dense_loss)
    ref = state["reference"]
    todo = [layer for layer in reversed(range(len(sites))) if str(layer) not in state["done"]]
    for layer in tqdm(todo, desc="search", unit="layer", disable=not progress):
        site = sites[layer]
        original = snapshot(site)
        evaluator.cache_inputs(layer)
        hidden = site.hidden  # the dense width: site.hidden changes with every probe
        lo, hi, best, best_loss = 0, hidden, hidden, None
        for _ in range(steps):
            width = round_width((lo + hi) // 2, round_to, hidden)
            if width >= hi or width <= lo:
                break  # the resolution is exhausted
            cut(layer, width, original)
            loss = evaluator.loss()
            accepted = _accept(loss, ref, threshold, rule)
            state["probes"].append(asdict(Probe(layer, width, loss, ref, accepted)))
            if accepted:
                hi, best, best_loss = width, width, loss
            else:
                lo = width
        cut(layer, best, original)  # units stored best-first, even when all are kept
        if reference == "previous" and best_loss is not None:
            ref = best_loss
        state["done"][str(layer)] = best
        state["reference"] = ref
        if state_path and distributed.rank() == 0:  # one writer under torchrun; every rank has the same state
            write_json(state_path, state)
        if on_layer_done is not None:
            on_layer_done(layer)
    widths = [s.hidden for s in sites]
    with torch.no_grad():
        final = evaluator._mean(evaluator._embed(images) for images in evaluator.images)
    return SearchResult(
        widths,
        [int(original_width) for original_width in scores.widths],
        evaluator.dense_loss,
        final,
        [Probe(**p) for p in state["probes"]],
        config,
    )


def _validation_batches(batches: Iterable[tuple[torch.Tensor, Any]], criterion: Criterion) -> list:
    """The validation batches as a list, less any too small for the criterion (not under torchrun)."""
    batches = list(batches)
    if not batches:
        raise ValueError("the validation data set yielded no batches")
    return batches if distributed.world_size() > 1 else list(usable_batches(batches, criterion, "the validation data"))


def _calibrate(backbone, batches, compensation: str, device) -> dict:
    """Hidden-unit statistics of the dense model, which compensation needs (none for ``compensation='none'``)."""
    if compensation == "none":
        return {}
    return calibration_stats(backbone, batches, device=device, second=compensation == "lstsq")


def _resume(state_path, config, sites, cut, dense_loss) -> dict[str, Any]:
    state = read_json(state_path)
    if state.get("config") != json.loads(json.dumps(config)):
        raise ValueError(
            f"{state_path} was written by a search with other settings or data:\n"
            f"  saved: {state.get('config')}\n  now:   {config}\nremove it or drop --resume"
        )
    if not math.isclose(state["dense_loss"], dense_loss, rel_tol=0, abs_tol=1e-6):
        raise ValueError(f"{state_path}: the dense loss differs ({state['dense_loss']} vs {dense_loss}); data changed?")
    for layer, width in state["done"].items():
        cut(int(layer), width, snapshot(sites[int(layer)]))
    return state


def materialise(
    loader: Iterable, max_images: int | None = None, progress: bool = True
) -> list[tuple[torch.Tensor, Any]]:
    """The validation batches in memory, so every probe sees the same images in the same batches.

    In memory by design, not streamed: the search runs the same images once per probe (``steps`` per MLP, i.e.
    hundreds of passes for a ViT-g), so streaming would decode every JPEG hundreds of times, and the probes must
    see bit-identical batches. What is held is only what the search uses: reading stops at the batch that reaches
    ``max_images`` (pick a few thousand images: the size is logged), and the images are the model's input tensors.
    """
    check_option("max_images", max_images, 1, integer=True, optional=True)
    batches, seen, held = [], 0, 0
    size = _length(loader) if distributed.world_size() == 1 else None  # a rank reads only its slice of the data set
    total = min(size, max_images) if size is not None and max_images is not None else size or max_images
    bar = tqdm(total=total, desc="validation images", unit="img", disable=not progress or distributed.rank() != 0)
    with bar:
        for images, targets in loader:
            batches.append((images, targets))
            seen += len(images)
            held += images.element_size() * images.nelement()
            bar.update(len(images))
            if max_images is not None and seen >= max_images:  # stop before decoding another batch
                break
    if not batches:
        raise ValueError("the validation data set yielded no images")
    logger.info("validation set in memory: %d images in %d batches, %.1f MB", seen, len(batches), held / 2**20)
    return batches


def _length(loader: Iterable) -> int | None:
    """The number of images a loader yields, where it knows (for the progress bar), else None."""
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None  # type: ignore[arg-type]
    except TypeError:  # an iterable-style data set
        return None


def apply_widths(
    backbone,
    scores: Scores,
    widths: Sequence[int],
    batches: Sequence[tuple[torch.Tensor, Any]],
    criterion: Criterion,
    device: str | torch.device | None = None,
    compensation: str = "none",
    ridge: float = 1e-4,
) -> SearchResult:
    """Prune to preset ``widths`` (uniform/global baselines), measuring the loss before and after like the search."""
    device = torch.device(device or next(backbone.model.parameters()).device)
    check_scores_for(scores, backbone)
    batches = _validation_batches(batches, criterion)
    evaluator = _Evaluator(backbone, batches, criterion, device, cache=False)
    stats = _calibrate(backbone, batches, compensation, device)
    for site, order, width in zip(backbone.sites(), scores.orders(), widths):
        if not 1 <= width <= site.hidden:
            raise ValueError(f"{site.name}: width {width} outside [1, {site.hidden}]")
        slice_and_compensate(site, order[:width], snapshot(site), stats.get(site.index), compensation, ridge)
    config = {
        "method": "preset",
        "criterion": criterion.describe(),
        "scores": _fingerprint(scores),
        "compensation": compensation,
        "ridge": ridge,
    }
    return SearchResult(list(widths), scores.widths, evaluator.dense_loss, evaluator.loss(), [], config)
