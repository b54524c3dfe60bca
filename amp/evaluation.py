"""Evaluation of (pruned) backbones: zero-shot classification, retrieval, kNN, embedding fidelity, throughput.

One place per metric: each is computed per item here (a test image correct or not, a query hit or not, an image's
cosine to the dense model) and averaged; :class:`EvalSuite` holds the evaluation data once and measures any model
into one :class:`EvalRow` that keeps those per-item outcomes, so :mod:`amp.stats` can put intervals on them and
compare two rows item by item.

The functions work on any :class:`amp.models.Backbone`; the metrics come from ``clip_benchmark``
(``zero_shot_classifier``, ``recall_at_k``, ``batchify``, ``dataloader_with_indices``, its templates and class names;
its ``accuracy`` fails under recent numpy (2.4 here), see :func:`_topk_hits`); images always go through
``backbone.embed(images, project=True)`` so any adapter works, and text (CLIP models only) through
``backbone.model.encode_text`` with ``backbone.tokenizer`` (pruning never touches the text tower).

Every function puts the model(s) in eval mode on ``device`` for the call (moving them there) and restores
their train/eval flag afterwards; embeddings and metrics come back on the CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from amp import stats
from amp.accounting import model_stats
from amp.data import check_option, class_names, load_dataset, make_loader
from amp.models import Backbone
from amp.zoo.fashion import FASHION_TEMPLATES

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a blurry photo of a {c}.",
    "a photo of the large {c}.",
    "a photo of the small {c}.",
    "a good photo of a {c}.",
)

# --- helpers ------------------------------------------------------------------------------------


@cache
def _clip_benchmark_json(name: str) -> dict[str, Any]:
    return json.loads(resources.files("clip_benchmark.datasets").joinpath(name).read_text(encoding="utf-8"))


def classification_templates(dataset: str = "imagenet1k") -> list[str]:
    """clip_benchmark's English zero-shot templates for ``dataset`` (``imagenet1k``: the 80 OpenAI ones)."""
    table = _clip_benchmark_json("en_zeroshot_classification_templates.json")
    if dataset not in table:
        raise KeyError(f"clip_benchmark has no templates for {dataset!r}; known: {sorted(table)}")
    return list(table[dataset])


def imagenet_templates() -> list[str]:
    """The 80 OpenAI ImageNet prompt templates (as shipped by clip_benchmark)."""
    return classification_templates("imagenet1k")


def dataset_classnames(dataset: str = "imagenet1k") -> list[str]:
    """clip_benchmark's English class names for ``dataset`` (``imagenet1k``: the OpenAI-cleaned 1000 names)."""
    table = _clip_benchmark_json("en_classnames.json")
    if dataset not in table:
        raise KeyError(f"clip_benchmark has no class names for {dataset!r}; known: {sorted(table)}")
    return list(table[dataset])


@contextlib.contextmanager
def _evaluating(device: torch.device, *models: nn.Module) -> Iterator[None]:
    """Models moved to ``device`` in eval mode, under ``no_grad``; train flags restored on exit."""
    flags = [[m.training for m in model.modules()] for model in models]
    cuda = torch.cuda.device(device) if device.type == "cuda" and device.index is not None else contextlib.nullcontext()
    try:
        for model in models:
            model.to(device).eval()
        with cuda, torch.no_grad():
            yield
    finally:
        for model, saved in zip(models, flags):
            for module, flag in zip(model.modules(), saved):
                module.training = flag


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _require_clip(backbone: Backbone, what: str) -> None:
    if not backbone.is_clip:
        raise ValueError(f"{what} needs a CLIP model with a text tower and tokenizer; {backbone.spec!r} has none")


def _image_embedding(backbone: Backbone, images: torch.Tensor, device: torch.device, project: bool) -> torch.Tensor:
    return F.normalize(backbone.embed(images.to(device), project=project).float(), dim=-1)


def _labels(targets: Any, what: str) -> torch.Tensor:
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point:
        raise ValueError(f"{what} needs integer class targets, got {type(targets).__name__}")
    if len(targets) and int(targets.min()) < 0:
        raise ValueError(
            f"{what} needs labelled data; the data set yields unlabelled images (target -1): use a labelled one, "
            "e.g. imagefolder:<root>/<class>/<image>"
        )
    return targets.long()


