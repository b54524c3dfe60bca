"""Tiny randomly initialised models of every supported MLP layout (seconds on a CPU)."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch

from amp.models import load_model

open_clip.add_model_config(Path(__file__).parent / "configs")

# name -> (spec, builder kwargs); one per MLP layout the adapters support
TINY_MODELS = {
    "open_clip": ("open_clip:amp-test-tiny", {}),
    "timm_vit": (
        "timm:vit_tiny_patch16_224",
        {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 48, "num_heads": 2},
    ),
    "dinov2": ("timm:vit_small_patch14_dinov2", {"img_size": 28, "depth": 3, "embed_dim": 48, "num_heads": 2}),
    "dinov2_swiglu": ("timm:vit_giant_patch14_dinov2", {"img_size": 28, "depth": 2, "embed_dim": 48, "num_heads": 2}),
    "eva_norm": (
        "timm:eva02_tiny_patch14_224",
        {"img_size": 28, "depth": 2, "embed_dim": 48, "num_heads": 2, "scale_mlp": True},
    ),
}


def tiny(name: str, seed: int = 0):
    spec, kwargs = TINY_MODELS[name]
    torch.manual_seed(seed)
    backbone = load_model(spec, **kwargs)
    # random init leaves LayerScale tiny and some biases zero; perturb so every path carries signal
    with torch.no_grad():
        for p in backbone.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return backbone


@pytest.fixture(params=list(TINY_MODELS))
def any_tiny(request):
    return request.param, tiny(request.param)


def images_for(backbone, n: int = 6, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, *backbone.adapter.input_size(backbone.model), generator=generator)


@pytest.fixture
def one_thread():
    """Tiny models: threads only contend with the other test workers on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
