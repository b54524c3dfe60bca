from conftest import tiny

from amp.accounting import model_stats


def test_tiny_counts_match_the_shapes():
    backbone = tiny("open_clip")  # width 48, hidden 192, 32 px / patch 8 -> 17 tokens, 3 blocks
    stats = model_stats(backbone)
    assert stats.params == sum(p.numel() for p in backbone.model.visual.parameters())
    assert stats.mlp_params == 3 * (48 * 192 + 192 + 192 * 48 + 48)
    assert [b.mlp_flops for b in stats.blocks] == [2 * 17 * 2 * 48 * 192] * 3
    assert 0 < stats.mlp_flop_share < 1


def test_pruning_shrinks_mlp_counts_proportionally():
    from amp.surgery import keep_units

    backbone = tiny("dinov2_swiglu")
    dense = model_stats(backbone)
    for site in backbone.sites():
        keep_units(site, range(site.hidden // 2))
    pruned = model_stats(backbone)
    assert pruned.mlp_params < dense.mlp_params and pruned.flops < dense.flops
    assert pruned.params - pruned.mlp_params == dense.params - dense.mlp_params
