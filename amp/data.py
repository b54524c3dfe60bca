"""Data sets by name: ``<kind>:<argument>``, e.g. ``folder:/photos``, ``imagefolder:/imagenet/val``, ``synthetic:64``.

Every data set yields ``(image, target)``: ``target`` is a class index (int), a caption (str), a list of
captions, or -1 for unlabelled images. Class data sets expose ``.classes``; captioned ones ``.captions``.
Loaders are registered by prefix with :func:`register_dataset`.

Kinds:

* ``synthetic:<count>[:<size>]``: seeded random images (no signal), target -1.
* ``folder:<dir>``: every image under ``dir`` (recursively, sorted), target -1.
* ``imagefolder:<dir>``: ImageNet-style ``<dir>/<class>/<image>`` (torchvision's ``ImageFolder``: one directory
  walk, no per-file ``stat``, so 1.28 M ImageNet images list in seconds); ``.classes`` are the sorted folder names.
* ``coco:<root>[:<split>]``: COCO captions with the Karpathy split file ``dataset_coco.json`` (in ``root`` or
  ``root/annotations``) and images at ``root/<filepath>/<filename>`` (e.g. ``root/val2014/...``).
* ``flickr30k:<root>[:<split>]``: Flickr30k with the Karpathy ``dataset_flickr30k.json`` and images under
  ``root/flickr30k-images`` or ``root/images``.
* ``clip_benchmark:<name>:<root>[:<split>]``: clip_benchmark's own data set ``name`` (``imagenet-a``, ``imagenet-r``,
  ``imagenet_sketch``, ``imagenetv2``, ``objectnet``, ``flickr30k``, ``mscoco_captions``, ...) built from the files
  under ``root`` in the layout its ``build_dataset`` expects, never downloaded (split default ``test``); class sets
  keep clip_benchmark's class names and templates, captioned ones expose ``.captions``.

Captioned kinds default to the ``test`` split; ``train+restval`` style specs join splits.

ImageNet-style class folders named by WordNet id (``n01440764``: ImageNet-1K and its 200-class ImageNet-A/-R subsets,
ImageNet-Sketch) or by index (``0``..``999``: ImageNetV2) get readable names from :func:`class_names`.

Every loader made here without an explicit ``num_workers`` uses :func:`set_num_workers`'s count (``--num-workers``).
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from importlib import import_module, resources
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataSpecError(ValueError):
    """A data set name, path or layout that cannot be used."""


def check_option(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    integer: bool = False,
    optional: bool = False,
) -> None:
    """Refuse a numeric option outside ``[low, high]`` (``(low, high]`` when ``low_open``), naming it (``batch_size``
    is also shown as ``--batch-size``); ``integer`` refuses non-integers, ``optional`` lets None through."""
    if value is None and optional:
        return
    flag = name.replace("_", "-")
    bounds = [f"> {low}" if low_open else f"≥ {low}"] if low is not None else []
    bounds += [f"≤ {high}"] if high is not None else []
    kind = "an integer" if integer else "a finite number"
    wanted = f"{kind} {' and '.join(bounds)}".strip()
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = number and math.isfinite(value) and (not integer or float(value).is_integer())
    ok = ok and (low is None or (value > low if low_open else value >= low)) and (high is None or value <= high)
    if not ok:
        raise ValueError(f"{name} (--{flag}) must be {wanted}, got {value!r}")


DatasetLoader = Callable[[str, Callable | None], Dataset]
DATASETS: dict[str, DatasetLoader] = {}
_LOADER_WORKERS = [0]  # worker processes of loaders made without num_workers: set by the CLI's --num-workers


def set_num_workers(count: int) -> None:
    """Decode images in ``count`` worker processes in every loader amp makes without its own ``num_workers``."""
    check_option("num_workers", count, 0, integer=True)
    _LOADER_WORKERS[0] = int(count)


def num_workers() -> int:
    """The worker count set by :func:`set_num_workers` (0: decode in the main process)."""
    return _LOADER_WORKERS[0]


def register_dataset(prefix: str, loader: DatasetLoader) -> None:
    """Make ``<prefix>:<argument>`` loadable: ``loader(argument, transform) -> Dataset``."""
    DATASETS[prefix] = loader


def load_dataset(spec: str, transform: Callable | None = None) -> Dataset:
    """The data set named by ``spec`` (see the module docstring), images passed through ``transform``."""
    prefix, sep, argument = spec.partition(":")
    if sep and prefix not in DATASETS:
        # the offline data sets register when amp.zoo is imported, which a lazy ``import amp`` defers; a
        # function-level import because amp.zoo imports this module
        import_module("amp.zoo")
    if not sep or prefix not in DATASETS:
        raise DataSpecError(
            f"cannot resolve data set {spec!r}; expected one of " + ", ".join(f"'{p}:...'" for p in DATASETS)
        )
    dataset = DATASETS[prefix](argument, transform)
    if len(dataset) == 0:
        raise DataSpecError(f"data set {spec!r} is empty")
    return dataset


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, num_workers: int | None = None
) -> DataLoader:
    """A loader whose order depends only on ``seed`` (criteria over a batch depend on its composition); workers
    (default :func:`num_workers`) change neither the order nor the batches."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=_LOADER_WORKERS[0] if num_workers is None else num_workers,
        collate_fn=collate,
    )


