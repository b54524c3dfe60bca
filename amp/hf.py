"""Hugging Face ``transformers`` backbones: ``hf:<local dir or repo id>`` (CLIP, SigLIP, DINOv2 incl. SwiGLU, ViT).

A checkpoint loads through its own transformers class (``CLIPModel``, ``CLIPVisionModel``,
``CLIPVisionModelWithProjection``, ``SiglipModel``, ``SiglipVisionModel``, ``Dinov2Model``, ``ViTModel``) and becomes
an :class:`HFModel`: ``visual`` is a transformers vision model (pruned in place), ``text`` a two-tower model's text
tower (never pruned) with ``encode_text`` and the checkpoint's own tokenizer, so zero-shot and retrieval work as with
open_clip. One adapter per family finds the MLPs (``fc1``/``fc2``; DINOv2 SwiGLU ``gate_proj``/``up_proj``/
``down_proj``, or the packed ``weights_in``/``weights_out`` of older transformers). The architecture record keeps the
transformers config (``arch["config"]``, so :func:`amp.load_pruned` rebuilds offline) and the image processor's
settings (``arch["preprocess"]``: size, crop, mean, std, resample), from which the eval transform is built.

A pruned model also goes back to transformers: :func:`save_pretrained` writes a plain ``save_pretrained`` directory
of the original class with the pruned width of every layer in the vision config (``amp_intermediate_sizes``);
transformers' ``from_pretrained`` cannot build per-layer widths (its configs have one ``intermediate_size``), so
:func:`from_pretrained_pruned` (and ``hf:<that dir>``) rebuilds it. ``transformers`` stays optional: it is imported
only when an ``hf:`` model is used.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Mapping
from functools import reduce
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import transforms as T

from amp.adapters import BackboneAdapter, MLPSite, ModelSpecError, UnsupportedModelError, register_backbone, type_name
from amp.io import write_dir
from amp.models import Backbone, backbone_from, register_source
from amp.surgery import set_width

__all__ = ["HFModel", "from_pretrained_pruned", "load_hf", "save_pretrained", "to_transformers"]

log = logging.getLogger(__name__)

WIDTHS_KEY = "amp_intermediate_sizes"  # per-layer MLP widths of a pruned tower, in its (vision) config

# two-tower classes: each tower's class and the top-level children that make it up. A single child that already is
# the tower class (SigLIP's vision_model in transformers 5) is the tower itself; else a shell of that class holds them.
TWO_TOWERS = {
    "CLIPModel": {
        "visual": ("CLIPVisionModelWithProjection", ("vision_model", "visual_projection")),
        "text": ("CLIPTextModelWithProjection", ("text_model", "text_projection")),
    },
    "SiglipModel": {"visual": ("SiglipVisionModel", ("vision_model",)), "text": ("SiglipTextModel", ("text_model",))},
}
SCALARS = ("logit_scale", "logit_bias")  # two-tower parameters outside both towers

# PIL's resampling constants (what image processors store) as torchvision's modes
RESAMPLE = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}
PREPROCESS_KEYS = ("image_processor_type", "do_convert_rgb", "do_resize", "size", "resample", "do_center_crop",
                   "crop_size", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")  # fmt: skip


def _transformers():
    """transformers, imported on first use (an optional dependency)."""
    try:
        import transformers
    except ImportError as err:
        raise ModelSpecError("hf: models need transformers: pip install transformers") from err
    return transformers


def _class(name: str) -> type:
    return getattr(_transformers(), name)


class HFModel(nn.Module):
    """A transformers model as amp uses it: its vision tower ``visual``, a two-tower model's ``text`` and scalars.

    ``visual`` and ``text`` hold the original model's own modules; :func:`to_transformers` puts them back into an
    instance of ``source_class`` (the class the checkpoint was loaded with).
    """

    def __init__(
        self, visual: nn.Module, source_class: str, text: nn.Module | None = None, config=None, **scalars: nn.Parameter
    ):
        super().__init__()
        self.visual, self.text, self.source_class = visual, text, source_class
        self.hf_config = config  # a two-tower model's own config (its settings outside both towers)
        for name, value in scalars.items():
            setattr(self, name, value)

    def encode_text(self, tokens: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Text embeddings in the image embedding space, from :class:`Tokenizer` output (or bare input ids)."""
        if self.text is None:
            raise ValueError(f"a {self.source_class} has no text tower")
        inputs = dict(tokens) if isinstance(tokens, Mapping) else {"input_ids": tokens}
        out = self.text(**inputs)
        return out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output


