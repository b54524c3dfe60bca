"""Backbone families: one adapter class per family owns everything family-specific.

An adapter says how to build the family's architecture from its record, how to preprocess images for it (and
tokenize text), where its MLPs are, how to embed images, and what distillation needs (prefix tokens, head parameters,
token layout). Everything else in amp (scoring, search, surgery, accounting, saving) works on the uniform view an
adapter gives and never on model classes or attribute names. :func:`register_backbone` adds a family.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip
import timm
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer
from timm.data import create_transform, resolve_data_config
from timm.layers import GluMlp, Mlp, SwiGLU
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import nn

from amp.io import safetensors_header


class UnsupportedModelError(TypeError):
    """The model, or one of its MLPs, has a structure amp does not know how to prune."""


class ModelSpecError(ValueError):
    """A model name, weights path or architecture record that cannot be resolved."""


def type_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass
class MLPSite:
    """One prunable MLP: hidden units are the inputs of ``fc_out``.

    ``fc_in`` produces the hidden units; when ``packed`` it stacks two halves along its output
    ([first; second], each of size ``hidden``), as timm's ``GluMlp``/``SwiGLUPacked`` do.
    ``fc_gate`` is the separate gate branch of a split SwiGLU (timm ``SwiGLU``: ``fc1_g``).
    ``hidden_norm`` is a norm over the hidden units (EVA ``scale_mlp``, NormFormer ``scale_fc``).
    """

    index: int
    name: str
    module: nn.Module
    fc_in: nn.Linear
    fc_out: nn.Linear
    fc_gate: nn.Linear | None = None
    hidden_norm: nn.Module | None = None
    packed: bool = False

    @property
    def hidden(self) -> int:
        return self.fc_out.in_features

    @property
    def gated(self) -> bool:
        return self.packed or self.fc_gate is not None

    def linears(self) -> list[nn.Linear]:
        return [m for m in (self.fc_gate, self.fc_in, self.fc_out) if m is not None]


# --- MLP layouts: each recognises one MLP module type and returns its site, or None ------------


def _hidden_norm(module: nn.Module | None) -> nn.Module | None:
    if module is None or isinstance(module, nn.Identity):
        return None
    if not hasattr(module, "normalized_shape"):
        raise UnsupportedModelError(f"hidden-unit norm of type {type_name(module)} is not supported")
    return module


def _require_linear(module: nn.Module, owner: nn.Module, attr: str) -> nn.Linear:
    if type(module) is not nn.Linear:  # subclasses (e.g. quantised linears) may slice differently
        raise UnsupportedModelError(
            f"{type_name(owner)}.{attr} is a {type_name(module)}; amp prunes plain torch.nn.Linear layers only"
        )
    return module


def _timm_layout(index: int, name: str, mlp: nn.Module) -> MLPSite | None:
    if isinstance(mlp, (Mlp, GluMlp)) and type(mlp).__name__ in {"Mlp", "GluMlp", "SwiGLUPacked"}:
        packed = isinstance(mlp, GluMlp)
        if packed and getattr(mlp, "chunk_dim", -1) != -1:
            raise UnsupportedModelError(f"{name}: GluMlp with chunk_dim={mlp.chunk_dim} is not supported")
        return MLPSite(
            index,
            name,
            mlp,
            fc_in=_require_linear(mlp.fc1, mlp, "fc1"),
            fc_out=_require_linear(mlp.fc2, mlp, "fc2"),
            hidden_norm=_hidden_norm(getattr(mlp, "norm", None)),
            packed=packed,
        )
    if type(mlp) is SwiGLU:
        return MLPSite(
            index,
            name,
            mlp,
            fc_in=_require_linear(mlp.fc1_x, mlp, "fc1_x"),
            fc_out=_require_linear(mlp.fc2, mlp, "fc2"),
            fc_gate=_require_linear(mlp.fc1_g, mlp, "fc1_g"),
            hidden_norm=_hidden_norm(mlp.norm),
        )
    return None


def _open_clip_layout(index: int, name: str, mlp: nn.Module) -> MLPSite | None:
    if not isinstance(mlp, nn.Sequential) or not hasattr(mlp, "c_fc") or not hasattr(mlp, "c_proj"):
        return None
    unknown = set(dict(mlp.named_children())) - {"c_fc", "gelu", "ln", "c_proj"}
    if unknown:
        raise UnsupportedModelError(f"{name}: open_clip MLP with unexpected children {sorted(unknown)}")
    return MLPSite(
        index,
        name,
        mlp,
        fc_in=_require_linear(mlp.c_fc, mlp, "c_fc"),
        fc_out=_require_linear(mlp.c_proj, mlp, "c_proj"),
        hidden_norm=_hidden_norm(getattr(mlp, "ln", None)),
    )


def _is_known_mlp(module: nn.Module) -> bool:
    """A module of one of the built-in MLP types (used to find a second MLP in a block)."""
    open_clip_mlp = isinstance(module, nn.Sequential) and hasattr(module, "c_fc") and hasattr(module, "c_proj")
    return isinstance(module, (Mlp, GluMlp, SwiGLU)) or open_clip_mlp


def describe_mlp(index: int, name: str, mlp: nn.Module) -> MLPSite:
    """The site of a built-in MLP layout (timm or open_clip); :meth:`BackboneAdapter.mlp_site` extends it."""
    site = _timm_layout(index, name, mlp) or _open_clip_layout(index, name, mlp)
    if site is None:
        raise UnsupportedModelError(
            f"{name} is a {type_name(mlp)}, an MLP type amp cannot prune. Supported: timm Mlp, GluMlp/SwiGLUPacked, "
            "SwiGLU and open_clip's c_fc/c_proj MLP; an adapter's mlp_site adds others (notebooks/07_new_backbone)."
        )
    return site


# --- preprocessing records: JSON in amp.json, tuples for the libraries -----------------------------


def _to_json(config: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def _to_tuples(config: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def _is_file_ref(ref: str) -> bool:
    return "/" in ref or ref.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def _from_file(path: str, load: Callable[[], nn.Module]) -> nn.Module:
    """``load()`` a model from a user's weights file; a damaged or foreign file is an error naming the file."""
    if path.endswith(".safetensors"):
        safetensors_header(path)  # truncated or not safetensors at all: named before the library tries
    try:
        return load()
    except (RuntimeError, KeyError, ValueError, OSError, EOFError, pickle.UnpicklingError) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ModelSpecError(
            f"cannot load the weights file {path}: {first}; is it a checkpoint of this architecture?"
        ) from err


