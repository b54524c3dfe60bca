"""The command line: real runs on tiny models, and every bad input gets a message that says what is wrong."""

import json

import pytest
from conftest import TINY_MODELS

from amp.cli import main

TINY = [
    "--model-arg",
    "img_size=28",
    "--model-arg",
    "depth=2",
    "--model-arg",
    "embed_dim=48",
    "--model-arg",
    "num_heads=2",
]
DINO = [TINY_MODELS["dinov2"][0], *TINY]


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_info_on_vit_g_14_matches_the_paper(capsys):
    assert main(["info", "open_clip:ViT-g-14", "--meta", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert round(stats["params"] / 1e9, 2) == 1.01
    assert 0.67 < stats["mlp_param_share"] < 0.69
    assert len(stats["blocks"]) == 40 and stats["blocks"][0]["width"] == 6144


def test_score_prune_eval_round_trip(tmp_path, capsys):
    scores = tmp_path / "s.safetensors"
    assert main(["score", *DINO, "--data", "synthetic:8:28", "--batch-size", "4", "--out", str(scores)]) == 0
    out = tmp_path / "pruned"
    argv = ["prune", *DINO, "--data", "synthetic:8:28", "--batch-size", "4", "--scores", str(scores)]
    assert main([*argv, "--threshold", "1e9", "--steps", "2", "--out", str(out)]) == 0
    assert json.loads((out / "search.json").read_text())["widths"] == [48, 48]
    assert main(["info", str(out), "--per-block"]) == 0
    assert "MLP share" in capsys.readouterr().out
    # resuming a finished search changes nothing
    assert main([*argv, "--threshold", "1e9", "--steps", "2", "--out", str(out), "--resume"]) == 0
    uniform = tmp_path / "uniform"
    assert main([*argv, "--allocation", "uniform", "--ratio", "0.25", "--out", str(uniform)]) == 0
    assert json.loads((uniform / "search.json").read_text())["widths"] == [48, 48]


def test_unknown_model(capsys):
    assert "unknown open_clip architecture 'ViT-Nope'" in _error(capsys, ["info", "open_clip:ViT-Nope"])
    assert "cannot resolve model" in _error(capsys, ["info", "nonsense"])
    assert "unknown timm model" in _error(capsys, ["info", "timm:not_a_model"])


def test_missing_weights_file(capsys, tmp_path):
    assert "weights file not found" in _error(capsys, ["info", f"timm:vit_tiny_patch16_224:{tmp_path}/w.safetensors"])


def test_missing_data_path(capsys, tmp_path):
    err = _error(capsys, ["score", *DINO, "--data", f"folder:{tmp_path}/nowhere", "--out", str(tmp_path / "s")])
    assert "directory not found" in err


def test_empty_data_set(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    err = _error(capsys, ["score", *DINO, "--data", f"folder:{tmp_path}/empty", "--out", str(tmp_path / "s")])
    assert "no images" in err


def test_negative_threshold(capsys, tmp_path):
    err = _error(capsys, ["prune", *DINO, "--data", "synthetic:4:28", "--threshold", "-0.1", "--out", str(tmp_path)])
    assert "--threshold must be ≥ 0" in err


def test_non_finite_loss(capsys, tmp_path):
    err = _error(
        capsys, ["score", *DINO, "--data", "synthetic:4:28", "--temp-inv", "1e39", "--out", str(tmp_path / "s")]
    )
    assert "loss is nan" in err or "loss is inf" in err


def test_unsupported_mlp_names_the_module_type():
    import timm
    import torch

    from amp.adapters import UnsupportedModelError, adapter_for

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, embed_dim=48, num_heads=2)
    model.blocks[0].mlp = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.GELU(), torch.nn.Linear(96, 48))
    with pytest.raises(UnsupportedModelError, match=r"torch\.nn\.modules\.container\.Sequential"):
        adapter_for(model).sites(model)
    with pytest.raises(UnsupportedModelError, match=r"no amp adapter for a torch\.nn\.modules\.linear\.Linear"):
        adapter_for(torch.nn.Linear(2, 2))
