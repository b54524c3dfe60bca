"""Distillation of a pruned vision tower from its dense original (the paper's recovery, METHOD.md §5).

:func:`distill` trains the student's vision tower to reproduce the teacher's:

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

import argparse
import contextlib
import copy
import itertools
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from amp.criteria import check_finite, similarity_logits
from amp.data import collate
from amp.io import atomic_write

LOSSES = ("mse_tokens", "cosine", "similarity_kl")
SHARDINGS = ("ddp", "fsdp")
HEAD_MODULES = {"ln_post", "proj", "norm", "fc_norm", "head"}  # final norm and projection, by first name component
NO_DECAY_NAMES = ("pos_embed", "positional_embedding", "cls_token", "class_embedding", "reg_token", "register_tokens")
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


# --- the towers --------------------------------------------------------------------------------------


def _prefix_tokens(tower: nn.Module) -> int:
    if hasattr(tower, "num_prefix_tokens"):  # timm
        return int(tower.num_prefix_tokens)
    return 1 if getattr(tower, "class_embedding", None) is not None else 0  # open_clip


class _Tower(nn.Module):
    """A vision tower whose forward returns what the loss compares (last-block tokens or pooled embedding)."""

    def __init__(self, tower: nn.Module, adapter, loss: str):
        super().__init__()
        self.tower, self.adapter, self.loss = tower, adapter, loss
        transformer = getattr(tower, "transformer", None)
        self.seq_first = transformer is not None and getattr(transformer, "batch_first", True) is False

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
        return tokens.transpose(0, 1) if self.seq_first else tokens


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


def head_parameter_names(tower: nn.Module) -> list[str]:
    """Names (in ``tower.named_parameters()``) of the final norm and projection."""
    return [name for name, _ in tower.named_parameters() if name.split(".")[0] in HEAD_MODULES]


def _copy_head(student_tower: nn.Module, teacher_tower: nn.Module) -> None:
    teacher = dict(teacher_tower.named_parameters())
    heads = set(head_parameter_names(student_tower))
    with torch.no_grad():
        for name, p in student_tower.named_parameters():
            if name in heads and name in teacher and teacher[name].shape == p.shape:
                p.copy_(teacher[name])


def _param_groups(tower: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in tower.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(key in name for key in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the base lr for optimiser step ``step`` (0-based): linear warmup, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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


def _dataset_and_batch(loader, batch_size: int | None) -> tuple[Dataset, int]:
    if isinstance(loader, DataLoader):
        return loader.dataset, batch_size or loader.batch_size
    if isinstance(loader, Dataset):
        if batch_size is None:
            raise ValueError("distill() needs batch_size when given a Dataset")
        return loader, batch_size
    raise TypeError(f"distill() takes a Dataset or a DataLoader, got {type(loader).__name__}")


# --- RNG and checkpoints ------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    with contextlib.suppress(ImportError):
        import numpy as np

        state["numpy"] = np.random.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    found: list[Any] = [None] * world
    torch.distributed.all_gather_object(found, obj)
    return found


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(Path(path), map_location="cpu", weights_only=False)


def _fully_shard(net: _Tower, device: torch.device, world: int) -> None:
    """Shard ``net`` in place with FSDP2: one unit per block, the rest (embeddings, head) in the root unit.

    The root is the :class:`_Tower` wrapper, whose ``__call__`` is what runs: the adapters embed through functions
    other than the tower's own ``forward``, which would bypass hooks on the tower. ``fully_shard`` moves only this
    rank's shards to ``device``, so no GPU ever holds the whole student with its gradients and optimiser states.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for block in net.adapter.blocks(net.tower):
        fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)


def _copy_back(sharded: nn.Module, tower: nn.Module) -> None:
    """Gather the trained shards, one tensor at a time, into the plain ``tower`` on every rank."""
    from torch.distributed.tensor import DTensor

    states = dict(itertools.chain(sharded.named_parameters(), sharded.named_buffers()))
    with torch.no_grad():
        for name, target in itertools.chain(tower.named_parameters(), tower.named_buffers()):
            value = states[name]
            value = value.full_tensor() if isinstance(value, DTensor) else value
            target.copy_(value.to(target.device))


