"""Criteria: a scalar loss of a batch of image embeddings, used both to score neurons and to judge a width.

A criterion is a small object with two calls:

* ``context(targets, dense_features)``: everything the loss needs besides the features, computed once per
  batch without gradient (text features, labels, the dense model's similarity distribution);
* ``__call__(features, context)``: the scalar loss, in fp32.

``needs_projection`` says which embedding it reads: the pre-projection feature (as the paper's entropy)
or the projected one shared with text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F


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


class Criterion:
    name = "criterion"
    needs_projection = False
    # False when the loss is minimal at the dense model, so its gradient there is zero and cannot score
    scores_dense_model = True

    def context(self, targets: Any, dense_features: torch.Tensor) -> Any:
        return None

    def __call__(self, features: torch.Tensor, context: Any) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class Entropy(Criterion):
    """The paper's label-free criterion: mean row entropy of softmax(temp_inv · image-image cosine similarity)."""

    name = "entropy"

    def __init__(self, temp_inv: float = 15.0):
        if temp_inv <= 0:
            raise ValueError(f"temp_inv must be positive, got {temp_inv}")
        self.temp_inv = temp_inv

    def __call__(self, features: torch.Tensor, context: Any = None) -> torch.Tensor:
        log_p = F.log_softmax(similarity_logits(features, self.temp_inv), dim=1)
        return -(log_p.exp() * log_p).sum(dim=1).mean()

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
        self.temp_inv = temp_inv

    def context(self, targets: Any, dense_features: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(similarity_logits(dense_features, self.temp_inv), dim=1)

    def __call__(self, features: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        log_q = F.log_softmax(similarity_logits(features, self.temp_inv), dim=1)
        return (context.exp() * (context - log_q)).sum(dim=1).mean()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "temp_inv": self.temp_inv}


class ClassCrossEntropy(Criterion):
    """One-hot cross-entropy through a fixed classifier (a zero-shot text classifier or class prototypes)."""

    name = "cross_entropy"

    def __init__(self, classifier: torch.Tensor, logit_scale: float = 100.0, project: bool = True):
        self.classifier = F.normalize(classifier.float(), dim=-1)  # [classes, dim]
        self.logit_scale = logit_scale
        self.needs_projection = project

    def context(self, targets: Any, dense_features: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(targets)
        if labels.dtype != torch.long or (labels < 0).any():
            raise ValueError("cross_entropy with a classifier needs integer class labels for every image")
        return labels.to(dense_features.device)

    def __call__(self, features: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        classifier = self.classifier.to(features.device)
        logits = self.logit_scale * F.normalize(features.float(), dim=-1) @ classifier.T
        return F.cross_entropy(logits, context)

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

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "mode": "contrastive", "logit_scale": self.logit_scale}


CRITERIA = ("entropy", "cross_entropy", "kl_to_dense")


def build_criterion(name: str, backbone=None, temp_inv: float = 15.0, dataset=None, device: str = "cpu") -> Criterion:
    """A criterion by name. ``cross_entropy`` picks its form from the data set: class labels use a
    zero-shot text classifier (CLIP) or the dense model's class prototypes (others); captions use
    the contrastive form."""
    if name == "entropy":
        return Entropy(temp_inv)
    if name == "kl_to_dense":
        return KLToDense(temp_inv)
    if name != "cross_entropy":
        raise ValueError(f"unknown criterion {name!r}; choose from {CRITERIA}")
    if backbone is None or dataset is None:
        raise ValueError("cross_entropy needs the model and a labelled or captioned data set")
    logit_scale = float(backbone.model.logit_scale.exp()) if hasattr(backbone.model, "logit_scale") else 100.0
    if getattr(dataset, "captions", None) is not None and backbone.is_clip:
        tokenizer, model = backbone.tokenizer, backbone.model
        return ContrastiveCrossEntropy(lambda texts: model.encode_text(tokenizer(texts).to(device)), logit_scale)
    classes = getattr(dataset, "classes", None)
    if classes is None:
        raise ValueError("cross_entropy needs class labels (a data set with .classes) or captions with a CLIP model")
    if backbone.is_clip:
        from amp.evaluation import zero_shot_classifier

        classifier = zero_shot_classifier(backbone, list(classes), device=device)
        classifier = classifier.T if classifier.shape[0] != len(classes) else classifier
        return ClassCrossEntropy(classifier, logit_scale, project=True)
    return ClassCrossEntropy(class_prototypes(backbone, dataset, len(classes), device), 1 / 0.07, project=False)


def class_prototypes(backbone, dataset, num_classes: int, device: str = "cpu", max_images: int = 2048) -> torch.Tensor:
    """Mean normalised dense embedding per class: a classifier for models without a text tower."""
    from amp.data import make_loader

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