# --- Backbone adapters -------------------------------------------------------------------------


class _SkipBlock(nn.Module):
    """Stands in for a block whose output is already cached; passes its input through."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x


class _Captured(Exception):
    def __init__(self, value: torch.Tensor):
        self.value = value


class BackboneAdapter:
    """One backbone family: how to build it, preprocess for it, find its MLPs and embed images with it.

    A new family implements ``matches`` (is this model mine?), ``blocks`` and ``block_prefix`` (the block list and
    its name in ``model.named_modules()``), ``embed`` and ``input_size``; ``build`` (the network of an architecture
    record, so ``load_model("<family>:<name>")`` and ``load_pruned`` can rebuild it); ``preprocess_config`` and
    ``eval_transform`` (a JSON record of its image transform and the transform it describes, so a reloaded model
    preprocesses like the dense one); ``prefix_tokens`` and ``head_parameter_names`` for distillation. It may
    extend ``mlp_site`` (MLPs other than timm's and open_clip's), ``mlp_of`` (default ``block.mlp``), ``vision``,
    ``tokenizer``, ``has_projection``, ``tokens_batch_first`` and ``load`` (default: random init from ``build``).

    The contract a block must meet: it is an entry of the indexable, assignable ``blocks(model)`` container that
    ``embed`` runs in order, it receives the hidden state as its first positional argument and returns the next
    hidden state as one tensor, and its MLP computes ``fc_out(act(fc_in(x)))`` with plain ``nn.Linear`` layers.
    Running part of a model is then generic: blocks before ``l`` are swapped for pass-throughs and block ``l``'s input
    is replaced, so no family needs its own copy of the forward pass.
    """

    family: str = "base"

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def vision(self, model: nn.Module) -> nn.Module:
        return model

    def blocks(self, model: nn.Module) -> nn.ModuleList | nn.Sequential:
        raise NotImplementedError

    def block_prefix(self, model: nn.Module) -> str:
        raise NotImplementedError

    def mlp_of(self, block: nn.Module) -> nn.Module:
        return block.mlp

    def mlp_site(self, index: int, name: str, mlp: nn.Module) -> MLPSite:
        """Where one MLP's hidden units are; extend it for MLP types of your own, ``super()`` for the rest."""
        return describe_mlp(index, name, mlp)

    def embed(self, model: nn.Module, images: torch.Tensor, project: bool = False) -> torch.Tensor:
        """Pooled image embedding; ``project=False`` is the pre-projection feature the paper scores with."""
        raise NotImplementedError

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        raise NotImplementedError

    def has_projection(self, model: nn.Module) -> bool:
        return False

    # -- building and preprocessing (the record is ``{"family", "name", "kwargs", "preprocess"}``) -------------

    def build(self, arch: dict[str, Any], device: str | torch.device) -> nn.Module:
        """The network an architecture record describes, randomly initialised (shapes only on ``meta``)."""
        raise NotImplementedError(f"the {self.family} adapter cannot build architectures")

    def load(
        self, name: str, device: str | torch.device, pretrained: bool = True, **kwargs: Any
    ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
        """``<family>:<name>`` for :func:`amp.models.load_model`: the model, its architecture record, its provenance."""
        arch = {"family": self.family, "name": name, "kwargs": kwargs}
        return self.build(arch, device), arch, {"weights": "random-init"}

    def preprocess_config(self, model: nn.Module) -> dict[str, Any]:
        """JSON record of the model's eval transform (sizes, mean/std, interpolation, crop), stored in amp.json."""
        return {}

    def eval_transform(self, config: dict[str, Any]) -> Callable | None:
        """The eval image transform a :meth:`preprocess_config` record describes."""
        return None

    def tokenizer(self, model: nn.Module, arch: dict[str, Any]) -> Callable | None:
        """The text tokenizer of a CLIP model (None for image-only families)."""
        return None

    # -- what distillation needs (the tower is ``self.vision(model)``) ----------------------------

    def prefix_tokens(self, model: nn.Module) -> int:
        """Tokens before the patch tokens in a block's output (class token, registers)."""
        raise NotImplementedError(f"the {self.family} adapter does not say how many prefix tokens it has")

    def head_parameter_names(self, model: nn.Module) -> list[str]:
        """Names, in ``self.vision(model).named_parameters()``, of the final norm and projection."""
        raise NotImplementedError(f"the {self.family} adapter does not name its head parameters")

    def tokens_batch_first(self, model: nn.Module) -> bool:
        """Whether a block's output is (batch, tokens, dim) rather than (tokens, batch, dim)."""
        return True

    # -- derived, family-independent --------------------------------------------------------

    def sites(self, model: nn.Module) -> list[MLPSite]:
        prefix = self.block_prefix(model)
        sites = []
        for i, block in enumerate(self.blocks(model)):
            sites.append(self.mlp_site(i, f"{prefix}.{i}.mlp", self._one_mlp(block, f"{prefix}.{i}")))
        return sites

    def _one_mlp(self, block: nn.Module, name: str) -> nn.Module:
        """The block's MLP; a block without one MLP (parallel MLPs, an MLP fused into another layer, or a second MLP
        beside it) is refused by name: amp's scores, search and slicing assume one MLP per block."""
        try:
            mlp = self.mlp_of(block)
        except AttributeError:
            mlp = None
        if not isinstance(mlp, nn.Module):
            raise UnsupportedModelError(
                f"{name} is a {type_name(block)} without one MLP at block.mlp (e.g. timm's ParallelThingsBlock with "
                "parallel MLPs, or ParallelScalingBlock with the MLP fused into the attention's projections): amp "
                "prunes blocks with exactly one MLP"
            )
        inside = {id(m) for m in mlp.modules()}
        others = [n for n, m in block.named_modules() if id(m) not in inside and _is_known_mlp(m)]
        if others:
            raise UnsupportedModelError(
                f"{name} is a {type_name(block)} with more than one MLP ({', '.join(others)} besides its mlp): amp "
                "prunes blocks with exactly one MLP"
            )
        return mlp

    def block_inputs(self, model: nn.Module, images: torch.Tensor, layers: Iterable[int]) -> dict[int, torch.Tensor]:
        """The inputs of the given blocks in one forward pass (it stops after the last one needed)."""
        blocks, layers = self.blocks(model), sorted(set(layers))
        found: dict[int, torch.Tensor] = {}

        def grab(layer: int):
            def hook(_module, args):
                found[layer] = args[0]
                if layer == layers[-1]:
                    raise _Captured(args[0])

            return hook

        handles = [blocks[layer].register_forward_pre_hook(grab(layer)) for layer in layers]
        try:
            self.embed(model, images)
        except _Captured:
            return found
        finally:
            for handle in handles:
                handle.remove()
        raise RuntimeError(f"blocks {layers} of {type_name(model)} were never called")

    def block_input_from(
        self, model: nn.Module, cached: torch.Tensor, start: int, layer: int, batch_shape: torch.Size
    ) -> torch.Tensor:
        """The input of block ``layer`` when block ``start`` receives ``cached`` (blocks start..layer-1 run)."""
        if start == layer:
            return cached
        blocks = self.blocks(model)

        def grab(_module, args):
            raise _Captured(args[0])

        def inject(_module, args, kwargs):
            return (cached, *args[1:]), kwargs

        handles = [
            blocks[start].register_forward_pre_hook(inject, with_kwargs=True),
            blocks[layer].register_forward_pre_hook(grab),
        ]
        try:
            with self._skipping(model, range(start)):
                self.embed(model, torch.zeros(batch_shape, dtype=cached.dtype, device=cached.device))
        except _Captured as captured:
            return captured.value
        finally:
            for handle in handles:
                handle.remove()
        raise RuntimeError(f"block {layer} of {type_name(model)} was never called")

    def embed_from(
        self, model: nn.Module, cached: torch.Tensor, layer: int, batch_shape: torch.Size, project: bool = False
    ) -> torch.Tensor:
        """Embedding when block ``layer`` receives ``cached``: runs only blocks ``layer..`` and the head.

        The stem still runs on a zero image of ``batch_shape`` (its output is discarded); it costs a
        small fraction of one block and keeps every family's own forward code in charge.
        """
        blocks = self.blocks(model)

        def inject(_module, args, kwargs):
            return (cached, *args[1:]), kwargs

        handle = blocks[layer].register_forward_pre_hook(inject, with_kwargs=True)
        try:
            with self._skipping(model, range(layer)):
                dummy = torch.zeros(batch_shape, dtype=cached.dtype, device=cached.device)
                return self.embed(model, dummy, project=project)
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _skipping(self, model: nn.Module, layers: range) -> Iterator[None]:
        blocks = self.blocks(model)
        saved = {i: blocks[i] for i in layers}
        try:
            for i in layers:
                blocks[i] = _SkipBlock()
            yield
        finally:
            for i, block in saved.items():
                blocks[i] = block


@contextlib.contextmanager
def quiet_open_clip() -> Iterator[None]:
    """Silence open_clip's "No pretrained weights loaded ... initialized randomly" while weights are loaded after."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


class OpenClipModels(BackboneAdapter):
    """Building, weights, preprocessing and tokenizer of open_clip models (``open_clip:<arch>[:<tag or file>]``)."""

    def _check_name(self, name: str) -> None:
        if name not in open_clip.list_models():
            raise ModelSpecError(f"unknown open_clip architecture {name!r}; see open_clip.list_models()")

    def build(self, arch: dict[str, Any], device: str | torch.device) -> nn.Module:
        self._check_name(arch["name"])
        with quiet_open_clip():  # the architecture only: its weights are loaded next (or it is a meta count)
            return open_clip.create_model(arch["name"], pretrained=None, device=device, **arch.get("kwargs", {}))

    def load(
        self, name: str, device: str | torch.device, pretrained: bool = True, **kwargs: Any
    ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
        """``<arch>:<tag>`` downloads the tag; with ``pretrained=False`` it keeps only the tag's preprocessing."""
        name, _, source = name.partition(":")
        arch = {"family": self.family, "name": name, "kwargs": kwargs}
        if source and _is_file_ref(source) and not Path(source).is_file():
            raise ModelSpecError(f"weights file not found: {source}")
        self._check_name(name)
        if pretrained or not source:
            create = lambda: open_clip.create_model(name, pretrained=source or None, device=device, **kwargs)  # noqa: E731
            model = _from_file(source, create) if _is_file_ref(source) else create()
            return model, arch, {"weights": source or "random-init"}
        # what open_clip merges from a tag when it loads its weights; the size stays the tower's own
        tag_cfg = merge_preprocess_dict({}, open_clip.get_pretrained_cfg(name, source))
        tag_cfg.pop("size", None)
        model = open_clip.create_model(name, pretrained=None, device=device, force_preprocess_cfg=tag_cfg, **kwargs)
        return model, arch, {"weights": "random-init"}

    def preprocess_config(self, model: nn.Module) -> dict[str, Any]:
        tower = getattr(model, "visual", model)
        return _to_json(asdict(PreprocessCfg(**getattr(tower, "preprocess_cfg", {}))))

    def eval_transform(self, config: dict[str, Any]) -> Callable:
        return image_transform_v2(PreprocessCfg(**_to_tuples(config)), is_train=False)

    def tokenizer(self, model: nn.Module, arch: dict[str, Any]) -> Callable | None:
        return open_clip.get_tokenizer(arch["name"]) if hasattr(model, "encode_text") else None


class OpenClipAdapter(OpenClipModels):
    """open_clip CLIP (or a bare ``VisionTransformer``): prunes the image tower, never the text tower."""

    family = "open_clip"

    @staticmethod
    def _visual(model: nn.Module) -> nn.Module | None:
        if isinstance(model, OpenClipVisionTransformer):
            return model
        visual = getattr(model, "visual", None)
        return visual if isinstance(visual, OpenClipVisionTransformer) else None

    def matches(self, model: nn.Module) -> bool:
        return self._visual(model) is not None

    def vision(self, model: nn.Module) -> nn.Module:
        return self._visual(model)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return self.vision(model).transformer.resblocks

    def block_prefix(self, model: nn.Module) -> str:
        return "visual.transformer.resblocks" if self.vision(model) is not model else "transformer.resblocks"

    def embed(self, model: nn.Module, images: torch.Tensor, project: bool = False) -> torch.Tensor:
        visual = self.vision(model)
        if project:
            return visual(images)
        proj, visual.proj = visual.proj, None  # the paper scores the pooled feature before the projection
        try:
            return visual(images)
        finally:
            visual.proj = proj

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        size = self.vision(model).image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (3, *size)

    def has_projection(self, model: nn.Module) -> bool:
        return self.vision(model).proj is not None

    def prefix_tokens(self, model: nn.Module) -> int:
        return 1 if getattr(self.vision(model), "class_embedding", None) is not None else 0

    def head_parameter_names(self, model: nn.Module) -> list[str]:
        return [name for name, _ in self.vision(model).named_parameters() if name.split(".")[0] in {"ln_post", "proj"}]

    def tokens_batch_first(self, model: nn.Module) -> bool:
        """open_clip's older towers run (tokens, batch, dim)."""
        return getattr(self.vision(model).transformer, "batch_first", True) is not False


class TimmAdapter(BackboneAdapter):
    """timm ``VisionTransformer`` (incl. DINOv2 with LayerScale, SwiGLU variants) and ``Eva``/EVA02."""

    family = "timm"
    HEADS = frozenset({"norm", "fc_norm", "head"})  # top-level modules after the blocks

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, (TimmVisionTransformer, Eva))

    def blocks(self, model: nn.Module) -> nn.Sequential | nn.ModuleList:
        return model.blocks

    def block_prefix(self, model: nn.Module) -> str:
        return "blocks"

    def embed(self, model: nn.Module, images: torch.Tensor, project: bool = False) -> torch.Tensor:
        return model.forward_head(model.forward_features(images), pre_logits=not project)

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        size = model.patch_embed.img_size
        return (model.patch_embed.proj.in_channels, *size)

    def has_projection(self, model: nn.Module) -> bool:
        return not isinstance(model.head, nn.Identity)

    def prefix_tokens(self, model: nn.Module) -> int:
        return int(model.num_prefix_tokens)

    def head_parameter_names(self, model: nn.Module) -> list[str]:
        return [name for name, _ in model.named_parameters() if name.split(".")[0] in self.HEADS]

    @staticmethod
    def _check_name(name: str) -> str:
        arch = name.split(".")[0]
        if not timm.is_model(arch):
            raise ModelSpecError(f"unknown timm model {name!r}; see timm.list_models()")
        return arch

    def build(self, arch: dict[str, Any], device: str | torch.device) -> nn.Module:
        name = self._check_name(arch["name"])
        with torch.device(device):
            return timm.create_model(name, pretrained=False, **arch.get("kwargs", {}))

    def load(
        self, name: str, device: str | torch.device, pretrained: bool = True, **kwargs: Any
    ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
        """``<name>`` random init, ``<name>.<tag>`` that tag (its data config even without weights), or a file."""
        name, _, weights = name.partition(":")
        kwargs.setdefault("num_classes", 0)  # amp works on features; the classifier is not part of the backbone
        arch = {"family": self.family, "name": self._check_name(name), "kwargs": kwargs}
        if weights:
            if not Path(weights).is_file():
                raise ModelSpecError(f"weights file not found: {weights}")
            overlay = {"file": weights}
            create = lambda: timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)  # noqa: E731
            model = _from_file(weights, create)
        else:
            model = timm.create_model(name, pretrained=pretrained and "." in name, **kwargs)
        tagged = pretrained and "." in name
        if self.matches(model):
            self.sites(model)  # refuse an unsupported block layout now, by name, not at the first use
        return model.to(device), arch, {"weights": weights or (name if tagged else "random-init")}

    def preprocess_config(self, model: nn.Module) -> dict[str, Any]:
        """timm's data config of the model's weights (its ``pretrained_cfg``) at the model's input size."""
        return _to_json(resolve_data_config({"input_size": self.input_size(model)}, model=model))

    def eval_transform(self, config: dict[str, Any]) -> Callable:
        return create_transform(**_to_tuples(config))


