"""The resource plan against a hand count of a small model (the open_clip stand-in: width 64, 2 blocks, 17 tokens)."""

from __future__ import annotations

import pytest

from amp import plan as planner

SPEC = "open_clip:amp-standin-openclip"  # registered when amp.zoo is imported (load_model does)
D, H, L, T, PATCH, EMBED = 64, 256, 2, 17, 14, 32  # width, MLP units, blocks, tokens (4x4 patches + class), patch, proj
TEXT_D, TEXT_H, CONTEXT, VOCAB = 32, 128, 24, 49408


def hand_block_flops() -> int:
    linear = 2 * T * (D * 3 * D + D * D + D * H + H * D)  # qkv, out projection, fc1, fc2
    attention = 2 * (2 * T * T * D)  # q @ k^T and attn @ v
    return linear + attention


def hand_flops() -> int:
    patches = (T - 1) * 2 * (3 * PATCH * PATCH) * D
    return L * hand_block_flops() + patches + 2 * D * EMBED  # the projection of the class token


def hand_params() -> tuple[int, int, int]:
    """Whole model, vision tower, text weight matrices."""
    block = lambda d, h: 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)  # noqa: E731
    vision = 3 * PATCH * PATCH * D + D + T * D + 2 * D + L * block(D, H) + 2 * D + D * EMBED
    text = VOCAB * TEXT_D + CONTEXT * TEXT_D + block(TEXT_D, TEXT_H) + 2 * TEXT_D + TEXT_D * EMBED
    text_matrices = 3 * TEXT_D * TEXT_D + TEXT_D * TEXT_D + 2 * TEXT_D * TEXT_H + TEXT_D * EMBED
    return vision + text + 1, vision, text_matrices  # + the logit scale


@pytest.fixture(scope="module")
def shape():
    return planner.model_shape(SPEC)


def test_shape_matches_a_hand_count(shape):
    params, vision, text = hand_params()
    assert (shape.params, shape.vision_params, shape.text_params) == (params, vision, text)
    assert shape.flops == hand_flops()
    assert shape.block_flops == [hand_block_flops()] * L
    assert (shape.width, shape.hidden, shape.tokens) == (D, H, T)


def test_plan_matches_a_hand_computation(shape):
    block = {
        "model": SPEC,
        "batch_size": 64,
        "chunk_size": 16,
        "steps": 6,
        "cache_gb": 1e-6,
        "score_data": "imagefolder:{imagenet_train}",
        "score_images": 1000,
        "val_data": "imagefolder:{imagenet_val}",
        "val_images": 500,
        "classification": {"IN-1K": "imagefolder:{imagenet_val}", "IN-A": "imagefolder:{imagenet_a}"},
        "retrieval": {"COCO": "coco:{coco_root}:test"},
        "distill_data": "imagefolder:{imagenet_train}",
        "distill": {"epochs": 2, "batch_size": 128, "device_batch": 32, "activation_checkpointing": True,
                    "sharding": "fsdp"},
    }  # fmt: skip
    row = planner.plan_model(SPEC, block, shape=shape, gpu="H100-80GB", efficiency=0.5)
    params, _, text = hand_params()
    f, b = hand_flops(), hand_block_flops()
    rate = 989e12 * 0.5 * 3600  # FLOPs per GPU-hour
    act = 2 * (9 * D + 2 * H)
    phases = row["phases"]

    scoring = 1000 * 3 * f  # chunked: forward, forward with graph, backward to the activations
    assert phases["scoring"]["flops"] == pytest.approx(scoring)
    assert phases["scoring"]["gpu_hours"] == pytest.approx(scoring / rate)
    assert phases["scoring"]["peak_gb"] == pytest.approx((2 * params + 16 * T * L * act) / 1e9)

    search = 500 * (f + 6 * (2 * b + b))  # probes of layer 0 run both blocks, of layer 1 one
    assert phases["search"]["flops"] == pytest.approx(search)
    assert phases["search"]["peak_gb"] == pytest.approx((2 * params + 1e-6 * 1e9 + 16 * T * 2 * (4 * D + 2 * H)) / 1e9)

    distill = 2 * 1_281_167 * (4 * f + f)  # checkpointed student fwd + fwd + bwd, teacher fwd
    assert phases["distillation"]["flops"] == pytest.approx(distill)
    _, vision, _ = hand_params()
    peak = (16 * vision / 8 + 2 * params + 2 * (params - vision) + 32 * T * (2 * D * L + act)) / 1e9
    assert phases["distillation"]["peak_gb"] == pytest.approx(peak)

    images = 50_000 + 7_500 + 5_000
    evaluation = 4 * images * f + (1000 + 200) * 80 * 2 * text * 77
    assert phases["evaluation"]["flops"] == pytest.approx(evaluation)
    assert row["gpu_hours"] == pytest.approx((scoring + search + distill + evaluation) / rate)
    assert row["fits"]


