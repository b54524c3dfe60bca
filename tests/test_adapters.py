"""Adapters: each family's partial forward equals its full forward; open_clip towers with timm trunks (EVA02-CLIP)."""

import pytest
import timm
import torch
from conftest import TINY_MODELS, images_for, tiny

from amp.adapters import OpenClipTimmAdapter, adapter_for
from amp.models import Backbone
from amp.surgery import keep_units, mask_units


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_running_from_a_cached_block_input_equals_the_full_forward(name):
    backbone = tiny(name)
    adapter, model = backbone.adapter, backbone.model
    x = images_for(backbone, 3)
    depth = len(adapter.blocks(model))
    with torch.no_grad():
        full = adapter.embed(model, x, project=True)
        inputs = adapter.block_inputs(model, x, range(depth))
        for layer in range(depth):
            assert torch.equal(adapter.embed_from(model, inputs[layer], layer, x.shape, project=True), full)
            assert torch.equal(adapter.block_input_from(model, inputs[0], 0, layer, x.shape), inputs[layer])
    assert isinstance(adapter.blocks(model)[0], torch.nn.Module)  # blocks are restored after skipping


def _eva_clip():
    """An open_clip CLIP whose image tower is a (tiny) timm EVA02 trunk, as open_clip's EVA02-CLIP configs build."""
    from open_clip.timm_model import TimmModel

    backbone = tiny("open_clip")
    visual = TimmModel("eva02_tiny_patch14_224", embed_dim=32, image_size=28, proj="none")
    visual.trunk = timm.create_model(
        "eva02_tiny_patch14_224", img_size=28, depth=2, embed_dim=48, num_heads=2, num_classes=32, scale_mlp=True
    )
    backbone.model.visual = visual.eval()
    return Backbone(backbone.model, adapter_for(backbone.model), "test", {}, tokenizer=backbone.tokenizer)


def test_open_clip_timm_trunk_adapter():
    backbone = _eva_clip()
    assert isinstance(backbone.adapter, OpenClipTimmAdapter)
    sites = backbone.sites()
    assert [s.name for s in sites] == ["visual.trunk.blocks.0.mlp", "visual.trunk.blocks.1.mlp"]
    assert sites[0].fc_gate is not None and sites[0].hidden_norm is not None
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(backbone.embed(x, project=True), backbone.model.encode_image(x))
        assert backbone.embed(x).shape == (2, 48)  # pre-projection trunk feature


@pytest.mark.parametrize("name", ["timm_vit", "dinov2_swiglu"])
def test_masking_a_unit_removes_it_from_the_output(name):
    backbone, reference = tiny(name), tiny(name)
    site = backbone.sites()[0]
    mask_units(site, range(1, site.hidden))
    keep_units(reference.sites()[0], range(1, site.hidden))
    x = images_for(backbone, 2)
    with torch.no_grad():
        torch.testing.assert_close(backbone.embed(x), reference.embed(x))
