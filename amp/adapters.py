"""A uniform view of a vision transformer's MLPs, one small adapter per backbone family.

Everything else in amp (scoring, search, surgery, accounting) works on this view and never on
model classes or attribute names. Adding a backbone family means adding one adapter here (or
registering one from outside with :func:`register_adapter`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedModelError(TypeError):
    """The model, or one of its MLPs, has a structure amp does not know how to prune."""


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


# --- MLP layouts --------------------------------------------------------------------------------
# Each function recognises one MLP module type and returns its site, or None.


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
    try:
        from timm.layers import GluMlp, Mlp, SwiGLU
    except ImportError:  # timm is optional for open_clip-only users
        return None
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


MLP_LAYOUTS: list[Callable[[int, str, nn.Module], MLPSite | None]] = [_timm_layout, _open_clip_layout]


def describe_mlp(index: int, name: str, mlp: nn.Module) -> MLPSite:
    for layout in MLP_LAYOUTS:
        site = layout(index, name, mlp)
        if site is not None:
            return site
    raise UnsupportedModelError(
        f"{name} is a {type_name(mlp)}, an MLP type amp cannot prune. Supported: timm Mlp, GluMlp/SwiGLUPacked, "
        "SwiGLU and open_clip's c_fc/c_proj MLP; see notebooks/07_new_backbone for writing an adapter."
    )


# --- Backbone adapters -------------------------------------------------------------------------


class _SkipBlock(nn.Module):
    """Stands in for a block whose output is already cached; passes its input through."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x


class _Captured(Exception):
    def __init__(self, value: torch.Tensor):
        self.value = value


class BackboneAdapter:
    """Maps one backbone family to the uniform view.

    A subclass names the vision tower, its block list (prefix ``block_prefix`` in ``named_modules``
    of the vision tower), where each block's MLP lives, and how to embed images with or without the
    projection head. Running part of a model (inputs cached at block ``l``) is generic: blocks before
    ``l`` are swapped for pass-throughs and block ``l``'s input is replaced, so no family needs its own
    copy of the forward pass.
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

    def embed(self, model: nn.Module, images: torch.Tensor, project: bool = False) -> torch.Tensor:
        """Pooled image embedding; ``project=False`` is the pre-projection feature the paper scores with."""
        raise NotImplementedError

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        raise NotImplementedError

    def has_projection(self, model: nn.Module) -> bool:
        return False

    # -- what distillation needs (the tower is ``self.vision(model)``) ----------------------------

    def prefix_tokens(self, model: nn.Module) -> int:
        """Tokens before the patch tokens in a block's output (class token, registers)."""
        tower = self.vision(model)
        if hasattr(tower, "num_prefix_tokens"):  # timm
            return int(tower.num_prefix_tokens)
        return 1 if getattr(tower, "class_embedding", None) is not None else 0  # open_clip

    def head_parameter_names(self, model: nn.Module) -> list[str]:
        """Names, in ``self.vision(model).named_parameters()``, of the final norm and projection."""
        heads = {"ln_post", "proj", "norm", "fc_norm", "head"}
        return [name for name, _ in self.vision(model).named_parameters() if name.split(".")[0] in heads]

    def tokens_batch_first(self, model: nn.Module) -> bool:
        """Whether a block's output is (batch, tokens, dim); open_clip's older towers run (tokens, batch, dim)."""
        transformer = getattr(self.vision(model), "transformer", None)
        return not (transformer is not None and getattr(transformer, "batch_first", True) is False)

    # -- derived, family-independent --------------------------------------------------------

    def sites(self, model: nn.Module) -> list[MLPSite]:
        prefix = self.block_prefix(model)
        return [describe_mlp(i, f"{prefix}.{i}.mlp", self.mlp_of(block)) for i, block in enumerate(self.blocks(model))]

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


class OpenClipAdapter(BackboneAdapter):
    """open_clip CLIP (or a bare ``VisionTransformer``): prunes the image tower, never the text tower."""

    family = "open_clip"

    @staticmethod
    def _visual(model: nn.Module) -> nn.Module | None:
        try:
            from open_clip.transformer import VisionTransformer
        except ImportError:
            return None
        if isinstance(model, VisionTransformer):
            return model
        visual = getattr(model, "visual", None)
        return visual if isinstance(visual, VisionTransformer) else None

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


class TimmAdapter(BackboneAdapter):
    """timm ``VisionTransformer`` (incl. DINOv2 with LayerScale, SwiGLU variants) and ``Eva``/EVA02."""

    family = "timm"

    def matches(self, model: nn.Module) -> bool:
        try:
            from timm.models.eva import Eva
            from timm.models.vision_transformer import VisionTransformer
        except ImportError:
            return False
        return isinstance(model, (VisionTransformer, Eva))

    def blocks(self, model: nn.Module) -> nn.Sequential | nn.ModuleList:
        return model.blocks

    def block_prefix(self, model: nn.Module) -> str:
        return "blocks"

    def embed(self, model: nn.Module, images: torch.Tensor, project: bool = False) -> torch.Tensor:
        features = model.forward_head(model.forward_features(images), pre_logits=not project)
        return features

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        size = model.patch_embed.img_size
        return (model.patch_embed.proj.in_channels, *size)

    def has_projection(self, model: nn.Module) -> bool:
        return not isinstance(model.head, nn.Identity)


class OpenClipTimmAdapter(TimmAdapter):
    """open_clip CLIP whose image tower is a timm trunk (``TimmModel``: open_clip's EVA02-CLIP configs, ...)."""

    family = "open_clip_timm"

    def matches(self, model: nn.Module) -> bool:
        visual = getattr(model, "visual", None)
        return type(visual).__name__ == "TimmModel" and super().matches(getattr(visual, "trunk", None))

    def vision(self, model: nn.Module) -> nn.Module:
        return model.visual

    def blocks(self, model: nn.Module) -> nn.Sequential | nn.ModuleList:
        return model.visual.trunk.blocks

    def block_prefix(self, model: nn.Module) -> str:
        return "visual.trunk.blocks"

    def embed(self, model: nn.Module, images: torch.Tensor, project: bool = False) -> torch.Tensor:
        if project:
            return model.visual(images)
        return super().embed(model.visual.trunk, images, project=False)

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        return (3, *model.visual.image_size)

    def has_projection(self, model: nn.Module) -> bool:
        return True


ADAPTERS: list[BackboneAdapter] = [OpenClipAdapter(), OpenClipTimmAdapter(), TimmAdapter()]


def register_adapter(adapter: BackboneAdapter, first: bool = True) -> None:
    """Add an adapter for a new backbone family (tried before the built-in ones when ``first``)."""
    ADAPTERS.insert(0, adapter) if first else ADAPTERS.append(adapter)


def adapter_for(model: nn.Module) -> BackboneAdapter:
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise UnsupportedModelError(
        f"no amp adapter for a {type_name(model)}. Supported: open_clip CLIP/VisionTransformer, timm "
        "VisionTransformer (incl. DINOv2) and Eva; register_adapter() adds one (notebooks/07_new_backbone)."
    )
