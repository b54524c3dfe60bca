"""Distillation of a pruned vision tower from its dense original (the paper's recovery, METHOD.md §5).

:func:`distill` trains the student's vision tower to reproduce the teacher's, with the settings of a
:class:`DistillConfig` (the command line is ``amp distill``, in :mod:`amp.cli`, which joins torchrun's process
group with :func:`amp.distributed.init_from_env`). ``DistillConfig.from_recipe(name)`` gives the paper's settings
for one of its models (:data:`RECIPES`).

* ``mse_tokens`` (the paper's, default): MSE on the pre-final-norm CLS token plus MSE on the patch tokens of the
  last block (its output, captured with a forward hook on ``adapter.blocks(tower)[-1]``), each averaged over
  elements. Prefix tokens other than the CLS (registers) are left out.
* ``cosine``: 1 − cosine similarity of the pooled, pre-projection embeddings.
* ``similarity_kl``: symmetric KL between the within-batch similarity softmaxes (``temp_inv`` × cosine) of student
  and teacher (the paper's unused ``entropy`` loss). It depends on the batch composition, so under DDP or gradient
  accumulation it is computed on each forward's images and does not match a single-forward run.

The final norm and the projection (open_clip ``ln_post``/``proj``, timm ``norm``/``fc_norm``/``head``) are copied from
the teacher and frozen unless ``train_head=True``; the built-in losses read pre-projection features, so with
``train_head`` the final norm trains under ``cosine``/``similarity_kl`` and the projection never receives a gradient.
Only the vision tower is trained (a CLIP's text tower is frozen).

Optimiser: AdamW (betas 0.9/0.95); weight decay constant, or on a cosine from ``weight_decay`` to
``weight_decay_end`` (the reference's 0.04 → 0.2); no decay on 1-D parameters (norms, biases), position embeddings or
class tokens unless ``decay_all`` (the reference decays everything); linear warmup from 0 then cosine to ``min_lr``;
optional gradient clipping. ``precision="bf16"``: bf16 autocast over fp32 weights, gradients, optimiser states, loss
and reductions. ``activation_checkpointing``: every block recomputes its forward in backward (same loss and
gradients, less memory). ``device_batch``: the images one forward takes; each process's share of the global batch is
accumulated over ``share / device_batch`` forwards, so the global batch and the update are those of one big batch on
any number of processes.

Data: a seeded order (``DistributedSampler``, epoch ``e`` shuffled with ``seed + e``), global batches of
``batch_size``, incomplete batches dropped; the length is ``steps`` or ``epochs`` (× batches per epoch). Under
``torchrun`` (``torch.distributed`` initialised) the tower is wrapped in ``DistributedDataParallel``
(``sharding="ddp"``) or trained as an FSDP2 copy sharded per block (``"fsdp"``, for students whose weights, gradients
and AdamW states do not fit one GPU; the teacher is replicated, frozen), and every rank takes its share of the same
global batch, so the global batches (and, for the batch-separable losses, the updates up to float rounding) are the
single-process ones.

Checkpoints hold the tower, optimiser, scheduler, every rank's RNG states, the step, the data position and the
settings (a resume with other settings is refused); ``resume=True`` continues bit for bit (with ``num_workers=0``;
worker processes reseed from the loader's generator and do not carry augmentation RNG state). Single process and DDP:
one file, ``checkpoint_dir/checkpoint.pt``, written atomically by rank 0. FSDP: a ``torch.distributed.checkpoint``
directory, ``checkpoint_dir/checkpoint.dcp`` (``model/`` and ``optimizer/`` written shard by shard by every rank, no
gather; ``state.pt`` the rest), which needs a file system all ranks share; :func:`export_checkpoint` turns it into a
plain state dict of the tower without a process group.
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
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms as T
from tqdm.auto import tqdm

from amp import distributed
from amp.criteria import check_finite, similarity_logits
from amp.data import collate
from amp.io import atomic_write

LOSSES = ("mse_tokens", "cosine", "similarity_kl")
SHARDINGS = ("ddp", "fsdp")
PRECISIONS = ("fp32", "bf16")
AUGMENTS = ("clip", "dino")
NO_DECAY_NAMES = ("pos_embed", "positional_embedding", "cls_token", "class_embedding", "reg_token", "register_tokens")
CHECKPOINT_FILE = "checkpoint.pt"  # single process and DDP
SHARDED_CHECKPOINT = "checkpoint.dcp"  # FSDP: a torch.distributed.checkpoint directory
SHARDED_STATE_FILE = "state.pt"  # in it: everything but the model and optimiser tensors
CHECKPOINT_FORMAT = 2


def _recipe(
    epochs: int, gpu_batch: int, base_lr: float, min_lr: float, augment: str = "clip", sharding: str = "ddp"
) -> dict[str, Any]:
    """One row of METHOD.md §5's table as DistillConfig fields: 8 GPUs × ``gpu_batch``, lr = base_lr × batch / 256."""
    batch = 8 * gpu_batch
    return {
        "epochs": epochs,
        "warmup_epochs": 1,
        "batch_size": batch,
        "device_batch": gpu_batch,  # the reference's per-GPU forward; fewer GPUs accumulate to the same batch
        "lr": base_lr * batch / 256,
        "min_lr": min_lr,
        "weight_decay": 0.04,
        "weight_decay_end": 0.2,
        "decay_all": True,
        "betas": (0.9, 0.95),
        "grad_clip": None,
        "precision": "bf16",
        "activation_checkpointing": True,
        "augment": augment,
        "sharding": sharding,
        "loss": "mse_tokens",
        "source": (
            f"METHOD.md §5: {epochs} epochs (1 warm-up), 8 GPUs × {gpu_batch} images, base lr {base_lr:g} × "
            f"{batch}/256 cosine to {min_lr:g}, weight decay cosine 0.04 → 0.2 on all parameters, {sharding.upper()}, "
            f"{augment} augmentation; bf16 autocast with fp32 weights here for the reference's pure-bf16 AdamW"
        ),
    }