class OpenClipTimmAdapter(OpenClipModels, TimmAdapter):
    """open_clip CLIP whose image tower is a timm trunk (``TimmModel``: open_clip's EVA02-CLIP configs, ...).

    Its methods take the whole CLIP or its image tower alone (distillation trains the tower by itself)."""

    family = "open_clip_timm"

    @staticmethod
    def _is_tower(module: nn.Module | None) -> bool:
        return type(module).__name__ == "TimmModel"

    def matches(self, model: nn.Module) -> bool:
        visual = getattr(model, "visual", None)
        return self._is_tower(visual) and TimmAdapter.matches(self, getattr(visual, "trunk", None))

    def vision(self, model: nn.Module) -> nn.Module:
        return model if self._is_tower(model) else model.visual

    def blocks(self, model: nn.Module) -> nn.Sequential | nn.ModuleList:
        return self.vision(model).trunk.blocks

    def block_prefix(self, model: nn.Module) -> str:
        return "trunk.blocks" if self._is_tower(model) else "visual.trunk.blocks"

    def embed(self, model: nn.Module, images: torch.Tensor, project: bool = False) -> torch.Tensor:
        tower = self.vision(model)
        if project:
            return tower(images)
        return TimmAdapter.embed(self, tower.trunk, images, project=False)

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        return (3, *self.vision(model).image_size)

    def has_projection(self, model: nn.Module) -> bool:
        return True

    def prefix_tokens(self, model: nn.Module) -> int:
        return TimmAdapter.prefix_tokens(self, self.vision(model).trunk)

    def head_parameter_names(self, model: nn.Module) -> list[str]:
        """The trunk's final norm / fc_norm (its own head is reset) and open_clip's head projection."""
        tower = self.vision(model)
        trunk = [f"trunk.{name}" for name in TimmAdapter.head_parameter_names(self, tower.trunk)]
        return trunk + [name for name, _ in tower.head.named_parameters(prefix="head")]


