"""Surgery: keep a subset of an MLP's hidden units, in the order given.

Only slicing lives here. Kept units are stored in the order of ``keep`` (amp passes them in
descending importance), so a pruned model can be pruned further by taking a prefix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from amp.adapters import MLPSite

SiteState = dict[str, torch.Tensor]


def _rows(index: torch.Tensor, site: MLPSite) -> torch.Tensor:
    # a packed gated fc_in stacks [first half; second half]: keep the same units in both halves
    return torch.cat([index, index + site.hidden]) if site.packed else index


def snapshot(site: MLPSite) -> SiteState:
    """The tensors surgery touches, so a site can be re-sliced from its original (used by the search)."""
    state: SiteState = {}
    for key, module in (("gate", site.fc_gate), ("in", site.fc_in), ("out", site.fc_out), ("norm", site.hidden_norm)):
        if module is None:
            continue
        for name, tensor in module.named_parameters(recurse=False):
            state[f"{key}.{name}"] = tensor.detach()
    state["hidden"] = torch.tensor(site.hidden)
    return state


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def keep_units(site: MLPSite, keep: torch.Tensor | Sequence[int], source: SiteState | None = None) -> None:
    """Slice ``site`` in place so that its hidden units are ``keep`` (indices into ``source``'s units).

    ``source`` defaults to the site's current tensors; the search passes the unpruned snapshot.
    """
    source = snapshot(site) if source is None else source
    hidden = int(source["hidden"])
    keep = torch.as_tensor(keep, dtype=torch.long, device=source["out.weight"].device)
    if keep.numel() == 0:
        raise ValueError(f"{site.name}: cannot keep zero hidden units")
    if keep.device.type != "meta" and (keep.min() < 0 or keep.max() >= hidden or keep.unique().numel() != keep.numel()):
        raise ValueError(f"{site.name}: keep must be distinct indices in [0, {hidden})")
    rows = torch.cat([keep, keep + hidden]) if site.packed else keep
    for key, module in (("gate", site.fc_gate), ("in", site.fc_in)):
        if module is None:
            continue
        index = rows if key == "in" else keep
        _set(module, "weight", source[f"{key}.weight"][index])
        if module.bias is not None:
            _set(module, "bias", source[f"{key}.bias"][index])
        module.out_features = index.numel()
    _set(site.fc_out, "weight", source["out.weight"][:, keep])  # fc_out's bias is per output: kept whole
    site.fc_out.in_features = keep.numel()
    if site.hidden_norm is not None:
        for name in ("weight", "bias"):
            if getattr(site.hidden_norm, name, None) is not None:
                _set(site.hidden_norm, name, source[f"norm.{name}"][keep])
        site.hidden_norm.normalized_shape = (keep.numel(),)


def set_width(site: MLPSite, width: int) -> None:
    """Resize a site to ``width`` units without data (for rebuilding a pruned architecture on ``meta``)."""
    keep_units(site, torch.arange(width, device=site.fc_out.weight.device))


def prune(sites: Sequence[MLPSite], orders: Sequence[torch.Tensor], widths: Sequence[int]) -> None:
    """Keep the ``widths[l]`` most important units of every site, ``orders[l]`` ranking them best first."""
    if not (len(sites) == len(orders) == len(widths)):
        raise ValueError(f"{len(sites)} MLPs, {len(orders)} orders and {len(widths)} widths")
    for site, order, width in zip(sites, orders, widths):
        if not 1 <= width <= site.hidden:
            raise ValueError(f"{site.name}: width {width} outside [1, {site.hidden}]")
        keep_units(site, torch.as_tensor(order)[:width])


def mask_units(site: MLPSite, keep: torch.Tensor | Sequence[int]) -> None:
    """Zero fc_out's columns of every unit not in ``keep``: the masked twin of :func:`keep_units` (for tests)."""
    drop = torch.ones(site.hidden, dtype=torch.bool)
    drop[torch.as_tensor(keep, dtype=torch.long)] = False
    with torch.no_grad():
        site.fc_out.weight[:, drop] = 0
