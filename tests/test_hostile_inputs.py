"""Hostile inputs and degenerate data: every input is checked where it enters, and nothing ends in a silent wrong
result. Each case of the tables names its culprit (the option, the file, the layer, the data set) in the message,
through the front door (``amp.*``) and, where cheap, through ``amp.cli.main`` (exit 2, one line, no traceback)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import timm
import torch
from conftest import TINY_MODELS, images_for, tiny
from PIL import Image
from safetensors.torch import save_file
from timm.layers import Mlp

import amp
from amp.accounting import model_stats
from amp.adapters import UnsupportedModelError
from amp.cli import main
from amp.criteria import BatchTooSmallError, Criterion, Entropy, KLToDense, build_criterion
from amp.data import DataSpecError, load_dataset
from amp.evaluation import EvalSuite, evaluate
from amp.models import load_model
from amp.scoring import Scores, load_scores, save_scores, taylor_scores
from amp.width_search import amp_search, uniform_widths

TINY_ARGS = ["--model-arg", "img_size=28", "--model-arg", "depth=2", "--model-arg", "embed_dim=48"]
DINO = [TINY_MODELS["dinov2"][0], *TINY_ARGS, "--model-arg", "num_heads=2"]


class Flat(Criterion):
    """A loss that no MLP unit changes: zero gradients everywhere, and 0 at the dense model."""

    name = "flat"

    def __call__(self, features, context=None):
        return features.float().sum() * 0


def _images(tmp_path, n: int = 4, name: str = "imgs"):
    folder = tmp_path / name
    folder.mkdir()
    for i in range(n):
        Image.fromarray((torch.rand(28, 28, 3) * 255).byte().numpy()).save(folder / f"{i}.png")
    return folder


def _with_weights(name: str = "timm_vit", seed: int = 0):
    """A tiny model that stands for one with real weights (a random init is never checked against its scores)."""
    backbone = tiny(name, seed)
    backbone.info["weights"] = f"/ckpt/{name}-{seed}.safetensors"
    return backbone


def _magnitude(backbone):
    return amp.score(backbone, None, method="magnitude")


def _scores_file(tmp_path, values, meta=None):
    path = tmp_path / "s.safetensors"
    tensors = {f"layer.{i}": v for i, v in enumerate(values)}
    save_file(tensors, str(path), metadata=None if meta is None else {"amp_scores": json.dumps(meta)})
    return path


# --- the front door: (case, call(tmp_path), error, the culprit the message must name) ----------------------------


def _score(data, **options):
    backbone = tiny("timm_vit")
    return amp.score(backbone, data, **{"batch_size": 4, **options})


def _search(data="synthetic:8:32", scores=None, **options):
    backbone = tiny("timm_vit")
    scores = scores or _magnitude(tiny("timm_vit"))
    return amp.search(backbone, scores, data, **{"threshold": 0.01, "batch_size": 4, "steps": 2, **options})


def _corrupt_folder(tmp_path):
    folder = _images(tmp_path, 3)
    (folder / "1.png").write_bytes(b"not a png at all")
    return folder


def _truncated_folder(tmp_path):
    folder = _images(tmp_path, 3)
    data = (folder / "2.png").read_bytes()
    (folder / "2.png").write_bytes(data[: len(data) // 2])
    return folder


def _read_all(spec):
    dataset = load_dataset(spec)
    return [dataset[i] for i in range(len(dataset))]


def _other_model_scores(tmp_path):
    scores = _magnitude(_with_weights(seed=0))
    save_scores(scores, tmp_path / "s.safetensors")
    return amp.prune(_with_weights(seed=1), load_scores(tmp_path / "s.safetensors"), ratio=0.5)


def _other_model_search(tmp_path):
    backbone = _with_weights(seed=1)
    return amp.search(backbone, _magnitude(_with_weights(seed=0)), "synthetic:8:32", threshold=0.01, batch_size=4)


def _other_model_recover(tmp_path):
    dense, scores = _with_weights(seed=0), _magnitude(_with_weights(seed=1))
    pruned = amp.prune(_with_weights(seed=1), scores, ratio=0.5)
    return amp.recover(pruned, "lstsq", "synthetic:8:32", dense, scores, calib_images=8, batch_size=4)


def _resume_other_data(tmp_path):
    state = tmp_path / "state.json"
    scores = _magnitude(tiny("open_clip"))
    for seed in (10, 20):  # the same number of images, other pixels
        batches = [(images_for(tiny("open_clip"), 6, seed=seed + i), None) for i in range(2)]
        amp_search(tiny("open_clip"), scores, batches, Entropy(5.0), 2e-3, state_path=state, resume=True,
                   progress=False)  # fmt: skip


def _two_mlps_per_block(tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, embed_dim=48, num_heads=2)
    model.blocks[1].extra_mlp = Mlp(48, 96)
    return amp.models.backbone_from(model, {"family": "timm", "name": "vit_tiny_patch16_224"}, "custom").sites()


def _unlabelled_classification(tmp_path):
    return evaluate(tiny("dinov2"), classification=f"folder:{_images(tmp_path)}", batch_size=4, throughput_batch=2)


def _unlabelled_knn(tmp_path):
    suite = EvalSuite(knn_train="synthetic:8:28", knn_test="synthetic:4:28", batch_size=4)  # synthetic: no labels
    return suite.measure(tiny("dinov2"))


FRONT_DOOR = {
    "score: batch of one image": (lambda p: _score("synthetic:8:32", batch_size=1), BatchTooSmallError,
                                  r"synthetic:8:32: a batch of 1 image.*--batch-size"),
    "score: one image in all": (lambda p: _score("synthetic:1:32"), BatchTooSmallError, r"synthetic:1:32.*needs ≥ 2"),
    "search: one validation image": (lambda p: _search("synthetic:1:32"), BatchTooSmallError, r"synthetic:1:32"),
    "search: validation batches of one": (lambda p: _search(batch_size=1), BatchTooSmallError, r"batch of 1"),
    "score: all-zero Taylor scores": (
        lambda p: taylor_scores(tiny("timm_vit"), [(images_for(tiny("timm_vit"), 4), None)], Flat(), progress=False,
                                data_name="folder:/flat"),
        ValueError, r"folder:/flat: every Taylor score is 0"),
    "search: zero dense loss": (
        lambda p: amp_search(tiny("timm_vit"), _magnitude(tiny("timm_vit")), [(images_for(tiny("timm_vit"), 4), None)],
                             Flat(), 0.01, progress=False),
        ValueError, r"flat loss of the dense model is 0"),
    "scores file: all zero": (lambda p: load_scores(_scores_file(p, [torch.zeros(4), torch.zeros(4)], {})),
                              ValueError, r"s\.safetensors: every score is 0\.0"),
    "scores file: NaN": (lambda p: load_scores(_scores_file(p, [torch.rand(4), torch.tensor([1.0, float("nan")])], {})),
                         ValueError, r"s\.safetensors: layer 1 has non-finite scores"),
    "scores file: a model's weights": (lambda p: load_scores(_scores_file(p, [torch.rand(4)])), ValueError,
                                       r"s\.safetensors is not an amp scores file"),
    "scores file: garbage bytes": (lambda p: load_scores((p / "s.safetensors", (p / "s.safetensors").write_bytes(
        b"\x00" * 64))[0]), ValueError, r"s\.safetensors is not a readable scores file"),
    "scores file: widths vs its record": (
        lambda p: load_scores(_scores_file(p, [torch.rand(4)], {"dense_widths": [8]})), ValueError,
        r"records MLP widths \[8\]"),
    "scores of another model: prune": (_other_model_scores, ValueError, r"made for the model .*, not for 'timm:"),
    "scores of another model: search": (_other_model_search, ValueError, r"made for the model"),
    "scores of another model: recover": (_other_model_recover, ValueError, r"made for the model"),
    "scores of other widths": (lambda p: _search(scores=_magnitude(tiny("dinov2_swiglu"))), ValueError,
                               r"scores are for widths"),
    "round_to > width: uniform": (
        lambda p: amp.prune(tiny("timm_vit"), _magnitude(tiny("timm_vit")), ratio=0.1, round_to=2048),
        ValueError, r"round_to \(--round-to\) 2048 .* MLP width 192 of layer 0"),
    "round_to > width: global": (lambda p: _search(allocation="global", ratio=0.1, round_to=500), ValueError,
                                 r"--round-to.*width 192 of layer 0 \(blocks\.0\.mlp\)"),
    "round_to > width: amp search": (lambda p: _search(round_to=192), ValueError, r"blocks\.0\.mlp"),
    "numeric: batch_size 0": (lambda p: _score("synthetic:8:32", batch_size=0), ValueError, r"batch_size"),
    "numeric: max_images 0": (lambda p: _score("synthetic:8:32", max_images=0), ValueError, r"max_images"),
    "numeric: temp_inv 0": (lambda p: _score("synthetic:8:32", temp_inv=0.0), ValueError, r"temp_inv .* > 0"),
    "numeric: temp_inv of kl_to_dense": (lambda p: KLToDense(-1.0), ValueError, r"temp_inv"),
    "numeric: steps 0": (lambda p: _search(steps=0), ValueError, r"steps \(--steps\) must be an integer ≥ 1"),
    "numeric: threshold nan": (lambda p: _search(threshold=float("nan")), ValueError, r"threshold"),
    "numeric: ratio 1.5": (lambda p: _search(allocation="uniform", ratio=1.5), ValueError, r"ratio .*≤ 1"),
    "numeric: ratio 0": (lambda p: uniform_widths([8], 0.0), ValueError, r"ratio .*> 0"),
    "numeric: calib_images 0": (
        lambda p: amp.recover(tiny("timm_vit"), "lstsq", "synthetic:8:32", tiny("timm_vit"),
                              _magnitude(tiny("timm_vit")), calib_images=0),
        ValueError, r"calib_images"),
    "numeric: ridge < 0": (lambda p: _search(ridge=-1.0), ValueError, r"ridge"),
    "resume: other images of the same number": (_resume_other_data, ValueError, r"other settings or data"),
    "corrupt image in a folder": (lambda p: _read_all(f"folder:{_corrupt_folder(p)}"), DataSpecError,
                                  r"cannot read image .*imgs/1\.png"),
    "truncated image in a folder": (lambda p: _read_all(f"folder:{_truncated_folder(p)}"), DataSpecError,
                                    r"cannot read image .*imgs/2\.png"),
    "unlabelled folder as classification": (_unlabelled_classification, ValueError,
                                            r"classification 'folder:.*' gives no metric"),
    "unlabelled k-NN neighbours": (_unlabelled_knn, ValueError, r"kNN neighbours synthetic:8:28 needs labelled"),
    "cross_entropy on unlabelled data": (
        lambda p: build_criterion("cross_entropy", tiny("dinov2"), dataset=load_dataset(f"folder:{_images(p)}")),
        ValueError, r"cross_entropy needs class labels"),
    "parallel MLPs (ParallelThingsBlock)": (
        lambda p: load_model("timm:vit_small_patch16_18x2_224", img_size=32, depth=2, embed_dim=48, num_heads=2),
        UnsupportedModelError, r"blocks\.0 is a timm\.models\.vision_transformer\.ParallelThingsBlock"),
    "fused MLP (ParallelScalingBlock)": (
        lambda p: load_model("timm:vit_tiny_patch16_224", img_size=32, depth=2, embed_dim=48, num_heads=2,
                             block_fn=timm.models.vision_transformer.ParallelScalingBlock),
        UnsupportedModelError, r"ParallelScalingBlock"),
    "two MLPs in one block": (_two_mlps_per_block, UnsupportedModelError, r"blocks\.1 .* than one MLP \(extra_mlp"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FRONT_DOOR))
def test_front_door_refuses_with_the_culprit_named(case, tmp_path, one_thread):
    call, error, culprit = FRONT_DOOR[case]
    with pytest.raises(error, match=culprit):
        call(tmp_path)


# --- the command line: exit 2, one `amp: error:` line naming the culprit, no traceback ---------------------------


def _saved_other_tiny_clip(tmp_path):
    """The zoo's tiny CLIP with other MLP weights (the same widths), saved as a model directory."""
    other = load_model("zoo:tiny-clip")
    with torch.no_grad():
        other.sites()[0].fc_in.weight.mul_(1.01)
    amp.save_pruned(other, tmp_path / "other")
    return str(tmp_path / "other")


