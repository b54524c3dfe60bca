"""zoo:tiny-clip: architecture registration, checksum check, training determinism, and that the weights are trained."""

from __future__ import annotations

import json
import shutil

import open_clip
import pytest
import torch

from amp.models import ModelSpecError, load_model
from amp.zoo import tiny_clip
from amp.zoo.train_tiny_clip import TrainConfig, save_weights, train

torch.set_num_threads(2)


def test_architecture_registered_on_meta():
    model = open_clip.create_model("amp-tiny-clip", device="meta")
    assert model.visual.image_size == (64, 64)
    tokens = open_clip.get_tokenizer("amp-tiny-clip")(["a large red sneaker on the left"])
    assert tokens.shape == (1, 32)


def test_checksum_mismatch_raises(tmp_path, monkeypatch):
    source = tiny_clip.zoo_dir()
    for name in (tiny_clip.WEIGHTS_NAME, tiny_clip.META_NAME):
        shutil.copy(source / name, tmp_path / name)
    weights = tmp_path / tiny_clip.WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelSpecError, match=r"sha256.*re-run `python -m amp\.zoo\.train_tiny_clip"):
        tiny_clip.load_tiny_clip(directory=tmp_path)
    monkeypatch.setenv("AMP_ZOO_DIR", str(tmp_path))
    with pytest.raises(ModelSpecError, match="sha256"):
        load_model("zoo:tiny-clip")
    weights.unlink()
    with pytest.raises(ModelSpecError, match=r"not found.*train_tiny_clip"):
        load_model("zoo:tiny-clip")


def test_training_is_deterministic(tmp_path):
    config = TrainConfig(steps=2, caption_batch=6, class_batch=4, warmup=1, subset=True, items=64)
    first, _ = train(config, progress=False)
    second, _ = train(config, progress=False)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    initial = open_clip.create_model("amp-tiny-clip").state_dict()
    assert not torch.equal(initial["visual.conv1.weight"], a["visual.conv1.weight"])  # it did train
    path = save_weights(first, tmp_path)
    assert path.is_file() and not list(tmp_path.glob("*.tmp"))
    other, _ = train(TrainConfig(**{**config.__dict__, "seed": 1}), progress=False)
    assert not torch.equal(other.state_dict()["visual.conv1.weight"], a["visual.conv1.weight"])


def test_zoo_tiny_clip_is_trained():
    from torch.utils.data import Subset

    from amp.data import load_dataset, make_loader
    from amp.evaluation import zero_shot_classification
    from amp.zoo.fashion import FASHION_CLASSES, FASHION_TEMPLATES

    backbone = load_model("zoo:tiny-clip")
    assert backbone.is_clip and backbone.spec == "zoo:tiny-clip"
    assert backbone.arch == {"family": "tiny-clip", "name": "amp-tiny-clip", "kwargs": {}}
    assert backbone.info["weights"].endswith("tiny-clip.safetensors") and len(backbone.sites()) >= 4
    meta = json.loads((tiny_clip.zoo_dir() / tiny_clip.META_NAME).read_text())
    assert backbone.info["sha256"] == meta["sha256"]
    dataset = load_dataset("fashion-mnist:test-subset", backbone.preprocess)
    loader = make_loader(Subset(dataset, range(0, 2000, 4)), batch_size=250)
    result = zero_shot_classification(backbone, loader, FASHION_CLASSES, FASHION_TEMPLATES)
    assert result["top1"] > 0.6  # chance is 0.1