# --- the registry: a list of adapters, tried in order -------------------------------------------

ADAPTERS: list[BackboneAdapter] = [OpenClipAdapter(), OpenClipTimmAdapter(), TimmAdapter()]


def register_backbone(adapter: BackboneAdapter | type[BackboneAdapter], first: bool = True) -> BackboneAdapter:
    """Add a backbone family (an adapter instance or class): ``load_model("<family>:<name>")``, ``adapter_for`` and
    ``load_pruned`` then know it. It replaces a registered family of the same name and, when ``first``, is tried
    before the others when matching a model."""
    instance = adapter() if isinstance(adapter, type) else adapter
    ADAPTERS[:] = [known for known in ADAPTERS if known.family != instance.family]
    ADAPTERS.insert(0, instance) if first else ADAPTERS.append(instance)
    return instance


def adapter_named(family: str) -> BackboneAdapter:
    """The registered adapter of a family, as named in architecture records."""
    for adapter in ADAPTERS:
        if adapter.family == family:
            return adapter
    raise ModelSpecError(f"unknown architecture family {family!r}; known: {sorted(a.family for a in ADAPTERS)}")


def adapter_for(model: nn.Module) -> BackboneAdapter:
    """The first registered adapter that recognises the model."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise UnsupportedModelError(
        f"no amp adapter for a {type_name(model)}. Supported: open_clip CLIP/VisionTransformer, timm "
        "VisionTransformer (incl. DINOv2) and Eva; register_backbone() adds one (notebooks/07_new_backbone)."
    )