# the paper's distillation per model (METHOD.md §5); DistillConfig.from_recipe(name, **overrides)
RECIPES: dict[str, dict[str, Any]] = {
    "ViT-g-14": _recipe(5, 64, 2e-5, 1e-7),
    "ViT-bigG-14": _recipe(20, 64, 2e-5, 1e-6),
    "EVA02-E-14-plus": _recipe(10, 64, 1e-5, 1e-6, sharding="fsdp"),
    "EVA-CLIP-8B": _recipe(10, 20, 1e-5, 1e-6, sharding="fsdp"),
    "dinov2-g": _recipe(30, 64, 7.5e-6, 1e-7, augment="dino"),
}


def augment_name(augment: bool | str | None) -> str | None:
    """``augment`` as a name of :data:`AUGMENTS` or None (``True`` is ``"clip"``, the earlier boolean's meaning)."""
    if augment is True:
        return "clip"
    if augment is False or augment is None:
        return None
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; choose one of {AUGMENTS} (or None)")
    return augment


def _lengths_replaced(overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` where a length given one way unsets the other: ``steps`` unsets ``epochs`` (and the reverse),
    ``warmup`` unsets ``warmup_epochs`` (and the reverse), unless both are given."""
    unset = {}
    for one, other in (("steps", "epochs"), ("warmup", "warmup_epochs")):
        for given, replaced in ((one, other), (other, one)):
            if given in overrides and replaced not in overrides:
                unset[replaced] = None
    return {**unset, **overrides}


@dataclass
class DistillConfig:
    """The settings of one distillation run; :func:`distill` takes one, or its fields as keywords.

    The length is ``steps`` or ``epochs`` (exactly one); the warmup ``warmup`` steps or ``warmup_epochs``.
    """

    steps: int | None = None  # optimiser steps (or give epochs)
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
    epochs: float | None = None  # the length in passes over the data: steps = epochs × batches per epoch
    warmup_epochs: float | None = None
    weight_decay_end: float | None = None  # cosine from weight_decay to this over the run; None: constant
    decay_all: bool = False  # decay norms, biases and embeddings too (the reference)
    device_batch: int | None = None  # images per process per forward; default: the whole share of the batch
    activation_checkpointing: bool = False
    precision: str = "fp32"  # or bf16: autocast over fp32 weights
    augment: str | None = None  # the training transform the data was built with (train_transform); recorded only
    # where and how it runs: not part of what a checkpoint must match
    checkpoint_dir: str | Path | None = None
    checkpoint_every: int = 0  # 0: only at the end
    resume: bool = False
    device: str | torch.device | None = None
    num_workers: int = 0
    progress: bool = True
    on_step: Callable[[int, float], None] | None = None  # called with (step, loss) after every step

    def __post_init__(self) -> None:
        self.augment = augment_name(self.augment)
        self.betas = tuple(self.betas)

    @classmethod
    def from_recipe(cls, name: str, **overrides: Any) -> DistillConfig:
        """The paper's settings for model ``name`` (a key of :data:`RECIPES`), with ``overrides`` on top.

        ``steps`` replaces the recipe's ``epochs`` and ``warmup`` its ``warmup_epochs`` (a short rehearsal, say); so
        they do in :func:`distill`'s keywords over a config.
        """
        if name not in RECIPES:
            raise ValueError(f"unknown distillation recipe {name!r}; choose one of {sorted(RECIPES)}")
        fields = {key: value for key, value in RECIPES[name].items() if key != "source"}
        return cls(**{**fields, **_lengths_replaced(overrides)})

    def check(self) -> None:
        """Refuse settings that cannot run, before any model moves."""
        if self.sharding not in SHARDINGS:
            raise ValueError(f"unknown sharding {self.sharding!r}; choose one of {SHARDINGS}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown distillation loss {self.loss!r}; choose one of {LOSSES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {PRECISIONS}")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"give exactly one of steps and epochs, got steps={self.steps}, epochs={self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.warmup is not None and self.warmup_epochs is not None:
            raise ValueError(f"give warmup or warmup_epochs, not both (got {self.warmup}, {self.warmup_epochs})")
        for name in ("warmup", "warmup_epochs", "weight_decay", "weight_decay_end"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be ≥ 0, got {value}")
        if self.device_batch is not None and self.device_batch < 1:
            raise ValueError(f"device_batch must be ≥ 1, got {self.device_batch}")
        if self.train_head and self.loss == "mse_tokens":
            raise ValueError("train_head has no effect with the mse_tokens loss (it reads the last block's tokens)")


@dataclass
class _Plan:
    """What a run derives from its config, its data and the process group."""

    dataset: Dataset
    batch_size: int
    local_batch: int  # this process's share of a global batch
    device_batch: int  # images per forward; local_batch / device_batch forwards accumulate into one step
    batches_per_epoch: int
    steps: int
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
    local_batch = batch_size // world
    device_batch = config.device_batch or local_batch
    if local_batch % device_batch:
        raise ValueError(
            f"device_batch {device_batch} must divide the {local_batch} images per process (the global batch "
            f"{batch_size} over {world} processes), so that accumulated forwards make up the global batch"
        )
    batches_per_epoch = len(dataset) // batch_size
    if batches_per_epoch == 0:
        raise ValueError(f"the data set has {len(dataset)} images, fewer than one batch of {batch_size}")
    steps = config.steps if config.steps is not None else max(1, round(config.epochs * batches_per_epoch))
    if config.warmup is not None:
        warmup = int(config.warmup)
    elif config.warmup_epochs is not None:
        warmup = round(config.warmup_epochs * batches_per_epoch)
    else:
        warmup = max(1, round(0.05 * steps))
    device = torch.device(config.device) if config.device is not None else default_device(world)
    settings = {
        "steps": steps,
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
        "epochs": config.epochs,
        "warmup_epochs": config.warmup_epochs,
        "weight_decay_end": config.weight_decay_end,
        "decay_all": config.decay_all,
        "device_batch": config.device_batch,
        "activation_checkpointing": config.activation_checkpointing,
        "precision": config.precision,
        "augment": config.augment,
    }
    fsdp = config.sharding == "fsdp" and world > 1
    return _Plan(
        dataset,
        batch_size,
        local_batch,
        device_batch,
        batches_per_epoch,
        steps,
        warmup,
        device,
        world,
        rank,
        fsdp,
        settings,
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
    """Put the models on the device, prepare the student (resumed weights if any) and wrap it for DDP or FSDP.

    Under FSDP a resumed run loads its sharded checkpoint after wrapping (:func:`_restore`), not here.
    """
    if not plan.fsdp:  # under FSDP the student stays where it is; only its shards move to the device
        student.model.to(plan.device)
    teacher.model.to(plan.device)
    prepare_student(student, teacher, config.train_head)
    tower = student.vision
    if state is not None and not plan.fsdp:
        tower.load_state_dict(state["model"])
    trained = copy.deepcopy(tower) if plan.fsdp else tower
    adapter = student.adapter
    student_net = _Tower(trained, adapter, config.loss, adapter.tokens_batch_first(student.model))
    teacher_net = _Tower(
        teacher.vision, teacher.adapter, config.loss, teacher.adapter.tokens_batch_first(teacher.model)
    )
    if plan.fsdp:
        _fully_shard(student_net, plan.device, plan.world, config.precision)
    model: nn.Module = student_net
    if plan.world > 1 and not plan.fsdp:
        ids = [plan.device.index] if plan.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(
            student_net, device_ids=ids, find_unused_parameters=config.train_head
        )
    return _Networks(tower, trained, student_net, teacher_net, model, adapter.prefix_tokens(student.model))


def _fully_shard(net: _Tower, device: torch.device, world: int, precision: str = "fp32") -> None:
    """Shard ``net`` in place with FSDP2: one unit per block, the rest (embeddings, head) in the root unit.

    The root is the :class:`_Tower` wrapper, whose ``__call__`` is what runs: the adapters embed through functions
    other than the tower's own ``forward``, which would bypass hooks on the tower. ``fully_shard`` moves only this
    rank's shards to ``device``, so no GPU ever holds the whole student with its gradients and optimiser states.
    Under bf16 the gathered weights are bf16 (half the traffic; autocast computes in bf16 anyway) while the shards,
    gradients and their reduce-scatter stay fp32.
    """
    # FSDP2 (torch ≥ 2.6, and a build with torch.distributed) is needed only for sharded runs under torchrun
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if precision == "bf16" else None, reduce_dtype=torch.float32
    )
    for block in net.adapter.blocks(net.tower):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(net, mesh=mesh, mp_policy=policy)


def _copy_back(sharded: nn.Module, tower: nn.Module) -> None:
    """Gather the trained shards, one tensor at a time, into the plain ``tower`` on every rank."""
    from torch.distributed.tensor import DTensor  # FSDP only, as above

    states = dict(itertools.chain(sharded.named_parameters(), sharded.named_buffers()))
    with torch.no_grad():
        for name, target in itertools.chain(tower.named_parameters(), tower.named_buffers()):
            value = states[name]
            value = value.full_tensor() if isinstance(value, DTensor) else value
            target.copy_(value.to(target.device))


@contextlib.contextmanager
def _recomputed_in_backward(blocks: Iterable[nn.Module], enabled: bool) -> Iterator[None]:
    """Activation checkpointing while the run lasts: each block's forward keeps only its input and is run again in
    backward (non-reentrant ``torch.utils.checkpoint``, RNG state replayed), so the gradients are those of the plain
    forward. The blocks' own ``forward`` is shadowed by an instance attribute and restored afterwards; hooks on the
    block (the loss's token capture, FSDP's gathers) stay outside the recomputed part."""
    blocks = list(blocks) if enabled else []
    shadowed = [vars(block).get("forward") for block in blocks]
    for block in blocks:

        def recomputed(*args, _forward=block.forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = recomputed
    try:
        yield
    finally:
        for block, previous in zip(blocks, shadowed):
            if previous is None:
                del block.forward
            else:
                block.forward = previous


# --- optimiser and schedule ----------------------------------------------------------------------------


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the base lr for optimiser step ``step`` (0-based): linear warmup, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def weight_decay_at(step: int, steps: int, start: float, end: float | None) -> float:
    """Weight decay of optimiser step ``step`` (0-based): a cosine from ``start`` at the first step to ``end`` at the
    last (the reference's 0.04 → 0.2, without warmup), or ``start`` throughout when ``end`` is None."""
    if end is None:
        return start
    progress = min(1.0, step / max(1, steps - 1))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def _param_groups(tower: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict[str, Any]]:
    """AdamW groups, the decayed one first: everything (``decay_all``), or all but 1-D parameters (norms, biases),
    position embeddings and class tokens."""
    decay, no_decay = [], []
    for name, p in tower.named_parameters():
        if not p.requires_grad:
            continue
        if not decay_all and (p.ndim < 2 or any(key in name for key in NO_DECAY_NAMES)):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    return groups if decay_all else [*groups, {"params": no_decay, "weight_decay": 0.0}]


def _optimizer(trained: nn.Module, config: DistillConfig, plan: _Plan):
    """AdamW with the warmup-then-cosine schedule of :func:`lr_factor` (weight decay is set per step)."""
    optimizer = torch.optim.AdamW(
        _param_groups(trained, config.weight_decay, config.decay_all), lr=config.lr, betas=config.betas, eps=1e-8
    )
    min_ratio = config.min_lr / config.lr if config.lr > 0 else 0.0
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, plan.steps, plan.warmup, min_ratio))
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

    def advance(self, loss: float, lr: float, weight_decay: float, batches_per_epoch: int) -> None:
        self.step, self.position = self.step + 1, self.position + 1
        if self.position == batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        self.history.append({"step": self.step, "loss": loss, "lr": lr, "weight_decay": weight_decay})


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


def checkpoint_path(checkpoint_dir: str | Path, sharded: bool) -> Path:
    """Where a run keeps its checkpoint: one file, or (``sharded``, FSDP) a torch.distributed.checkpoint directory."""
    return Path(checkpoint_dir) / (SHARDED_CHECKPOINT if sharded else CHECKPOINT_FILE)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A distillation checkpoint (tower, optimiser, scheduler, RNG states, step, data position, settings); of a
    sharded one (a ``checkpoint.dcp`` directory) all but the tower and optimiser, which stay sharded on disk."""
    path = Path(path)
    file = path / SHARDED_STATE_FILE if path.is_dir() else path
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, FileNotFoundError) as err:  # truncated, or not torch's
        raise ValueError(
            f"{path}: not a readable distillation checkpoint ({err}); remove it or drop --resume"
        ) from None
    if not isinstance(state, dict) or "settings" not in state:
        raise ValueError(f"{path}: not a distillation checkpoint of amp; remove it or drop --resume")
    return state


def export_checkpoint(checkpoint_dir: str | Path, out_file: str | Path) -> Path:
    """Write the tower of the checkpoint in ``checkpoint_dir`` as a plain state dict (``torch.load`` it, then
    ``student.vision.load_state_dict``), in one process without a process group. A sharded (FSDP) checkpoint is
    read shard by shard with ``torch.distributed.checkpoint``'s ``dcp_to_torch_save``; its optimiser is not read."""
    checkpoint_dir, out_file = Path(checkpoint_dir), Path(out_file)
    sharded, single = checkpoint_path(checkpoint_dir, True), checkpoint_path(checkpoint_dir, False)
    if sharded.is_dir():
        load_checkpoint(sharded)  # refuse a directory that is not one of ours before reading its shards
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        atomic_write(out_file, lambda tmp: dcp_to_torch_save(sharded / "model", tmp))
    elif single.is_file():
        model = load_checkpoint(single)["model"]
        atomic_write(out_file, lambda tmp: torch.save(model, tmp))
    else:
        raise ValueError(
            f"{checkpoint_dir} holds no distillation checkpoint ({SHARDED_CHECKPOINT} or {CHECKPOINT_FILE})"
        )
    return out_file


def _resumable_state(path: Path | None, resume: bool, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint to continue from, if asked for and there; refused when written with other settings."""
    if not resume or path is None:
        return None
    interrupted = path.with_name(path.name + ".old")
    if not path.exists() and interrupted.exists():
        raise ValueError(
            f"{path} is missing and {interrupted} is there (a sharded save stopped between its two renames): "
            f"rename it to {path.name} to resume from it"
        )
    if not path.exists():
        return None
    state = load_checkpoint(path)
    if state["settings"] != settings:
        raise ValueError(
            f"{path} was written with other settings:\n  saved: {state['settings']}\n  now:   {settings}\n"
            "remove it or drop --resume"
        )
    return state


_OPTIMIZER_OPTIONS = {"flatten_optimizer_state_dict": True}  # plain string keys, which DCP stores one by one


def _sharded_states(net: _Tower, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """This rank's shards (DTensors, no gather) of the tower, keyed as ``tower.state_dict()``, and of the optimiser."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict  # FSDP only

    model, optim = get_state_dict(net, optimizer, options=StateDictOptions(**_OPTIMIZER_OPTIONS))
    return {name.removeprefix("tower."): value for name, value in model.items()}, optim


def _load_sharded(path: Path, net: _Tower, optimizer: torch.optim.Optimizer) -> None:
    """Read each rank's shards of tower and optimiser from the DCP directory ``path`` into the sharded ``net``."""
    import torch.distributed.checkpoint as dcp  # FSDP only
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model, optim = _sharded_states(net, optimizer)  # templates: what this rank holds
    dcp.load(model, checkpoint_id=path / "model")
    dcp.load(optim, checkpoint_id=path / "optimizer")
    set_state_dict(
        net,
        optimizer,
        model_state_dict={f"tower.{name}": value for name, value in model.items()},
        optim_state_dict=optim,
        options=StateDictOptions(**_OPTIMIZER_OPTIONS),
    )


def _restore(state: dict[str, Any], nets: _Networks, optimizer, schedule, plan: _Plan, path: Path) -> _Progress:
    """Optimiser, schedule and RNG states of a checkpoint (and, under FSDP, the tower's shards; a single-file
    checkpoint's tower is loaded before wrapping)."""
    if plan.fsdp:
        _load_sharded(path, nets.student, optimizer)
    else:
        optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["scheduler"])
    if len(state["rng"]) == plan.world:
        _set_rng_state(state["rng"][plan.rank])
    epoch, position = state["position"]
    return _Progress(state["step"], epoch, position, list(state["history"]))


def _save_checkpoint(path: Path, nets: _Networks, optimizer, schedule, progress: _Progress, plan: _Plan) -> None:
    """Write the checkpoint (every rank takes part: the RNG states are gathered, FSDP shards written by their rank)."""
    rng = distributed.gather_objects([_rng_state()])
    state = {
        "format": CHECKPOINT_FORMAT,
        "settings": plan.settings,
        "step": progress.step,
        "position": [progress.epoch, progress.position],
        "scheduler": schedule.state_dict(),
        "rng": rng,
        "history": progress.history,
        "world_size": plan.world,
    }
    if plan.fsdp:
        _save_sharded(path, nets.student, optimizer, state, plan.rank)
    elif plan.rank == 0:
        state |= {"model": nets.tower.state_dict(), "optimizer": optimizer.state_dict()}
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    if plan.world > 1:
        torch.distributed.barrier()


def _save_sharded(path: Path, net: _Tower, optimizer, state: dict[str, Any], rank: int) -> None:
    """The DCP directory ``path``: written whole under ``<path>.tmp`` by all ranks, then swapped in by rank 0, so an
    interrupted save leaves the previous checkpoint (or, between the two renames, ``<path>.old``) intact."""
    import torch.distributed.checkpoint as dcp  # FSDP only

    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    model, optim = _sharded_states(net, optimizer)
    dcp.save(model, checkpoint_id=tmp / "model")
    dcp.save(optim, checkpoint_id=tmp / "optimizer")
    torch.distributed.barrier()
    if rank == 0:
        torch.save(state, tmp / SHARDED_STATE_FILE)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)


# --- the loop ---------------------------------------------------------------------------------------


def _config(steps: int | None, config: DistillConfig | None, overrides: dict[str, Any]) -> DistillConfig:
    if steps is not None:
        overrides = {**overrides, "steps": steps}
    if config is None:
        if "steps" not in overrides and "epochs" not in overrides:
            raise TypeError("distill() needs steps or epochs (or a DistillConfig)")
        return DistillConfig(**overrides)
    return dataclasses.replace(config, **_lengths_replaced(overrides))


def _autocast(precision: str, device: torch.device):
    """bf16 autocast (matmuls in bf16; weights, norms' statistics and the loss stay fp32) or nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _gradient_sync(model: nn.Module, last: bool):
    """DDP all-reduces the gradients in the last accumulated backward only; FSDP reduce-scatters after each (its
    sharded gradients accumulate, where skipping would keep whole unsharded ones)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def _step_loss(nets: _Networks, images: torch.Tensor, config: DistillConfig, plan: _Plan) -> torch.Tensor:
    """Forward and backward of one optimiser step's images (this rank's share), ``device_batch`` at a time.

    Each forward's loss is a mean over its images and weighs 1 / forwards, so the accumulated gradient is that of the
    whole share's mean (exactly so for mse_tokens and cosine). Returns the share's loss (detached).
    """
    chunks = images.split(plan.device_batch)
    total = torch.zeros((), device=images.device)
    for index, chunk in enumerate(chunks):
        with _gradient_sync(nets.model, index == len(chunks) - 1):
            with _autocast(config.precision, plan.device):
                with torch.no_grad():
                    target = nets.teacher(chunk)
                value = distill_loss(nets.model(chunk), target, config.loss, nets.prefix, config.temp_inv)
            value = value / len(chunks)
            value.backward()
        total += value.detach()
    return total


def distill(
    student,
    teacher,
    data: Dataset | DataLoader,
    steps: int | None = None,
    config: DistillConfig | None = None,
    **overrides,
) -> dict[str, Any]:
    """Distil ``teacher``'s vision tower into ``student``'s (both :class:`amp.models.Backbone`), in place.

    Settings come from ``config`` (a :class:`DistillConfig`, e.g. ``DistillConfig.from_recipe("ViT-g-14")``) and/or
    keywords naming its fields (``steps`` may be given positionally). ``data`` is a Dataset (with ``batch_size``, the
    *global* batch) or a DataLoader (its dataset and batch size are used; the order is always the seeded one); its
    transform is the caller's (``train_transform(student, config.augment)`` for the paper's augmentations). With
    ``checkpoint_dir`` a checkpoint is written every ``checkpoint_every`` steps (and at the end); ``resume=True``
    continues from it. Returns ``history`` (per step: loss, lr, weight decay), ``wall_time_s``, ``images_per_s``,
    ``images`` and the settings. The student ends in eval mode with its ``requires_grad`` flags restored.

    Under ``torchrun``, ``sharding="ddp"`` replicates the student on every process; ``"fsdp"`` trains a fully sharded
    copy (FSDP2, one unit per block) whose parameters, gradients and optimiser states are split across the processes,
    and writes the trained weights back into ``student`` at the end. With ``fsdp`` leave the student on the CPU: it
    stays there, only the shards move to ``device``. Single-process runs ignore ``sharding``.
    """
    config = _config(steps, config, overrides)
    plan = _plan(config, data)
    path = checkpoint_path(config.checkpoint_dir, plan.fsdp) if config.checkpoint_dir is not None else None
    state = _resumable_state(path, config.resume, plan.settings)
    with contextlib.ExitStack() as run:
        run.enter_context(_flags_restored(student, teacher))
        nets = _networks(student, teacher, config, plan, state)
        optimizer, schedule = _optimizer(nets.trained, config, plan)
        _seed_everything(config.seed + plan.rank)
        progress = _restore(state, nets, optimizer, schedule, plan, path) if state is not None else _Progress()
        resumed_from = progress.step
        trainable = [p for group in optimizer.param_groups for p in group["params"]]
        show = config.progress and plan.rank == 0
        bar = tqdm(
            total=plan.steps, initial=progress.step, desc=f"distill ({config.loss})", unit="step", disable=not show
        )
        nets.student.train()
        start_time, images_seen = time.perf_counter(), 0
        run.callback(bar.close)
        blocks = nets.student.adapter.blocks(nets.trained)
        run.enter_context(_recomputed_in_backward(blocks, config.activation_checkpointing))
        while progress.step < plan.steps:
            for images, _ in _epoch_batches(plan, config, progress):
                images = images.to(plan.device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                value = _step_loss(nets, images, config, plan)
                logged = float(check_finite(_mean_over_ranks(value, plan.world), f"distillation step {progress.step}"))
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
                decay = weight_decay_at(progress.step, plan.steps, config.weight_decay, config.weight_decay_end)
                optimizer.param_groups[0]["weight_decay"] = decay  # the decayed group (_param_groups)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                schedule.step()
                progress.advance(logged, lr, decay, plan.batches_per_epoch)
                images_seen += plan.batch_size
                bar.update(1)
                elapsed = time.perf_counter() - start_time
                bar.set_postfix(loss=f"{logged:.4g}", img_s=f"{images_seen / max(elapsed, 1e-9):.1f}")
                if path is not None and config.checkpoint_every and progress.step % config.checkpoint_every == 0:
                    _save_checkpoint(path, nets, optimizer, schedule, progress, plan)
                if config.on_step is not None:
                    config.on_step(progress.step, logged)
                if progress.step >= plan.steps or progress.position == 0:
                    break  # done, or the epoch is over (a new sampler starts the next one)
        if path is not None and (not config.checkpoint_every or progress.step % config.checkpoint_every):
            _save_checkpoint(path, nets, optimizer, schedule, progress, plan)
        if plan.fsdp:
            _copy_back(nets.trained, nets.tower)
    wall = time.perf_counter() - start_time
    history = progress.history
    return {
        "history": history,
        "final_loss": history[-1]["loss"] if history else None,
        "steps": plan.steps,
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


def _rgb(image):
    """PIL images as RGB (grayscale or palette files), tensors as they are."""
    return image.convert("RGB") if hasattr(image, "convert") else image


def train_transform(backbone, augment: bool | str = "clip", scale: tuple[float, float] | None = None) -> Callable:
    """The paper's training augmentation, with the model's input size and normalisation.

    ``"clip"`` (or ``True``): RandomResizedCrop, scale (0.2, 1), bicubic, and a horizontal flip. ``"dino"``: the
    DINO-style view of the DINOv2 distillation (METHOD.md §5): RandomResizedCrop, scale (0.05, 1), bicubic, flip,
    colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2, Gaussian blur (σ 0.1–2) p 0.5, solarize p 0.2.
    METHOD.md names the operations but not their probabilities for a single view: these are DINO's, with the blur's
    (1.0 and 0.1 on its two global views) and the solarize's (0 and 0.2) taken once, our choice. ``scale`` overrides
    the crop's.
    """
    name = augment_name(augment)
    if name is None:
        raise ValueError(f"train_transform needs an augmentation, one of {AUGMENTS}; got {augment!r}")
    size = tuple(backbone.adapter.input_size(backbone.model)[1:])
    steps = getattr(backbone.preprocess, "transforms", [])
    normalize = next((t for t in steps if isinstance(t, T.Normalize)), None)
    crop_scale = scale or ((0.2, 1.0) if name == "clip" else (0.05, 1.0))
    ops: list[Callable] = [
        T.Lambda(_rgb),
        T.RandomResizedCrop(size, scale=crop_scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
    ]
    if name == "dino":
        blur = max(3, (min(size) // 10) | 1)  # an odd kernel about a tenth of the crop (23 at 224)
        ops += [
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(blur, sigma=(0.1, 2.0))], p=0.5),
            T.RandomSolarize(threshold=128, p=0.2),
        ]
    ops.append(T.ToTensor())
    return T.Compose(ops + ([normalize] if normalize is not None else []))
