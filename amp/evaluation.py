"""Evaluation of (pruned) backbones: zero-shot classification, retrieval, kNN, embedding fidelity, throughput.

Thin functions over :class:`amp.models.Backbone`. The metrics themselves come from ``clip_benchmark``
(``zero_shot_classifier``, ``recall_at_k``, ``batchify``, ``dataloader_with_indices``, its templates and
class names; its ``accuracy`` fails under recent numpy (2.4 here), see :func:`_accuracy`); images always go through
``backbone.embed(images, project=True)`` so any adapter works, and text (CLIP models only) through
``backbone.model.encode_text`` with ``backbone.tokenizer`` (pruning never touches the text tower).

Every function puts the model(s) in eval mode on ``device`` for the call (moving them there) and restores
their train/eval flag afterwards; embeddings and metrics come back on the CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from functools import cache
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from amp.models import Backbone

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
        raise ValueError(f"{what} needs labelled data; the loader yields unlabelled images (target -1)")
    return targets.long()


def _accuracy(scores: torch.Tensor, labels: torch.Tensor, topk: Sequence[int]) -> list[float]:
    """Top-k accuracies. clip_benchmark's ``accuracy`` computes the same but fails under recent numpy (2.4)
    (``float()`` of a 1-element array), so this is its three lines without the numpy round trip."""
    pred = scores.topk(max(topk), dim=1).indices
    correct = pred == labels.view(-1, 1)
    return [correct[:, :k].any(dim=1).float().mean().item() for k in topk]


def _topk_metrics(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """top-1 and top-5 accuracy (top-5 is NaN with fewer than 5 classes, as in clip_benchmark)."""
    if scores.shape[1] >= 5:
        top1, top5 = _accuracy(scores, labels, (1, 5))
    else:
        (top1,), top5 = _accuracy(scores, labels, (1,)), math.nan
    return top1, top5


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
    if classifier.shape[0] != features.shape[1]:
        raise ValueError(
            f"classifier expects {classifier.shape[0]}-d embeddings but the model gives {features.shape[1]}-d ones"
        )
    if int(labels.max()) >= len(classnames):
        raise ValueError(f"target {int(labels.max())} is out of range for {len(classnames)} classes")
    logits = 100.0 * features @ classifier.float().cpu()
    top1, top5 = _topk_metrics(logits, labels)
    recall = balanced_accuracy_score(labels.numpy(), logits.argmax(dim=1).numpy())
    return {"top1": top1, "top5": top5, "mean_per_class_recall": float(recall), "count": len(labels)}


# --- retrieval -----------------------------------------------------------------------------------


def _caption_list(caption: Any) -> list[str]:
    if isinstance(caption, str):
        return [caption]
    captions = list(caption)
    if not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"each item needs a caption (str) or a non-empty list of captions, got {caption!r}")
    return captions


def retrieval(
    backbone: Backbone,
    loader: Iterable,
    device: str | torch.device = "cpu",
    recall_k: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image→text (``i2t_R@k``) and text→image (``t2i_R@k``) recall: a hit if any positive is in the top k."""
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
    images_emb, texts_emb = torch.cat(image_features), torch.cat(text_features)
    scores = texts_emb @ images_emb.T  # (texts, images)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), text_image] = True
    metrics: dict[str, float] = {}
    for k in recall_k:
        for name, s, p in (("t2i", scores, positive), ("i2t", scores.T, positive.T)):
            kk = min(int(k), s.shape[1])
            chunk = max(1, 2**24 // (kk * s.shape[1]))  # bounds recall_at_k's (rows, k, columns) one-hot
            hits = batchify(recall_at_k, s, p, chunk, "cpu", k=kk) > 0
            metrics[f"{name}_R@{k}"] = hits.float().mean().item()
    metrics["images"], metrics["texts"] = len(images_emb), len(texts_emb)
    return metrics


# --- kNN -----------------------------------------------------------------------------------------


def knn_classification(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> dict[str, float]:
    """Weighted kNN (DINOv2 protocol): cosine top-k neighbours vote with weights ``exp(sim / T)``."""
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
    top1, top5 = _topk_metrics(torch.cat(votes), test_labels)
    return {"top1": top1, "top5": top5, "k": k, "temperature": temperature}


def knn_eval(
    backbone: Backbone,
    train_loader: Iterable,
    test_loader: Iterable,
    k: int = 20,
    temperature: float = 0.07,
    project: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """kNN accuracy of ``backbone``'s embeddings: neighbours from ``train_loader``, queries from ``test_loader``."""
    train_features, train_targets = embed_dataset(backbone, train_loader, project=project, device=device)
    test_features, test_targets = embed_dataset(backbone, test_loader, project=project, device=device)
    classes = getattr(getattr(train_loader, "dataset", None), "classes", None)
    return knn_classification(
        train_features,
        _labels(train_targets, "kNN"),
        test_features,
        _labels(test_targets, "kNN"),
        k=k,
        temperature=temperature,
        num_classes=len(classes) if classes else None,
    )


# --- dense vs pruned -----------------------------------------------------------------------------


def embedding_fidelity(
    dense: Backbone,
    pruned: Backbone,
    loader: Iterable,
    project: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Cosine similarity between dense and pruned embeddings of the same images (mean and min)."""
    device = torch.device(device)
    cosines = []
    with _evaluating(device, dense.model, pruned.model):
        for images, _ in tqdm(loader, desc="fidelity"):
            a = _image_embedding(dense, images, device, project)
            b = _image_embedding(pruned, images, device, project)
            if a.shape != b.shape:
                raise ValueError(f"dense embeddings are {tuple(a.shape)}, pruned ones {tuple(b.shape)}")
            cosines.append((a * b).sum(dim=-1).cpu())
    if not cosines:
        raise ValueError("the loader yielded no batches")
    cos = torch.cat(cosines)
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


def model_stats(backbone: Backbone) -> dict[str, Any] | None:
    """Parameter and FLOP counts from :mod:`amp.accounting` when that module is available, else None."""
    try:
        from amp.accounting import model_stats as stats
    except ImportError:
        return None
    result = stats(backbone)
    return result.to_dict() if hasattr(result, "to_dict") else dict(result)


def compare_models(
    dense: Backbone,
    pruned: Backbone,
    loader: Iterable | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    steps: int = 10,
    project: bool = True,
) -> dict[str, Any]:
    """One report: accounting of both models (if available), fidelity on ``loader`` (if given), throughput."""
    report: dict[str, Any] = {"dense": model_stats(dense), "pruned": model_stats(pruned)}
    if loader is not None:
        report["fidelity"] = embedding_fidelity(dense, pruned, loader, project=project, device=device)
    report["throughput"] = compare_throughput(dense, pruned, batch_size=batch_size, steps=steps, device=device)
    return report
