"""The Hugging Face Hub: a pruned model pushed with a generated model card, and loaded back as ``hf-hub:<repo id>``.

``amp push <pruned dir> <repo id>`` uploads the model's files (``model.safetensors``, ``amp.json`` and the search
and evaluation reports beside them) in one commit, with a model card (``README.md``) generated from them: the base
model and its licence, the width of every MLP, parameters and FLOPs in both conventions, the evaluation table with its
95 % intervals, and the commands that produced the model. ``amp.load_model("hf-hub:<repo id>[@<revision>]")`` (or
:func:`amp.load_pruned`) downloads a repository once into the local Hub cache (``huggingface_hub.snapshot_download``)
and loads it from there; with ``HF_HUB_OFFLINE=1`` only the cache is read.

``huggingface_hub`` stays optional: it is imported only when a Hub function runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import shlex
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import open_clip
import timm

from amp.accounting import model_stats
from amp.adapters import ModelSpecError, adapter_for, adapter_named
from amp.io import atomic_write

if TYPE_CHECKING:  # the types only; huggingface_hub is imported where it is used
    from huggingface_hub import CommitInfo, CommitOperationAdd, ModelCard

    from amp.models import Backbone

__all__ = [
    "CARD_FILE",
    "HUB_PREFIX",
    "HubError",
    "base_model_info",
    "command_line",
    "command_provenance",
    "commit_operations",
    "model_card",
    "parse_hub_spec",
    "push",
    "running_command",
    "snapshot",
    "write_model_card",
]

HUB_PREFIX = "hf-hub"
CARD_FILE = "MODEL_CARD.md"  # beside REPORT.md in a run folder; it becomes README.md in a Hub repository
REPO_CARD = "README.md"
# what a pushed repository holds besides its card: the model (amp.models' two files) and the reports beside it
PUSHED_FILES = ("model.safetensors", "amp.json", "search.json", "report.json", "REPORT.md")
INSTALL_HINT = "pip install huggingface_hub"
# bases whose licence no library reports: the offline tiny CLIP is trained by this project (MIT, like amp)
KNOWN_LICENCES = {"zoo:tiny-clip": "mit"}
TAGS = ["amp", "pruned", "mlp-pruning", "vision-transformer"]

_COMMAND: contextvars.ContextVar[str | None] = contextvars.ContextVar("amp_command", default=None)


class HubError(ModelSpecError):
    """A Hub repository that cannot be named, found in the local cache, downloaded or written."""


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise HubError(f"the Hugging Face Hub needs huggingface_hub: {INSTALL_HINT}") from None
    return huggingface_hub


# --- the commands that produced a model ---------------------------------------------------------------


def command_line(argv: Sequence[str]) -> str:
    """The ``amp`` command line of ``argv`` (the arguments after ``amp``), quoted for a shell."""
    return shlex.join(["amp", *argv])


@contextlib.contextmanager
def running_command(argv: Sequence[str]) -> Iterator[str]:
    """While the CLI runs ``argv``: its command line is the one :func:`command_provenance` records."""
    token = _COMMAND.set(command_line(argv))
    try:
        yield _COMMAND.get()
    finally:
        _COMMAND.reset(token)


def command_provenance(info: dict[str, Any]) -> dict[str, list[str]]:
    """``{"commands": [...]}``: the commands recorded for a loaded model plus this process's (none outside the CLI)."""
    commands = list(info.get("commands", []))
    if _COMMAND.get() is not None:
        commands.append(_COMMAND.get())
    return {"commands": commands} if commands else {}


# --- loading: hf-hub:<repo id>[@<revision>] -----------------------------------------------------------


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """``hf-hub:<repo id>[@<revision>]`` (the prefix optional) as ``(repo id, revision or None)``."""
    rest = spec[len(HUB_PREFIX) + 1 :] if spec.startswith(f"{HUB_PREFIX}:") else spec
    repo_id, at, revision = rest.partition("@")
    if at and not revision:
        raise HubError(f"{spec!r} names no revision after '@'")
    return _checked_repo_id(repo_id, spec), revision or None


def _checked_repo_id(repo_id: str, spec: str) -> str:
    hub = _hub()
    try:
        hub.utils.validate_repo_id(repo_id)
    except hub.errors.HFValidationError as err:
        raise HubError(
            f"{spec!r}: not a Hub repository id ({err}); expected {HUB_PREFIX}:<user>/<name>[@<revision>]"
        ) from None
    if "/" not in repo_id:  # the Hub's model repositories are <user or organisation>/<name>
        raise HubError(f"{spec!r}: a Hub repository id is <user or organisation>/<name>")
    return repo_id


