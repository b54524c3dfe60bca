import json

import pytest
import torch
from conftest import TINY_MODELS, images_for, tiny

from amp.io import atomic_write
from amp.models import ModelSpecError, load_model, load_pruned, save_pruned
from amp.scoring import random_scores
from amp.surgery import prune


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_save_load_round_trip_is_bit_identical(name, tmp_path):
    backbone = tiny(name)
    scores = random_scores(backbone, seed=1)
    widths = [max(1, w // (2 + i)) for i, w in enumerate(backbone.widths())]
    prune(backbone.sites(), scores.orders(), widths)
    save_pruned(backbone, tmp_path / "m", criterion={"name": "entropy"}, threshold=0.01)
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.widths() == widths
    x = images_for(backbone)
    with torch.no_grad():
        assert torch.equal(backbone.embed(x, project=True), loaded.embed(x, project=True))
        if hasattr(backbone.model, "encode_text"):  # the text tower travels untouched
            tokens = backbone.tokenizer(["a photo of a cat"])
            assert torch.equal(backbone.model.encode_text(tokens), loaded.model.encode_text(tokens))
    meta = json.loads((tmp_path / "m" / "amp.json").read_text())
    assert meta["widths"] == widths and meta["threshold"] == 0.01 and meta["arch"] == backbone.arch
    assert "torch" in meta["versions"]


def test_load_builds_on_meta_without_dense_weights(tmp_path, monkeypatch):
    backbone = tiny("open_clip")
    save_pruned(backbone, tmp_path / "m")
    import amp.models

    devices = []
    real = amp.models.build_architecture
    monkeypatch.setattr(
        amp.models, "build_architecture", lambda arch, device: devices.append(device) or real(arch, device)
    )
    loaded = load_pruned(tmp_path / "m")
    assert devices == ["meta"]
    assert not any(p.is_meta for p in loaded.model.parameters())


def test_missing_or_broken_model_dir(tmp_path):
    with pytest.raises(ModelSpecError, match="not a pruned amp model"):
        load_pruned(tmp_path)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_a_bias_added_by_compensation_survives_the_round_trip(tmp_path):
    spec, kwargs = TINY_MODELS["timm_vit"]
    backbone = load_model(spec, **kwargs, proj_bias=False)  # MLPs without biases ...
    site = backbone.sites()[0]
    assert site.fc_out.bias is None
    site.fc_out.bias = torch.nn.Parameter(torch.randn(site.fc_out.out_features))  # ... one given a bias
    save_pruned(backbone, tmp_path / "m")
    x = images_for(backbone)
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "m").embed(x), backbone.embed(x))


def test_a_pruned_zoo_model_preprocesses_like_its_base(tmp_path):
    from PIL import Image

    base = load_model("zoo:tiny-clip")
    save_pruned(base, tmp_path / "m")
    loaded = load_pruned(tmp_path / "m")
    image = Image.fromarray((torch.arange(28 * 28) % 255).reshape(28, 28).to(torch.uint8).numpy())
    assert torch.equal(base.preprocess(image), loaded.preprocess(image))
    assert loaded.arch == base.arch and loaded.adapter.family == "tiny-clip"
