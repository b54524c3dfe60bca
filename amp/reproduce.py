"""Reproduce the experiments: run the notebooks with papermill and collect their tables into one report.

    amp reproduce [--profile cpu|paper] [--only 02,04] [--out results/cpu]
    python -m amp.reproduce --profile paper --imagenet-train /data/imagenet/train --imagenet-val /data/imagenet/val \\
        --coco-root /data/coco --flickr-root /data/flickr30k --out results/paper

Profiles. ``cpu`` runs every notebook with its own defaults: the offline models (``zoo:tiny-clip``,
``zoo:dinov2-s``) and data (Fashion-MNIST, captioned Fashion-MNIST), minutes on two CPU cores. ``paper`` runs the
same notebooks with the paper's settings (OpenCLIP ViT-g-14 / bigG-14, EVA02-CLIP-E, DINOv2-g; ImageNet-1K, COCO,
Flickr30k; the thresholds, temperatures and batch sizes of METHOD.md): same code, other parameters (see
:func:`paper_parameters`). It needs the weights (internet or a local cache), the data sets and GPUs.

Each executed notebook is kept under ``<out>/executed/``; each notebook writes its tables to ``<out>`` (CSV and
Markdown) and its figures to ``figures/`` (or ``<out>/figures`` when ``out`` is not the committed ``results/cpu``);
``<out>/REPORT.md`` gathers every table and figure. A failing notebook is named with its cell, the others still
run, and :func:`main` exits non-zero.

The second half of this module is what the notebooks share: resolving paths against the project root, checking
data paths up front, writing tables (CSV + Markdown) and figures, and evaluation data materialised once so that every
model variant is measured on the same images with the same zero-shot heads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROFILES = ("cpu", "paper")
KERNEL = "python3"  # the kernel of the interpreter that runs papermill (jupyter_client maps "python" to it)
PATH_OPTIONS = {
    "imagenet_train": "ImageNet-1K training images, class folders (scoring, k-NN neighbours)",
    "imagenet_val": "ImageNet-1K validation images, class folders (search, zero-shot top-1, k-NN queries)",
    "coco_root": "MSCOCO with the Karpathy split dataset_coco.json (retrieval, captioned scoring)",
    "flickr_root": "Flickr30k with the Karpathy split dataset_flickr30k.json (retrieval)",
}
# which paths each notebook needs under the paper profile
PAPER_NEEDS = {
    "01": (),
    "02": ("coco_root",),
    "03": ("imagenet_train", "imagenet_val", "coco_root"),
    "04": ("imagenet_train", "imagenet_val"),
    "05": ("imagenet_train", "imagenet_val", "coco_root", "flickr_root"),
    "06": ("imagenet_train", "imagenet_val"),
    "07": (),
}


# --- where things are --------------------------------------------------------------------------------------


def project_root() -> Path:
    """The checkout that holds ``amp/`` and ``notebooks/`` (else the working directory)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "notebooks").is_dir() else Path.cwd()


