"""Models by name: local weight files work offline for both families; bad names say what is wrong."""

import pytest
import torch
from conftest import TINY_MODELS, images_for, tiny
from safetensors.torch import save_file
from torchvision.transforms import Normalize

from amp.adapters import OpenClipTimmAdapter, adapter_for
from amp.models import ModelSpecError, build_architecture, load_model, load_pruned, save_pruned


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


# --- a tag's own preprocessing survives save_pruned -> load_pruned (offline: the tag's config, no weights) -----

SMALL_TIMM = {"img_size": 32, "depth": 1, "embed_dim": 48, "num_heads": 2}
SMALL_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 48, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _normalize(transform):
    (norm,) = [t for t in transform.transforms if isinstance(t, Normalize)]
    return tuple(float(v) for v in norm.mean), tuple(float(v) for v in norm.std)


@pytest.mark.parametrize(
    ("tagged", "default", "kwargs", "mean"),
    [
        ("timm:vit_small_patch16_224.dino", "timm:vit_small_patch16_224", SMALL_TIMM, (0.485, 0.456, 0.406)),
        ("open_clip:ViT-L-14:laion2b_s32b_b82k", "open_clip:ViT-L-14", SMALL_CLIP, (0.5, 0.5, 0.5)),
    ],
)
def test_a_pruned_tagged_model_keeps_the_tags_preprocessing(tagged, default, kwargs, mean, tmp_path):
    dense = load_model(tagged, pretrained=False, **kwargs)
    assert dense.info["weights"] == "random-init"
    save_pruned(dense, tmp_path / "m")
    loaded = load_pruned(tmp_path / "m")
    assert _normalize(loaded.preprocess) == _normalize(dense.preprocess)
    assert str(loaded.preprocess) == str(dense.preprocess)  # sizes, interpolation, crop
    assert _normalize(dense.preprocess)[0] == pytest.approx(mean)
    assert _normalize(load_model(default, **kwargs).preprocess) != _normalize(dense.preprocess)


def test_open_clip_tower_with_a_timm_trunk_reports_its_prefix_tokens_and_head():
    model = build_architecture({"family": "open_clip", "name": "EVA02-B-16", "kwargs": {}}, device="meta")
    adapter = adapter_for(model)
    assert isinstance(adapter, OpenClipTimmAdapter)
    assert adapter.prefix_tokens(model) == model.visual.trunk.num_prefix_tokens == 1  # the class token
    heads = adapter.head_parameter_names(model)
    names = dict(adapter.vision(model).named_parameters())
    assert {"trunk.norm.weight", "trunk.norm.bias"} <= set(heads) <= set(names)
    projection = {n for n in names if n.startswith(("head.", "trunk.head."))}
    assert projection and projection <= set(heads)
    assert not any(".blocks." in n or n.startswith("trunk.blocks") for n in heads)
