"""Criteria: a scalar loss of a batch of image embeddings, used both to score neurons and to judge a width.

A criterion is a small object with two calls:

* ``context(targets, dense_features)``: everything the loss needs besides the features, computed once per
  batch without gradient (text features, labels, the dense model's similarity distribution);
* ``__call__(features, context)``: the scalar loss, in fp32;
* ``rank_share(local, everyone, context, rows)``: this process's share of the loss of a global batch spread over
  several processes (:mod:`amp.distributed`), so that the shares sum to the loss and its gradient.

``needs_projection`` says which embedding it reads: the pre-projection feature (as the paper's entropy)
or the projected one shared with text. A new criterion is one subclass here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from amp.data import check_option, class_names, make_loader


class NonFiniteLossError(FloatingPointError):
    """A criterion produced NaN or inf: the scores or the search would be meaningless."""


def check_finite(loss: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(
            f"{what}: loss is {loss.item()}; check the input data, the temperature (temp_inv) and the precision"
        )
    return loss


def similarity_logits(features: torch.Tensor, temp_inv: float) -> torch.Tensor:
    """temp_inv × cosine similarity of every image with every image of the batch (self included), in fp32."""
    f = F.normalize(features.float(), dim=-1)
    return temp_inv * f @ f.T


def _row_similarity_logits(rows: torch.Tensor, columns: torch.Tensor, temp_inv: float) -> torch.Tensor:
    """temp_inv × cosine similarity of some images (rows) with every image of the batch (columns), in fp32."""
    return temp_inv * F.normalize(rows.float(), dim=-1) @ F.normalize(columns.float(), dim=-1).T


@dataclass(frozen=True)
class GlobalRows:
    """Where one process's rows sit in a global batch spread over ``world_size`` processes."""

    offset: int
    count: int
    total: int
    world_size: int

    @property
    def rows(self) -> slice:
        return slice(self.offset, self.offset + self.count)


class Criterion:
    name = "criterion"
    needs_projection = False
    # False when the loss is minimal at the dense model, so its gradient there is zero and cannot score
    scores_dense_model = True
    # images a batch needs for a meaningful loss: a softmax over the batch's own similarities has one row and
    # entropy 0 (zero gradient, zero scores) for a single image
    min_batch = 2

    def context(self, targets: Any, dense_features: torch.Tensor) -> Any:
        return None

    def __call__(self, features: torch.Tensor, context: Any) -> torch.Tensor:
        raise NotImplementedError

    def rank_share(self, local: torch.Tensor, everyone: torch.Tensor, context: Any, rows: GlobalRows) -> torch.Tensor:
        """This process's share of the loss of the global batch: the shares of all processes sum to it, and so do
        their gradients (``everyone`` is the gathered global batch, whose backward sums the processes' gradients).

        The default, exact for any criterion, is the whole loss on every process divided by their number; a
        criterion that is a mean of per-row terms overrides it with the sum of its own rows' terms (cheaper).
        """
        return self(everyone, context) / rows.world_size

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class Entropy(Criterion):
    """The paper's label-free criterion: mean row entropy of softmax(temp_inv · image-image cosine similarity)."""

    name = "entropy"

    def __init__(self, temp_inv: float = 15.0):
        check_option("temp_inv", temp_inv, 0, low_open=True)
        self.temp_inv = temp_inv

    def __call__(self, features: torch.Tensor, context: Any = None) -> torch.Tensor:
        log_p = F.log_softmax(similarity_logits(features, self.temp_inv), dim=1)
        return -(log_p.exp() * log_p).sum(dim=1).mean()

    def rank_share(self, local: torch.Tensor, everyone: torch.Tensor, context: Any, rows: GlobalRows) -> torch.Tensor:
        log_p = F.log_softmax(_row_similarity_logits(local, everyone, self.temp_inv), dim=1)
        return -(log_p.exp() * log_p).sum() / rows.total

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "temp_inv": self.temp_inv}


