"""Rehearse the paper profile: every notebook, its real code path, on stand-in models and generated data.

    amp reproduce --profile paper --dry-run [--out runs/paper-dry-run] [--only 04,05]

Nothing in the profile is special-cased by name of notebook: :func:`dry_run_parameters` walks each notebook's parameter
tree and

* replaces every model spec (``open_clip:``, ``timm:``, ``hf:``, ``hf-hub:``) by the stand-in of its family
  (:func:`amp.zoo.standins.standin_for`: EVA → ``zoo:standin-eva``, DINOv2 → ``zoo:standin-dinov2``, the rest →
  ``zoo:standin-openclip``);
* points every ``{placeholder}`` path at a folder generated here in the layout its data kind reads
  (:func:`make_data`): ImageNet-style class folders named by WordNet id (ImageNet-A / -R: ids of their 200-class
  subsets; ImageNetV2: folders named by class index), ObjectNet in clip_benchmark's layout (``objectnet-1.0/images``
  and its four mapping files), COCO and Flickr30k with Karpathy split files;
* clamps sizes by the parameter's name (:data:`CLAMPS`): image counts, batches (the chunk stays smaller than the
  batch, so the chunked path runs), steps, epochs, k of the k-NN, the search cache bound (tiny, so its fallback runs),
  input sizes, and sends ``cuda`` to the CPU; a sweep (``thresholds``, ``ratios``) keeps two of its points, the
  notebook's main value among them. The method's own settings (Δ, τ⁻¹, rules, criteria) stay the paper's.

Then :func:`amp.reproduce.reproduce` runs the notebooks with these parameters, so a parameter the notebook does not
declare fails before anything runs, exactly as in the real run. The notebooks distill in their own process; the paper
distilled with ``torchrun`` on 8 GPUs, so :func:`rehearse_torchrun_distill` runs ``python -m torch.distributed.run
--nproc-per-node 2 -m amp distill --recipe <name>`` (gloo) once per stand-in family and sharding the profile's
recipes use, and ``REPORT.md`` gets its own table. :data:`EXTRA` holds the few values no generic rule
gets (a notebook default that the paper profile leaves as is but that would repeat the work for nothing here).

Why few classes: the zero-shot head encodes 80 prompts per class; 1000 classes take minutes of text encoding on two
CPU cores per data set, so the class folders are a subset of the real ids (:data:`CLASSES_PER_SET`) in the real naming.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from amp.api import load_model, save_pruned
from amp.distill import RECIPES
from amp.io import resolve
from amp.reproduce import PLACEHOLDER, _select, load_profile, notebook_parameters, notebook_paths, reproduce
from amp.surgery import set_width
from amp.zoo.standins import IMAGE_SIZE, standin_for

MODEL_PREFIXES = ("open_clip:", "timm:", "hf:", "hf-hub:")
CLASSES_PER_SET = 6  # class folders per generated ImageNet-style set (real ids, see the module docstring)
IMAGES_PER_CLASS = {"train": 6, "default": 3}  # the training split feeds scoring, distillation and k-NN neighbours
CAPTIONED_IMAGES = {"train": 24, "restval": 8, "val": 8, "test": 12}  # per Karpathy split
CAPTIONS_PER_IMAGE = 5
BATCH = 16  # every batch; the entropy criterion is over a batch, so at least 2
CHUNK = 8  # every chunk: smaller than the batch, so the gradient-cache path runs
DEVICE_BATCH = 8  # distillation: BATCH / DEVICE_BATCH = 2 accumulation steps on one process
CACHE_GB = 1e-5  # the search's cache bound: ~10 kB, so the spill/fallback path runs


def _at_most(limit: int | float) -> Callable[[Any], Any]:
    def clamp(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value
        return type(value)(min(value, limit))

    return clamp


def _ks(value: Any) -> Any:
    """k of the k-NN: at most the neighbours there are, duplicates dropped, order kept."""
    limit = CLASSES_PER_SET * IMAGES_PER_CLASS["train"] // 2
    return list(dict.fromkeys(min(k, limit) for k in value)) if isinstance(value, list) else _at_most(limit)(value)


# parameter name (a regular expression, full match) -> how its value is clamped; the first match wins, so the
# specific names come before the general ones (warmup_epochs before epochs, device_batch before *_batch)
CLAMPS: list[tuple[str, Callable[[Any], Any]]] = [
    (r"device", lambda v: "cpu" if isinstance(v, str) and v.startswith("cuda") else v),
    (r"chunk_size", _at_most(CHUNK)),
    (r"device_batch", _at_most(DEVICE_BATCH)),
    (r".*batch_size|.*_batch", _at_most(BATCH)),
    (r".*images|knn_queries", _at_most(32)),
    (r"throughput_(steps|warmup|rounds|runs)|rounds|runs|repeats", _at_most(2)),
    (r"warmup_epochs", _at_most(0.5)),
    (r"epochs", _at_most(1)),
    (r"warmup.*", _at_most(1)),
    (r"steps", _at_most(4)),
    (r"knn_k", _ks),
    (r"cache_gb", lambda v: CACHE_GB if isinstance(v, (int, float)) and not isinstance(v, bool) else v),
    (r"img_size|image_size", lambda v: IMAGE_SIZE if isinstance(v, int) and not isinstance(v, bool) else v),
]
# a distillation block (a parameter named "distill", or a dict naming a "recipe") gets these where it does not set
# them: a named recipe's paper sizes (global batch 512, 64 per GPU, 5-30 epochs) would run otherwise
RECIPE_SIZES = {"batch_size": BATCH, "device_batch": DEVICE_BATCH, "epochs": 1, "warmup_epochs": 0.5}
# per notebook number: values no generic rule gets (notebook defaults the paper profile keeps, cut for the rehearsal)
EXTRA: dict[str, dict[str, Any]] = {
    "02": {"seeds": [0, 1]},
    "03": {"seeds": [0, 1]},
}


SWEEPS = r".*thresholds|ratios"  # a sweep over the method's settings: two points of it run the same code as five


# --- parameters ---------------------------------------------------------------------------------------------------


def _cut_sweep(values: list, main: set) -> list:
    """At most two points of a sweep, in its order: the notebook's main value where the sweep has it, and the first."""
    first_main = [v for v in values if v in main][:1]
    others = [v for v in values if v not in first_main]
    chosen = first_main + others[: 2 - len(first_main)]
    return [v for v in values if v in chosen]


