"""The front door: prune (scores → widths → sliced copy) and recover (compensation, distillation)."""

from __future__ import annotations

import pytest
import torch
from conftest import images_for, tiny

import amp
from amp.recovery import calibration_stats, compensate_model
from amp.surgery import snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


def _embed(backbone, images):
    with torch.no_grad():
        return backbone.embed(images, project=True)


def test_prune_slices_a_copy_to_the_widths_and_keeps_the_best_units():
    dense = tiny("timm_vit")
    scores = amp.score(dense, None, method="magnitude")
    before = _embed(dense, images_for(dense))
    pruned = amp.prune(dense, scores, [8, 16, 4])
    assert pruned.widths() == [8, 16, 4] and dense.widths() == scores.widths
    assert torch.equal(_embed(dense, images_for(dense)), before)  # the dense model is untouched
    for site, dense_site, order in zip(pruned.sites(), dense.sites(), scores.orders()):
        assert torch.equal(site.fc_in.weight, dense_site.fc_in.weight[order[: site.hidden]])
    assert pruned.info["dense_widths"] == scores.widths


def test_prune_by_allocation_and_its_errors():
    dense = tiny("timm_vit")
    scores = amp.score(dense, None, method="random")
    assert amp.prune(dense, scores, ratio=0.25).widths() == [w // 4 for w in dense.widths()]
    assert sum(amp.prune(dense, scores, allocation="global", ratio=0.25).widths()) == sum(dense.widths()) // 4
    with pytest.raises(ValueError, match="needs widths"):
        amp.prune(dense, scores)
    with pytest.raises(ValueError, match="unknown allocation"):
        amp.prune(dense, scores, allocation="amp", ratio=0.5)
    with pytest.raises(ValueError, match="scores are for MLP widths"):
        amp.prune(amp.prune(dense, scores, ratio=0.5), scores, ratio=0.5)  # already pruned


def test_recover_lstsq_equals_the_compensation_recipe_and_refuses_other_scores():
    dense = tiny("timm_vit")
    scores = amp.score(dense, None, method="magnitude")
    widths = [8, 16, 4]
    pruned = amp.prune(dense, scores, widths)
    data = amp.loader(dense, "synthetic:24:32", batch_size=8)  # as amp.recover loads it
    recovered = amp.recover(pruned, "lstsq", "synthetic:24:32", dense, scores, calib_images=24, batch_size=8)

    by_hand = tiny("timm_vit")
    states = [snapshot(site) for site in by_hand.sites()]
    stats = calibration_stats(dense, list(data))
    compensate_model(by_hand, states, scores.orders(), widths, stats, method="lstsq")
    x = images_for(dense)
    assert torch.allclose(_embed(recovered, x), _embed(by_hand, x), atol=1e-6)
    assert not torch.allclose(_embed(recovered, x), _embed(pruned, x), atol=1e-4)
    assert recovered.info["recovery"]["method"] == "lstsq"
    with pytest.raises(ValueError, match="does not keep the best units"):
        amp.recover(pruned, "bias", "synthetic:8:32", dense, amp.score(dense, None, method="random"))
    with pytest.raises(ValueError, match="needs the scores"):
        amp.recover(pruned, "lstsq", "synthetic:8:32", dense)
    with pytest.raises(ValueError, match="unknown recovery"):
        amp.recover(pruned, "prayer", "synthetic:8:32", dense)


def test_recover_distill_trains_a_copy_and_records_its_loss_curve():
    dense = tiny("timm_vit")
    pruned = amp.prune(dense, amp.score(dense, None, method="magnitude"), ratio=0.25)
    x = images_for(dense)
    before = _embed(pruned, x)
    student = amp.recover(pruned, "distill", "synthetic:16:32", dense, steps=4, batch_size=8, lr=1e-3, progress=False)
    assert torch.equal(_embed(pruned, x), before)  # the pruned model itself is untouched
    curve = student.info["recovery"]["loss"]
    assert len(curve) == 4 and curve[-1] < curve[0]
    assert student.widths() == pruned.widths()


def test_a_half_precision_model_scores_and_evaluates_on_float32_images():
    dense = tiny("timm_vit")
    dense.model.to(torch.bfloat16)
    scores = amp.score(dense, "synthetic:16:32", batch_size=8)
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in scores.values)
    row = amp.EvalSuite(dense, fidelity="synthetic:8:32").measure(amp.prune(dense, scores, ratio=0.5))
    assert 0 < row["fidelity_cosine"] <= 1.0001