def resolve(path: str | Path) -> Path:
    """``path`` as is when absolute, else relative to the project root (notebooks run from ``notebooks/`` too)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else project_root() / path


def notebook_paths(directory: str | Path | None = None) -> list[Path]:
    """The numbered notebooks ``NN_name.ipynb`` in reading order."""
    directory = resolve(directory or "notebooks")
    return sorted(p for p in directory.glob("[0-9][0-9]_*.ipynb") if p.is_file())


def _select(paths: list[Path], only: str | Iterable[str] | None) -> list[Path]:
    if not only:
        return paths
    wanted = [w.strip() for w in (only.split(",") if isinstance(only, str) else only) if str(w).strip()]
    chosen = []
    for w in wanted:
        match = [p for p in paths if p.stem == w or p.stem.split("_")[0] == w.zfill(2)]
        if not match:
            raise ValueError(f"no notebook {w!r}; there are {', '.join(p.stem for p in paths)}")
        chosen += [p for p in match if p not in chosen]
    return sorted(chosen)


# --- profiles ------------------------------------------------------------------------------------------------

OPENCLIP_G = "open_clip:ViT-g-14:laion2b_s34b_b88k"
OPENCLIP_BIGG = "open_clip:ViT-bigG-14:laion2b_39b_b160k"
EVA_CLIP_E = "open_clip:EVA02-E-14-plus:laion2b_s9b_b144k"
DINOV2_G = "timm:vit_giant_patch14_dinov2.lvd142m"


def paper_parameters(paths: Mapping[str, str | None]) -> dict[str, dict[str, Any]]:
    """Notebook parameters of the ``paper`` profile, by notebook number; ``paths`` as in :data:`PATH_OPTIONS`.

    Thresholds Δ, inverse temperatures and per-GPU batch sizes are the reference configs' (METHOD.md §2); scoring
    uses the full ImageNet-1K training set and the search the full validation set, as the paper does.
    """
    p = {k: (str(v) if v else "") for k, v in paths.items()}
    imagenet_train = f"imagefolder:{p.get('imagenet_train', '')}"
    imagenet_val = f"imagefolder:{p.get('imagenet_val', '')}"
    coco_test = f"coco:{p.get('coco_root', '')}:test"
    coco_train = f"coco:{p.get('coco_root', '')}:train+restval"
    flickr_test = f"flickr30k:{p.get('flickr_root', '')}:test"
    g = {"model": OPENCLIP_G, "threshold": 1e-2, "temp_inv": 15.0, "batch_size": 128}
    models = {
        "OpenCLIP-g": g,
        "OpenCLIP-G": {"model": OPENCLIP_BIGG, "threshold": 2e-4, "temp_inv": 15.0, "batch_size": 128},
        "EVA-CLIP-E": {"model": EVA_CLIP_E, "threshold": 2e-3, "temp_inv": 20.0, "batch_size": 64},
    }
    # distillation (METHOD.md §5, ViT-g-14): 5 epochs of ImageNet-1K at a global batch of 512, lr 2e-5 per 256
    distill = {"steps": 5 * 1_281_167 // 512, "batch_size": 512, "lr": 4e-5, "min_lr": 1e-7, "augment": True}
    common = {"device": "cuda", "score_images": None, "val_images": None, "eval_images": None}
    return {
        "01": {
            "models": [
                "open_clip:ViT-B-32",
                "open_clip:ViT-B-16",
                "open_clip:ViT-L-14",
                "open_clip:ViT-H-14",
                "open_clip:ViT-g-14",
                "open_clip:ViT-bigG-14",
                "timm:eva02_base_patch16_clip_224",
                "timm:eva02_large_patch14_clip_224",
                "timm:eva02_enormous_patch14_clip_224",
                "timm:vit_small_patch14_dinov2",
                "timm:vit_base_patch14_dinov2",
                "timm:vit_large_patch14_dinov2",
                "timm:vit_giant_patch14_dinov2",
            ]
        },
        "02": {
            **common,
            "model": OPENCLIP_G,
            "score_data": coco_train,
            "classification": imagenet_val if p.get("imagenet_val") else None,
            "retrieval": coco_test,
            "temp_inv": 15.0,
            "batch_size": 128,
            "score_images": 20_000,
        },
        "03": {
            **common,
            **{k: v for k, v in g.items()},
            "score_data": imagenet_train,
            "val_data": imagenet_val,
            "thresholds": [2e-3, 5e-3, 1e-2, 2e-2, 5e-2],
            "classification": imagenet_val,
            "retrieval": coco_test,
        },
        "04": {
            **common,
            "models": models,
            "score_data": imagenet_train,
            "val_data": imagenet_val,
            "classification": {"IN-1K": imagenet_val},
            "distill_data": imagenet_train,
            "distill": distill,
        },
        "05": {
            **common,
            "models": models,
            "score_data": imagenet_train,
            "val_data": imagenet_val,
            "retrieval": {"MSCOCO": coco_test, "Flickr30k": flickr_test},
            "distill_data": imagenet_train,
            "distill": distill,
        },
        "06": {
            **common,
            "model": DINOV2_G,
            "model_kwargs": {"img_size": 224},
            "score_data": imagenet_train,
            "val_data": imagenet_val,
            "knn_train": imagenet_train,
            "knn_test": imagenet_val,
            "knn_k": [10, 20, 100, 200],
            "searches": [{"threshold": 5e-3, "rule": "increase", "reference": "previous"}],
            "temp_inv": 20.0,
            "batch_size": 128,
            "knn_images": None,
        },
        "07": {},
    }


def profile_parameters(profile: str, paths: Mapping[str, str | None] | None = None) -> dict[str, dict[str, Any]]:
    """Per-notebook parameter overrides of a profile (``cpu``: none, the notebooks' defaults are the cpu profile)."""
    if profile == "cpu":
        return {}
    if profile == "paper":
        return paper_parameters(paths or {})
    raise ValueError(f"unknown profile {profile!r}; choose from {PROFILES}")


def _missing_paths(selected: list[Path], paths: Mapping[str, str | None]) -> list[str]:
    problems = []
    for nb in selected:
        for key in PAPER_NEEDS.get(nb.stem[:2], ()):
            value = paths.get(key)
            if not value:
                problems.append(f"{nb.stem} needs --{key.replace('_', '-')} ({PATH_OPTIONS[key]})")
            elif not Path(value).expanduser().is_dir():
                problems.append(f"{nb.stem}: --{key.replace('_', '-')} {value}: no such directory")
    return sorted(set(problems))


# --- running --------------------------------------------------------------------------------------------------


@dataclass
class NotebookRun:
    name: str
    ok: bool
    seconds: float
    executed: str
    error: str | None = None
    cell: int | None = None
    tables: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)


