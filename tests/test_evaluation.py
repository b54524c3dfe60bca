"""Evaluation metrics on hand-made cases with known answers, the suite against them, and tiny real models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny
from torch import nn

from amp.adapters import BackboneAdapter
from amp.data import load_dataset, make_loader
from amp.evaluation import (
    DEFAULT_TEMPLATES,
    EvalSuite,
    compare_throughput,
    dataset_classnames,
    embed_dataset,
    embedding_fidelity,
    evaluate,
    first_items,
    imagenet_templates,
    knn_classification,
    knn_eval,
    knn_hits,
    retrieval,
    retrieval_hits,
    text_tower_key,
    throughput,
    zero_shot_classification,
    zero_shot_classifier,
    zero_shot_prompts,
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


def test_per_item_hits_behind_the_means():
    # the crafted retrieval case above, per query: t2i 10° hit, 30° miss; i2t both hits
    texts = {"a": angle(10), "b": angle(30)}
    items = [(as_image(angle(0)), "a"), (as_image(angle(90)), ["b"])]
    hits = retrieval_hits(fake_backbone(texts, 2), make_loader(items, 1), recall_k=(1,))
    assert hits["t2i_R@1"].tolist() == [True, False] and hits["i2t_R@1"].tolist() == [True, True]
    c, s = 0.9, math.sqrt(1 - 0.81)
    train, train_labels = torch.tensor([[1.0, 0.0], [c, s], [c, -s]]), torch.tensor([0, 1, 1])
    test, test_labels = torch.tensor([[1.0, 0.0], [c, s]]), torch.tensor([0, 0])
    assert knn_hits(train, train_labels, test, test_labels, k=3)["top1"].tolist() == [True, False]


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


# --- the evaluation suite: the same numbers as the functions above, one row per model ------------------------

CLASSIFICATION, CAPTIONS, NEIGHBOURS = (
    "fashion-mnist:test-subset",
    "fmnist-captions:test-subset",
    "fashion-mnist:train-subset",
)


def first_loader(backbone: Backbone, spec: str, n: int, batch_size: int = 16):
    return make_loader(first_items(load_dataset(spec, backbone.preprocess), n), batch_size)


def variant_of(dense: Backbone) -> Backbone:
    """A pruned-like variant: the same text tower and transform, a perturbed image tower."""
    variant = copy.deepcopy(dense)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in variant.vision.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return variant


@pytest.fixture(scope="module")
def suite(tiny_clip) -> EvalSuite:
    return EvalSuite(tiny_clip, CLASSIFICATION, CAPTIONS, NEIGHBOURS, max_images=40, knn_images=64, batch_size=16)


def test_suite_row_equals_the_functions(suite, tiny_clip):
    variant = variant_of(tiny_clip)
    row = suite.measure(variant, "variant")
    test = first_loader(variant, CLASSIFICATION, 40)
    names, templates = zero_shot_prompts(CLASSIFICATION, test.dataset)
    zs = zero_shot_classification(variant, test, names, templates)
    assert (row["zero_shot_top1"], row["zero_shot_top5"]) == (zs["top1"], zs["top5"])
    recall = retrieval(variant, first_loader(variant, CAPTIONS, 40))
    assert {k: row[k] for k in recall} == recall
    knn = knn_eval(variant, first_loader(variant, NEIGHBOURS, 64), test)
    assert row["knn_top1"] == knn["top1"]
    assert row["fidelity_cosine"] == embedding_fidelity(tiny_clip, variant, test)["mean_cosine"]
    assert row["params_M"] > 0 and row["gflops"] > 0
    # per-item outcomes behind every averaged metric, on the suite's items
    assert row.outcome("zero_shot_top1").dtype == torch.bool and len(row.outcome("zero_shot_top1")) == 40
    assert len(row.outcome("t2i_R@1")) == row["texts"] and len(row.outcome("i2t_R@10")) == row["images"] == 40
    assert row.outcome("fidelity_cosine").dtype == torch.float32
    low, high = row.interval("zero_shot_top1")
    assert low <= row["zero_shot_top1"] <= high
    assert row.interval("fidelity_cosine")[0] <= row["fidelity_cosine"] <= row.interval("fidelity_cosine")[1]
    with pytest.raises(KeyError, match="per-item"):
        row.outcome("params_M")


def test_suite_caches_data_heads_and_dense_embeddings(suite, tiny_clip):
    dense_row = suite.measure(tiny_clip, "dense")
    assert "fidelity_cosine" not in dense_row.metrics  # the dense model is the reference
    loaded, heads = len(suite._loaded), len(suite._heads)
    variant = variant_of(tiny_clip)
    assert text_tower_key(variant) == text_tower_key(tiny_clip)
    row = suite.measure(variant, "variant")
    assert (len(suite._loaded), len(suite._heads), len(suite._dense_features)) == (loaded, heads, 1)
    assert suite.zero_shot(variant) == {CLASSIFICATION: row["zero_shot_top1"]}  # reproduce.Benchmark's shapes
    assert suite.recall(variant)[CAPTIONS]["i2t_R@5"] == row["i2t_R@5"]


def test_suite_names_several_sets_and_measures_speed(tiny_clip):
    suite = EvalSuite(tiny_clip, {"a": CLASSIFICATION, "b": CLASSIFICATION}, max_images=8, batch_size=8)
    row = suite.measure(tiny_clip, speed={"batch_size": 2, "steps": 1, "warmup": 0, "rounds": 1})
    assert row.value("zero_shot_top1", "a") == row["a/zero_shot_top1"] == row["b/zero_shot_top1"]
    with pytest.raises(KeyError, match="2 metrics"):
        row.key("zero_shot_top1")
    assert row["images_per_s"] > 0 and "speedup" not in row.metrics  # the dense model alone
    speed = EvalSuite(tiny_clip).speed(variant_of(tiny_clip), {"batch_size": 2, "steps": 1, "warmup": 0})
    assert speed["speedup"] > 0 and speed["dense_images_per_s"] > 0


def test_evaluate_is_one_row_with_intervals(tiny_clip):
    report = evaluate(tiny_clip, classification=CLASSIFICATION, max_images=8, batch_size=8, throughput_batch=2,
                      intervals=True)  # fmt: skip
    assert report["widths"] == tiny_clip.widths() and report["images_per_s"] > 0
    assert set(report["intervals"]) == {"zero_shot_top1", "zero_shot_top5"}
    low, high = report["intervals"]["zero_shot_top1"]
    assert low <= report["zero_shot_top1"] <= high


# --- class names of ImageNet-style folders, in evaluation and in the class cross-entropy --------------------------


def _wnid_folders(root, wnids):
    from PIL import Image

    for wnid in wnids:
        (root / wnid).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(root / wnid / "0.png")
    return root


def test_zero_shot_prompts_name_a_wordnet_subset_by_id(tmp_path):
    """An ImageNet-A/-R style folder (a subset of the 1000 ids) is named by each folder's id, not by position."""
    # independent facts: n01443537 goldfish, n01498041 stingray, n12267677 acorn (classes 1, 6 and 988)
    root = _wnid_folders(tmp_path / "in-a", ["n12267677", "n01443537", "n01498041"])
    spec = f"imagefolder:{root}"
    names, templates = zero_shot_prompts(spec, load_dataset(spec))
    assert names == ["goldfish", "stingray", "acorn"] and templates == imagenet_templates()
    v2 = [str(i) for i in range(1000)]
    names, _ = zero_shot_prompts("imagefolder:/v2", type("V2", (), {"classes": sorted(v2)})())
    assert names[:3] == ["tench", "goldfish", dataset_classnames()[10]]  # sorted as strings: 0, 1, 10, ...


def test_class_cross_entropy_prompts_wordnet_folders_by_name(tmp_path):
    from amp.criteria import ClassCrossEntropy, build_criterion

    root = _wnid_folders(tmp_path / "train", ["n01440764", "n01443537"])
    backbone, seen = fake_backbone(dim=3), []

    def head(model, classnames, device="cpu"):
        seen.append(classnames)
        return torch.arange(6.0).reshape(3, 2)  # (embed_dim 3, classes 2)

    criterion = build_criterion("cross_entropy", backbone, dataset=load_dataset(f"imagefolder:{root}"),
                                zero_shot_head=head)  # fmt: skip
    assert seen == [["tench", "goldfish"]] and isinstance(criterion, ClassCrossEntropy)
    assert criterion.classifier.shape == (2, 3)  # one row per class, from the documented orientation
    with pytest.raises(ValueError, match=r"\(2, 3\) head for 2 classes; it must be \(embed_dim, 2\)"):
        build_criterion("cross_entropy", backbone, dataset=load_dataset(f"imagefolder:{root}"),
                        zero_shot_head=lambda *a, **k: torch.zeros(2, 3))  # fmt: skip
