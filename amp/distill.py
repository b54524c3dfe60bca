"""Distillation of a pruned vision tower from its dense original (the paper's recovery, METHOD.md §5).

:func:`distill` trains the student's vision tower to reproduce the teacher's, with the settings of a
:class:`DistillConfig` (the command line is ``amp distill``, in :mod:`amp.cli`, which joins torchrun's process
group with :func:`amp.distributed.init_from_env`):

* ``mse_tokens`` (the paper's, default): MSE on the pre-final-norm CLS token plus MSE on the patch tokens of the
  last block (its output, captured with a forward hook on ``adapter.blocks(tower)[-1]``), each averaged over
  elements. Prefix tokens other than the CLS (registers) are left out.
* ``cosine``: 1 − cosine similarity of the pooled, pre-projection embeddings.
* ``similarity_kl``: symmetric KL between the within-batch similarity softmaxes (``temp_inv`` × cosine) of student
  and teacher (the paper's unused ``entropy`` loss). It depends on the batch composition, so under DDP it is computed
  per rank on the local batch and does not match a single-process run.

The final norm and the projection (open_clip ``ln_post``/``proj``, timm ``norm``/``fc_norm``/``head``) are copied from
the teacher and frozen unless ``train_head=True``; the built-in losses read pre-projection features, so with
``train_head`` the final norm trains under ``cosine``/``similarity_kl`` and the projection never receives a gradient.
Only the vision tower is trained (a CLIP's text tower is frozen).

Optimiser: AdamW (betas 0.9/0.95), no weight decay on 1-D parameters (norms, biases), position embeddings or class
tokens; linear warmup from 0 then cosine to ``min_lr``; gradient clipping; bf16 autocast on CUDA, fp32 on CPU.
Data: a seeded order (``DistributedSampler``, epoch ``e`` shuffled with ``seed + e``), global batches of
``batch_size``, incomplete batches dropped. Under ``torchrun`` (``torch.distributed`` initialised) the tower is wrapped
in ``DistributedDataParallel`` (``sharding="ddp"``) or trained as an FSDP2 copy sharded per block (``"fsdp"``, for
students whose weights, gradients and AdamW states do not fit one GPU; the teacher is replicated, frozen), and every
rank takes its share of the same global batch, so the global batches (and, for the batch-separable losses, the updates
up to float rounding) are the single-process ones.

Checkpoints (``checkpoint_dir/checkpoint.pt``, written atomically by rank 0; under FSDP the full, gathered states)
hold the tower, optimiser, scheduler, every rank's RNG states, the step and the data position; ``resume=True``
continues bit for bit (with ``num_workers=0``; worker processes reseed from the loader's generator and do not carry
augmentation RNG state).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import os
import pickle
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms as T
from tqdm.auto import tqdm

from amp import distributed
from amp.criteria import check_finite, similarity_logits
from amp.data import collate
from amp.io import atomic_write

LOSSES = ("mse_tokens", "cosine", "similarity_kl")
SHARDINGS = ("ddp", "fsdp")
NO_DECAY_NAMES = ("pos_embed", "positional_embedding", "cls_token", "class_embedding", "reg_token", "register_tokens")
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


@dataclass
class DistillConfig:
    """The settings of one distillation run; :func:`distill` takes one, or its fields as keywords."""

    steps: int  # optimiser steps
    batch_size: int | None = None  # the *global* batch (all processes); default: a DataLoader's own
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup: int | None = None  # steps of linear warmup; default 5% of steps
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    loss: str = "mse_tokens"
    temp_inv: float = 15.0  # inverse temperature of similarity_kl
    train_head: bool = False
    grad_clip: float | None = 1.0
    seed: int = 0
    sharding: str = "ddp"  # under torchrun: replicate the student (ddp) or shard it (fsdp)
    # where and how it runs: not part of what a checkpoint must match
    checkpoint_dir: str | Path | None = None
    checkpoint_every: int = 0  # 0: only at the end
    resume: bool = False
    device: str | torch.device | None = None
    num_workers: int = 0
    progress: bool = True
    on_step: Callable[[int, float], None] | None = None  # called with (step, loss) after every step

    def check(self) -> None:
        """Refuse settings that cannot run, before any model moves."""
        if self.sharding not in SHARDINGS:
            raise ValueError(f"unknown sharding {self.sharding!r}; choose one of {SHARDINGS}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown distillation loss {self.loss!r}; choose one of {LOSSES}")
        if self.steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {self.steps}")
        if self.train_head and self.loss == "mse_tokens":
            raise ValueError("train_head has no effect with the mse_tokens loss (it reads the last block's tokens)")


@dataclass
class _Plan:
    """What a run derives from its config, its data and the process group."""

    dataset: Dataset
    batch_size: int
    local_batch: int
    batches_per_epoch: int
    warmup: int
    device: torch.device
    world: int
    rank: int
    fsdp: bool
    settings: dict[str, Any]  # what a checkpoint must have been written with to be resumed


def _plan(config: DistillConfig, data: Dataset | DataLoader) -> _Plan:
    """Check the config against the data and the process group, and derive what the run needs."""
    config.check()
    dataset, batch_size = _dataset_and_batch(data, config.batch_size)
    world, rank = distributed.world_size(), distributed.rank()
    if batch_size < world or batch_size % world:
        raise ValueError(f"the global batch {batch_size} must be a multiple of the {world} processes")
    batches_per_epoch = len(dataset) // batch_size
    if batches_per_epoch == 0:
        raise ValueError(f"the data set has {len(dataset)} images, fewer than one batch of {batch_size}")
    warmup = max(1, round(0.05 * config.steps)) if config.warmup is None else int(config.warmup)
    device = torch.device(config.device) if config.device is not None else default_device(world)
    settings = {
        "steps": config.steps,
        "batch_size": batch_size,
        "lr": config.lr,
        "min_lr": config.min_lr,
        "warmup": warmup,
        "weight_decay": config.weight_decay,
        "betas": list(config.betas),
        "loss": config.loss,
        "temp_inv": config.temp_inv,
        "train_head": config.train_head,
        "grad_clip": config.grad_clip,
        "seed": config.seed,
        "images_in_data": len(dataset),
        "sharding": config.sharding if world > 1 else "none",
    }
    fsdp = config.sharding == "fsdp" and world > 1
    return _Plan(
        dataset, batch_size, batch_size // world, batches_per_epoch, warmup, device, world, rank, fsdp, settings
    )


def _dataset_and_batch(data: Dataset | DataLoader, batch_size: int | None) -> tuple[Dataset, int]:
    if isinstance(data, DataLoader):
        return data.dataset, batch_size or data.batch_size
    if isinstance(data, Dataset):
        if batch_size is None:
            raise ValueError("distill() needs batch_size when given a Dataset")
        return data, batch_size
    raise TypeError(f"distill() takes a Dataset or a DataLoader, got {type(data).__name__}")


def default_device(world: int) -> torch.device:
    """The GPU of this process (``LOCAL_RANK`` under torchrun) if there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if world > 1 else torch.cuda.current_device())
    return torch.device("cpu")