def default_out(profile: str) -> Path:
    return resolve(f"results/{profile}")


def _figure_dir(out: Path, profile: str, figures: str | Path | None) -> Path:
    if figures is not None:
        return resolve(figures)
    # the committed run renders into figures/; any other run keeps its figures next to its tables
    return resolve("figures") if out.resolve() == default_out("cpu").resolve() and profile == "cpu" else out / "figures"


def _describe_failure(error: BaseException) -> tuple[str, int | None]:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(error, PapermillExecutionError):
        cell = error.cell_index
        return f"cell {cell} (execution count {error.exec_count}): {error.ename}: {_short(error.evalue)}", cell
    return f"{type(error).__name__}: {_short(str(error))}", None


def _short(message: str, limit: int = 300) -> str:
    """The first line of an error message, at most ``limit`` characters (the executed notebook has it all)."""
    first = (message or "").strip().splitlines()[0] if (message or "").strip() else ""
    return first if len(first) <= limit else first[: limit - 1] + "…"


def run_notebook(
    notebook: Path,
    executed: Path,
    parameters: dict[str, Any],
    kernel: str = KERNEL,
    cwd: Path | None = None,
    log_output: bool = False,
) -> None:
    """Execute one notebook with papermill (parameters injected after its ``parameters`` cell)."""
    import papermill as pm

    executed.parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(
        str(notebook),
        str(executed),
        parameters=parameters,
        kernel_name=kernel,
        cwd=str(cwd or notebook.parent),
        progress_bar=False,
        log_output=log_output,
    )


