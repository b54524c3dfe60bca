"""Data sets by name: ``<kind>:<argument>``, e.g. ``folder:/photos``, ``imagefolder:/imagenet/val``, ``synthetic:64``.

Every data set yields ``(image, target)``: ``target`` is a class index (int), a caption (str), a list of
captions, or -1 for unlabelled images. Loaders are registered by prefix with :func:`register_dataset`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataSpecError(ValueError):
    """A data set name, path or layout that cannot be used."""


DatasetLoader = Callable[[str, Callable | None], Dataset]
DATASETS: dict[str, DatasetLoader] = {}


def register_dataset(prefix: str, loader: DatasetLoader) -> None:
    """Make ``<prefix>:<argument>`` loadable: ``loader(argument, transform) -> Dataset``."""
    DATASETS[prefix] = loader


def load_dataset(spec: str, transform: Callable | None = None) -> Dataset:
    prefix, sep, argument = spec.partition(":")
    if not sep or prefix not in DATASETS:
        raise DataSpecError(f"cannot resolve data set {spec!r}; expected one of " + ", ".join(f"'{p}:...'" for p in DATASETS))
    dataset = DATASETS[prefix](argument, transform)
    if len(dataset) == 0:
        raise DataSpecError(f"data set {spec!r} is empty")
    return dataset


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, num_workers: int = 0) -> DataLoader:
    """A loader whose order depends only on ``seed`` (criteria over a batch depend on its composition)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers, collate_fn=collate
    )


def collate(items: list[tuple[Any, Any]]) -> tuple[torch.Tensor, Any]:
    """Stack images; keep integer targets as a tensor and captions as a list."""
    images = torch.stack([image for image, _ in items])
    targets = [target for _, target in items]
    if all(isinstance(t, int) for t in targets):
        return images, torch.tensor(targets)
    return images, targets


class SyntheticImages(Dataset):
    """Seeded random images for smoke tests and speed measurements (they carry no signal)."""

    def __init__(self, count: int, size: int = 224, seed: int = 0, transform: Callable | None = None):
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
        return SyntheticImages(int(count), int(size or 224))
    except ValueError:
        raise DataSpecError(f"synthetic data needs 'synthetic:<count>[:<size>]', got 'synthetic:{argument}'") from None


class ImageFiles(Dataset):
    """Images listed in a fixed (sorted) order, with optional integer labels."""

    def __init__(self, paths: list[Path], labels: list[int] | None, transform: Callable | None, classes=None):
        self.paths, self.labels, self.transform, self.classes = paths, labels, transform, classes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            image = image.convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
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


def _imagefolder(argument: str, transform: Callable | None) -> Dataset:
    path = _existing_dir(argument, "imagefolder")
    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    if not classes:
        raise DataSpecError(f"imagefolder: {path} has no class sub-directories (expected <root>/<class>/<image>)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = _images_under(path / name)
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise DataSpecError(f"imagefolder: no images in the class directories of {path}")
    return ImageFiles(paths, labels, transform, classes=classes)


register_dataset("synthetic", _synthetic)
register_dataset("folder", _folder)
register_dataset("imagefolder", _imagefolder)
