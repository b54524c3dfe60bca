from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_MODELS, tiny
from torch import nn

from amp.accounting import model_stats
from amp.adapters import BackboneAdapter
from amp.models import load_model
from amp.surgery import keep_units
from amp.zoo.tiny_clip import ARCH as TINY_CLIP_ARCH


def vit_flops(geometry: dict, sites) -> dict:
    """Analytic FLOPs of one image (2 per multiply-add): what ``model_stats`` must count.

    Per block: qkv (3 D x D), q @ k^T and attn @ v (2 N^2 D each), output projection (D x D), MLP fc1 (both halves
    when gated) and fc2; plus the patch projection and the head (pooled token x projection). Ignored, as in the
    counter: biases, norms, softmax, activations, LayerScale, rotary embeddings.
    """
    n, d = geometry["tokens"], geometry["dim"]
    attention_matmuls = 2 * 2 * n * n * d
    stem_and_head = 2 * geometry["patches"] * geometry["patch_pixels"] * d + 2 * d * geometry["head_out"]
    blocks, mlps = [], []
    for site in sites:
        mlp = 2 * n * d * site.hidden * (2 if site.gated else 1) + 2 * n * site.hidden * d
        mlps.append(mlp)
        blocks.append(2 * n * d * 3 * d + attention_matmuls + 2 * n * d * d + mlp)
    total = stem_and_head + sum(blocks)
    return {"flops": total, "linear_flops": total - len(blocks) * attention_matmuls, "blocks": blocks, "mlps": mlps}


def geometry_of(backbone) -> dict:
    """Token count, width, patch and head sizes read from the architecture (not from any FLOP counter)."""
    model = backbone.model
    if hasattr(model, "visual"):  # open_clip
        visual = model.visual
        conv, patches = visual.conv1, visual.grid_size[0] * visual.grid_size[1]
        dim, prefix, head_out = visual.transformer.width, 1, visual.proj.shape[1]
    elif isinstance(model, TinyViT):
        conv, patches, dim, prefix, head_out = model.patch, model.patches, model.dim, 1, 0
    else:  # timm
        conv, patches, dim = model.patch_embed.proj, model.patch_embed.num_patches, model.embed_dim
        prefix, head_out = model.num_prefix_tokens, getattr(model.head, "out_features", 0)
    patch_pixels = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    tokens = patches + prefix
    return {"tokens": tokens, "patches": patches, "dim": dim, "patch_pixels": patch_pixels, "head_out": head_out}


# --- a hand-written ViT with its own adapter: explicit q @ k^T matmuls, no timm or open_clip ---------------------


class TinyAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


class TinyBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), TinyAttention(dim, 2), nn.LayerNorm(dim)
        layers = OrderedDict(c_fc=nn.Linear(dim, hidden), gelu=nn.GELU(), c_proj=nn.Linear(hidden, dim))
        self.mlp = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, size: int = 24, patch: int = 6, dim: int = 32, hidden: int = 80, depth: int = 2):
        super().__init__()
        self.size, self.dim, self.patches = size, dim, (size // patch) ** 2
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, self.patches + 1, dim))
        self.blocks = nn.ModuleList(TinyBlock(dim, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])


class TinyViTAdapter(BackboneAdapter):
    family = "tiny-vit-test"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, TinyViT)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.blocks

    def block_prefix(self, model: nn.Module) -> str:
        return "blocks"

    def embed(self, model: nn.Module, images: torch.Tensor, project: bool = False) -> torch.Tensor:
        return model(images)

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        return (3, model.size, model.size)


# --- every family, eval and train, real and meta device ----------------------------------------------------------

FAMILIES = {
    "open_clip": TINY_MODELS["open_clip"],
    "tiny_clip": (f"open_clip:{TINY_CLIP_ARCH}", {}),  # 4 heads: eval mode on CPU takes the fused MHA fast path
    **{name: TINY_MODELS[name] for name in ("timm_vit", "dinov2", "dinov2_swiglu", "eva_norm")},
    "custom": None,
}


def build(family: str, device: str):
    if family == "custom":
        with torch.device(device):
            return SimpleNamespace(model=TinyViT(), adapter=TinyViTAdapter())
    spec, kwargs = FAMILIES[family]
    return load_model(spec, device=device, **kwargs)


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))


@pytest.mark.filterwarnings("error::RuntimeWarning")  # an attention kernel without a formula fails the test
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("device", ["cpu", "meta", CUDA])  # CUDA: fused SDPA kernels
@pytest.mark.parametrize("family", list(FAMILIES))
def test_counts_match_the_analytic_formula(family, device, training):
    backbone = build(family, device)
    backbone.model.train(training)
    expected = vit_flops(geometry_of(backbone), backbone.adapter.sites(backbone.model))
    stats = model_stats(backbone)
    assert stats.flops == expected["flops"]
    assert stats.linear_flops == expected["linear_flops"]
    assert [b.flops for b in stats.blocks] == expected["blocks"]
    assert [b.mlp_flops for b in stats.blocks] == expected["mlps"]
    assert stats.mlp_flops == sum(expected["mlps"])


def test_counting_leaves_modes_and_the_attention_fast_path_as_they_were():
    backbone = build("tiny_clip", "cpu")
    backbone.model.train()
    backbone.model.visual.transformer.resblocks[1].eval()
    before = {name: module.training for name, module in backbone.model.named_modules()}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model_stats(backbone)
    assert {name: module.training for name, module in backbone.model.named_modules()} == before
    assert torch.backends.mha.get_fastpath_enabled() == fastpath


def test_tiny_counts_match_the_shapes():
    backbone = tiny("open_clip")  # width 48, hidden 192, 32 px / patch 8 -> 17 tokens, 3 blocks
    stats = model_stats(backbone)
    assert stats.params == sum(p.numel() for p in backbone.model.visual.parameters())
    assert stats.mlp_params == 3 * (48 * 192 + 192 + 192 * 48 + 48)
    assert [b.mlp_flops for b in stats.blocks] == [2 * 17 * 2 * 48 * 192] * 3
    assert 0 < stats.mlp_flop_share < 1
    assert stats.linear_flops < stats.flops


def test_pruning_shrinks_mlp_counts_proportionally():
    backbone = tiny("dinov2_swiglu")
    dense = model_stats(backbone)
    for site in backbone.sites():
        keep_units(site, range(site.hidden // 2 + site.index))  # uneven widths: each block's own formula
    pruned = model_stats(backbone)
    assert pruned.mlp_params < dense.mlp_params and pruned.flops < dense.flops
    assert pruned.params - pruned.mlp_params == dense.params - dense.mlp_params
    assert pruned.flops == vit_flops(geometry_of(backbone), backbone.sites())["flops"]


def test_vit_g_14_on_meta_gives_the_papers_numbers():
    backbone = load_model("open_clip:ViT-g-14", device="meta")  # 1B parameters: counted without memory
    stats = model_stats(backbone)
    expected = vit_flops(geometry_of(backbone), backbone.sites())
    assert (stats.flops, stats.linear_flops) == (expected["flops"], expected["linear_flops"])
    assert round(stats.linear_flops / 1e12, 2) == 0.52  # the paper's convention: linear layers and patch projection
    assert round(stats.flops / 1e12, 3) == 0.534  # with the attention matmuls