def collate(items: list[tuple[Any, Any]]) -> tuple[torch.Tensor, Any]:
    """Stack images; keep integer targets as a tensor and captions as a list."""
    images = torch.stack([image for image, _ in items])
    targets = [target for _, target in items]
    if all(isinstance(t, int) for t in targets):
        return images, torch.tensor(targets)
    return images, targets


# --- synthetic ---------------------------------------------------------------------------------


class SyntheticImages(Dataset):
    """Seeded random images for smoke tests and speed measurements (they carry no signal)."""

    def __init__(self, count: int, size: int = 224, seed: int = 0):
        self.count, self.size, self.seed = count, size, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.rand(3, self.size, self.size, generator=generator), -1


def _synthetic(argument: str, transform: Callable | None) -> Dataset:
    count, _, size = argument.partition(":")
    try:
        count_, size_ = int(count), int(size or 224)
    except ValueError:
        count_ = size_ = -1
    if count_ < 0 or size_ <= 0:
        raise DataSpecError(f"synthetic data needs 'synthetic:<count>[:<size>]', got 'synthetic:{argument}'")
    return SyntheticImages(count_, size_)


# --- image files -------------------------------------------------------------------------------


def _open_rgb(path: Path | str, transform: Callable | None) -> Any:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as error:  # unreadable, truncated or not an image at all
        raise DataSpecError(f"cannot read image {path}: {error}; replace or remove the file") from None
    return transform(image) if transform is not None else image


class ImageFiles(Dataset):
    """Images listed in a fixed (sorted) order, with optional integer labels."""

    def __init__(
        self,
        paths: list[Path],
        labels: list[int] | None,
        transform: Callable | None,
        classes: list[str] | None = None,
    ):
        self.paths, self.labels, self.transform, self.classes = paths, labels, transform, classes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = _open_rgb(self.paths[index], self.transform)
        return image, (self.labels[index] if self.labels is not None else -1)


def _existing_dir(argument: str, kind: str) -> Path:
    path = Path(argument).expanduser()
    if not argument or not path.is_dir():
        raise DataSpecError(f"{kind}: directory not found: {argument!r}")
    return path


def _images_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _folder(argument: str, transform: Callable | None) -> Dataset:
    path = _existing_dir(argument, "folder")
    paths = _images_under(path)
    if not paths:
        raise DataSpecError(f"folder: no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
    return ImageFiles(paths, None, transform)


def _read_rgb(path: str) -> Any:
    """ImageFolder's loader: the image as RGB, or a DataSpecError naming the file (module-level: workers pickle it)."""
    return _open_rgb(path, None)


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES)


