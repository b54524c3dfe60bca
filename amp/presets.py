"""Named AMP recipes: keyword arguments of :func:`amp.search` (allocation ``amp``), the threshold left to the caller.

``paper`` is the paper's rule and the library's default: the label-free entropy, accepted when it rises by at most Δ
over the model as pruned so far (``increase``/``previous``), no compensation. It stays the default for reproduction.

``fidelity`` is the recipe notebook 08 recommends and reports beside the paper's rule and the peers. It keeps the
paper's structure (last layer to first, ``increase`` against the model as pruned so far) but changes what a probe is
judged by: the KL divergence between the dense and the pruned model's within-batch similarity softmaxes
(``kl_to_dense``: ≥ 0 and 0 only at the dense model, so a fall of the entropy is not a free pass), after refitting the
probed MLP's output layer in closed form (``lstsq``, from the dense activations on the validation batches), so each
width is judged as it will be used. Its Δ is a per-layer KL budget, not an entropy change; its scale depends on the
model. Measured on validation data of the tiny CLIP (search on ``fmnist-captions:val-subset``, judged on
``fashion-mnist:train-subset`` and ``fmnist-captions:val``, never the test items): at Δ = 5e-4 it kept 9 % of the MLP
units with zero-shot 0.870, mean R@1 0.746 and cosine to dense 0.968, where the paper's rule at Δ = 0.01 kept 32 % for
0.883 / 0.742 / 0.987, and the same 9 % widths without ``lstsq`` gave 0.847 / 0.557 / 0.944 (uniform magnitude
0.853 / 0.577 / 0.945). On DINOv2-S (112 px, τ⁻¹ = 20; cosine to dense on 500 ``fmnist-captions:val`` images) at
Δ = 5e-3 it kept 52 % with cosine 0.958, where the paper's rule at Δ = 5e-3 kept 71 % with cosine 0.598, and the
preset's widths without ``lstsq`` gave 0.243. A dense reference (``reference="dense"``) was worse on the tiny CLIP:
one global budget is spent on the layers searched first (Δ = 3e-3 kept 41 % as widths 1024 960 416 64 16 16, cosine
0.966). What the preset was measured to do on the test items, against the paper's rule and the peers, is in notebook
08 (``results/cpu/08_peer_comparison.md``). Validation numbers are from one seed of the scoring and validation images.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"criterion": "entropy", "rule": "increase", "reference": "previous", "compensation": "none", "steps": 6},
    "fidelity": {
        "criterion": "kl_to_dense",
        "rule": "increase",
        "reference": "previous",
        "compensation": "lstsq",
        "steps": 6,
    },
}


def preset(name: str, **overrides: Any) -> dict[str, Any]:
    """The keyword arguments of preset ``name`` for :func:`amp.search`, updated with ``overrides`` (e.g. ``steps``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown AMP preset {name!r}; choose one of {sorted(PRESETS)}")
    return {**PRESETS[name], **overrides}
