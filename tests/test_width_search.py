import json

import pytest
from conftest import images_for, tiny

from amp.criteria import Entropy, KLToDense
from amp.scoring import random_scores, taylor_scores
from amp.width_search import amp_search, global_widths, round_width, uniform_widths


def _val(backbone, n_batches=2, size=6):
    return [(images_for(backbone, size, seed=10 + i), None) for i in range(n_batches)]


def _setup(name="open_clip"):
    backbone = tiny(name)
    scores = taylor_scores(backbone, _val(backbone, 1), Entropy(5.0), progress=False)
    return backbone, scores


@pytest.mark.parametrize(("name", "cache_gb"), [("open_clip", 4), ("dinov2", 4), ("eva_norm", 4), ("open_clip", 1e-9)])
def test_cached_tail_equals_full_model_probes(name, cache_gb):
    """cache_gb=1e-9 stashes only block 0's inputs, so every layer's inputs are recomputed from there."""
    cached, scores = _setup(name)
    full = tiny(name)
    # pick a threshold in the middle of the observed loss changes, so that probes both pass and fail
    trial = amp_search(tiny(name), scores, _val(cached), Entropy(5.0), threshold=1e9, steps=5, progress=False)
    threshold = sorted(p.loss - p.reference for p in trial.probes)[len(trial.probes) // 2]
    kwargs = dict(criterion=Entropy(5.0), threshold=max(threshold, 0.0), steps=5, progress=False)
    a = amp_search(cached, scores, _val(cached), cache=True, cache_gb=cache_gb, **kwargs)
    b = amp_search(full, scores, _val(full), cache=False, **kwargs)
    assert a.widths == b.widths
    assert [(p.layer, p.width, p.accepted) for p in a.probes] == [(p.layer, p.width, p.accepted) for p in b.probes]
    assert [p.loss for p in a.probes] == [p.loss for p in b.probes]  # bit-identical, not just close
    assert any(p.accepted for p in a.probes) and not all(p.accepted for p in a.probes)  # a real search


def test_search_prunes_in_place_and_records_probes():
    backbone, scores = _setup()
    result = amp_search(backbone, scores, _val(backbone), Entropy(5.0), threshold=1e-3, steps=6, progress=False)
    assert backbone.widths() == result.widths
    layers = [p.layer for p in result.probes]
    assert layers == sorted(layers, reverse=True)  # last layer first
    assert all(p.width < 192 for p in result.probes)
    for layer, width in enumerate(result.widths):
        accepted = [p.width for p in result.probes if p.layer == layer and p.accepted]
        assert width == (min(accepted) if accepted else 192)


def test_huge_threshold_reaches_the_resolution_floor():
    backbone, scores = _setup()
    result = amp_search(backbone, scores, _val(backbone), Entropy(5.0), threshold=1e9, steps=6, progress=False)
    assert result.widths == [3, 3, 3]  # 192 / 2**6
    backbone, scores = _setup()
    result = amp_search(backbone, scores, _val(backbone), Entropy(5.0), 1e9, steps=6, round_to=16, progress=False)
    assert result.widths == [16, 16, 16]


def test_zero_threshold_with_kl_keeps_everything():
    """KL to the dense model is > 0 for any real cut, so a zero budget accepts nothing."""
    backbone, scores = _setup()
    result = amp_search(backbone, scores, _val(backbone), KLToDense(5.0), threshold=0.0, progress=False)
    assert result.widths == [192, 192, 192]
    assert not any(p.accepted for p in result.probes)


def test_rules_and_references_change_the_outcome_as_defined():
    """'dense' reference never accepts more than the budget against the dense loss; 'absolute' is stricter."""
    results = {}
    for rule in ("increase", "absolute"):
        for reference in ("previous", "dense"):
            backbone, scores = _setup()
            results[rule, reference] = r = amp_search(
                backbone, scores, _val(backbone), Entropy(5.0), 5e-3, rule=rule, reference=reference, progress=False
            )
            for p in r.probes:
                change = p.loss - p.reference
                assert p.accepted == ((change if rule == "increase" else abs(change)) <= 5e-3)
                if reference == "dense":
                    assert p.reference == r.dense_loss
    for reference in ("previous", "dense"):
        assert sum(results["absolute", reference].widths) >= sum(results["increase", reference].widths)


@pytest.mark.parametrize("compensation", ["none", "lstsq"])
def test_resume_after_interruption_gives_the_same_widths(tmp_path, compensation):
    backbone, scores = _setup()
    opts = dict(compensation=compensation, progress=False)
    expected = amp_search(backbone, scores, _val(backbone), Entropy(5.0), threshold=2e-3, **opts)

    state = tmp_path / "state.json"

    def crash(layer):
        if layer == 1:
            raise KeyboardInterrupt

    backbone = tiny("open_clip")
    with pytest.raises(KeyboardInterrupt):
        amp_search(backbone, scores, _val(backbone), Entropy(5.0), 2e-3, state_path=state, on_layer_done=crash, **opts)
    assert set(json.loads(state.read_text())["done"]) == {"2", "1"}
    backbone = tiny("open_clip")  # a fresh process: the dense model again
    resumed = amp_search(backbone, scores, _val(backbone), Entropy(5.0), 2e-3, state_path=state, resume=True, **opts)
    assert resumed.widths == expected.widths
    assert [p.loss for p in resumed.probes] == [p.loss for p in expected.probes]
    assert resumed.final_loss == expected.final_loss  # compensated layers are restored exactly too

    with pytest.raises(ValueError, match="other settings"):
        amp_search(
            tiny("open_clip"), scores, _val(backbone), Entropy(5.0), 3e-3, state_path=state, resume=True, progress=False
        )


def test_bad_search_arguments():
    backbone, scores = _setup()
    with pytest.raises(ValueError, match="threshold"):
        amp_search(backbone, scores, _val(backbone), Entropy(), threshold=-1)
    with pytest.raises(ValueError, match="no batches"):
        amp_search(backbone, scores, [], Entropy(), threshold=0.1)
    with pytest.raises(ValueError, match="scores are for widths"):
        amp_search(tiny("dinov2_swiglu"), scores, _val(backbone), Entropy(), threshold=0.1)


def test_preset_allocations():
    assert uniform_widths([100, 200], 0.5) == [50, 100]
    assert uniform_widths([100, 200], 0.5, round_to=64) == [64, 128]
    assert round_width(0.2, 8, 100) == 8 and round_width(99, 8, 100) == 100
    backbone = tiny("open_clip")
    scores = random_scores(backbone)
    scores.values[0] += 10  # layer 0's units all outrank the others
    widths = global_widths(scores, 1 / 3)
    assert widths[0] == 192 and sum(widths) == pytest.approx(192, abs=2)
    with pytest.raises(ValueError, match="ratio"):
        uniform_widths([10], 0)


def test_bisection_continues_after_a_rejection():
    """A zero KL budget rejects every cut, so each probe moves up: 96, 144, 168, ... towards the dense width."""
    from amp.scoring import magnitude_scores

    backbone = tiny("open_clip")
    hidden = backbone.widths()[-1]
    result = amp_search(backbone, magnitude_scores(backbone), _val(backbone), KLToDense(5.0), 0.0, steps=6,
                        progress=False)  # fmt: skip
    last = [p.width for p in result.probes if p.layer == len(result.widths) - 1]
    assert last == [hidden - hidden // 2**k for k in range(1, 7)]
    assert result.widths == result.dense_widths