# --- what the loss compares -----------------------------------------------------------------------------


class _Tower(nn.Module):
    """A vision tower whose forward returns what the loss compares (last-block tokens or pooled embedding)."""

    def __init__(self, tower: nn.Module, adapter, loss: str, batch_first: bool):
        super().__init__()
        self.tower, self.adapter, self.loss, self.batch_first = tower, adapter, loss, batch_first

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.loss != "mse_tokens":
            return self.adapter.embed(self.tower, images, project=False)
        captured: list[torch.Tensor] = []

        def grab(_module, _args, output):
            captured.append(output[0] if isinstance(output, (tuple, list)) else output)

        handle = self.adapter.blocks(self.tower)[-1].register_forward_hook(grab)
        try:
            self.adapter.embed(self.tower, images, project=False)
        finally:
            handle.remove()
        tokens = captured[-1]
        return tokens if self.batch_first else tokens.transpose(0, 1)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, loss: str, prefix: int = 1, temp_inv: float = 15.0):
    """The distillation loss between student and teacher outputs of :class:`_Tower` (fp32)."""
    s, t = student.float(), teacher.float()
    if loss == "mse_tokens":
        if prefix == 0:
            return F.mse_loss(s, t)
        return F.mse_loss(s[:, 0], t[:, 0]) + F.mse_loss(s[:, prefix:], t[:, prefix:])
    if loss == "cosine":
        return 1 - F.cosine_similarity(s, t, dim=-1).mean()
    if loss == "similarity_kl":
        log_p = F.log_softmax(similarity_logits(t, temp_inv), dim=1)
        log_q = F.log_softmax(similarity_logits(s, temp_inv), dim=1)
        kl_pq = (log_p.exp() * (log_p - log_q)).sum(1).mean()
        kl_qp = (log_q.exp() * (log_q - log_p)).sum(1).mean()
        return 0.5 * (kl_pq + kl_qp)
    raise ValueError(f"unknown distillation loss {loss!r}; choose one of {LOSSES}")


