"""Fashion-MNIST and a captioned, compositional version of it (the project's offline image-text data).

Data sets (registered with :func:`amp.data.register_dataset` when this module is imported):

``fashion-mnist:<train|test|train-subset|test-subset>``
    The 28×28 grey Fashion-MNIST images as PIL RGB, target = class index; ``.classes`` = :data:`FASHION_CLASSES`.

``fmnist-captions:<train|val|test>[-subset]``
    64×64 RGB composites with one English caption each, target = the caption (str); ``.captions`` (all captions),
    ``.labels`` (class index of the first-mentioned item, for zero-shot use) and ``.classes``.

``fmnist-captions:test-hard``
    1,000 test composites in groups of eight near misses (:class:`NearMissFashion`): retrieval that R@5 does not
    saturate.

Where the Fashion-MNIST files come from (:func:`load_fashion_mnist`), first match wins:

1. ``$AMP_DATA_DIR``: a directory with the four IDX files (``train-images-idx3-ubyte[.gz]``,
   ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``);
2. ``data/fashion-mnist/`` in the repository, which holds the full test set (10,000 images, 4.4 MB), so
   ``fashion-mnist:test`` and the captioned ``test`` splits need no install;
3. ``/usr/share/datasets/fashion-mnist/`` (Debian/Ubuntu: ``apt-get install dataset-fashion-mnist``);
4. ``~/.cache/amp/fashion-mnist`` (or ``$AMP_CACHE_DIR/fashion-mnist``), filled by torchvision's
   ``FashionMNIST(download=True)`` where there is internet.

The ``*-subset`` splits need none of these: they read ``data/fashion-mnist/fashion-mnist-subset.npz`` in the repository
(2,000 train, 500 validation and 2,000 test images, 200/50/200 per class, chosen by a fixed seed; see
``data/fashion-mnist/README.md``).

Caption generator
-----------------
Every composite is a black 64×64 canvas holding one item (probability :data:`P_SINGLE`) or two items. Each item is a
Fashion-MNIST image resized (PIL bilinear) to ``small`` (20 px) or ``large`` (32 px), multiplied by a colour from
:data:`COLOURS` (its grey level becomes the colour's brightness; ``white`` leaves it grey) and placed with its centre
at a position, jittered by up to ±3 px and clipped to the canvas; overlapping pixels take the maximum.
One item goes ``on the left``, ``on the right``, ``at the top``, ``at the bottom`` or ``in the centre``; two items are
side by side (left and right) or stacked (top and bottom), mentioned in random order. Captions read::

    a large red sneaker on the left and a small blue bag on the right
    a small white ankle boot in the centre

Scene ``i`` is drawn with ``numpy.random.default_rng([seed, split id, i // 1024])``, so the same ``(split, seed)``
always gives the same images and captions, a different seed gives different ones, and a longer run of a split extends
a shorter one (``train`` has 55,000 scenes by default; the training script reads further along the same stream).
``train`` and ``val`` use disjoint parts of the Fashion-MNIST training set (images 0–54,999 and 55,000–59,999) and
``test`` uses the Fashion-MNIST test set, so test items are never seen in training. ``val`` and ``test`` captions are
all distinct (a scene whose caption was already drawn is redrawn), so image-text retrieval over them has exactly one
right answer: ``test`` holds 1,000 pairs
(``test-subset`` 500, ``val`` 1,000, ``val-subset`` 250). There are 800 one-item and 102,400 two-item captions.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from amp.data import DataSpecError, register_dataset

FASHION_CLASSES: tuple[str, ...] = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
# Class prompts for zero-shot classification (``{c}`` = class name; the tiny CLIP is trained on their average).
FASHION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a picture of a {c}.",
    "a black and white photo of a {c}.",
    "a {c}.",
)

COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "red": (255, 40, 40),
    "green": (40, 210, 40),
    "blue": (50, 90, 255),
    "yellow": (255, 230, 30),
    "purple": (170, 60, 230),
    "orange": (255, 140, 20),
    "cyan": (30, 220, 230),
}
SIZES: dict[str, int] = {"small": 20, "large": 32}
CANVAS = 64
JITTER = 3
P_SINGLE = 0.35
POSITIONS: dict[str, tuple[int, int]] = {  # (x, y) of the item centre
    "left": (16, 32),
    "right": (48, 32),
    "top": (32, 16),
    "bottom": (32, 48),
    "centre": (32, 32),
}
_POSITION_NAMES = tuple(POSITIONS)
_WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
_LAYOUTS = (("left", "right"), ("top", "bottom"))
_COLOUR_NAMES = tuple(COLOURS)
_COLOUR_RGB = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float32) / 255.0
_SIZE_NAMES = tuple(SIZES)

# Normalisation of the tiny CLIP (and of :func:`fashion_transform`): maps [0, 1] to [-1, 1].
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def shipped_dir(name: str) -> Path:
    """``<repo>/data/<name>`` in a checkout, else the copy a wheel installs as ``amp/_data/<name>`` (pyproject.toml)."""
    package = Path(__file__).resolve().parents[1]
    checkout = package.parent / "data" / name
    return checkout if checkout.is_dir() else package / "_data" / name


COMMITTED_DIR = shipped_dir("fashion-mnist")  # the subset and the full test set
SUBSET_FILE = COMMITTED_DIR / "fashion-mnist-subset.npz"
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
VAL_START = 55_000  # Fashion-MNIST training images from here on form the captioned ``val`` split
HOW_TO_GET = (
    "Fashion-MNIST not found. Install it with `apt-get install dataset-fashion-mnist` "
    f"(files land in {DEBIAN_DIR}), or set AMP_DATA_DIR to a directory holding "
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz "
    "(https://github.com/zalandoresearch/fashion-mnist), or use the splits 'train-subset'/'test-subset' that ship "
    "with amp."
)


# --- reading the files ----------------------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array (uint8 data only, as Fashion-MNIST has)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise DataSpecError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise DataSpecError(f"{path}: truncated IDX file ({array.size} bytes for shape {shape})")
    return array.reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _has_split(directory: Path, split: str) -> bool:
    return all(_find(directory, stem) is not None for stem in IDX_FILES[split])


def cache_dir() -> Path:
    return Path(os.environ.get("AMP_CACHE_DIR", Path.home() / ".cache" / "amp")).expanduser() / "fashion-mnist"


def _download(split: str) -> Path | None:
    """torchvision's download into the cache (needs internet); None when it fails."""
    target = cache_dir()
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(target), train=split == "train", download=True)
    except Exception:  # no internet, no torchvision: the caller explains what to do
        return None
    raw = target / "FashionMNIST" / "raw"
    return raw if _has_split(raw, split) else None