def _imagefolder(argument: str, transform: Callable | None) -> Dataset:
    path = _existing_dir(argument, "imagefolder")
    if not any(entry.is_dir() for entry in os.scandir(path)):
        raise DataSpecError(f"imagefolder: {path} has no class sub-directories (expected <root>/<class>/<image>)")
    # torchvision walks each class directory once (os.walk: names only, no stat per file) and keeps .classes,
    # .class_to_idx and (path, label) .samples; sorted class names and sorted files, as before
    dataset = ImageFolder(str(path), transform=transform, loader=_read_rgb, is_valid_file=_is_image, allow_empty=True)
    if not dataset.samples:
        raise DataSpecError(f"imagefolder: no images in the class directories of {path}")
    return dataset


# --- captioned images (Karpathy split files) ----------------------------------------------------


class CaptionedImages(Dataset):
    """Images with their reference captions; yields ``(image, list of captions)``."""

    def __init__(self, paths: list[Path], captions: list[list[str]], transform: Callable | None):
        if len(paths) != len(captions):
            raise ValueError(f"{len(paths)} images but {len(captions)} caption lists")
        self.paths, self.captions, self.transform = paths, captions, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, list[str]]:
        return _open_rgb(self.paths[index], self.transform), list(self.captions[index])


def _root_and_split(argument: str, kind: str) -> tuple[Path, list[str]]:
    root, sep, split = argument.rpartition(":")
    if not sep or not split or "/" in split or "\\" in split:  # no split given (or a ':' inside the path)
        root, split = argument, "test"
    if not root:
        raise DataSpecError(f"{kind} needs '{kind}:<root>[:<split>]', got '{kind}:{argument}'")
    return _existing_dir(root, kind), [s for s in split.split("+") if s]


def _karpathy_json(root: Path, filename: str, kind: str) -> list[dict]:
    candidates = [root / filename, root / "annotations" / filename, root / "karpathy" / filename]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise DataSpecError(
            f"{kind}: Karpathy split file {filename!r} not found; expected it at one of "
            + ", ".join(str(c) for c in candidates)
        )
    try:
        with open(found, encoding="utf-8") as fd:
            data = json.load(fd)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataSpecError(f"{kind}: {found} is not valid JSON ({error})") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DataSpecError(
            f"{kind}: {found} has no 'images' list; expected the Karpathy format "
            "{'images': [{'filename', 'split', 'sentences': [{'raw'}], ...}]}"
        )
    for i, entry in enumerate(images):
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("filename"), str)
            and isinstance(entry.get("split"), str)
            and isinstance(entry.get("sentences"), list)
            and all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in entry["sentences"])
        )
        if not ok:
            raise DataSpecError(
                f"{kind}: {found}: images[{i}] lacks 'filename' (str), 'split' (str) or 'sentences' "
                "(list of {'raw': str})"
            )
    return images


def _karpathy(
    root: Path,
    splits: list[str],
    filename: str,
    image_dirs: list[Path],
    kind: str,
    transform: Callable | None,
) -> CaptionedImages:
    entries = _karpathy_json(root, filename, kind)
    available = sorted({e["split"] for e in entries})
    unknown = [s for s in splits if s not in available]
    if not splits or unknown:
        raise DataSpecError(f"{kind}: split {'+'.join(splits)!r} not in {root / filename}; available: {available}")
    selected = [e for e in entries if e["split"] in splits]

    def relative(entry: dict) -> Path:
        return Path(entry.get("filepath") or "") / entry["filename"]

    base = next((d for d in image_dirs if (d / relative(selected[0])).is_file()), None)
    if base is None:
        raise DataSpecError(
            f"{kind}: image {relative(selected[0])} not found under any of "
            + ", ".join(str(d) for d in image_dirs)
            + " (expected the images next to the split file)"
        )
    paths = [base / relative(e) for e in selected]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataSpecError(f"{kind}: {len(missing)} of {len(paths)} images are missing, e.g. {missing[0]}")
    captions = [[s["raw"] for s in e["sentences"]] for e in selected]
    empty = next((p for p, c in zip(paths, captions) if not c), None)
    if empty is not None:
        raise DataSpecError(f"{kind}: image {empty} has no captions")
    return CaptionedImages(paths, captions, transform)


