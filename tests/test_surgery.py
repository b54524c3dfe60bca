import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODELS, images_for, tiny

from amp.surgery import keep_units, mask_units, prune, snapshot


def _keep(hidden: int, seed: int) -> torch.Tensor:
    return torch.randperm(hidden, generator=torch.Generator().manual_seed(seed))[: hidden // 3]


@pytest.mark.parametrize("name", [n for n in TINY_MODELS if n != "eva_norm"])
def test_slicing_equals_masking(name):
    sliced, masked = tiny(name), tiny(name)
    x = images_for(sliced)
    for i, (s, m) in enumerate(zip(sliced.sites(), masked.sites())):
        keep = _keep(s.hidden, i)
        keep_units(s, keep)
        mask_units(m, keep)
    assert [s.hidden for s in sliced.sites()] == [len(_keep(s.hidden, 0)) for s in masked.sites()]
    with torch.no_grad():
        torch.testing.assert_close(sliced.embed(x, project=True), masked.embed(x, project=True), atol=1e-5, rtol=1e-5)


def test_hidden_norm_is_sliced_with_the_units():
    """With a norm over the hidden units (EVA scale_mlp) removing a unit also changes the norm's statistics,
    so zeroing columns is not equivalent; compare against the MLP computed by hand on the kept units."""
    backbone = tiny("eva_norm")
    site = backbone.sites()[0]
    original = snapshot(site)
    x = torch.randn(2, 5, site.fc_in.in_features)
    keep = _keep(site.hidden, 1)
    keep_units(site, keep)
    gate = F.linear(x, original["gate.weight"][keep], original["gate.bias"][keep])
    value = F.linear(x, original["in.weight"][keep], original["in.bias"][keep])
    h = F.layer_norm(
        F.silu(gate) * value,
        (len(keep),),
        original["norm.weight"][keep],
        original["norm.bias"][keep],
        site.hidden_norm.eps,
    )
    expected = F.linear(h, original["out.weight"][:, keep], original["out.bias"])
    with torch.no_grad():
        torch.testing.assert_close(site.module(x), expected)
    assert site.hidden_norm.weight.shape == (len(keep),)


@pytest.mark.parametrize("name", ["dinov2_swiglu", "open_clip"])
def test_pruning_a_prefix_twice_equals_pruning_once(name):
    once, twice = tiny(name), tiny(name)
    orders = [torch.randperm(s.hidden, generator=torch.Generator().manual_seed(s.index)) for s in once.sites()]
    prune(once.sites(), orders, [8] * len(orders))
    prune(twice.sites(), orders, [20] * len(orders))
    prune(twice.sites(), [torch.arange(20)] * len(orders), [8] * len(orders))  # kept units are stored best-first
    for a, b in zip(once.model.state_dict().values(), twice.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_packed_gate_keeps_both_halves():
    backbone = tiny("dinov2_swiglu")
    site = backbone.sites()[0]
    w = site.fc_in.weight.detach().clone()
    keep = torch.tensor([5, 0, 7])
    keep_units(site, keep)
    torch.testing.assert_close(site.fc_in.weight, torch.cat([w[keep], w[keep + w.shape[0] // 2]]))


def test_bad_keep_is_rejected():
    site = tiny("open_clip").sites()[0]
    with pytest.raises(ValueError, match="zero"):
        keep_units(site, [])
    with pytest.raises(ValueError, match="distinct"):
        keep_units(site, [0, 0])
    with pytest.raises(ValueError, match="distinct"):
        keep_units(site, [site.hidden])