def fashion_mnist_dir(split: str = "test", download: bool = True) -> Path:
    """The directory holding the IDX files of ``split`` (see the module docstring for the search order)."""
    if split not in IDX_FILES:
        raise DataSpecError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    env = os.environ.get("AMP_DATA_DIR")
    if env:
        directory = Path(env).expanduser()
        if not directory.is_dir():
            raise DataSpecError(f"AMP_DATA_DIR={env!r} is not a directory. {HOW_TO_GET}")
        if not _has_split(directory, split):
            missing = [s + ".gz" for s in IDX_FILES[split] if _find(directory, s) is None]
            raise DataSpecError(f"AMP_DATA_DIR={env!r} lacks {', '.join(missing)}. {HOW_TO_GET}")
        return directory
    for directory in (COMMITTED_DIR, DEBIAN_DIR, cache_dir(), cache_dir() / "FashionMNIST" / "raw"):
        if directory.is_dir() and _has_split(directory, split):
            return directory
    if download:
        found = _download(split)
        if found is not None:
            return found
    raise DataSpecError(HOW_TO_GET)


@lru_cache(maxsize=4)
def _load_files(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images), read_idx(labels).astype(np.int64)
    if x.ndim != 3 or y.shape != (x.shape[0],):
        raise DataSpecError(f"{images} and {labels} do not hold matching images and labels")
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@lru_cache(maxsize=1)
def _load_subset() -> dict[str, np.ndarray]:
    if not SUBSET_FILE.is_file():
        raise DataSpecError(f"the committed Fashion-MNIST subset is missing: {SUBSET_FILE}")
    with np.load(SUBSET_FILE) as data:
        arrays = {key: data[key] for key in data.files}
    for array in arrays.values():
        array.setflags(write=False)
    return arrays