def _coco(argument: str, transform: Callable | None) -> Dataset:
    root, splits = _root_and_split(argument, "coco")
    return _karpathy(root, splits, "dataset_coco.json", [root, root / "images"], "coco", transform)


def _flickr30k(argument: str, transform: Callable | None) -> Dataset:
    root, splits = _root_and_split(argument, "flickr30k")
    dirs = [root / "flickr30k-images", root / "images", root]
    return _karpathy(root, splits, "dataset_flickr30k.json", dirs, "flickr30k", transform)


# --- ImageNet class names ----------------------------------------------------------------------

WORDNET_ID = re.compile(r"n\d{8}")


@cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1K WordNet ids in the standard (sorted) class order, as clip_benchmark ships them."""
    from clip_benchmark.datasets.builder import all_imagenet_wordnet_ids

    return tuple(all_imagenet_wordnet_ids)


@cache
def imagenet_classnames() -> tuple[str, ...]:
    """The OpenAI-cleaned English names of the 1000 ImageNet-1K classes (clip_benchmark's ``en_classnames.json``)."""
    table = json.loads(resources.files("clip_benchmark.datasets").joinpath("en_classnames.json").read_text("utf-8"))
    return tuple(table["imagenet1k"])


@cache
def imagenet_subset_wnids(name: str) -> tuple[str, ...]:
    """The sorted WordNet ids of an ImageNet class subset clip_benchmark evaluates (``imagenet-a``, ``imagenet-r``:
    200 classes each; ``imagenet-o``), read from its builder's source: the lists live inside ``build_dataset``, so
    they are parsed (never executed, never downloaded)."""
    from clip_benchmark.datasets import builder

    variable = name.replace("-", "_") + "_wnids"
    for node in ast.walk(ast.parse(inspect.getsource(builder))):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == variable for t in node.targets):
            return tuple(sorted(ast.literal_eval(node.value)))
    raise ValueError(f"clip_benchmark names no WordNet-id subset {name!r} (looked for {variable} in its builder)")


def class_names(classes: Sequence[str]) -> list[str]:
    """Readable names for a data set's classes, in its label order, for zero-shot prompts.

    Folders named by ImageNet-1K WordNet ids (all 1000, or a subset such as ImageNet-A/-R's 200) get the OpenAI
    names of those ids, folders ``0``..``999`` (ImageNetV2) the names of those indices; any other names are kept,
    with ``_`` read as a space. A mapping by position alone would be wrong for a subset, hence the lookup by id.
    """
    classes = [str(c) for c in classes]
    if classes and all(WORDNET_ID.fullmatch(c) for c in classes):
        index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
        unknown = [c for c in classes if c not in index]
        if not unknown:
            names = imagenet_classnames()
            return [names[index[c]] for c in classes]
        warnings.warn(
            f"{len(unknown)} of {len(classes)} class folders (e.g. {unknown[0]}) are WordNet ids outside ImageNet-1K; "
            "their prompts use the ids themselves",
            stacklevel=2,
        )
    if len(classes) == 1000 and all(c.isdigit() for c in classes) and {int(c) for c in classes} == set(range(1000)):
        names = imagenet_classnames()
        return [names[int(c)] for c in classes]
    return [c.replace("_", " ") for c in classes]


# --- clip_benchmark's own data sets -------------------------------------------------------------


