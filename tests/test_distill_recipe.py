"""The paper's distillation recipe (amp.distill): named recipes, epochs, weight-decay schedule, decay of every
parameter, gradient accumulation, activation checkpointing, bf16 autocast, the DINO augmentation, and the CLI."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from conftest import tiny
from PIL import Image
from torchvision import transforms as T

import amp
import amp.api
from amp import cli
from amp.api import save_pruned
from amp.data import SyntheticImages
from amp.distill import (
    AUGMENTS,
    PRECISIONS,
    RECIPES,
    DistillConfig,
    distill,
    load_checkpoint,
    train_transform,
    weight_decay_at,
)
from amp.io import read_json
from amp.scoring import magnitude_scores
from amp.surgery import prune

pytestmark = pytest.mark.usefixtures("one_thread")

# METHOD.md §5, typed in: epochs, per-GPU batch (8 GPUs), base lr, min lr, sharding, augmentation
PAPER = {
    "ViT-g-14": (5, 64, 2e-5, 1e-7, "ddp", "clip"),
    "ViT-bigG-14": (20, 64, 2e-5, 1e-6, "ddp", "clip"),
    "EVA02-E-14-plus": (10, 64, 1e-5, 1e-6, "fsdp", "clip"),
    "EVA-CLIP-8B": (10, 20, 1e-5, 1e-6, "fsdp", "clip"),
    "dinov2-g": (30, 64, 7.5e-6, 1e-7, "ddp", "dino"),
}


def _pair(name: str = "timm_vit", ratio: float = 0.5):
    teacher = tiny(name)
    student = copy.deepcopy(teacher)
    prune(student.sites(), magnitude_scores(student).orders(), [max(1, int(ratio * w)) for w in student.widths()])
    return student, teacher


def _tower(backbone) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backbone.vision.state_dict().items()}


def _max_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# --- recipes ------------------------------------------------------------------------------------------------


def test_recipes_are_the_paper_s():
    assert set(RECIPES) == set(PAPER)
    for name, (epochs, per_gpu, base_lr, min_lr, sharding, augment) in PAPER.items():
        recipe = RECIPES[name]
        assert recipe["epochs"] == epochs and recipe["warmup_epochs"] == 1, name
        assert recipe["batch_size"] == 8 * per_gpu and recipe["device_batch"] == per_gpu, name
        assert recipe["lr"] == pytest.approx(base_lr * 8 * per_gpu / 256, rel=1e-12), name
        assert recipe["min_lr"] == min_lr and recipe["sharding"] == sharding and recipe["augment"] == augment
        assert (recipe["weight_decay"], recipe["weight_decay_end"], recipe["decay_all"]) == (0.04, 0.2, True)
        assert recipe["betas"] == (0.9, 0.95) and recipe["grad_clip"] is None and recipe["loss"] == "mse_tokens"
        assert recipe["precision"] == "bf16" and recipe["activation_checkpointing"] is True
        assert "METHOD.md §5" in recipe["source"]
    assert RECIPES["ViT-g-14"]["lr"] == pytest.approx(4e-5)  # the paper profile's distill lr
    assert RECIPES["EVA-CLIP-8B"]["lr"] == pytest.approx(6.25e-6)  # 1e-5 × 160 / 256


def test_from_recipe_takes_overrides_and_refuses_unknown_names():
    config = DistillConfig.from_recipe("dinov2-g", lr=1e-3)
    assert config.lr == 1e-3 and config.epochs == 30 and config.augment == "dino" and config.steps is None
    config.check()
    short = DistillConfig.from_recipe("ViT-g-14", steps=3, warmup=1)  # a rehearsal: steps replace the epochs
    assert (short.steps, short.epochs, short.warmup, short.warmup_epochs) == (3, None, 1, None)
    short.check()
    by_epochs = DistillConfig.from_recipe("ViT-g-14", epochs=0.5)
    assert (by_epochs.steps, by_epochs.epochs, by_epochs.warmup_epochs) == (None, 0.5, 1)
    with pytest.raises(ValueError, match=r"unknown distillation recipe 'ViT-H'.*'EVA-CLIP-8B'"):
        DistillConfig.from_recipe("ViT-H")


def test_the_cli_spells_the_library_s_choices():
    assert tuple(RECIPES) == cli.DISTILL_RECIPES and cli.AUGMENTS == AUGMENTS and cli.PRECISIONS == PRECISIONS
    fields = set(DistillConfig.__dataclass_fields__)
    assert set(cli.DISTILL_FIELDS) <= fields


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"steps": 2, "epochs": 1.0}, "exactly one of steps and epochs"),
        ({}, "exactly one of steps and epochs"),
        ({"steps": 2, "warmup": 1, "warmup_epochs": 0.5}, "warmup or warmup_epochs"),
        ({"steps": 2, "precision": "fp16"}, "unknown precision 'fp16'"),
        ({"steps": 2, "device_batch": 0}, "device_batch must be"),
        ({"steps": 2, "weight_decay_end": -0.1}, "weight_decay_end must be"),
    ],
)
def test_settings_that_cannot_run_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**fields).check()


def test_augment_names():
    assert DistillConfig(steps=1, augment=True).augment == "clip"
    assert DistillConfig(steps=1, augment=False).augment is None
    with pytest.raises(ValueError, match="unknown augment 'mixup'"):
        DistillConfig(steps=1, augment="mixup")


# --- schedule ----------------------------------------------------------------------------------------------


def test_steps_given_to_distill_replace_a_config_s_epochs():
    student, teacher = _pair()
    config = DistillConfig(epochs=3, warmup_epochs=1, batch_size=8, progress=False)
    result = distill(student, teacher, SyntheticImages(16, 32), 1, config=config, warmup=1)
    assert result["steps"] == 1 and result["settings"]["epochs"] is None and result["settings"]["warmup"] == 1


def test_epochs_set_the_length_and_the_warmup():
    student, teacher = _pair()
    data = SyntheticImages(40, 32)  # 5 batches of 8 per epoch
    result = distill(student, teacher, data, epochs=2, warmup_epochs=0.4, batch_size=8, lr=1e-3, progress=False)
    assert result["steps"] == 10 and len(result["history"]) == 10 and result["images"] == 80
    lrs = [h["lr"] for h in result["history"]]
    assert lrs[:3] == pytest.approx([0.5e-3, 1e-3, 1e-3])  # 2 warmup steps, then the cosine starts at the peak
    assert result["settings"]["warmup"] == 2 and result["settings"]["epochs"] == 2


def test_weight_decay_cosine():
    values = [weight_decay_at(s, 5, 0.04, 0.2) for s in range(5)]
    expected = [0.2 + (0.04 - 0.2) * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(5)]
    assert values == pytest.approx(expected) and values[0] == pytest.approx(0.04) and values[-1] == pytest.approx(0.2)
    assert weight_decay_at(3, 5, 0.05, None) == 0.05


@pytest.mark.parametrize("decay_all", [False, True])
def test_weight_decay_is_applied_on_its_schedule_to_the_parameters_it_names(decay_all):
    """A student equal to its teacher has zero loss and zero gradients: Adam moves nothing, and each decayed weight
    is only scaled by (1 − lr·wd_t), which the test computes on its own. The teacher takes the student's weights after
    every step, so that every step starts equal."""
    teacher = tiny("timm_vit")
    student = copy.deepcopy(teacher)
    before = _tower(student)
    lr, steps = 0.1, 3
    options = dict(batch_size=8, lr=lr, min_lr=lr, warmup=0, grad_clip=None, progress=False)
    result = distill(
        student,
        teacher,
        SyntheticImages(24, 32),
        steps,
        weight_decay=0.04,
        weight_decay_end=0.2,
        decay_all=decay_all,
        on_step=lambda *_: teacher.vision.load_state_dict(student.vision.state_dict()),
        **options,
    )
    assert [h["loss"] for h in result["history"]] == [0.0] * steps
    assert [h["weight_decay"] for h in result["history"]] == pytest.approx([0.04, 0.12, 0.2])
    factor = math.prod(1 - lr * wd for wd in (0.04, 0.12, 0.2))
    after = _tower(student)
    for name in ("blocks.0.mlp.fc1.weight", "blocks.1.norm1.weight", "blocks.0.attn.qkv.bias", "cls_token"):
        decayed = decay_all or name.endswith("fc1.weight")
        torch.testing.assert_close(after[name], before[name] * (factor if decayed else 1.0), rtol=1e-6, atol=1e-7)
    assert torch.equal(after["norm.weight"], before["norm.weight"])  # the frozen final norm is never decayed


# --- accumulation, recomputation, precision -----------------------------------------------------------------

ONE_STEP = dict(batch_size=16, lr=1e-3, warmup=1, progress=False, device="cpu", seed=4)


def _after_one_step(**options) -> tuple[dict, dict]:
    student, teacher = _pair()
    result = distill(student, teacher, SyntheticImages(32, 32), 1, **ONE_STEP, **options)
    return _tower(student), result


def test_gradient_accumulation_gives_the_one_big_batch_update():
    start = _tower(_pair()[0])
    whole, big = _after_one_step()
    accumulated, small = _after_one_step(device_batch=4)
    assert _max_difference(whole, start) > 1e-4  # the step moved the weights
    for key in whole:
        torch.testing.assert_close(accumulated[key], whole[key], atol=2e-6, rtol=1e-5)
    assert small["history"][0]["loss"] == pytest.approx(big["history"][0]["loss"], rel=1e-5)
    with pytest.raises(ValueError, match="device_batch 3 must divide the 16 images per process"):
        _after_one_step(device_batch=3)
    with pytest.raises(ValueError, match="device_batch 32"):
        _after_one_step(device_batch=32)


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]

    def count(*_):
        calls[0] += 1

    module.register_forward_pre_hook(count)
    return calls


def test_activation_checkpointing_recomputes_blocks_with_the_same_gradients():
    plain_student, teacher = _pair()
    recomputed_student = copy.deepcopy(plain_student)
    data = SyntheticImages(16, 32)
    options = dict(batch_size=8, lr=1e-3, warmup=1, progress=False, device="cpu")
    calls = {"plain": _count_calls(plain_student.vision.blocks[0].mlp)}
    calls["recomputed"] = _count_calls(recomputed_student.vision.blocks[0].mlp)
    plain = distill(plain_student, teacher, data, 2, **options)
    recomputed = distill(recomputed_student, teacher, data, 2, activation_checkpointing=True, **options)
    assert calls == {"plain": [2], "recomputed": [4]}  # one forward per step, and its recomputation in backward
    assert [h["loss"] for h in recomputed["history"]] == pytest.approx([h["loss"] for h in plain["history"]], rel=1e-6)
    a, b = _tower(plain_student), _tower(recomputed_student)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)
    assert all("forward" not in vars(block) for block in recomputed_student.vision.blocks)  # its own forward again


def test_bf16_autocasts_over_fp32_weights():
    fp32, plain = _after_one_step()
    bf16, autocast = _after_one_step(precision="bf16")
    assert all(value.dtype == torch.float32 for value in bf16.values())
    loss_fp32, loss_bf16 = plain["history"][0]["loss"], autocast["history"][0]["loss"]
    assert loss_bf16 != loss_fp32  # bf16 matmuls ran
    assert loss_bf16 == pytest.approx(loss_fp32, rel=0.05)  # bf16's 8 bits of mantissa, not a different loss
    start = _tower(_pair()[0])
    steps = [torch.cat([(weights[k] - start[k]).flatten() for k in start]) for weights in (fp32, bf16)]
    assert float(torch.nn.functional.cosine_similarity(*steps, dim=0)) > 0.9  # Adam's first step ~ sign(gradient)


# --- DDP: accumulation over 2 processes --------------------------------------------------------------------


def _ddp_accumulation_worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        weights, _ = _after_one_step(device_batch=4)  # 16 = 2 processes × 2 forwards × 4 images
        if rank == 0:
            torch.save(weights, os.path.join(tmp, "accumulated.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_accumulation_over_two_processes_gives_the_one_big_batch_update(tmp_path):
    method = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else "spawn"
    torch.multiprocessing.start_processes(
        _ddp_accumulation_worker, args=(2, str(tmp_path)), nprocs=2, start_method=method
    )
    accumulated, (whole, _) = torch.load(tmp_path / "accumulated.pt"), _after_one_step()
    for key in whole:
        if key.endswith("qkv.bias"):  # its key third has a zero gradient in exact arithmetic: Adam amplifies noise
            q, _, v = whole[key].chunk(3)
            qa, _, va = accumulated[key].chunk(3)
            torch.testing.assert_close(torch.cat([qa, va]), torch.cat([q, v]), atol=2e-6, rtol=1e-5)
        else:
            torch.testing.assert_close(accumulated[key], whole[key], atol=2e-6, rtol=1e-5)


# --- augmentation ------------------------------------------------------------------------------------------


def _ops(transform) -> list:
    return [op for t in transform.transforms for op in ([*t.transforms] if isinstance(t, T.RandomApply) else [t])]


def test_clip_and_dino_augmentations():
    backbone = tiny("dinov2")
    image = Image.new("RGB", (64, 48), (200, 40, 90))
    clip, dino = train_transform(backbone), train_transform(backbone, "dino")
    crops = {
        name: next(op for op in _ops(t) if isinstance(op, T.RandomResizedCrop))
        for name, t in [("clip", clip), ("dino", dino)]
    }
    assert crops["clip"].scale == (0.2, 1.0) and crops["dino"].scale == (0.05, 1.0)
    assert crops["dino"].interpolation == T.InterpolationMode.BICUBIC
    kinds = {type(op) for op in _ops(dino)}
    assert {T.ColorJitter, T.RandomGrayscale, T.GaussianBlur, T.RandomSolarize, T.RandomHorizontalFlip} <= kinds
    assert not {T.ColorJitter, T.GaussianBlur} & {type(op) for op in _ops(clip)}
    torch.manual_seed(0)
    views = [dino(image) for _ in range(4)]
    assert all(v.shape == (3, 28, 28) for v in views) and not torch.equal(views[0], views[1])
    with pytest.raises(ValueError, match="needs an augmentation"):
        train_transform(backbone, None)


def test_recover_applies_and_records_the_augmentation(monkeypatch):
    dense = tiny("timm_vit")
    pruned = amp.prune(dense, amp.score(dense, None, method="magnitude"), ratio=0.5)
    built, recorded = [], []
    real_transform, real_distill = amp.api.train_transform, amp.api.distill

    def transform_spy(backbone, augment):
        built.append(augment)
        return real_transform(backbone, augment)

    def distill_spy(student, teacher, data, **options):
        recorded.append(options["augment"])
        return real_distill(student, teacher, data, **options)

    monkeypatch.setattr(amp.api, "train_transform", transform_spy)
    monkeypatch.setattr(amp.api, "distill", distill_spy)
    options = dict(steps=1, batch_size=8, progress=False)
    recovered = amp.recover(pruned, "distill", "synthetic:16:32", dense, augment=True, **options)
    assert recovered.info["recovery"]["settings"]["augment"] == "clip"
    config = DistillConfig(steps=1, augment="dino", progress=False)
    amp.recover(pruned, "distill", "synthetic:16:32", dense, batch_size=8, config=config)
    amp.recover(pruned, "distill", "synthetic:16:32", dense, augment=False, **options)
    assert built == ["clip", "dino"] and recorded == ["clip", "dino", None]
    with pytest.raises(ValueError, match="applies to data given by name"):
        amp.recover(pruned, "distill", SyntheticImages(16, 32), dense, augment="dino", **options)


# --- CLI ---------------------------------------------------------------------------------------------------


def test_amp_distill_with_a_recipe(tmp_path, capsys):
    student, _ = _pair("open_clip")
    save_pruned(student, tmp_path / "pruned")
    argv = ["distill", "--student", str(tmp_path / "pruned"), "--teacher", "open_clip:amp-test-tiny"]
    argv += ["--data", "synthetic:16:32", "--recipe", "ViT-g-14", "--steps", "2", "--warmup", "1"]
    argv += ["--batch-size", "8", "--device-batch", "4", "--no-decay-all", "--precision", "fp32", "--no-progress"]
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 0
    assert "distilled 2 steps" in capsys.readouterr().out
    meta = read_json(tmp_path / "out" / "amp.json")["distill"]
    assert meta["recipe"] == "ViT-g-14" and meta["lr"] == pytest.approx(4e-5) and meta["min_lr"] == 1e-7
    assert (meta["weight_decay"], meta["weight_decay_end"], meta["grad_clip"]) == (0.04, 0.2, None)
    assert meta["decay_all"] is False and meta["precision"] == "fp32" and meta["activation_checkpointing"] is True
    assert meta["device_batch"] == 4 and meta["augment"] == "clip" and meta["epochs"] is None
    state = load_checkpoint(tmp_path / "out" / "checkpoints" / "checkpoint.pt")
    assert state["settings"]["decay_all"] is False
    resumed = [*argv[: argv.index("--no-decay-all")], "--decay-all", *argv[argv.index("--no-decay-all") + 1 :]]
    assert cli.main([*resumed, "--out", str(tmp_path / "out"), "--resume"]) == 2  # other settings: refused
    assert "other settings" in capsys.readouterr().err


def test_amp_distill_needs_a_length_before_loading_a_model(tmp_path, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(amp.api, "load_model", no_loading)
    argv = ["distill", "--student", "zoo:tiny-clip", "--data", "synthetic:8", "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    assert "--steps, --epochs or --recipe" in capsys.readouterr().err
    assert cli.main([*argv, "--steps", "2", "--device-batch", "0"]) == 2
    assert "device_batch must be" in capsys.readouterr().err
