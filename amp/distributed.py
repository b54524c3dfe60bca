"""Several processes, one global batch: criteria and scores that do not depend on the process count.

The paper's entropy is computed over the *global* batch (world size × per-GPU batch), so its value, its
gradient and the thresholds tuned on it change with the number of GPUs (METHOD.md §7, flaw 2). Here the
global batch is the unit: :func:`sharded` gives every rank its slice of each global batch, in an order
fixed by a seed and independent of the world size; :class:`GlobalCriterion` evaluates a criterion on the
gathered global features, and each rank back-propagates only the part of the loss that belongs to its own
rows, so that

    Σ_r loss_r = criterion(global batch)      and      ∂(Σ_r loss_r)/∂f_r = ∂criterion(global batch)/∂f_r,

the gradient reaching every image exactly once. Per-unit score sums and image counts are then summed over
ranks (:func:`all_reduce_sum`; :func:`amp.scoring.taylor_scores` does so under torchrun). Without ``torchrun``
(no process group) everything here is the identity.

What loss_r is belongs to the criterion (:meth:`amp.criteria.Criterion.rank_share`): the built-in criteria,
means of per-row terms, sum the terms of this rank's rows against all columns; any other criterion is computed
whole on every rank and scaled by 1/world_size (the gather's backward sums the ranks' identical gradients, which
is again exact, at world_size times the, small, criterion cost). This module is only the generic machinery.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from amp.criteria import Criterion, GlobalRows
from amp.data import collate
from amp.data import num_workers as default_workers

__all__ = [
    "GlobalCriterion",
    "ShardedBatchSampler",
    "all_reduce_sum",
    "check_same_length",
    "gather_objects",
    "gather_with_grad",
    "global_loss",
    "init_from_env",
    "is_distributed",
    "rank",
    "sharded",
    "world_size",
]

# --- process group ------------------------------------------------------------------------------


def is_distributed() -> bool:
    """True inside an initialised process group (even of one process)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    ``backend`` defaults to ``nccl`` when CUDA is available (the process then uses GPU ``LOCAL_RANK``) and
    ``gloo`` otherwise. Without those variables nothing happens. Returns whether a process group is active.
    ``timeout_s`` bounds how long a collective waits for the other ranks (torch's default otherwise).
    """
    if is_distributed():
        return True
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ or not dist.is_available():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if timeout_s is None:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def _comm_device() -> torch.device:
    """Where collectives take their tensors: the current GPU for nccl, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks (a new tensor on ``tensor``'s device and dtype); itself if alone."""
    if not is_distributed() or world_size() == 1:
        return tensor
    total = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(tensor.device)


def _local_sizes(n: int, device: torch.device) -> list[int]:
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device))
    return [int(s) for s in sizes]


def _gather_rows(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """all_gather along dim 0 of tensors whose dim 0 may differ by rank (padded to the largest, then cut)."""
    device = _comm_device()
    longest = max(sizes)
    padded = torch.zeros(longest, *tensor.shape[1:], dtype=tensor.dtype, device=device)
    padded[: len(tensor)] = tensor.detach().to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]).to(tensor.device)


class _GatherWithGrad(torch.autograd.Function):
    """Forward: every rank's rows, concatenated in rank order. Backward: the reduce-scatter of the
    gradient (all-reduce SUM, then this rank's rows), so rows used on several ranks get all their terms."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank()
        return _gather_rows(tensor, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = all_reduce_sum(grad.contiguous())
        start = sum(ctx.sizes[: ctx.rank])
        return total[start : start + ctx.sizes[ctx.rank]], None


def gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """All ranks' ``features`` concatenated along dim 0 (rank order), differentiable; identity when alone.

    Ranks may hold different numbers of rows. The backward pass sums every rank's gradient for a row and
    returns it to the rank that owns the row (what ``torch.distributed.nn.functional.all_gather`` does; that
    function is deprecated in torch 2.14 and needs equal sizes, hence this small autograd function).
    """
    if not is_distributed() or world_size() == 1:
        return features
    return _GatherWithGrad.apply(features, _local_sizes(len(features), _comm_device()))


def gather_objects(items: list[Any]) -> list[Any]:
    """All ranks' lists concatenated in rank order (captions, say); the list itself when alone."""
    if not is_distributed() or world_size() == 1:
        return list(items)
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, list(items))
    return [item for part in out for item in part]


def _gather_targets(targets: Any) -> Any:
    if targets is None or not is_distributed() or world_size() == 1:
        return targets
    if isinstance(targets, torch.Tensor):
        return _gather_rows(targets, _local_sizes(len(targets), _comm_device()))
    return gather_objects(list(targets))


# --- the global criterion -------------------------------------------------------------------------


class GlobalContext:
    """What a rank needs to evaluate its share of the global loss: the inner criterion's context for the
    global batch, and where this rank's rows sit in it."""

    def __init__(self, inner: Any, sizes: list[int], rank: int):
        self.inner, self.sizes = inner, sizes
        self.rows = GlobalRows(offset=sum(sizes[:rank]), count=sizes[rank], total=sum(sizes), world_size=len(sizes))


def global_context(criterion: Criterion, targets: Any, dense_features: torch.Tensor) -> GlobalContext:
    """The criterion's context for the global batch (dense features and targets gathered from all ranks)."""
    with torch.no_grad():
        sizes = _local_sizes(len(dense_features), _comm_device()) if world_size() > 1 else [len(dense_features)]
        gathered = _gather_rows(dense_features, sizes) if world_size() > 1 else dense_features
        inner = criterion.context(_gather_targets(targets), gathered)
    return GlobalContext(inner, sizes, rank())