class KLToDense(Criterion):
    """KL(dense ‖ pruned) between the two models' similarity softmaxes on the same batch; zero at the dense model.

    Unlike entropy it cannot go below its dense value, so a width that happens to *lower* the loss is not
    mistaken for a free lunch. Its gradient at the dense model is zero: use it to search, not to score.
    """

    name = "kl_to_dense"
    scores_dense_model = False

    def __init__(self, temp_inv: float = 15.0):
        check_option("temp_inv", temp_inv, 0, low_open=True)
        self.temp_inv = temp_inv

    def context(self, targets: Any, dense_features: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(similarity_logits(dense_features, self.temp_inv), dim=1)

    def __call__(self, features: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        log_q = F.log_softmax(similarity_logits(features, self.temp_inv), dim=1)
        return (context.exp() * (context - log_q)).sum(dim=1).mean()

    def rank_share(self, local: torch.Tensor, everyone: torch.Tensor, context: Any, rows: GlobalRows) -> torch.Tensor:
        log_q = F.log_softmax(_row_similarity_logits(local, everyone, self.temp_inv), dim=1)
        log_p = context[rows.rows]
        return (log_p.exp() * (log_p - log_q)).sum() / rows.total

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "temp_inv": self.temp_inv}


class ClassCrossEntropy(Criterion):
    """One-hot cross-entropy through a fixed classifier (a zero-shot text classifier or class prototypes)."""

    name = "cross_entropy"
    min_batch = 1  # a loss per image: one image is a batch

    def __init__(self, classifier: torch.Tensor, logit_scale: float = 100.0, project: bool = True):
        self.classifier = F.normalize(classifier.float(), dim=-1)  # [classes, dim]
        self.logit_scale = logit_scale
        self.needs_projection = project

    def context(self, targets: Any, dense_features: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(targets)
        if labels.dtype != torch.long or (labels < 0).any():
            raise ValueError(
                "cross_entropy with a classifier needs integer class labels for every image; the data set has "
                "unlabelled images (target -1): use a labelled data set (imagefolder:...) or --criterion entropy"
            )
        return labels.to(dense_features.device)

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        classifier = self.classifier.to(features.device)
        return self.logit_scale * F.normalize(features.float(), dim=-1) @ classifier.T

    def __call__(self, features: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._logits(features), context)

    def rank_share(self, local: torch.Tensor, everyone: torch.Tensor, context: Any, rows: GlobalRows) -> torch.Tensor:
        return F.cross_entropy(self._logits(local), context[rows.rows], reduction="sum") / rows.total

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mode": "class",
            "classes": self.classifier.shape[0],
            "logit_scale": self.logit_scale,
        }


class ContrastiveCrossEntropy(Criterion):
    """CLIP's symmetric image-text cross-entropy with each image's own caption as the one-hot target."""

    name = "cross_entropy"
    needs_projection = True

    def __init__(self, encode_text: Callable[[Sequence[str]], torch.Tensor], logit_scale: float = 100.0):
        self.encode_text = encode_text
        self.logit_scale = logit_scale

    def context(self, targets: Any, dense_features: torch.Tensor) -> torch.Tensor:
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, (str, list, tuple)) for t in targets):
            raise ValueError("contrastive cross_entropy needs a caption for every image")
        captions = [t if isinstance(t, str) else t[0] for t in targets]  # several captions: the first is the target
        with torch.no_grad():
            return F.normalize(self.encode_text(captions).float(), dim=-1).to(dense_features.device)

    def __call__(self, features: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        logits = self.logit_scale * F.normalize(features.float(), dim=-1) @ context.T
        labels = torch.arange(len(logits), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))

    def rank_share(self, local: torch.Tensor, everyone: torch.Tensor, context: Any, rows: GlobalRows) -> torch.Tensor:
        # a mean over image rows plus a mean over caption rows: this process's images against all captions, and
        # its captions against all images (every process encoded all the global batch's captions: cheap, no grad)
        labels = torch.arange(rows.offset, rows.offset + rows.count, device=local.device)
        images = F.normalize(everyone.float(), dim=-1)
        i2t = self.logit_scale * F.normalize(local.float(), dim=-1) @ context.T
        t2i = self.logit_scale * context[rows.rows] @ images.T
        both = F.cross_entropy(i2t, labels, reduction="sum") + F.cross_entropy(t2i, labels, reduction="sum")
        return 0.5 * both / rows.total

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "mode": "contrastive", "logit_scale": self.logit_scale}


class BatchTooSmallError(ValueError):
    """A batch with fewer images than its criterion needs (a one-image similarity softmax has entropy 0)."""


def min_batch(criterion: Criterion) -> int:
    """Images per batch ``criterion`` needs (the wrapped criterion's, for :class:`amp.distributed.GlobalCriterion`)."""
    return getattr(getattr(criterion, "criterion", criterion), "min_batch", Criterion.min_batch)


def _too_small(criterion: Criterion, images: int, data: str) -> str:
    return (
        f"{data}: a batch of {images} image(s), but the {criterion.name} criterion compares the images of a batch "
        f"and needs ≥ {min_batch(criterion)} per batch (with one image every loss and score is 0)"
    )


def _raise_too_small(criterion: Criterion, images: int, data: str) -> None:
    advice = "use a larger --batch-size and a data set of at least that many images"
    raise BatchTooSmallError(f"{_too_small(criterion, images, data)}; {advice}")


