"""What the notebooks share: paths against the project root, data checks, tables, figures.

Every helper here is small and plain so that a notebook cell reads as the experiment, not as plumbing. The runner that
executes the notebooks (papermill, the report) is :mod:`amp.reproduce`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

# --- where things are --------------------------------------------------------------------------------------


def project_root() -> Path:
    """The checkout that holds ``amp/`` and ``notebooks/`` (else the working directory)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "notebooks").is_dir() else Path.cwd()


def resolve(path: str | Path) -> Path:
    """``path`` as is when absolute, else relative to the project root (notebooks run from ``notebooks/`` too)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else project_root() / path


# --- data, tables and figures ------------------------------------------------------------------------------

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
    if isinstance(value, np.generic):
        value = value.item()
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


# --- small analyses the notebooks show ------------------------------------------------------------------------


def rank_correlations(scores: Mapping[str, Any], pairs) -> Any:
    """Spearman rank correlation of two criteria's unit scores, per layer: one row per ``(a, b)`` pair of names in
    ``scores`` (``"a vs b"``), one column per layer (``"layer 0"``, ...). 1: the same ranking, 0: unrelated."""
    import pandas as pd
    from scipy.stats import spearmanr

    pairs = list(pairs)
    layers = range(len(next(iter(scores.values())).values))
    return pd.DataFrame(
        [[spearmanr(scores[a].values[layer].numpy(), scores[b].values[layer].numpy())[0] for layer in layers]
         for a, b in pairs],
        index=[f"{a} vs {b}" for a, b in pairs],
        columns=[f"layer {layer}" for layer in layers],
    )  # fmt: skip


# --- notebook 03: the probes of one AMP search ----------------------------------------------------------------------


def plot_probe_traces(probes, widths: list[int], dense_widths: list[int], threshold: float):
    """One panel per layer of an ``amp.search``: each probe's width and loss − reference (``probes["change"]``),
    filled when it passed the rule, open when not, numbered in probe order; dashed: Δ, vertical: the width kept."""
    import math

    import matplotlib.pyplot as plt

    layers = len(widths)
    cols = min(layers, math.ceil(math.sqrt(1.5 * layers)))
    rows = math.ceil(layers / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.3 * rows), sharey=True, squeeze=False)
    for layer, ax in enumerate(axes.flat):
        if layer >= layers:
            ax.axis("off")
            continue
        part = probes[probes["layer"] == layer].reset_index(drop=True)
        passed, failed = {"color": "tab:green"}, {"facecolors": "none", "edgecolors": "tab:red"}
        for accepted, style in ((True, passed), (False, failed)):
            sel = part[part["accepted"] == accepted]
            ax.scatter(sel["width"], sel["change"], s=28, **style)
        for i, r in part.iterrows():
            ax.annotate(str(i + 1), (r["width"], r["change"]), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.axhline(threshold, color="grey", linestyle="--", linewidth=1)
        ax.axvline(widths[layer], color="tab:blue", linewidth=1)
        ax.set_xlim(0, dense_widths[layer])
        ax.set_title(f"layer {layer}: {widths[layer]}/{dense_widths[layer]}", fontsize=9)
        ax.set_yscale("symlog", linthresh=threshold / 4)
    for ax in axes[:, 0]:
        ax.set_ylabel("loss − reference")
    for ax in axes[-1]:
        ax.set_xlabel("width probed")
    fig.suptitle(f"AMP probes, Δ = {threshold:g} (numbers: probe order)")
    fig.tight_layout()
    return fig
