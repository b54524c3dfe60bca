"""Models by name: local weight files work offline for both families; bad names say what is wrong."""

import pytest
import torch
from conftest import TINY_MODELS, images_for, tiny
from safetensors.torch import save_file

from amp.models import ModelSpecError, build_architecture, load_model


def test_open_clip_local_checkpoint_file(tmp_path):
    source = tiny("open_clip", seed=3)
    path = tmp_path / "tiny.pt"
    torch.save(source.model.state_dict(), path)
    loaded = load_model(f"open_clip:amp-test-tiny:{path}")
    x = images_for(source)
    assert torch.equal(source.embed(x, project=True), loaded.embed(x, project=True))
    assert loaded.info["weights"] == str(path) and loaded.is_clip


def test_timm_local_weights_file(tmp_path):
    spec, kwargs = TINY_MODELS["dinov2"]
    source = tiny("dinov2", seed=4)
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    loaded = load_model(f"{spec}:{path}", **kwargs)
    x = images_for(source)
    assert torch.equal(source.embed(x), loaded.embed(x))


def test_architecture_record_rebuilds_on_meta():
    backbone = tiny("eva_norm")
    rebuilt = build_architecture(backbone.arch, device="meta")
    shapes = {k: v.shape for k, v in backbone.model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    assert all(p.is_meta for p in rebuilt.parameters())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("open_clip:ViT-Nope", "unknown open_clip architecture"),
        ("timm:nope_vit", "unknown timm model"),
        ("zoo:nope", "unknown zoo model"),
        ("hub:thing", "cannot resolve model"),
        ("open_clip:", "names no architecture"),
        ("open_clip:ViT-B-32:/no/such/file.pt", "weights file not found"),
    ],
)
def test_bad_names(spec, message):
    with pytest.raises(ModelSpecError, match=message):
        load_model(spec)