def _topk_hits(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per item: is the label among the top 1 (``top1``) and top 5 (``top5``, only with 5 classes or more) scores.

    clip_benchmark's ``accuracy`` computes the same means but fails under recent numpy (2.4) (``float()`` of a
    1-element array), so this is its three lines without the numpy round trip, kept per item.
    """
    topk = (1, 5) if scores.shape[1] >= 5 else (1,)
    correct = scores.topk(max(topk), dim=1).indices == labels.view(-1, 1)
    return {f"top{k}": correct[:, :k].any(dim=1) for k in topk}


def _mean(hits: torch.Tensor | None) -> float:
    """The metric of per-item outcomes: their mean (NaN when undefined, e.g. top-5 of fewer than 5 classes)."""
    return math.nan if hits is None else hits.float().mean().item()


# --- embeddings ---------------------------------------------------------------------------------


def embed_dataset(
    backbone: Backbone,
    loader: Iterable,
    project: bool = True,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | list]:
    """L2-normalised image embeddings of a whole loader (CPU, float32) and its targets (tensor if all ints)."""
    device = torch.device(device)
    features, targets = [], []
    with _evaluating(device, backbone.model):
        for images, target in tqdm(loader, desc="embed", disable=not progress):
            features.append(_image_embedding(backbone, images, device, project).cpu())
            targets.append(target)
    if not features:
        raise ValueError("the loader yielded no batches")
    if all(isinstance(t, torch.Tensor) for t in targets):
        return torch.cat(features), torch.cat([t.cpu() for t in targets])
    return torch.cat(features), [item for batch in targets for item in batch]


# --- zero-shot classification -------------------------------------------------------------------


def zero_shot_classifier(
    backbone: Backbone,
    classnames: Sequence[str],
    templates: Sequence[str] | dict[str, list[str]] | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Zero-shot head ``(embed_dim, num_classes)`` from class names and prompt templates (clip_benchmark's)."""
    from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier as cb_zero_shot_classifier

    _require_clip(backbone, "zero-shot classification")
    device = torch.device(device)
    templates = DEFAULT_TEMPLATES if templates is None else templates
    templates = dict(templates) if isinstance(templates, dict) else list(templates)  # clip_benchmark checks type
    with _evaluating(device, backbone.model):
        classifier = cb_zero_shot_classifier(
            backbone.model, backbone.tokenizer, list(classnames), templates, device.type, amp=False
        )
    return classifier.float().to(device)


def zero_shot_prompts(spec: str, dataset) -> tuple[list[str], list[str]]:
    """Class names and prompt templates for zero-shot classification on ``dataset`` (named ``spec``).

    Fashion-MNIST uses the templates the tiny CLIP was trained with; ImageNet-style folders named by WordNet id
    (``n01440764``: ImageNet-1K, the 200-class ImageNet-A/-R subsets, ImageNet-Sketch) or by index (``0``..``999``,
    ImageNetV2) get the OpenAI names of those classes (:func:`amp.data.class_names`), and every data set without
    templates of its own the 80 OpenAI ImageNet templates (the paper's protocol).
    """
    classes = list(getattr(dataset, "classes", None) or [])
    if not classes:
        raise ValueError(f"{spec}: zero-shot classification needs a labelled data set with class names")
    templates = getattr(dataset, "templates", None)
    if templates is None and spec.split(":")[0] in ("fashion-mnist", "fmnist-captions"):
        templates = FASHION_TEMPLATES
    return class_names(classes), list(templates or imagenet_templates())