def reproduce(
    profile: str = "cpu",
    only: str | Sequence[str] | None = None,
    out: str | Path | None = None,
    paper_paths: Mapping[str, str | None] | None = None,
    figures: str | Path | None = None,
    notebooks: str | Path | None = None,
    kernel: str = KERNEL,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    keep_going: bool = True,
    progress: bool = True,
    log_output: bool = False,
) -> dict[str, Any]:
    """Run the notebooks of ``profile`` (all, or ``only`` e.g. ``"02,04"``) and write ``<out>/REPORT.md``.

    ``paper_paths`` maps the keys of :data:`PATH_OPTIONS` to directories (paper profile; a missing one fails here,
    before anything runs). ``overrides`` adds parameters per notebook number (``{"02": {"ratios": [0.5]}}``).
    Returns ``{"ok", "profile", "out", "report", "seconds", "notebooks": [NotebookRun as dict, ...]}``.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {PROFILES}")
    out = resolve(out) if out is not None else default_out(profile)
    fig_dir = _figure_dir(out, profile, figures)
    selected = _select(notebook_paths(notebooks), only)
    if not selected:
        raise FileNotFoundError(f"no notebooks found in {resolve(notebooks or 'notebooks')}")
    paths = dict(paper_paths or {})
    if profile == "paper":
        problems = _missing_paths(selected, paths)
        if problems:
            raise FileNotFoundError("the paper profile cannot start:\n  " + "\n  ".join(problems))
    params_by_nb = {k: dict(v) for k, v in profile_parameters(profile, paths).items()}
    out.mkdir(parents=True, exist_ok=True)
    fig_dir.mkdir(parents=True, exist_ok=True)
    handoff = None
    if {"04", "05"} <= {nb.stem[:2] for nb in selected}:
        # notebook 05 evaluates the models notebook 04 made (it checks their recipe) instead of pruning them again
        handoff = tempfile.mkdtemp(prefix="amp-reproduce-models-")
        params_by_nb.setdefault("04", {})["save_dir"] = handoff
        params_by_nb.setdefault("05", {})["models_dir"] = handoff
    runs: list[NotebookRun] = []
    start_all = time.perf_counter()
    quiet = {} if log_output or "TQDM_DISABLE" in os.environ else {"TQDM_DISABLE": "1"}  # no progress bars in cells
    os.environ.update(quiet)
    try:
        for i, nb in enumerate(selected, 1):
            key = nb.stem[:2]
            parameters = {**params_by_nb.get(key, {}), **dict((overrides or {}).get(key, {}))}
            parameters.update({"out_dir": str(out), "fig_dir": str(fig_dir)})
            label = f"[{i}/{len(selected)}] {nb.stem}"
            run = _run_one(nb, label, parameters, out, fig_dir, kernel, progress, log_output)
            runs.append(run)
            if not run.ok and not keep_going:
                break
    finally:
        for key in quiet:
            os.environ.pop(key, None)
        if handoff is not None:
            shutil.rmtree(handoff, ignore_errors=True)
    total = time.perf_counter() - start_all
    report = out / "REPORT.md"
    _write_report(report, profile, runs, total, fig_dir)
    _write_timings(out / "timings.csv", runs)
    return {
        "ok": all(r.ok for r in runs) and len(runs) == len(selected),
        "profile": profile,
        "out": str(out),
        "figures": str(fig_dir),
        "report": str(report),
        "seconds": total,
        "notebooks": [r.__dict__ for r in runs],
    }


def _run_one(
    nb: Path, label: str, parameters: dict, out: Path, fig_dir: Path, kernel: str, progress: bool, log_output: bool
) -> NotebookRun:
    """Execute one notebook, catching its failure, and list the tables and figures it wrote."""
    executed = out / "executed" / nb.name
    before = _snapshot(out, fig_dir, nb.stem)
    if progress:
        print(f"{label} ...", flush=True)
    start = time.perf_counter()
    error, cell = None, None
    try:
        run_notebook(nb, executed, parameters, kernel=kernel, cwd=nb.parent, log_output=log_output)
    except Exception as err:  # report every failure, then carry on with the next notebook
        error, cell = _describe_failure(err)
    seconds = time.perf_counter() - start
    tables, figs = _written(out, fig_dir, nb.stem, before)
    run = NotebookRun(nb.stem, error is None, seconds, str(executed), error, cell, tables, figs)
    if progress:
        status = "ok" if run.ok else f"FAILED in {error}"
        print(f"{label}: {status} ({seconds:.0f} s)", flush=True)
    return run


def _snapshot(out: Path, fig_dir: Path, stem: str) -> dict[Path, float]:
    prefix = stem.split("_")[0] + "_"
    files = [*out.glob(f"{prefix}*.md"), *fig_dir.glob(f"{prefix}*.png")]
    return {f: f.stat().st_mtime for f in files}


def _written(out: Path, fig_dir: Path, stem: str, before: dict[Path, float]) -> tuple[list[str], list[str]]:
    """The tables and figures this notebook wrote in this run (new or modified files with its number)."""
    now = _snapshot(out, fig_dir, stem)
    fresh = sorted((f for f, t in now.items() if before.get(f) != t), key=lambda f: now[f])  # in the order written
    return [str(f) for f in fresh if f.suffix == ".md"], [str(f) for f in fresh if f.suffix == ".png"]


def _write_timings(path: Path, runs: list[NotebookRun]) -> None:
    lines = ["notebook,ok,seconds"] + [f"{r.name},{r.ok},{r.seconds:.1f}" for r in runs]
    path.write_text("\n".join(lines) + "\n")


def _write_report(path: Path, profile: str, runs: list[NotebookRun], total: float, fig_dir: Path) -> None:
    lines = [
        f"# AMP experiments: `{profile}` profile",
        "",
        f"Generated by `amp reproduce --profile {profile}` on {time.strftime('%Y-%m-%d %H:%M')}; "
        f"{len(runs)} notebooks in {total / 60:.1f} min. Executed notebooks are in `executed/`.",
        "",
        "| notebook | status | time |",
        "|---|---|---:|",
    ]
    for r in runs:
        status = "ok" if r.ok else f"**failed**: {r.error}"
        lines.append(f"| `{r.name}` | {status.replace('|', '/')} | {r.seconds:.0f} s |")
    for r in runs:
        lines += ["", f"## {r.name}", ""]
        if not r.ok:
            lines += [f"**Failed** in {r.error}", ""]
        for table in r.tables:
            lines += [Path(table).read_text().strip(), ""]
        for fig in r.figures:
            rel = os.path.relpath(fig, path.parent)
            lines += [f"![{Path(fig).stem}]({Path(rel).as_posix()})", ""]
    path.write_text("\n".join(lines).rstrip() + "\n")


def strip_notebook(path: str | Path) -> bool:
    """Remove outputs, execution counts and run metadata from a notebook in place; True if it changed."""
    import nbformat

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        for key in ("papermill", "execution", "ExecuteTime", "collapsed", "scrolled"):
            cell.metadata.pop(key, None)
    for key in ("papermill", "widgets"):
        nb.metadata.pop(key, None)
    after = nbformat.writes(nb)
    if after != before:
        path.write_text(after if after.endswith("\n") else after + "\n")
    return after != before


# --- command line ---------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``amp reproduce`` options (for mounting under the ``amp`` command)."""
    p.add_argument("--profile", choices=PROFILES, default="cpu", help="cpu: offline, minutes; paper: GPUs and data")
    p.add_argument("--only", help="comma-separated notebook numbers or names, e.g. 02,04")
    p.add_argument("--out", help="output folder (default results/<profile>)")
    p.add_argument("--figures", help="figure folder (default figures/ for results/cpu, else <out>/figures)")
    for key, text in PATH_OPTIONS.items():
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, help=f"paper profile: {text}")
    p.add_argument("--set", action="append", metavar="NN.NAME=JSON", help="override a parameter, e.g. 02.ratios=[0.5]")
    p.add_argument("--kernel", default=KERNEL, help="Jupyter kernel (default: this interpreter's python3)")
    p.add_argument("--stop-on-error", action="store_true", help="stop at the first failing notebook")
    p.add_argument("--log-output", action="store_true", help="stream the notebooks' output")
    p.add_argument("--strip", action="store_true", help="only strip the outputs of notebooks/*.ipynb (before commit)")


