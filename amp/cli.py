"""The ``amp`` command (also ``python -m amp``): info, score, search, prune, eval, distill, demo, reproduce, ... Each
subcommand is a thin layer over the library; ``amp <command> --help`` shows its options, defaults and an example.

Results go to stdout, progress and information to stderr through :mod:`logging` (``-v`` more, ``-q`` less); under
``torchrun`` only rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from amp import __version__
from amp import reproduce as runner
from amp.io import check_output_dir, check_output_file, check_writable_dir, write_dir

SEARCH_STATE, CHECKPOINTS = "search_state.json", "checkpoints"
# choices and defaults that --help shows, spelled out so that the parser needs no torch (a fast `amp --help`);
# tests/test_cli_conventions.py checks them against amp.criteria, amp.distill and amp.pipeline.PipelineConfig
CRITERIA = ("entropy", "cross_entropy", "kl_to_dense")
LOSSES = ("mse_tokens", "cosine", "similarity_kl")
SHARDINGS = ("ddp", "fsdp")
DEMO_DEFAULTS = {"threshold": 0.01, "score_images": 1024, "val_images": 256}
EXAMPLES = {  # one per command, shown at the end of its --help
    "info": "amp info open_clip:ViT-g-14 --meta --per-block",
    "score": "amp score zoo:tiny-clip --data fmnist-captions:train-subset --out scores.safetensors",
    "search": "amp search zoo:tiny-clip --scores scores.safetensors --data fmnist-captions:val-subset "
    "--threshold 0.01 --out runs/tiny-search",
    "prune": "amp prune zoo:tiny-clip --scores scores.safetensors --data fmnist-captions:val-subset "
    "--threshold 0.01 --round-to 8 --out runs/tiny-amp",
    "distill": "amp distill --student runs/tiny-amp --teacher zoo:tiny-clip --data fmnist-captions:train "
    "--steps 2000 --out runs/tiny-amp-kd",
    "reproduce": "amp reproduce --profile cpu --only 02,04",
    "eval": "amp eval runs/tiny-amp --dense zoo:tiny-clip --classification fashion-mnist:test "
    "--retrieval fmnist-captions:test",
    "demo": "amp demo --out runs/demo --overwrite",
    "push": "amp push runs/tiny-amp me/tiny-clip-amp --dry-run",
}
log = logging.getLogger("amp")


def _import_library() -> None:
    """Import the library behind the commands, once the command line has been parsed.

    A deliberate exception to top-level imports: torch, open_clip and timm take seconds to import, and ``amp
    --help``, ``amp --version`` or a mistyped option need none of them (``python -X importtime -c "import amp.cli"``).
    """
    global torch, api, distributed, hub, UnsupportedModelError, NonFiniteLossError, DataSpecError, load_dataset
    global CHECKPOINT_FILE, DistillConfig, default_device, distill, train_transform, evaluate, ModelSpecError
    global write_pruned, PipelineConfig, markdown, run, set_num_workers, USER_ERRORS
    import torch

    from amp import api, distributed, hub
    from amp.adapters import UnsupportedModelError
    from amp.criteria import NonFiniteLossError
    from amp.data import DataSpecError, load_dataset, set_num_workers
    from amp.distill import CHECKPOINT_FILE, DistillConfig, default_device, distill, train_transform
    from amp.evaluation import evaluate
    from amp.models import ModelSpecError, write_pruned
    from amp.pipeline import PipelineConfig, markdown, run

    # expected failures: one "amp: error: ..." line, exit 2 (anything else is a bug: its traceback, exit 1)
    USER_ERRORS = (
        ModelSpecError,
        DataSpecError,
        UnsupportedModelError,
        NonFiniteLossError,
        ValueError,  # amp.io's OutputError and FileFormatError among them
        OSError,  # FileNotFoundError, PermissionError, a full disk, ...
        SafetensorError,
    )


def _no_default(action: argparse.Action) -> bool:
    """Whether an option has no default worth showing (None, an off flag); by identity, as 0 == False."""
    return any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS))


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default (unless None, off, or said in its help text), and the example epilog as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if _no_default(action) or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".strip()


def _model_kwargs(pairs: list[str]) -> dict[str, Any]:
    kwargs = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--model-arg expects key=value, got {pair!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", help="open_clip:<arch>[:<tag|file>], timm:<name>[:<file>], zoo:<name>, or a pruned-model dir"
    )
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="extra builder argument (JSON value)")
    _add_device(p)


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="torch device; auto: cuda if available, else cpu")


def _add_workers(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-workers", type=int, default=0, help="processes decoding images (0: the main process)")


def _add_data(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, help="data set, e.g. folder:/images, imagefolder:/imagenet/train")
    p.add_argument("--batch-size", type=int, default=32)
    _add_workers(p)
    p.add_argument("--max-images", type=int, default=None, help="use at most this many images")
    p.add_argument("--seed", type=int, default=0, help="data order and random scores")


def _add_criterion(p: argparse.ArgumentParser) -> None:
    p.add_argument("--criterion", choices=CRITERIA, default="entropy")
    p.add_argument("--temp-inv", type=float, default=15.0, help="inverse temperature of the similarity softmax")


def _add_global_batch(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="run each --batch-size batch (the criterion's global batch) through the model this many images at a "
        "time: the same result, the memory of one chunk (default: the whole batch)",
    )
    p.add_argument(
        "--precision", choices=PRECISIONS, default="fp32", help="bf16: the model under autocast, the criterion in fp32"
    )


def _load(args) -> api.Backbone:
    return api.load_model(args.model, device=args.device, **_model_kwargs(args.model_arg))


def cmd_info(args) -> None:
    backbone = (
        _load(args) if not args.meta else api.load_model(args.model, device="meta", **_model_kwargs(args.model_arg))
    )
    stats = api.model_stats(backbone)
    if args.json:
        print(json.dumps(stats.to_dict(), indent=2))
        return
    print(f"{args.model}  ({backbone.adapter.family} adapter, {len(stats.blocks)} MLPs)")
    # two FLOP conventions: every matmul (attention's q @ k^T and attn @ v included), and the paper's (linear layers
    # and the patch projection only: 0.52 T for ViT-g-14, 0.534 T with the attention matmuls)
    rows = (
        ("vision tower parameters (M)", stats.params / 1e6, stats.mlp_param_share),
        ("GFLOPs (all matmuls)", stats.flops / 1e9, stats.mlp_flop_share),
        ("GFLOPs (linear + patch, paper's convention)", stats.linear_flops / 1e9, stats.mlp_linear_flop_share),
    )
    for label, value, mlp_share in rows:
        print(f"  {label:<44} {value:10.3f}   MLP share {mlp_share:6.1%}")
    if args.per_block:
        print(f"  {'block':>5} {'width':>6} {'params (M)':>11} {'MLP params':>11} {'GFLOPs':>8} {'MLP GFLOPs':>11}")
        for b in stats.blocks:
            print(
                f"  {b.index:5d} {b.width:6d} {b.params / 1e6:11.3f} {b.mlp_params / 1e6:11.3f} "
                f"{b.flops / 1e9:8.3f} {b.mlp_flops / 1e9:11.3f}"
            )


def _scores(args, backbone):
    if getattr(args, "scores", None):
        return api.load_scores(args.scores)
    return api.score(
        backbone,
        args.data,
        method=args.method,
        criterion=args.criterion,
        temp_inv=args.temp_inv,
        batch_size=args.batch_size,
        max_images=args.max_images,
        seed=args.seed,
        signed=getattr(args, "signed", False),
        device=args.device,
        checkpoint=getattr(args, "checkpoint", False),
        chunk_size=args.chunk_size,
        autocast_dtype=torch.bfloat16 if args.precision == "bf16" else None,
    )


def cmd_score(args) -> None:
    check_output_file(args.out)
    backbone = _load(args)
    start = time.perf_counter()
    scores = _scores(args, backbone)
    if distributed.rank() == 0:  # one writer under torchrun (every rank has the same scores)
        api.save_scores(scores, args.out)
    log.info("scores for %d MLPs written to %s (%.1f s)", len(scores.values), args.out, time.perf_counter() - start)


def cmd_prune(args, save_model: bool = True) -> None:
    if args.threshold is not None and args.threshold < 0:
        raise ValueError(f"--threshold must be ≥ 0, got {args.threshold}")
    # what api.search would refuse, refused before a model is loaded (minutes for a large one)
    if args.allocation == "amp" and args.threshold is None:
        raise ValueError("--allocation amp needs --threshold (the allowed loss increase per layer, e.g. 0.01)")
    if args.allocation != "amp" and args.ratio is None:
        raise ValueError(f"--allocation {args.allocation} needs --ratio (the kept fraction of MLP units)")
    out = check_output_dir(
        args.out, overwrite=args.overwrite, resumable=SEARCH_STATE, resume=args.resume, inputs=[args.model, args.scores]
    )
    backbone = _load(args)
    scores = _scores(args, backbone)
    result = api.search(
        backbone,
        scores,
        args.val_data or args.data,
        allocation=args.allocation,
        ratio=args.ratio,
        threshold=args.threshold,
        steps=args.steps,
        rule=args.rule,
        reference=args.reference,
        round_to=args.round_to,
        compensation=args.compensate,
        ridge=args.ridge,
        criterion=args.criterion,
        temp_inv=args.temp_inv,
        batch_size=args.batch_size,
        max_images=args.max_val_images,
        seed=args.seed,
        cache=not args.no_cache,
        state_path=out / SEARCH_STATE,
        resume=args.resume,
        device=args.device,
        chunk_size=args.chunk_size,
        cache_gb=args.cache_gb,
        autocast_dtype=torch.bfloat16 if args.precision == "bf16" else None,
    )

    def write(tmp: Path) -> None:  # search.json and the model together, all or nothing
        api.write_json(tmp / "search.json", result)
        if save_model:
            write_pruned(backbone, tmp, search=result["config"], **hub.command_provenance(backbone.info))

    if distributed.rank() == 0:  # one writer under torchrun (every rank has the same result)
        write_dir(out, write, overwrite=args.overwrite or args.resume, keep=[SEARCH_STATE])
    kept = sum(result["widths"]) / sum(result["dense_widths"])
    print(f"widths: {result['widths']}")
    print(f"kept {kept:.1%} of MLP units; loss {result['dense_loss']:.5f} (dense) -> {result['final_loss']:.5f}")
    if save_model:
        log.info("pruned model written to %s", out)


def cmd_eval(args) -> None:
    if args.out:
        check_output_file(args.out)
    backbone = _load(args)
    dense = api.load_model(args.dense, device=args.device) if args.dense else None
    report = evaluate(
        backbone,
        classification=args.classification,
        retrieval=args.retrieval,
        knn_train=args.knn_train,
        dense=dense,
        batch_size=args.batch_size,
        max_images=args.max_images,
        device=args.device,
        intervals=True,
    )
    if args.out and distributed.rank() == 0:
        api.write_json(args.out, report)
    print(json.dumps(report, indent=2))


def cmd_demo(args) -> None:
    defaults = PipelineConfig()
    config = PipelineConfig(
        model=args.model,
        score_data=args.data or defaults.score_data,
        val_data=args.val_data or args.data or defaults.val_data,
        criterion=args.criterion,
        temp_inv=args.temp_inv,
        threshold=args.threshold,
        steps=args.steps,
        round_to=args.round_to,
        batch_size=args.batch_size,
        score_images=args.score_images,
        val_images=args.val_images,
        seed=args.seed,
        device=args.device,
        classification=args.classification if args.classification != "none" else None,
        retrieval=args.retrieval if args.retrieval != "none" else None,
        knn_train=args.knn_train,
        eval_images=args.eval_images,
    )
    start = time.perf_counter()
    report = run(config, args.out, overwrite=args.overwrite)
    print(markdown(report))
    log.info("pruned model and REPORT.md in %s (%.0f s in all)", args.out, time.perf_counter() - start)


def _notebook_overrides(pairs: list[str] | None) -> dict[str, dict[str, Any]]:
    """``--set NN.name=JSON`` pairs as ``{"NN": {name: value}}`` (a value that is not JSON stays a string)."""
    found: dict[str, dict[str, Any]] = {}
    for pair in pairs or []:
        match = re.fullmatch(r"(\d\d)\.(\w+)=(.*)", pair, flags=re.S)
        if not match:
            raise ValueError(f"--set expects NN.name=JSON (e.g. 02.ratios=[0.5]), got {pair!r}")
        nb, name, value = match.groups()
        try:
            found.setdefault(nb, {})[name] = json.loads(value)
        except json.JSONDecodeError:
            found.setdefault(nb, {})[name] = value
    return found


def cmd_reproduce(args) -> int:
    """Run the notebooks (or only strip them); the exit status is 1 when a notebook failed."""
    if args.strip:
        for path in runner.notebook_paths():
            print(f"{path.name}: {'stripped' if runner.strip_notebook(path) else 'clean'}")
        return 0
    if args.plan:
        from amp.plan import plan

        print(plan(args.profile, gpu=args.gpu, only=args.only)["markdown"])
        return 0
    if args.out:
        check_writable_dir(args.out)  # the notebooks' tables are rewritten in place, by design
    if args.dry_run:
        from amp.dry_run import dry_run

        result = dry_run(args.profile, only=args.only, out=args.out, overrides=_notebook_overrides(args.set),
                         keep_going=not args.stop_on_error, log_output=args.log_output, kernel=args.kernel)  # fmt: skip
    else:
        result = runner.reproduce(
            profile=args.profile,
            only=args.only,
            out=args.out,
            paper_paths={key: getattr(args, key) for key in runner.PATH_OPTIONS},
            figures=args.figures,
            kernel=args.kernel,
            overrides=_notebook_overrides(args.set),
            keep_going=not args.stop_on_error,
            log_output=args.log_output,
        )
    log.info("report: %s (%.1f min)", result["report"], result["seconds"] / 60)
    for r in result["notebooks"]:
        if not r["ok"]:
            log.error("reproduce: %s failed in %s; see %s", r["name"], r["error"], r["executed"])
    return 0 if result["ok"] else 1


# amp.distill's RECIPES and AUGMENTS, spelled out so that --help needs no torch (tests/test_distill_recipe.py checks)
DISTILL_RECIPES = ("ViT-g-14", "ViT-bigG-14", "EVA02-E-14-plus", "EVA-CLIP-8B", "dinov2-g")
AUGMENTS = ("clip", "dino")
PRECISIONS = ("fp32", "bf16")
# DistillConfig fields that the options below set when given (None: the recipe's value, or DistillConfig's default)
DISTILL_FIELDS = (
    "steps",
    "epochs",
    "batch_size",
    "lr",
    "min_lr",
    "warmup",
    "warmup_epochs",
    "weight_decay",
    "weight_decay_end",
    "decay_all",
    "device_batch",
    "activation_checkpointing",
    "precision",
    "loss",
    "temp_inv",
    "grad_clip",
    "augment",
    "sharding",
)


def _add_distill_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student", required=True, help="pruned model directory (or any model spec)")
    p.add_argument("--teacher", help="teacher model spec (default: the student's base_model from amp.json)")
    p.add_argument("--data", required=True, help="training images, e.g. imagefolder:/imagenet/train")
    p.add_argument(
        "--recipe",
        choices=DISTILL_RECIPES,
        help="the paper's settings for this model (METHOD.md §5); the options below override its values",
    )
    p.add_argument("--steps", type=int, help="optimiser steps (or --epochs, or the --recipe's epochs)")
    p.add_argument("--epochs", type=float, help="passes over --data (steps = epochs × batches per epoch)")
    p.add_argument(
        "--batch-size", type=int, help="global batch size, all processes together (default 64, or the recipe's)"
    )
    p.add_argument(
        "--device-batch",
        type=int,
        help="images per process per forward; the rest of the global batch "
        "is accumulated (default: all of the process's share, or the recipe's)",
    )
    p.add_argument(
        "--lr", type=float, help="peak learning rate, not scaled by the batch size (default 1e-4, or the recipe's)"
    )
    p.add_argument("--min-lr", type=float, help="final learning rate of the cosine (default 0, or the recipe's)")
    p.add_argument("--warmup", type=int, help="warmup steps (default 5%% of the steps, or the recipe's one epoch)")
    p.add_argument("--warmup-epochs", type=float, help="warmup in epochs, instead of --warmup")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.05, or the recipe's 0.04)")
    p.add_argument(
        "--weight-decay-end",
        type=float,
        help="cosine schedule from --weight-decay to this over the run (default: constant, or the recipe's 0.2)",
    )
    p.add_argument(
        "--decay-all",
        action=argparse.BooleanOptionalAction,
        help="decay norms, biases and embeddings too, as the reference does (default: off, or the recipe's on)",
    )
    p.add_argument(
        "--activation-checkpointing",
        action=argparse.BooleanOptionalAction,
        help="recompute each block in backward: less memory, same gradients (default: off, or the recipe's on)",
    )
    p.add_argument(
        "--precision", choices=PRECISIONS, help="bf16: autocast over fp32 weights (default fp32, or the recipe's bf16)"
    )
    p.add_argument("--loss", choices=LOSSES, help="default mse_tokens")
    p.add_argument("--temp-inv", type=float, help="inverse temperature of similarity_kl (default 15.0)")
    p.add_argument("--train-head", action="store_true", help="train the final norm/projection too")
    p.add_argument("--grad-clip", type=float, help="max gradient norm, 0: off (default 1.0; a recipe's: off)")
    p.add_argument(
        "--augment",
        nargs="?",
        const="clip",
        choices=AUGMENTS,
        help="training augmentation: clip "
        "(RandomResizedCrop 0.2-1 + flip; a bare --augment) or dino (default: the eval transform, or the "
        "recipe's)",
    )
    p.add_argument("--out", required=True, help="output directory for the distilled model")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints in --out/checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out/checkpoints")
    _add_overwrite(p)
    p.add_argument("--seed", type=int, default=0)
    _add_workers(p)
    p.add_argument("--device", default=None, help="default: cuda (cuda:LOCAL_RANK under torchrun) if available")
    p.add_argument(
        "--sharding",
        choices=SHARDINGS,
        help="under torchrun: replicate the student (ddp) or shard its weights, gradients and optimiser (fsdp); "
        "default ddp, or the recipe's",
    )
    p.add_argument("--no-progress", action="store_true")


def _distill_config(args):
    """The DistillConfig the options ask for (the recipe's, with the options given on top), checked."""
    fields = {name: getattr(args, name) for name in DISTILL_FIELDS if getattr(args, name) is not None}
    if fields.get("grad_clip") == 0:
        fields["grad_clip"] = None
    if args.train_head:
        fields["train_head"] = True
    fields.update(seed=args.seed, num_workers=args.num_workers, progress=not args.no_progress)
    if args.recipe is not None:
        config = DistillConfig.from_recipe(args.recipe, **fields)
    elif "steps" not in fields and "epochs" not in fields:
        raise ValueError("amp distill needs the run's length: --steps, --epochs or --recipe")
    else:
        config = DistillConfig(**{"batch_size": 64, **fields})
    config.check()
    return config


def cmd_distill(args) -> None:
    """Load the student and its teacher, distil, and save the student (rank 0) with its distillation provenance."""
    from amp.distill import SHARDED_CHECKPOINT

    config = _distill_config(args)  # before any model loads
    world = distributed.world_size()
    fsdp = config.sharding == "fsdp" and world > 1  # the student stays on the CPU; only its shards go to the GPU
    out = check_output_dir(
        args.out,
        overwrite=args.overwrite,
        resumable=f"{CHECKPOINTS}/{SHARDED_CHECKPOINT if fsdp else CHECKPOINT_FILE}",
        resume=args.resume,
        inputs=[args.student, args.teacher],
    )
    device = torch.device(args.device) if args.device else default_device(world)
    config.checkpoint_dir, config.checkpoint_every = out / CHECKPOINTS, args.checkpoint_every
    config.resume, config.device = args.resume, device
    student = api.load_model(args.student, device="cpu" if fsdp else str(device))
    teacher_spec = args.teacher or student.info.get("base_model")
    if not teacher_spec or teacher_spec == args.student:
        raise ValueError("no teacher: pass --teacher (the student's amp.json names no base_model)")
    teacher = api.load_model(teacher_spec, device=str(device))
    transform = train_transform(student, config.augment) if config.augment else student.preprocess
    dataset = load_dataset(args.data, transform)
    result = distill(student, teacher, dataset, config=config)
    if distributed.rank() == 0:
        provenance = {
            **result["settings"],
            "recipe": args.recipe,
            "teacher": teacher_spec,
            "data": args.data,
            "world_size": world,
            "final_loss": result["final_loss"],
            "wall_time_s": result["wall_time_s"],
        }
        student.info.setdefault("base_model", teacher_spec)
        api.save_pruned(
            student,
            out,
            overwrite=args.overwrite or args.resume,
            keep=[CHECKPOINTS],
            distill=provenance,
            **hub.command_provenance(student.info),
        )
        print(
            f"distilled {result['steps']} steps: loss {result['history'][0]['loss']:.5g} -> "
            f"{result['final_loss']:.5g}, {result['images_per_s']:.1f} images/s; model written to {out}"
        )


def _evaluation(directory: Path) -> tuple[str | None, dict[str, Any] | None]:
    """The evaluation beside a pruned model (amp demo's report.json, with intervals) as Markdown, and its settings."""
    file = directory / "report.json"
    report = json.loads(file.read_text()) if file.is_file() else None
    if not isinstance(report, dict) or "intervals" not in report:
        return None, None  # none, or another tool's report: the card says it has no evaluation
    return markdown(report), report.get("config")


def cmd_push(args) -> None:
    """Upload a pruned model with its generated model card (``--dry-run``: show the files and the card only)."""
    directory = Path(args.model_dir)
    backbone = api.load_pruned(directory, device="meta")  # checks the directory; the card needs shapes only
    evaluation, config = _evaluation(directory)
    card = hub.model_card(backbone, evaluation, repo_id=args.repo_id, config=config)
    if args.dry_run:
        for op in hub.commit_operations(directory, card):
            print(f"{op.path_in_repo:<20} {op.upload_info.size:>12} bytes")
        print(card)
        return
    commit = hub.push(
        directory,
        args.repo_id,
        card,
        revision=args.revision,
        private=args.private or None,
        create_pr=args.create_pr,
        commit_message=args.message,
    )
    print(f"{directory} pushed to {commit.commit_url}; load it with amp.load_model('hf-hub:{args.repo_id}')")


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (or an input) whole")


def build_parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)  # --debug, -v, -q before or after the subcommand
    parser = argparse.ArgumentParser(
        prog="amp",
        description="Adaptive MLP Pruning of vision transformers",
        epilog="example: amp demo   (the whole job offline; amp <command> --help for each command)",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    for p, default in ((debug, argparse.SUPPRESS), (parser, None)):
        p.add_argument("--debug", action="store_true", default=default or False, help="show tracebacks of errors")
        p.add_argument("-v", "--verbose", action="count", default=default or 0, help="more log output (-vv: debug)")
        p.add_argument("-q", "--quiet", action="count", default=default or 0, help="less log output (-qq: errors)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    add = functools.partial(sub.add_parser, parents=[debug], formatter_class=_HelpFormatter)

    p = add("info", help="parameters and FLOPs, with the MLP share")
    _add_model(p)
    p.add_argument("--per-block", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--meta", action="store_true", help="build on the meta device (no weights, any size)")
    p.set_defaults(func=cmd_info)

    p = add("score", help="importance of every MLP hidden unit")
    _add_model(p)
    _add_data(p)
    _add_criterion(p)
    p.add_argument("--method", choices=("taylor", "magnitude", "random"), default="taylor")
    p.add_argument("--signed", action="store_true", help="keep the sign of the per-image Taylor sums")
    p.add_argument("--checkpoint", action="store_true", help="recompute blocks in backward (less memory)")
    _add_global_batch(p)
    p.add_argument("--out", required=True, help="scores file (.safetensors)")
    p.set_defaults(func=cmd_score)

    for name, save in (("search", False), ("prune", True)):
        p = add(name, help="find per-layer widths" + (" and save the pruned model" if save else ""))
        _add_model(p)
        _add_data(p)
        _add_criterion(p)
        p.add_argument("--scores", help="scores file from 'amp score' (default: score first, with --method)")
        p.add_argument("--method", choices=("taylor", "magnitude", "random"), default="taylor")
        p.add_argument("--val-data", help="data set for the search (default: --data)")
        p.add_argument("--max-val-images", type=int, default=None)
        p.add_argument("--allocation", choices=("amp", "uniform", "global"), default="amp")
        p.add_argument("--ratio", type=float, help="kept fraction for uniform/global allocations")
        p.add_argument("--threshold", type=float, default=None, help="allowed loss increase per layer (amp)")
        p.add_argument("--steps", type=int, default=6)
        p.add_argument("--rule", choices=("increase", "absolute"), default="increase")
        p.add_argument("--reference", choices=("previous", "dense"), default="previous")
        p.add_argument("--round-to", type=int, default=1, help="keep widths multiples of this")
        p.add_argument(
            "--compensate",
            choices=("none", "bias", "lstsq"),
            default="none",
            help="training-free correction of fc_out for the removed units (in every probe and the result)",
        )
        p.add_argument("--ridge", type=float, default=1e-4, help="lstsq ridge, relative to the kept units' variance")
        p.add_argument("--no-cache", action="store_true", help="run the full model for every probe")
        _add_global_batch(p)
        p.add_argument(
            "--cache-gb",
            type=float,
            default=4.0,
            help="memory bound of the search's caches and validation images (on a GPU: this much GPU memory and this "
            "much host memory); beyond it, disk and recomputation (same widths)",
        )
        p.add_argument("--resume", action="store_true", help="continue an interrupted search in --out")
        p.add_argument("--out", required=True, help="output directory")
        _add_overwrite(p)
        p.set_defaults(func=lambda a, save=save: cmd_prune(a, save_model=save))

    p = add("distill", help="recover a pruned model by distillation from its dense original")
    _add_distill_arguments(p)
    p.set_defaults(func=cmd_distill)

    p = add("reproduce", help="run the notebooks with papermill and collect their tables")
    p.add_argument("--profile", choices=runner.PROFILES, default="cpu", help="cpu: offline, minutes; paper: GPUs, data")
    p.add_argument("--only", help="comma-separated notebook numbers or names, e.g. 02,04")
    p.add_argument("--out", help="output folder (default results/<profile>)")
    p.add_argument("--figures", help="figure folder (default figures/ for results/cpu, else <out>/figures)")
    for key, text in runner.PATH_OPTIONS.items():
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, help=f"paper profile: {text}")
    p.add_argument("--set", action="append", metavar="NN.NAME=JSON", help="override a parameter, e.g. 02.ratios=[0.5]")
    p.add_argument("--kernel", default=runner.KERNEL, help="Jupyter kernel (default: this interpreter's python3)")
    p.add_argument("--stop-on-error", action="store_true", help="stop at the first failing notebook")
    p.add_argument("--log-output", action="store_true", help="stream the notebooks' output")
    p.add_argument("--strip", action="store_true", help="only strip the outputs of notebooks/*.ipynb (before commit)")
    p.add_argument("--dry-run", action="store_true", help="rehearse: stand-in models, generated data, clamped sizes")
    p.add_argument("--plan", action="store_true", help="print peak GPU memory and GPU-hours per model; run nothing")
    p.add_argument("--gpu", choices=("A100-80GB", "H100-80GB", "H200"), default="H100-80GB", help="GPU of --plan")
    p.set_defaults(func=cmd_reproduce)

    p = add("eval", help="evaluate a model: size, speed and quality")
    _add_model(p)
    p.add_argument("--classification", help="labelled data set (zero-shot for CLIP models, k-NN with --knn-train)")
    p.add_argument("--retrieval", help="captioned data set (CLIP models)")
    p.add_argument("--knn-train", help="labelled data set of k-NN neighbours")
    p.add_argument("--dense", help="the unpruned model, for fidelity and speed-up")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-images", type=int, default=None)
    _add_workers(p)
    p.add_argument("--out", help="write the report as JSON here")
    p.set_defaults(func=cmd_eval)

    p = add("demo", help="the main job: score, search, prune, evaluate and report (offline default)")
    p.add_argument("--model", default="zoo:tiny-clip")
    _add_device(p)
    _add_workers(p)
    p.add_argument("--data", help="scoring data (default: captioned Fashion-MNIST, train subset)")
    p.add_argument("--val-data", help="search data (default: --data, or the captioned validation subset)")
    _add_criterion(p)
    p.add_argument("--threshold", type=float, default=DEMO_DEFAULTS["threshold"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--round-to", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--score-images", type=int, default=DEMO_DEFAULTS["score_images"])
    p.add_argument("--val-images", type=int, default=DEMO_DEFAULTS["val_images"])
    p.add_argument("--eval-images", type=int, default=None)
    p.add_argument("--classification", default="fashion-mnist:test-subset", help="labelled eval data, or none")
    p.add_argument("--retrieval", default="fmnist-captions:test-subset", help="captioned eval data, or none")
    p.add_argument("--knn-train", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo")
    _add_overwrite(p)
    p.set_defaults(func=cmd_demo)

    p = add("push", help="upload a pruned model to the Hugging Face Hub with a generated model card")
    p.add_argument("model_dir", help="pruned model directory (from amp prune, demo or distill)")
    p.add_argument("repo_id", help="Hub repository <user or organisation>/<name>, created if missing")
    p.add_argument("--revision", help="branch to commit to (default: main)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--message", help="commit message")
    p.add_argument("--dry-run", action="store_true", help="print the files and the model card; upload nothing")
    p.set_defaults(func=cmd_push)
    return parser


def _one_line(err: BaseException) -> str:
    """The message of an expected failure, naming the file for an OSError (its str() alone may not)."""
    if isinstance(err, OSError) and err.strerror and err.filename:
        return f"{err.filename}: {err.strerror}"
    if isinstance(err, SafetensorError):
        return f"unreadable safetensors file ({err}): it is truncated or not a safetensors file"
    return str(err) or type(err).__name__


def _finish_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Each command's example (:data:`EXAMPLES`) as the epilog of its --help, and a default shown for every option
    that has one but no help text (argparse prints nothing at all for those)."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        command.epilog = f"example:\n  {EXAMPLES[name]}" if name in EXAMPLES else None
        for action in command._actions:
            if action.help is None and not _no_default(action):
                action.help = "default: %(default)s"
    return parser


class _StderrHandler(logging.StreamHandler):
    """A handler writing to the ``sys.stderr`` of the moment (one replaced since, e.g. by pytest, is never stale)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_output(verbose: int, quiet: int) -> None:
    """Log to stderr at INFO (``-v`` DEBUG, ``-q`` WARNING, ``-qq`` ERROR); ranks other than 0 log errors only."""
    level = min(max(logging.INFO + 10 * (quiet - verbose), logging.DEBUG), logging.ERROR)
    if distributed.rank() != 0:
        level = logging.ERROR
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("amp: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)


@contextlib.contextmanager
def _stdout_of_this_rank() -> Iterator[None]:
    """stdout as it is on rank 0, /dev/null on the others (every rank computes the same results; one prints them)."""
    if distributed.rank() == 0:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def main(argv: list[str] | None = None) -> int:
    args = _finish_help(build_parser()).parse_args(argv)
    _import_library()
    if getattr(args, "device", None) == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    distributed.init_from_env()  # a no-op unless started by torchrun
    _configure_output(args.verbose, args.quiet)
    if getattr(args, "num_workers", None) is not None:
        set_num_workers(args.num_workers)  # every loader the library makes for this command
    try:
        with hub.running_command(sys.argv[1:] if argv is None else argv), _stdout_of_this_rank():
            status = args.func(args)  # (the exact command is recorded for provenance)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print("amp: interrupted (prune, search and distill continue with --resume)", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if args.debug:
            traceback.print_exc()
        print(f"amp: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        traceback.print_exc()
        print(
            f"amp: internal error ({type(err).__name__}): this is a bug in amp; please report it with the traceback "
            "above and the command line",
            file=sys.stderr,
        )
        return 1
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
