"""What the notebooks share: paths against the project root, data checks, tables, figures.

Every helper here is small and plain so that a notebook cell reads as the experiment, not as plumbing. The runner that
executes the notebooks (papermill, the report) is :mod:`amp.reproduce`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from amp.accounting import model_stats
from amp.data import load_dataset, make_loader
from amp.distill import RECIPES, DistillConfig
from amp.evaluation import EvalRow, cosines, embed_dataset, first_items, knn_hits
from amp.io import project_root, resolve  # noqa: F401  the notebooks take them from here
from amp.stats import paired_difference

# --- where things are --------------------------------------------------------------------------------------


# --- data, tables and figures ------------------------------------------------------------------------------

PATH_KINDS = ("imagefolder", "folder", "coco", "flickr30k", "clip_benchmark")


def _directory(kind: str, argument: str) -> str:
    """The directory a data-set name reads: ``<dir>``, ``<root>[:<split>]``, or ``<name>:<root>[:<split>]`` for
    clip_benchmark."""
    if kind in ("imagefolder", "folder"):
        return argument
    if kind == "clip_benchmark":
        argument = argument.partition(":")[2]
    root, sep, split = argument.rpartition(":")
    return argument if not sep or not split or "/" in split else root  # no split given, or a ':' inside the path


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
            directory = _directory(kind, argument)
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


def _symlog_ticks(values, threshold: float) -> list[float]:
    """Ticks for a symlog axis around Δ: 0, Δ/4 (the linear part's edge), then ±Δ·10^k up to the data's range."""
    values = np.asarray(values, dtype=float)
    ticks, step = [0.0, threshold / 4], threshold
    high, low = max(float(values.max()), threshold), float(values.min())
    while step <= high * 10:
        ticks.append(step)
        step *= 10
    step = threshold
    while low < -threshold / 4 and step <= -low * 10:
        ticks.insert(0, -step)
        step *= 10
    return ticks


def plot_probe_traces(probes, widths: list[int], dense_widths: list[int], threshold: float):
    """One panel per layer of an ``amp.search``: each probe's width and loss − reference (``probes["change"]``),
    filled when it passed the rule, open when not, numbered in probe order; dashed: Δ, vertical: the width kept."""
    import math

    import matplotlib.pyplot as plt

    layers = len(widths)
    cols = min(layers, math.ceil(math.sqrt(1.5 * layers)))
    rows = math.ceil(layers / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.3 * rows), sharey=True, squeeze=False)
    ticks = _symlog_ticks(probes["change"], threshold)
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
        ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("loss − reference")
    for ax in axes[-1]:
        ax.set_xlabel("width probed")
    fig.suptitle(f"AMP probes, Δ = {threshold:g} (numbers: probe order)")
    fig.tight_layout()
    return fig


# --- the paper profile's knobs, passed only when a profile sets them -------------------------------------------

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _dtype(precision: str, name: str):
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"{name} must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return getattr(torch, PRECISIONS[precision])


def score_options(chunk_size: int | None = None, checkpoint: bool = False) -> dict[str, Any]:
    """Extra ``amp.score`` keywords: ``chunk_size`` (the loader batch is the global batch, run in chunks of this many
    images: the gradient cache) and ``checkpoint`` (recompute blocks in backward); nothing when neither is set, so a
    profile without them calls ``amp.score`` exactly as before."""
    return {**({"chunk_size": chunk_size} if chunk_size else {}), **({"checkpoint": True} if checkpoint else {})}


def search_options(chunk_size: int | None = None, cache_gb: float | None = None, precision: str = "fp32") -> dict:
    """Extra ``amp.search`` keywords: forward ``chunk_size``, the ``cache_gb`` bound of what the search keeps on the
    device, and ``precision`` (``bf16``/``fp16``: autocast, criterion in fp32); only those a profile sets."""
    options: dict[str, Any] = {"chunk_size": chunk_size} if chunk_size else {}
    options |= {"cache_gb": cache_gb} if cache_gb else {}
    return options | ({"autocast_dtype": _dtype(precision, "search_precision")} if precision != "fp32" else {})


def speed_options(batch_size: int, steps: int, warmup: int, rounds: int, precision: str = "fp32") -> dict[str, Any]:
    """``EvalSuite.speed`` options: ``rounds`` alternating dense/pruned runs of ``steps`` batches each (the paper: batch
    1000, the mean of 10 runs), under autocast when ``precision`` is not fp32."""
    options = {"batch_size": batch_size, "steps": steps, "warmup": warmup, "rounds": rounds}
    return options | ({"dtype": _dtype(precision, "throughput_precision")} if precision != "fp32" else {})


def distill_options(distill: Mapping[str, Any], recipe: str | None = None) -> dict[str, Any]:
    """``amp.recover(..., "distill", ...)`` keywords: the named recipe (``amp.distill.RECIPES``, the paper's per-model
    settings) with ``distill``'s values over it, or ``distill`` alone without a recipe."""
    if not recipe:
        return dict(distill)
    config = DistillConfig.from_recipe(recipe, **distill)  # refuses an unknown recipe or field before any model moves
    named = (set(RECIPES[recipe]) - {"source"}) | set(distill)  # steps over a recipe unsets its epochs (and back)
    return {key: getattr(config, key) for key in sorted(named)}


def distill_length(options: Mapping[str, Any]) -> str:
    """``"60 steps"`` or ``"5 epochs"``: how long a distillation runs, for labels."""
    return f"{options['steps']} steps" if options.get("steps") else f"{options['epochs']:g} epochs"


def distill_summary(distill: Mapping[str, Any], recipe: str | None, data: str) -> str:
    """``"60 steps of batch 32 on `data`, lr 0.0001"`` (prefixed with the recipe's name when there is one)."""
    o = distill_options(distill, recipe)
    text = f"{distill_length(o)} of batch {o['batch_size']} on `{data}`, lr {o['lr']:g}"
    return f"recipe {recipe}: {text}" if recipe else text


def without_model(models: Mapping[str, Mapping[str, Any]]) -> tuple[dict, dict[str, str]]:
    """The models that can run, and ``{name: why not}`` for the declared rows without a loadable spec (``model`` null,
    the reason in ``unavailable``), so a table can name its gaps instead of dropping them silently."""
    runnable = {name: dict(cfg) for name, cfg in models.items() if cfg.get("model")}
    gaps = {name: str(cfg.get("unavailable", "no model spec")) for name, cfg in models.items() if not cfg.get("model")}
    return runnable, gaps


def add_mean_over_sets(row, metric: str, datasets, label: str = "Avg") -> None:
    """Adds ``<label>/<metric>`` to ``row``: the unweighted mean of ``metric`` over ``datasets`` (the paper's "Avg"),
    as per-item outcomes over the pooled items, each weighted by ``1 / (sets × its set's size)``; their mean is the
    mean of the set means, a bootstrap over them gives its interval, and two rows compare item by item."""
    import torch

    parts = [row.outcome(metric, d).double() for d in datasets]
    total = sum(len(p) for p in parts)
    pooled = torch.cat([p * total / (len(parts) * len(p)) for p in parts])
    row.add(metric, pooled.float(), label, qualify=True)


# --- intervals and comparisons in tables and sentences --------------------------------------------------------


def with_interval(row, metric: str, label: str | None = None, dataset: str | None = None) -> dict[str, float]:
    """``{label: value, "<label> lo": ..., "<label> hi": ...}``: a metric with its 95 % interval, for a table row."""
    label = label or metric
    low, high = row.interval(metric, dataset)
    return {label: row.value(metric, dataset), f"{label} lo": low, f"{label} hi": high}


def compare(row_a, row_b, metric: str, dataset: str | None = None):
    """The paired difference ``row_b − row_a`` on the same items (:func:`amp.stats.paired_difference`)."""
    return paired_difference(row_a, row_b, metric, dataset)


def verdict(row_a, row_b, metric: str, dataset: str | None = None) -> str:
    """One generated sentence: ``b`` is higher/lower than ``a`` (interval excludes 0), or no difference measured."""
    return compare(row_a, row_b, metric, dataset).verdict


def mean_and_spread(values) -> str:
    """``"0.473 ± 0.012 (n=3)"``: mean and standard deviation over seeds, for sentences."""
    array = np.asarray(list(values), dtype=float)
    spread = array.std(ddof=1) if len(array) > 1 else float("nan")
    return f"{array.mean():.3f} ± {spread:.3f} (n={len(array)})"


# --- notebook 06: k-NN for several k and the cosine to the dense model, from one embedding per model ----------------


class KnnBench:
    """The DINOv2 k-NN protocol for every ``k`` in ``ks`` and each query's cosine to the dense embedding, as one
    :class:`amp.evaluation.EvalRow` per model (metrics ``knn_top1 (k=K)`` and ``fidelity_cosine``, with per-query
    outcomes for intervals and paired tests).

    The first ``train_images`` of ``train`` are the neighbours, the first ``test_images`` of ``test`` the queries,
    loaded once (in order) through the dense model's transform, which its pruned copies share. Each model embeds
    each set once; every k and the cosine reuse those embeddings (an :class:`amp.EvalSuite` per k would embed the
    queries again for the cosine). The dense model's query embeddings are kept from its own row.
    """

    def __init__(self, dense, train: str, test: str, train_images: int | None = None, test_images: int | None = None,
                 ks=(10, 20), temperature: float = 0.07, batch_size: int = 32, device: str = "cpu"):  # fmt: skip
        self.dense, self.ks, self.temperature, self.device = dense, list(ks), temperature, device
        self.names, self.batches, self.images, self.classes = {"train": train, "test": test}, {}, {}, None
        for role, spec, cap in (("train", train, train_images), ("test", test, test_images)):
            dataset = first_items(load_dataset(spec, dense.preprocess), cap)
            self.batches[role], self.images[role] = list(make_loader(dataset, batch_size, shuffle=False)), len(dataset)
            self.classes = self.classes or len(getattr(dataset, "classes", None) or []) or None
        self.dense_queries = None

    def measure(self, backbone, name: str | None = None):
        """Size, k-NN top-1 per k and (other than the dense model) the per-query cosine to the dense embedding."""
        project = backbone.is_clip
        embedded = {role: embed_dataset(backbone, batches, project=project, device=self.device, progress=False)
                    for role, batches in self.batches.items()}  # fmt: skip
        (train, train_labels), (test, test_labels) = embedded["train"], embedded["test"]
        row, size = EvalRow(name or backbone.spec), model_stats(backbone)
        row.metrics.update(params_M=size.params / 1e6, mlp_params_M=size.mlp_params / 1e6, gflops=size.flops / 1e9)
        for k in self.ks:
            hits = knn_hits(train, train_labels, test, test_labels, k, self.temperature, self.classes)["top1"]
            row.add(f"knn_top1 (k={k})", hits, self.names["test"])
        if backbone is self.dense:
            self.dense_queries = test
        else:
            if self.dense_queries is None:
                self.dense_queries = embed_dataset(self.dense, self.batches["test"], project=project,
                                                   device=self.device, progress=False)[0]  # fmt: skip
            row.add("fidelity_cosine", cosines(self.dense_queries, test), self.names["test"])
        return row


def compare_metrics(row, metric_a: str, metric_b: str, label: str | None = None):
    """The paired difference ``metric_b − metric_a`` of one row (e.g. k-NN at k=20 vs k=10 on the same queries),
    named ``"<row> <metric>"``; :func:`amp.stats.paired_difference` on the per-item outcomes."""

    label = label or f"{metric_a} vs {metric_b}"
    a, b = EvalRow(f"{row.name} {metric_a}"), EvalRow(f"{row.name} {metric_b}")
    a.add(label, row.outcome(metric_a))
    b.add(label, row.outcome(metric_b))
    return paired_difference(a, b, label)


def interval_text(row, metric: str, digits: int = 3, dataset: str | None = None) -> str:
    """``"0.812 [0.787, 0.835]"``: a metric with its 95 % interval, for generated sentences."""
    low, high = row.interval(metric, dataset)
    return f"{row.value(metric, dataset):.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def difference_text(value: float, low: float, high: float, digits: int = 3) -> str:
    """``"+0.012 [+0.004, +0.020]"``: a paired difference with its interval; where ``digits`` would round an interval
    that excludes 0 to ``+0.000``, as many more digits as its bound nearest to 0 needs to show."""
    nearest = min(abs(low), abs(high))
    if (low > 0 or high < 0) and nearest > 0:
        digits = max(digits, int(np.floor(-np.log10(nearest))) + 1)
    return f"{value:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


# --- notebooks 03-05: a pair-level mean recall, paired verdicts as table rows, error bars from a table --------------


def add_mean_recall(row, k: int = 1, dataset: str | None = None) -> None:
    """Adds ``mean_R@k`` to ``row``: per image, the mean of its image→text hit and of its captions' text→image hits
    (captions in image order, the same number per image, as the retrieval sets give them), so intervals and paired
    tests resample whole images with their captions. On several retrieval sets, name the ``dataset``."""
    key = row.key(f"i2t_R@{k}", dataset)
    i2t, t2i = row.outcome(f"i2t_R@{k}", dataset).float(), row.outcome(f"t2i_R@{k}", dataset).float()
    if len(t2i) % len(i2t):
        raise ValueError(f"mean_R@{k} needs the same number of captions per image: {len(i2t)} images, {len(t2i)} texts")
    per_image = (i2t + t2i.reshape(len(i2t), -1).mean(dim=1)) / 2
    row.add(f"mean_R@{k}", per_image, row.datasets.get(key, dataset), qualify="/" in key)


def paired_row(row_a, row_b, metric: str, label: str | None = None, dataset: str | None = None) -> dict[str, Any]:
    """One table row of the paired difference ``row_b − row_a``: Δ, its 95 % interval, p-value and the verdict
    word (``higher``/``lower``/``no difference measured``)."""
    diff = compare(row_a, row_b, metric, dataset)
    word = "no difference measured" if not diff.significant else ("higher" if diff.difference > 0 else "lower")
    return {"metric": label or metric, "a": diff.name_a, "b": diff.name_b, "b − a": diff.difference,
            "b − a lo": diff.low, "b − a hi": diff.high, "p": diff.p_value, "test": diff.test, "items": diff.items,
            "verdict": word}  # fmt: skip


def error_bars(df, column: str):
    """``(2, n)`` distances from ``df[column]`` to ``df["<column> lo"]`` and ``df["<column> hi"]``, for
    ``matplotlib``'s ``errorbar(yerr=...)`` (never negative: a float32 mean can sit a hair outside its interval)."""
    values = df[column].to_numpy(dtype=float)
    low, high = df[f"{column} lo"].to_numpy(dtype=float), df[f"{column} hi"].to_numpy(dtype=float)
    return np.clip(np.vstack([values - low, high - values]), 0, None)