def snapshot(spec: str) -> Path:
    """The local folder of a Hub repository (``hf-hub:<repo id>[@<revision>]``): downloaded into the Hub cache once;
    with ``HF_HUB_OFFLINE=1`` (or no connection) the cached snapshot, or an error naming the repository."""
    hub = _hub()
    repo_id, revision = parse_hub_spec(spec)
    errors = hub.errors
    try:
        return Path(hub.snapshot_download(repo_id, revision=revision, allow_patterns=[*PUSHED_FILES, REPO_CARD]))
    except errors.LocalEntryNotFoundError as err:  # offline (or unreachable) and not (completely) in the cache
        offline = " and HF_HUB_OFFLINE is set" if hub.constants.HF_HUB_OFFLINE else ""
        raise HubError(
            f"{spec}: not in the local Hub cache ({hub.constants.HF_HUB_CACHE}){offline}: download it once with "
            f"network access ({str(err).splitlines()[0]})"
        ) from None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as err:
        raise HubError(f"{spec}: {str(err).splitlines()[0]}") from None


# --- the model card -----------------------------------------------------------------------------------


def _cached_card_licence(repo_id: str) -> str | None:
    """The licence in a Hub repository's card if the card is in the local cache (never downloads)."""
    hub = _hub()
    try:
        path = hub.try_to_load_from_cache(repo_id, REPO_CARD)
    except ValueError:  # not a repository id
        return None
    return hub.ModelCard.load(path).data.license if isinstance(path, str) else None


def base_model_info(base_model: str) -> dict[str, str | None]:
    """What is known of a base model spec offline: ``{"hub_id", "license"}`` (each ``None`` where unknown).

    timm and open_clip know their weights' Hub repositories (and timm their licences); ``hf:`` and ``hf-hub:`` bases
    are Hub repositories whose cached card may name a licence.
    """
    prefix, _, rest = base_model.partition(":")
    hub_id, licence = None, KNOWN_LICENCES.get(base_model)
    if prefix == "timm" and "." in rest and ":" not in rest:  # a tag's weights (no tag, or a file: not timm's)
        try:
            cfg = timm.models.get_pretrained_cfg(rest)
        except RuntimeError:  # a tag timm does not know
            cfg = None
        hub_id, licence = (cfg.hf_hub_id, cfg.license) if cfg is not None else (None, None)
    elif prefix == "open_clip" and rest.count(":") == 1:
        hub_id = (open_clip.get_pretrained_cfg(*rest.split(":")).get("hf_hub") or "").strip("/") or None
        if hub_id and hub_id.startswith("timm/"):  # open_clip's weights on timm's Hub account: timm has the licence
            licence = base_model_info(f"timm:{hub_id[5:]}")["license"]
    elif prefix in ("hf", HUB_PREFIX) and not Path(rest).exists():
        hub_id = rest.partition("@")[0]
    elif prefix == "hf" and (Path(rest) / REPO_CARD).is_file():
        licence = _hub().ModelCard.load(Path(rest) / REPO_CARD).data.license
    if hub_id and licence is None:
        licence = _cached_card_licence(hub_id)
    return {"hub_id": hub_id, "license": licence}


def _dense_stats(backbone: Backbone):
    """Parameters and FLOPs of the unpruned architecture, built on ``meta`` (no weights)."""
    model = adapter_named(backbone.arch["family"]).build(backbone.arch, "meta").eval()
    return model_stats(SimpleNamespace(adapter=adapter_for(model), model=model))


def _size_table(backbone: Backbone) -> list[str]:
    pruned, dense = model_stats(backbone), _dense_stats(backbone)
    rows = (
        ("vision tower parameters (M)", "params", 1e6),
        ("GFLOPs per image, all matmuls (`model_stats().flops`)", "flops", 1e9),
        ("GFLOPs per image, linear + patch, the paper's convention (`.linear_flops`)", "linear_flops", 1e9),
    )
    lines = ["| | dense | pruned | pruned / dense |", "|---|---:|---:|---:|"]
    for label, key, unit in rows:
        d, p = getattr(dense, key), getattr(pruned, key)
        lines.append(f"| {label} | {d / unit:.3f} | {p / unit:.3f} | {p / d:.1%} |")
    return lines


def _widths_table(widths: list[int], dense: list[int]) -> list[str]:
    lines = ["| layer | width | dense width | kept |", "|---:|---:|---:|---:|"]
    lines += [f"| {i} | {w} | {d} | {w / d:.1%} |" for i, (w, d) in enumerate(zip(widths, dense))]
    return lines


def _without_title(markdown: str) -> str:
    """A report's Markdown under the card's own heading: its first-level title dropped."""
    lines = markdown.strip().splitlines()
    return "\n".join(lines[1:] if lines and lines[0].startswith("# ") else lines).strip()


