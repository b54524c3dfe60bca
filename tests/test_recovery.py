"""Training-free compensation after slicing (amp.recovery)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODELS, images_for, tiny
from torch import nn

from amp.recovery import (
    METHODS,
    HiddenStats,
    calibration_stats,
    compensate,
    compensate_model,
    lstsq_fit,
    lstsq_refit,
    slice_and_compensate,
)
from amp.scoring import magnitude_scores
from amp.surgery import keep_units, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


def _calibration(backbone, n: int = 32, batch: int = 8):
    images = images_for(backbone, n, seed=1)
    return [(images[i : i + batch], None) for i in range(0, n, batch)]


def _site_io(backbone, batches, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MLP inputs and outputs of one site on the calibration batches (dense model)."""
    site = backbone.sites()[layer]
    xs, ys = [], []

    def grab(_module, args, out):
        xs.append(args[0])
        ys.append(out)

    handle = site.module.register_forward_hook(grab)
    with torch.no_grad():
        for images, _ in batches:
            backbone.embed(images)
    handle.remove()
    dim = xs[0].shape[-1]
    return torch.cat([x.reshape(-1, dim) for x in xs]), torch.cat([y.reshape(-1, y.shape[-1]) for y in ys])


def _mse(site, x, y) -> float:
    with torch.no_grad():
        return float((site.module(x) - y).pow(2).mean())


# --- statistics ------------------------------------------------------------------------------------


