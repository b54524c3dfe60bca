"""The paper profile against its documentation (docs/paper_profile.md) and against the paper's values.

The page's tables are parsed, not trusted: every parameter ``paper.json`` sets for notebooks 02-06 has one row whose
*profile* column equals it, every row names a parameter the profile sets, and every ``{placeholder}`` path is one the
runner knows. The paper's own numbers (METHOD.md §1, §2, §5, §6) are written here a second time, by hand, so a wrong
value in the profile fails even when the page repeats it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from amp import reproduce as rp
from amp.notebook import distill_length, search_options, speed_options, without_model

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "paper_profile.md"
DOCUMENTED = (
    "02_importance_criteria",
    "03_adaptive_search",
    "04_zero_shot_classification",
    "05_retrieval",
    "06_dinov2",
)
HEADER = "| parameter | paper | profile | source |"


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _documented_tables() -> dict[str, dict[str, object]]:
    """``{notebook: {parameter path: profile value}}`` from the page's parameter tables."""
    tables: dict[str, dict[str, object]] = {}
    section, in_table = None, False
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section, in_table = line[3:].strip(), False
        elif line.strip() == HEADER:
            in_table = True
            tables.setdefault(section, {})
        elif in_table and line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            assert len(cells) == 4, f"{section}: a row needs 4 cells: {line}"
            path, profile = cells[0].strip("`"), cells[2].replace("\\|", "|")
            assert profile.startswith("`") and profile.endswith("`"), f"{section} {path}: profile value not in `...`"
            assert path not in tables[section], f"{section}: {path} documented twice"
            tables[section][path] = json.loads(profile[1:-1])
            assert cells[3], f"{section} {path}: no source"
        elif in_table and not line.startswith("|"):
            in_table = False
    return tables


@pytest.fixture(scope="module")
def paper() -> dict:
    return rp.load_profile("paper")


def test_the_page_documents_every_parameter_with_its_profile_value(paper):
    tables = _documented_tables()
    assert set(DOCUMENTED) <= set(tables), f"sections missing: {set(DOCUMENTED) - set(tables)}"
    for stem in DOCUMENTED:
        actual = dict(_leaves(paper[stem]))
        assert set(tables[stem]) == set(actual), (
            f"{stem}: undocumented {sorted(set(actual) - set(tables[stem]))}, "
            f"documented but not set {sorted(set(tables[stem]) - set(actual))}"
        )
        for path, value in actual.items():
            assert json.dumps(tables[stem][path], sort_keys=True) == json.dumps(value, sort_keys=True), (stem, path)


def test_every_placeholder_is_one_the_runner_knows(paper):
    found = {name for params in paper.values() for name, _ in rp.PLACEHOLDER.findall(json.dumps(params))}
    assert {"imagenet_a", "imagenet_r", "imagenet_v2", "imagenet_sketch", "objectnet_root"} <= found
    unknown = sorted(found - set(rp.PATH_OPTIONS))
    assert not unknown, f"paper.json uses placeholders amp.reproduce.PATH_OPTIONS lacks: {unknown}"


def test_the_paper_values_written_out_by_hand(paper):
    """METHOD.md §1/§2 (global batch, Δ, τ⁻¹), §5 (recipes), §6 (six zero-shot sets, retrieval, k-NN, throughput)."""
    by_model = {
        "OpenCLIP-g": ("ViT-g-14:laion2b_s34b_b88k", 1024, 1e-2, 15.0, "ViT-g-14"),
        "OpenCLIP-G": ("ViT-bigG-14:laion2b_39b_b160k", 1024, 2e-4, 15.0, "ViT-bigG-14"),
        "EVA-CLIP-E": ("EVA02-E-14-plus:laion2b_s9b_b144k", 512, 2e-3, 20.0, "EVA02-E-14-plus"),
        "EVA-CLIP-8B": (None, 512, 1e-1, 15.0, "EVA-CLIP-8B"),
    }
    for stem in ("04_zero_shot_classification", "05_retrieval"):
        block = paper[stem]
        assert set(block["models"]) == set(by_model)
        for name, (spec, batch, delta, tau, recipe) in by_model.items():
            cfg = block["models"][name]
            settings = (cfg["batch_size"], cfg["threshold"], cfg["temp_inv"], cfg["distill_recipe"])
            assert settings == (batch, delta, tau, recipe), (stem, name)
            assert cfg["model"] == (f"open_clip:{spec}" if spec else None)
            assert 0 < cfg["chunk_size"] < cfg["batch_size"] and cfg["batch_size"] % cfg["chunk_size"] == 0
        runnable, gaps = without_model(block["models"])
        assert set(gaps) == {"EVA-CLIP-8B"} and "remote code" in gaps["EVA-CLIP-8B"] and len(runnable) == 3
        assert block["score_images"] is None and block["val_images"] is None  # one train epoch, the full val split
        assert block["score_data"].endswith("{imagenet_train}") and block["val_data"].endswith("{imagenet_val}")
        assert block["distill"] == {}  # each recipe as the reference ran it
    zero_shot = paper["04_zero_shot_classification"]["classification"]
    assert list(zero_shot) == ["IN-1K", "IN-A", "IN-R", "IN-V2", "IN-Sketch", "ObjectNet"]
    assert zero_shot["ObjectNet"] == "clip_benchmark:objectnet:{objectnet_root}"
    retrieval = {"MSCOCO": "coco:{coco_root}:test", "Flickr30k": "flickr30k:{flickr_root}:test"}  # Karpathy test
    assert paper["05_retrieval"]["retrieval"] == retrieval
    dino = paper["06_dinov2"]
    assert (dino["batch_size"], dino["temp_inv"], dino["searches"][0]["threshold"]) == (1024, 20.0, 5e-3)
    assert dino["knn_queries"] is None and dino["knn_images"] is None and dino["knn_k"] == [10, 20, 100, 200]
    for stem in ("02_importance_criteria", "03_adaptive_search", "06_dinov2"):
        assert paper[stem]["batch_size"] == 1024 and paper[stem]["search_precision"] == "bf16", stem
    for stem in ("04_zero_shot_classification", "06_dinov2"):  # batch 1000, the mean of 10 runs
        block = paper[stem]
        assert (block["throughput_batch"], block["throughput_steps"], block["throughput_rounds"]) == (1000, 1, 10)