class BenchmarkDataset(Dataset):
    """A clip_benchmark data set in amp's form: ``(image, class index)`` with ``.classes`` and ``.templates``, or
    ``(image, list of captions)`` with ``.captions``."""

    def __init__(self, dataset: Any, name: str, classes=None, templates=None, captions=None):
        self.dataset, self.name = dataset, name
        self.classes = list(classes) if classes is not None else None
        self.templates = list(templates) if templates is not None else None
        self.captions = captions

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, target = self.dataset[index]
        if self.captions is not None or isinstance(target, (list, tuple)):
            return image, [str(c) for c in target]
        return image, int(target)


def _refuse_download(name: str, root: Path) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        command = str(args[0] if args else kwargs.get("url", ""))[:120]
        raise DataSpecError(
            f"clip_benchmark:{name}: the files under {root} are incomplete and clip_benchmark would fetch them "
            f"({command!r}); amp never downloads: put the data there in the layout of clip_benchmark's "
            "datasets/builder.py"
        )

    return refuse


@contextlib.contextmanager
def _no_downloads(name: str, root: Path) -> Iterator[None]:
    """clip_benchmark downloads with shell ``wget``/``gdown``/``kaggle`` (``builder.call``) and ImageNetV2 with
    ``requests.get`` whenever a file is missing, ``download=False`` or not: both are refused for the call."""
    from unittest import mock

    from clip_benchmark.datasets import builder, imagenetv2

    refuse = _refuse_download(name, root)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(builder, "call", refuse))
        if hasattr(imagenetv2, "requests"):
            stack.enter_context(mock.patch.object(imagenetv2.requests, "get", refuse))
        yield


def _benchmark_captions(dataset: Any) -> list[list[str]] | None:
    if isinstance(getattr(dataset, "data", None), list):  # clip_benchmark's Flickr: [(file, [captions])]
        return [list(captions) for _, captions in dataset.data]
    if hasattr(dataset, "coco") and hasattr(dataset, "ids"):  # torchvision's CocoCaptions
        return [[a["caption"] for a in dataset.coco.loadAnns(dataset.coco.getAnnIds(i))] for i in dataset.ids]
    return None


def _clip_benchmark(argument: str, transform: Callable | None) -> Dataset:
    usage = "clip_benchmark needs 'clip_benchmark:<name>:<root>[:<split>]'"
    name, _, rest = argument.partition(":")
    root, sep, split = rest.rpartition(":")
    if not sep or not split or "/" in split or "\\" in split:  # no split given (or a ':' inside the path)
        root, split = rest, "test"
    if not name or not root:
        raise DataSpecError(f"{usage}, got 'clip_benchmark:{argument}'")
    path = _existing_dir(root, f"clip_benchmark:{name}")  # a missing root is where clip_benchmark downloads
    from clip_benchmark.datasets.builder import build_dataset, get_dataset_default_task

    task = get_dataset_default_task(name)
    try:
        with _no_downloads(name, path):
            dataset = build_dataset(name, root=str(path), transform=transform, split=split, download=False, task=task)
    except DataSpecError:
        raise
    except (AssertionError, ValueError, RuntimeError, OSError, KeyError) as error:
        raise DataSpecError(f"clip_benchmark:{name}: cannot build it from {path} (split {split!r}): {error}") from None
    if task != "zeroshot_classification":
        return BenchmarkDataset(dataset, name, captions=_benchmark_captions(dataset))
    classes = list(getattr(dataset, "classes", None) or [])
    folders = getattr(dataset, "class_to_idx", None)
    if type(dataset) is ImageFolder and folders is not None and len(folders) != len(classes):
        raise DataSpecError(
            f"clip_benchmark:{name}: {path} has {len(folders)} class folders but clip_benchmark names {len(classes)} "
            "classes, so its labels would point at the wrong names; the folder must hold every class"
        )
    return BenchmarkDataset(dataset, name, classes=classes, templates=getattr(dataset, "templates", None))


register_dataset("synthetic", _synthetic)
register_dataset("folder", _folder)
register_dataset("imagefolder", _imagefolder)
register_dataset("coco", _coco)
register_dataset("flickr30k", _flickr30k)
register_dataset("clip_benchmark", _clip_benchmark)
