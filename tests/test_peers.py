"""The peers of notebook 08: exact budgets, sliced == masked, FLAP's formula, Torch-Pruning's importances recomputed
by hand (each against an independent computation, on tiny random models)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import images_for, tiny

from amp import peers
from amp.criteria import Entropy
from amp.scoring import Scores
from amp.surgery import mask_units


@pytest.fixture
def model(one_thread):
    return tiny("open_clip")


def _batches(backbone, n: int = 2, size: int = 6):
    return [(images_for(backbone, size, seed=i), None) for i in range(n)]


def _reference(dense, widths):
    """A pruned model with the given widths (what AMP would hand over)."""
    return peers.slice_copy(dense, peers.Scores([torch.arange(w, 0, -1).float() for w in dense.widths()]), widths)


def test_allocations_hit_the_budget_exactly():
    assert peers.uniform_allocation([10, 10, 10], 7) == [3, 2, 2]
    assert sum(peers.uniform_allocation([64, 32, 96], 101)) == 101
    scores = Scores([torch.tensor([5.0, 1.0, 0.5]), torch.tensor([4.0, 3.0]), torch.tensor([0.1, 0.2])])
    assert peers.global_allocation(scores, 4) == [1, 2, 1]  # the last layer's best (0.2) kept for the minimum of 1
    assert peers.global_allocation(scores, 3) == [1, 1, 1]
    with pytest.raises(ValueError, match="total kept units"):
        peers.uniform_allocation([4, 4], 9)
    with pytest.raises(ValueError, match="unknown allocation"):
        peers.allocate(scores, "even", 3)


@pytest.mark.parametrize("method", ["flap", "random", "amp"])
@pytest.mark.parametrize("allocation", ["widths", "uniform", "global"])
def test_every_peer_keeps_the_reference_cost(model, method, allocation):
    dense, dense_widths = model, list(model.widths())
    widths = [max(1, w // 3 + 2 * i) for i, w in enumerate(dense.widths())]
    reference = _reference(dense, widths)
    amp_scores = Scores([torch.rand(w) for w in dense.widths()])
    bench = peers.PeerBench(dense, _batches(dense), Entropy(10.0), amp_scores=amp_scores)
    result = bench.prune(method, allocation, reference)
    assert result.backbone.widths() == result.widths
    assert sum(result.widths) == sum(widths)
    if allocation == "widths":
        assert result.widths == widths
    assert result.seconds >= 0 and dense.widths() == dense_widths  # the dense model is left whole


def test_unequal_cost_is_refused(model):
    small = _reference(model, [max(1, w // 4) for w in model.widths()])
    large = _reference(model, [max(2, w // 2) for w in model.widths()])
    with pytest.raises(ValueError, match=r"keeps \d+ MLP units"):
        peers.check_same_cost(small, large, "small")


def test_sliced_model_equals_the_masked_dense_model(model):
    scores = Scores([torch.randn(w) for w in model.widths()])
    widths = [max(1, w // 2 - i) for i, w in enumerate(model.widths())]
    sliced = peers.slice_copy(model, scores, widths)
    masked = copy.deepcopy(model)
    for site, order, width in zip(masked.sites(), scores.orders(), widths):
        mask_units(site, order[:width])
    images = images_for(model, 4, seed=7)
    with torch.no_grad():
        assert torch.allclose(sliced.embed(images), masked.embed(images), atol=1e-5)
        assert not torch.allclose(sliced.embed(images), model.embed(images), atol=1e-3)


def test_flap_metric_and_bias_compensation_follow_the_paper(model):
    batches = _batches(model)
    seen: dict[int, list[torch.Tensor]] = {}
    handles = [site.fc_out.register_forward_pre_hook(
        lambda _m, args, i=site.index: seen.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for site in model.sites()]  # fmt: skip
    with torch.no_grad():
        for images, _ in batches:
            model.embed(images)
    for handle in handles:
        handle.remove()
    stats = peers.hidden_moments(model, batches)
    raw = peers.flap_scores(model, stats, standardize=False)
    standardized = peers.flap_scores(model, stats)
    widths = [max(1, w // 3) for w in model.widths()]
    compensated = peers.bias_compensated_copy(model, standardized, widths, stats)
    for site, pruned_site, order, width in zip(model.sites(), compensated.sites(), standardized.orders(), widths):
        h = torch.cat(seen[site.index]).double()
        weight, bias = site.fc_out.weight.detach().double(), site.fc_out.bias.detach().double()
        expected = h.var(0, unbiased=False) * weight.pow(2).sum(0)
        assert torch.allclose(raw.values[site.index].double(), expected, rtol=1e-4)
        values = standardized.values[site.index]
        assert abs(float(values.mean())) < 1e-4 and abs(float(values.std()) - 1) < 1e-4
        removed = torch.ones(site.hidden, dtype=torch.bool)
        removed[order[:width]] = False
        new_bias = bias + weight[:, removed] @ h[:, removed].mean(0)
        assert torch.allclose(pruned_site.fc_out.bias.detach().double(), new_bias, atol=1e-5)
        assert torch.equal(pruned_site.fc_out.weight.detach(), site.fc_out.weight.detach()[:, order[:width]])


def test_torch_pruning_magnitude_is_the_group_mean_of_squared_norms(model):
    pytest.importorskip("torch_pruning")
    scores = peers.tp_scores(model, "magnitude", normalizer=None)
    normalised = peers.tp_scores(model, "magnitude")
    for site, values, scaled in zip(model.sites(), scores.values, normalised.values):
        rows = site.fc_in.weight.detach().pow(2).sum(1)
        columns = site.fc_out.weight.detach().pow(2).sum(0)
        expected = (rows + columns) / 2  # Torch-Pruning's group reduction "mean" over fc_in outputs and fc_out inputs
        assert torch.allclose(values, expected, rtol=1e-5)
        assert torch.allclose(scaled, expected / expected.mean(), rtol=1e-5)


def _entropy_gradients(model, batches, criterion):
    """∂E/∂W of fc_in and fc_out per site, summed over batches, with plain autograd (independent of amp.peers)."""
    weights = [(site.fc_in.weight, site.fc_out.weight) for site in model.sites()]
    flat = [w for pair in weights for w in pair]
    totals = [torch.zeros_like(w) for w in flat]
    for images, _ in batches:
        loss = criterion(model.embed(images), None)
        for total, grad in zip(totals, torch.autograd.grad(loss, flat)):
            total += grad
    return [(totals[2 * i], totals[2 * i + 1]) for i in range(len(weights))]


def test_torch_pruning_taylor_and_hessian_use_amps_criterion(model):
    pytest.importorskip("torch_pruning")
    batches, criterion = _batches(model, n=2, size=4), Entropy(10.0)
    for p in model.model.parameters():
        p.requires_grad_(True)
    grads = _entropy_gradients(model, batches, criterion)
    halves = [(images[start : start + 2], None) for images, _ in batches for start in (0, 2)]
    squares = [[g.pow(2) for g in pair] for pair in _entropy_gradients(model, halves[:1], criterion)]
    for part in halves[1:]:
        for pair, new in zip(squares, _entropy_gradients(model, [part], criterion)):
            pair[0] += new[0].pow(2)
            pair[1] += new[1].pow(2)
    taylor = peers.tp_scores(model, "taylor", batches, criterion, normalizer=None)
    hessian = peers.tp_scores(model, "hessian", batches, criterion, normalizer=None, fisher_batch=2)
    for site, (g_in, g_out), (s_in, s_out), t, h in zip(model.sites(), grads, squares, taylor.values, hessian.values):
        w_in, w_out = site.fc_in.weight.detach(), site.fc_out.weight.detach()
        expected_taylor = ((w_in * g_in).abs().sum(1) + (w_out * g_out).abs().sum(0)) / 2
        assert torch.allclose(t, expected_taylor, rtol=1e-3, atol=1e-9)
        fisher_in, fisher_out = s_in / len(halves), s_out / len(halves)
        expected_hessian = ((w_in**2 * fisher_in).sum(1) + (w_out**2 * fisher_out).sum(0)) / 2
        assert torch.allclose(h, expected_hessian, rtol=1e-3, atol=1e-12)
    assert all(p.grad is None for site in model.sites() for p in site.fc_in.parameters())


@pytest.mark.parametrize("family", ["open_clip", "dinov2"])
def test_torch_pruning_peers_prune_to_the_reference_widths(family, one_thread):
    pytest.importorskip("torch_pruning")
    model = tiny(family)
    widths = [max(1, w // 4 + i) for i, w in enumerate(model.widths())]
    reference = _reference(model, widths)
    bench = peers.PeerBench(model, _batches(model), Entropy(10.0), fisher_batch=3)
    for method in peers.TP_IMPORTANCES:
        for allocation, normalizer in (("widths", "mean"), ("uniform", "mean"), ("global", "mean"), ("global", None)):
            result = bench.prune(method, allocation, reference, normalizer=normalizer)
            assert sum(result.backbone.widths()) == sum(widths)
            assert allocation != "widths" or result.backbone.widths() == widths


def test_missing_torch_pruning_names_the_install(model, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tp(name, *args, **kwargs):
        if name == "torch_pruning":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tp)
    with pytest.raises(ImportError, match=r"torch-pruning==1\.6\.1"):
        peers.tp_scores(model, "magnitude")


def test_packed_gated_mlps_are_refused_by_name(one_thread):
    pytest.importorskip("torch_pruning")
    model = tiny("dinov2_swiglu")
    if not any(site.packed for site in model.sites()):
        pytest.skip("this timm version splits the SwiGLU")
    with pytest.raises(ValueError, match="packed gated MLPs"):
        peers.tp_scores(model, "magnitude")


def test_peer_specs_parse_and_name():
    assert peers.parse_peer("taylor/global-raw") == ("taylor", "global", None)
    assert peers.parse_peer("flap/global") == ("flap", "global", "mean")
    assert peers.peer_label("magnitude/widths") == "TP magnitude, AMP's widths"
    assert peers.peer_label("hessian/global-raw") == "TP Hessian, global, no normaliser"
    for bad in ("flap/global-raw", "taylor", "obd/uniform"):
        with pytest.raises(ValueError, match="method/allocation"):
            peers.parse_peer(bad)


def test_compare_testbed_matches_every_peer_to_each_search(one_thread):
    dense = tiny("timm_vit")
    data = [(images_for(dense, 4, seed=i), torch.zeros(4, dtype=torch.long)) for i in range(2)]
    scores = Scores([torch.rand(w) for w in dense.widths()])
    bench = peers.PeerBench(dense, data, Entropy(10.0), amp_scores=scores)
    searches = [{"preset": "paper", "threshold": 0.05, "steps": 2},
                {"preset": "fidelity", "threshold": 0.01, "steps": 2}]  # fmt: skip

    def measure(backbone, name):
        return {"name": name, "units": sum(backbone.widths())}

    entries = peers.compare_testbed(dense, scores, 0.0, data, searches, ["amp/uniform", "random/global"], measure,
                                    bench, temp_inv=10.0, progress=False)  # fmt: skip
    assert [e["method"] for e in entries] == [
        "AMP paper Δ=0.05", "amp entropy-Taylor, uniform", "random, global",
        "AMP fidelity Δ=0.01", "amp entropy-Taylor, uniform", "random, global",
    ]  # fmt: skip
    for level in ("AMP paper Δ=0.05", "AMP fidelity Δ=0.01"):
        units = {e["row"]["units"] for e in entries if e["level"] == level}
        assert len(units) == 1 and units == {sum(next(e for e in entries if e["method"] == level)["widths"])}
