"""Distillation of a pruned tower from its dense original (amp.distill)."""

from __future__ import annotations

import copy
import itertools
import os

import pytest
import torch
from conftest import tiny

from amp.api import load_pruned, save_pruned
from amp.cli import main
from amp.data import SyntheticImages
from amp.distill import DistillConfig, distill, distill_loss, load_checkpoint, lr_factor
from amp.io import read_json
from amp.scoring import magnitude_scores
from amp.surgery import prune

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(name: str = "timm_vit", ratio: float = 0.5):
    """(student, teacher): the teacher a tiny model, the student its magnitude-pruned copy."""
    teacher = tiny(name)
    student = copy.deepcopy(teacher)
    orders = magnitude_scores(student).orders()
    prune(student.sites(), orders, [max(1, int(ratio * w)) for w in student.widths()])
    return student, teacher


def _tower_state(backbone) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backbone.vision.state_dict().items()}


def test_lr_schedule_warms_up_then_decays():
    factors = [lr_factor(s, 10, 2, 0.1) for s in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(factors[1:]))
    assert factors[-1] > 0.1 and lr_factor(10, 10, 2, 0.1) == pytest.approx(0.1)


def test_losses():
    t = torch.randn(4, 5, 8)
    assert float(distill_loss(t, t, "mse_tokens")) == 0
    s = t.clone()
    s[:, 0] += 1  # CLS off by one everywhere: the CLS term is 1, the patch term 0
    assert float(distill_loss(s, t, "mse_tokens")) == pytest.approx(1.0)
    e = torch.randn(6, 8)
    assert float(distill_loss(e, e, "cosine")) == pytest.approx(0, abs=1e-6)
    assert float(distill_loss(e, e, "similarity_kl")) == pytest.approx(0, abs=1e-6)
    assert float(distill_loss(e + torch.randn(6, 8), e, "similarity_kl")) > 0


def test_loss_decreases_and_only_the_vision_tower_trains():
    student, teacher = _pair("open_clip")
    text_before = {k: v.clone() for k, v in student.model.state_dict().items() if not k.startswith("visual.")}
    heads = student.adapter.head_parameter_names(student.model)
    assert set(heads) == {"ln_post.weight", "ln_post.bias", "proj"}
    with torch.no_grad():
        student.vision.ln_post.weight.add_(0.1)  # a different head: replaced by the teacher's
    result = distill(student, teacher, SyntheticImages(64, 32), 20, batch_size=8, lr=2e-3, warmup=2, progress=False)
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == 20 and result["images"] == 160 and result["images_per_s"] > 0
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses
    after = student.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in text_before.items())  # text tower untouched
    for name in heads:
        assert torch.equal(dict(student.vision.named_parameters())[name], dict(teacher.vision.named_parameters())[name])
    assert not student.model.training and all(p.requires_grad for p in student.model.parameters())


def test_cosine_loss_with_a_trained_head_decreases():
    student, teacher = _pair("timm_vit", ratio=0.25)
    result = distill(
        student,
        teacher,
        SyntheticImages(32, 32),
        10,
        batch_size=8,
        lr=2e-3,
        warmup=1,
        loss="cosine",
        train_head=True,
        progress=False,
    )
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="train_head"):
        distill(student, teacher, SyntheticImages(32, 32), 1, batch_size=8, train_head=True, progress=False)


class _Crash(Exception):
    pass


def test_resume_is_bit_for_bit(tmp_path):
    student, teacher = _pair("timm_vit")
    start = copy.deepcopy(student)
    data = SyntheticImages(40, 32)  # 5 batches per epoch: 6 steps cross an epoch boundary
    options = dict(batch_size=8, lr=1e-3, warmup=2, progress=False, seed=3)
    straight = distill(student, teacher, data, 6, **options)

    interrupted = copy.deepcopy(start)

    def crash(step, _loss):
        if step == 3:
            raise _Crash

    with pytest.raises(_Crash):
        distill(interrupted, teacher, data, 6, checkpoint_dir=tmp_path, checkpoint_every=3, on_step=crash, **options)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 3 and state["position"] == [0, 3]
    resumed_student = copy.deepcopy(start)  # a fresh process: weights come from the checkpoint
    resumed = distill(
        resumed_student, teacher, data, 6, checkpoint_dir=tmp_path, checkpoint_every=3, resume=True, **options
    )
    assert resumed["resumed_from"] == 3
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    a, b = _tower_state(student), _tower_state(resumed_student)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="other settings"):
        distill(copy.deepcopy(start), teacher, data, 7, checkpoint_dir=tmp_path, resume=True, **options)


