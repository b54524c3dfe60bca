"""Search: how many hidden units each MLP keeps.

:func:`amp_search` is the paper's adaptive bisection (last layer to first, the smallest width whose loss
increase stays within a threshold). :func:`uniform_widths` and :func:`global_widths` are the preset-ratio
baselines computed from the same scores.

While layer ``l`` is searched, the layers before it are untouched, so the validation inputs of block ``l``
are cached once and each probe runs only blocks ``l..L-1`` (``cache=True``); the probes give exactly the
numbers a full forward pass gives.

At the paper's scale (a global batch of 1024 images, the ImageNet validation set, a ViT-g) none of that fits in one
device's memory as is: batches run in chunks, the caches honour ``cache_gb`` (host memory, then disk, then
recomputation), and :func:`materialise` spills the validation images to disk beyond its bound; see :func:`amp_search`.
"""

from __future__ import annotations

import contextlib
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
from amp.spill import GIB, TIERS, Selected, SpilledBatches, TieredStore, batch_sizes, held_in_memory, nbytes
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


# --- where the search keeps what it holds -------------------------------------------------------------

# --- the criterion over the validation set ----------------------------------------------------------------


class _Evaluator:
    """Mean criterion over the validation batches, running only blocks ``layer..`` per probe.

    Each batch is the criterion's batch; it goes through the model in *pieces* of at most ``chunk_size`` images
    (features concatenated before the criterion), so a large global batch needs the activations of one piece only.

    What it keeps, within ``cache_gb`` of memory (see :func:`amp_search`): the inputs of the block being searched
    (``input`` entries, read by every probe; device first, then host, then disk), and a *stash* of the dense model's
    inputs of every ``stride``-th block (read once per layer: host first, then device, never disk), from which the
    inputs of the next blocks are recomputed. Blocks below the lowest stash are recomputed from the images.
    The validation images stay where the caller keeps them (host memory, or disk for :class:`SpilledBatches`) and
    go to the device one piece at a time.
    """

    def __init__(
        self,
        backbone,
        batches: Sequence,
        criterion: Criterion,
        device,
        cache: bool,
        cache_gb: float = 4.0,
        chunk_size: int | None = None,
        autocast_dtype: torch.dtype | None = None,
        spill_dir: str | Path | None = None,
    ):
        self.backbone, self.criterion, self.device, self.cache = backbone, criterion, device, cache
        self.batches, self.autocast_dtype = batches, autocast_dtype
        sizes = batch_sizes(batches)
        step = chunk_size or max(sizes)
        self.pieces = [[(start, min(start + step, n)) for start in range(0, n, step)] for n in sizes]
        self.layer: int | None = None
        self.stash_layers: list[int] = []
        self.store = TieredStore(device, *self._budgets(cache_gb), spill_dir=spill_dir)
        self.stride = 1
        with torch.no_grad():
            if cache:
                self.stash_layers = self._stash_layers(sum(sizes))
            contexts, losses = [], []
            for b, pieces in self._each_batch():
                features = []
                for i, images in pieces:  # one dense pass per piece gives both its features and its stash
                    piece_features, found = self._dense_pass(images, self.stash_layers)
                    features.append(piece_features)
                    for layer in self.stash_layers:
                        self.store.put(("stash", layer, b, i), found[layer], prefer=("host", "device"))
                features = torch.cat(features)
                contexts.append(criterion.context(batches[b][1], features))
                losses.append(self._loss(features, contexts[-1]))
            self.contexts = contexts
            self.dense_loss = float(torch.stack(losses).mean())
        if criterion.scores_dense_model and self.dense_loss == 0:  # only KL to dense is 0 at the dense model
            raise ValueError(
                f"the {criterion.name} loss of the dense model is 0 on the validation data, so no width can be judged "
                "(one image per batch, or a saturated softmax): use batches of ≥ 2 varied images or a smaller temp_inv"
            )

    def _budgets(self, cache_gb: float) -> tuple[float, float]:
        """Bytes for the caches on the device and in host memory: ``cache_gb`` each on a GPU, ``cache_gb`` in all on a
        CPU (one memory); the validation images the caller holds in host memory count against the host's share."""
        bound, images = cache_gb * GIB, held_in_memory(self.batches)
        if images > bound:
            logger.warning(
                "the validation images held in memory (%.3g GB) exceed cache_gb=%g: the search keeps its caches on "
                "disk (materialise(..., memory_gb=...) spills the images too)",
                images / GIB,
                cache_gb,
            )
        if self.device.type == "cpu":
            return max(0.0, bound - images), 0.0
        return bound, max(0.0, bound - images)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _each_batch(self):
        """(batch index, [(piece index, images of the piece on the device)]), one batch read at a time."""
        for b, pieces in enumerate(self.pieces):
            images = self.batches[b][0]
            yield b, [(i, images[start:stop].to(self.device)) for i, (start, stop) in enumerate(pieces)]

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.backbone.embed(images, project=self.criterion.needs_projection)

    def _loss(self, features: torch.Tensor, context) -> torch.Tensor:
        return check_finite(self.criterion(features, context), "search")  # outside autocast: the criterion in fp32

    def _stash_layers(self, images: int) -> list[int]:
        """Every ``stride``-th block from ``stride`` on: as many as fit in memory once the current block's inputs
        have their room; none (everything recomputed from the images) when memory holds only those."""
        adapter, model = self.backbone.adapter, self.backbone.model
        depth = len(adapter.blocks(model))
        with self._autocast():
            first = adapter.block_inputs(model, self.batches[0][0][:1].to(self.device), [0])[0]
        per_layer = nbytes(first) * images
        memory = self.store.budget["device"] + self.store.budget["host"]
        room = memory - min(per_layer, memory)  # the current block's inputs come first
        count = min(depth - 1, int(room // per_layer)) if per_layer else depth - 1
        self.stride = math.ceil(depth / (count + 1))
        return list(range(self.stride, depth, self.stride))[:count]

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
        for key in self.store.held():
            if key[0] == "input" or key[1] > layer:
                self.store.delete(key)
        below = [s for s in self.stash_layers if s <= layer]
        start = max(below) if below else None
        for b, pieces in enumerate(self.pieces):
            if start == layer:  # the stash of this block is its input: kept as is, no copy
                for i in range(len(pieces)):
                    self.store.rename(("stash", layer, b, i), ("input", b, i))
                continue
            images = self.batches[b][0] if start is None else None
            for i, (lo, hi) in enumerate(pieces):
                with self._autocast():
                    if start is None:  # no stash below: from the images
                        x = adapter.block_inputs(model, images[lo:hi].to(self.device), [layer])[layer]
                    else:
                        shape = self._piece_shape(b, lo, hi)
                        x = adapter.block_input_from(model, self.store.get(("stash", start, b, i)), start, layer, shape)
                self.store.put(("input", b, i), x)
        self.stash_layers = [s for s in self.stash_layers if s < layer]
        self.layer = layer

    def _piece_shape(self, b: int, lo: int, hi: int) -> torch.Size:
        return torch.Size((hi - lo, *self.image_shape))

    @property
    def image_shape(self) -> torch.Size:
        if not hasattr(self, "_image_shape"):
            self._image_shape = self.batches[0][0].shape[1:]
        return self._image_shape

    @torch.no_grad()
    def loss(self) -> float:
        if not self.cache:
            return self.full_loss()
        adapter, model, project = self.backbone.adapter, self.backbone.model, self.criterion.needs_projection
        losses = []
        for b, pieces in enumerate(self.pieces):
            features = []
            for i, (lo, hi) in enumerate(pieces):
                with self._autocast():
                    x = self.store.get(("input", b, i))
                    features.append(adapter.embed_from(model, x, self.layer, self._piece_shape(b, lo, hi), project))
            losses.append(self._loss(torch.cat(features), self.contexts[b]))
        return float(torch.stack(losses).mean())

    @torch.no_grad()
    def full_loss(self) -> float:
        """The criterion of the model as it is now, every block run."""
        losses = []
        for b, pieces in self._each_batch():
            features = torch.cat([self._embed(images) for _, images in pieces])
            losses.append(self._loss(features, self.contexts[b]))
        return float(torch.stack(losses).mean())

    def close(self) -> None:
        self.store.close()


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
    chunk_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    spill_dir: str | Path | None = None,
) -> SearchResult:
    """AMP's adaptive widths; prunes ``backbone.model`` in place and returns what it found.

    For each layer from last to first, units ranked by ``scores``, a bisection of ``steps`` probes looks for
    the smallest width whose loss passes the ``rule`` against the ``reference`` loss:

    * rule ``increase`` (the paper): loss − reference ≤ threshold; ``absolute``: |loss − reference| ≤ threshold;
    * reference ``previous`` (the paper): the loss of the model as pruned so far, so the budget is per layer
      and compounds; ``dense``: the unpruned model's loss, a global budget.

    ``batches`` is the validation set as a sequence of (images, targets) (:func:`materialise`), so every probe sees
    the same batches; each batch is one batch of the criterion (the paper's global batch), run through the model
    ``chunk_size`` images at a time (same losses to fp32 rounding, the memory of one chunk). ``autocast_dtype``
    (e.g. ``torch.bfloat16``) runs the model's forward passes under autocast; the criterion stays in fp32.

    ``compensation`` (``bias``/``lstsq``, :mod:`amp.recovery`) corrects fc_out for the removed units in every probe and
    in the result, from calibration statistics of the dense model on ``batches`` (summed over ranks under torchrun).

    Memory (``cache=True``): the search keeps the inputs of the block being searched (read by every probe) and a stash
    of dense block inputs every few blocks (read once per layer); ``cache_gb`` bounds them: on a GPU, ``cache_gb`` of
    GPU memory and ``cache_gb`` of host memory less the validation images held there; on a CPU, ``cache_gb`` of
    memory in all, the validation images included. Beyond it the current block's inputs go to files in a temporary
    directory under ``spill_dir`` (removed at the end) and the stash thins out: a block's inputs are recomputed from
    the nearest stashed block below, or from the images (at most ~1/steps more compute, and no disk traffic). The
    validation images stay on the host and go to the device one chunk at a time. None of this changes a loss.

    With ``state_path`` each finished layer is written atomically; ``resume=True`` continues from it to the same
    widths.
    """
    check_option("threshold", threshold, 0)
    if rule not in RULES or reference not in REFERENCES:
        raise ValueError(f"rule must be one of {RULES} and reference one of {REFERENCES}")
    check_option("steps", steps, 1, integer=True)
    check_option("cache_gb", cache_gb, 0, low_open=True)
    check_option("chunk_size", chunk_size, 1, integer=True, optional=True)
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
        "images": sum(batch_sizes(batches)),
        "data": data_fingerprint(batches),
    }
    if autocast_dtype is not None:  # other losses: a resumed search must use the same precision
        config["autocast"] = str(autocast_dtype).replace("torch.", "")
    backbone.model.eval()
    evaluator = _Evaluator(backbone, batches, criterion, device, cache, cache_gb, chunk_size, autocast_dtype, spill_dir)
    try:
        stats = _calibrate(backbone, batches, compensation, device, chunk_size)

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
        final = evaluator.full_loss()
        config["memory"] = _memory_report(evaluator)
    finally:
        evaluator.close()
    widths = [s.hidden for s in sites]
    return SearchResult(
        widths,
        [int(original_width) for original_width in scores.widths],
        evaluator.dense_loss,
        final,
        [Probe(**p) for p in state["probes"]],
        config,
    )


