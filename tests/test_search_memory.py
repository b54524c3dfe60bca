"""The search honours its memory bound: beyond ``cache_gb`` it spills to disk or recomputes, and finds the same widths
with the same probe losses; the validation images spill to disk beyond ``materialise``'s bound."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from conftest import images_for, tiny

from amp.criteria import Entropy, KLToDense
from amp.scoring import magnitude_scores
from amp.spill import GIB, SpilledBatches, TieredStore
from amp.width_search import amp_search, materialise

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = dict(threshold=4e-6, steps=4, progress=False)


def _val(backbone, n_batches=3, size=6):
    return [
        (images_for(backbone, size, seed=30 + i), [f"caption {i} {j}" for j in range(size)]) for i in range(n_batches)
    ]


def _layer_bytes(backbone, images: int) -> int:
    """Bytes of one block's inputs for ``images`` images, measured independently of the search."""
    x = backbone.adapter.block_inputs(backbone.model, images_for(backbone, 1), [0])[0]
    return x.numel() * x.element_size() * images


def _spilled(batches, memory_gb, spill_dir):
    return materialise(iter(batches), memory_gb=memory_gb, spill_dir=spill_dir, progress=False)


def _leftovers(directory):
    return [p for p in directory.iterdir() if p.name.startswith("amp-")]


@pytest.fixture(scope="module")
def unbounded():
    backbone = tiny("open_clip")
    val = _val(backbone)
    scores = magnitude_scores(backbone)
    return val, scores, amp_search(backbone, scores, val, KLToDense(5.0), cache_gb=4, **OPTIONS)


def test_the_unbounded_search_keeps_everything_in_memory(unbounded):
    _, _, result = unbounded
    memory = result.config["memory"]
    assert memory["stride"] == 1 and memory["peak_gb"]["disk"] == 0
    assert any(p.accepted for p in result.probes) and not all(p.accepted for p in result.probes)  # a real search


def test_a_tiny_bound_forces_every_fallback_and_changes_nothing(unbounded, tmp_path):
    val, scores, expected = unbounded
    batches = _spilled(val, 1e-9, tmp_path)  # every validation batch on disk
    assert isinstance(batches, SpilledBatches) and batches.spilled == len(val)
    backbone = tiny("open_clip")
    result = amp_search(backbone, scores, batches, KLToDense(5.0), cache_gb=1e-9, spill_dir=tmp_path, **OPTIONS)
    memory = result.config["memory"]
    depth = len(backbone.sites())
    assert memory["stride"] == depth  # no stash: every block's inputs recomputed from the images
    assert memory["peak_gb"]["device"] == 0 and memory["peak_gb"]["disk"] > 0  # the current inputs on disk
    assert result.widths == expected.widths
    assert [(p.layer, p.width, p.accepted) for p in result.probes] == [
        (p.layer, p.width, p.accepted) for p in expected.probes
    ]
    assert [p.loss for p in result.probes] == [p.loss for p in expected.probes]  # bit-identical
    assert result.final_loss == expected.final_loss and result.dense_loss == expected.dense_loss
    assert [p.name for p in _leftovers(tmp_path)] == [batches.spill.path.name]  # the search removed its own files
    batches.close()
    assert _leftovers(tmp_path) == []


def test_a_bound_for_one_stash_keeps_it_in_memory(unbounded, tmp_path):
    """Room for the current block's inputs and one stash: stride ⌈depth/2⌉, nothing on disk, the same search."""
    val, scores, expected = unbounded
    backbone = tiny("open_clip")
    images = sum(len(x) for x, _ in val)
    held = sum(x.numel() * x.element_size() for x, _ in val)  # the validation images count on a CPU
    per_layer = _layer_bytes(backbone, images)
    bound = (held + 2.5 * per_layer) / GIB
    result = amp_search(backbone, scores, val, KLToDense(5.0), cache_gb=bound, spill_dir=tmp_path, **OPTIONS)
    memory = result.config["memory"]
    depth = len(backbone.sites())
    assert memory["stride"] == math.ceil(depth / 2)
    assert memory["peak_gb"]["disk"] == 0
    assert memory["peak_gb"]["device"] * GIB <= bound * GIB - held + 1
    assert [p.loss for p in result.probes] == [p.loss for p in expected.probes]
    assert result.widths == expected.widths


