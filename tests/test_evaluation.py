"""Evaluation metrics on hand-made cases with known answers, plus a smoke run on tiny real models."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny
from torch import nn

from amp.adapters import BackboneAdapter
from amp.data import make_loader
from amp.evaluation import (
    DEFAULT_TEMPLATES,
    compare_models,
    compare_throughput,
    dataset_classnames,
    embed_dataset,
    embedding_fidelity,
    imagenet_templates,
    knn_classification,
    knn_eval,
    retrieval,
    throughput,
    zero_shot_classification,
    zero_shot_classifier,
)
from amp.models import Backbone


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids oversubscription stalls (~100x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- a fake CLIP: an image *is* its embedding (shape (D, 1, 1)); a text is looked up in a table --------


class FakeCLIP(nn.Module):
    def __init__(self, texts: dict[str, torch.Tensor], dim: int):
        super().__init__()
        self.vocab = {text: i for i, text in enumerate(texts)}
        table = torch.stack(list(texts.values())) if texts else torch.zeros(0, dim)
        self.table = nn.Parameter(table.float())
        self.scale = nn.Parameter(torch.ones(dim))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1) * self.scale

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens]


class FakeAdapter(BackboneAdapter):
    family = "fake"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, FakeCLIP)

    def embed(self, model: nn.Module, images: torch.Tensor, project: bool = False) -> torch.Tensor:
        return model.encode_image(images)

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        return (model.scale.numel(), 1, 1)


def fake_backbone(texts: dict[str, torch.Tensor] | None = None, dim: int = 4) -> Backbone:
    model = FakeCLIP(texts or {}, dim)

    def tokenizer(strings: list[str]) -> torch.Tensor:
        return torch.tensor([model.vocab[s] for s in strings])

    return Backbone(model.eval(), FakeAdapter(), "fake", {"family": "fake"}, tokenizer=tokenizer)


def as_image(vector) -> torch.Tensor:
    return torch.as_tensor(vector, dtype=torch.float32).reshape(-1, 1, 1)


def angle(degrees: float) -> torch.Tensor:
    r = math.radians(degrees)
    return torch.tensor([math.cos(r), math.sin(r)])


def one_hot(i: int, n: int) -> torch.Tensor:
    return torch.eye(n)[i]


# --- zero-shot classification ------------------------------------------------------------------

CLASSES = [f"c{i}" for i in range(6)]


def labelled_loader(labels: list[int], n: int = 6, batch_size: int = 4):
    return make_loader([(as_image(one_hot(y, n)), y) for y in labels], batch_size=batch_size)


def zero_shot_backbone() -> Backbone:
    # every template of class i embeds to e_i (scaled, so normalisation matters)
    texts = {t.format(c=c): (i + 1) * one_hot(i, 6) for i, c in enumerate(CLASSES) for t in DEFAULT_TEMPLATES}
    return fake_backbone(texts, dim=6)


def test_zero_shot_classifier_is_normalised_one_hot():
    classifier = zero_shot_classifier(zero_shot_backbone(), CLASSES)
    assert classifier.shape == (6, 6)
    torch.testing.assert_close(classifier, torch.eye(6))


def test_zero_shot_perfect():
    labels = [0, 1, 2, 3, 4, 5, 0, 3]
    result = zero_shot_classification(zero_shot_backbone(), labelled_loader(labels), CLASSES)
    assert result["top1"] == 1.0 and result["top5"] == 1.0 and result["mean_per_class_recall"] == 1.0
    assert result["count"] == 8


def test_zero_shot_permuted_classifier():
    # class j's weight is e_{perm[j]}: an image of class i is predicted as perm^-1(i); fixed points: 0, 1, 2
    perm = [0, 1, 2, 4, 5, 3]
    classifier = torch.stack([one_hot(p, 6) for p in perm], dim=1)
    labels = [0, 0, 0, 1, 3, 3, 4, 5]  # correct: 0, 0, 0, 1 -> 4 of 8
    result = zero_shot_classification(zero_shot_backbone(), labelled_loader(labels), CLASSES, classifier=classifier)
    assert result["top1"] == 0.5
    # per-class recall over classes present (0, 1, 3, 4, 5): 1, 1, 0, 0, 0
    assert result["mean_per_class_recall"] == pytest.approx(0.4)


def test_zero_shot_top5_hand_made():
    # image of class 0 scores classes by decreasing similarity c0 < c1 < ... < c5: class 0 ranks last
    classifier = torch.nn.functional.normalize(torch.stack([torch.tensor([1.0, k]) for k in range(6)], dim=1), dim=0)
    images = [(as_image([1.0, 100.0]), 0), (as_image([1.0, 100.0]), 5), (as_image([1.0, 100.0]), 1)]
    backbone = fake_backbone(dim=2)
    backbone.tokenizer = lambda s: torch.zeros(len(s), dtype=torch.long)  # is_clip, never used
    result = zero_shot_classification(backbone, make_loader(images, 3), CLASSES, classifier=classifier)
    assert result["top1"] == pytest.approx(1 / 3)  # only the class-5 image
    assert result["top5"] == pytest.approx(2 / 3)  # class 1 is 5th, class 0 is 6th


def test_zero_shot_errors():
    backbone = zero_shot_backbone()
    with pytest.raises(ValueError, match="unlabelled"):
        zero_shot_classification(backbone, make_loader([(as_image(one_hot(0, 6)), -1)], 1), CLASSES)
    with pytest.raises(ValueError, match="6 classes"):
        zero_shot_classification(backbone, labelled_loader([0]), CLASSES[:5], classifier=torch.eye(6))
    no_text = Backbone(backbone.model, backbone.adapter, "fake", {})
    with pytest.raises(ValueError, match="text tower"):
        zero_shot_classifier(no_text, CLASSES)


def test_bundled_templates_and_classnames():
    templates = imagenet_templates()
    assert len(templates) == 80 and all("{c}" in t for t in templates)
    assert len(dataset_classnames("imagenet1k")) == 1000


# --- retrieval ---------------------------------------------------------------------------------


def test_retrieval_exact_match():
    n = 5
    texts = {f"t{i}": one_hot(i, n) for i in range(n)}
    items = [(as_image(one_hot(i, n)), f"t{i}") for i in range(n)]
    result = retrieval(fake_backbone(texts, n), make_loader(items, 2), recall_k=(1, 5))
    for key in ("i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5"):
        assert result[key] == 1.0
    assert result["images"] == 5 and result["texts"] == 5


def test_retrieval_crafted_half():
    # images at 0° and 90°; captions at 10° (image 0's) and 30° (image 1's)
    # t2i: 10° -> image 0 (hit), 30° -> image 0 (miss): 0.5.  i2t: 0° -> 10° (hit), 90° -> 30° (hit): 1.0
    texts = {"a": angle(10), "b": angle(30)}
    items = [(as_image(angle(0)), "a"), (as_image(angle(90)), ["b"])]
    result = retrieval(fake_backbone(texts, 2), make_loader(items, 1), recall_k=(1, 2, 10))
    assert result["t2i_R@1"] == 0.5 and result["i2t_R@1"] == 1.0
    assert result["t2i_R@2"] == 1.0 and result["t2i_R@10"] == 1.0  # k beyond the gallery: everything retrieved


def test_retrieval_any_positive_counts():
    # image 0 has captions at 80° (far) and 5° (near); image 1 at 90° has caption at 60°
    # i2t@1: image 0 -> 5° (its own), image 1 -> 80° (image 0's): 0.5
    # t2i@1: 80° -> image 1 (miss), 5° -> image 0 (hit), 60° -> image 1 (hit): 2/3
    texts = {"far": angle(80), "near": angle(5), "other": angle(60)}
    items = [(as_image(angle(0)), ["far", "near"]), (as_image(angle(90)), ["other"])]
    result = retrieval(fake_backbone(texts, 2), make_loader(items, 2), recall_k=(1,))
    assert result["i2t_R@1"] == 0.5
    assert result["t2i_R@1"] == pytest.approx(2 / 3)
    assert result["texts"] == 3


# --- kNN -----------------------------------------------------------------------------------------


def test_knn_separable_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(6) * 10
    train_labels = torch.arange(6).repeat(10)
    test_labels = torch.arange(6).repeat(3)
    train = centres[train_labels] + torch.randn(60, 6, generator=g)
    test = centres[test_labels] + torch.randn(18, 6, generator=g)
    result = knn_classification(train, train_labels, test, test_labels, k=5)
    assert result["top1"] == 1.0 and result["top5"] == 1.0


def test_knn_hand_computed_temperature():
    # neighbours of the query (at 0°): A at 0° (sim 1), B at ±~25.8° (sim 0.9 each)
    c = 0.9
    s = math.sqrt(1 - c * c)
    train = torch.tensor([[1.0, 0.0], [c, s], [c, -s], [-1.0, 0.0]])
    train_labels = torch.tensor([0, 1, 1, 2])
    test, test_labels = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    # T=0.07: e^(1/0.07) vs 2 e^(0.9/0.07): ratio e^(0.1/0.07)/2 ~ 2.1 > 1 -> class 0 wins
    assert knn_classification(train, train_labels, test, test_labels, k=3, temperature=0.07)["top1"] == 1.0
    # T=1: e^1 vs 2 e^0.9 -> class 1 wins
    assert knn_classification(train, train_labels, test, test_labels, k=3, temperature=1.0)["top1"] == 0.0
    # k=1: only the nearest votes
    assert knn_classification(train, train_labels, test, test_labels, k=1, temperature=1.0)["top1"] == 1.0
    # fewer than 5 classes: top-5 undefined, as in clip_benchmark
    assert math.isnan(knn_classification(train, train_labels, test, test_labels, k=3)["top5"])
    # k is capped at the training set size
    assert knn_classification(train, train_labels, test, test_labels, k=100)["k"] == 4


def test_knn_eval_and_embed_dataset():
    backbone = fake_backbone(dim=6)
    train = labelled_loader([0, 1, 2, 3, 4, 5] * 2)
    test = labelled_loader([5, 4, 3])
    features, targets = embed_dataset(backbone, test, progress=False)
    assert features.shape == (3, 6) and targets.tolist() == [5, 4, 3]
    torch.testing.assert_close(features.norm(dim=1), torch.ones(3))
    assert knn_eval(backbone, train, test, k=2)["top1"] == 1.0


# --- fidelity and throughput --------------------------------------------------------------------


def test_embedding_fidelity():
    backbone = fake_backbone(dim=2)
    loader = make_loader([(as_image(angle(a)), -1) for a in (0, 45, 90)], batch_size=2)
    same = embedding_fidelity(backbone, backbone, loader)
    assert same["mean_cosine"] == pytest.approx(1.0) and same["min_cosine"] == pytest.approx(1.0)
    other = fake_backbone(dim=2)
    with torch.no_grad():
        other.model.scale.copy_(torch.tensor([1.0, 0.0]))  # projects onto the x axis
    result = embedding_fidelity(backbone, other, loader)
    assert result["min_cosine"] == pytest.approx(0.0, abs=1e-6)
    assert result["mean_cosine"] == pytest.approx((1 + math.cos(math.radians(45)) + 0) / 3)
    assert result["count"] == 3


@pytest.fixture(scope="module")
def tiny_vit() -> Backbone:
    return tiny("timm_vit")


def test_throughput_and_side_by_side(tiny_vit):
    model = tiny_vit.model
    model.train()
    assert throughput(tiny_vit, batch_size=2, steps=2, warmup=1) > 0
    assert model.training  # train flag restored
    result = compare_throughput(tiny_vit, tiny_vit, batch_size=2, steps=1, warmup=1, rounds=2)
    assert result["dense"] > 0 and result["pruned"] > 0 and result["speedup"] > 0
    assert throughput(tiny_vit, batch_size=1, input_size=(3, 32, 32), steps=1, warmup=0, dtype=torch.bfloat16) > 0


def test_compare_models_report(tiny_vit):
    loader = make_loader([(torch.rand(3, 32, 32), -1) for _ in range(3)], batch_size=2)
    report = compare_models(tiny_vit, tiny_vit, loader, batch_size=1, steps=1)
    assert report["fidelity"]["mean_cosine"] == pytest.approx(1.0)
    assert report["throughput"]["speedup"] > 0
    assert set(report) == {"dense", "pruned", "fidelity", "throughput"}


# --- a real (tiny, random-init) open_clip model through the same code paths ---------------------


@pytest.fixture(scope="module")
def tiny_clip() -> Backbone:
    return tiny("open_clip")


def test_tiny_open_clip_zero_shot_and_retrieval(tiny_clip):
    classes = ["cat", "dog", "car", "tree", "boat", "house"]
    g = torch.Generator().manual_seed(0)
    items = [(torch.rand(3, 32, 32, generator=g), i % 6) for i in range(8)]
    classifier = zero_shot_classifier(tiny_clip, classes, templates=["a photo of a {c}.", "a {c}."])
    assert classifier.shape == (32, 6)
    result = zero_shot_classification(tiny_clip, make_loader(items, 4), classes, classifier=classifier)
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
    assert 0.0 <= result["mean_per_class_recall"] <= 1.0

    captioned = [(image, [f"a photo of a {classes[y]}.", classes[y]]) for image, y in items]
    scores = retrieval(tiny_clip, make_loader(captioned, 4), recall_k=(1, 5))
    assert set(scores) == {"i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5", "images", "texts"}
    assert all(0.0 <= scores[k] <= 1.0 for k in scores if "@" in k)
    assert scores["texts"] == 16
