"""Train ``zoo:tiny-clip`` on captioned Fashion-MNIST, on the CPU, reproducibly.

    python -m amp.zoo.train_tiny_clip --out data/zoo            # needs `apt-get install dataset-fashion-mnist`

Data: the ``fmnist-captions:train`` scenes (:mod:`amp.zoo.fashion`;
scene ``i`` of the stream is scene ``i`` of that split,
continuing past its 55,000 scenes when the run needs more) plus full-frame grey Fashion-MNIST training images (images
0–54,999, in seeded per-epoch permutations) for the class prompts.

Loss per step: CLIP's symmetric contrastive loss over the composites and their captions (captions that occur twice in
a batch count as positives of each other) plus a zero-shot classification loss: the full-frame images against the ten
class embeddings, each the normalised mean of :data:`amp.zoo.fashion.FASHION_TEMPLATES` prompts (as zero-shot evaluation
builds them). AdamW, linear warm-up then cosine decay.

Reproducible bit for bit from ``--seed`` on one machine: fixed thread count, ``torch.use_deterministic_algorithms``,
seeded initialisation and data order. Writes ``tiny-clip.safetensors`` (float16) atomically, then ``tiny-clip.json``
(sha256, config, seed, steps, wall time, quality) and ``tiny-clip.md`` (a human-readable report). Quality is measured on
the saved (float16) weights with :mod:`amp.evaluation`: zero-shot top-1 on the Fashion-MNIST test set (class prompts
only) and image-text retrieval on ``fmnist-captions:test`` (1,000 distinct captions).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from amp.adapters import adapter_for
from amp.data import load_dataset, make_loader
from amp.evaluation import retrieval, zero_shot_classification
from amp.zoo.fashion import (
    FASHION_CLASSES,
    FASHION_TEMPLATES,
    MEAN,
    SPLIT_IDS,
    STD,
    VAL_START,
    CaptionedFashion,
    load_fashion_mnist,
)
from amp.zoo.tiny_clip import ARCH, META_NAME, WEIGHTS_NAME, load_tiny_clip, quiet_open_clip, sha256_file


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 1200
    caption_batch: int = 96  # composites per step
    class_batch: int = 96  # full-frame class-prompt images per step
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 100
    threads: int = 1  # one thread: faster than two on a shared 2-core machine (no OpenMP spin-waits)
    class_weight: float = 1.0
    autocast: str = "bfloat16"  # CPU autocast dtype for the forward pass ("float32": none); bf16 is ~2x faster
    items: int = 0  # use only the first `items` training images (0: all); for tests
    subset: bool = False  # train on the committed subset instead of the full data set; for tests
    arch: str = ARCH


# --- data ---------------------------------------------------------------------------------------


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] → normalised float [N, 3, H, W], exactly as ``amp.zoo.fashion.fashion_transform`` does."""
    x = torch.from_numpy(np.array(images, copy=True)).permute(0, 3, 1, 2).float().div(255.0)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def full_frame(item: np.ndarray, size: int = 64) -> np.ndarray:
    """A 28×28 grey item as the eval transform shows it: bicubic upscale to ``size``, RGB uint8."""
    grey = np.asarray(Image.fromarray(item, "L").convert("RGB").resize((size, size), Image.BICUBIC))
    return grey


class TrainStream:
    """The batches of a run: step ``s`` always gets the same composites, captions and class-prompt images."""

    def __init__(self, config: TrainConfig):
        self.config = config
        if config.subset:
            images, labels = load_fashion_mnist("train-subset")
            split_id = SPLIT_IDS["train"] + 10
        else:
            images, labels = load_fashion_mnist("train")
            images, labels = images[:VAL_START], labels[:VAL_START]
            split_id = SPLIT_IDS["train"]
        if config.items:
            images, labels = images[: config.items], labels[: config.items]
        self.images, self.labels = images, labels
        count = max(1, config.steps * config.caption_batch)
        self.scenes = CaptionedFashion(images, labels, count, seed=config.seed, split_id=split_id)

    def _class_indices(self, step: int) -> np.ndarray:
        n, b = len(self.images), self.config.class_batch
        positions = np.arange(step * b, (step + 1) * b)
        out = np.empty(b, np.int64)
        for epoch in np.unique(positions // n):
            rows = positions // n == epoch
            perm = np.random.default_rng([self.config.seed, 99, int(epoch)]).permutation(n)
            out[rows] = perm[positions[rows] % n]
        return out

    def batch(self, step: int) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
        b = self.config.caption_batch
        rows = range(step * b, (step + 1) * b)
        scenes = _to_tensor(np.stack([self.scenes.render(i) for i in rows])) if b else torch.zeros(0, 3, 64, 64)
        captions = [self.scenes.captions[i] for i in rows]
        if self.config.class_batch:
            index = self._class_indices(step)
            frames = _to_tensor(np.stack([full_frame(self.images[i]) for i in index]))
            labels = torch.from_numpy(self.labels[index].astype(np.int64))
        else:
            frames, labels = torch.zeros(0, 3, 64, 64), torch.zeros(0, dtype=torch.long)
        return scenes, captions, frames, labels


# --- model, loss --------------------------------------------------------------------------------


@contextlib.contextmanager
def deterministic(threads: int):
    """Fixed thread count and deterministic algorithms for the block; the previous settings come back after."""
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])


