"""Parameters and FLOPs of the vision tower: per model, per block, per MLP.

FLOPs are counted by ``torch.utils.flop_counter`` on one image (2 FLOPs per multiply-add). Two totals:
``flops`` is every matmul the counter sees (linear layers, the patch-embedding convolution and the two
attention matmuls), ``linear_flops`` only the linear layers and the patch projection, the convention of
the paper's tables (0.52 TFLOPs for OpenCLIP ViT-g-14). Norms, softmax, activations, rotary embeddings
and LayerScale are elementwise and not counted. On a model built on the ``meta`` device nothing is
computed or allocated, so the paper's 1-8B-parameter towers are counted in seconds.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


@dataclass
class BlockStats:
    index: int
    params: int
    mlp_params: int
    flops: int
    mlp_flops: int
    width: int


@dataclass
class ModelStats:
    params: int
    mlp_params: int
    flops: int  # all matmuls: linear layers, patch embedding, attention (q @ k^T, attn @ v)
    linear_flops: int  # linear layers and patch projection only: the paper's convention
    mlp_flops: int
    blocks: list[BlockStats]

    @property
    def mlp_param_share(self) -> float:
        return self.mlp_params / self.params

    @property
    def mlp_flop_share(self) -> float:
        return self.mlp_flops / self.flops

    @property
    def mlp_linear_flop_share(self) -> float:
        """MLP share in the paper's convention (MLP matmuls are all linear)."""
        return self.mlp_flops / self.linear_flops

    def to_dict(self) -> dict:
        shares = ("mlp_param_share", "mlp_flop_share", "mlp_linear_flop_share")
        return {**asdict(self), **{share: getattr(self, share) for share in shares}}


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch has formulas for the CUDA attention kernels but not for the CPU one (same signature, same two matmuls)
_EXTRA_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
# weight matmuls: linear layers (mm/addmm, fp8 _scaled_mm) and convolutions; the rest (bmm, attention kernels)
# multiply activations by activations
_LINEAR_OPS = {aten.mm, aten.addmm, aten._scaled_mm}


def _is_linear_op(op) -> bool:
    return op in _LINEAR_OPS or "conv" in str(op)


class _UncountedAttentionGuard(TorchDispatchMode):
    """Records fused attention kernels the FLOP counter has no formula for, so they are reported, not lost."""

    def __init__(self, known: dict):
        super().__init__()
        self.known, self.missed = known, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "attention" in str(func.overloadpacket) and func.overloadpacket not in self.known:
            self.missed.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


# Why one traced forward pass and not a formula per family: the counter gets custom blocks, gated MLPs, registers and
# rotary embeddings right with no code per family. Its blind spot is fused kernels without a formula: the fused
# ``nn.MultiheadAttention`` fast path (``_native_multi_head_attention``, taken only in eval mode on real tensors) hides
# qkv, attention and output projection, so it is switched off and the same linears and SDPA run as in train mode or on
# ``meta``; the CPU SDPA kernel gets torch's SDPA formula above; any other uncounted attention kernel is warned about.
# Counting runs in eval mode because a train-mode pass drops tokens (patch dropout) and draws random numbers.
@contextlib.contextmanager
def _counting_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode without the fused attention fast path, so every device and mode counts the same; restores both."""
    training = {module: module.training for module in model.modules()}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for module, was_training in training.items():
            module.training = was_training


class _Root(torch.nn.Module):
    """One module call around the embedding, so the FLOP counter names every submodule by its full path."""

    def __init__(self, adapter, model: torch.nn.Module):
        super().__init__()
        self.adapter, self.model = adapter, model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.adapter.embed(self.model, images, project=True)


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_stats(backbone, input_size: tuple[int, int, int] | None = None) -> ModelStats:
    """Parameters and FLOPs (one image) of ``backbone``'s vision tower, with the MLP share per block.

    The same on CPU, GPU and ``meta``, in train or eval mode (the model's modes are left as they were).
    """
    adapter, model = backbone.adapter, backbone.model
    vision = adapter.vision(model)
    blocks = adapter.blocks(model)
    mlps = [adapter.mlp_of(block) for block in blocks]
    input_size = input_size or adapter.input_size(model)
    device = next(vision.parameters()).device
    dtype = next(vision.parameters()).dtype
    counter = FlopCounterMode(display=False, depth=None, custom_mapping=_EXTRA_FORMULAS)
    guard = _UncountedAttentionGuard(counter.flop_registry)
    with _counting_mode(model), counter, guard, torch.no_grad():
        _Root(adapter, model)(torch.zeros(1, *input_size, device=device, dtype=dtype))
    if guard.missed:
        warnings.warn(f"FLOPs of {sorted(guard.missed)} are not counted (no formula)", RuntimeWarning, stacklevel=2)
    flops_by_module = counter.get_flop_counts()
    names = {module: name for name, module in model.named_modules()}

    def flops_of(module: torch.nn.Module) -> int:
        return int(sum(flops_by_module.get(f"_Root.model.{names[module]}", {}).values()))

    stats = [
        BlockStats(i, _numel(block), _numel(mlp), flops_of(block), flops_of(mlp), site.hidden)
        for i, (block, mlp, site) in enumerate(zip(blocks, mlps, adapter.sites(model)))
    ]
    return ModelStats(
        params=_numel(vision),
        mlp_params=sum(b.mlp_params for b in stats),
        flops=int(counter.get_total_flops()),
        linear_flops=int(sum(n for op, n in flops_by_module["Global"].items() if _is_linear_op(op))),
        mlp_flops=sum(b.mlp_flops for b in stats),
        blocks=stats,
    )