def _clamp(name: str, value: Any) -> Any:
    rule = next((rule for pattern, rule in CLAMPS if re.fullmatch(pattern, name)), None)
    return rule(value) if rule is not None else value


def _rewrite(name: str, value: Any, fill: Callable[[str], Any]) -> Any:
    """One parameter (or nested entry) for the rehearsal: specs swapped, paths filled, sizes clamped."""
    if isinstance(value, str):
        value = _clamp(name, value)
        return standin_for(value) if value.startswith(MODEL_PREFIXES) else fill(value)
    if isinstance(value, list):
        clamped = _clamp(name, value)
        return [_rewrite(name, v, fill) for v in clamped] if isinstance(clamped, list) else clamped
    if isinstance(value, dict):
        out = {key: _rewrite(key, v, fill) for key, v in value.items()}
        if name == "distill" or "recipe" in out:  # a named recipe's own paper sizes would run otherwise
            sized = {k: v for k, v in RECIPE_SIZES.items() if not ("steps" in out and "epochs" in k)}
            out = {**sized, **out}
        return out
    return _clamp(name, value)


def dry_run_parameters(
    profile: Mapping[str, Mapping[str, Any]], paths: Mapping[str, str], declared: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Every notebook's rehearsal parameters by notebook number (``{"04": {...}}``, the form of ``--set``).

    ``profile``: parameters by notebook stem, placeholders unfilled; ``paths``: placeholder → generated folder;
    ``declared``: each notebook's declared defaults by stem (an :data:`EXTRA` value is set only where the notebook
    declares it and the profile leaves it alone). Defaults the profile leaves alone are the cpu profile's: small.
    """

    def fill(text: str) -> str:
        return PLACEHOLDER.sub(lambda m: paths[m.group(1)], text)

    out: dict[str, dict[str, Any]] = {}
    for stem, params in profile.items():
        number = stem[:2]
        defaults = declared.get(stem, {})
        given = {name: _rewrite(name, value, fill) for name, value in params.items()}
        main = {params.get(k, defaults.get(k)) for k in ("threshold", "search_threshold", "ratio", "seed_ratio")}
        for name, value in given.items():
            if re.fullmatch(SWEEPS, name) and isinstance(value, list) and len(value) > 2:
                given[name] = _cut_sweep(value, main)
        extra = {k: v for k, v in EXTRA.get(number, {}).items() if k in defaults and k not in params}
        out[number] = {**given, **extra}
    return out


# --- data ---------------------------------------------------------------------------------------------------------


def _timm_synsets(name: str) -> list[str]:

    return resources.files("timm.data._info").joinpath(name).read_text().split()


OBJECTNET_FOLDERS = ["alarm_clock", "backpack", "banana", "band_aid", "basket", "bath_towel", "beer_bottle", "bench"]


def _class_folders(key: str) -> list[str]:
    """The class folder names of the set a placeholder stands for, guessed from its name (real ids, a subset)."""
    lowered = key.lower()
    if re.search(r"(^|_)(a|adversarial)$|imagenet_?a\b", lowered):
        names = _timm_synsets("imagenet_a_synsets.txt")
    elif re.search(r"(^|_)(r|rendition)$|imagenet_?r\b", lowered):
        names = _timm_synsets("imagenet_r_synsets.txt")
    elif "v2" in lowered:
        names = [str(i) for i in range(1000)]
    elif "objectnet" in lowered:
        names = OBJECTNET_FOLDERS
    else:  # ImageNet-1K train/val, ImageNet-Sketch: WordNet ids of the 1000 classes
        names = _timm_synsets("imagenet_synsets.txt")
    step = max(1, len(names) // CLASSES_PER_SET)
    return names[::step][:CLASSES_PER_SET]


def _write_image(path: Path, seed: int, tint: int) -> None:
    """A small PNG: noise around a class-dependent colour, so classes differ a little."""

    rng = np.random.default_rng(seed)
    colour = np.array([(tint * 67) % 256, (tint * 131) % 256, (tint * 29) % 256], dtype=np.float64)
    pixels = np.clip(colour + rng.normal(0, 60, (IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _image_folder(root: Path, key: str) -> None:
    count = IMAGES_PER_CLASS["train" if "train" in key else "default"]
    for label, name in enumerate(_class_folders(key)):
        for i in range(count):
            _write_image(root / name / f"{name}_{i:03d}.png", seed=zlib.crc32(f"{key}/{name}/{i}".encode()), tint=label)


def _karpathy(root: Path, filename: str, image_dir: str, coco: bool) -> None:
    images, n = [], 0
    for split, count in CAPTIONED_IMAGES.items():
        for _ in range(count):
            name = f"img_{n:05d}.png"
            folder = ("train2014" if split == "train" else "val2014") if coco else image_dir
            _write_image(root / folder / name, seed=n, tint=n % 7)
            sentences = [{"raw": f"picture {n} of kind {n % 7}, caption {c}."} for c in range(CAPTIONS_PER_IMAGE)]
            entry = {"filename": name, "split": split, "sentences": sentences, "imgid": n}
            images.append({**entry, "filepath": folder} if coco else entry)
            n += 1
    (root / filename).write_text(json.dumps({"images": images, "dataset": "coco" if coco else "flickr30k"}))


def _objectnet(root: Path) -> None:
    """clip_benchmark's ObjectNet layout: ``objectnet-1.0/images/<folder>/`` and the four mapping files it reads."""
    imagenet_lines = [f"imagenet class {i}" for i in range(1000)]  # line i: the name of PyTorch class i
    folders = OBJECTNET_FOLDERS[:CLASSES_PER_SET]
    objectnet_names = {folder: folder.replace("_", " ").capitalize() for folder in folders}
    mappings = {
        "folder_to_objectnet_label.json": objectnet_names,
        "objectnet_to_imagenet_1k.json": {
            name: imagenet_lines[7 * i] for i, name in enumerate(objectnet_names.values())
        },
        "pytorch_to_imagenet_2012_id.json": {str(i): i for i in range(1000)},
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, table in mappings.items():
        (root / name).write_text(json.dumps(table))
    (root / "imagenet_to_label_2012_v2").write_text("\n".join(imagenet_lines) + "\n")
    for label, folder in enumerate(folders):
        for i in range(IMAGES_PER_CLASS["default"]):
            _write_image(root / "objectnet-1.0" / "images" / folder / f"{i:03d}.png", seed=100 + i, tint=label)


def placeholder_kinds(profile: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Each ``{placeholder}`` in the profile → the data kind it is read as: the spec before it (``imagefolder``,
    ``coco``, ``flickr30k``, ``folder``, ``clip_benchmark:objectnet``, ...)."""
    kinds: dict[str, str] = {}

    def note(value: Any) -> None:
        if isinstance(value, str):
            for match in PLACEHOLDER.finditer(value):
                before = value[: match.start()].rstrip(":")
                kinds.setdefault(match.group(1), before or "folder")
        elif isinstance(value, list):
            for v in value:
                note(v)
        elif isinstance(value, dict):
            for v in value.values():
                note(v)

    for params in profile.values():
        note(params)
    return kinds


def make_data(root: str | Path, kinds: Mapping[str, str]) -> dict[str, str]:
    """Generate one folder per placeholder under ``root`` in the layout of its kind; placeholder → folder."""
    root = Path(root)
    paths = {}
    for key, kind in sorted(kinds.items()):
        folder = root / key
        if kind == "coco":
            _karpathy(folder, "dataset_coco.json", "", coco=True)
        elif kind == "flickr30k":
            _karpathy(folder, "dataset_flickr30k.json", "flickr30k-images", coco=False)
        elif kind == "clip_benchmark:objectnet":
            _objectnet(folder)
        elif kind == "folder":
            for i in range(IMAGES_PER_CLASS["default"] * CLASSES_PER_SET):
                _write_image(folder / f"{i:04d}.png", seed=i, tint=i)
        else:  # imagefolder, and any other kind (clip_benchmark:imagenet-r, ...): class folders
            _image_folder(folder, key)
        paths[key] = str(folder)
    return paths


# --- distillation under torchrun -----------------------------------------------------------------------------------

TORCHRUN_PROCESSES = 2  # gloo on CPU: the paper's 8 GPUs, rehearsed with two processes


def distill_rehearsals(profile: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(stand-in, recipe) pairs to rehearse under torchrun: one per stand-in family and sharding the profile uses.

    The notebooks distill in their own process; the paper ran ``torchrun ... -m amp distill`` on 8 GPUs, so that
    command is what is rehearsed here, with the recipe each model names (``distill_recipe``).
    """

    pairs: dict[tuple[str, str], tuple[str, str]] = {}

    def visit(value: Any) -> None:
        if isinstance(value, dict):
            recipe, spec = value.get("distill_recipe"), value.get("model")
            if isinstance(recipe, str) and isinstance(spec, str) and recipe in RECIPES:
                standin = standin_for(spec)
                pairs.setdefault((standin, RECIPES[recipe].get("sharding", "ddp")), (standin, recipe))
            for v in value.values():
                visit(v)

    visit(dict(profile))
    return list(pairs.values())


def rehearse_torchrun_distill(standin: str, recipe: str, train: str, work: Path, timeout: float = 600) -> dict:
    """``python -m torch.distributed.run --nproc-per-node 2 -m amp distill --recipe <recipe>`` on a pruned stand-in:
    the recipe's settings (sharding, bf16, checkpointing, accumulation) with the sizes clamped; ``{"ok", ...}``."""
    student = work / f"student-{standin.split('-')[-1]}"
    pruned = load_model(standin)
    for site in pruned.sites():
        set_width(site, max(8, site.hidden // 2))
    save_pruned(pruned, student, overwrite=True)
    out = work / f"distilled-{standin.split('-')[-1]}"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={TORCHRUN_PROCESSES}",
        "-m", "amp", "distill", "--student", str(student), "--teacher", standin, "--data", train,
        "--recipe", recipe, "--epochs", "1", "--warmup-epochs", "0.5", "--batch-size", str(BATCH),
        "--device-batch", str(BATCH // TORCHRUN_PROCESSES // 2), "--checkpoint-every", "1", "--device", "cpu",
        "--no-progress", "--out", str(out), "--overwrite",
    ]  # fmt: skip
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if re.match(r"\w*(Error|Exception): ", line)]  # the exception itself
        tail = errors[-1:] or [line for line in lines if line.startswith("amp: ")][-1:] or lines[-1:] or [""]
        ok = done.returncode == 0
    except subprocess.TimeoutExpired:
        ok, tail = False, [f"timed out after {timeout:.0f} s"]
    ok = ok and (out / "model.safetensors").is_file()
    name = f"torchrun distill ({recipe} on {standin}, {TORCHRUN_PROCESSES} gloo processes)"
    return {"name": name, "ok": ok, "seconds": time.perf_counter() - start, "error": None if ok else tail[0],
            "command": " ".join(command)}  # fmt: skip


BANNER = (
    "**Dry run** (`--dry-run`): random stand-in models (`amp.zoo.standins`) on generated images, sizes clamped "
    "(`amp.dry_run`). It shows that every notebook starts and finishes on the paper profile's code path; its numbers "
    "mean nothing."
)


def _finish_report(report: Path, rehearsals: list[dict]) -> None:
    """Say at the top that this is a rehearsal, and add the torchrun distillations at the end."""
    text = report.read_text()
    heading, _, rest = text.partition("\n")
    lines = [heading, "", BANNER, rest.rstrip()]
    if rehearsals:
        lines += ["", "## Distillation under torchrun", "", "| rehearsal | status | time |", "|---|---|---:|"]
    for r in rehearsals:
        status = "ok" if r["ok"] else f"**failed**: {r['error']}"
        lines.append(f"| {r['name']} | {status.replace('|', '/')} | {r['seconds']:.0f} s |")
    report.write_text("\n".join(lines) + "\n")


# --- the run ------------------------------------------------------------------------------------------------------


def dry_run(
    profile: str = "paper",
    only: str | None = None,
    out: str | Path | None = None,
    data_dir: str | Path | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    keep_going: bool = True,
    progress: bool = True,
    log_output: bool = False,
    torchrun: bool = True,
    **reproduce_options: Any,
) -> dict[str, Any]:
    """Run ``profile``'s notebooks on stand-ins and generated data (see the module docstring); the reproduce result.

    ``data_dir``: where the data is generated (default a temporary folder, removed afterwards); ``overrides``
    (``{"04": {"steps": 2}}``, as ``--set``) go over the rehearsal's parameters. ``torchrun``: also rehearse
    ``torchrun -m amp distill`` for each recipe family the profile names (:func:`distill_rehearsals`), reported in
    ``REPORT.md`` and under ``result["torchrun"]``; a failure there makes ``result["ok"]`` false.
    """

    raw = load_profile(profile)
    selected = _select(notebook_paths(reproduce_options.get("notebooks")), only)
    raw = {stem: params for stem, params in raw.items() if any(nb.stem == stem for nb in selected)}
    declared = {nb.stem: notebook_parameters(nb) for nb in selected}
    temporary = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="amp-dry-run-data-")) if temporary else Path(data_dir)
    try:
        kinds_of = placeholder_kinds(raw)
        paths = make_data(root, kinds_of)
        rehearsal = dry_run_parameters(raw, paths, declared)
        for number, given in (overrides or {}).items():
            rehearsal[number] = {**rehearsal.get(number, {}), **given}
        result = reproduce(
            profile=profile,
            only=only,
            out=resolve(out) if out is not None else resolve(f"runs/{profile}-dry-run"),
            paper_paths=paths,
            overrides={k: v for k, v in rehearsal.items() if v},
            keep_going=keep_going,
            progress=progress,
            log_output=log_output,
            **reproduce_options,
        )
        runs = []
        train = next(
            (f"imagefolder:{p}" for k, p in paths.items() if "train" in k and kinds_of[k] == "imagefolder"), None
        )
        for standin, recipe in distill_rehearsals(raw) if torchrun and train else []:
            if progress:
                print(f"torchrun distill rehearsal: {recipe} on {standin} ...", flush=True)
            runs.append(rehearse_torchrun_distill(standin, recipe, train, root))
            if progress:
                print(
                    f"  {'ok' if runs[-1]['ok'] else 'FAILED: ' + str(runs[-1]['error'])} ({runs[-1]['seconds']:.0f} s)"
                )
        _finish_report(Path(result["report"]), runs)
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    result["torchrun"] = runs
    result["ok"] = result["ok"] and all(r["ok"] for r in runs)
    result["dry_run"] = {"data": paths, "overrides": rehearsal}
    return result