# --- DDP ------------------------------------------------------------------------------------------------

DDP_STEPS = 4
DDP_OPTIONS = dict(batch_size=8, lr=1e-3, warmup=1, progress=False, device="cpu")


def _spawn_two(worker, tmp_path, *args) -> None:
    # fork where available: the children need not import torch, timm and open_clip again (spawn takes ~30 s here)
    method = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else "spawn"
    torch.multiprocessing.start_processes(worker, args=(2, str(tmp_path), *args), nprocs=2, start_method=method)


def _init_gloo(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)


def _assert_matches_one_process(multi: dict[str, torch.Tensor], name: str = "timm_vit") -> None:
    """``multi`` is the tower that the same distillation gives in a single process (which did train)."""
    student, teacher = _pair(name)
    before = _tower_state(student)
    distill(student, teacher, SyntheticImages(24, 32), DDP_STEPS, **DDP_OPTIONS)
    single = _tower_state(student)
    assert max(float((single[k] - before[k]).abs().max()) for k in single) > 1e-4  # training happened
    for key in single:
        torch.testing.assert_close(_without_key_bias(key, multi[key]), _without_key_bias(key, single[key]), **CLOSE)


CLOSE = dict(atol=2e-6, rtol=1e-5)


def _without_key_bias(name: str, value: torch.Tensor) -> torch.Tensor:
    """A packed q/k/v bias without its key third. Softmax ignores a bias shared by all keys, so that gradient is 0
    in exact arithmetic and rounding noise, which Adam normalises into lr-sized steps, differs with the reduction
    order of the processes."""
    if not name.endswith(("in_proj_bias", "qkv.bias")):  # open_clip, timm
        return value
    q, _, v = value.chunk(3)
    return torch.cat([q, v])