# --- the student --------------------------------------------------------------------------------------


def prepare_student(student, teacher, train_head: bool = False) -> None:
    """Make only the student's vision tower trainable, its final norm and projection copied from the teacher and
    frozen (unless ``train_head``); the teacher is frozen."""
    student.model.requires_grad_(False)
    teacher.model.eval().requires_grad_(False)
    heads = set(student.adapter.head_parameter_names(student.model))
    if not train_head:
        teacher_params = dict(teacher.vision.named_parameters())
        with torch.no_grad():
            for name, p in student.vision.named_parameters():
                if name in heads and name in teacher_params and teacher_params[name].shape == p.shape:
                    p.copy_(teacher_params[name])
    for name, p in student.vision.named_parameters():
        p.requires_grad_(train_head or name not in heads)


@contextlib.contextmanager
def _flags_restored(*backbones) -> Iterator[None]:
    """However the run ends: every ``requires_grad`` flag as it was, the first backbone (the student) in eval mode."""
    saved = [{name: p.requires_grad for name, p in b.model.named_parameters()} for b in backbones]
    try:
        yield
    finally:
        backbones[0].model.eval()
        for backbone, flags in zip(backbones, saved):
            for name, p in backbone.model.named_parameters():
                p.requires_grad_(flags.get(name, p.requires_grad))


@dataclass
class _Networks:
    """The student's tower as trained (itself, or a sharded copy under FSDP) and the modules that run it."""

    tower: nn.Module  # the student's own vision tower, which ends with the trained weights
    trained: nn.Module  # what the optimiser updates: ``tower``, or its FSDP-sharded copy
    student: _Tower  # ``trained`` returning what the loss compares
    teacher: _Tower
    model: nn.Module  # what the step calls: ``student``, wrapped in DistributedDataParallel under DDP
    prefix: int  # prefix tokens (class token, registers) of the student's blocks


def _networks(student, teacher, config: DistillConfig, plan: _Plan, state: dict | None) -> _Networks:
    """Put the models on the device, prepare the student (resumed weights if any) and wrap it for DDP or FSDP."""
    if not plan.fsdp:  # under FSDP the student stays where it is; only its shards move to the device
        student.model.to(plan.device)
    teacher.model.to(plan.device)
    prepare_student(student, teacher, config.train_head)
    tower = student.vision
    if state is not None:
        tower.load_state_dict(state["model"])
    trained = copy.deepcopy(tower) if plan.fsdp else tower
    adapter = student.adapter
    student_net = _Tower(trained, adapter, config.loss, adapter.tokens_batch_first(student.model))
    teacher_net = _Tower(
        teacher.vision, teacher.adapter, config.loss, teacher.adapter.tokens_batch_first(teacher.model)
    )
    if plan.fsdp:
        _fully_shard(student_net, plan.device, plan.world)
    model: nn.Module = student_net
    if plan.world > 1 and not plan.fsdp:
        ids = [plan.device.index] if plan.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(
            student_net, device_ids=ids, find_unused_parameters=config.train_head
        )
    return _Networks(tower, trained, student_net, teacher_net, model, adapter.prefix_tokens(student.model))


