"""Reproduce the experiments: run the notebooks with papermill and collect their tables into one report.

    amp reproduce [--profile cpu|paper] [--only 02,04] [--out results/cpu] [--set 02.ratios=[0.5]]
    amp reproduce --profile paper --imagenet-train /data/imagenet/train --imagenet-val /data/imagenet/val \\
        --coco-root /data/coco --flickr-root /data/flickr30k --out results/paper
    amp reproduce --profile paper --plan [--gpu H100-80GB]   # peak memory and GPU-hours first (amp.plan)
    amp reproduce --profile paper --dry-run                  # rehearsed on stand-ins, minutes on a CPU (amp.dry_run)

Profiles are data: ``amp/profiles/<name>.json`` maps each notebook (by file stem) to the parameters papermill
injects. ``cpu`` holds the notebooks' own defaults (a test keeps the two equal): the offline models
(``zoo:tiny-clip``, ``zoo:dinov2-s``) and data (Fashion-MNIST, captioned Fashion-MNIST), minutes on two CPU cores.
``paper`` holds the paper's settings (OpenCLIP ViT-g-14 / bigG-14, EVA02-CLIP-E, DINOv2-g; ImageNet-1K, COCO,
Flickr30k and the zero-shot sets; the thresholds, temperatures and global batches of METHOD.md §2, computed in
chunks; the distillation recipe of each model, METHOD.md §5): same code, other parameters. It needs the weights, the
data sets and GPUs. In a profile, ``{imagenet_train}`` stands for a path given on the command
line (:data:`PATH_OPTIONS`; missing, it stops the run before it starts, naming the parameter), and
``{imagenet_val?}`` for an optional one: without it the parameter is ``null``.

Each executed notebook is kept under ``<out>/executed/``; each notebook writes its tables to ``<out>`` (CSV and
Markdown) and its figures to ``figures/`` (or ``<out>/figures`` when ``out`` is not the committed ``results/cpu``);
``<out>/REPORT.md`` gathers every table and figure and ``<out>/timings.csv`` the time of each notebook. A failing
notebook is named with its cell and the others still run. The helpers the notebooks share are in :mod:`amp.notebook`.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amp.io import resolve

PROFILE_DIR = Path(__file__).with_name("profiles")
PROFILES = tuple(sorted(p.stem for p in PROFILE_DIR.glob("*.json")))
KERNEL = "python3"  # the kernel of the interpreter that runs papermill (jupyter_client maps "python" to it)
PATH_OPTIONS = {
    "imagenet_train": "ImageNet-1K training images, class folders (scoring, k-NN neighbours)",
    "imagenet_val": "ImageNet-1K validation images, class folders (search, zero-shot top-1, k-NN queries)",
    "coco_root": "MSCOCO with the Karpathy split dataset_coco.json (retrieval, captioned scoring)",
    "flickr_root": "Flickr30k with the Karpathy split dataset_flickr30k.json (retrieval)",
    "imagenet_a": "ImageNet-A, class folders named by WordNet id (200 classes; zero-shot)",
    "imagenet_r": "ImageNet-R, class folders named by WordNet id (200 classes; zero-shot)",
    "imagenet_v2": "ImageNetV2 matched-frequency, class folders 0..999 (zero-shot)",
    "imagenet_sketch": "ImageNet-Sketch, class folders named by WordNet id (zero-shot)",
    "objectnet_root": "ObjectNet in clip_benchmark's layout: objectnet-1.0/images and its mapping files (zero-shot)",
}
RUNNER_PARAMETERS = ("out_dir", "fig_dir")  # set by the runner for every notebook, never by a profile
HANDOFF = {"04": "save_dir", "05": "models_dir"}  # notebook 04 saves its pruned models where 05 reads them
PLACEHOLDER = re.compile(r"\{(\w+)(\?)?\}")


# --- the notebooks ------------------------------------------------------------------------------------------------


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


def notebook_parameters(path: str | Path) -> dict[str, Any]:
    """The names and default values of a notebook's ``parameters`` cell (plain literals, as papermill expects)."""
    import nbformat

    nb = nbformat.read(Path(path), as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    defaults: dict[str, Any] = {}
    for node in ast.parse(cells[0].source).body if cells else []:
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError as err:
                names = ", ".join(t.id for t in node.targets)
                raise ValueError(f"{Path(path).name}: parameter {names} is not a literal") from err
            defaults.update({t.id: value for t in node.targets})
    return defaults


def _check_declared(nb: Path, names: Iterable[str], source: str) -> None:
    """Refuse a parameter the notebook does not declare (papermill would only warn, and the value be ignored)."""
    declared = notebook_parameters(nb)
    unknown = [name for name in names if name not in declared]
    if unknown:
        raise ValueError(
            f"{source} sets {', '.join(map(repr, unknown))}, which {nb.stem} does not declare; "
            f"its parameters are {', '.join(declared)}"
        )


def _records(value: Any) -> list[Mapping[str, Any]]:
    """The records of a table-like parameter: a dict of dicts (``models``, ``criteria``) or a list of dicts."""
    items = list(value.values()) if isinstance(value, Mapping) else value if isinstance(value, list) else []
    return [item for item in items if isinstance(item, Mapping)] if items and all(
        isinstance(item, Mapping) for item in items) else []  # fmt: skip


def _notebook_strings(nb: Path) -> set[str]:
    """Every string literal in the notebook's code: the keys its cells can read from a record."""
    import nbformat

    found: set[str] = set()
    for cell in nbformat.read(nb, as_version=4).cells:
        if cell.cell_type == "code":
            found.update(re.findall(r"""["'](\w+)["']""", cell.source))
    return found


def _check_record_keys(nb: Path, parameters: Mapping[str, Any], source: str) -> None:
    """Refuse a key inside a table-like parameter (``models``, ``criteria``, ``searches``) that the notebook never
    names: no cell can read it, so a typo there (``"treshold"``) would be ignored without a word. Keys that are
    labels (not identifiers) and the entries of a declared gap (``"model": null``) are left alone."""
    declared = notebook_parameters(nb)
    known = _notebook_strings(nb) | set(declared)
    unknown = sorted(
        f"{name}: {key!r}"
        for name, value in parameters.items()
        for record in _records(value)
        if not ("model" in record and record["model"] is None)  # a declared gap: skipped, its keys document it
        for key in record
        if re.fullmatch(r"\w+", key) and key not in known  # labels ("GFLOPs (linear + patch)") are data, not settings
    )
    if unknown:
        raise ValueError(f"{source} sets {', '.join(dict.fromkeys(unknown))} in {nb.stem}, which it never reads")


# --- profiles -----------------------------------------------------------------------------------------------------


def load_profile(profile: str) -> dict[str, dict[str, Any]]:
    """``amp/profiles/<profile>.json`` as is: parameters by notebook stem, path placeholders unfilled."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {PROFILES}")
    return json.loads((PROFILE_DIR / f"{profile}.json").read_text())


def _map_strings(value: Any, fn: Callable[[str], Any]) -> Any:
    """``value`` with ``fn`` applied to every string inside it (lists and dicts recursively)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    return value


def fill_paths(parameters: Mapping[str, Any], paths: Mapping[str, str | None]) -> dict[str, Any]:
    """``parameters`` with ``{key}`` replaced by ``paths[key]``; a string with an absent ``{key?}`` becomes None."""

    def fill(text: str) -> str | None:
        if any(optional and not paths.get(key) for key, optional in PLACEHOLDER.findall(text)):
            return None
        return PLACEHOLDER.sub(lambda m: str(paths.get(m.group(1)) or ""), text)

    return {name: _map_strings(value, fill) for name, value in parameters.items()}


def required_paths(parameters: Mapping[str, Any]) -> dict[str, list[str]]:
    """The non-optional path placeholders in ``parameters``: path key → the parameters that use it."""
    needs: dict[str, list[str]] = {}
    for name, value in parameters.items():

        def note(text: str, name: str = name) -> str:
            for key, optional in PLACEHOLDER.findall(text):
                if not optional and name not in needs.setdefault(key, []):
                    needs[key].append(name)
            return text

        _map_strings(value, note)
    return needs


def profile_parameters(profile: str, paths: Mapping[str, str | None] | None = None) -> dict[str, dict[str, Any]]:
    """The parameters of ``profile`` by notebook stem, with the ``paths`` of :data:`PATH_OPTIONS` filled in."""
    return {stem: fill_paths(params, paths or {}) for stem, params in load_profile(profile).items()}


def _missing_paths(nb: Path, parameters: Mapping[str, Any], paths: Mapping[str, str | None]) -> list[str]:
    """Why ``nb`` cannot start with these paths: each absent or missing directory, with the parameters needing it."""
    problems = []
    for key, names in required_paths(parameters).items():
        option = f"--{key.replace('_', '-')}"
        value = paths.get(key)
        if not value:
            problems.append(f"{nb.stem} needs {option} ({PATH_OPTIONS.get(key, key)}) for {', '.join(names)}")
        elif not Path(value).expanduser().is_dir():
            problems.append(f"{nb.stem}: {option} {value}: no such directory")
    return problems


def _notebook_parameters_for_run(
    selected: list[Path],
    profile: str,
    paths: Mapping[str, str | None],
    overrides: Mapping[str, Mapping[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Each selected notebook's parameters (profile, then overrides), checked before anything runs."""
    numbers = {nb.stem[:2] for nb in selected}
    unselected = sorted(set(overrides) - numbers)
    if unselected:
        raise ValueError(f"parameters given for notebook {', '.join(unselected)}, which is not selected")
    raw = load_profile(profile)
    problems = [problem for nb in selected for problem in _missing_paths(nb, raw.get(nb.stem, {}), paths)]
    if problems:
        raise FileNotFoundError(f"the {profile} profile cannot start:\n  " + "\n  ".join(sorted(set(problems))))
    by_stem = {}
    for nb in selected:
        from_profile = fill_paths(raw.get(nb.stem, {}), paths)
        given = dict(overrides.get(nb.stem[:2], {}))
        _check_declared(nb, from_profile, f"the {profile} profile")
        _check_declared(nb, given, f"--set {nb.stem[:2]}")
        _check_record_keys(nb, {**from_profile, **given}, f"the {profile} profile" if not given else "the parameters")
        by_stem[nb.stem] = {**from_profile, **given}
    return by_stem


# --- running ------------------------------------------------------------------------------------------------------


@dataclass
class NotebookRun:
    """One notebook's outcome: status, time, executed copy, the failing cell, the tables and figures it wrote."""

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
    quiet = _DeclaredParameters(notebook_parameters(notebook))
    logging.getLogger("papermill").addFilter(quiet)
    try:
        pm.execute_notebook(
            str(notebook),
            str(executed),
            parameters=parameters,
            kernel_name=kernel,
            cwd=str(cwd or notebook.parent),
            progress_bar=False,
            log_output=log_output,
        )
    finally:
        logging.getLogger("papermill").removeFilter(quiet)


class _DeclaredParameters(logging.Filter):
    """Drops two papermill warnings that are wrong for amp's notebooks: papermill reads the parameters cell line by
    line, so it cannot parse ``a = 1; b = 2`` ("Unable to parse line") and then calls the second name an "unknown
    parameter". :func:`notebook_parameters` reads the cell with ``ast`` and every run checks its names against it
    first; a name that no line declares still warns."""

    UNKNOWN = "Passed unknown parameter: "

    def __init__(self, declared: Iterable[str]) -> None:
        super().__init__()
        self.declared = set(declared)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Unable to parse line "):
            return False
        return not (message.startswith(self.UNKNOWN) and message.removeprefix(self.UNKNOWN) in self.declared)


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

    ``paper_paths`` maps the keys of :data:`PATH_OPTIONS` to directories (a profile's missing one fails here, before
    anything runs). ``overrides`` adds parameters per notebook number (``{"02": {"ratios": [0.5]}}``); a name the
    notebook does not declare fails here too.
    Returns ``{"ok", "profile", "out", "report", "seconds", "notebooks": [NotebookRun as dict, ...]}``.
    """
    out = resolve(out) if out is not None else default_out(profile)
    fig_dir = _figure_dir(out, profile, figures)
    selected = _select(notebook_paths(notebooks), only)
    if not selected:
        raise FileNotFoundError(f"no notebooks found in {resolve(notebooks or 'notebooks')}")
    params_by_nb = _notebook_parameters_for_run(selected, profile, dict(paper_paths or {}), overrides or {})
    out.mkdir(parents=True, exist_ok=True)
    fig_dir.mkdir(parents=True, exist_ok=True)
    handoff = None
    if {"04", "05"} <= {nb.stem[:2] for nb in selected}:
        # notebook 05 evaluates the models notebook 04 made (it checks their recipe) instead of pruning them again
        handoff = tempfile.mkdtemp(prefix="amp-reproduce-models-")
        for nb in selected:
            name = HANDOFF.get(nb.stem[:2])
            if name and name not in (overrides or {}).get(nb.stem[:2], {}):  # an explicit --set still wins
                params_by_nb[nb.stem][name] = handoff
    runs: list[NotebookRun] = []
    start_all = time.perf_counter()
    quiet = {} if log_output or "TQDM_DISABLE" in os.environ else {"TQDM_DISABLE": "1"}  # no progress bars in cells
    os.environ.update(quiet)
    try:
        for i, nb in enumerate(selected, 1):
            parameters = {**params_by_nb[nb.stem], "out_dir": str(out), "fig_dir": str(fig_dir)}
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