def test_profile_knobs_reach_the_library_only_when_set():
    """The cpu profile's defaults add no keyword (today's calls, unchanged); the paper's add exactly theirs."""
    import torch

    assert search_options(None, None, "fp32") == {}
    assert search_options(64, 32, "bf16") == {"chunk_size": 64, "cache_gb": 32, "autocast_dtype": torch.bfloat16}
    assert speed_options(64, 3, 1, 2) == {"batch_size": 64, "steps": 3, "warmup": 1, "rounds": 2}
    assert speed_options(1000, 1, 1, 10, "fp16")["dtype"] is torch.float16
    with pytest.raises(ValueError, match="search_precision must be one of"):
        search_options(precision="int8")
    assert distill_length({"steps": 60}) == "60 steps" and distill_length({"epochs": 5}) == "5 epochs"


def test_the_mean_over_sets_is_the_mean_of_the_set_means_with_an_interval():
    """The paper's "Avg" column: an unweighted mean of per-set top-1, from per-item outcomes (sets of unequal size)."""
    import torch

    from amp.evaluation import EvalRow
    from amp.notebook import add_mean_over_sets, compare

    def row(name, first, second):
        r = EvalRow(name)
        r.add("zero_shot_top1", torch.tensor(first), "A", qualify=True)
        r.add("zero_shot_top1", torch.tensor(second), "B", qualify=True)
        add_mean_over_sets(r, "zero_shot_top1", ["A", "B"])
        return r

    a = row("a", [True, True, True, False] * 10, [False, True] * 5)  # 0.75 on 40 items, 0.5 on 10
    assert a.value("zero_shot_top1", "Avg") == pytest.approx((0.75 + 0.5) / 2)  # not the pooled 35/50 = 0.7
    low, high = a.interval("zero_shot_top1", "Avg")
    assert low < 0.625 < high and high - low < 0.5
    b = row("b", [True] * 40, [True] * 10)
    diff = compare(a, b, "zero_shot_top1", "Avg")
    assert diff.difference == pytest.approx(1 - 0.625) and diff.items == 50 and diff.low > 0


def test_check_data_reads_clip_benchmark_roots(tmp_path):
    from amp.notebook import check_data

    check_data(objectnet=f"clip_benchmark:objectnet:{tmp_path}", flickr=f"clip_benchmark:flickr30k:{tmp_path}:test")
    with pytest.raises(FileNotFoundError, match="directory /nowhere/objectnet not found"):
        check_data(classification={"ObjectNet": "clip_benchmark:objectnet:/nowhere/objectnet"})


def test_every_named_recipe_exists_and_reaches_recover_as_the_paper_ran_it(paper):
    from amp.notebook import distill_options

    for stem in ("04_zero_shot_classification", "05_retrieval"):
        for cfg in paper[stem]["models"].values():
            distill_options(paper[stem]["distill"], cfg["distill_recipe"])  # unknown names raise
    g = distill_options({}, "ViT-g-14")  # METHOD.md §5: 5 epochs (1 warm-up), 8 × 64, 2e-5 × 512/256 → 1e-7
    assert (g["epochs"], g["warmup_epochs"], g["batch_size"], g["min_lr"]) == (5, 1, 512, 1e-7)
    assert g["lr"] == pytest.approx(2e-5 * 512 / 256) and g["grad_clip"] is None and g["decay_all"] is True
    assert (g["weight_decay"], g["weight_decay_end"]) == (0.04, 0.2)
    rehearsal = distill_options({"steps": 2}, "EVA02-E-14-plus")  # a length override replaces the recipe's epochs
    assert rehearsal["steps"] == 2 and rehearsal["epochs"] is None and distill_length(rehearsal) == "2 steps"
    assert distill_options({"steps": 60, "lr": 1e-4}) == {"steps": 60, "lr": 1e-4}  # no recipe: as given
    with pytest.raises(ValueError, match="unknown distillation recipe"):
        distill_options({}, "ViT-Z")