def _whole(hf: nn.Module, class_name: str, children: tuple[str, ...]) -> bool:
    return len(children) == 1 and type(getattr(hf, children[0])).__name__ == class_name


def _split(hf: nn.Module) -> HFModel:
    """The :class:`HFModel` of a transformers model (its modules are shared, not copied)."""
    name = type(hf).__name__
    if name not in TWO_TOWERS:
        return HFModel(hf, name)
    config, towers = hf.config, {}
    for side, (class_name, children) in TWO_TOWERS[name].items():
        if _whole(hf, class_name, children):
            towers[side] = getattr(hf, children[0])
            continue
        sub = copy.deepcopy(getattr(config, f"{side.replace('visual', 'vision')}_config"))
        if hasattr(config, "projection_dim"):
            sub.projection_dim = config.projection_dim
        with torch.device("meta"):  # a shell: its children are replaced by the model's own
            towers[side] = _class(class_name)(sub)
        for child in children:
            setattr(towers[side], child, getattr(hf, child))
    scalars = {k: getattr(hf, k) for k in SCALARS if isinstance(getattr(hf, k, None), nn.Parameter)}
    return HFModel(towers["visual"], name, towers["text"], config, **scalars)


def to_transformers(model: HFModel) -> nn.Module:
    """The model as an instance of its original transformers class, sharing its (pruned) modules."""
    if model.source_class not in TWO_TOWERS:
        return model.visual
    with torch.device("meta"):
        hf = _class(model.source_class)(copy.deepcopy(model.hf_config))
    for side, (class_name, children) in TWO_TOWERS[model.source_class].items():
        tower = getattr(model, side)
        whole = len(children) == 1 and type(tower).__name__ == class_name and not hasattr(tower, children[0])
        for child in children:
            setattr(hf, child, tower if whole else getattr(tower, child))
    for name in SCALARS:
        if hasattr(model, name):
            setattr(hf, name, getattr(model, name))
    hf.config.vision_config = model.visual.config  # the tower's own config object: pruned widths are recorded in it
    return hf


def _vision_config(hf: nn.Module):
    return getattr(hf.config, "vision_config", hf.config)


def _config_dict(config) -> dict[str, Any]:
    return json.loads(config.to_json_string(use_diff=False))


def _core(tower: nn.Module) -> nn.Module:
    """The module that runs a CLIP/SigLIP tower without its projection (``vision_model``, or the tower itself)."""
    return getattr(tower, "vision_model", tower)


# --- the adapters: one per family ------------------------------------------------------------------------------


