"""Files: atomic writes, JSON, library versions; nothing half-written after a crash (pruned models: amp.models)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` then rename tmp over ``path``: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the result the permissions open() would
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {}
    for package in ("amp-prune", "torch", "open_clip_torch", "timm"):
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return found