def test_chunks_and_a_tiny_bound_together(tmp_path):
    backbone = tiny("open_clip")
    val, scores = _val(backbone, 2, 7), magnitude_scores(backbone)
    whole = amp_search(tiny("open_clip"), scores, val, Entropy(5.0), chunk_size=3, **OPTIONS)
    bounded = amp_search(
        backbone, scores, val, Entropy(5.0), chunk_size=3, cache_gb=1e-9, spill_dir=tmp_path, **OPTIONS
    )
    assert [p.loss for p in bounded.probes] == [p.loss for p in whole.probes]
    assert bounded.widths == whole.widths and bounded.config["memory"]["peak_gb"]["disk"] > 0


def test_bf16_autocast_search_runs_the_model_in_bf16_and_the_criterion_in_fp32():
    backbone = tiny("open_clip")
    val, scores = _val(backbone, 2), magnitude_scores(backbone)
    fp32 = amp_search(tiny("open_clip"), scores, val, Entropy(5.0), threshold=1e9, steps=2, progress=False)
    seen = []
    criterion = Entropy(5.0)
    call = criterion.__call__

    class Watching(Entropy):
        def __call__(self, features, context=None):
            seen.append((features.dtype, torch.is_autocast_enabled("cpu")))
            return call(features, context)

    bf16 = amp_search(
        backbone, scores, val, Watching(5.0), threshold=1e9, steps=2, progress=False, autocast_dtype=torch.bfloat16
    )
    assert bf16.config["autocast"] == "bfloat16" and "autocast" not in fp32.config
    assert all(dtype == torch.bfloat16 and not autocast for dtype, autocast in seen)  # bf16 model, fp32 criterion
    losses = [p.loss for p in bf16.probes]
    assert losses != [p.loss for p in fp32.probes]
    assert losses == pytest.approx([p.loss for p in fp32.probes], rel=0.05)


def test_tiered_store_fills_device_then_host_then_disk(tmp_path):
    store = TieredStore(torch.device("cpu"), device_bytes=100, host_bytes=100, spill_dir=tmp_path)
    tensors = {k: torch.arange(20, dtype=torch.float32) + k for k in range(4)}  # 80 bytes each
    tiers = [store.put(k, t) for k, t in tensors.items()]
    assert tiers == ["device", "host", "disk", "disk"]
    assert store.put("stash", torch.zeros(2), prefer=("host", "device")) == "host"  # 8 bytes still fit on the host
    for k, t in tensors.items():
        assert torch.equal(store.get(k), t)
    store.rename(2, "moved")
    assert torch.equal(store.get("moved"), tensors[2])
    store.delete(0)
    assert store.put(5, tensors[1]) == "device"  # freed room is reused
    assert store.peak == {"device": 80, "host": 88, "disk": 160}
    view = torch.arange(1000.0)[:10]  # a view is kept (and saved) with a storage of its own
    store.put("view", view, prefer=())
    assert store.items["view"][0] == "disk" and store.items["view"][1].stat().st_size < 3000
    store.close()
    assert _leftovers(tmp_path) == []


def test_materialise_spills_beyond_its_bound_and_reads_back_the_same_batches(tmp_path):
    backbone = tiny("open_clip")
    val = _val(backbone, 4)
    one = val[0][0].numel() * 4 / GIB
    batches = _spilled(val, 2.5 * one, tmp_path)  # two batches in memory, two on disk
    assert batches.spilled == 2 and len(batches) == 4 and batches.lengths == [6] * 4
    for (images, captions), (want_images, want_captions) in zip(batches, val):
        assert torch.equal(images, want_images) and captions == want_captions
    assert len(list((tmp_path / batches.spill.path.name).iterdir())) == 2
    assert isinstance(materialise(iter(val), progress=False), list)  # no bound: a plain list, as before
    del batches
    gc.collect()
    assert _leftovers(tmp_path) == []  # removed with the object


def test_materialise_refuses_a_negative_bound():
    with pytest.raises(ValueError, match="memory_gb"):
        materialise(iter([]), memory_gb=-1)