class HFAdapter(BackboneAdapter):
    """What every transformers family shares; a family names its classes, block path, heads and pooling."""

    CLASSES: frozenset[str] = frozenset()  # vision towers of this family (what ``vision`` returns)
    LOADABLE: tuple[str, ...] = ()  # classes ``hf:`` loads for this family (first: the default)
    MODEL_TYPES: tuple[tuple[str, str], ...] = ()  # (config.model_type, class to load when the checkpoint's is other)
    BLOCK_PATHS: tuple[str, ...] = ()  # where the blocks are in a tower, tried in order (transformers versions)
    HEADS: tuple[str, ...] = ()  # parameter-name prefixes of the final norm / pooling head / projection
    PREFIX_TOKENS = 1

    def matches(self, model: nn.Module) -> bool:
        tower = self.vision(model)
        return type(tower).__name__ in self.CLASSES and type(tower).__module__.startswith("transformers.")

    def vision(self, model: nn.Module) -> nn.Module:
        return model.visual if isinstance(model, HFModel) else model

    def _block_path(self, model: nn.Module) -> str:
        tower = self.vision(model)
        for path in self.BLOCK_PATHS:
            try:
                reduce(getattr, path.split("."), tower)
            except AttributeError:
                continue
            return path
        raise UnsupportedModelError(f"{type_name(tower)} has no blocks at {' or '.join(self.BLOCK_PATHS)}")

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return reduce(getattr, self._block_path(model).split("."), self.vision(model))

    def block_prefix(self, model: nn.Module) -> str:
        path = self._block_path(model)
        return f"visual.{path}" if isinstance(model, HFModel) else path

    def mlp_site(self, index: int, name: str, mlp: nn.Module) -> MLPSite:
        """``fc1``/``fc2`` (CLIP, SigLIP, ViT, DINOv2); the DINOv2 SwiGLUs: split or packed ``weights_in``."""
        linears = {k for k, m in mlp.named_children() if isinstance(m, nn.Linear)}
        layouts = {
            frozenset({"fc1", "fc2"}): lambda: MLPSite(index, name, mlp, fc_in=mlp.fc1, fc_out=mlp.fc2),
            frozenset({"gate_proj", "up_proj", "down_proj"}): lambda: MLPSite(
                index, name, mlp, fc_in=mlp.up_proj, fc_out=mlp.down_proj, fc_gate=mlp.gate_proj
            ),
            # transformers < 5: silu(first half) * second half of one packed projection
            frozenset({"weights_in", "weights_out"}): lambda: MLPSite(
                index, name, mlp, fc_in=mlp.weights_in, fc_out=mlp.weights_out, packed=True
            ),
        }
        layout = layouts.get(frozenset(linears))
        if layout is None or any(type(m) is not nn.Linear for k, m in mlp.named_children() if k in linears):
            raise UnsupportedModelError(f"{name}: a {type_name(mlp)} with linears {sorted(linears)} is not supported")
        return layout()

    def _pooled(self, tower: nn.Module, images: torch.Tensor, project: bool) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, model: nn.Module, images: torch.Tensor, project: bool = False) -> torch.Tensor:
        return self._pooled(self.vision(model), images, project)

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        config = self.vision(model).config
        size = config.image_size
        return (config.num_channels, *((size, size) if isinstance(size, int) else size))

    def prefix_tokens(self, model: nn.Module) -> int:
        return self.PREFIX_TOKENS

    def head_parameter_names(self, model: nn.Module) -> list[str]:
        names = [name for name, _ in self.vision(model).named_parameters()]
        return [name for name in names if name.removeprefix("vision_model.").startswith(self.HEADS)]

    # -- building, preprocessing, text ------------------------------------------------------------------------

    def build(self, arch: dict[str, Any], device: str | torch.device) -> nn.Module:
        """The record's transformers class from its config (random init), at the widths the config records."""
        cls = _class(arch["class"])
        config = cls.config_class.from_dict(arch["config"])
        with torch.device(device):
            hf = cls(config)
        _set_recorded_widths(hf, self)
        return _split(hf)

    def preprocess_config(self, model: nn.Module) -> dict[str, Any]:
        return {}  # the image processor is not part of the model: load_hf records it

    def eval_transform(self, config: dict[str, Any]) -> Callable | None:
        return processor_transform(config) if config else None

    def tokenizer(self, model: nn.Module, arch: dict[str, Any]) -> Callable | None:
        if not isinstance(model, HFModel) or model.text is None:
            return None
        try:
            return Tokenizer(arch["name"], model.text.config.max_position_embeddings)
        except (OSError, ValueError, ImportError) as err:  # no tokenizer at the source: image-only use still works
            log.warning("no tokenizer for %s (%s): zero-shot and retrieval are unavailable", arch["name"], err)
            return None