def model_card(
    backbone: Backbone, evaluation: str | None = None, repo_id: str | None = None, config: dict | None = None
) -> ModelCard:
    """The model card of a pruned model: metadata (base model, licence, tags) and a body with its sizes, widths per
    layer, how it was made and ``evaluation`` (a report's Markdown: the table with 95 % intervals), if given.

    ``config`` (a run's settings) stands in for the commands when none were recorded (the Python API).
    """
    hub = _hub()
    info = backbone.info
    base = str(info.get("base_model") or backbone.spec)
    known = base_model_info(base)
    widths, dense = backbone.widths(), list(info.get("dense_widths") or backbone.widths())
    licence = known["license"]
    data = hub.ModelCardData(
        base_model=known["hub_id"],
        license=licence or "other",
        license_name=None if licence else "see-base-model",
        tags=[*TAGS, backbone.adapter.family],
        pipeline_tag="image-feature-extraction",
    )
    name = repo_id.split("/")[-1] if repo_id else f"{base} (AMP-pruned)"
    load = f"hf-hub:{repo_id}" if repo_id else "hf-hub:<repo id>"
    lines = [
        f"# {name}",
        "",
        f"`{base}` with its MLP hidden layers pruned by [amp](https://arxiv.org/abs/2603.08100) (Adaptive MLP "
        f"Pruning): {sum(widths)} of {sum(dense)} MLP units kept ({sum(widths) / sum(dense):.1%}), each layer "
        "at its own width. The weights are amp's format (`model.safetensors` + `amp.json`).",
        "",
        "```python",
        "import amp",
        "",
        f'backbone = amp.load_model("{load}")  # backbone.model, backbone.preprocess, backbone.embed(images)',
        "```",
        "",
        "## Size",
        "",
        *_size_table(backbone),
        "",
        "## Widths per layer",
        "",
        *_widths_table(widths, dense),
        "",
        "## How it was made",
        "",
    ]
    commands = info.get("commands") or []
    if commands:
        lines += ["The commands that produced it, in order:", "", "```bash", *commands, "```", ""]
    elif config:
        lines += ["Made through amp's Python API (no command line recorded), with:", "", "```json"]
        lines += [json.dumps(config, indent=2), "```", ""]
    else:
        lines += ["No command line was recorded (made through amp's Python API).", ""]
    for key in ("search", "distill"):
        if info.get(key):
            lines += [f"`{key}` settings (from `amp.json`):", "", "```json", json.dumps(info[key], indent=2), "```", ""]
    lines += ["## Evaluation", ""]
    if evaluation:
        lines += [_without_title(evaluation), ""]
    else:
        lines += ["No evaluation report was beside the model when this card was written (`amp demo` writes one).", ""]
    lines += ["## Licence", ""]
    if licence:
        lines.append(f"`{licence}`, the licence of the base model `{base}`; check it before use.")
    else:
        lines.append(f"amp does not know the licence of the base model `{base}` (hence `other`): it is that of the "
                     "base model's weights; check it before using or sharing this model.")  # fmt: skip
    return hub.ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def write_model_card(
    directory: str | Path, backbone: Backbone, evaluation: str | None = None, config: dict | None = None
) -> Path:
    """Write :func:`model_card` as ``MODEL_CARD.md`` into ``directory`` (atomically)."""
    path = Path(directory) / CARD_FILE
    text = str(model_card(backbone, evaluation, config=config))
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path


# --- pushing ------------------------------------------------------------------------------------------


def commit_operations(directory: str | Path, card: ModelCard | str) -> list[CommitOperationAdd]:
    """The files of one commit: the model's files found in ``directory`` and the card as ``README.md``."""
    hub = _hub()
    directory = Path(directory)
    operations = [
        hub.CommitOperationAdd(path_in_repo=name, path_or_fileobj=directory / name)
        for name in PUSHED_FILES
        if (directory / name).is_file()
    ]
    return [*operations, hub.CommitOperationAdd(path_in_repo=REPO_CARD, path_or_fileobj=str(card).encode())]


def push(
    directory: str | Path,
    repo_id: str,
    card: ModelCard | str,
    revision: str | None = None,
    private: bool | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
) -> CommitInfo:
    """Create ``repo_id`` if needed and upload the pruned model in ``directory`` with ``card`` in one commit."""
    hub = _hub()
    _checked_repo_id(repo_id, repo_id)
    api = hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.create_commit(
        repo_id,
        commit_operations(directory, card),
        commit_message=commit_message or f"Upload AMP-pruned model from {Path(directory).name}",
        revision=revision,
        create_pr=create_pr,
    )