def check_batch_size(criterion: Criterion, batch_size: int, data: str, dataset_size: int | None = None) -> None:
    """Refuse, before any work, a batch size (or a data set) too small for ``criterion``, naming the data set."""
    check_option("batch_size", batch_size, 1, integer=True)
    smallest = batch_size if dataset_size is None else min(batch_size, dataset_size)
    if smallest < min_batch(criterion):
        _raise_too_small(criterion, smallest, data)


def usable_batches(batches: Iterable[tuple[torch.Tensor, Any]], criterion: Criterion, data: str) -> Iterator:
    """The batches with enough images for ``criterion``: a short one (the last batch of a data set whose size leaves
    one image over) is left out with a warning; raises when no batch is large enough. (Not under torchrun: there
    each rank holds a slice of a global batch, and every rank must see the same batches.)"""
    used, short = 0, None
    for images, targets in batches:
        if len(images) >= min_batch(criterion):
            used += 1
            yield images, targets
        elif short is None:
            short = len(images)
            warnings.warn(f"{_too_small(criterion, short, data)}: that batch is left out", stacklevel=2)
    if used == 0 and short is not None:
        _raise_too_small(criterion, short, data)


CRITERIA = ("entropy", "cross_entropy", "kl_to_dense")

# (backbone, class names, device) -> zero-shot head (embed_dim, num_classes): amp.evaluation.zero_shot_classifier
ZeroShotHead = Callable[..., torch.Tensor]


def build_criterion(
    name: str,
    backbone=None,
    temp_inv: float = 15.0,
    dataset=None,
    device: str = "cpu",
    zero_shot_head: ZeroShotHead | None = None,
) -> Criterion:
    """A criterion by name. ``cross_entropy`` picks its form from the data set: class labels use a
    zero-shot text classifier (CLIP; ``zero_shot_head(backbone, classnames, device=...)``, such as
    :func:`amp.evaluation.zero_shot_classifier`) or the dense model's class prototypes (others); captions use
    the contrastive form."""
    if name == "entropy":
        return Entropy(temp_inv)
    if name == "kl_to_dense":
        return KLToDense(temp_inv)
    if name != "cross_entropy":
        raise ValueError(f"unknown criterion {name!r}; choose from {CRITERIA}")
    if backbone is None or dataset is None:
        raise ValueError("cross_entropy needs the model and a labelled or captioned data set")
    logit_scale = float(backbone.model.logit_scale.detach().exp()) if hasattr(backbone.model, "logit_scale") else 100.0
    if getattr(dataset, "captions", None) is not None and backbone.is_clip:
        tokenizer, model = backbone.tokenizer, backbone.model
        return ContrastiveCrossEntropy(lambda texts: model.encode_text(tokenizer(texts).to(device)), logit_scale)
    classes = getattr(dataset, "classes", None)
    if classes is None:
        raise ValueError("cross_entropy needs class labels (a data set with .classes) or captions with a CLIP model")
    if backbone.is_clip:
        if zero_shot_head is None:
            raise ValueError("cross_entropy on class labels with a CLIP model needs zero_shot_head")
        # folders named by WordNet id or ImageNetV2 index are prompted by their class names, as in evaluation
        head = zero_shot_head(backbone, class_names(classes), device=device)
        if head.ndim != 2 or head.shape[1] != len(classes):  # (embed_dim, num_classes) by contract, never guessed
            raise ValueError(
                f"zero_shot_head returned a {tuple(head.shape)} head for {len(classes)} classes; it must be "
                f"(embed_dim, {len(classes)}), one column per class"
            )
        return ClassCrossEntropy(head.T, logit_scale, project=True)
    return ClassCrossEntropy(class_prototypes(backbone, dataset, len(classes), device), 1 / 0.07, project=False)


def class_prototypes(backbone, dataset, num_classes: int, device: str = "cpu", max_images: int = 2048) -> torch.Tensor:
    """Mean normalised dense embedding per class: a classifier for models without a text tower."""
    sums = None
    counts = torch.zeros(num_classes)
    seen = 0
    with torch.no_grad():
        for images, labels in make_loader(dataset, 64):
            f = F.normalize(backbone.embed(images.to(device)).float(), dim=-1).cpu()
            sums = torch.zeros(num_classes, f.shape[1]) if sums is None else sums
            sums.index_add_(0, labels, f)
            counts += torch.bincount(labels, minlength=num_classes).float()
            seen += len(images)
            if seen >= max_images:
                break
    if (counts == 0).any():
        raise ValueError("some classes have no images among those used to build the prototypes")
    return sums / counts[:, None]