def _ddp_worker(rank: int, world: int, tmp: str) -> None:
    _init_gloo(rank, world, tmp)
    try:
        student, teacher = _pair("timm_vit")
        options = dict(checkpoint_dir=tmp, checkpoint_every=2)
        distill(student, teacher, SyntheticImages(24, 32), DDP_STEPS, **DDP_OPTIONS, **options)
        if rank == 0:
            torch.save(_tower_state(student), os.path.join(tmp, "ddp.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_processes_match_one(tmp_path):
    _spawn_two(_ddp_worker, tmp_path)
    _assert_matches_one_process(torch.load(tmp_path / "ddp.pt"))
    assert load_checkpoint(tmp_path / "checkpoint.pt")["world_size"] == 2


def _fsdp_worker(rank: int, world: int, tmp: str, name: str) -> None:
    _init_gloo(rank, world, tmp)
    options = dict(DDP_OPTIONS, sharding="fsdp", checkpoint_dir=os.path.join(tmp, "ckpt"), checkpoint_every=2)
    try:
        student, teacher = _pair(name)

        def crash(step, _loss):
            if step == 2:
                raise _Crash

        with pytest.raises(_Crash):  # every rank stops after the step-2 checkpoint, like a killed job
            distill(student, teacher, SyntheticImages(24, 32), DDP_STEPS, on_step=crash, **options)
        untouched = _tower_state(student)
        student, teacher = _pair(name)  # a fresh start: the weights come from the gathered checkpoint
        assert all(torch.equal(untouched[k], v) for k, v in _tower_state(student).items())  # crash left it as it was
        result = distill(student, teacher, SyntheticImages(24, 32), DDP_STEPS, resume=True, **options)
        assert result["resumed_from"] == 2
        # every rank holds the trained weights afterwards, not only its shard
        torch.save(_tower_state(student), os.path.join(tmp, f"fsdp-rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("name", ["timm_vit", "open_clip"])
def test_fsdp_two_processes_resume_and_match_one(tmp_path, name):
    _spawn_two(_fsdp_worker, tmp_path, name)
    fsdp, other = torch.load(tmp_path / "fsdp-rank0.pt"), torch.load(tmp_path / "fsdp-rank1.pt")
    assert all(torch.equal(fsdp[k], other[k]) for k in fsdp)
    state = load_checkpoint(tmp_path / "ckpt" / "checkpoint.dcp")
    assert state["step"] == DDP_STEPS and state["settings"]["sharding"] == "fsdp"
    assert "model" not in state and "optimizer" not in state  # those stay sharded on disk
    _assert_matches_one_process(fsdp, name)


def test_unknown_sharding_is_refused():
    student, teacher = _pair("timm_vit")
    with pytest.raises(ValueError, match="unknown sharding 'zero3'"):
        distill(student, teacher, SyntheticImages(8, 32), 1, batch_size=8, sharding="zero3", progress=False)


def test_a_config_and_keywords_give_the_same_run():
    data = SyntheticImages(16, 32)
    by_keywords, by_config = _pair("timm_vit"), _pair("timm_vit")
    a = distill(*by_keywords, data, 2, batch_size=8, lr=1e-3, warmup=1, progress=False)
    config = DistillConfig(steps=2, batch_size=8, lr=5e-4, warmup=1, progress=False)
    b = distill(*by_config, data, config=config, lr=1e-3)  # a keyword overrides the config's field
    assert a["settings"] == b["settings"] and a["history"] == b["history"]
    with pytest.raises(TypeError, match="steps"):
        distill(*_pair("timm_vit"), data, batch_size=8)
    with pytest.raises(TypeError):
        distill(*_pair("timm_vit"), data, 1, batch_size=8, learning_rate=1e-3)  # not a setting


def test_amp_distill_command_distils_a_saved_pruned_model(tmp_path, capsys):
    student, _ = _pair("open_clip")
    save_pruned(student, tmp_path / "pruned")
    argv = ["distill", "--student", str(tmp_path / "pruned"), "--teacher", "open_clip:amp-test-tiny"]
    argv += ["--data", "synthetic:16:32"]
    argv += ["--steps", "3", "--batch-size", "8", "--out", str(tmp_path / "out"), "--no-progress", "--seed", "1"]
    assert main(argv) == 0
    assert "model written to" in capsys.readouterr().out
    meta = read_json(tmp_path / "out" / "amp.json")
    assert meta["distill"]["steps"] == 3 and meta["distill"]["teacher"] == "open_clip:amp-test-tiny"
    assert meta["widths"] == student.widths()
    load_pruned(tmp_path / "out")
    assert main([*argv, "--resume"]) == 0  # the finished checkpoint: nothing left to do
    assert main([*argv[:-2], "--seed", "2", "--resume"]) == 2  # other settings than the checkpoint's
    assert "other settings" in capsys.readouterr().err


def test_eva_towers_distill_with_their_prefix_tokens_and_checkpointed_blocks():
    """open_clip EVA (a timm trunk in a TimmModel): the adapter works on the tower alone, as distillation trains it;
    the CLS token is a prefix token (half the loss) and blocks recompute in backward."""
    from amp.zoo.standins import load_standin

    teacher = load_standin("eva")
    student = copy.deepcopy(teacher)
    prune(student.sites(), magnitude_scores(student).orders(), [max(1, w // 4) for w in student.widths()])
    adapter, tower = student.adapter, student.vision
    assert adapter.blocks(tower) is adapter.blocks(student.model)
    assert adapter.prefix_tokens(tower) == adapter.prefix_tokens(student.model) >= 1
    assert adapter.head_parameter_names(tower) == adapter.head_parameter_names(student.model)
    images = SyntheticImages(16, adapter.input_size(student.model)[-1])
    options = dict(batch_size=8, lr=1e-3, warmup=1, progress=False, seed=0)
    plain = distill(copy.deepcopy(student), teacher, images, 2, **options)
    recomputed = distill(student, teacher, images, 2, activation_checkpointing=True, **options)
    assert [h["loss"] for h in plain["history"]] == pytest.approx([h["loss"] for h in recomputed["history"]], rel=1e-5)