def global_loss(criterion: Criterion, local_features: torch.Tensor, context: GlobalContext) -> torch.Tensor:
    """This rank's share loss_r of ``criterion`` on the global batch; Σ_r loss_r is the single-process loss.

    The returned tensor's *value* is the whole global loss (the same on every rank, so searches agree and
    progress bars make sense) while its *gradient* is that of loss_r: back-propagating it on every rank
    gives each image exactly the gradient of the global loss. Alone (no process group) it is simply
    ``criterion(local_features, context.inner)``.
    """
    if world_size() == 1:
        return criterion(local_features, context.inner)
    if len(local_features) != context.rows.count:
        raise ValueError(f"{len(local_features)} features for a context of {context.rows.count} rows")
    everyone = _GatherWithGrad.apply(local_features, context.sizes)
    share = criterion.rank_share(local_features, everyone, context.inner, context.rows)
    total = all_reduce_sum(share.detach())
    return share + (total - share.detach())


class GlobalCriterion(Criterion):
    """``criterion`` defined on the global batch of all ranks; a drop-in :class:`Criterion` for
    :func:`amp.scoring.taylor_scores` and :func:`amp.width_search.amp_search` (every rank must call it the same
    number of times, i.e. see the same number of batches: use :func:`sharded`)."""

    def __init__(self, criterion: Criterion):
        if isinstance(criterion, GlobalCriterion):  # wrapping twice would reduce twice
            criterion = criterion.criterion
        self.criterion = criterion
        self.name = criterion.name
        self.needs_projection = criterion.needs_projection
        self.scores_dense_model = criterion.scores_dense_model

    def context(self, targets: Any, dense_features: torch.Tensor) -> GlobalContext:
        return global_context(self.criterion, targets, dense_features)

    def __call__(self, features: torch.Tensor, context: GlobalContext) -> torch.Tensor:
        return global_loss(self.criterion, features, context)

    def describe(self) -> dict[str, Any]:
        return self.criterion.describe()  # the same settings whatever the world size


# --- scoring under torchrun -----------------------------------------------------------------------


def check_same_length(loader: Iterable) -> None:
    """Raise unless every rank's loader has the same number of batches (each batch runs collectives)."""
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return
    gathered = gather_objects([n])
    if len(set(gathered)) != 1:
        raise ValueError(
            f"ranks have different numbers of batches {gathered}: every rank must see "
            "every global batch; build the loader with amp.distributed.sharded(..., drop_last=True) or a data "
            "set whose last global batch has at least one image per rank"
        )


# --- data ---------------------------------------------------------------------------------------


class ShardedBatchSampler(Sampler[list[int]]):
    """Rank ``rank``'s slice of every global batch of ``batch_size`` indices.

    The global batches are those a single process with the same ``seed`` sees (a seeded permutation, or
    0..N-1 without ``shuffle``, cut into runs of ``batch_size``), whatever the world size; each is split
    into ``world_size`` contiguous slices in rank order (``torch.tensor_split``: sizes differ by at most one),
    so gathering the slices in rank order gives back the global batch. No sample is repeated and none is
    padded in. The last, incomplete global batch is split the same way (unevenly) unless ``drop_last``;
    when it has fewer images than ranks, some ranks get no slice of it, and :func:`check_same_length`
    refuses such a loader (every rank must take part in every batch's collectives).
    """

    def __init__(
        self,
        length: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.length, self.batch_size, self.seed, self.shuffle, self.drop_last = (
            length,
            batch_size,
            seed,
            shuffle,
            drop_last,
        )
        self.world_size = _world_size_arg(world_size)
        self.rank = _rank_arg(rank)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside [0, {self.world_size})")
        if batch_size < self.world_size:
            raise ValueError(f"a global batch of {batch_size} cannot give each of {self.world_size} ranks an image")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Another seeded order (``seed + epoch``), the same on every rank."""
        self.epoch = epoch

    def global_batches(self) -> list[torch.Tensor]:
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.length)
        batches = list(order.split(self.batch_size))
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            mine = torch.tensor_split(batch, self.world_size)[self.rank]
            if len(mine):
                yield mine.tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.length, self.batch_size)
        if self.drop_last or rest == 0:
            return full
        # tensor_split gives every rank a piece of the last batch when it has ≥ world_size images, else the first `rest`
        return full + (1 if rest >= self.world_size or self.rank < rest else 0)


def _world_size_arg(value: int | None) -> int:
    return world_size() if value is None else int(value)


def _rank_arg(value: int | None) -> int:
    return rank() if value is None else int(value)


def sharded(
    dataset: Dataset,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    num_workers: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> DataLoader:
    """A loader giving this rank its slice of each *global* batch of ``batch_size`` (see
    :class:`ShardedBatchSampler`): never a duplicated or padded sample, and the same global batches
    for any number of processes. ``rank``/``world_size`` default to the process group's, ``num_workers`` to
    :func:`amp.data.num_workers`."""
    sampler = ShardedBatchSampler(len(dataset), batch_size, seed, shuffle, drop_last, rank, world_size)  # type: ignore[arg-type]
    workers = default_workers() if num_workers is None else num_workers
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate)