def test_unchunked_scoring_needs_no_second_forward(shape):
    block = {"batch_size": 32, "score_data": "imagefolder:{imagenet_val}", "val_data": "imagefolder:{imagenet_val}"}
    row = planner.plan_model(SPEC, block, shape=shape)
    assert row["phases"]["scoring"]["flops"] == pytest.approx(50_000 * 2 * hand_flops())
    assert "distillation" not in row["phases"]


def test_unknown_data_and_gpu_are_refused():
    with pytest.raises(ValueError, match="no known size"):
        planner.data_size("imagefolder:{somewhere}")
    with pytest.raises(ValueError, match="--gpu"):
        planner.plan(gpu="TPU")


def test_every_model_of_the_paper_profile_is_planned(monkeypatch, shape):
    """Every model of paper.json gets a row (counted here with the small model's shape: the real ones take minutes)."""
    from amp.reproduce import load_profile

    monkeypatch.setattr(planner, "model_shape", lambda spec, **kwargs: shape)
    result = planner.plan("paper", gpu="H200")
    expected = [
        (stem, label) for stem, block in load_profile("paper").items() for label, _, _ in planner._models_of(block)
    ]
    assert [(r["notebook"], r["label"]) for r in result["rows"]] == expected
    assert len(expected) >= 5
    assert result["assumed"] and "ASSUMED" in result["markdown"]
    assert result["markdown"].count("\n| ") >= len(expected)


def test_cli_gpu_choices_are_the_plans():
    from amp.cli import build_parser

    parser = build_parser()
    reproduce = next(a for a in parser._subparsers._group_actions[0].choices["reproduce"]._actions if a.dest == "gpu")
    assert tuple(reproduce.choices) == tuple(planner.GPUS)


def test_cli_prints_the_plan(monkeypatch, capsys, shape):
    from amp.cli import main

    monkeypatch.setattr(planner, "model_shape", lambda spec, **kwargs: shape)
    assert main(["reproduce", "--profile", "paper", "--plan", "--gpu", "A100-80GB", "--only", "06"]) == 0
    printed = capsys.readouterr().out
    assert "A100-80GB" in printed and "vit_giant_patch14_dinov2" in printed
    assert "04" not in [line.split("|")[1].strip() for line in printed.splitlines() if line.startswith("| 0")]


def test_cli_dry_run_goes_to_the_rehearsal(monkeypatch):
    from amp import dry_run
    from amp.cli import main

    seen = {}

    def fake(profile, **kwargs):
        seen.update(kwargs, profile=profile)
        return {"ok": True, "report": "REPORT.md", "seconds": 1.0, "notebooks": []}

    monkeypatch.setattr(dry_run, "dry_run", fake)
    assert main(["reproduce", "--profile", "paper", "--dry-run", "--only", "06", "--set", "06.steps=2"]) == 0
    assert seen["profile"] == "paper" and seen["only"] == "06" and seen["overrides"] == {"06": {"steps": 2}}