def build_model(config: TrainConfig) -> torch.nn.Module:
    torch.manual_seed(config.seed)
    with quiet_open_clip():
        return open_clip.create_model(config.arch, pretrained=None, device="cpu")


def class_embeddings(model, tokenizer, templates=FASHION_TEMPLATES, classes=FASHION_CLASSES) -> torch.Tensor:
    """[classes, dim]: per class the normalised mean of its normalised prompt embeddings (the zero-shot head)."""
    prompts = [t.format(c=c) for c in classes for t in templates]
    text = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1).view(len(classes), len(templates), -1)
    return F.normalize(text.mean(dim=1), dim=-1)


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, inverse: torch.Tensor, scale: torch.Tensor):
    """CLIP loss with ``text`` holding the unique captions; image ``i``'s caption is ``text[inverse[i]]``."""
    logits = scale * image @ text.T  # (images, unique texts)
    image_to_text = F.cross_entropy(logits, inverse)
    positives = F.one_hot(inverse, len(text)).T.float()  # (texts, images)
    targets = positives / positives.sum(dim=1, keepdim=True)
    text_to_image = -(targets * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def training_loss(model, tokenizer, batch, config: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    scenes, captions, frames, labels = batch
    images = F.normalize(model.encode_image(torch.cat([scenes, frames])), dim=-1)
    scale = model.logit_scale.exp()
    loss = images.new_zeros(())
    parts = {}
    if len(captions):
        unique, inverse = np.unique(np.array(captions), return_inverse=True)
        text = F.normalize(model.encode_text(tokenizer(list(unique))), dim=-1)
        clip = contrastive_loss(images[: len(scenes)], text, torch.from_numpy(inverse.reshape(-1)).long(), scale)
        loss = loss + clip
        parts["clip"] = clip.item()
    if len(frames):
        heads = class_embeddings(model, tokenizer)
        cls = F.cross_entropy(scale * images[len(scenes) :] @ heads.T, labels)
        loss = loss + config.class_weight * cls
        parts["cls"] = cls.item()
    return loss, parts


def _autocast(config: TrainConfig):
    if config.autocast == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=getattr(torch, config.autocast))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "logit_scale" in name or "ln" in name or "bias" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(config: TrainConfig, progress: bool = True, log_every: int = 50) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train from scratch; returns the model (float32, eval mode) and a log."""
    with deterministic(config.threads):
        return _train(config, progress, log_every)


def _train(config: TrainConfig, progress: bool, log_every: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    stream = TrainStream(config)
    model = build_model(config)
    tokenizer = open_clip.get_tokenizer(config.arch)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    model.train()
    history, start = [], time.time()
    bar = tqdm(range(config.steps), desc="train tiny-clip", disable=not progress, mininterval=2.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        with _autocast(config):
            loss, parts = training_loss(model, tokenizer, stream.batch(step), config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % log_every == 0 or step == config.steps - 1:
            history.append({"step": step, "loss": round(loss.item(), 4), **{k: round(v, 4) for k, v in parts.items()}})
            bar.set_postfix(loss=f"{loss.item():.3f}", **{k: f"{v:.3f}" for k, v in parts.items()})
    return model.eval(), {"train_seconds": round(time.time() - start, 1), "history": history}


# --- parameters, saving ---------------------------------------------------------------------------


def parameter_counts(model: torch.nn.Module) -> dict[str, Any]:
    vision = adapter_for(model).vision(model)
    vision_params = sum(p.numel() for p in vision.parameters())
    mlp = sum(p.numel() for site in adapter_for(model).sites(model) for m in site.linears() for p in m.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {
        "vision": vision_params,
        "vision_mlp": mlp,
        "vision_mlp_share": round(mlp / vision_params, 4),
        "text_and_rest": total - vision_params,
        "total": total,
    }


def save_weights(model: torch.nn.Module, out: Path, dtype: torch.dtype = torch.float16) -> Path:
    """State dict as safetensors, written to a temporary file and renamed (atomic)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    target = out / WEIGHTS_NAME
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".tiny-clip.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"arch": ARCH})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's mode
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- evaluation -----------------------------------------------------------------------------------


def measure(backbone, full: bool = True, batch_size: int = 250) -> dict[str, Any]:
    """Zero-shot top-1 on Fashion-MNIST test (class prompts only) and retrieval on the captioned test split."""
    suffix = "" if full else "-subset"
    classify = load_dataset(f"fashion-mnist:test{suffix}", backbone.preprocess)
    zero_shot = zero_shot_classification(
        backbone, make_loader(classify, batch_size), FASHION_CLASSES, FASHION_TEMPLATES
    )
    pairs = load_dataset(f"fmnist-captions:test{suffix}", backbone.preprocess)
    assert len(set(pairs.captions)) == len(pairs) >= 500
    recall = retrieval(backbone, make_loader(pairs, batch_size))
    return {
        "zero_shot": {"data": f"fashion-mnist:test{suffix}", "templates": list(FASHION_TEMPLATES), **zero_shot},
        "retrieval": {"data": f"fmnist-captions:test{suffix}", **recall},
    }


def report_markdown(meta: dict[str, Any]) -> str:
    q, p, c = meta["quality"], meta["params"], meta["train_config"]
    z, r = q["zero_shot"], q["retrieval"]
    lines = [
        "# zoo:tiny-clip",
        "",
        f"open_clip architecture `{meta['config']}` trained from scratch on captioned Fashion-MNIST on the CPU by",
        f"`python -m amp.zoo.train_tiny_clip --out data/zoo --seed {meta['seed']}` "
        f"({meta['steps']} steps, {meta['train_seconds'] / 60:.1f} min on {meta['threads']} CPU thread"
        f"{'s' if meta['threads'] != 1 else ''}, "
        f"torch {meta['torch']}).",
        "",
        f"Weights: `{meta['weights']}` ({meta['dtype']}, {meta['bytes'] / 1e6:.1f} MB), sha256 `{meta['sha256']}`.",
        "",
        "| parameters | count |",
        "|---|---|",
        f"| image tower | {p['vision']:,} |",
        f"| image-tower MLPs | {p['vision_mlp']:,} ({100 * p['vision_mlp_share']:.1f}%) |",
        f"| text tower and the rest | {p['text_and_rest']:,} |",
        "",
        f"Recipe: per step {c['caption_batch']} `fmnist-captions:train` composites with their captions (CLIP loss) and "
        f"{c['class_batch']} full-frame Fashion-MNIST training images against the class prompts (zero-shot "
        f"cross-entropy); AdamW lr {c['lr']:g}, weight decay {c['weight_decay']:g}, {c['warmup']} warm-up steps then "
        f"cosine; {c['autocast']} autocast. Wall time was measured on a shared 2-core machine.",
        "",
        "Quality of the saved weights, on data never used in training:",
        "",
        f"- zero-shot classification, `{z['data']}` ({z['count']} images, class prompts "
        f"{', '.join(repr(t) for t in z['templates'])}): top-1 **{100 * z['top1']:.1f}%**, "
        f"top-5 {100 * z['top5']:.1f}%",
        f"- image-text retrieval, `{r['data']}` ({r['images']} images, {r['texts']} distinct captions):",
        "",
        "| direction | R@1 | R@5 | R@10 |",
        "|---|---|---|---|",
        "| image → text | " + " | ".join(f"{100 * r[f'i2t_R@{k}']:.1f}%" for k in (1, 5, 10)) + " |",
        "| text → image | " + " | ".join(f"{100 * r[f't2i_R@{k}']:.1f}%" for k in (1, 5, 10)) + " |",
        "",
        "Quality bar: zero-shot top-1 ≥ 85% and image→text R@1 ≥ 30%: "
        + ("**met**." if z["top1"] >= 0.85 and r["i2t_R@1"] >= 0.30 else "**not met**."),
        "",
    ]
    return "\n".join(lines)


def build(config: TrainConfig, out: Path, progress: bool = True, evaluate: bool = True) -> dict[str, Any]:
    """Train, save atomically, measure the saved weights, write ``tiny-clip.json`` and ``tiny-clip.md``."""
    model, log = train(config, progress=progress)
    weights = save_weights(model, out)
    meta: dict[str, Any] = {
        "config": config.arch,
        "weights": WEIGHTS_NAME,
        "sha256": sha256_file(weights),
        "bytes": weights.stat().st_size,
        "dtype": "float16",
        "seed": config.seed,
        "steps": config.steps,
        "threads": config.threads,
        "train_config": asdict(config),
        "train_seconds": log["train_seconds"],
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "machine": platform.machine(),
        "params": parameter_counts(model),
        "history": log["history"],
        "rebuild": f"python -m amp.zoo.train_tiny_clip --out data/zoo --seed {config.seed}",
    }
    _write_atomic(out / META_NAME, json.dumps(meta, indent=2) + "\n")
    if evaluate:
        backbone = load_tiny_clip(directory=out)  # checks the sha256 and loads strictly: what users get
        with deterministic(config.threads):
            meta["quality"] = measure(backbone, full=not config.subset)
        _write_atomic(out / META_NAME, json.dumps(meta, indent=2) + "\n")
        _write_atomic(out / "tiny-clip.md", report_markdown(meta))
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/zoo"))
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--no-eval", action="store_true", help="skip the quality measurement")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    meta = build(config, args.out, progress=not args.quiet, evaluate=not args.no_eval)
    print(json.dumps({k: meta[k] for k in ("sha256", "steps", "train_seconds", "params", "quality") if k in meta}))


if __name__ == "__main__":
    main()
