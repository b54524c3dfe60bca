"""Nothing a user made is lost, and every failure is one clear line (issue 13): a table of hostile cases.

Each case of the table runs the command line on something hostile and asserts exit 2, one ``amp: error:`` line
naming the culprit, no traceback, and every file under the test directory unchanged. Then: directories written all or
nothing (a save killed in the middle, a distillation killed after its first checkpoint), ``--overwrite`` replacing a
directory whole, and how the command line reports expected and unexpected errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODELS, images_for, tiny

import amp.cli
from amp.cli import main
from amp.io import OutputError, clean_orphans, write_dir
from amp.models import ModelSpecError, load_pruned, save_pruned
from amp.scoring import random_scores
from amp.surgery import prune

SPEC, KWARGS = TINY_MODELS["timm_vit"]
MODEL_ARGS = [a for key, value in KWARGS.items() for a in ("--model-arg", f"{key}={value}")]
DATA = ["--data", "synthetic:8:32", "--batch-size", "4"]
REPO = Path(__file__).resolve().parents[1]


def _pruned(seed: int = 0):
    backbone = tiny("timm_vit", seed)
    prune(backbone.sites(), random_scores(backbone, seed=1).orders(), [w // 2 for w in backbone.widths()])
    return backbone


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A pruned model (``m``) and its dense original (``dense``), saved once; each case gets its own copy."""
    root = tmp_path_factory.mktemp("models")
    save_pruned(_pruned(), root / "m")
    save_pruned(tiny("timm_vit"), root / "dense")
    return root


@pytest.fixture
def work(models, tmp_path, monkeypatch) -> Path:
    for name in ("m", "dense"):
        shutil.copytree(models / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


# --- the table: (setup: test directory -> argv, what the one error line must say) ---------------------------


def _file(path: Path, text: str = "mine") -> Path:
    path.write_text(text)
    return path


def _dir(path: Path, *files: str) -> Path:
    path.mkdir()
    for name in files:
        _file(path / name)
    return path


def _meta(model: Path, change: Callable[[dict], None]) -> Path:
    meta = json.loads((model / "amp.json").read_text())
    change(meta)
    (model / "amp.json").write_text(json.dumps(meta))
    return model


def _weights(model: Path, data: bytes) -> Path:
    (model / "model.safetensors").write_bytes(data)
    return model


def _truncated(model: Path) -> Path:
    return _weights(model, (model / "model.safetensors").read_bytes()[:-100])


def _foreign(model: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3, 3)}, str(model / "model.safetensors"))
    return model


def _broken_checkpoint(out: Path) -> Path:
    (out / "checkpoints").mkdir(parents=True)
    _file(out / "checkpoints" / "checkpoint.pt", "PK\x03\x04 cut short")
    return out


def _half_width(meta: dict) -> None:
    meta["widths"][0] //= 2


def _pop_last_width(meta: dict) -> None:
    meta["widths"].pop()
    meta["dense_widths"].pop()


def _score(out) -> list[str]:
    return ["score", SPEC, *MODEL_ARGS, *DATA, "--out", str(out)]


def _prune(out, *extra, model: str = SPEC) -> list[str]:
    return ["prune", model, *MODEL_ARGS, *DATA, "--threshold", "1", "--out", str(out), *extra]


def _distill(w: Path, out, *extra, student=None) -> list[str]:
    student = student or w / "m"
    argv = ["distill", "--student", str(student), "--teacher", str(w / "dense"), *DATA[:2], "--steps", "2"]
    return [*argv, "--batch-size", "4", "--out", str(out), "--no-progress", *extra]


def _info(model: Path, *extra) -> list[str]:
    return ["info", str(model), *extra]


CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    # output locations, checked before any work
    "score --out is a directory": (lambda w: _score(_dir(w / "d")), "is a directory"),
    "score --out under a file": (lambda w: _score(_file(w / "f") / "s.safetensors"), "is a file, so"),
    "score --out not writable": (lambda w: _score("/sys/amp-test/s.safetensors"), "cannot write in /"),
    "eval --out is a directory": (lambda w: ["eval", str(w / "m"), "--out", str(_dir(w / "d"))], "is a directory"),
    "prune --out is a file": (lambda w: _prune(_file(w / "f")), "is a file, not a directory"),
    "prune --out under a file": (lambda w: _prune(_file(w / "f") / "out"), "is a file, so"),
    "prune --out not writable": (lambda w: _prune("/sys/amp-test"), "cannot write in /"),
    "prune --out holds a model": (lambda w: _prune(w / "m"), "is not empty (holds amp.json, model.safetensors)"),
    "prune --out holds user files": (lambda w: _prune(_dir(w / "d", "notes.txt")), "pass --overwrite"),
    "prune --out is its input": (lambda w: _prune(w / "m", model=str(w / "m")), "is the input"),
    "prune --out contains its input": (
        lambda w: _prune(w, "--overwrite", model=str(w / "m")),
        "contains the input",
    ),
    "prune --out contains its --scores": (
        lambda w: _prune(w / "d", "--overwrite", "--scores", str(_file(_dir(w / "d") / "s.safetensors"))),
        "contains the input",
    ),
    "eval --out under a file": (
        lambda w: ["eval", str(w / "m"), "--out", str(_file(w / "f") / "r.json")],
        "is a file, so",
    ),
    "prune --overwrite --out the working dir": (lambda w: _prune(".", "--overwrite"), "working directory"),
    "prune --resume, no search state": (lambda w: _prune(w / "m", "--resume"), "holds no search_state.json"),
    "search --out holds a model": (lambda w: ["search", *_prune(w / "m")[1:]], "is not empty"),
    "distill --out is its --student": (lambda w: _distill(w, w / "m"), "is the input"),
    "distill --out is its --teacher": (lambda w: _distill(w, w / "dense"), "is the input"),
    "distill --out holds user files": (lambda w: _distill(w, _dir(w / "d", "x")), "is not empty"),
    "distill --resume, checkpoint truncated": (
        lambda w: _distill(w, _broken_checkpoint(w / "out"), "--resume"),
        "not a readable distillation checkpoint",
    ),
    "distill --out is a file": (lambda w: _distill(w, _file(w / "f")), "is a file"),
    "distill --resume, no checkpoint": (
        lambda w: _distill(w, _dir(w / "d", "x"), "--resume"),
        "holds no checkpoints/checkpoint.pt",
    ),
    "demo --out holds files": (lambda w: ["demo", "--out", str(_dir(w / "d", "x"))], "is not empty"),
    "demo --out is a file": (lambda w: ["demo", "--out", str(_file(w / "f"))], "is a file"),
    "reproduce --out is a file": (lambda w: ["reproduce", "--out", str(_file(w / "f"))], "is a file"),
    # weight files and pruned-model directories, where they enter
    "truncated weights": (lambda w: _info(_truncated(w / "m")), "model.safetensors: truncated"),
    "truncated weights, --meta": (lambda w: _info(_truncated(w / "m"), "--meta"), "model.safetensors: truncated"),
    "empty weights file": (lambda w: _info(_weights(w / "m", b"")), "0 bytes, not a safetensors file"),
    "weights file of text": (lambda w: _info(_weights(w / "m", b"x" * 64)), "not a safetensors file"),
    "weights header not JSON": (
        lambda w: _info(_weights(w / "m", (4).to_bytes(8, "little") + b"\xff\xfe{}")),
        "its header is not JSON",
    ),
    "foreign safetensors": (lambda w: _info(_foreign(w / "m")), "do not fit the architecture"),
    "amp.json width edited": (lambda w: _info(_meta(w / "m", _half_width)), "of another shape"),
    "amp.json width edited, --meta": (lambda w: _info(_meta(w / "m", _half_width), "--meta"), "of another shape"),
    "amp.json one width short": (lambda w: _info(_meta(w / "m", _pop_last_width)), "2 widths for 3"),
    "amp.json without widths": (lambda w: _info(_meta(w / "m", lambda m: m.pop("widths"))), "no 'widths'"),
    "amp.json without arch": (lambda w: _info(_meta(w / "m", lambda m: m.pop("arch"))), "no 'arch'"),
    "amp.json without format": (lambda w: _info(_meta(w / "m", lambda m: m.pop("format"))), "no 'format'"),
    "amp.json of a newer amp": (
        lambda w: _info(_meta(w / "m", lambda m: m.update(format=99))),
        "format 99, but this amp reads format 1; upgrade amp",
    ),
    "amp.json width negative": (
        lambda w: _info(_meta(w / "m", lambda m: m["widths"].__setitem__(0, -3))),
        "list of positive integers",
    ),
    "amp.json width over dense": (
        lambda w: _info(_meta(w / "m", lambda m: m["widths"].__setitem__(0, 10**6))),
        "do not fit 'dense_widths'",
    ),
    "amp.json arch without family": (
        lambda w: _info(_meta(w / "m", lambda m: m["arch"].pop("family"))),
        "'arch' must be a record",
    ),
    "amp.json not JSON": (lambda w: _info(_file(w / "m" / "amp.json", "{").parent), "amp.json: not valid JSON"),
    "amp.json missing": (lambda w: _info((w / "m" / "amp.json").unlink() or w / "m"), "not a pruned amp model"),
    "distill of a truncated student": (
        lambda w: _distill(w, w / "out", student=_truncated(w / "m")),
        "model.safetensors: truncated",
    ),
    "prune of a foreign pruned dir": (lambda w: _prune(w / "out", model=str(_foreign(w / "m"))), "do not fit"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_case_is_one_clear_line_and_changes_nothing(case, work, capsys):
    setup, expected = CASES[case]
    argv = setup(work)
    before = _snapshot(work)
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("amp: error: ") and expected in last, last
    assert _snapshot(work) == before  # nothing written, nothing replaced


def test_the_table_is_long_enough():
    assert len(CASES) >= 25


# --- good input still works: --meta on a pruned dir, --overwrite replaces whole ------------------------


def test_info_meta_on_a_pruned_dir_matches_the_loaded_model(work, capsys):
    assert main(_info(work / "m", "--json")) == 0
    loaded = json.loads(capsys.readouterr().out)
    assert main(_info(work / "m", "--json", "--meta")) == 0
    on_meta = json.loads(capsys.readouterr().out)
    assert on_meta["params"] == loaded["params"] and on_meta["blocks"] == loaded["blocks"]


def test_prune_overwrite_onto_its_input_replaces_it_whole(work, capsys):
    _file(work / "m" / "stale.txt")
    assert main(_prune(work / "m", "--overwrite", "--steps", "1", model=str(work / "m"))) == 0
    assert sorted(p.name for p in (work / "m").iterdir()) == [
        "amp.json",
        "model.safetensors",
        "search.json",
        "search_state.json",
    ]
    assert load_pruned(work / "m").widths() == json.loads((work / "m" / "search.json").read_text())["widths"]
    assert not [p for p in work.iterdir() if ".amp-" in p.name]  # no temporary left beside


# --- the library: save_pruned never destroys, and is all or nothing --------------------------------------


def test_save_pruned_refuses_a_non_empty_directory_or_a_file(tmp_path):
    backbone = _pruned()
    _dir(tmp_path / "d", "notes.txt")
    with pytest.raises(OutputError, match=r"d is not empty \(holds notes.txt\): pass overwrite=True"):
        save_pruned(backbone, tmp_path / "d")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        save_pruned(backbone, _file(tmp_path / "f"))
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine" and (tmp_path / "f").read_text() == "mine"
    save_pruned(backbone, tmp_path / "d", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["amp.json", "model.safetensors"]


def test_saved_files_get_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        save_pruned(_pruned(), tmp_path / "m")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()} == {0o644}


def _same_outputs(a, b) -> bool:
    x = images_for(a)
    with torch.no_grad():
        return torch.equal(a.embed(x), b.embed(x))


def test_a_save_failing_after_the_weights_keeps_the_old_directory(tmp_path, monkeypatch):
    old, new = _pruned(0), tiny("timm_vit", 1)
    save_pruned(old, tmp_path / "m")
    import amp.models

    def crash(*args, **kwargs):
        raise RuntimeError("killed between the weights and amp.json")

    monkeypatch.setattr(amp.models, "write_json", crash)  # model.safetensors is written, amp.json is not
    with pytest.raises(RuntimeError, match="killed"):
        save_pruned(new, tmp_path / "m", overwrite=True)
    assert _same_outputs(load_pruned(tmp_path / "m"), old)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


KILLED_SAVE = """
import os, signal, sys
import amp.models
from amp.models import load_pruned, save_pruned

real = amp.models.write_json
def write_json(path, data):  # the weights are on disk in the temporary directory: die before amp.json
    print("weights written", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
amp.models.write_json = write_json
old = load_pruned(sys.argv[1])
old.info["base_model"] = "killed"
save_pruned(old, sys.argv[1], overwrite=True)
"""


def test_a_save_killed_by_sigkill_keeps_the_old_directory_and_the_next_save_cleans_up(tmp_path):
    old = _pruned()
    save_pruned(old, tmp_path / "m")
    before = _snapshot(tmp_path / "m")
    run = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path / "m")], capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL and "weights written" in run.stdout, run.stderr
    orphans = [p for p in tmp_path.iterdir() if p.name != "m"]
    assert len(orphans) == 1 and (orphans[0] / "model.safetensors").is_file()  # the killed save's temporary
    assert _snapshot(tmp_path / "m") == before and _same_outputs(load_pruned(tmp_path / "m"), old)
    save_pruned(old, tmp_path / "m", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_an_old_directory_left_between_two_renames_comes_back(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    _dir(tmp_path / f".m.amp-old-{pid}-abc123", "amp.json")
    _dir(tmp_path / f".m.amp-tmp-{pid}-def456", "amp.json")
    clean_orphans(tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["m"] and (tmp_path / "m" / "amp.json").is_file()


def test_without_renameat2_the_swap_still_replaces_the_directory(tmp_path, monkeypatch):
    import amp.io

    monkeypatch.setattr(amp.io.ctypes, "CDLL", lambda *args, **kwargs: object())  # no renameat2 (not Linux)
    _dir(tmp_path / "d", "old.txt")
    write_dir(tmp_path / "d", lambda tmp: _file(tmp / "new.txt"), overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["d"] and [p.name for p in (tmp_path / "d").iterdir()] == ["new.txt"]


def test_write_dir_carries_kept_entries_and_drops_the_rest(tmp_path):
    _dir(tmp_path / "d", "old.txt", "state.json")
    _dir(tmp_path / "d" / "checkpoints", "c.pt")
    write_dir(tmp_path / "d", lambda tmp: _file(tmp / "new.txt"), overwrite=True, keep=["state.json", "checkpoints"])
    assert sorted(str(p.relative_to(tmp_path / "d")) for p in (tmp_path / "d").rglob("*")) == [
        "checkpoints",
        "checkpoints/c.pt",
        "new.txt",
        "state.json",
    ]


# --- a distillation killed after its first checkpoint ----------------------------------------------------

KILLED_DISTILL = """
import os, signal, sys
import amp.distill
from amp.cli import main

real = amp.distill._save_checkpoint
def save(*args, **kwargs):
    real(*args, **kwargs)
    print("checkpoint written", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
amp.distill._save_checkpoint = save
sys.exit(main(sys.argv[1:]))
"""


def test_a_distillation_killed_after_its_first_checkpoint_resumes_and_keeps_the_student(work, capsys):
    argv = _distill(work, work / "out", "--checkpoint-every", "1", "--seed", "1")
    student = _snapshot(work / "m")
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{REPO}"}
    run = subprocess.run(
        [sys.executable, "-c", KILLED_DISTILL, *argv], capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == -signal.SIGKILL and "checkpoint written" in run.stdout, run.stderr
    assert (work / "out" / "checkpoints" / "checkpoint.pt").is_file() and not (work / "out" / "amp.json").exists()
    assert main(argv) == 2 and "--resume to continue" in capsys.readouterr().err  # a fresh run would lose it
    assert main([*argv, "--resume"]) == 0
    assert json.loads((work / "out" / "amp.json").read_text())["distill"]["steps"] == 2
    assert _snapshot(work / "m") == student
    load_pruned(work / "out")


# --- how the command line reports errors ----------------------------------------------------------------

REPORTED = {
    "ModelSpecError": (ModelSpecError("bad model"), 2, "amp: error: bad model"),
    "ValueError": (ValueError("--ratio must be in (0, 1]"), 2, "amp: error: --ratio must be in (0, 1]"),
    "PermissionError": (PermissionError(13, "Permission denied", "/x/y"), 2, "amp: error: /x/y: Permission denied"),
    "FileNotFoundError": (FileNotFoundError(2, "No such file", "/x"), 2, "amp: error: /x: No such file"),
    "disk full": (OSError(28, "No space left on device", "/x/m"), 2, "amp: error: /x/m: No space left on device"),
    "SafetensorError": (None, 2, "amp: error: unreadable safetensors file"),
    "internal error": (KeyError("widths"), 1, "amp: internal error (KeyError): this is a bug in amp; please report"),
    "Ctrl-C": (KeyboardInterrupt(), 130, "amp: interrupted"),
}


@pytest.mark.parametrize("debug", [False, True])
@pytest.mark.parametrize("case", list(REPORTED))
def test_the_command_line_reports_each_kind_of_error(case, debug, monkeypatch, capsys):
    from safetensors import SafetensorError

    error, status, line = REPORTED[case]
    error = error if error is not None else SafetensorError("Error while deserializing header: HeaderTooLarge")

    def fail(args):
        raise error

    monkeypatch.setattr(amp.cli, "cmd_info", fail)
    argv = ["info", "zoo:tiny-clip", *(["--debug"] if debug else [])]
    assert main(argv) == status
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(line)
    assert ("Traceback" in err) == (debug or status == 1)  # expected failures: one line, unless --debug


def test_debug_goes_before_or_after_the_subcommand(monkeypatch, capsys):
    monkeypatch.setattr(amp.cli, "cmd_info", lambda args: (_ for _ in ()).throw(ValueError("nope")))
    assert main(["--debug", "info", "zoo:tiny-clip"]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("spec", "content"),
    [
        ("timm:vit_tiny_patch16_224:{}.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{}"),  # header cut short
        ("timm:vit_tiny_patch16_224:{}.pt", b"not a checkpoint" * 8),
        ("open_clip:amp-test-tiny:{}.pt", b"not a checkpoint" * 8),
    ],
    ids=["timm-truncated-safetensors", "timm-garbage-pt", "open_clip-garbage-pt"],
)
def test_a_damaged_weights_file_is_named(tmp_path, capsys, spec, content):
    weights = tmp_path / ("weights" + spec.rsplit("}", 1)[1])
    weights.write_bytes(content)
    assert main(["info", spec.format(tmp_path / "weights")]) == 2
    error = capsys.readouterr().err
    assert str(weights) in error and "Traceback" not in error and len(error.strip().splitlines()) == 1