class HFClipAdapter(HFAdapter):
    """transformers CLIP: ``CLIPModel`` (with its text tower) or its vision tower alone, with or without projection."""

    family = "hf_clip"
    CLASSES = frozenset({"CLIPVisionModel", "CLIPVisionModelWithProjection"})
    LOADABLE = ("CLIPModel", "CLIPVisionModel", "CLIPVisionModelWithProjection")
    MODEL_TYPES = (("clip", "CLIPModel"), ("clip_vision_model", "CLIPVisionModel"))
    BLOCK_PATHS = ("vision_model.encoder.layers", "encoder.layers")
    HEADS = ("post_layernorm.", "visual_projection.")

    def _pooled(self, tower: nn.Module, images: torch.Tensor, project: bool) -> torch.Tensor:
        pooled = _core(tower)(pixel_values=images).pooler_output  # post-norm class token
        return tower.visual_projection(pooled) if project and self.has_projection(tower) else pooled

    def has_projection(self, model: nn.Module) -> bool:
        return hasattr(self.vision(model), "visual_projection")


class HFSiglipAdapter(HFAdapter):
    """transformers SigLIP: ``SiglipModel`` (with its text tower) or ``SiglipVisionModel``; pooled by its MAP head."""

    family = "hf_siglip"
    CLASSES = frozenset({"SiglipVisionModel"})
    LOADABLE = ("SiglipModel", "SiglipVisionModel")
    MODEL_TYPES = (("siglip", "SiglipModel"), ("siglip_vision_model", "SiglipVisionModel"))
    BLOCK_PATHS = ("vision_model.encoder.layers", "encoder.layers")
    HEADS = ("post_layernorm.", "head.")
    PREFIX_TOKENS = 0  # no class token

    def _pooled(self, tower: nn.Module, images: torch.Tensor, project: bool) -> torch.Tensor:
        out = _core(tower)(pixel_values=images)
        return out.pooler_output if out.pooler_output is not None else out.last_hidden_state.mean(dim=1)


class HFDinov2Adapter(HFAdapter):
    """transformers ``Dinov2Model``, incl. its SwiGLU variant (``use_swiglu_ffn``); the embedding is the class token."""

    family = "hf_dinov2"
    CLASSES = frozenset({"Dinov2Model"})
    LOADABLE = ("Dinov2Model",)
    MODEL_TYPES = (("dinov2", "Dinov2Model"),)
    BLOCK_PATHS = ("encoder.layer",)
    HEADS = ("layernorm.",)

    def _pooled(self, tower: nn.Module, images: torch.Tensor, project: bool) -> torch.Tensor:
        return tower(pixel_values=images).pooler_output


class HFViTAdapter(HFAdapter):
    """transformers ``ViTModel``: the post-norm class token; ``project`` adds its pooler (dense + tanh) if any."""

    family = "hf_vit"
    CLASSES = frozenset({"ViTModel"})
    LOADABLE = ("ViTModel",)
    MODEL_TYPES = (("vit", "ViTModel"),)
    BLOCK_PATHS = ("layers", "encoder.layer")
    HEADS = ("layernorm.", "pooler.")

    def _pooled(self, tower: nn.Module, images: torch.Tensor, project: bool) -> torch.Tensor:
        out = tower(pixel_values=images)
        return out.pooler_output if project and out.pooler_output is not None else out.last_hidden_state[:, 0]

    def has_projection(self, model: nn.Module) -> bool:
        return getattr(self.vision(model), "pooler", None) is not None


HF_ADAPTERS: list[HFAdapter] = [HFClipAdapter(), HFSiglipAdapter(), HFDinov2Adapter(), HFViTAdapter()]