def load_fashion_mnist(split: str, download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels int64 [N])`` of ``train``, ``test``, ``train-subset``, ``val-subset``
    or ``test-subset`` (the subsets are the committed files and need no install)."""
    if split.endswith("-subset"):
        part = split.removesuffix("-subset")
        if part not in ("train", "val", "test"):
            raise DataSpecError(f"unknown Fashion-MNIST subset {split!r}; use train-subset, val-subset or test-subset")
        subset = _load_subset()
        return subset[f"{part}_images"], subset[f"{part}_labels"]
    directory = fashion_mnist_dir(split, download=download)
    images, labels = (_find(directory, stem) for stem in IDX_FILES[split])
    return _load_files(images, labels)


SUBSET_SEED = 20240601
SUBSET_PER_CLASS = {"train": 200, "val": 50, "test": 200}


def make_subset(path: str | Path = SUBSET_FILE, seed: int = SUBSET_SEED) -> Path:
    """Rebuild the committed subset from the full data set (``amp.zoo.fashion.make_subset()``).

    Per class: 200 train images (from images 0–54,999), 50 validation images (55,000–59,999) and 200 test images,
    drawn without replacement by ``numpy.random.default_rng(seed)``, kept in file order; their indices are stored too.
    """
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    rng = np.random.default_rng(seed)
    pools = {
        "train": (train_x, train_y, 0, VAL_START),
        "val": (train_x, train_y, VAL_START, len(train_y)),
        "test": (test_x, test_y, 0, len(test_y)),
    }
    arrays = {}
    for part, (x, y, start, stop) in pools.items():
        chosen = [
            start + np.sort(rng.choice(np.flatnonzero(y[start:stop] == c), SUBSET_PER_CLASS[part], replace=False))
            for c in range(len(FASHION_CLASSES))
        ]
        index = np.sort(np.concatenate(chosen))
        arrays.update(
            {f"{part}_images": x[index], f"{part}_labels": y[index], f"{part}_indices": index.astype(np.int32)}
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


# --- transforms ---------------------------------------------------------------------------------


def fashion_transform(size: int = CANVAS) -> Callable:
    """PIL image → normalised tensor at ``size`` px: the tiny CLIP's eval transform (grey 28 px items are
    upscaled bicubically to fill the frame; 64 px composites pass through unchanged)."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Lambda(_to_rgb),
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )


def _to_rgb(image):
    return image.convert("RGB") if image.mode != "RGB" else image


def to_pil(array: np.ndarray):
    from PIL import Image

    if array.ndim == 2:
        return Image.fromarray(array, "L").convert("RGB")
    return Image.fromarray(array, "RGB")


# --- plain Fashion-MNIST --------------------------------------------------------------------------