CLI = {
    "score --batch-size 1": lambda p: ["score", *DINO, "--data", "synthetic:8:28", "--batch-size", "1", "--out",
                                       f"{p}/s.safetensors"],
    "score one image": lambda p: ["score", *DINO, "--data", "synthetic:1:28", "--out", f"{p}/s.safetensors"],
    "score --batch-size 0": lambda p: ["score", *DINO, "--data", "synthetic:8:28", "--batch-size", "0", "--out",
                                       f"{p}/s.safetensors"],
    "score --max-images -3": lambda p: ["score", *DINO, "--data", "synthetic:8:28", "--max-images", "-3", "--out",
                                        f"{p}/s.safetensors"],
    "score --temp-inv -1": lambda p: ["score", *DINO, "--data", "synthetic:8:28", "--temp-inv", "-1", "--out",
                                      f"{p}/s.safetensors"],
    "score a corrupt image": lambda p: ["score", *DINO, "--data", f"folder:{_corrupt_folder(p)}", "--out",
                                        f"{p}/s.safetensors"],
    "prune --round-to above the width": lambda p: ["prune", *DINO, "--data", "synthetic:8:28", "--method", "magnitude",
                                                   "--allocation", "uniform", "--ratio", "0.1", "--round-to", "4096",
                                                   "--out", f"{p}/out"],
    "prune --steps 0": lambda p: ["prune", *DINO, "--data", "synthetic:8:28", "--method", "magnitude", "--threshold",
                                  "0.1", "--steps", "0", "--out", f"{p}/out"],
    "prune --ratio 2": lambda p: ["prune", *DINO, "--data", "synthetic:8:28", "--method", "magnitude", "--allocation",
                                  "global", "--ratio", "2", "--out", f"{p}/out"],
    "prune --scores of all zeros": lambda p: ["prune", *DINO, "--data", "synthetic:8:28", "--scores",
                                              str(_scores_file(p, [torch.zeros(192), torch.zeros(192)], {})),
                                              "--threshold", "0.1", "--out", f"{p}/out"],
    "prune --scores of another model": lambda p: ["prune", _saved_other_tiny_clip(p), "--data", "synthetic:4:64",
                                                  "--batch-size", "4", "--scores", str(_tiny_clip_scores(p)),
                                                  "--allocation", "uniform", "--ratio", "0.5", "--out", f"{p}/out"],
    "eval unlabelled --classification": lambda p: ["eval", *DINO, "--classification", f"folder:{_images(p)}"],
    "info of a ViT with parallel MLPs": lambda p: ["info", "timm:vit_small_patch16_18x2_224", *TINY_ARGS,
                                                   "--model-arg", "num_heads=2"],
}  # fmt: skip