def _overrides(pairs: list[str] | None) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for pair in pairs or []:
        match = re.fullmatch(r"(\d\d)\.(\w+)=(.*)", pair, flags=re.S)
        if not match:
            raise ValueError(f"--set expects NN.name=JSON (e.g. 02.ratios=[0.5]), got {pair!r}")
        nb, name, value = match.groups()
        try:
            found.setdefault(nb, {})[name] = json.loads(value)
        except json.JSONDecodeError:
            found.setdefault(nb, {})[name] = value
    return found


def command(args: argparse.Namespace) -> int:
    """Run ``amp reproduce`` from parsed arguments; returns the exit status (1 if a notebook failed)."""
    if args.strip:
        for path in notebook_paths():
            print(f"{path.name}: {'stripped' if strip_notebook(path) else 'clean'}")
        return 0
    result = reproduce(
        profile=args.profile,
        only=args.only,
        out=args.out,
        paper_paths={key: getattr(args, key) for key in PATH_OPTIONS},
        figures=args.figures,
        kernel=args.kernel,
        overrides=_overrides(args.set),
        keep_going=not args.stop_on_error,
        log_output=args.log_output,
    )
    failed = [r for r in result["notebooks"] if not r["ok"]]
    print(f"report: {result['report']} ({result['seconds'] / 60:.1f} min)")
    for r in failed:
        print(f"amp reproduce: {r['name']} failed in {r['error']}; see {r['executed']}", file=sys.stderr)
    return 0 if result["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="amp reproduce", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return command(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"amp reproduce: error: {err}", file=sys.stderr)
        return 2


# ============================================================================================================
# What the notebooks share
# ============================================================================================================

PATH_KINDS = ("imagefolder", "folder", "coco", "flickr30k")


def check_data(**specs: Any) -> None:
    """Fail at the start, with the parameter's name, when a data set's directory is missing.

    Values are data-set names (``imagefolder:/imagenet/val``), or lists/dicts of them, or None (not used).
    Offline names (``fashion-mnist:...``, ``synthetic:...``) need no check.
    """
    problems = []
    for name, value in specs.items():
        values = value.values() if isinstance(value, Mapping) else value if isinstance(value, list) else [value]
        for spec in values:
            if not isinstance(spec, str):
                continue
            kind, _, argument = spec.partition(":")
            if kind not in PATH_KINDS:
                continue
            directory = argument if kind in ("imagefolder", "folder") else argument.rsplit(":", 1)[0]
            if kind not in ("imagefolder", "folder") and ":" in argument and "/" in argument.rsplit(":", 1)[1]:
                directory = argument  # a ':' inside the path, no split given
            if not directory:
                problems.append(f"{name} = {spec!r}: no directory given")
            elif not Path(directory).expanduser().is_dir():
                problems.append(f"{name} = {spec!r}: directory {directory} not found")
    if problems:
        raise FileNotFoundError(
            "data not found (pass the paths with `amp reproduce --profile paper --imagenet-val DIR ...` "
            "or papermill -p NAME VALUE):\n  " + "\n  ".join(problems)
        )


def output_dirs(out_dir: str | Path, fig_dir: str | Path) -> tuple[Path, Path]:
    """The notebook's table and figure folders, resolved against the project root and created."""
    out, figs = resolve(out_dir), resolve(fig_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs.mkdir(parents=True, exist_ok=True)
    return out, figs


def _cell(value: Any, digits: int) -> str:
    try:
        import numpy as np

        if isinstance(value, np.generic):
            value = value.item()
    except ImportError:
        pass
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if abs(value) >= 10**6:
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return str(value).replace("|", "/")


def markdown_table(df, digits: int | Mapping[str, int] = 3, index: bool = False) -> str:
    """A pandas DataFrame as a GitHub Markdown table (no extra dependency); ``digits`` per column or for all."""
    frame = df.reset_index() if index else df
    columns = [str(c) for c in frame.columns]
    numeric = [frame[c].dtype.kind in "iuf" for c in frame.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    for row in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, row):
            d = digits.get(column, 3) if isinstance(digits, Mapping) else digits
            cells.append(_cell(value, d))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table(
    df, out_dir: str | Path, name: str, caption: str = "", digits: int | Mapping[str, int] = 3, index: bool = False
) -> Path:
    """``<out_dir>/<name>.csv`` and ``<name>.md`` (a heading, the caption, the table); returns the Markdown path."""
    out = resolve(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / f"{name}.csv", index=index)
    text = f"### {name}\n\n" + (f"{caption}\n\n" if caption else "") + markdown_table(df, digits, index) + "\n"
    (out / f"{name}.md").write_text(text)
    return out / f"{name}.md"


def save_figure(fig, fig_dir: str | Path, name: str, dpi: int = 110) -> Path:
    """``<fig_dir>/<name>.png``."""
    path = resolve(fig_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def as_dict(value: str | Mapping[str, str] | None, default_name: str | None = None) -> dict[str, str]:
    """A data-set parameter as ``{display name: spec}``: a single spec is named after itself."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items() if v}
    return {default_name or value: value}


# --- zero-shot class names and prompts -------------------------------------------------------------------------


def zero_shot_prompts(spec: str, dataset) -> tuple[list[str], list[str]]:
    """Class names and prompt templates for zero-shot classification on ``dataset`` (named ``spec``).

    Fashion-MNIST uses the templates the tiny CLIP was trained with; ImageNet-style folders of 1000 classes named by
    WordNet id (``n01440764``) or by index (``0``..``999``, ImageNetV2) get the OpenAI class names, and every other
    data set its own class names with the 80 OpenAI ImageNet templates (the paper's protocol).
    """
    from amp.evaluation import dataset_classnames, imagenet_templates

    classes = list(getattr(dataset, "classes", None) or [])
    if not classes:
        raise ValueError(f"{spec}: zero-shot classification needs a labelled data set with class names")
    templates = getattr(dataset, "templates", None)
    if templates is None and spec.split(":")[0] in ("fashion-mnist", "fmnist-captions"):
        from amp.zoo.fashion import FASHION_TEMPLATES

        templates = FASHION_TEMPLATES
    if len(classes) == 1000 and all(re.fullmatch(r"n\d{8}", c) for c in classes):
        classes = dataset_classnames("imagenet1k")  # sorted WordNet ids are the standard class order
    elif len(classes) == 1000 and sorted(classes, key=int) == [str(i) for i in range(1000)]:
        names = dataset_classnames("imagenet1k")
        classes = [names[int(c)] for c in classes]
    return [c.replace("_", " ") for c in classes], list(templates or imagenet_templates())


# --- evaluation on materialised data ---------------------------------------------------------------------------


class Benchmark:
    """Evaluation data loaded once with a model's transform, reused for every variant of that model.

    ``classification`` and ``retrieval`` map display names to data sets; ``max_images`` caps each (the first
    images in the data set's order). Zero-shot heads are computed once, from the first model evaluated: pruning,
    compensation and distillation change only the image tower, so every variant of one dense model is scored against
    the same classifier. Use one Benchmark per dense model.
    """

    def __init__(
        self,
        backbone,
        classification: str | Mapping[str, str] | None = None,
        retrieval: str | Mapping[str, str] | None = None,
        max_images: int | None = None,
        batch_size: int = 64,
    ):
        from amp.api import loader
        from amp.width_search import materialise

        self.classification: dict[str, tuple[list, list[str], list[str]]] = {}
        self.retrieval: dict[str, list] = {}
        for name, spec in as_dict(classification).items():
            data = loader(backbone, spec, batch_size, shuffle=False)
            names, templates = zero_shot_prompts(spec, data.dataset)
            self.classification[name] = (materialise(data, max_images), names, templates)
        for name, spec in as_dict(retrieval).items():
            self.retrieval[name] = materialise(loader(backbone, spec, batch_size, shuffle=False), max_images)
        self._heads: dict[str, Any] = {}

    def _head(self, backbone, name: str):
        if name not in self._heads:
            from amp.evaluation import zero_shot_classifier

            _, names, templates = self.classification[name]
            self._heads[name] = zero_shot_classifier(backbone, names, templates)
        return self._heads[name]

    def zero_shot(self, backbone, device: str = "cpu") -> dict[str, float]:
        """Zero-shot top-1 (fraction) per classification data set."""
        from amp.evaluation import zero_shot_classification

        results = {}
        for name, (batches, names, templates) in self.classification.items():
            head = self._head(backbone, name)
            results[name] = zero_shot_classification(backbone, batches, names, templates, device, head)["top1"]
        return results

    def recall(self, backbone, device: str = "cpu") -> dict[str, dict[str, float]]:
        """Image→text and text→image R@1/5/10 per retrieval data set."""
        from amp.evaluation import retrieval

        return {name: retrieval(backbone, batches, device=device) for name, batches in self.retrieval.items()}


if __name__ == "__main__":
    sys.exit(main())