def _fully_shard(net: _Tower, device: torch.device, world: int) -> None:
    """Shard ``net`` in place with FSDP2: one unit per block, the rest (embeddings, head) in the root unit.

    The root is the :class:`_Tower` wrapper, whose ``__call__`` is what runs: the adapters embed through functions
    other than the tower's own ``forward``, which would bypass hooks on the tower. ``fully_shard`` moves only this
    rank's shards to ``device``, so no GPU ever holds the whole student with its gradients and optimiser states.
    """
    # FSDP2 (torch ≥ 2.6, and a build with torch.distributed) is needed only for sharded runs under torchrun
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for block in net.adapter.blocks(net.tower):
        fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)


def _copy_back(sharded: nn.Module, tower: nn.Module) -> None:
    """Gather the trained shards, one tensor at a time, into the plain ``tower`` on every rank."""
    from torch.distributed.tensor import DTensor  # FSDP only, as above

    states = dict(itertools.chain(sharded.named_parameters(), sharded.named_buffers()))
    with torch.no_grad():
        for name, target in itertools.chain(tower.named_parameters(), tower.named_buffers()):
            value = states[name]
            value = value.full_tensor() if isinstance(value, DTensor) else value
            target.copy_(value.to(target.device))


# --- optimiser and schedule ----------------------------------------------------------------------------


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the base lr for optimiser step ``step`` (0-based): linear warmup, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(tower: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on 1-D parameters (norms, biases), position embeddings or class tokens."""
    decay, no_decay = [], []
    for name, p in tower.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(key in name for key in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _optimizer(trained: nn.Module, config: DistillConfig, warmup: int):
    """AdamW with the warmup-then-cosine schedule of :func:`lr_factor`."""
    optimizer = torch.optim.AdamW(
        _param_groups(trained, config.weight_decay), lr=config.lr, betas=config.betas, eps=1e-8
    )
    min_ratio = config.min_lr / config.lr if config.lr > 0 else 0.0
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config.steps, warmup, min_ratio))
    return optimizer, schedule


# --- data order ---------------------------------------------------------------------------------------


class SeededOrder(DistributedSampler):
    """``DistributedSampler`` (shuffled with ``seed + epoch``, drop_last) that can start ``start`` samples in."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, start: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return max(0, super().__len__() - self.start)


@dataclass
class _Progress:
    """Where the run is: optimiser steps done, the epoch and the batch within it, the per-step log."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def advance(self, loss: float, lr: float, batches_per_epoch: int) -> None:
        self.step, self.position = self.step + 1, self.position + 1
        if self.position == batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        self.history.append({"step": self.step, "loss": loss, "lr": lr})


def _epoch_batches(plan: _Plan, config: DistillConfig, progress: _Progress) -> DataLoader:
    """This rank's batches of the rest of the current epoch, in the seeded order."""
    sampler = SeededOrder(plan.dataset, plan.world, plan.rank, config.seed, start=progress.position * plan.local_batch)
    sampler.set_epoch(progress.epoch)
    return DataLoader(
        plan.dataset,
        batch_size=plan.local_batch,
        sampler=sampler,
        drop_last=True,
        num_workers=config.num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(config.seed * 100_003 + progress.epoch * 1_009 + progress.position),
        pin_memory=plan.device.type == "cuda",
    )


# --- RNG and checkpoints ------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A distillation checkpoint (tower, optimiser, scheduler, RNG states, step, data position, settings)."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:  # truncated, or not a torch file
        raise ValueError(
            f"{path}: not a readable distillation checkpoint ({err}); remove it or drop --resume"
        ) from None
    if not isinstance(state, dict) or "settings" not in state:
        raise ValueError(f"{path}: not a distillation checkpoint of amp; remove it or drop --resume")
    return state


def _resumable_state(path: Path | None, resume: bool, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint to continue from, if asked for and there; refused when written with other settings."""
    if not resume or path is None or not path.is_file():
        return None
    state = load_checkpoint(path)
    if state["settings"] != settings:
        raise ValueError(
            f"{path} was written with other settings:\n  saved: {state['settings']}\n  now:   {settings}\n"
            "remove it or drop --resume"
        )
    return state


def _restore(state: dict[str, Any], nets: _Networks, optimizer, schedule, plan: _Plan) -> _Progress:
    """Optimiser, schedule and RNG states of a checkpoint (the tower's weights are loaded before wrapping)."""
    if plan.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict  # FSDP only

        set_optimizer_state_dict(
            nets.student, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
        )
    else:
        optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["scheduler"])
    if len(state["rng"]) == plan.world:
        _set_rng_state(state["rng"][plan.rank])
    epoch, position = state["position"]
    return _Progress(state["step"], epoch, position, list(state["history"]))


def _full_state(net: _Tower, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) tower and optimiser state dicts of a sharded :class:`_Tower`, on rank 0's CPU (collective).

    The tower's keys are those of ``tower.state_dict()``, as in an unsharded checkpoint.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model = {name.removeprefix("tower."): value for name, value in get_model_state_dict(net, options=options).items()}
    return model, get_optimizer_state_dict(net, optimizer, options=options)


def _save_checkpoint(path: Path, nets: _Networks, optimizer, schedule, progress: _Progress, plan: _Plan) -> None:
    """Write the checkpoint atomically from rank 0 (every rank takes part: RNG states and FSDP shards are gathered)."""
    rng = distributed.gather_objects([_rng_state()])
    if plan.fsdp:
        model_state, optimizer_state = _full_state(nets.student, optimizer)
    else:
        model_state, optimizer_state = nets.tower.state_dict(), optimizer.state_dict()
    if plan.rank == 0:
        state = {
            "format": CHECKPOINT_FORMAT,
            "settings": plan.settings,
            "step": progress.step,
            "position": [progress.epoch, progress.position],
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": schedule.state_dict(),
            "rng": rng,
            "history": progress.history,
            "world_size": plan.world,
        }
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    if plan.world > 1:
        torch.distributed.barrier()


# --- the loop ---------------------------------------------------------------------------------------


def _config(steps: int | None, config: DistillConfig | None, overrides: dict[str, Any]) -> DistillConfig:
    if steps is not None:
        overrides = {**overrides, "steps": steps}
    if config is None:
        if "steps" not in overrides:
            raise TypeError("distill() needs steps (or a DistillConfig)")
        return DistillConfig(**overrides)
    return dataclasses.replace(config, **overrides)


def distill(
    student,
    teacher,
    data: Dataset | DataLoader,
    steps: int | None = None,
    config: DistillConfig | None = None,
    **overrides,
) -> dict[str, Any]:
    """Distil ``teacher``'s vision tower into ``student``'s (both :class:`amp.models.Backbone`), in place.

    Settings come from ``config`` (a :class:`DistillConfig`) and/or keywords naming its fields (``steps`` may be
    given positionally). ``data`` is a Dataset (with ``batch_size``, the *global* batch) or a DataLoader (its
    dataset and batch size are used; the order is always the seeded one). With ``checkpoint_dir`` a checkpoint is
    written every ``checkpoint_every`` steps (and at the end); ``resume=True`` continues from it. Returns
    ``history`` (per step: loss, lr), ``wall_time_s``, ``images_per_s``, ``images`` and the settings. The student
    ends in eval mode with its ``requires_grad`` flags restored.

    Under ``torchrun``, ``sharding="ddp"`` replicates the student on every process; ``"fsdp"`` trains a fully sharded
    copy (FSDP2, one unit per block) whose parameters, gradients and optimiser states are split across the processes,
    and writes the trained weights back into ``student`` at the end. With ``fsdp`` leave the student on the CPU: it
    stays there, only the shards move to ``device``. Single-process runs ignore ``sharding``.
    """
    config = _config(steps, config, overrides)
    plan = _plan(config, data)
    path = Path(config.checkpoint_dir) / CHECKPOINT_FILE if config.checkpoint_dir is not None else None
    state = _resumable_state(path, config.resume, plan.settings)
    with _flags_restored(student, teacher):
        nets = _networks(student, teacher, config, plan, state)
        optimizer, schedule = _optimizer(nets.trained, config, plan.warmup)
        _seed_everything(config.seed + plan.rank)
        progress = _restore(state, nets, optimizer, schedule, plan) if state is not None else _Progress()
        resumed_from = progress.step
        trainable = [p for group in optimizer.param_groups for p in group["params"]]
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if plan.device.type == "cuda" else contextlib.nullcontext()
        )
        show = config.progress and plan.rank == 0
        bar = tqdm(
            total=config.steps, initial=progress.step, desc=f"distill ({config.loss})", unit="step", disable=not show
        )
        nets.student.train()
        start_time, images_seen = time.perf_counter(), 0
        try:
            while progress.step < config.steps:
                for images, _ in _epoch_batches(plan, config, progress):
                    images = images.to(plan.device, non_blocking=True)
                    with autocast:
                        with torch.no_grad():
                            target = nets.teacher(images)
                        value = distill_loss(nets.model(images), target, config.loss, nets.prefix, config.temp_inv)
                    logged = float(
                        check_finite(_mean_over_ranks(value, plan.world), f"distillation step {progress.step}")
                    )
                    optimizer.zero_grad(set_to_none=True)
                    value.backward()
                    if config.grad_clip:
                        torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
                    lr = optimizer.param_groups[0]["lr"]
                    optimizer.step()
                    schedule.step()
                    progress.advance(logged, lr, plan.batches_per_epoch)
                    images_seen += plan.batch_size
                    bar.update(1)
                    elapsed = time.perf_counter() - start_time
                    bar.set_postfix(loss=f"{logged:.4g}", img_s=f"{images_seen / max(elapsed, 1e-9):.1f}")
                    if path is not None and config.checkpoint_every and progress.step % config.checkpoint_every == 0:
                        _save_checkpoint(path, nets, optimizer, schedule, progress, plan)
                    if config.on_step is not None:
                        config.on_step(progress.step, logged)
                    if progress.step >= config.steps or progress.position == 0:
                        break  # done, or the epoch is over (a new sampler starts the next one)
            if path is not None and (not config.checkpoint_every or progress.step % config.checkpoint_every):
                _save_checkpoint(path, nets, optimizer, schedule, progress, plan)
            if plan.fsdp:
                _copy_back(nets.trained, nets.tower)
        finally:
            bar.close()
    wall = time.perf_counter() - start_time
    history = progress.history
    return {
        "history": history,
        "final_loss": history[-1]["loss"] if history else None,
        "steps": config.steps,
        "resumed_from": resumed_from,
        "images": images_seen,
        "wall_time_s": wall,
        "images_per_s": images_seen / wall if wall > 0 else 0.0,
        "world_size": plan.world,
        "device": str(plan.device),
        "settings": plan.settings,
    }


def _mean_over_ranks(loss: torch.Tensor, world: int) -> torch.Tensor:
    """The loss averaged over the processes (each computed it on its share of the global batch), for the log."""
    logged = loss.detach().clone()
    if world > 1:
        logged = distributed.all_reduce_sum(logged) / world
    return logged


# --- augmentation -------------------------------------------------------------------------------------


def train_transform(backbone, scale: tuple[float, float] = (0.2, 1.0)) -> Callable:
    """The paper's CLIP augmentation: RandomResizedCrop (bicubic) + horizontal flip, with the model's normalisation."""
    size = tuple(backbone.adapter.input_size(backbone.model)[1:])
    steps = getattr(backbone.preprocess, "transforms", [])
    normalize = next((t for t in steps if isinstance(t, T.Normalize)), None)
    ops = [
        T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.Lambda(lambda image: image.convert("RGB") if hasattr(image, "convert") else image),
        T.ToTensor(),
    ]
    return T.Compose(ops + ([normalize] if normalize is not None else []))
