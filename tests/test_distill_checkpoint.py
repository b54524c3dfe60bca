"""Sharded FSDP checkpoints through torch.distributed.checkpoint (amp.distill), on 2 CPU processes (gloo): every rank
writes its own shards, a resumed run ends where an uninterrupted one does, and the export is a plain state dict."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import MetadataIndex

import amp.distill
from amp.data import SyntheticImages
from amp.distill import distill, export_checkpoint, load_checkpoint
from amp.scoring import magnitude_scores
from amp.surgery import prune

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
# 8 images a step: 4 per process, in 2 forwards of 2; every block recomputed in backward
OPTIONS = dict(batch_size=8, lr=1e-3, warmup=1, progress=False, device="cpu", seed=2)
FSDP = dict(OPTIONS, sharding="fsdp", device_batch=2, activation_checkpointing=True, checkpoint_every=2)


def _pair():
    teacher = tiny("timm_vit")
    student = copy.deepcopy(teacher)
    prune(student.sites(), magnitude_scores(student).orders(), [w // 2 for w in student.widths()])
    return student, teacher


def _tower(backbone) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backbone.vision.state_dict().items()}


class _Crash(Exception):
    pass


def _crash_at(step: int):
    def crash(done, _loss):
        if done == step:
            raise _Crash

    return crash


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        data = SyntheticImages(24, 32)
        student, teacher = _pair()
        distill(student, teacher, data, STEPS, checkpoint_dir=os.path.join(tmp, "straight"), **FSDP)
        straight = _tower(student)

        student, teacher = _pair()
        with pytest.raises(_Crash):  # every rank stops after the step-2 checkpoint, like a killed job
            distill(
                student, teacher, data, STEPS, checkpoint_dir=os.path.join(tmp, "run"), on_step=_crash_at(2), **FSDP
            )
        if rank == 0:  # what a step-2 checkpoint holds, before the resumed run replaces it
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in Path(tmp, "run").rglob("*") if p.is_file()}
            torch.save(files, os.path.join(tmp, "files-at-step-2.pt"))
        torch.distributed.barrier()
        student, teacher = _pair()  # a fresh process: the weights come from the sharded checkpoint
        result = distill(student, teacher, data, STEPS, checkpoint_dir=os.path.join(tmp, "run"), resume=True, **FSDP)
        assert result["resumed_from"] == 2
        torch.save({"straight": straight, "resumed": _tower(student)}, os.path.join(tmp, f"rank{rank}.pt"))

        student, teacher = _pair()  # bf16: bf16 gathers and compute over fp32 shards, fp32 reduce-scatter
        bf16 = distill(student, teacher, data, 1, precision="bf16", **dict(FSDP, checkpoint_every=0))
        assert all(v.dtype == torch.float32 for v in _tower(student).values())
        if rank == 0:
            torch.save(bf16["history"], os.path.join(tmp, "bf16.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fsdp")
    method = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else "spawn"
    torch.multiprocessing.start_processes(_worker, args=(2, str(tmp)), nprocs=2, start_method=method)
    return tmp


def test_a_resumed_sharded_run_ends_where_an_uninterrupted_one_does(two_process_run):
    rank0, rank1 = (torch.load(two_process_run / f"rank{r}.pt") for r in (0, 1))
    for weights in (rank0, rank1):
        assert all(torch.equal(weights["straight"][k], weights["resumed"][k]) for k in weights["straight"])
    assert all(torch.equal(rank0["resumed"][k], rank1["resumed"][k]) for k in rank0["resumed"])
    student, teacher = _pair()  # the same run in one process: one forward of 8, no recomputation
    start = _tower(student)
    distill(student, teacher, SyntheticImages(24, 32), STEPS, **OPTIONS)
    single = _tower(student)
    assert max(float((single[k] - start[k]).abs().max()) for k in single) > 1e-4
    for key, value in single.items():
        if key.endswith("qkv.bias"):  # its key third: zero gradient in exact arithmetic, noise that Adam amplifies
            value, other = torch.cat(value.chunk(3)[::2]), torch.cat(rank0["resumed"][key].chunk(3)[::2])
        else:
            other = rank0["resumed"][key]
        torch.testing.assert_close(other, value, atol=2e-6, rtol=1e-5)
    history = torch.load(two_process_run / "bf16.pt")
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0]["loss"]))


def test_every_rank_writes_its_own_shards(two_process_run):
    files = torch.load(two_process_run / "files-at-step-2.pt")
    model = {name: size for name, size in files.items() if name.startswith("run/checkpoint.dcp/model/")}
    optimizer = [name for name in files if name.startswith("run/checkpoint.dcp/optimizer/")]
    shards = [name for name in model if name.endswith(".distcp")]
    assert len(shards) == 2 and any(name.endswith(".metadata") for name in model) and len(optimizer) >= 3
    metadata = FileSystemReader(two_process_run / "straight" / "checkpoint.dcp" / "model").read_metadata()
    name = "blocks.0.mlp.fc1.weight"  # 96 × 48 after pruning: rows 0-47 from rank 0, 48-95 from rank 1
    chunks = metadata.state_dict_metadata[name].chunks
    assert sorted((tuple(c.offsets), tuple(c.sizes)) for c in chunks) == [((0, 0), (48, 48)), ((48, 0), (48, 48))]
    files = {metadata.storage_data[MetadataIndex(name, c.offsets)].relative_path for c in chunks}
    assert files == {"__0_0.distcp", "__1_0.distcp"}  # each rank wrote its own half: nothing was gathered
    state = load_checkpoint(two_process_run / "run" / "checkpoint.dcp")
    assert state["step"] == STEPS and state["world_size"] == 2 and state["settings"]["sharding"] == "fsdp"
    assert state["settings"]["device_batch"] == 2 and "model" not in state and "optimizer" not in state
    assert not (two_process_run / "run" / "checkpoint.dcp.tmp").exists()


def test_the_export_loads_into_the_student_without_a_process_group(two_process_run, tmp_path):
    assert not torch.distributed.is_initialized()
    out = export_checkpoint(two_process_run / "run", tmp_path / "tower.pt")
    student, _ = _pair()
    student.vision.load_state_dict(torch.load(out))  # strict: every key, every shape
    trained = torch.load(two_process_run / "rank0.pt")["resumed"]
    assert all(torch.equal(trained[k], v) for k, v in _tower(student).items())


def test_the_export_of_a_single_file_checkpoint(tmp_path):
    student, teacher = _pair()
    distill(student, teacher, SyntheticImages(16, 32), 2, checkpoint_dir=tmp_path / "ckpt", **OPTIONS)
    exported = torch.load(export_checkpoint(tmp_path / "ckpt", tmp_path / "tower.pt"))
    assert all(torch.equal(exported[k], v) for k, v in _tower(student).items())
    with pytest.raises(ValueError, match="holds no distillation checkpoint"):
        export_checkpoint(tmp_path / "nothing", tmp_path / "x.pt")


def test_a_save_interrupted_between_its_renames_is_named(tmp_path):
    (tmp_path / "checkpoint.dcp.old").mkdir()
    with pytest.raises(ValueError, match=r"rename it to checkpoint.dcp"):
        amp.distill._resumable_state(tmp_path / "checkpoint.dcp", True, {})