def _family_of(class_name: str | None, model_type: str, source: str) -> tuple[HFAdapter, str]:
    """The adapter and the class to load for a checkpoint's ``architectures`` entry and ``model_type``."""
    for adapter in HF_ADAPTERS:
        if class_name in adapter.LOADABLE:
            return adapter, class_name
    for adapter in HF_ADAPTERS:  # e.g. ViTForImageClassification: its backbone loads as ViTModel
        if model_type in dict(adapter.MODEL_TYPES):
            return adapter, dict(adapter.MODEL_TYPES)[model_type]
    supported = sorted(c for a in HF_ADAPTERS for c in a.LOADABLE)
    raise ModelSpecError(
        f"hf:{source} is a {class_name or model_type} ({model_type!r}); amp loads transformers {', '.join(supported)}"
    )


def _set_recorded_widths(hf: nn.Module, adapter: HFAdapter) -> None:
    """Resize the MLPs of a freshly built transformers model to the widths its (vision) config records, if any."""
    widths = getattr(_vision_config(hf), WIDTHS_KEY, None)
    if widths is None:
        return
    sites = adapter.sites(hf)
    if not isinstance(widths, list) or len(widths) != len(sites) or not all(type(w) is int and w > 0 for w in widths):
        raise ModelSpecError(f"config {WIDTHS_KEY} must be {len(sites)} positive integers, got {widths!r}")
    with torch.device("cpu"):  # surgery's bookkeeping tensors stay real under from_pretrained's meta-device context
        for site, width in zip(sites, widths):
            set_width(site, width)


# --- preprocessing: the image processor's settings as a torchvision transform ------------------------------------


def _rgb(image):
    return image.convert("RGB")


def _pair(size: dict[str, int], what: str) -> int | tuple[int, int]:
    if "shortest_edge" in size and len(size) == 1:
        return int(size["shortest_edge"])
    if set(size) == {"height", "width"}:
        return (int(size["height"]), int(size["width"]))
    raise ModelSpecError(f"image processor {what} {size} is not supported (shortest_edge, or height and width)")


def processor_transform(config: dict[str, Any]) -> T.Compose:
    """The eval transform an image processor's settings describe (resize, centre crop, rescale, normalise)."""
    steps: list[Callable] = [T.Lambda(_rgb)] if config.get("do_convert_rgb", True) else []
    if config.get("do_resize", True):
        mode = getattr(T.InterpolationMode, RESAMPLE.get(config.get("resample", 3), "BICUBIC"))
        steps.append(T.Resize(_pair(config["size"], "size"), interpolation=mode))
    if config.get("do_center_crop") and config.get("crop_size"):
        steps.append(T.CenterCrop(_pair(config["crop_size"], "crop_size")))
    if not config.get("do_rescale", True) or abs(config.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
        raise ModelSpecError("image processor without rescaling by 1/255 is not supported")
    steps.append(T.ToTensor())
    if config.get("do_normalize", True):
        steps.append(T.Normalize(config["image_mean"], config["image_std"]))
    return T.Compose(steps)


def _processor_record(source: str, **kwargs: Any) -> dict[str, Any]:
    """The image processor's settings, as JSON for amp.json."""
    try:
        processor = _transformers().AutoImageProcessor.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelSpecError(
            f"hf:{source} has no image processor ({err}); save it with the model (processor.save_pretrained(dir))"
        ) from None
    settings = json.loads(json.dumps(processor.to_dict(), default=list))
    return {k: settings[k] for k in PREPROCESS_KEYS if k in settings}


class Tokenizer:
    """A two-tower model's tokenizer as amp calls it: a list of texts → padded input tensors (``.to(device)``)."""

    def __init__(self, source: str, max_length: int):
        self.source, self.max_length = source, max_length
        self.tokenizer = _transformers().AutoTokenizer.from_pretrained(source)

    def __call__(self, texts: str | list[str]):
        texts = [texts] if isinstance(texts, str) else list(texts)
        # fixed-length padding: SigLIP was trained on it, and CLIP's causal text tower ignores what follows EOS
        return self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, max_length={self.max_length})"


