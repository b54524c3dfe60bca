"""The paper's global batch on one device: chunked (gradient-cache) scoring and chunked search losses equal the
unchunked ones (zoo:tiny-clip, every criterion form)."""

from __future__ import annotations

import pytest
import torch
from conftest import images_for, tiny

import amp
from amp.criteria import Entropy, KLToDense, build_criterion
from amp.data import load_dataset
from amp.evaluation import zero_shot_classifier
from amp.scoring import magnitude_scores, taylor_scores
from amp.width_search import amp_search

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 12  # chunks of 5 leave a ragged last chunk of 2


@pytest.fixture(scope="module")
def clip():
    return amp.load_model("zoo:tiny-clip")


def _batches(dataset, count: int = 2, size: int = BATCH, labels: bool = False) -> list:
    """``count`` batches of ``size`` (images, targets) from a data set, targets as the loader gives them."""
    out = []
    for b in range(count):
        items = [dataset[i] for i in range(b * size, (b + 1) * size)]
        images = torch.stack([image for image, _ in items])
        targets = [target for _, target in items]
        out.append((images, torch.tensor(targets) if labels else targets))
    return out


def _criterion(name: str, backbone):
    if name == "entropy":
        return Entropy(temp_inv=15.0), _batches(load_dataset("fmnist-captions:train-subset", backbone.preprocess))
    if name == "class_cross_entropy":
        data = load_dataset("fashion-mnist:test-subset", backbone.preprocess)
        crit = build_criterion("cross_entropy", backbone, dataset=data, zero_shot_head=zero_shot_classifier)
        return crit, _batches(data, labels=True)
    data = load_dataset("fmnist-captions:train-subset", backbone.preprocess)  # captions: the contrastive form
    return build_criterion("cross_entropy", backbone, dataset=data), _batches(data)


def _close(got, want, rtol=1e-4):
    for a, b in zip(got.values, want.values):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-6 * float(b.abs().max()))


@pytest.mark.parametrize("name", ["entropy", "class_cross_entropy", "caption_cross_entropy"])
def test_chunked_scores_equal_whole_batch_scores(clip, name):
    criterion, batches = _criterion(name, clip)
    whole = taylor_scores(clip, batches, criterion, progress=False)
    chunked = taylor_scores(clip, batches, criterion, progress=False, chunk_size=5)
    _close(chunked, whole)
    assert chunked.meta["chunk_size"] == 5 and whole.meta["chunk_size"] is None
    assert {k: v for k, v in chunked.meta.items() if k != "chunk_size"} == {
        k: v for k, v in whole.meta.items() if k != "chunk_size"
    }


def test_chunks_are_not_independent_batches(clip):
    """The test above can fail: scoring each chunk as its own batch (what a per-GPU batch does) differs."""
    criterion, batches = _criterion("entropy", clip)
    whole = taylor_scores(clip, batches, criterion, progress=False)
    small = [(images[i : i + 4], targets[i : i + 4]) for images, targets in batches for i in range(0, BATCH, 4)]
    per_chunk = taylor_scores(clip, small, criterion, progress=False)
    differences = [float(((a - b).abs() / b.abs().max()).max()) for a, b in zip(per_chunk.values, whole.values)]
    assert max(differences) > 1e-2


def test_chunking_with_checkpointed_blocks(clip):
    criterion, batches = _criterion("entropy", clip)
    whole = taylor_scores(clip, batches, criterion, progress=False)
    both = taylor_scores(clip, batches, criterion, progress=False, chunk_size=4, checkpoint=True)
    _close(both, whole)


def test_chunk_size_at_least_the_batch_is_the_whole_batch(clip):
    criterion, batches = _criterion("entropy", clip)
    whole = taylor_scores(clip, batches, criterion, progress=False)
    same = taylor_scores(clip, batches, criterion, progress=False, chunk_size=BATCH)
    assert all(torch.equal(a, b) for a, b in zip(same.values, whole.values))


def test_bad_chunk_size_is_refused(clip):
    criterion, batches = _criterion("entropy", clip)
    with pytest.raises(ValueError, match="chunk_size"):
        taylor_scores(clip, batches, criterion, progress=False, chunk_size=0)


def test_api_score_passes_chunk_size(clip):
    scores = amp.score(clip, "synthetic:8:64", batch_size=8, chunk_size=3, max_images=8)
    assert scores.meta["chunk_size"] == 3


@pytest.mark.parametrize("criterion", [Entropy(5.0), KLToDense(5.0)], ids=["entropy", "kl_to_dense"])
@pytest.mark.parametrize("cache", [True, False])
def test_chunked_search_losses_equal_whole_batch_losses(criterion, cache):
    backbone = tiny("open_clip")
    val = [(images_for(backbone, 7, seed=20 + i), None) for i in range(2)]
    scores = magnitude_scores(backbone)
    options = dict(threshold=2e-3, steps=4, progress=False, cache=cache)
    whole = amp_search(tiny("open_clip"), scores, val, criterion, **options)
    chunked = amp_search(tiny("open_clip"), scores, val, criterion, chunk_size=3, **options)
    assert chunked.dense_loss == pytest.approx(whole.dense_loss, rel=1e-5, abs=1e-7)
    assert [p.loss for p in chunked.probes] == pytest.approx([p.loss for p in whole.probes], rel=1e-4, abs=1e-6)
    assert chunked.widths == whole.widths
    assert chunked.final_loss == pytest.approx(whole.final_loss, rel=1e-4, abs=1e-6)


def test_bf16_scoring_runs_the_model_in_bf16_and_the_criterion_in_fp32(clip):
    _, batches = _criterion("entropy", clip)
    seen = []

    class Watching(Entropy):
        def __call__(self, features, context=None):
            seen.append((features.dtype, torch.is_autocast_enabled("cpu")))
            return super().__call__(features, context)

    fp32 = taylor_scores(clip, batches, Entropy(15.0), progress=False)
    for chunk_size in (None, 5):
        seen.clear()
        bf16 = taylor_scores(
            clip, batches, Watching(15.0), progress=False, chunk_size=chunk_size, autocast_dtype=torch.bfloat16
        )
        assert seen and all(dtype == torch.bfloat16 and not autocast for dtype, autocast in seen)
        for a, b in zip(bf16.values, fp32.values):
            assert not torch.equal(a, b)
            assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.98  # the same ranking, to bf16 noise
