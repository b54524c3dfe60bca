"""Files: atomic writes of files and whole directories, output checks made before any work, safetensors headers.

Nothing is half-written after a crash: a file is written beside its target and renamed over it
(:func:`atomic_write`); a directory is written whole into a temporary directory beside it and swapped into place
(:func:`write_dir`), so a kill at any moment leaves the old directory or the new one. Outputs are checked before the
work that fills them (:func:`check_output_file`, :func:`check_output_dir`): an existing file where a directory goes,
a location that cannot be written, a non-empty directory or an input in the way is refused with the option named.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


class OutputError(ValueError):
    """An output location that cannot be written, or whose writing would destroy something (a user's files)."""


class FileFormatError(ValueError):
    """A file that is truncated or not of the format its name promises."""


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` then rename tmp over ``path``: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp and safetensors' save_file (it replaces the file) make 0600 files: give those open() would
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


# --- whole directories ------------------------------------------------------------------------------

_TMP, _OLD = "amp-tmp", "amp-old"  # .<name>.amp-tmp-<pid>-<random>: a directory being written; amp-old: replaced


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # this process's own (another thread's save): not an orphan
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_orphans(path: str | Path) -> None:
    """Remove what a killed :func:`write_dir` left beside ``path`` (restoring the old directory if it was between)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    prefix = f".{path.name}."
    for orphan in sorted(e for e in path.parent.iterdir() if e.name.startswith(prefix)):
        match = re.fullmatch(rf"({_TMP}|{_OLD})-(\d+)-\w+", orphan.name[len(prefix) :])
        if not match or _pid_alive(int(match[2])) or not orphan.is_dir():
            continue
        if match[1] == _OLD and not path.exists():
            os.rename(orphan, path)  # killed between the two renames of the fallback swap: the old one comes back
        else:
            shutil.rmtree(orphan, ignore_errors=True)


def _exchange(a: Path, b: Path) -> None:
    """Swap two directories atomically (Linux ``renameat2(RENAME_EXCHANGE)``); elsewhere three renames."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        at_fdcwd, rename_exchange = -100, 2
        if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(b))
    old = Path(tempfile.mkdtemp(prefix=f".{b.name}.{_OLD}-{os.getpid()}-", dir=b.parent))
    os.rmdir(old)
    os.rename(b, old)
    os.rename(a, b)
    os.rename(old, a)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # cheap (a checkpoint can be gigabytes); every amp write replaces files, never edits them
    except OSError:
        shutil.copy2(src, dst)


def _carry(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy)
    elif src.exists():
        _link_or_copy(str(src), str(dst))


def _listing(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def write_dir(
    path: str | Path, write: Callable[[Path], None], overwrite: bool = False, keep: Iterable[str] = ()
) -> Path:
    """Write a directory all or nothing: ``write(tmp)`` fills a new directory beside ``path``, which then replaces it.

    ``keep`` names entries of the existing directory carried into the new one (a search state, checkpoints); any
    other content needs ``overwrite=True`` and is then replaced whole (no stale file stays beside the new ones).
    A kill at any moment leaves the old directory or the new one; what it leaves beside them is removed by the next
    call for the same ``path``.
    """
    path = Path(path)
    keep = list(keep)
    clean_orphans(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path} is a file, not a directory: remove it or choose another directory")
    others = sorted(e.name for e in path.iterdir() if e.name not in keep) if path.is_dir() else []
    if others and not overwrite:
        raise OutputError(f"{path} is not empty (holds {_listing(others)}): pass overwrite=True to replace it whole")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_TMP}-{os.getpid()}-", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 directories
        for name in keep:
            _carry(path / name, tmp / name)
        write(tmp)
        if path.is_dir():
            _exchange(tmp, path)  # tmp now holds the old directory
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return path


# --- output locations, checked before the work that fills them ---------------------------------------


def _check_writable(target: Path, option: str) -> None:
    """``target`` (not yet there, or there) can be created and written: its nearest existing ancestor is a writable
    directory."""
    base = target
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise OutputError(f"{option} {target}: {base} is a file, so {target} cannot be created; choose another path")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as err:
        raise OutputError(
            f"{option} {target}: cannot write in {base} ({err.strerror}); choose a writable path"
        ) from None


def check_output_file(path: str | Path, option: str = "--out") -> Path:
    """An output file: not an existing directory, in a location that can be written."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a directory; name a file in it instead")
    _check_writable(path.parent, option)
    return path


def check_writable_dir(path: str | Path, option: str = "--out") -> Path:
    """A directory to write in (what is there may stay): not an existing file, creatable, writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} is a file, not a directory; choose another {option}")
    _check_writable(path, option)
    return path


def check_output_dir(
    path: str | Path,
    option: str = "--out",
    overwrite: bool = False,
    resumable: str | None = None,
    resume: bool = False,
    inputs: Iterable[str | Path | None] = (),
) -> Path:
    """An output directory: creatable, and never destroying what is there unless asked.

    A non-empty directory needs ``overwrite`` (or ``resume`` with the state named ``resumable`` in it); so does an
    ``inputs`` path (the model being loaded) as the output. An output that contains an input, or the working
    directory, is refused even with ``overwrite`` (replacing it whole would delete them).
    """
    path = check_writable_dir(path, option)
    here = path.resolve()
    for spec in inputs:
        source = Path(spec).resolve() if spec and Path(spec).exists() else None
        if source == here and not overwrite:
            raise OutputError(
                f"{option} {path} is the input {spec}: writing there replaces it; pass --overwrite to do so, "
                f"or choose another {option}"
            )
        if source is not None and here in source.parents:
            raise OutputError(f"{option} {path} contains the input {spec}; choose another {option}")
    if overwrite and (here == Path.cwd().resolve() or here in Path.cwd().resolve().parents):
        raise OutputError(f"{option} {path} contains the working directory; choose another {option}")
    entries = sorted(e.name for e in path.iterdir()) if path.is_dir() else []
    state = resumable is not None and (path / resumable).exists()
    if entries and not overwrite and not (resume and state):
        hint = f"--resume to continue from its {resumable}, " if state else ""
        none = f" (it holds no {resumable} to resume from)" if resume and not state else ""
        raise OutputError(
            f"{option} {path} is not empty (holds {_listing(entries)}){none}: pass {hint}--overwrite to replace it "
            f"whole, or choose another {option}"
        )
    return path


# --- safetensors ------------------------------------------------------------------------------------

_MAX_HEADER = 100 * 2**20


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The header of a safetensors file (``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": ...}``), after
    checking that the file is one and holds all the bytes its header promises (a truncated copy is named as such)."""
    path = Path(path)
    size = path.stat().st_size

    def bad(reason: str) -> FileFormatError:
        return FileFormatError(f"{path}: {reason}; copy or write the file again")

    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, not a safetensors file (truncated?)")
        length = int.from_bytes(head, "little")
        if length > min(size - 8, _MAX_HEADER):
            raise bad(f"not a safetensors file, or truncated (its header claims {length} bytes of {size})")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise bad("not a safetensors file (its header is not JSON)") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else None
    if tensors is None or not all(isinstance(v, dict) and "data_offsets" in v for v in tensors.values()):
        raise bad("not a safetensors file (its header lists no tensors)")
    needed = 8 + length + max((v["data_offsets"][1] for v in tensors.values()), default=0)
    if needed > size:
        raise bad(f"truncated: {size} bytes of the {needed} its header describes")
    return header


def versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {}
    for package in ("amp-prune", "torch", "open_clip_torch", "timm"):
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return found


# --- where the project is -----------------------------------------------------------------------------------


def project_root() -> Path:
    """The checkout that holds ``amp/`` and ``notebooks/`` (else the working directory)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "notebooks").is_dir() else Path.cwd()


def resolve(path: str | Path) -> Path:
    """``path`` as is when absolute, else relative to the project root (notebooks run from ``notebooks/`` too)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else project_root() / path
