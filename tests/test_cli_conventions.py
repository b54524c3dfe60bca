"""Command-line conventions: a fast ``--help`` (no torch), ``--version``, defaults and an example per command, checks
before a model loads, logging with -v/-q, rank 0 alone prints, ``--num-workers`` everywhere images are read; and data
at scale: ``imagefolder:`` without a stat per image, the search's validation set read no further than needed."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODELS

import amp
import amp.api
import amp.distributed
from amp import cli
from amp.criteria import CRITERIA
from amp.data import DataSpecError, load_dataset, make_loader, num_workers, set_num_workers
from amp.distill import LOSSES, SHARDINGS
from amp.pipeline import PipelineConfig
from amp.width_search import materialise

ROOT = Path(__file__).resolve().parents[1]
READS_IMAGES = ("score", "search", "prune", "eval", "demo", "distill")
DINO = [
    TINY_MODELS["dinov2"][0],
    *[arg for key in ("img_size=28", "depth=2", "embed_dim=48", "num_heads=2") for arg in ("--model-arg", key)],
]


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def _commands() -> dict:
    parser = cli._finish_help(cli.build_parser())
    return next(a for a in parser._actions if a.dest == "command").choices


def test_importing_the_cli_and_help_need_no_torch():
    probe = "import sys, amp.cli; heavy = {'torch', 'open_clip', 'timm'} & set(sys.modules); print(sorted(heavy))"
    assert _python("-c", probe).stdout.strip() == "[]"
    start = time.perf_counter()
    shown = _python("-m", "amp", "--help")
    seconds = time.perf_counter() - start
    assert shown.returncode == 0 and all(name in shown.stdout for name in ("info", "prune", "demo", "--version"))
    print(f"amp --help: {seconds:.2f} s")  # 0.5 s here against 13 s with the eager imports (2 busy cores)


def test_version_is_the_installed_metadata():
    shown = _python("-m", "amp", "--version")
    assert shown.returncode == 0 and shown.stdout.strip() == f"amp {metadata.version('amp-prune')}"
    assert amp.__version__ == metadata.version("amp-prune")


def test_every_command_shows_an_example_and_its_defaults():
    commands = _commands()
    assert set(commands) <= set(cli.EXAMPLES), "every command needs an example in amp.cli.EXAMPLES"
    for name, parser in commands.items():
        text = parser.format_help()
        assert f"example:\n  amp {name} " in text, name
    score = commands["score"].format_help()
    assert "default: 32" in score and "default: entropy" in score and "(default: 15.0)" in score
    assert "default: 0.01" in commands["demo"].format_help()


def test_help_choices_and_defaults_are_the_library_s():
    assert cli.CRITERIA == CRITERIA and cli.LOSSES == LOSSES and cli.SHARDINGS == SHARDINGS
    assert {key: getattr(PipelineConfig, key) for key in cli.DEMO_DEFAULTS} == cli.DEMO_DEFAULTS


def test_python_dash_m_amp_runs_the_cli():
    shown = _python("-m", "amp", "info", "open_clip:ViT-B-32", "--meta", "--json")
    assert shown.returncode == 0 and '"params"' in shown.stdout


@pytest.mark.parametrize(
    ("allocation", "missing"), [("uniform", "--ratio"), ("global", "--ratio"), ("amp", "--threshold")]
)
def test_required_options_are_checked_before_a_model_loads(allocation, missing, tmp_path, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(amp.api, "load_model", no_loading)
    argv = ["prune", "zoo:tiny-clip", "--data", "synthetic:4", "--allocation", allocation, "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("amp: error: ") and missing in err


def test_progress_is_logged_and_quiet_hides_it(tmp_path, capsys):
    argv = ["score", *DINO, "--data", "synthetic:8:28", "--batch-size", "4", "--method", "magnitude"]
    assert cli.main([*argv, "--out", str(tmp_path / "a.safetensors")]) == 0
    captured = capsys.readouterr()
    assert "amp: scores for 2 MLPs written to" in captured.err and captured.out == ""
    assert cli.main(["-q", *argv, "--out", str(tmp_path / "b.safetensors")]) == 0
    assert "scores for" not in capsys.readouterr().err
    assert cli.main([*argv, "-q", "--out", str(tmp_path / "c.safetensors")]) == 0  # after the command, too
    assert "scores for" not in capsys.readouterr().err


def test_only_rank_0_prints_and_writes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(amp.distributed, "rank", lambda: 1)
    assert cli.main(["info", "open_clip:ViT-B-32", "--meta", "--json"]) == 0
    out = tmp_path / "scores.safetensors"
    argv = ["score", *DINO, "--data", "synthetic:8:28", "--batch-size", "4", "--method", "magnitude", "--out", str(out)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and not out.exists() and "scores for" not in captured.err


def test_num_workers_on_every_command_that_reads_images():
    commands = _commands()
    for name in READS_IMAGES:
        assert "--num-workers" in commands[name].format_help(), name
    before = num_workers()
    try:
        set_num_workers(2)
        assert make_loader(list(range(4)), 2).num_workers == 2
        assert make_loader(list(range(4)), 2, num_workers=0).num_workers == 0
        with pytest.raises(ValueError, match="num-workers"):
            set_num_workers(-1)
    finally:
        set_num_workers(before)


# --- data at scale -------------------------------------------------------------------------------


def _image_tree(root: Path) -> None:
    from PIL import Image

    for name in ("dog/b.png", "dog/a.jpg", "cat/x/deep.png", "cat/z.png", "empty/notes.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".txt"):
            (root / name).write_text("not an image")
        else:
            Image.new("RGB", (4, 4), (len(name) * 9, 0, 0)).save(root / name)


def test_imagefolder_lists_without_a_stat_per_image(tmp_path, monkeypatch):
    _image_tree(tmp_path)
    stats = []
    real_stat = os.stat

    def counting_stat(path, *args, **kwargs):
        if str(path).lower().endswith((".png", ".jpg")):
            stats.append(path)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    dataset = load_dataset(f"imagefolder:{tmp_path}")
    assert stats == []  # one directory walk: 1.28 M ImageNet files are listed, not stat'ed one by one
    assert dataset.classes == ["cat", "dog", "empty"] and dataset.class_to_idx == {"cat": 0, "dog": 1, "empty": 2}
    names = [Path(path).relative_to(tmp_path).as_posix() for path, _ in dataset.samples]
    assert names == ["cat/z.png", "cat/x/deep.png", "dog/a.jpg", "dog/b.png"] and dataset.targets == [0, 0, 1, 1]


def test_imagefolder_errors_name_the_culprit(tmp_path):
    _image_tree(tmp_path)
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png")
    dataset = load_dataset(f"imagefolder:{tmp_path}")
    broken = next(i for i, (path, _) in enumerate(dataset.samples) if path.endswith("broken.png"))
    with pytest.raises(DataSpecError, match=r"broken\.png"):
        dataset[broken]
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.txt").write_text("")
    with pytest.raises(DataSpecError, match="no class sub-directories"):
        load_dataset(f"imagefolder:{tmp_path / 'flat'}")
    (tmp_path / "none" / "cls").mkdir(parents=True)
    with pytest.raises(DataSpecError, match="no images"):
        load_dataset(f"imagefolder:{tmp_path / 'none'}")


def test_materialise_reads_no_more_than_it_keeps_and_shows_progress(capsys, caplog):
    pulled = []

    def batches():
        for i in range(10):
            pulled.append(i)
            yield torch.zeros(4, 3, 2, 2), torch.zeros(4, dtype=torch.long)

    with caplog.at_level(logging.INFO, logger="amp"):
        kept = materialise(batches(), max_images=8)
    assert len(kept) == 2 and pulled == [0, 1]  # the batch after the limit is never decoded
    assert "validation set in memory: 8 images in 2 batches" in caplog.text
    assert "validation images" in capsys.readouterr().err  # the progress bar
    loader = make_loader(list(zip(torch.zeros(6, 3, 2, 2), range(6))), 4)
    assert sum(len(images) for images, _ in materialise(loader, progress=False)) == 6