def _full_state(net: _Tower, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) tower and optimiser state dicts of a sharded :class:`_Tower`, on rank 0's CPU (collective).

    The tower's keys are those of ``tower.state_dict()``, as in an unsharded checkpoint.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model = {name.removeprefix("tower."): value for name, value in get_model_state_dict(net, options=options).items()}
    return model, get_optimizer_state_dict(net, optimizer, options=options)


def _load_optimizer(sharded: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(sharded, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _default_device(world: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if world > 1 else torch.cuda.current_device())
    return torch.device("cpu")


# --- the loop ---------------------------------------------------------------------------------------


def distill(
    student,
    teacher,
    loader,
    steps: int,
    batch_size: int | None = None,
    lr: float = 1e-4,
    min_lr: float = 0.0,
    warmup: int | None = None,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.95),
    loss: str = "mse_tokens",
    temp_inv: float = 15.0,
    train_head: bool = False,
    grad_clip: float | None = 1.0,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    sharding: str = "ddp",
) -> dict[str, Any]:
    """Distil ``teacher``'s vision tower into ``student``'s (both :class:`amp.models.Backbone`), in place.

    ``loader`` is a Dataset (with ``batch_size``, the *global* batch) or a DataLoader (its dataset and batch size
    are used; the order is always the seeded one). ``steps`` optimiser steps; ``warmup`` steps of linear warmup
    (default 5% of ``steps``). With ``checkpoint_dir`` a checkpoint is written every ``checkpoint_every`` steps (and
    at the end); ``resume=True`` continues from it. ``on_step(step, loss)`` is called after every step (after the
    checkpoint). Returns ``history`` (per step: loss, lr), ``wall_time_s``, ``images_per_s``, ``images`` and the
    settings. The student ends in eval mode with its ``requires_grad`` flags restored.

    Under ``torchrun``, ``sharding="ddp"`` replicates the student on every process; ``"fsdp"`` trains a fully sharded
    copy (FSDP2, one unit per block) whose parameters, gradients and optimiser states are split across the processes,
    and writes the trained weights back into ``student`` at the end. With ``fsdp`` leave the student on the CPU: it
    stays there, only the shards move to ``device``. Single-process runs ignore ``sharding``.
    """
    if sharding not in SHARDINGS:
        raise ValueError(f"unknown sharding {sharding!r}; choose one of {SHARDINGS}")
    if loss not in LOSSES:
        raise ValueError(f"unknown distillation loss {loss!r}; choose one of {LOSSES}")
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    if train_head and loss == "mse_tokens":
        raise ValueError("train_head has no effect with the mse_tokens loss (it reads the last block's tokens)")
    dataset, batch_size = _dataset_and_batch(loader, batch_size)
    world, rank = _dist()
    if batch_size < world or batch_size % world:
        raise ValueError(f"the global batch {batch_size} must be a multiple of the {world} processes")
    local_batch = batch_size // world
    batches_per_epoch = len(dataset) // batch_size
    if batches_per_epoch == 0:
        raise ValueError(f"the data set has {len(dataset)} images, fewer than one batch of {batch_size}")
    warmup = max(1, round(0.05 * steps)) if warmup is None else int(warmup)
    device = torch.device(device) if device is not None else _default_device(world)
    settings = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "min_lr": min_lr,
        "warmup": warmup,
        "weight_decay": weight_decay,
        "betas": list(betas),
        "loss": loss,
        "temp_inv": temp_inv,
        "train_head": train_head,
        "grad_clip": grad_clip,
        "seed": seed,
        "images_in_data": len(dataset),
        "sharding": sharding if world > 1 else "none",
    }

    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    state = None
    if resume and ckpt_path is not None and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        if state["settings"] != settings:
            raise ValueError(
                f"{ckpt_path} was written with other settings:\n  saved: {state['settings']}\n  now:   {settings}\n"
                "remove it or drop --resume"
            )

    # models: only the student's vision tower trains; the teacher is frozen in eval mode
    requires = {name: p.requires_grad for name, p in student.model.named_parameters()}
    teacher_requires = {name: p.requires_grad for name, p in teacher.model.named_parameters()}
    fsdp = sharding == "fsdp" and world > 1
    student.model.requires_grad_(False)
    if not fsdp:
        student.model.to(device)
    teacher.model.to(device).eval().requires_grad_(False)
    tower = student.vision
    heads = set(head_parameter_names(tower))
    if not train_head:
        _copy_head(tower, teacher.vision)
    for name, p in tower.named_parameters():
        p.requires_grad_(train_head or name not in heads)
    if state is not None:
        tower.load_state_dict(state["model"])
    # what trains: the tower itself (one process, DDP) or a sharded copy of it (FSDP), made where the tower lives
    trained = copy.deepcopy(tower) if fsdp else tower
    student_net, teacher_net = _Tower(trained, student.adapter, loss), _Tower(teacher.vision, teacher.adapter, loss)
    if fsdp:
        _fully_shard(student_net, device, world)
    prefix = _prefix_tokens(tower)
    if world > 1 and not fsdp:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(student_net, device_ids=ids, find_unused_parameters=train_head)
    else:
        model = student_net
    optimizer = torch.optim.AdamW(_param_groups(trained, weight_decay), lr=lr, betas=betas, eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, warmup, min_lr / lr if lr > 0 else 0.0)
    )
    trainable = [p for group in optimizer.param_groups for p in group["params"]]

    step, epoch, position, history = 0, 0, 0, []
    _seed_everything(seed + rank)
    if state is not None:
        if fsdp:
            _load_optimizer(student_net, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, (epoch, position), history = state["step"], state["position"], list(state["history"])
        if len(state["rng"]) == world:
            _set_rng_state(state["rng"][rank])
    resumed_from = step

    def save_checkpoint() -> None:
        rng = _gather(_rng_state(), world)
        model_state, optimizer_state = (
            _full_state(student_net, optimizer) if fsdp else (tower.state_dict(), optimizer.state_dict())
        )
        if rank == 0:
            state = {
                "format": CHECKPOINT_FORMAT,
                "settings": settings,
                "step": step,
                "position": [epoch, position],
                "model": model_state,
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "rng": rng,
                "history": history,
                "world_size": world,
            }
            atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))
        if world > 1:
            torch.distributed.barrier()

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=step, desc=f"distill ({loss})", unit="step", disable=not progress or rank > 0)
    student_net.train()
    teacher.model.eval()
    start_time, images_seen = time.perf_counter(), 0
    try:
        while step < steps:
            sampler = SeededOrder(dataset, world, rank, seed, start=position * local_batch)
            sampler.set_epoch(epoch)
            data = DataLoader(
                dataset,
                batch_size=local_batch,
                sampler=sampler,
                drop_last=True,
                num_workers=num_workers,
                collate_fn=collate,
                generator=torch.Generator().manual_seed(seed * 100_003 + epoch * 1_009 + position),
                pin_memory=device.type == "cuda",
            )
            for images, _ in data:
                images = images.to(device, non_blocking=True)
                with autocast:
                    with torch.no_grad():
                        target = teacher_net(images)
                    value = distill_loss(model(images), target, loss, prefix, temp_inv)
                logged = value.detach().clone()
                if world > 1:
                    torch.distributed.all_reduce(logged)
                    logged /= world
                check_finite(logged, f"distillation step {step}")
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
                current_lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                step, position, images_seen = step + 1, position + 1, images_seen + batch_size
                if position == batches_per_epoch:
                    epoch, position = epoch + 1, 0
                history.append({"step": step, "loss": float(logged), "lr": current_lr})
                elapsed = time.perf_counter() - start_time
                bar.update(1)
                bar.set_postfix(loss=f"{float(logged):.4g}", img_s=f"{images_seen / max(elapsed, 1e-9):.1f}")
                if ckpt_path is not None and checkpoint_every and step % checkpoint_every == 0:
                    save_checkpoint()
                if on_step is not None:
                    on_step(step, float(logged))
                if step >= steps or position == 0:
                    break  # done, or the epoch is over (a new sampler starts the next one)
        if ckpt_path is not None and (not checkpoint_every or step % checkpoint_every):
            save_checkpoint()
        if fsdp:
            _copy_back(trained, tower)
    finally:
        bar.close()
        student.model.eval()
        for name, p in student.model.named_parameters():
            p.requires_grad_(requires.get(name, p.requires_grad))
        for name, p in teacher.model.named_parameters():
            p.requires_grad_(teacher_requires.get(name, p.requires_grad))
    wall = time.perf_counter() - start_time
    return {
        "history": history,
        "final_loss": history[-1]["loss"] if history else None,
        "steps": steps,
        "resumed_from": resumed_from,
        "images": images_seen,
        "wall_time_s": wall,
        "images_per_s": images_seen / wall if wall > 0 else 0.0,
        "world_size": world,
        "device": str(device),
        "settings": settings,
    }


