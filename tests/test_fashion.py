"""Fashion-MNIST reading and the captioned composites (committed subset only: no network, no Debian package)."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

import amp.zoo.fashion as fashion
from amp.data import DataSpecError, load_dataset
from amp.zoo.fashion import FASHION_CLASSES, captioned_split, fashion_transform, load_fashion_mnist


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_subset_is_balanced_and_shaped():
    for split, per_class in (("train-subset", 200), ("val-subset", 50), ("test-subset", 200)):
        images, labels = load_fashion_mnist(split)
        assert images.shape == (10 * per_class, 28, 28) and images.dtype == np.uint8
        assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10


def test_fashion_mnist_dataset():
    dataset = load_dataset("fashion-mnist:test-subset", fashion_transform())
    image, label = dataset[0]
    assert image.shape == (3, 64, 64) and isinstance(label, int)
    assert dataset.classes == list(FASHION_CLASSES) and len(dataset) == 2000
    raw, _ = load_dataset("fashion-mnist:train-subset")[3]
    assert raw.mode == "RGB" and raw.size == (28, 28)


def test_amp_data_dir_reads_idx_files(tmp_path, monkeypatch):
    images, labels = load_fashion_mnist("test-subset")
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images[:50])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:50])
    monkeypatch.setenv("AMP_DATA_DIR", str(tmp_path))
    got_images, got_labels = load_fashion_mnist("test")
    assert np.array_equal(got_images, images[:50]) and np.array_equal(got_labels, labels[:50])
    with pytest.raises(DataSpecError, match=r"lacks train-images-idx3-ubyte\.gz"):
        load_fashion_mnist("train")


def test_loader_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("AMP_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(DataSpecError, match=r"AMP_DATA_DIR.*not a directory.*apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist:test")
    monkeypatch.delenv("AMP_DATA_DIR")
    monkeypatch.setattr(fashion, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setenv("AMP_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(DataSpecError, match=r"apt-get install dataset-fashion-mnist.*AMP_DATA_DIR"):
        fashion.fashion_mnist_dir("train", download=False)  # the test split ships with the repository
    with pytest.raises(DataSpecError, match="unknown split"):
        load_dataset("fashion-mnist:validation")
    with pytest.raises(DataSpecError, match="unknown split"):
        load_dataset("fmnist-captions:dev")
    with pytest.raises(DataSpecError):
        load_fashion_mnist("bogus-subset")


def test_captions_deterministic_and_seeded():
    a, b = captioned_split("test-subset"), captioned_split("test-subset")
    assert a.captions == b.captions
    for i in (0, 7, 499):
        assert np.array_equal(a.render(i), b.render(i))
    other = captioned_split("test-subset", seed=1)
    assert other.captions != a.captions
    assert any(not np.array_equal(a.render(i), other.render(i)) for i in range(5))


def test_test_captions_distinct_and_consistent():
    pairs = load_dataset("fmnist-captions:test-subset", fashion_transform())
    assert len(pairs) >= 500 and len(set(pairs.captions)) == len(pairs)
    assert len(pairs.labels) == len(pairs) and pairs.classes == list(FASHION_CLASSES)
    image, caption = pairs[5]
    assert image.shape == (3, 64, 64) and caption == pairs.captions[5]
    for caption, label in zip(pairs.captions[:200], pairs.labels[:200]):
        first = caption.split(" and ")[0]
        assert f" {FASHION_CLASSES[label]} " in f" {first} "
        assert first.split()[1] in fashion.SIZES and first.split()[2] in fashion.COLOURS
    assert len(captioned_split("val-subset").captions) == len(set(captioned_split("val-subset").captions))


def test_scenes_prefix_stable_and_rendered():
    short, long = captioned_split("train-subset", count=1500), captioned_split("train-subset", count=3000)
    assert long.captions[:1500] == short.captions
    assert np.array_equal(long.render(1499), short.render(1499))
    image = short.render(0)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and image.max() > 0
    counts = np.bincount(short.n_items, minlength=3)
    assert counts[1] > 300 and counts[2] > 600  # one- and two-item scenes both occur


def test_training_tensors_match_eval_transform():
    from amp.zoo.fashion import to_pil
    from amp.zoo.train_tiny_clip import _to_tensor, full_frame

    transform = fashion_transform()
    pairs = captioned_split("test-subset")
    scene = pairs.render(3)
    assert torch.equal(_to_tensor(scene[None])[0], transform(to_pil(scene)))
    item = load_fashion_mnist("test-subset")[0][10]
    assert torch.allclose(_to_tensor(full_frame(item)[None])[0], transform(to_pil(item)), atol=1e-6)


def test_full_test_set_ships_with_the_repository(monkeypatch, tmp_path):
    monkeypatch.delenv("AMP_DATA_DIR", raising=False)
    monkeypatch.setattr(fashion, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setattr(fashion, "cache_dir", lambda: tmp_path / "no-cache")
    images, labels = load_fashion_mnist("test", download=False)
    assert images.shape == (10_000, 28, 28) and np.bincount(labels).tolist() == [1_000] * 10


def test_near_miss_groups_differ_in_one_attribute():
    data = fashion.near_miss_split()
    assert len(data) == 1_000 and len(set(data.captions)) == 1_000  # one right answer per query
    assert data.captions == fashion.near_miss_split().captions  # deterministic
    group = fashion.NearMissFashion.GROUP

    def attributes(i: int) -> list:
        items = [(int(data.colour[i, k]), int(data.size[i, k]), int(data.item_labels[data.item[i, k]])) for k in (0, 1)]
        return [*items, data.position[i]]

    for first in range(0, len(data), group):
        assert all(data.n_items[i] == 2 for i in range(first, first + group))
        base = attributes(first)
        for i in range(first + 1, first + group):
            other = attributes(i)
            changed = sum(a != b for x, y in zip(other[:2], base[:2]) for a, b in zip(x, y))
            same_places, swapped = other[2] == base[2], other[2] == base[2][::-1]
            # one attribute of one item, or the places swapped (with a colour change when both phrases were equal)
            assert (same_places and changed == 1) or (swapped and changed <= 1), data.captions[i]