CLI_CULPRITS = {
    "score --batch-size 1": r"synthetic:8:28: a batch of 1 image",
    "score one image": r"synthetic:1:28",
    "score --batch-size 0": r"batch_size \(--batch-size\)",
    "score --max-images -3": r"max_images \(--max-images\)",
    "score --temp-inv -1": r"temp_inv \(--temp-inv\)",
    "score a corrupt image": r"cannot read image .*1\.png",
    "prune --round-to above the width": r"--round-to\) 4096 .*width 192",
    "prune --steps 0": r"steps \(--steps\)",
    "prune --ratio 2": r"ratio \(--ratio\)",
    "prune --scores of all zeros": r"s\.safetensors: every score is 0",
    "prune --scores of another model": r"made for the model 'zoo:tiny-clip'",
    "eval unlabelled --classification": r"classification 'folder:",
    "info of a ViT with parallel MLPs": r"ParallelThingsBlock",
}


def _tiny_clip_scores(tmp_path):
    path = tmp_path / "clip.safetensors"
    argv = ["score", "zoo:tiny-clip", "--method", "magnitude", "--data", "synthetic:2:64", "--out", str(path)]
    assert main(argv) == 0
    return path


@pytest.mark.parametrize("case", list(CLI))
def test_cli_refuses_with_one_line(case, tmp_path, capsys, one_thread):
    import re

    argv = CLI[case](tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # what comes before is the progress bar of the work done until then
    assert last.startswith("amp: error: ") and err.count("amp: error:") == 1 and "Traceback" not in err
    assert re.search(CLI_CULPRITS[case], last), err
    assert not (tmp_path / "out" / "model.safetensors").exists()  # nothing half-made


# --- decisions on degenerate data that are not errors ----------------------------------------------------------


def test_a_one_image_last_batch_is_left_out_with_a_warning(one_thread):
    """5 images in batches of 4: the one-image tail has entropy 0 and no gradient, so it only diluted the mean. It is
    dropped with a warning: the scores are those of the 4 full-batch images, exactly."""
    backbone = tiny("timm_vit")
    with pytest.warns(UserWarning, match=r"SyntheticImages: a batch of 1 image.*left out"):
        tail = amp.score(backbone, amp.loader(backbone, "synthetic:5:32", batch_size=4, shuffle=False))
    full = amp.score(backbone, amp.loader(backbone, "synthetic:4:32", batch_size=4, shuffle=False))
    assert tail.meta["images"] == full.meta["images"] == 4
    assert all(torch.equal(a, b) for a, b in zip(tail.values, full.values))


def test_good_inputs_pass_every_check_silently(one_thread):
    backbone = _with_weights()
    scores = _magnitude(backbone)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruned = amp.prune(backbone, scores, ratio=0.5, round_to=8)
        amp.recover(pruned, "bias", "synthetic:8:32", backbone, scores, calib_images=8, batch_size=4)
    assert pruned.widths() == [96, 96, 96]


def test_scores_record_their_model(tmp_path):
    backbone = _with_weights()
    save_scores(_magnitude(backbone), tmp_path / "s.safetensors")
    loaded = load_scores(tmp_path / "s.safetensors")
    assert loaded.meta["model"] == backbone.spec and len(loaded.meta["model_fingerprint"]) == 16
    amp.prune(copy.deepcopy(backbone), loaded, ratio=0.5)  # the same weights: accepted
    assert isinstance(loaded, Scores) and loaded.source.endswith("s.safetensors")


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_flops_on_meta_equal_flops_of_the_built_model(name):
    """`amp info X` and `amp info X --meta` count the same parameters and FLOPs, for every family."""
    spec, kwargs = TINY_MODELS[name]
    real, meta = model_stats(load_model(spec, **kwargs)), model_stats(load_model(spec, device="meta", **kwargs))
    assert (real.params, real.flops, real.linear_flops) == (meta.params, meta.flops, meta.linear_flops)
    assert [b.flops for b in real.blocks] == [b.flops for b in meta.blocks]