# --- command line ---------------------------------------------------------------------------------------


def train_transform(backbone, scale: tuple[float, float] = (0.2, 1.0)) -> Callable:
    """The paper's CLIP augmentation: RandomResizedCrop (bicubic) + horizontal flip, with the model's normalisation."""
    from torchvision import transforms as T

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="amp distill", description="distil a pruned vision tower from its dense original")
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``amp distill`` options, for mounting as a subcommand (``p.set_defaults(func=run)``)."""
    p.add_argument("--student", required=True, help="pruned model directory (or any model spec)")
    p.add_argument("--teacher", help="teacher model spec (default: the student's base_model from amp.json)")
    p.add_argument("--data", required=True, help="training images, e.g. imagefolder:/imagenet/train")
    p.add_argument("--steps", type=int, required=True, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=64, help="global batch size (all processes together)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (not scaled by the batch size)")
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--loss", choices=LOSSES, default="mse_tokens")
    p.add_argument("--temp-inv", type=float, default=15.0, help="inverse temperature of similarity_kl")
    p.add_argument("--train-head", action="store_true", help="train the final norm/projection too")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument(
        "--augment", action="store_true", help="RandomResizedCrop(0.2-1) + flip instead of the eval transform"
    )
    p.add_argument("--out", required=True, help="output directory for the distilled model")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints in --out/checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoints/checkpoint.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda (cuda:LOCAL_RANK under torchrun) if available")
    p.add_argument(
        "--sharding",
        choices=SHARDINGS,
        default="ddp",
        help="under torchrun: replicate the student (ddp) or shard its weights, gradients and optimiser (fsdp)",
    )
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``amp distill``: load, distil, save (rank 0) the student with ``save_pruned(..., distill=...)``."""
    from amp.data import load_dataset
    from amp.io import save_pruned
    from amp.models import load_model

    created_group = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group(backend)
        created_group = True
    try:
        world, rank = _dist()
        device = torch.device(args.device) if args.device else _default_device(world)
        fsdp = args.sharding == "fsdp" and world > 1  # the student stays on the CPU; only its shards go to the GPU
        student = load_model(args.student, device="cpu" if fsdp else str(device))
        teacher_spec = args.teacher or student.info.get("base_model")
        if not teacher_spec or teacher_spec == args.student:
            raise ValueError("no teacher: pass --teacher (the student's amp.json names no base_model)")
        teacher = load_model(teacher_spec, device=str(device))
        transform = train_transform(student) if args.augment else student.preprocess
        dataset = load_dataset(args.data, transform)
        out = Path(args.out)
        result = distill(
            student,
            teacher,
            dataset,
            args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            min_lr=args.min_lr,
            warmup=args.warmup,
            weight_decay=args.weight_decay,
            loss=args.loss,
            temp_inv=args.temp_inv,
            train_head=args.train_head,
            grad_clip=args.grad_clip or None,
            checkpoint_dir=out / "checkpoints",
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            seed=args.seed,
            device=device,
            num_workers=args.num_workers,
            progress=not args.no_progress,
            sharding=args.sharding,
        )
        if rank == 0:
            provenance = {
                **result["settings"],
                "teacher": teacher_spec,
                "data": args.data,
                "augment": args.augment,
                "world_size": world,
                "final_loss": result["final_loss"],
                "wall_time_s": result["wall_time_s"],
            }
            student.info.setdefault("base_model", teacher_spec)
            save_pruned(student, out, distill=provenance)
            print(
                f"distilled {args.steps} steps: loss {result['history'][0]['loss']:.5g} -> {result['final_loss']:.5g}, "
                f"{result['images_per_s']:.1f} images/s; model written to {out}"
            )
        return result
    finally:
        if created_group:
            torch.distributed.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    from amp.adapters import UnsupportedModelError
    from amp.criteria import NonFiniteLossError
    from amp.data import DataSpecError
    from amp.models import ModelSpecError

    user_errors = (ModelSpecError, DataSpecError, UnsupportedModelError, NonFiniteLossError, FileNotFoundError)
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (*user_errors, ValueError) as e:
        print(f"amp distill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("amp distill: interrupted (continue with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
