"""Data set loaders: synthetic, folder, imagefolder, coco and flickr30k (Karpathy JSON), on tiny generated files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from amp.data import (
    DataSpecError,
    SyntheticImages,
    collate,
    load_dataset,
    make_loader,
    register_dataset,
)


def _image(path: Path, color=(255, 0, 0), size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return (
        torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        .reshape(image.height, image.width, 3)
        .permute(2, 0, 1)
        / 255
    )


def _karpathy(root: Path, name: str, entries: list[tuple[str | None, str, str, list[str]]]) -> Path:
    images = []
    for filepath, filename, split, captions in entries:
        item = {"filename": filename, "split": split, "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}
        if filepath is not None:
            item["filepath"] = filepath
        images.append(item)
    path = root / name
    path.write_text(json.dumps({"images": images, "dataset": name.split("_")[1].split(".")[0]}))
    return path


# --- synthetic / folder / imagefolder ---------------------------------------------------------


def test_synthetic_is_seeded_and_sized():
    data = load_dataset("synthetic:3:16")
    assert isinstance(data, SyntheticImages) and len(data) == 3
    image, target = data[1]
    assert image.shape == (3, 16, 16) and target == -1
    assert torch.equal(image, load_dataset("synthetic:3:16")[1][0])
    assert not torch.equal(data[0][0], data[1][0])
    with pytest.raises(IndexError):
        data[3]
    assert load_dataset("synthetic:2")[0][0].shape == (3, 224, 224)


@pytest.mark.parametrize("spec", ["synthetic:x", "synthetic:", "synthetic:4:0", "synthetic:-1"])
def test_synthetic_bad_spec(spec):
    with pytest.raises(DataSpecError, match="synthetic"):
        load_dataset(spec)


def test_unknown_kind_and_empty():
    with pytest.raises(DataSpecError, match="cannot resolve"):
        load_dataset("nope:/x")
    with pytest.raises(DataSpecError, match="cannot resolve"):
        load_dataset("no-colon")
    with pytest.raises(DataSpecError, match="empty"):
        load_dataset("synthetic:0")


def test_folder_and_imagefolder(tmp_path):
    _image(tmp_path / "cat" / "a.png", (255, 0, 0))
    _image(tmp_path / "cat" / "b.JPG", (0, 255, 0))
    _image(tmp_path / "dog" / "sub" / "c.png", (0, 0, 255))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()

    folder = load_dataset(f"folder:{tmp_path}", transform=_to_tensor)
    assert len(folder) == 3 and all(folder[i][1] == -1 for i in range(3))

    classes = load_dataset(f"imagefolder:{tmp_path}", transform=_to_tensor)
    assert classes.classes == ["cat", "dog", "empty"]
    assert [classes[i][1] for i in range(3)] == [0, 0, 1]
    image, _ = classes[2]
    assert image.shape == (3, 6, 8) and image[2].mean() == 1.0  # blue

    images, targets = next(iter(make_loader(classes, batch_size=3)))
    assert images.shape == (3, 3, 6, 8) and targets.tolist() == [0, 0, 1]


def test_folder_errors(tmp_path):
    with pytest.raises(DataSpecError, match="directory not found"):
        load_dataset(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(DataSpecError, match="no images"):
        load_dataset(f"folder:{tmp_path}")
    with pytest.raises(DataSpecError, match="class sub-directories"):
        load_dataset(f"imagefolder:{tmp_path}")
    (tmp_path / "a").mkdir()
    with pytest.raises(DataSpecError, match="no images in the class directories"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_make_loader_order_depends_on_seed():
    data = SyntheticImages(16, 4)

    def order(seed):
        return torch.cat([x[:, 0, 0, 0] for x, _ in make_loader(data, 4, shuffle=True, seed=seed)])

    assert torch.equal(order(1), order(1))
    assert not torch.equal(order(1), order(2))


def test_collate_keeps_captions_as_lists():
    x = torch.zeros(3, 2, 2)
    images, targets = collate([(x, ["a", "b"]), (x, ["c"])])
    assert images.shape == (2, 3, 2, 2) and targets == [["a", "b"], ["c"]]
    _, targets = collate([(x, "a"), (x, "b")])
    assert targets == ["a", "b"]


def test_register_dataset():
    register_dataset("tiny-test", lambda argument, transform: SyntheticImages(int(argument), 4))
    assert len(load_dataset("tiny-test:2")) == 2


# --- coco / flickr30k ---------------------------------------------------------------------------


def test_coco_karpathy(tmp_path):
    _image(tmp_path / "val2014" / "v1.jpg", (255, 0, 0))
    _image(tmp_path / "val2014" / "v2.jpg", (0, 255, 0))
    _image(tmp_path / "train2014" / "t1.jpg", (0, 0, 255))
    _image(tmp_path / "val2014" / "r1.jpg")
    _karpathy(
        tmp_path,
        "dataset_coco.json",
        [
            ("val2014", "v1.jpg", "test", ["a red square.", "red."]),
            ("train2014", "t1.jpg", "train", ["blue."]),
            ("val2014", "v2.jpg", "test", ["a green square."]),
            ("val2014", "r1.jpg", "restval", ["rest."]),
        ],
    )
    test = load_dataset(f"coco:{tmp_path}", transform=_to_tensor)
    assert len(test) == 2
    assert test.captions == [["a red square.", "red."], ["a green square."]]
    image, captions = test[1]
    assert captions == ["a green square."] and image[1].mean() == 1.0

    images, targets = next(iter(make_loader(test, batch_size=2)))
    assert images.shape == (2, 3, 6, 8) and targets == test.captions

    train = load_dataset(f"coco:{tmp_path}:train")
    assert train.captions == [["blue."]] and isinstance(train[0][0], Image.Image)
    assert len(load_dataset(f"coco:{tmp_path}:train+restval")) == 2


def test_coco_json_in_annotations_and_images_dir(tmp_path):
    (tmp_path / "annotations").mkdir()
    _image(tmp_path / "images" / "val2014" / "v1.jpg")
    _karpathy(tmp_path / "annotations", "dataset_coco.json", [("val2014", "v1.jpg", "test", ["x"])])
    assert load_dataset(f"coco:{tmp_path}:test").captions == [["x"]]


def test_coco_errors(tmp_path):
    with pytest.raises(DataSpecError, match="directory not found"):
        load_dataset(f"coco:{tmp_path / 'missing'}")
    with pytest.raises(DataSpecError, match=r"dataset_coco\.json"):
        load_dataset(f"coco:{tmp_path}")

    path = tmp_path / "dataset_coco.json"
    path.write_text("{not json")
    with pytest.raises(DataSpecError, match="not valid JSON"):
        load_dataset(f"coco:{tmp_path}")
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(DataSpecError, match="no 'images' list"):
        load_dataset(f"coco:{tmp_path}")
    path.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "test", "sentences": ["raw text"]}]}))
    with pytest.raises(DataSpecError, match=r"images\[0\]"):
        load_dataset(f"coco:{tmp_path}")

    _karpathy(
        tmp_path, "dataset_coco.json", [("val2014", "v1.jpg", "test", ["x"]), ("val2014", "v2.jpg", "test", ["y"])]
    )
    with pytest.raises(DataSpecError, match=r"available: \['test'\]"):
        load_dataset(f"coco:{tmp_path}:val")
    with pytest.raises(DataSpecError, match="not found under"):  # no image directory at all
        load_dataset(f"coco:{tmp_path}")
    _image(tmp_path / "val2014" / "v1.jpg")
    with pytest.raises(DataSpecError, match="1 of 2 images are missing"):
        load_dataset(f"coco:{tmp_path}")


def test_flickr30k_karpathy(tmp_path):
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        _image(tmp_path / "flickr30k-images" / name)
    _karpathy(
        tmp_path,
        "dataset_flickr30k.json",
        [
            (None, "1.jpg", "test", ["one", "uno"]),
            (None, "2.jpg", "train", ["two"]),
            (None, "3.jpg", "test", ["three"]),
        ],
    )
    test = load_dataset(f"flickr30k:{tmp_path}")
    assert test.captions == [["one", "uno"], ["three"]]
    assert test[0][1] == ["one", "uno"]
    assert load_dataset(f"flickr30k:{tmp_path}:train").captions == [["two"]]


def test_flickr30k_images_dir_and_errors(tmp_path):
    _karpathy(tmp_path, "dataset_flickr30k.json", [(None, "1.jpg", "test", ["one"]), (None, "2.jpg", "val", [])])
    with pytest.raises(DataSpecError, match="flickr30k-images"):
        load_dataset(f"flickr30k:{tmp_path}")
    _image(tmp_path / "images" / "1.jpg")
    _image(tmp_path / "images" / "2.jpg")
    assert load_dataset(f"flickr30k:{tmp_path}").captions == [["one"]]
    with pytest.raises(DataSpecError, match="no captions"):
        load_dataset(f"flickr30k:{tmp_path}:val")
    with pytest.raises(DataSpecError, match=r"dataset_flickr30k\.json"):
        load_dataset(f"flickr30k:{tmp_path / 'images'}")


# --- ImageNet class names and clip_benchmark's own data sets ------------------------------------


def test_class_names_look_wordnet_ids_up_by_id():
    from amp.data import class_names, imagenet_subset_wnids

    # independent facts: ImageNet-1K classes 0 and 1 are n01440764 tench and n01443537 goldfish
    assert class_names(["n01443537", "n01440764"]) == ["goldfish", "tench"]
    subset = imagenet_subset_wnids("imagenet-r")
    assert len(subset) == 200 and len(imagenet_subset_wnids("imagenet-a")) == 200 and list(subset) == sorted(subset)
    assert class_names([str(i) for i in range(1000)])[:2] == ["tench", "goldfish"]  # ImageNetV2's index folders
    assert class_names(["ankle_boot", "3"]) == ["ankle boot", "3"]  # other names: kept, '_' read as a space
    with pytest.warns(UserWarning, match="outside ImageNet-1K"):
        assert class_names(["n99999999"]) == ["n99999999"]
    with pytest.raises(ValueError, match="no WordNet-id subset"):
        imagenet_subset_wnids("imagenet-z")


def _imagenet_r(root: Path, wnids) -> Path:
    for i, wnid in enumerate(wnids):
        _image(root / wnid / f"{i}.png", (i % 256, 0, 0), size=(4, 4))
    return root


def test_clip_benchmark_imagenet_r_from_a_local_folder(tmp_path):
    from amp.data import BenchmarkDataset, class_names, imagenet_subset_wnids

    wnids = imagenet_subset_wnids("imagenet-r")
    root = _imagenet_r(tmp_path / "imagenet-r", wnids)
    data = load_dataset(f"clip_benchmark:imagenet-r:{root}", transform=_to_tensor)
    assert isinstance(data, BenchmarkDataset) and len(data) == 200 and len(data.classes) == 200
    assert len(data.templates) == 80  # the OpenAI ImageNet templates
    # clip_benchmark masks its 1000 names by position; amp's imagefolder looks each folder's id up: the same names
    assert data.classes == class_names(wnids)
    image, label = data[5]
    assert isinstance(label, int) and label == 5 and image.shape == (3, 4, 4) and image[0, 0, 0] == 5 / 255
    plain = load_dataset(f"imagefolder:{root}")
    assert class_names(plain.classes) == data.classes and plain.samples[5][1] == 5
    _, targets = next(iter(make_loader(data, batch_size=4)))
    assert targets.tolist() == [0, 1, 2, 3]


def test_clip_benchmark_refuses_an_incomplete_subset_and_never_downloads(tmp_path):
    from amp.data import imagenet_subset_wnids

    root = _imagenet_r(tmp_path / "imagenet-r", imagenet_subset_wnids("imagenet-r")[:3])
    with pytest.raises(DataSpecError, match="3 class folders but clip_benchmark names 200"):
        load_dataset(f"clip_benchmark:imagenet-r:{root}")
    with pytest.raises(DataSpecError, match="directory not found"):  # a missing root is where it would download
        load_dataset(f"clip_benchmark:imagenet-a:{tmp_path / 'missing'}")
    (tmp_path / "v2").mkdir()
    with pytest.raises(DataSpecError, match="amp never downloads"):  # ImageNetV2 fetches whatever is missing
        load_dataset(f"clip_benchmark:imagenetv2:{tmp_path / 'v2'}")
    with pytest.raises(DataSpecError, match="needs 'clip_benchmark:<name>:<root>"):
        load_dataset("clip_benchmark:imagenet-r")
    with pytest.raises(DataSpecError, match="Only `test` split"):
        load_dataset(f"clip_benchmark:imagenet-r:{root}:train")


def test_clip_benchmark_flickr30k_captions(tmp_path):
    root = tmp_path / "flickr"
    _image(root / "1.jpg", (255, 0, 0))
    _image(root / "2.jpg", (0, 255, 0))
    lines = ["image,caption", "1.jpg,a red square", "1.jpg,red, and square", "2.jpg,a green square"]
    (root / "flickr30k_test_karpathy.txt").write_text("\n".join(lines) + "\n")
    data = load_dataset(f"clip_benchmark:flickr30k:{root}:test", transform=_to_tensor)
    assert len(data) == 2 and data.classes is None
    assert data.captions == [["a red square", "red, and square"], ["a green square"]]
    image, captions = data[1]
    assert captions == ["a green square"] and image[1].mean() == 1.0
    _, targets = next(iter(make_loader(data, batch_size=2)))
    assert targets == data.captions
    with pytest.raises(DataSpecError, match="amp never downloads"):  # no annotation file for this split
        load_dataset(f"clip_benchmark:flickr30k:{root}:val")