class FashionMNIST(Dataset):
    """Fashion-MNIST images as PIL RGB (through ``transform``) with their class index."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable | None = None):
        self.images, self.labels, self.transform = images, labels, transform
        self.classes = list(FASHION_CLASSES)
        self.templates = list(FASHION_TEMPLATES)  # the prompts the tiny CLIP was trained with

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        image = to_pil(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def _fashion_mnist(argument: str, transform: Callable | None) -> Dataset:
    splits = ("train", "test", "train-subset", "test-subset")
    if argument not in splits:
        raise DataSpecError(f"unknown split 'fashion-mnist:{argument}'; use one of " + ", ".join(splits))
    return FashionMNIST(*load_fashion_mnist(argument), transform=transform)


# --- captioned composites --------------------------------------------------------------------------

CHUNK = 1024  # scenes are drawn in chunks of this many, each from its own seeded generator
SPLIT_IDS = {"train": 1, "val": 2, "test": 3}
DEFAULT_COUNTS = {"train": 55_000, "val": 1_000, "test": 1_000}
SUBSET_COUNTS = {"train": 2_000, "val": 250, "test": 500}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(size: int, colour: int, label: int, position: str) -> str:
    where = _WHERE[position]
    first = _SIZE_NAMES[size]
    return f"{_article(first)} {first} {_COLOUR_NAMES[colour]} {FASHION_CLASSES[label]} {where}"


class CaptionedFashion(Dataset):
    """Seeded composites of Fashion-MNIST items with captions (see the module docstring).

    ``items``/``item_labels`` are the pool of 28×28 images the scenes draw from. Scene ``i`` holds ``n_items[i]``
    items: pool index ``item[i, k]``, colour ``colour[i, k]``, size ``size[i, k]``, position name ``position[i][k]``
    and jitter ``jitter[i, k]`` (dx, dy).
    """

    def __init__(
        self,
        items: np.ndarray,
        item_labels: np.ndarray,
        count: int,
        seed: int = 0,
        split_id: int = 0,
        distinct: bool = False,
        transform: Callable | None = None,
    ):
        if len(items) == 0 or count <= 0:
            raise DataSpecError("a captioned data set needs items and a positive count")
        if distinct and count > 50_000:  # there are ~100k distinct captions
            raise DataSpecError("distinct captions are supported for up to 50,000 scenes")
        self.items, self.item_labels, self.transform = items, item_labels, transform
        self.classes = list(FASHION_CLASSES)
        self.templates = list(FASHION_TEMPLATES)  # the prompts the tiny CLIP was trained with
        self.seed, self.split_id, self.distinct = seed, split_id, distinct
        total = -(-count // CHUNK) * CHUNK
        self.n_items = np.empty(total, np.int64)
        self.item = np.zeros((total, 2), np.int64)
        self.colour = np.zeros((total, 2), np.int64)
        self.size = np.zeros((total, 2), np.int64)
        self.jitter = np.zeros((total, 2, 2), np.int64)
        self.position: list[tuple[str, ...]] = [()] * total
        self.captions: list[str] = [""] * total
        for chunk in range(total // CHUNK):  # scene i depends on (seed, split_id, i // CHUNK) only: prefix-stable
            rng = np.random.default_rng([seed, split_id, chunk])
            self._draw(rng, np.arange(chunk * CHUNK, (chunk + 1) * CHUNK))
        for name in ("n_items", "item", "colour", "size", "jitter", "position", "captions"):
            setattr(self, name, getattr(self, name)[:count])
        if distinct:
            rng = np.random.default_rng([seed, split_id, 1 << 31])
            seen: set[str] = set()
            for i in range(count):
                while self.captions[i] in seen:
                    self._draw(rng, np.array([i]))
                seen.add(self.captions[i])
        self.labels = [int(item_labels[self.item[i, 0]]) for i in range(count)]

    def _draw(self, rng: np.random.Generator, rows: np.ndarray) -> None:
        n = len(rows)
        single = rng.random(n) < P_SINGLE
        where = rng.integers(0, len(_POSITION_NAMES), n)
        layout = rng.integers(0, len(_LAYOUTS), n)
        swap = rng.random(n) < 0.5
        self.item[rows] = rng.integers(0, len(self.items), (n, 2))
        self.colour[rows] = rng.integers(0, len(_COLOUR_NAMES), (n, 2))
        self.size[rows] = rng.integers(0, len(_SIZE_NAMES), (n, 2))
        self.jitter[rows] = rng.integers(-JITTER, JITTER + 1, (n, 2, 2))
        self.n_items[rows] = np.where(single, 1, 2)
        labels = self.item_labels[self.item[rows]].tolist()
        sizes, colours = self.size[rows].tolist(), self.colour[rows].tolist()
        for k, i in enumerate(rows.tolist()):
            if single[k]:
                positions: tuple[str, ...] = (_POSITION_NAMES[where[k]],)
            else:
                positions = _LAYOUTS[layout[k]][::-1] if swap[k] else _LAYOUTS[layout[k]]
            self.position[i] = positions
            self.captions[i] = " and ".join(
                _phrase(sizes[k][j], colours[k][j], labels[k][j], positions[j]) for j in range(len(positions))
            )

    def __len__(self) -> int:
        return len(self.captions)

    def render(self, index: int) -> np.ndarray:
        """Scene ``index`` as a uint8 array [64, 64, 3]."""
        from PIL import Image

        canvas = np.zeros((CANVAS, CANVAS, 3), np.float32)
        for k in range(self.n_items[index]):
            side = SIZES[_SIZE_NAMES[self.size[index, k]]]
            grey = Image.fromarray(self.items[self.item[index, k]], "L").resize((side, side), Image.BILINEAR)
            tinted = (np.asarray(grey, np.float32) / 255.0)[:, :, None] * _COLOUR_RGB[self.colour[index, k]]
            cx, cy = POSITIONS[self.position[index][k]]
            x0 = cx - side // 2 + int(self.jitter[index, k, 0])
            y0 = cy - side // 2 + int(self.jitter[index, k, 1])
            x0, y0 = min(max(x0, 0), CANVAS - side), min(max(y0, 0), CANVAS - side)
            region = canvas[y0 : y0 + side, x0 : x0 + side]
            np.maximum(region, tinted, out=region)
        return np.round(canvas * 255.0).astype(np.uint8)

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        image = to_pil(self.render(index))
        if self.transform is not None:
            image = self.transform(image)
        return image, self.captions[index]


class NearMissFashion(CaptionedFashion):
    """Groups of :data:`GROUP` two-item scenes: the first is drawn as usual, each other one changes exactly one
    attribute of one of its items (colour, size, garment, or the two items swap places).

    Every caption then has near misses that differ from it in a single word or in word order, so retrieval must read
    every attribute (on the plain split, captions are all distinct but usually differ in several attributes, and R@5
    and R@10 saturate at 1.0 for every model we prune).
    """

    GROUP = 8
    CHANGES = ("colour", "size", "item", "swap")

    def _draw(self, rng: np.random.Generator, rows: np.ndarray) -> None:
        super()._draw(rng, rows)  # CHUNK is a multiple of GROUP, so each call draws whole groups
        for first in rows[:: self.GROUP].tolist():
            self.n_items[first] = 2
            self.position[first] = _LAYOUTS[int(rng.integers(len(_LAYOUTS)))]
            offset = int(rng.integers(len(self.CHANGES)))  # each near miss of a group changes something else
            for i in range(first + 1, first + self.GROUP):
                self._copy_scene(first, i)
                self._change(rng, i, self.CHANGES[(i - first - 1 + offset) % len(self.CHANGES)])
            for i in range(first, first + self.GROUP):
                self.captions[i] = self._caption(i)

    def _copy_scene(self, source: int, target: int) -> None:
        for name in ("n_items", "item", "colour", "size", "jitter"):
            getattr(self, name)[target] = getattr(self, name)[source]
        self.position[target] = self.position[source]

    def _change(self, rng: np.random.Generator, i: int, change: str) -> None:
        k = int(rng.integers(2))  # which item changes
        if change == "colour":
            self.colour[i, k] = (self.colour[i, k] + rng.integers(1, len(_COLOUR_NAMES))) % len(_COLOUR_NAMES)
        elif change == "size":
            self.size[i, k] = 1 - self.size[i, k]
        elif change == "item":  # another garment class, so the caption changes
            label = self.item_labels[self.item[i, k]]
            others = np.flatnonzero(self.item_labels != label)
            self.item[i, k] = others[int(rng.integers(len(others)))]
        else:
            self.position[i] = self.position[i][::-1]
        if change == "swap" and self._caption(i) == self._caption(i - 1):  # two identical phrases: change colour
            self._change(rng, i, "colour")

    def make_distinct(self, seed: int) -> None:
        """Redraw whole groups until no caption repeats one drawn before (one right answer per query)."""
        rng = np.random.default_rng([seed, self.split_id, 1 << 31])
        seen: set[str] = set()
        for first in range(0, len(self), self.GROUP):
            group = np.arange(first, min(first + self.GROUP, len(self)))
            while len({self.captions[i] for i in group} | seen) < len(seen) + len(group):
                self._draw(rng, group)
            seen.update(self.captions[i] for i in group)
        self.labels = [int(self.item_labels[self.item[i, 0]]) for i in range(len(self))]

    def _caption(self, i: int) -> str:
        return " and ".join(
            _phrase(int(self.size[i, j]), int(self.colour[i, j]), int(self.item_labels[self.item[i, j]]), where)
            for j, where in enumerate(self.position[i])
        )


def near_miss_split(transform: Callable | None = None, seed: int = 0, count: int = 1_000) -> NearMissFashion:
    """``fmnist-captions:test-hard``: 1,000 image-caption pairs from the Fashion-MNIST test set in near-miss groups."""
    images, labels = load_fashion_mnist("test")
    dataset = NearMissFashion(images, labels, count, seed=seed, split_id=SPLIT_IDS["test"] + 20, transform=transform)
    dataset.make_distinct(seed)
    return dataset


def captioned_split(
    split: str, transform: Callable | None = None, seed: int = 0, count: int | None = None
) -> CaptionedFashion:
    """``train``, ``val`` or ``test`` (full Fashion-MNIST) or the same with ``-subset`` (committed subset)."""
    part, subset = split.removesuffix("-subset"), split.endswith("-subset")
    if part not in SPLIT_IDS:
        raise DataSpecError(f"unknown split 'fmnist-captions:{split}'; use train, val or test, optionally with -subset")
    if subset:
        images, labels = load_fashion_mnist(f"{part}-subset")
    else:
        images, labels = load_fashion_mnist("test" if part == "test" else "train")
        if part == "train":
            images, labels = images[:VAL_START], labels[:VAL_START]
        elif part == "val":
            images, labels = images[VAL_START:], labels[VAL_START:]
    if count is None:
        count = (SUBSET_COUNTS if subset else DEFAULT_COUNTS)[part]
    split_id = SPLIT_IDS[part] + (10 if subset else 0)
    return CaptionedFashion(
        images, labels, count, seed=seed, split_id=split_id, distinct=part != "train", transform=transform
    )


def _fmnist_captions(argument: str, transform: Callable | None) -> Dataset:
    if argument == "test-hard":
        return near_miss_split(transform)
    return captioned_split(argument, transform)


register_dataset("fashion-mnist", _fashion_mnist)
register_dataset("fmnist-captions", _fmnist_captions)