# --- loading and saving ------------------------------------------------------------------------------------------


def _checkpoint_class(source: str, **kwargs: Any) -> tuple[Any, HFAdapter, str]:
    try:
        config = _transformers().AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ModelSpecError(f"cannot load hf:{source}: {first}") from None
    adapter, class_name = _family_of((config.architectures or [None])[0], config.model_type, source)
    return config, adapter, class_name


def from_pretrained_pruned(source: str | Path, cls: type | str | None = None, **kwargs: Any) -> nn.Module:
    """``cls.from_pretrained(source)`` that also rebuilds a pruned model written by :func:`save_pretrained`.

    A pruned checkpoint's (vision) config records each layer's MLP width (``amp_intermediate_sizes``); the model is
    built at those widths before transformers loads its weights (with all its own key conversions). ``cls`` defaults
    to the class in the checkpoint's config; a dense checkpoint loads as plain ``from_pretrained`` would.
    """
    source = str(source)
    _, adapter, class_name = _checkpoint_class(source)
    cls = _class(cls) if isinstance(cls, str) else cls or _class(class_name)

    def __init__(self, config, *args, **init_kwargs):  # the class's own constructor, then the widths
        cls.__init__(self, config, *args, **init_kwargs)
        _set_recorded_widths(self, adapter)

    pruned = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})
    model = pruned.from_pretrained(source, **kwargs)
    model.__class__ = cls  # a plain instance of the class again: the subclass only changed construction
    return model


def load_hf(source: str, device: str = "cpu", **kwargs: Any) -> Backbone:
    """``hf:<local dir or repo id>``: the checkpoint through its transformers class, its processor and tokenizer."""
    if Path(source).is_dir():
        source = str(Path(source).resolve())  # the record names it wherever the model is used from
    _, adapter, class_name = _checkpoint_class(source)
    hf = from_pretrained_pruned(source, class_name, **kwargs)
    arch = {
        "family": adapter.family,
        "name": source,
        "kwargs": {},
        "class": class_name,
        "config": _config_dict(hf.config),
        "preprocess": _processor_record(source),
    }
    model = _split(hf).to(device)
    adapter.sites(model)  # refuse an unsupported MLP now, by name
    return backbone_from(model, arch, f"hf:{source}", {"weights": source})


def save_pretrained(backbone: Backbone, path: str | Path, overwrite: bool = False) -> Path:
    """Write a (pruned) ``hf:`` backbone as a plain transformers directory, all or nothing.

    The original class's ``save_pretrained`` layout (config.json, model.safetensors), the image processor of the
    record and, when the source has one, its tokenizer. The vision config records the per-layer widths
    (``amp_intermediate_sizes``); load it with :func:`from_pretrained_pruned` or ``hf:<path>``.
    """
    model = backbone.model
    if not isinstance(model, HFModel):
        raise ModelSpecError(f"{backbone.spec} is not a transformers model (hf:...): save it with amp.save_pruned")
    hf = to_transformers(model)

    def write(tmp: Path) -> None:
        config = _vision_config(hf)
        had = hasattr(config, WIDTHS_KEY)
        setattr(config, WIDTHS_KEY, backbone.widths())
        try:
            hf.save_pretrained(tmp)
        finally:
            if not had:
                delattr(config, WIDTHS_KEY)
        settings = dict(backbone.arch.get("preprocess") or {})
        if "image_processor_type" in settings:
            _class(settings.pop("image_processor_type"))(**settings).save_pretrained(tmp)
        if isinstance(backbone.tokenizer, Tokenizer):
            backbone.tokenizer.tokenizer.save_pretrained(tmp)

    return write_dir(path, write, overwrite=overwrite)


for _adapter in HF_ADAPTERS:  # matched only for transformers towers: their place in the order does not matter
    register_backbone(_adapter, first=False)
register_source("hf", load_hf)