def zero_shot_hits(features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per test image: top-1/top-5 hits of the zero-shot head on normalised embeddings, and the predicted class."""
    if classifier.shape[0] != features.shape[1]:
        raise ValueError(
            f"classifier expects {classifier.shape[0]}-d embeddings but the model gives {features.shape[1]}-d ones"
        )
    if int(labels.max()) >= classifier.shape[1]:
        raise ValueError(f"target {int(labels.max())} is out of range for {classifier.shape[1]} classes")
    logits = 100.0 * features @ classifier.float().cpu()
    return {**_topk_hits(logits, labels), "predicted": logits.argmax(dim=1)}


def zero_shot_classification(
    backbone: Backbone,
    loader: Iterable,
    classnames: Sequence[str],
    templates: Sequence[str] | dict[str, list[str]] | None = None,
    device: str | torch.device = "cpu",
    classifier: torch.Tensor | None = None,
) -> dict[str, float]:
    """Zero-shot ``top1``, ``top5`` (fractions) and ``mean_per_class_recall`` on a labelled loader."""
    from sklearn.metrics import balanced_accuracy_score

    if classifier is None:
        classifier = zero_shot_classifier(backbone, classnames, templates, device)
    if classifier.shape[1] != len(classnames):
        raise ValueError(f"classifier has {classifier.shape[1]} classes but {len(classnames)} class names were given")
    features, targets = embed_dataset(backbone, loader, project=True, device=device)
    labels = _labels(targets, "zero-shot classification")
    hits = zero_shot_hits(features, labels, classifier)
    recall = balanced_accuracy_score(labels.numpy(), hits["predicted"].numpy())
    return {
        "top1": _mean(hits["top1"]),
        "top5": _mean(hits.get("top5")),
        "mean_per_class_recall": float(recall),
        "count": len(labels),
    }


# --- retrieval -----------------------------------------------------------------------------------


def _caption_list(caption: Any) -> list[str]:
    if isinstance(caption, str):
        return [caption]
    captions = list(caption)
    if not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"each item needs a caption (str) or a non-empty list of captions, got {caption!r}")
    return captions


def retrieval_hits(
    backbone: Backbone,
    loader: Iterable,
    device: str | torch.device = "cpu",
    recall_k: Sequence[int] = (1, 5, 10),
) -> dict[str, torch.Tensor]:
    """Per query: ``t2i_R@k`` (one per caption) and ``i2t_R@k`` (one per image) hits, any positive in the top k."""
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, dataloader_with_indices, recall_at_k

    _require_clip(backbone, "retrieval")
    device = torch.device(device)
    image_features, text_features, text_image = [], [], []
    with _evaluating(device, backbone.model):
        for images, captions, indices in tqdm(dataloader_with_indices(loader), desc="retrieval"):
            lists = [_caption_list(c) for c in captions]
            if len(lists) != len(images):
                raise ValueError(f"batch has {len(images)} images but {len(lists)} captions")
            tokens = backbone.tokenizer([text for texts in lists for text in texts]).to(device)
            image_features.append(_image_embedding(backbone, images, device, project=True).cpu())
            text_features.append(F.normalize(backbone.model.encode_text(tokens).float(), dim=-1).cpu())
            text_image += [int(i) for i, texts in zip(indices, lists) for _ in texts]
    if not image_features:
        raise ValueError("the loader yielded no batches")
    scores = torch.cat(text_features) @ torch.cat(image_features).T  # (texts, images)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), text_image] = True
    hits: dict[str, torch.Tensor] = {}
    for k in recall_k:
        for name, s, p in (("t2i", scores, positive), ("i2t", scores.T, positive.T)):
            kk = min(int(k), s.shape[1])
            chunk = max(1, 2**24 // (kk * s.shape[1]))  # bounds recall_at_k's (rows, k, columns) one-hot
            hits[f"{name}_R@{k}"] = batchify(recall_at_k, s, p, chunk, "cpu", k=kk) > 0
    return hits


def _retrieval_metrics(hits: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Recall at k from per-query hits, with the numbers of images (i2t queries) and texts (t2i queries)."""
    sizes = {key.split("_")[0]: len(values) for key, values in hits.items()}
    return {**{key: _mean(values) for key, values in hits.items()}, "images": sizes["i2t"], "texts": sizes["t2i"]}


def retrieval(
    backbone: Backbone,
    loader: Iterable,
    device: str | torch.device = "cpu",
    recall_k: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image→text (``i2t_R@k``) and text→image (``t2i_R@k``) recall: a hit if any positive is in the top k."""
    return _retrieval_metrics(retrieval_hits(backbone, loader, device, recall_k))


# --- kNN -----------------------------------------------------------------------------------------

KNN_K, KNN_TEMPERATURE = 20, 0.07  # neighbours and vote temperature of the DINOv2 k-NN protocol


def knn_hits(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> dict[str, torch.Tensor]:
    """Per test item: top-1/top-5 hits of the weighted kNN vote (DINOv2 protocol, weights ``exp(sim / T)``)."""
    train = F.normalize(train_features.float(), dim=-1)
    test = F.normalize(test_features.float(), dim=-1)
    train_labels, test_labels = train_labels.long().to(train.device), test_labels.long().cpu()
    if len(train) != len(train_labels) or len(test) != len(test_labels):
        raise ValueError("features and labels differ in length")
    if len(train) == 0 or len(test) == 0:
        raise ValueError("kNN needs non-empty train and test sets")
    if min(int(train_labels.min()), int(test_labels.min())) < 0:
        raise ValueError("kNN needs labelled data (targets >= 0)")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train))
    votes = []
    with torch.no_grad():
        for start in range(0, len(test), chunk):
            sims, neighbours = (test[start : start + chunk].to(train.device) @ train.T).topk(k, dim=1)
            weights = torch.softmax(sims / temperature, dim=1)  # exp(sim/T), normalised: same vote ranking
            score = torch.zeros(len(sims), num_classes, device=train.device)
            votes.append(score.scatter_add_(1, train_labels[neighbours], weights).cpu())
    return _topk_hits(torch.cat(votes), test_labels)


def knn_classification(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    **options: Any,
) -> dict[str, float]:
    """Weighted kNN ``top1``/``top5`` (DINOv2 protocol), with the ``k`` used; ``options`` as in :func:`knn_hits`."""
    hits = knn_hits(train_features, train_labels, test_features, test_labels, **options)
    k = min(options.get("k", KNN_K), len(train_features))
    temperature = options.get("temperature", KNN_TEMPERATURE)
    return {"top1": _mean(hits["top1"]), "top5": _mean(hits.get("top5")), "k": k, "temperature": temperature}


def _num_classes(data: Any) -> int | None:
    classes = getattr(getattr(data, "dataset", data), "classes", None)
    return len(classes) if classes else None


def knn_eval(
    backbone: Backbone,
    train_loader: Iterable,
    test_loader: Iterable,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    project: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """kNN accuracy of ``backbone``'s embeddings: neighbours from ``train_loader``, queries from ``test_loader``."""
    train_features, train_targets = embed_dataset(backbone, train_loader, project=project, device=device)
    test_features, test_targets = embed_dataset(backbone, test_loader, project=project, device=device)
    return knn_classification(
        train_features,
        _labels(train_targets, "kNN"),
        test_features,
        _labels(test_targets, "kNN"),
        k=k,
        temperature=temperature,
        num_classes=_num_classes(train_loader),
    )


# --- dense vs pruned -----------------------------------------------------------------------------


def cosines(reference: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Per item: cosine between two models' normalised embeddings of the same images."""
    if reference.shape != features.shape:
        raise ValueError(f"dense embeddings are {tuple(reference.shape)}, pruned ones {tuple(features.shape)}")
    return (reference * features).sum(dim=-1)


def embedding_fidelity(
    dense: Backbone,
    pruned: Backbone,
    loader: Iterable,
    project: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Cosine similarity between dense and pruned embeddings of the same images (mean and min)."""
    device = torch.device(device)
    per_batch = []
    with _evaluating(device, dense.model, pruned.model):
        for images, _ in tqdm(loader, desc="fidelity"):
            a = _image_embedding(dense, images, device, project)
            per_batch.append(cosines(a, _image_embedding(pruned, images, device, project)).cpu())
    if not per_batch:
        raise ValueError("the loader yielded no batches")
    cos = torch.cat(per_batch)
    return {"mean_cosine": cos.mean().item(), "min_cosine": cos.min().item(), "count": len(cos)}


def _random_input(
    backbone: Backbone, batch_size: int, input_size: Sequence[int] | None, device: torch.device
) -> torch.Tensor:
    size = tuple(input_size) if input_size is not None else tuple(backbone.adapter.input_size(backbone.model))
    return torch.randn(batch_size, *size, generator=torch.Generator().manual_seed(0)).to(device)


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` (the model itself is never cast); nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _timed(backbone: Backbone, x: torch.Tensor, steps: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        backbone.embed(x, project=True)
    _sync(device)
    return time.perf_counter() - start


def throughput(
    backbone: Backbone,
    batch_size: int = 64,
    input_size: Sequence[int] | None = None,
    steps: int = 10,
    warmup: int = 3,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> float:
    """Images per second of ``backbone.embed(project=True)`` on random input (autocast when ``dtype`` isn't fp32)."""
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be positive")
    device = torch.device(device)
    with _evaluating(device, backbone.model), _autocast(device, dtype):
        x = _random_input(backbone, batch_size, input_size, device)
        for _ in range(warmup):
            backbone.embed(x, project=True)
        elapsed = _timed(backbone, x, steps, device)
    return batch_size * steps / elapsed


def compare_throughput(
    dense: Backbone,
    pruned: Backbone,
    batch_size: int = 64,
    input_size: Sequence[int] | None = None,
    steps: int = 10,
    warmup: int = 3,
    rounds: int = 3,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Dense and pruned images/s measured side by side in alternating rounds; ``speedup`` = pruned / dense."""
    if steps < 1 or batch_size < 1 or rounds < 1:
        raise ValueError("steps, batch_size and rounds must be positive")
    device = torch.device(device)
    if input_size is None:
        input_size = dense.adapter.input_size(dense.model)
        if tuple(pruned.adapter.input_size(pruned.model)) != tuple(input_size):
            raise ValueError("dense and pruned models take different input sizes; pass input_size")
    elapsed = {"dense": 0.0, "pruned": 0.0}
    models = {"dense": dense, "pruned": pruned}
    with _evaluating(device, dense.model, pruned.model), _autocast(device, dtype):
        x = _random_input(dense, batch_size, input_size, device)
        for backbone in models.values():
            for _ in range(warmup):
                backbone.embed(x, project=True)
        for r in range(rounds):
            order = ("dense", "pruned") if r % 2 == 0 else ("pruned", "dense")  # cancels drift (clocks, heat)
            for name in order:
                elapsed[name] += _timed(models[name], x, steps, device)
    images = batch_size * steps * rounds
    result = {name: images / seconds for name, seconds in elapsed.items()}
    result["speedup"] = result["pruned"] / result["dense"]
    return result


# --- one evaluation suite --------------------------------------------------------------------------------------

DataSource = str | Dataset  # an amp data-set name (loaded with each model's own transform) or a Dataset as is


def named_sets(data: DataSource | Mapping[str, DataSource] | None) -> dict[str, DataSource]:
    """A data-set argument as ``{display name: source}``; a single data-set name is named after itself."""
    if data is None or (isinstance(data, str) and not data):
        return {}
    if isinstance(data, Mapping):
        return {str(name): source for name, source in data.items() if source is not None and source != ""}
    return {data if isinstance(data, str) else type(data).__name__: data}


def first_items(dataset: Dataset, max_images: int | None) -> Dataset:
    """The first ``max_images`` items (all when None), keeping the metadata that ``Subset`` would hide."""
    if max_images is None or max_images >= len(dataset):
        return dataset
    subset = Subset(dataset, range(max_images))
    for attribute in ("classes", "captions", "templates"):
        if hasattr(dataset, attribute):
            setattr(subset, attribute, getattr(dataset, attribute))
    return subset


def text_tower_key(backbone: Backbone) -> str:
    """A fingerprint of the weights outside the vision tower: equal for every pruned variant of one CLIP.

    Pruning, compensation and distillation change only the image tower, so all variants of a model share one
    zero-shot head per class set; a model with other text weights gets its own.
    """
    vision = {id(p) for p in backbone.vision.parameters()}
    digest = hashlib.sha1(type(backbone.model).__name__.encode())
    for name, p in backbone.model.named_parameters():
        if id(p) not in vision:
            values = p.detach().double()
            digest.update(
                f"{name}{tuple(p.shape)}{values.sum().item():.17g}{values.square().sum().item():.17g}".encode()
            )
    return digest.hexdigest()


@dataclass
class EvalRow:
    """One model measured by an :class:`EvalSuite`: metrics by key, and the per-item outcomes behind them.

    A key is the metric's name (``zero_shot_top1``, ``i2t_R@5``, ``knn_top1``, ``fidelity_cosine``, ``params_M``)
    or, when the suite has several data sets of that kind, ``"<data set>/<metric>"``. ``outcomes`` holds one value
    per item for every averaged metric: bool hits for a proportion, floats for a mean.
    """

    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    outcomes: dict[str, torch.Tensor] = field(default_factory=dict)
    datasets: dict[str, str] = field(default_factory=dict)  # key -> the data set it was measured on

    def add(self, metric: str, outcomes: torch.Tensor, dataset: str | None = None, qualify: bool = False) -> None:
        """Record per-item ``outcomes`` of ``metric`` and their mean."""
        key = f"{dataset}/{metric}" if qualify else metric
        self.metrics[key], self.outcomes[key] = _mean(outcomes), outcomes.cpu()
        if dataset is not None:
            self.datasets[key] = dataset

    def key(self, metric: str, dataset: str | None = None) -> str:
        """The key of ``metric`` (on ``dataset``, needed only when the row has it for several data sets)."""
        if metric in self.metrics and dataset in (None, self.datasets.get(metric)):
            return metric
        matches = [k for k in self.metrics if k.endswith(f"/{metric}") and dataset in (None, self.datasets.get(k))]
        if len(matches) != 1:
            where = "" if dataset is None else f" on {dataset!r}"
            raise KeyError(f"{self.name}: {len(matches) or 'no'} metrics {metric!r}{where}; keys: {list(self.metrics)}")
        return matches[0]

    def __getitem__(self, metric: str) -> float:
        return self.metrics[self.key(metric)]

    def value(self, metric: str, dataset: str | None = None) -> float:
        return self.metrics[self.key(metric, dataset)]

    def outcome(self, metric: str, dataset: str | None = None) -> torch.Tensor:
        """Per-item outcomes of ``metric``, in the suite's item order (the same for every row of one suite)."""
        key = self.key(metric, dataset)
        if key not in self.outcomes:
            raise KeyError(f"{self.name}: {key!r} is not an average over items, so it has no per-item outcomes")
        return self.outcomes[key]

    def interval(
        self, metric: str, dataset: str | None = None, confidence: float = 0.95, method: str = "wilson"
    ) -> tuple[float, float]:
        """Interval of ``metric``: Wilson (or ``exact``) for proportions, percentile bootstrap for means."""
        return stats.interval(self.outcome(metric, dataset), confidence, method)

    def intervals(self, confidence: float = 0.95, method: str = "wilson") -> dict[str, tuple[float, float]]:
        """Intervals of every metric that averages over items."""
        return {key: stats.interval(values, confidence, method) for key, values in self.outcomes.items()}

    def to_dict(self) -> dict[str, float]:
        """The metrics as a flat, JSON-ready dict."""
        return dict(self.metrics)


class EvalSuite:
    """The evaluation data of one dense model, held once, and any model measured on it into one :class:`EvalRow`.

    ``classification`` (zero-shot, CLIP models) and ``retrieval`` (captioned, CLIP models) map display names to
    data sets (a single one is named after itself); ``knn_train`` gives k-NN neighbours for the queries
    ``knn_test`` (default: the first classification set) and ``fidelity`` the images for the cosine to ``dense``
    (default: the first classification set). Data-set names are loaded with the measured model's own transform and
    cached per transform, so pruned variants (which share the dense model's) reuse the loaded tensors; each set is
    cut to its first ``max_images`` items (``knn_images`` for the neighbours). Zero-shot heads are cached per class
    set and text tower (:func:`text_tower_key`), the dense model's embeddings for the cosine once.
    """

    def __init__(
        self,
        dense: Backbone | None = None,
        classification: DataSource | Mapping[str, DataSource] | None = None,
        retrieval: DataSource | Mapping[str, DataSource] | None = None,
        knn_train: DataSource | None = None,
        knn_test: DataSource | None = None,
        fidelity: DataSource | None = None,
        max_images: int | None = None,
        knn_images: int | None = None,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        templates: Sequence[str] | None = None,
        knn_k: int = KNN_K,
        knn_temperature: float = KNN_TEMPERATURE,
    ):
        self.dense = dense
        self.classification = named_sets(classification)
        self.retrieval = named_sets(retrieval)
        first = next(iter(self.classification.values()), None)
        self.knn_train = knn_train or None
        self.knn_test = (knn_test or first) if self.knn_train else None
        if self.knn_train and self.knn_test is None:
            raise ValueError("k-NN needs query images: give knn_test or a classification set")
        self.fidelity = (fidelity or first) if dense is not None else None
        self.max_images, self.knn_images = max_images, knn_images if knn_images is not None else max_images
        self.batch_size, self.device = batch_size, torch.device(device)
        self.templates = list(templates) if templates else None
        self.knn_k, self.knn_temperature = knn_k, knn_temperature
        self._loaded: dict[tuple, tuple[Dataset, list]] = {}
        self._heads: dict[tuple[str, str], torch.Tensor] = {}
        self._dense_features: dict[tuple, torch.Tensor] = {}

    # --- data, heads and embeddings, each made once -------------------------------------------------------------

    def _data(self, backbone: Backbone, source: DataSource, max_images: int | None) -> tuple[Dataset, list]:
        """The data set and its batches in memory, for ``backbone``'s transform (loaded once per transform)."""
        key = self._source_key(backbone, source, max_images)
        if key not in self._loaded:
            dataset = load_dataset(source, backbone.preprocess) if isinstance(source, str) else source
            dataset = first_items(dataset, max_images)
            batches = list(make_loader(dataset, self.batch_size, shuffle=False))
            if not batches:
                raise ValueError(f"{source}: the data set yielded no images")
            self._loaded[key] = dataset, batches
        return self._loaded[key]

    @staticmethod
    def _source_key(backbone: Backbone, source: DataSource, max_images: int | None) -> tuple:
        if isinstance(source, str):  # the transform's repr names its steps and their settings
            return source, max_images, repr(backbone.preprocess)
        return id(source), max_images

    def _head(self, backbone: Backbone, name: str, dataset: Dataset, head_key: str | None) -> torch.Tensor:
        key = (name, head_key if head_key is not None else text_tower_key(backbone))
        if key not in self._heads:
            source = self.classification[name]
            classnames, templates = zero_shot_prompts(source if isinstance(source, str) else name, dataset)
            self._heads[key] = zero_shot_classifier(backbone, classnames, self.templates or templates, self.device)
        return self._heads[key]

    def _embed(self, backbone: Backbone, source: DataSource, max_images: int | None, project: bool, memo: dict):
        """Normalised embeddings and targets of one set, once per model and measurement (``memo``)."""
        key = (*self._source_key(backbone, source, max_images), project)
        if key not in memo:
            batches = self._data(backbone, source, max_images)[1]
            memo[key] = embed_dataset(backbone, batches, project=project, device=self.device, progress=False)
        return memo[key]

    # --- the metrics, per item ----------------------------------------------------------------------------------

    def zero_shot_hits(self, backbone: Backbone, head_key: str | None = None, memo: dict | None = None) -> dict:
        """``{set: {"top1": hits, "top5": hits}}`` per classification set (CLIP models only)."""
        memo = {} if memo is None else memo
        results = {}
        for name, source in self.classification.items():
            dataset = self._data(backbone, source, self.max_images)[0]
            features, targets = self._embed(backbone, source, self.max_images, True, memo)
            head = self._head(backbone, name, dataset, head_key)
            hits = zero_shot_hits(features, _labels(targets, f"zero-shot classification on {_display(source)}"), head)
            results[name] = {metric: hits[metric] for metric in ("top1", "top5") if metric in hits}
        return results

    def retrieval_hits(self, backbone: Backbone) -> dict[str, dict[str, torch.Tensor]]:
        """``{set: {"i2t_R@k": hits, "t2i_R@k": hits}}`` per retrieval set (CLIP models only)."""
        return {
            name: retrieval_hits(backbone, self._data(backbone, source, self.max_images)[1], self.device)
            for name, source in self.retrieval.items()
        }

    def knn_hits(self, backbone: Backbone, memo: dict | None = None) -> dict[str, torch.Tensor]:
        """Top-1/top-5 hits of every k-NN query (projected embeddings for CLIP models, as ``quality`` did)."""
        memo = {} if memo is None else memo
        project = backbone.is_clip
        train_features, train_targets = self._embed(backbone, self.knn_train, self.knn_images, project, memo)
        test_features, test_targets = self._embed(backbone, self.knn_test, self.max_images, project, memo)
        classes = _num_classes(self._data(backbone, self.knn_train, self.knn_images)[0])
        return knn_hits(
            train_features,
            _labels(train_targets, f"kNN neighbours {_display(self.knn_train)}"),
            test_features,
            _labels(test_targets, f"kNN queries {_display(self.knn_test)}"),
            self.knn_k,
            self.knn_temperature,
            classes,
        )

    def fidelity_cosines(self, backbone: Backbone, memo: dict | None = None) -> torch.Tensor:
        """Per fidelity image: cosine between ``backbone``'s and the dense model's projected embeddings."""
        memo = {} if memo is None else memo
        key = self._source_key(self.dense, self.fidelity, self.max_images)
        if key not in self._dense_features:
            self._dense_features[key] = self._embed(self.dense, self.fidelity, self.max_images, True, {})[0]
        return cosines(self._dense_features[key], self._embed(backbone, self.fidelity, self.max_images, True, memo)[0])

    # --- one row ------------------------------------------------------------------------------------------------

    def measure(
        self,
        backbone: Backbone,
        name: str | None = None,
        speed: Mapping[str, Any] | None = None,
        head_key: str | None = None,
    ) -> EvalRow:
        """Every metric that applies to ``backbone`` and this suite's data, as one row.

        ``speed``: options of :func:`compare_throughput` (``batch_size``, ``steps``, ``warmup``, ``rounds``,
        ``dtype``; ``{}`` for its defaults) to measure images/s side by side with the dense model (alone when
        ``backbone`` is the dense model); None skips it. ``head_key`` names the text tower explicitly.
        """
        row = EvalRow(name or backbone.spec)
        size = model_stats(backbone)
        row.metrics.update(params_M=size.params / 1e6, mlp_params_M=size.mlp_params / 1e6, gflops=size.flops / 1e9)
        memo: dict = {}
        if backbone.is_clip:
            several = len(self.classification) > 1
            for dataset, hits in self.zero_shot_hits(backbone, head_key, memo).items():
                for metric, outcomes in hits.items():
                    row.add(f"zero_shot_{metric}", outcomes, dataset, several)
        if self.knn_train:
            row.add("knn_top1", self.knn_hits(backbone, memo)["top1"], _display(self.knn_test))
        if backbone.is_clip:
            several = len(self.retrieval) > 1
            for dataset, hits in self.retrieval_hits(backbone).items():
                for metric, outcomes in hits.items():
                    row.add(metric, outcomes, dataset, several)
                sizes = {key.split("_")[0]: len(values) for key, values in hits.items()}
                prefix = f"{dataset}/" if several else ""
                row.metrics[f"{prefix}images"], row.metrics[f"{prefix}texts"] = sizes["i2t"], sizes["t2i"]
        if self.fidelity is not None and backbone is not self.dense:
            row.add("fidelity_cosine", self.fidelity_cosines(backbone, memo), _display(self.fidelity))
        if speed is not None:
            row.metrics.update(self.speed(backbone, speed))
        return row

    def speed(self, backbone: Backbone, options: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Images/s of ``backbone``: side by side with the dense model (and its speed-up), or alone."""
        options = dict(options or {})
        if self.dense is None or backbone is self.dense:
            options.pop("rounds", None)
            return {"images_per_s": throughput(backbone, device=self.device, **options)}
        result = compare_throughput(self.dense, backbone, device=self.device, **options)
        return {"images_per_s": result["pruned"], "dense_images_per_s": result["dense"], "speedup": result["speedup"]}

    # --- per-set summaries (what notebooks 04 and 05 print) ------------------------------------------------------

    def zero_shot(self, backbone: Backbone, *, head_key: str | None = None) -> dict[str, float]:
        """Zero-shot top-1 (fraction) per classification set."""
        return {name: _mean(hits["top1"]) for name, hits in self.zero_shot_hits(backbone, head_key).items()}

    def recall(self, backbone: Backbone) -> dict[str, dict[str, float]]:
        """Image→text and text→image R@1/5/10 (and the numbers of images and texts) per retrieval set."""
        return {name: _retrieval_metrics(hits) for name, hits in self.retrieval_hits(backbone).items()}


def _display(source: DataSource | None) -> str | None:
    return source if isinstance(source, str) or source is None else type(source).__name__


def evaluate(
    backbone: Backbone,
    classification: DataSource | None = None,
    retrieval: DataSource | None = None,
    knn_train: DataSource | None = None,
    dense: Backbone | None = None,
    batch_size: int = 64,
    max_images: int | None = None,
    device: str = "cpu",
    throughput_batch: int = 64,
    intervals: bool = False,
) -> dict[str, Any]:
    """Size, speed and quality of a model; with ``dense`` also its fidelity and speed-up against it.

    One :class:`EvalSuite` row as a flat dict with the model's ``widths``; ``intervals`` adds the 95 % interval of
    every metric that averages over items (``{"intervals": {key: [low, high]}}``).
    """
    check_option("batch_size", batch_size, 1, integer=True)
    check_option("max_images", max_images, 1, integer=True, optional=True)
    if classification and not backbone.is_clip and not knn_train:
        raise ValueError(
            f"classification {_display(classification)!r} gives no metric for {backbone.spec!r}: zero-shot "
            "classification needs a CLIP model (text tower); for an image-only model add --knn-train <labelled data>"
        )
    suite = EvalSuite(dense, classification, retrieval, knn_train, max_images=max_images, batch_size=batch_size,
                      device=device)  # fmt: skip
    row = suite.measure(backbone, speed={"batch_size": throughput_batch})
    report: dict[str, Any] = {**row.to_dict(), "widths": backbone.widths()}
    if intervals:
        report["intervals"] = {key: list(bounds) for key, bounds in row.intervals().items()}
    return report
