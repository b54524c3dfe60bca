"""A hand-written ViT becomes a backbone with one register_backbone call: score → search → save → load_pruned."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from torchvision import transforms as T

import amp
from amp.adapters import BackboneAdapter, MLPSite, adapter_for, adapter_named, register_backbone
from amp.models import load_model, load_pruned, save_pruned

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)  # not any library's default: the reload must keep them


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.inner = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x, x, x, need_weights=False)[0]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), FeedForward(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the contract: hidden state in, tensor out
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchViT(nn.Module):
    """Patch embedding, a class token, blocks, a final norm; the class token is the embedding."""

    def __init__(self, img_size: int = 16, patch: int = 4, dim: int = 32, depth: int = 2, heads: int = 2):
        super().__init__()
        self.img_size = img_size
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (img_size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, 4 * dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


class PatchViTAdapter(BackboneAdapter):
    family = "patch-vit"

    def matches(self, model):
        return isinstance(model, PatchViT)

    def blocks(self, model):
        return model.blocks

    def block_prefix(self, model):
        return "blocks"

    def mlp_site(self, index, name, mlp):
        if isinstance(mlp, FeedForward):
            return MLPSite(index, name, mlp, fc_in=mlp.fc1, fc_out=mlp.fc2)
        return super().mlp_site(index, name, mlp)

    def embed(self, model, images, project=False):
        return model(images)

    def input_size(self, model):
        return (3, model.img_size, model.img_size)

    def build(self, arch, device):
        with torch.device(device):
            return PatchViT(**arch["kwargs"])

    def preprocess_config(self, model):
        return {"size": model.img_size, "mean": list(MEAN), "std": list(STD)}

    def eval_transform(self, config):
        size = config["size"]
        return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(config["mean"], config["std"])])

    def prefix_tokens(self, model):
        return 1

    def head_parameter_names(self, model):
        return [name for name, _ in model.named_parameters() if name.startswith("norm.")]


class Pictures(Dataset):
    """Seeded random PIL pictures, through the model's own transform."""

    def __init__(self, transform, count: int = 24, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.images = [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(count)]
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index]), 0


@pytest.fixture
def registered():
    adapter = register_backbone(PatchViTAdapter)  # the one registration
    yield adapter
    amp.adapters.ADAPTERS.remove(adapter)


def test_a_custom_vit_through_score_search_save_and_reload(registered, tmp_path):
    assert adapter_named("patch-vit") is registered
    torch.manual_seed(0)
    dense = load_model("patch-vit:small", img_size=16, depth=2)
    assert dense.adapter is registered and dense.widths() == [128, 128]
    data = Pictures(dense.preprocess)
    scores = amp.api.score(dense, data, criterion="entropy", batch_size=8)
    result = amp.api.search(dense, scores, data, threshold=0.05, batch_size=8)  # the AMP bisection
    widths = dense.widths()
    assert widths == result["widths"] and sum(widths) < 256

    save_pruned(dense, tmp_path / "m")
    loaded = load_pruned(tmp_path / "m")
    assert loaded.adapter is registered and loaded.widths() == widths
    picture = Pictures(lambda image: image, count=1, seed=1)[0][0]
    x = dense.preprocess(picture)
    assert torch.equal(x, loaded.preprocess(picture))  # the transform survives the reload
    assert str(loaded.preprocess) == str(dense.preprocess)
    with torch.no_grad():
        assert torch.equal(dense.embed(x[None]), loaded.embed(x[None]))


def test_partial_forward_of_a_custom_vit_equals_the_full_one(registered):
    model = PatchViT().eval()
    adapter = adapter_for(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        inputs = adapter.block_inputs(model, x, [0, 1])
        assert torch.equal(adapter.embed_from(model, inputs[1], 1, x.shape), model(x))
