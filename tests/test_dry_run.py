"""The paper profile's rehearsal: stand-in models, generated data in the real layouts, clamped sizes, early refusal."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

import amp
from amp import dry_run as rehearsal
from amp import reproduce as runner
from amp.data import load_dataset
from amp.models import ModelSpecError
from amp.zoo import standins


def _timm_list(name: str) -> set[str]:
    return set(resources.files("timm.data._info").joinpath(name).read_text().split())


def _specs(value, found):
    if isinstance(value, str) and value.startswith(rehearsal.MODEL_PREFIXES):
        found.add(value)
    elif isinstance(value, dict):
        for v in value.values():
            _specs(v, found)
    elif isinstance(value, list):
        for v in value:
            _specs(v, found)
    return found


# --- stand-ins ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "adapter", "mlp"),
    [
        ("openclip", "OpenClipAdapter", "Sequential"),
        ("eva", "OpenClipTimmAdapter", "Mlp"),
        ("dinov2", "TimmAdapter", "GluMlp"),
    ],
)
def test_standins_are_the_families_of_the_paper_models(family, adapter, mlp):
    backbone = amp.load_model(f"zoo:standin-{family}")
    again = amp.load_model(f"zoo:standin-{family}")
    assert type(backbone.adapter).__name__ == adapter
    assert mlp in type(backbone.adapter.mlp_of(backbone.adapter.blocks(backbone.model)[0])).__name__
    for a, b in zip(backbone.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)  # a teacher loaded twice is one teacher
    images = torch.rand(2, 3, standins.IMAGE_SIZE, standins.IMAGE_SIZE)
    assert backbone.embed(images, project=True).shape[0] == 2
    assert backbone.is_clip == (family != "dinov2")
    if family == "dinov2":  # packed SwiGLU (timm SwiGLUPacked is a GluMlp), LayerScale, 4 registers
        block = backbone.adapter.blocks(backbone.model)[0]
        assert type(block.ls1).__name__ == "LayerScale" and backbone.model.num_reg_tokens == 4


def test_a_pruned_standin_reloads_offline(tmp_path):
    from amp.surgery import set_width

    backbone = amp.load_model("zoo:standin-eva")
    for site in backbone.sites():
        set_width(site, 40)
    amp.save_pruned(backbone, tmp_path / "m")
    loaded = amp.load_pruned(tmp_path / "m")
    assert loaded.widths() == [40, 40]
    images = torch.rand(2, 3, standins.IMAGE_SIZE, standins.IMAGE_SIZE)
    torch.testing.assert_close(loaded.embed(images, project=True), backbone.embed(images, project=True))


def test_every_paper_model_has_a_standin():
    specs = _specs(runner.load_profile("paper"), set())
    assert specs, "the paper profile names no models"
    mapped = {spec: standins.standin_for(spec) for spec in specs}
    for spec, standin in mapped.items():
        expected = "dinov2" if "dinov2" in spec.lower() else "eva" if "eva" in spec.lower() else "openclip"
        assert standin == f"zoo:standin-{expected}", spec
    with pytest.raises(ModelSpecError, match="no stand-in"):
        standins.standin_for("/some/dir")


# --- parameters -------------------------------------------------------------------------------------------------


def test_parameters_are_rewritten_generically():
    profile = {
        "09_x": {
            "device": "cuda",
            "model": "open_clip:EVA02-E-14-plus:laion2b_s9b_b144k",
            "models": {"g": {"model": "open_clip:ViT-g-14:laion2b_s34b_b88k", "batch_size": 1024, "chunk_size": 64}},
            "score_data": "imagefolder:{imagenet_train}",
            "retrieval": {"COCO": "coco:{coco_root}:test"},
            "classification": "imagefolder:{imagenet_val?}",
            "score_images": 20000,
            "val_images": None,
            "steps": 12511,
            "knn_k": [10, 20, 100, 200],
            "cache_gb": 32,
            "model_kwargs": {"img_size": 224},
            "distill": {"lr": 1e-5},
            "throughput_batch": 1000,
            "throughput_rounds": 10,
            "temp_inv": 15.0,
            "threshold": 0.01,
            "thresholds": [0.002, 0.005, 0.01, 0.02, 0.05],
        }
    }
    paths = {"imagenet_train": "/d/train", "imagenet_val": "/d/val", "coco_root": "/d/coco"}
    out = rehearsal.dry_run_parameters(profile, paths, {"09_x": {}})["09"]
    assert out["device"] == "cpu"
    assert out["model"] == "zoo:standin-eva" and out["models"]["g"]["model"] == "zoo:standin-openclip"
    g = out["models"]["g"]
    assert g["chunk_size"] < g["batch_size"] <= rehearsal.BATCH  # the chunked path runs
    assert out["score_data"] == "imagefolder:/d/train" and out["retrieval"] == {"COCO": "coco:/d/coco:test"}
    assert out["classification"] == "imagefolder:/d/val"
    assert out["score_images"] <= 32 and out["val_images"] is None  # None: all of the (tiny) data
    assert out["steps"] <= 4
    k_limit = rehearsal.CLASSES_PER_SET * rehearsal.IMAGES_PER_CLASS["train"] // 2
    assert out["knn_k"] == sorted(set(out["knn_k"])) and max(out["knn_k"]) <= k_limit
    assert out["cache_gb"] == rehearsal.CACHE_GB
    assert out["model_kwargs"] == {"img_size": standins.IMAGE_SIZE}
    assert out["distill"]["lr"] == 1e-5 and out["distill"]["batch_size"] % out["distill"]["device_batch"] == 0
    assert out["distill"]["epochs"] <= 1
    assert out["throughput_batch"] <= rehearsal.BATCH and out["throughput_rounds"] <= 2
    assert (out["temp_inv"], out["threshold"]) == (15.0, 0.01)  # the method's settings stay the paper's
    assert out["thresholds"] == [0.002, 0.01]  # two points of the sweep, the main Δ among them


def test_the_paper_profile_is_rewritten_completely():
    raw = runner.load_profile("paper")
    kinds = rehearsal.placeholder_kinds(raw)
    paths = {key: f"/gen/{key}" for key in kinds}
    out = rehearsal.dry_run_parameters(raw, paths, {})
    text = json.dumps(out)
    assert not runner.PLACEHOLDER.search(text)  # no path left to fill
    assert not _specs(out, set()), "a paper model would be downloaded"
    assert "cuda" not in text
    for block in out.values():
        for key, value in block.items():
            if key == "batch_size":
                assert value <= rehearsal.BATCH


# --- data ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    kinds = {
        "imagenet_train": "imagefolder",
        "imagenet_val": "imagefolder",
        "imagenet_a": "imagefolder",
        "imagenet_r": "imagefolder",
        "imagenet_v2": "imagefolder",
        "coco_root": "coco",
        "flickr_root": "flickr30k",
        "objectnet_root": "clip_benchmark:objectnet",
    }
    return rehearsal.make_data(root, kinds)


def test_imagenet_folders_are_named_by_real_ids(generated):
    imagenet = _timm_list("imagenet_synsets.txt")
    train = load_dataset(f"imagefolder:{generated['imagenet_train']}")
    val = load_dataset(f"imagefolder:{generated['imagenet_val']}")
    assert train.classes == val.classes and set(train.classes) <= imagenet
    assert len(train) == rehearsal.CLASSES_PER_SET * rehearsal.IMAGES_PER_CLASS["train"]
    assert set(load_dataset(f"imagefolder:{generated['imagenet_a']}").classes) <= _timm_list("imagenet_a_synsets.txt")
    assert set(load_dataset(f"imagefolder:{generated['imagenet_r']}").classes) <= _timm_list("imagenet_r_synsets.txt")
    v2 = load_dataset(f"imagefolder:{generated['imagenet_v2']}").classes
    assert all(c.isdigit() and 0 <= int(c) < 1000 for c in v2)


def test_captioned_sets_load_in_the_karpathy_layout(generated):
    coco = load_dataset(f"coco:{generated['coco_root']}:test")
    assert len(coco) == rehearsal.CAPTIONED_IMAGES["test"]
    _, captions = coco[0]
    assert len(captions) == rehearsal.CAPTIONS_PER_IMAGE
    both = load_dataset(f"coco:{generated['coco_root']}:train+restval")
    assert len(both) == rehearsal.CAPTIONED_IMAGES["train"] + rehearsal.CAPTIONED_IMAGES["restval"]
    assert len(load_dataset(f"flickr30k:{generated['flickr_root']}:test")) == rehearsal.CAPTIONED_IMAGES["test"]


def test_objectnet_loads_through_clip_benchmark(generated):
    data = load_dataset(f"clip_benchmark:objectnet:{generated['objectnet_root']}")
    assert len(data) == rehearsal.CLASSES_PER_SET * rehearsal.IMAGES_PER_CLASS["default"]
    assert len(data.classes) == rehearsal.CLASSES_PER_SET


# --- refusal before anything runs ---------------------------------------------------------------------------------


def test_a_typo_in_the_paper_profile_fails_before_anything_runs(monkeypatch, tmp_path):
    raw = runner.load_profile("paper")
    stem = next(s for s, block in raw.items() if "batch_size" in block)
    broken = {**raw, stem: {**raw[stem], "batch_sise": 64}}
    monkeypatch.setattr(runner, "load_profile", lambda profile: broken)
    monkeypatch.setattr(rehearsal, "load_profile", lambda profile: broken)

    def never(*args, **kwargs):
        raise AssertionError("a notebook ran")

    monkeypatch.setattr(runner, "run_notebook", never)
    with pytest.raises(ValueError, match="batch_sise"):
        rehearsal.dry_run("paper", out=tmp_path / "out", data_dir=tmp_path / "data", progress=False)
    assert not (tmp_path / "out" / "executed").exists()


def test_a_typo_inside_a_model_entry_fails_before_anything_runs(monkeypatch, tmp_path):
    raw = runner.load_profile("paper")
    stem, block = next((s, b) for s, b in raw.items() if isinstance(b.get("models"), dict))
    label, entry = next((k, v) for k, v in block["models"].items() if v.get("model"))
    typo = {**entry, "treshold": entry.get("threshold", 0.01)}
    broken = {**raw, stem: {**block, "models": {**block["models"], label: typo}}}
    monkeypatch.setattr(runner, "load_profile", lambda profile: broken)
    monkeypatch.setattr(rehearsal, "load_profile", lambda profile: broken)
    monkeypatch.setattr(runner, "run_notebook", lambda *a, **k: pytest.fail("a notebook ran"))
    with pytest.raises(ValueError, match="models: 'treshold'"):
        rehearsal.dry_run("paper", only=stem[:2], out=tmp_path / "out", data_dir=tmp_path / "data", progress=False)


@pytest.mark.parametrize("profile", ["paper", "cpu"])
def test_the_profiles_set_only_what_their_notebooks_read(profile):
    """Every parameter of the profile is one its notebook declares, every key of its records one it reads (what
    reproduce checks before it runs)."""
    for nb in runner.notebook_paths():
        params = runner.load_profile(profile).get(nb.stem, {})
        runner._check_declared(nb, params, f"the {profile} profile")
        runner._check_record_keys(nb, params, f"the {profile} profile")


# --- the rehearsal itself -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_whole_paper_profile_rehearses_end_to_end(tmp_path):
    """``amp reproduce --profile paper --dry-run``: every paper notebook and a torchrun distillation (2 gloo processes)
    per recipe family and sharding, on the stand-ins (about 2 minutes on two idle cores)."""
    result = rehearsal.dry_run("paper", out=tmp_path / "out", progress=False)
    failed = {r["name"]: r["error"] for r in result["notebooks"] if not r["ok"]}
    assert not failed, failed
    assert {r["name"] for r in result["notebooks"]} == {p.stem for p in runner.notebook_paths()}
    assert result["dry_run"]["overrides"]["06"]["model"] == "zoo:standin-dinov2"
    report = (tmp_path / "out" / "REPORT.md").read_text()
    assert "06_dinov2" in report and "08_peer_comparison" in report
    torchrun = {run["name"]: run for run in result["torchrun"]}
    assert any("ViT-g-14" in name for name in torchrun) and any("EVA02-E-14-plus" in name for name in torchrun)
    assert all(run["ok"] for run in torchrun.values()), torchrun
    assert result["ok"]


def test_the_rehearsed_distillations_cover_each_family_and_sharding():
    pairs = rehearsal.distill_rehearsals(runner.load_profile("paper"))
    assert ("zoo:standin-openclip", "ViT-g-14") in pairs and ("zoo:standin-eva", "EVA02-E-14-plus") in pairs
    assert len(pairs) == len(set(pairs))
