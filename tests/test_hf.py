"""transformers backbones (hf:...), offline: each family from its config class with tiny random weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import amp  # noqa: E402
from amp import hf  # noqa: E402
from amp.adapters import ModelSpecError, UnsupportedModelError  # noqa: E402
from amp.evaluation import retrieval_hits, zero_shot_classifier  # noqa: E402
from amp.surgery import keep_units, mask_units  # noqa: E402

MEAN, STD = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]  # no processor's default: the record must carry them
WORDS = ["a", "photo", "of", "the", "shirt", "shoe", "bag", "cat", "dog", "."]
TOWER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 28, "patch_size": 14}
TEXT = {"vocab_size": len(WORDS) + 3, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 12}  # fmt: skip


def _clip_config():
    return transformers.CLIPConfig(
        text_config={**TEXT, "eos_token_id": 2, "pad_token_id": 1},
        vision_config={**TOWER, "intermediate_size": 64},
        projection_dim=16,
    )


def _siglip_config():
    return transformers.SiglipConfig(text_config=TEXT, vision_config={**TOWER, "intermediate_size": 64})


def _crop_processor(cls):
    return cls(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, image_mean=MEAN, image_std=STD)


def _square_processor(cls):
    return cls(size={"height": 28, "width": 28}, image_mean=MEAN, image_std=STD, resample=2)


# name -> (model class, config, image processor, whether it has a text tower)
FAMILIES = {
    "clip": ("CLIPModel", _clip_config, lambda: _crop_processor(transformers.CLIPImageProcessor), True),
    "clip_vision_proj": (
        "CLIPVisionModelWithProjection",
        lambda: transformers.CLIPVisionConfig(**TOWER, intermediate_size=64, projection_dim=16),
        lambda: _crop_processor(transformers.CLIPImageProcessor),
        False,
    ),
    "siglip": ("SiglipModel", _siglip_config, lambda: _square_processor(transformers.SiglipImageProcessor), True),
    "siglip_vision": (
        "SiglipVisionModel",
        lambda: transformers.SiglipVisionConfig(**TOWER, intermediate_size=64),
        lambda: _square_processor(transformers.SiglipImageProcessor),
        False,
    ),
    "dinov2": (
        "Dinov2Model",
        lambda: transformers.Dinov2Config(**TOWER, mlp_ratio=2),
        lambda: _crop_processor(transformers.BitImageProcessor),
        False,
    ),
    "dinov2_swiglu": (
        "Dinov2Model",
        lambda: transformers.Dinov2Config(**TOWER, mlp_ratio=4, use_swiglu_ffn=True),
        lambda: _crop_processor(transformers.BitImageProcessor),
        False,
    ),
    "vit": (
        "ViTModel",
        lambda: transformers.ViTConfig(**TOWER, intermediate_size=64),
        lambda: _square_processor(transformers.ViTImageProcessor),
        False,
    ),
}


def _tokenizer():
    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    inner = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    inner.normalizer = tokenizers.normalizers.Lowercase()
    inner.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=inner, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )


def checkpoint(tmp_path, name: str, seed: int = 0) -> str:
    """A tiny random checkpoint of family ``name`` laid out by transformers itself (model, processor, tokenizer)."""
    cls, config, processor, text = FAMILIES[name]
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(config())
    with torch.no_grad():  # random init leaves biases zero and LayerScale constant; every path should carry signal
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    directory = tmp_path / f"{name}-src"
    model.save_pretrained(directory)
    processor().save_pretrained(directory)
    if text:
        _tokenizer().save_pretrained(directory)
    return str(directory)


class Pictures(Dataset):
    """Seeded random PIL pictures through a transform, with captions (a retrieval set)."""

    def __init__(self, transform, count: int = 12, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.images = [Image.fromarray(rng.integers(0, 256, (30, 36, 3), dtype=np.uint8)) for _ in range(count)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), f"a photo of the {WORDS[4 + index % 5]}"


def _images(backbone, n: int = 3) -> torch.Tensor:
    return torch.stack([Pictures(backbone.preprocess, n)[i][0] for i in range(n)])


@pytest.fixture(params=list(FAMILIES))
def family(request, tmp_path, one_thread):
    return request.param, checkpoint(tmp_path, request.param)


def test_each_family_loads_through_its_own_class(family):
    name, source = family
    backbone = amp.load_model(f"hf:{source}")
    reference = getattr(transformers, FAMILIES[name][0]).from_pretrained(source).eval()
    assert isinstance(backbone.adapter, hf.HFAdapter) and backbone.arch["class"] == FAMILIES[name][0]
    assert backbone.is_clip == FAMILIES[name][3]
    x = _images(backbone)
    with torch.no_grad():
        if hasattr(reference, "get_image_features"):
            expected = reference.get_image_features(pixel_values=x)
            expected = getattr(expected, "pooler_output", expected)
        elif name == "vit":
            expected = reference(pixel_values=x).pooler_output
        else:
            out = reference(pixel_values=x)
            expected = getattr(out, "image_embeds", None)
            expected = out.pooler_output if expected is None else expected
        torch.testing.assert_close(backbone.embed(x, project=True), expected, rtol=0, atol=0)
    gated = name == "dinov2_swiglu"
    assert all(site.gated == gated for site in backbone.sites())


def test_the_transform_is_the_image_processors(family):
    _, source = family
    backbone = amp.load_model(f"hf:{source}")
    processor = transformers.AutoImageProcessor.from_pretrained(source)
    assert backbone.arch["preprocess"]["image_mean"] == MEAN
    picture = Pictures(lambda image: image, 1)[0][0]
    ours, theirs = backbone.preprocess(picture), processor(images=picture, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 28, 28)
    # PIL's and torchvision's resampling may round a pixel one grey level apart
    torch.testing.assert_close(ours, theirs, atol=1 / 255 / min(STD) + 1e-6, rtol=0)


def test_sliced_equals_masked(family):
    _, source = family
    sliced, masked = amp.load_model(f"hf:{source}"), amp.load_model(f"hf:{source}")
    x = _images(sliced)
    for i, (s, m) in enumerate(zip(sliced.sites(), masked.sites())):
        keep = torch.randperm(s.hidden, generator=torch.Generator().manual_seed(i))[: s.hidden // 3]
        keep_units(s, keep)
        mask_units(m, keep)
    with torch.no_grad():
        torch.testing.assert_close(sliced.embed(x, project=True), masked.embed(x, project=True), atol=1e-5, rtol=1e-5)


def test_partial_forward_equals_the_full_one(family):
    _, source = family
    backbone = amp.load_model(f"hf:{source}")
    adapter, model, x = backbone.adapter, backbone.model, _images(backbone)
    with torch.no_grad():
        full = adapter.embed(model, x, project=True)
        inputs = adapter.block_inputs(model, x, range(2))
        assert torch.equal(adapter.embed_from(model, inputs[1], 1, x.shape, project=True), full)


def _prune(backbone) -> list[int]:
    orders = [torch.randperm(s.hidden, generator=torch.Generator().manual_seed(s.index)) for s in backbone.sites()]
    widths = [s.hidden // 2 - 3 * s.index for s in backbone.sites()]  # different widths per layer
    amp.surgery.prune(backbone.sites(), orders, widths)
    return widths


def test_save_pruned_then_load_pruned_is_bit_exact(family, tmp_path):
    _, source = family
    backbone = amp.load_model(f"hf:{source}")
    widths = _prune(backbone)
    amp.save_pruned(backbone, tmp_path / "pruned")
    record = json.loads((tmp_path / "pruned" / "amp.json").read_text())
    assert record["arch"]["config"] and record["widths"] == widths
    loaded = amp.load_pruned(tmp_path / "pruned")
    assert loaded.widths() == widths and loaded.adapter is backbone.adapter
    picture = Pictures(lambda image: image, 1)[0][0]
    assert torch.equal(loaded.preprocess(picture), backbone.preprocess(picture))
    x = _images(backbone)
    with torch.no_grad():
        assert torch.equal(loaded.embed(x, project=True), backbone.embed(x, project=True))
        assert torch.equal(loaded.embed(x), backbone.embed(x))
        if backbone.is_clip:
            tokens = loaded.tokenizer(["a photo of the cat", "the dog"])
            assert torch.equal(loaded.model.encode_text(tokens), backbone.model.encode_text(tokens))
    meta = amp.load_pruned(tmp_path / "pruned", device="meta")
    assert meta.widths() == widths


def test_pruned_model_saves_back_as_a_plain_transformers_model(family, tmp_path):
    name, source = family
    backbone = amp.load_model(f"hf:{source}")
    widths = _prune(backbone)
    hf.save_pretrained(backbone, tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config.get("vision_config", config)[hf.WIDTHS_KEY] == widths
    assert (tmp_path / "plain" / "preprocessor_config.json").is_file()
    cls = getattr(transformers, FAMILIES[name][0])
    with pytest.raises(RuntimeError, match="mismatched"):  # its config has one intermediate_size for all layers
        cls.from_pretrained(tmp_path / "plain")
    plain = hf.from_pretrained_pruned(tmp_path / "plain")
    assert type(plain) is cls
    reloaded = amp.load_model(f"hf:{tmp_path / 'plain'}")  # hf: reads a pruned directory too
    assert reloaded.widths() == widths and reloaded.is_clip == backbone.is_clip
    x = _images(backbone)
    with torch.no_grad():
        assert torch.equal(reloaded.embed(x, project=True), backbone.embed(x, project=True))
        wrapped = hf._split(plain.eval())
        assert torch.equal(backbone.adapter.embed(wrapped, x, project=True), backbone.embed(x, project=True))


@pytest.mark.parametrize("name", ["clip", "siglip", "dinov2_swiglu"])
def test_score_then_search_runs(name, tmp_path, one_thread):
    backbone = amp.load_model(f"hf:{checkpoint(tmp_path, name)}")
    data = Pictures(backbone.preprocess, 16)
    scores = amp.score(backbone, data, criterion="entropy", batch_size=8)
    result = amp.search(backbone, scores, data, threshold=0.05, batch_size=8)
    assert backbone.widths() == result["widths"]
    stats = amp.model_stats(backbone)
    assert 0 < stats.mlp_params < stats.params and stats.flops > 0


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_zero_shot_and_retrieval_use_the_models_text_tower(name, tmp_path, one_thread):
    backbone = amp.load_model(f"hf:{checkpoint(tmp_path, name)}")
    classifier = zero_shot_classifier(backbone, ["shirt", "shoe", "bag"], ["a photo of the {c}."])
    assert classifier.shape == (backbone.embed(_images(backbone, 1), project=True).shape[1], 3)
    loader = torch.utils.data.DataLoader(Pictures(backbone.preprocess, 6), batch_size=3, collate_fn=_captions)
    hits = retrieval_hits(backbone, loader, recall_k=(1,))
    assert hits["t2i_R@1"].shape == (6,) and hits["i2t_R@1"].shape == (6,)


def _captions(batch):
    return torch.stack([image for image, _ in batch]), [caption for _, caption in batch]


def test_distillation_sees_the_vision_tower_and_its_head(tmp_path, one_thread):
    backbone = amp.load_model(f"hf:{checkpoint(tmp_path, 'clip')}")
    tower = backbone.vision
    assert isinstance(tower, transformers.CLIPVisionModelWithProjection)
    names = backbone.adapter.head_parameter_names(backbone.model)
    assert "visual_projection.weight" in names and "vision_model.post_layernorm.weight" in names
    assert backbone.adapter.embed(tower, _images(backbone)).shape == (3, 32)  # the tower alone, as distillation runs
    assert not any(p is q for p in tower.parameters() for q in backbone.model.text.parameters())


def test_unsupported_checkpoints_are_refused_by_name(tmp_path):
    model = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    model.save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelSpecError, match=r"BertModel.*amp loads transformers"):
        amp.load_model(f"hf:{tmp_path / 'bert'}")
    with pytest.raises(ModelSpecError, match="cannot load hf:"):
        amp.load_model(f"hf:{tmp_path / 'missing'}")
    source = checkpoint(tmp_path, "vit")
    (tmp_path / "vit-src" / "preprocessor_config.json").unlink()
    with pytest.raises(ModelSpecError, match="no image processor"):
        amp.load_model(f"hf:{source}")
    adapter = hf.HFViTAdapter()
    with pytest.raises(UnsupportedModelError, match="not supported"):
        adapter.mlp_site(0, "blocks.0.mlp", torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_transformers_stays_optional(monkeypatch):
    """amp.hf imports transformers only when an hf: model is used; without it, hf: is one clear error."""
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # as if it were not installed
    with pytest.raises(ModelSpecError, match="pip install transformers"):
        amp.load_model("hf:some/model")
    assert amp.load_model("timm:vit_tiny_patch16_224", img_size=32, depth=1).widths() == [768]


def test_a_classification_checkpoint_loads_its_backbone(tmp_path, one_thread):
    classifier = transformers.ViTForImageClassification(transformers.ViTConfig(**TOWER, intermediate_size=64)).eval()
    classifier.save_pretrained(tmp_path / "vit-cls")
    _square_processor(transformers.ViTImageProcessor).save_pretrained(tmp_path / "vit-cls")
    backbone = amp.load_model(f"hf:{tmp_path / 'vit-cls'}")
    assert backbone.arch["class"] == "ViTModel" and backbone.adapter.family == "hf_vit"
    x = _images(backbone)
    with torch.no_grad():
        assert torch.equal(backbone.embed(x), classifier.vit(pixel_values=x).last_hidden_state[:, 0])
