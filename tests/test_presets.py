"""The named AMP presets are valid amp.search arguments, and ``paper`` is exactly the library's defaults."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from conftest import images_for, tiny

import amp
from amp import presets
from amp.criteria import CRITERIA
from amp.recovery import METHODS as COMPENSATIONS
from amp.scoring import Scores
from amp.width_search import REFERENCES, RULES, amp_search


def _defaults() -> dict:
    found = {}
    for function in (amp.search, amp_search):
        for name, parameter in inspect.signature(function).parameters.items():
            if parameter.default is not inspect.Parameter.empty:
                found.setdefault(name, parameter.default)
    return found


def test_paper_preset_is_the_default():
    defaults = _defaults()
    for key, value in presets.PRESETS["paper"].items():
        assert defaults[key] == value, key


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_names_valid_options(name: str):
    options = presets.preset(name)
    assert set(options) <= set(_defaults()), set(options) - set(_defaults())
    assert options["criterion"] in CRITERIA and options["rule"] in RULES and options["reference"] in REFERENCES
    assert options["compensation"] in COMPENSATIONS
    assert "threshold" not in options  # model-specific: the caller gives it


def test_preset_overrides_and_unknown_names():
    assert presets.preset("fidelity", steps=3)["steps"] == 3
    assert presets.PRESETS["fidelity"]["steps"] == 6  # the table itself is not changed
    with pytest.raises(ValueError, match="unknown AMP preset 'best'"):
        presets.preset("best")


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_runs_a_search(name: str, one_thread):
    dense = tiny("timm_vit")
    scores = Scores([torch.rand(w) for w in dense.widths()])
    data = [(images_for(dense, 4, seed=i), torch.zeros(4, dtype=torch.long)) for i in range(2)]
    pruned = copy.deepcopy(dense)
    result = amp.search(pruned, scores, data, threshold=0.05, progress=False, **presets.preset(name, steps=2))
    assert result["config"]["criterion"]["name"] == presets.PRESETS[name]["criterion"]
    assert result["config"]["compensation"] == presets.PRESETS[name]["compensation"]
    assert pruned.widths() == result["widths"]
