"""Stand-ins for the paper's models: tiny random-initialised networks of the same families, for rehearsals.

``amp reproduce --profile paper --dry-run`` (:mod:`amp.dry_run`) swaps every model of the paper profile for one of these
so that every notebook runs its real code path (same adapters, same MLP layouts, same text towers) in minutes on a
CPU. They carry no knowledge: their numbers mean nothing, only that the run starts and finishes.

* ``zoo:standin-openclip``: an open_clip ``VisionTransformer`` + text transformer (architecture
  ``amp-standin-openclip``, ``amp/zoo/configs``), as OpenCLIP ViT-g-14 / bigG-14 are.
* ``zoo:standin-eva``: an open_clip CLIP whose image tower is a timm EVA02 trunk (``TimmModel`` around timm
  ``amp_standin_eva02``: rotary position embeddings, post-norm blocks, the layout of ``eva02_enormous_patch14_clip_224``
  inside open_clip's ``EVA02-E-14-plus``), so the open_clip-with-timm-trunk adapter runs.
* ``zoo:standin-dinov2``: timm ``amp_standin_dinov2``, a DINOv2 ViT with registers, LayerScale and a packed SwiGLU MLP
  (``vit_giant_patch14_dinov2``'s ``SwiGLUPacked`` + ``SiLU``), as DINOv2-g is.

Every load gives the same weights (a fixed seed, the global RNG untouched), so a teacher loaded twice is one teacher
and a pruned stand-in saved by one notebook reloads in the next (the records name registered architectures, which
this module registers with open_clip and timm when :mod:`amp.zoo` is imported).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import open_clip
import torch
from timm.layers import SwiGLUPacked
from timm.models import register_model
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from amp.adapters import quiet_open_clip
from amp.models import Backbone, ModelSpecError, load_model

IMAGE_SIZE = 56  # px: a 4 x 4 grid of 14 px patches, the paper models' patch size
PATCH_SIZE = 14
WIDTH, DEPTH, HEADS = 64, 2, 2
SEED = 0
OPENCLIP_ARCH, EVA_ARCH = "amp-standin-openclip", "amp-standin-eva"
EVA_TRUNK, DINOV2_NAME = "amp_standin_eva02", "amp_standin_dinov2"
STANDINS = ("openclip", "eva", "dinov2")  # zoo:standin-<family>

open_clip.add_model_config(Path(__file__).resolve().parent / "configs")


def _builder_arguments(name: str, pretrained: bool, kwargs: dict[str, Any], **own: Any) -> dict[str, Any]:
    """The stand-in's shape and ``own`` arguments updated with the caller's (timm's factory passes its
    pretrained-config bookkeeping to every builder; the bare classes take none of it)."""
    if pretrained:
        raise ModelSpecError(f"{name} is a random stand-in: it has no pretrained weights")
    shape = dict(img_size=IMAGE_SIZE, patch_size=PATCH_SIZE, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS)
    given = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
    return {**shape, **own, **given}


@register_model
def amp_standin_eva02(pretrained: bool = False, **kwargs: Any) -> Eva:
    """A 2-block EVA02 trunk shaped like ``eva02_enormous_patch14_clip_224`` (post-norm, plain MLP, rotary)."""
    own = dict(mlp_ratio=4.0, use_post_norm=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4), global_pool="token")
    return Eva(**_builder_arguments(EVA_TRUNK, pretrained, kwargs, **own))


@register_model
def amp_standin_dinov2(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """A 2-block DINOv2 ViT with 4 registers, LayerScale and a packed SwiGLU MLP (2 x 176 units: an even split)."""
    own = dict(init_values=1e-5, reg_tokens=4, no_embed_class=True, mlp_ratio=5.5, mlp_layer=SwiGLUPacked)
    return VisionTransformer(**_builder_arguments(DINOV2_NAME, pretrained, kwargs, **own, act_layer=torch.nn.SiLU))


SPECS = {
    "openclip": f"open_clip:{OPENCLIP_ARCH}",
    "eva": f"open_clip:{EVA_ARCH}",
    "dinov2": f"timm:{DINOV2_NAME}",
}


def load_standin(family: str, device: str | torch.device = "cpu", **kwargs: Any) -> Backbone:
    """``zoo:standin-<family>`` (``openclip``, ``eva``, ``dinov2``): the same random weights at every load.

    ``kwargs`` go to the builder (``img_size`` for the DINOv2 stand-in, as the paper profile passes to timm).
    """
    if family not in SPECS:
        raise ModelSpecError(f"unknown stand-in {family!r}; available: {', '.join(f'standin-{f}' for f in STANDINS)}")
    if family != "dinov2" and kwargs:
        raise ModelSpecError(f"zoo:standin-{family} takes no builder arguments, got {sorted(kwargs)}")
    with torch.random.fork_rng(devices=[]), quiet_open_clip():
        torch.manual_seed(SEED)
        backbone = load_model(SPECS[family], device="cpu", **kwargs)
    backbone.model.to(device)
    backbone.spec = f"zoo:standin-{family}"
    backbone.info.update({"weights": "random stand-in (amp.zoo.standins)", "standin_of": family})
    return backbone


def standin_for(spec: str) -> str:
    """The stand-in of a model spec's family: EVA (open_clip or timm) → eva, DINOv2 → dinov2, else openclip.

    A rule on the name, not on the weights (a rehearsal must not download them).
    """
    lowered = spec.lower()
    prefix = lowered.partition(":")[0]
    if "dinov2" in lowered:
        return "zoo:standin-dinov2"
    if "eva" in lowered:
        return "zoo:standin-eva"
    if prefix in ("open_clip", "timm", "hf", "hf-hub", "zoo"):
        return "zoo:standin-openclip"
    raise ModelSpecError(f"no stand-in for model {spec!r}: expected an open_clip:, timm:, hf:, hf-hub: or zoo: name")
