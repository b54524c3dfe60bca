from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODELS, images_for, tiny

from amp.criteria import ClassCrossEntropy, Entropy, KLToDense, NonFiniteLossError, build_criterion
from amp.scoring import Scores, load_scores, magnitude_scores, random_scores, save_scores, taylor_scores


def reference_scores(backbone, batches, criterion, signed=False):
    """The slow way: store every fc_out input h and its gradient, then reduce explicitly."""
    sites = backbone.sites()
    totals = [torch.zeros(s.hidden, dtype=torch.float64) for s in sites]
    count = 0
    for p in backbone.model.parameters():
        p.requires_grad_(True)
    for images, _ in batches:
        stored = {}

        def keep(site, stored=stored):
            def hook(_m, args):
                args[0].retain_grad()
                stored[site.index] = args[0]

            return hook

        handles = [s.fc_out.register_forward_pre_hook(keep(s)) for s in sites]
        features = backbone.embed(images)
        criterion(features, None).backward()
        for h in handles:
            h.remove()
        for s, total in zip(sites, totals):
            h = stored[s.index]
            per_image = (h * h.grad).double().sum(dim=1)  # Σ over tokens
            total += (per_image if signed else per_image.abs()).sum(0)
        count += len(images)
        backbone.model.zero_grad()
    return [(t / count).float() for t in totals]


def _batches(backbone, n_batches=2, size=5):
    return [(images_for(backbone, size, seed=i), torch.full((size,), -1)) for i in range(n_batches)]


@pytest.mark.parametrize("name", list(TINY_MODELS))
@pytest.mark.parametrize("signed", [False, True])
def test_gate_scores_equal_stored_activation_reference(name, signed):
    backbone = tiny(name)
    batches = _batches(backbone)
    criterion = Entropy(temp_inv=5.0)
    scores = taylor_scores(backbone, batches, criterion, signed=signed, progress=False)
    expected = reference_scores(tiny(name), batches, criterion, signed=signed)
    assert scores.meta["images"] == 10
    for got, want in zip(scores.values, expected):
        assert got.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)


def test_scoring_leaves_the_model_unchanged():
    backbone = tiny("open_clip")
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    taylor_scores(backbone, _batches(backbone), Entropy(), progress=False)
    after = backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.grad is not None for p in backbone.model.parameters())


def test_kl_to_dense_cannot_score():
    backbone = tiny("open_clip")
    with pytest.raises(ValueError, match="gradient there is zero"):
        taylor_scores(backbone, _batches(backbone), KLToDense(), progress=False)


def test_non_finite_loss_is_an_error():
    backbone = tiny("open_clip")
    images = images_for(backbone)
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="scoring batch 0"):
        taylor_scores(backbone, [(images, None)], Entropy(), progress=False)


def test_empty_data_is_an_error():
    with pytest.raises(ValueError, match="no images"):
        taylor_scores(tiny("open_clip"), [], Entropy(), progress=False)


def test_scores_round_trip(tmp_path):
    backbone = tiny("dinov2_swiglu")
    scores = taylor_scores(backbone, _batches(backbone, 1), Entropy(), progress=False)
    save_scores(scores, tmp_path / "s.safetensors")
    loaded = load_scores(tmp_path / "s.safetensors")
    assert loaded.meta == scores.meta and loaded.meta["criterion"] == {"name": "entropy", "temp_inv": 15.0}
    for a, b in zip(scores.values, loaded.values):
        assert torch.equal(a, b)


def test_baselines():
    backbone = tiny("eva_norm")
    magnitude = magnitude_scores(backbone)
    assert magnitude.widths == backbone.widths() and all((v > 0).all() for v in magnitude.values)
    a, b, c = random_scores(backbone, 0), random_scores(backbone, 0), random_scores(backbone, 1)
    assert all(torch.equal(x, y) for x, y in zip(a.values, b.values))
    assert not torch.equal(a.values[0], c.values[0])


def test_orders_rank_best_first_and_are_stable():
    scores = Scores([torch.tensor([0.1, 0.5, 0.5, 0.0])])
    assert scores.orders()[0].tolist() == [1, 2, 0, 3]


@pytest.mark.parametrize("name", ["open_clip", "eva_norm"])
def test_checkpointed_blocks_give_the_same_scores(name):
    backbone = tiny(name)
    batches = _batches(backbone)
    plain = taylor_scores(backbone, batches, Entropy(5.0), progress=False)
    checkpointed = taylor_scores(backbone, batches, Entropy(5.0), progress=False, checkpoint=True)
    for a, b in zip(plain.values, checkpointed.values):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_class_cross_entropy_takes_the_zero_shot_head_as_embed_dim_by_classes():
    """Regression: a head (embed_dim, num_classes) with embed_dim == num_classes was used untransposed."""
    backbone = tiny("open_clip")
    classes = [f"class {i}" for i in range(6)]
    head = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))  # (embed_dim, num_classes), both 6
    calls = []

    def zero_shot_head(model, classnames, device="cpu"):
        calls.append((model, classnames, device))
        return head

    dataset = SimpleNamespace(classes=classes)
    criterion = build_criterion("cross_entropy", backbone, dataset=dataset, zero_shot_head=zero_shot_head)
    assert calls == [(backbone, classes, "cpu")]
    assert isinstance(criterion, ClassCrossEntropy) and criterion.needs_projection
    torch.testing.assert_close(criterion.classifier, F.normalize(head.T, dim=-1))  # one row per class
    with pytest.raises(ValueError, match="zero_shot_head"):
        build_criterion("cross_entropy", backbone, dataset=dataset)