def _memory_report(evaluator: _Evaluator) -> dict[str, Any]:
    """Where the search kept its caches (peak GB per tier) and its stash stride: information for the user."""
    peak = {tier: round(evaluator.store.peak[tier] / GIB, 6) for tier in TIERS}
    return {"peak_gb": peak, "stride": evaluator.stride, "device": evaluator.device.type}


def _validation_batches(batches: Sequence[tuple[torch.Tensor, Any]], criterion: Criterion) -> Sequence:
    """The validation batches, less any too small for the criterion (not under torchrun), as a sequence that reads
    no spilled batch back."""
    if not isinstance(batches, Sequence):
        batches = list(batches)
    if not len(batches):
        raise ValueError("the validation data set yielded no batches")
    if distributed.world_size() > 1:
        return batches
    sizes = batch_sizes(batches)
    indexed = ((torch.empty(n, 0), i) for i, n in enumerate(sizes))  # usable_batches needs only len(images)
    keep = [i for _, i in usable_batches(indexed, criterion, "the validation data")]
    if len(keep) == len(batches):
        return batches
    return [batches[i] for i in keep] if isinstance(batches, list) else Selected(batches, keep)


def _calibrate(backbone, batches, compensation: str, device, chunk_size: int | None = None) -> dict:
    """Hidden-unit statistics of the dense model, which compensation needs (none for ``compensation='none'``); under
    torchrun summed over ranks, so every rank compensates alike."""
    if compensation == "none":
        return {}
    return calibration_stats(backbone, batches, device=device, second=compensation == "lstsq", chunk_size=chunk_size)


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
    loader: Iterable,
    max_images: int | None = None,
    progress: bool = True,
    memory_gb: float | None = None,
    spill_dir: str | Path | None = None,
) -> Sequence[tuple[torch.Tensor, Any]]:
    """The validation batches, read once, so every probe sees the same images in the same batches.

    Read once, not streamed: the search runs the same images once per probe (``steps`` per MLP, i.e. hundreds of
    passes for a ViT-g), so streaming would decode every JPEG hundreds of times, and the probes must see bit-identical
    batches. Reading stops at the batch that reaches ``max_images``. The batches are kept in memory up to
    ``memory_gb`` (None: no bound, a plain list); beyond it each further batch goes to a file in a temporary directory
    under ``spill_dir`` and is read back when used (a :class:`SpilledBatches`, whose files are removed when it is
    closed or garbage-collected).
    """
    check_option("max_images", max_images, 1, integer=True, optional=True)
    check_option("memory_gb", memory_gb, 0, optional=True)
    batches, seen = SpilledBatches(memory_gb, spill_dir), 0
    size = _length(loader) if distributed.world_size() == 1 else None  # a rank reads only its slice of the data set
    total = min(size, max_images) if size is not None and max_images is not None else size or max_images
    bar = tqdm(total=total, desc="validation images", unit="img", disable=not progress or distributed.rank() != 0)
    with bar:
        for images, targets in loader:
            batches.append(images, targets)
            seen += len(images)
            bar.update(len(images))
            if max_images is not None and seen >= max_images:  # stop before decoding another batch
                break
    if not len(batches):
        raise ValueError("the validation data set yielded no images")
    if not batches.spilled:
        logger.info(
            "validation set in memory: %d images in %d batches, %.1f MB",
            seen,
            len(batches),
            batches.in_memory_bytes / 2**20,
        )
        return [batches[i] for i in range(len(batches))]
    logger.info(
        "validation set: %d images in %d batches, %.1f MB in memory, %.1f MB in %d files under %s",
        seen,
        len(batches),
        batches.in_memory_bytes / 2**20,
        batches.on_disk_bytes / 2**20,
        batches.spilled,
        batches.spill.path,
    )
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
    chunk_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> SearchResult:
    """Prune to preset ``widths`` (uniform/global baselines), measuring the loss before and after like the search."""
    check_option("chunk_size", chunk_size, 1, integer=True, optional=True)
    device = torch.device(device or next(backbone.model.parameters()).device)
    check_scores_for(scores, backbone)
    batches = _validation_batches(batches, criterion)
    evaluator = _Evaluator(
        backbone, batches, criterion, device, cache=False, chunk_size=chunk_size, autocast_dtype=autocast_dtype
    )
    stats = _calibrate(backbone, batches, compensation, device, chunk_size)
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
    return SearchResult(list(widths), scores.widths, evaluator.dense_loss, evaluator.full_loss(), [], config)
