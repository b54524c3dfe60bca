"""Parameters and FLOPs of the vision tower: per model, per block, per MLP.

FLOPs are counted by ``torch.utils.flop_counter`` on one image (2 FLOPs per multiply-add, attention
included). On a model built on the ``meta`` device nothing is computed or allocated, so the paper's
1-8B-parameter towers are counted in seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode


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
    flops: int
    mlp_flops: int
    blocks: list[BlockStats]

    @property
    def mlp_param_share(self) -> float:
        return self.mlp_params / self.params

    @property
    def mlp_flop_share(self) -> float:
        return self.mlp_flops / self.flops

    def to_dict(self) -> dict:
        return {**asdict(self), "mlp_param_share": self.mlp_param_share, "mlp_flop_share": self.mlp_flop_share}


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
    """Parameters and FLOPs (one image) of ``backbone``'s vision tower, with the MLP share per block."""
    adapter, model = backbone.adapter, backbone.model
    vision = adapter.vision(model)
    blocks = adapter.blocks(model)
    mlps = [adapter.mlp_of(block) for block in blocks]
    input_size = input_size or adapter.input_size(model)
    device = next(vision.parameters()).device
    dtype = next(vision.parameters()).dtype
    counter = FlopCounterMode(display=False, depth=None)
    with counter, torch.no_grad():
        _Root(adapter, model)(torch.zeros(1, *input_size, device=device, dtype=dtype))
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
        mlp_flops=sum(b.mlp_flops for b in stats),
        blocks=stats,
    )