def test_calibration_stats_are_the_moments_of_every_token():
    backbone = tiny("timm_vit")
    batches = _calibration(backbone, n=12, batch=5)
    stats = calibration_stats(backbone, batches)
    site = backbone.sites()[1]
    hs = []
    handle = site.fc_out.register_forward_pre_hook(lambda _m, a: hs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for images, _ in batches:
            backbone.embed(images)
    handle.remove()
    h = torch.cat(hs).double()
    assert stats[1].count == 12 * 17 == h.shape[0]
    assert stats[1].mean.dtype == torch.float64 and stats[1].second.shape == (site.hidden, site.hidden)
    torch.testing.assert_close(stats[1].mean, h.mean(0))
    torch.testing.assert_close(stats[1].second, h.T @ h / h.shape[0])
    assert stats[1].inputs is None  # only hidden-norm sites keep token samples
    assert set(calibration_stats(backbone, batches, layers=[2])) == {2}
    light = calibration_stats(backbone, batches, layers=[1], second=False)[1]  # enough for bias
    assert light.second is None and torch.equal(light.mean, stats[1].mean)
    with pytest.raises(ValueError, match="second moments"):
        keep = torch.arange(10)
        original = snapshot(site)
        keep_units(site, keep, original)
        compensate(site, original, keep, light, "lstsq")


def test_hidden_norm_sites_keep_inputs_and_outputs():
    backbone = tiny("eva_norm")
    stats = calibration_stats(backbone, _calibration(backbone, n=8), max_tokens=30)
    assert stats[0].inputs.shape == (30, 48) and stats[0].outputs.shape == (30, 48)


# --- closed forms on synthetic activations ---------------------------------------------------------


def _moments(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = h.double()
    return h.mean(0), h.T @ h / h.shape[0]


def test_lstsq_with_every_unit_kept_returns_the_original_weights():
    g = torch.Generator().manual_seed(0)
    rotation = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64)).Q
    scales = torch.linspace(0.5, 2.0, 16, dtype=torch.float64)  # correlated units, well-conditioned covariance
    h = torch.randn(4000, 16, generator=g, dtype=torch.float64) @ (scales[:, None] * rotation) + 0.5
    w, b = torch.randn(6, 16, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    mean, second = _moments(h)
    keep = torch.arange(16)
    new_w, new_b = lstsq_refit(w, b, mean, second, keep, ridge=0.0)
    torch.testing.assert_close(new_w, w, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(new_b, b, atol=1e-8, rtol=1e-8)
    new_w, new_b = lstsq_refit(w, b, mean, second, keep, ridge=1e-4)  # the default ridge: close, not equal
    torch.testing.assert_close(new_w, w, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(h @ new_w.T + new_b, h @ w.T + b, atol=2e-3, rtol=2e-3)
    perm = torch.randperm(16, generator=g)  # kept units in any order: columns follow keep
    new_w, _ = lstsq_refit(w, b, mean, second, perm, ridge=0.0)
    torch.testing.assert_close(new_w, w[:, perm], atol=1e-8, rtol=1e-8)


def test_lstsq_fit_matches_torch_lstsq():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(500, 7, generator=g, dtype=torch.float64) + 1.0
    y = torch.randn(500, 3, generator=g, dtype=torch.float64)
    w, b = lstsq_fit(h, y, ridge=0.0)
    design = torch.cat([h, torch.ones(500, 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(design, y).solution
    torch.testing.assert_close(w, solution[:7].T)
    torch.testing.assert_close(b, solution[7])


# --- a hand-built site whose removed units are linear combinations of kept ones ---------------------


def _linear_site():
    """A timm Mlp with identity activation: units 6..9 are affine combinations of units 0..5."""
    from timm.layers import Mlp

    from amp.adapters import describe_mlp

    torch.manual_seed(0)
    mlp = Mlp(8, 10, 5, act_layer=nn.Identity).double()
    with torch.no_grad():
        mix = torch.randn(4, 6, dtype=torch.float64)
        mlp.fc1.weight[6:] = mix @ mlp.fc1.weight[:6]
        mlp.fc1.bias[6:] = mix @ mlp.fc1.bias[:6] + torch.randn(4, dtype=torch.float64)  # plus a constant
    return mlp, describe_mlp(0, "mlp", mlp)


def _stats_of(site, x) -> HiddenStats:
    hs = []
    handle = site.fc_out.register_forward_pre_hook(lambda _m, a: hs.append(a[0]))
    with torch.no_grad():
        site.module(x)
    handle.remove()
    mean, second = _moments(hs[0])
    return HiddenStats(mean, second, len(x))


def test_lstsq_restores_linearly_dependent_units_exactly():
    mlp, site = _linear_site()
    x = torch.randn(300, 8, dtype=torch.float64)
    stats = _stats_of(site, x)
    test_x = torch.randn(50, 8, dtype=torch.float64) * 3  # off the calibration data too
    with torch.no_grad():
        dense = mlp(test_x)
    original = snapshot(site)
    keep = torch.tensor([3, 0, 5, 1, 4, 2])
    keep_units(site, keep, original)
    with torch.no_grad():
        assert (mlp(test_x) - dense).abs().max() > 0.1  # slicing alone loses the output
    compensate(site, original, keep, stats, "lstsq", ridge=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(mlp(test_x), dense, atol=1e-7, rtol=1e-7)


def test_bias_compensation_is_the_mean_removed_contribution():
    mlp, site = _linear_site()
    x = torch.randn(300, 8, dtype=torch.float64)
    stats = _stats_of(site, x)
    original = snapshot(site)
    keep = torch.tensor([0, 2, 4, 6, 8])
    removed = torch.tensor([1, 3, 5, 7, 9])
    keep_units(site, keep, original)
    compensate(site, original, keep, stats, "bias")
    expected = original["out.bias"] + original["out.weight"][:, removed] @ stats.mean[removed]
    torch.testing.assert_close(site.fc_out.bias.detach(), expected)
    with torch.no_grad():  # hence the mean output over the calibration tokens is the dense one
        torch.testing.assert_close(mlp(x).mean(0), _dense_mean(original, x))


def _dense_mean(original, x):
    mlp, site = _linear_site()
    keep_units(site, torch.arange(10), original)
    with torch.no_grad():
        return mlp(x).mean(0)


def test_bias_is_created_when_fc_out_has_none():
    from timm.layers import Mlp

    from amp.adapters import describe_mlp

    torch.manual_seed(0)
    mlp = Mlp(8, 10, 5, bias=False)
    site = describe_mlp(0, "mlp", mlp)
    x = torch.randn(100, 8) + 1
    stats = _stats_of(site, x)
    original = snapshot(site)
    keep_units(site, torch.arange(4), original)
    compensate(site, original, torch.arange(4), stats, "bias")
    assert isinstance(site.fc_out.bias, nn.Parameter) and site.fc_out.bias.abs().sum() > 0
    compensate(site, original, torch.arange(4), stats, "none")  # back to the dense (absent) bias
    assert site.fc_out.bias is None


# --- real tiny models ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["open_clip", "eva_norm"])
@pytest.mark.parametrize("method", METHODS)
def test_pruning_nothing_changes_nothing(name, method):
    backbone = tiny(name)
    batches = _calibration(backbone, n=8)
    images = images_for(backbone, 4)
    with torch.no_grad():
        before = backbone.embed(images)
    stats = calibration_stats(backbone, batches)
    states = [snapshot(s) for s in backbone.sites()]
    orders = [torch.arange(s.hidden) for s in backbone.sites()]
    compensate_model(backbone, states, orders, backbone.widths(), stats, method)
    with torch.no_grad():
        assert torch.equal(backbone.embed(images), before)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_compensation_reduces_the_site_error_on_calibration_tokens(name):
    backbone = tiny(name)
    batches = _calibration(backbone, n=48)
    stats = calibration_stats(backbone, batches)
    orders = magnitude_scores(backbone).orders()
    layer = len(backbone.sites()) - 1
    x, y = _site_io(backbone, batches, layer)
    site = backbone.sites()[layer]
    original = snapshot(site)
    keep = orders[layer][: site.hidden // 2]
    errors = {}
    for method in METHODS:
        slice_and_compensate(site, keep, original, stats[layer], method, ridge=1e-6)  # what a search probe calls
        errors[method] = _mse(site, x, y)
    assert errors["bias"] < errors["none"]
    assert errors["lstsq"] < errors["bias"]
    # probes never accumulate: compensating again from the snapshot gives the same site
    keep_units(site, keep, original)
    compensate(site, original, keep, stats[layer], "lstsq", ridge=1e-6)
    assert _mse(site, x, y) == pytest.approx(errors["lstsq"], rel=1e-6)


def test_hidden_norm_site_is_refitted_on_the_pruned_units():
    """With a hidden norm the fit must use the kept units as the *pruned* site computes them."""
    backbone = tiny("eva_norm")
    batches = _calibration(backbone, n=48)
    stats = calibration_stats(backbone, batches)
    site = backbone.sites()[1]
    x, y = _site_io(backbone, batches, 1)
    original = snapshot(site)
    keep = torch.arange(0, site.hidden, 2)
    keep_units(site, keep, original)
    hs = []
    handle = site.fc_out.register_forward_pre_hook(lambda _m, a: hs.append(a[0]))
    with torch.no_grad():
        site.module(x)
    handle.remove()
    expected_w, expected_b = lstsq_fit(hs[0], y, ridge=1e-4)  # brute force on the pruned activations
    compensate(site, original, keep, stats[1], "lstsq")
    torch.testing.assert_close(site.fc_out.weight.detach(), expected_w.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(site.fc_out.bias.detach(), expected_b.float(), atol=1e-5, rtol=1e-4)
    # the dense moments alone would give a different (wrong) fit for this site
    naive_w, _ = lstsq_refit(original["out.weight"], original["out.bias"], stats[1].mean, stats[1].second, keep)
    assert (naive_w.float() - expected_w.float()).abs().max() > 1e-3
    stats[1].inputs = None
    with pytest.raises(ValueError, match="normalises its hidden units"):
        compensate(site, original, keep, stats[1], "lstsq")


def test_compensate_rejects_bad_input():
    backbone = tiny("timm_vit")
    stats = calibration_stats(backbone, _calibration(backbone, n=4))
    site = backbone.sites()[0]
    original = snapshot(site)
    with pytest.raises(ValueError, match="unknown compensation"):
        compensate(site, original, torch.arange(site.hidden), stats[0], "magic")
    with pytest.raises(ValueError, match="slice first"):
        compensate(site, original, torch.arange(10), stats[0], "bias")


@pytest.mark.parametrize("name", ["open_clip", "dinov2_swiglu"])
def test_compensated_models_stay_closer_to_the_dense_embedding(name):
    dense = tiny(name)
    batches = _calibration(dense, n=48)
    images = torch.cat([images for images, _ in batches])
    with torch.no_grad():
        reference = dense.embed(images)
    stats = calibration_stats(dense, batches)
    states = [snapshot(s) for s in dense.sites()]
    orders = magnitude_scores(dense).orders()
    widths = [w // 2 for w in dense.widths()]
    cosine = {}
    for method in METHODS:
        pruned = tiny(name)
        compensate_model(pruned, states, orders, widths, stats, method)
        assert pruned.widths() == widths
        with torch.no_grad():
            cosine[method] = float(torch.cosine_similarity(pruned.embed(images), reference).mean())
    assert cosine["none"] < cosine["bias"] < cosine["lstsq"], cosine


def test_chunked_calibration_gives_the_same_statistics():
    backbone = tiny("eva_norm")
    batches = _calibration(backbone, n=12, batch=6)
    whole = calibration_stats(backbone, batches, max_tokens=40)
    chunked = calibration_stats(backbone, batches, max_tokens=40, chunk_size=4)
    for layer, want in whole.items():
        got = chunked[layer]
        assert got.count == want.count and got.inputs.shape == want.inputs.shape == (40, want.inputs.shape[1])
        torch.testing.assert_close(got.mean, want.mean)
        torch.testing.assert_close(got.second, want.second)
        torch.testing.assert_close(got.inputs, want.inputs)
        torch.testing.assert_close(got.outputs, want.outputs, rtol=1e-5, atol=1e-6)
