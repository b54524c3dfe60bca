"""Bounded memory for the search: tensors on the device, then in host memory, then in files of a temporary directory.

The search keeps three things per run (the stashed block inputs, the current layer's inputs, the validation images);
at the paper's scale (ViT-g, a global batch of 1024, the ImageNet validation set) they do not fit in one device's
memory. :class:`TieredStore` holds tensors within per-tier budgets and returns them bit for bit;
:class:`SpilledBatches` holds validation batches, the overflow one file per batch.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

GIB = 2**30
TIERS = ("device", "host", "disk")


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached, with a storage of its own size (a view would keep, or save, its whole base)."""
    tensor = tensor.detach()
    if tensor.untyped_storage().nbytes() != nbytes(tensor) or not tensor.is_contiguous():
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    return tensor


class SpillDir:
    """A temporary directory for spilled tensors, made on first use and removed by :meth:`close` (or when the owner
    is garbage-collected, or at exit)."""

    def __init__(self, parent: str | Path | None, prefix: str):
        self.parent, self.prefix, self.path = parent, prefix, None
        self.files = 0
        self._finalizer = None

    def new_file(self) -> Path:
        if self.path is None:
            self.path = Path(tempfile.mkdtemp(prefix=self.prefix, dir=self.parent))
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)
        self.files += 1
        return self.path / f"{self.files}.pt"

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # removes the directory once


class TieredStore:
    """Tensors by key: on the device within ``device_bytes``, then in host memory within ``host_bytes``, then in files
    of a temporary directory (read back memory-mapped). Every tensor comes back on the device, bit for bit.

    ``peak`` records the most bytes each tier held, so a test can check the bounds."""

    def __init__(self, device: torch.device, device_bytes: float, host_bytes: float, spill_dir=None):
        self.device = device
        self.budget = {"device": device_bytes, "host": host_bytes, "disk": math.inf}
        self.used = dict.fromkeys(TIERS, 0)
        self.peak = dict.fromkeys(TIERS, 0)
        self.items: dict[Any, tuple[str, Any, int]] = {}
        self.spill = SpillDir(spill_dir, "amp-search-")

    def put(self, key, tensor: torch.Tensor, prefer: Sequence[str] = ("device", "host")) -> str:
        """Keep ``tensor`` under ``key`` in the first tier of ``prefer`` with room (else on disk); returns the tier."""
        self.delete(key)
        size = nbytes(tensor)
        tier = next((t for t in prefer if self.used[t] + size <= self.budget[t]), "disk")
        if tier == "device":
            value = own_storage(tensor.to(self.device))
        elif tier == "host":
            value = own_storage(tensor.to("cpu"))
        else:
            value = self.spill.new_file()
            torch.save(own_storage(tensor.to("cpu")), value)
        self.items[key] = (tier, value, size)
        self.used[tier] += size
        self.peak[tier] = max(self.peak[tier], self.used[tier])
        return tier

    def get(self, key) -> torch.Tensor:
        tier, value, _ = self.items[key]
        if tier == "disk":
            value = torch.load(value, map_location="cpu", mmap=True, weights_only=True)
        return value.to(self.device, non_blocking=tier == "host")

    def rename(self, old, new) -> None:
        self.delete(new)
        self.items[new] = self.items.pop(old)

    def delete(self, key) -> None:
        if key in self.items:
            tier, value, size = self.items.pop(key)
            self.used[tier] -= size
            if tier == "disk":
                Path(value).unlink(missing_ok=True)

    def held(self) -> list:
        """The keys held (a copy: safe to delete while iterating)."""
        return list(self.items)

    def close(self) -> None:
        self.items.clear()
        self.used = dict.fromkeys(TIERS, 0)
        self.spill.close()


class SpilledBatches(Sequence):
    """Validation batches, the first ones in memory (within ``memory_gb``), the rest one file per batch in a temporary
    directory, read back when asked for (what :func:`materialise` returns when the split does not fit). The files are
    removed by :meth:`close`, or when this object is garbage-collected."""

    def __init__(self, memory_gb: float | None = None, spill_dir: str | Path | None = None):
        self.memory_bytes = math.inf if memory_gb is None else memory_gb * GIB
        self.in_memory_bytes = 0
        self.on_disk_bytes = 0
        self.lengths: list[int] = []
        self._items: list[Any] = []  # (images, targets) or the path of a file holding them
        self.spill = SpillDir(spill_dir, "amp-validation-")

    def append(self, images: torch.Tensor, targets: Any) -> None:
        size = nbytes(images)
        if self.in_memory_bytes + size <= self.memory_bytes:
            self._items.append((images, targets))
            self.in_memory_bytes += size
        else:
            path = self.spill.new_file()
            torch.save({"images": own_storage(images.cpu()), "targets": targets}, path)
            self._items.append(path)
            self.on_disk_bytes += size
        self.lengths.append(len(images))

    @property
    def spilled(self) -> int:
        """How many batches are on disk."""
        return sum(isinstance(item, Path) for item in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        item = self._items[index]
        if isinstance(item, Path):  # our own file: targets may be captions (str), so not weights_only
            loaded = torch.load(item, map_location="cpu", weights_only=False)
            return loaded["images"], loaded["targets"]
        return item

    def close(self) -> None:
        self.spill.close()


class Selected(Sequence):
    """Some of a sequence's items, by index, without reading the others (a view of :class:`SpilledBatches`)."""

    def __init__(self, items: Sequence, indices: list[int]):
        self.items, self.indices = items, indices
        self.lengths = [batch_sizes(items)[i] for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.items[self.indices[index]]


def batch_sizes(batches: Sequence) -> list[int]:
    """Images per batch, without reading spilled batches back."""
    lengths = getattr(batches, "lengths", None)
    return list(lengths) if lengths is not None else [len(images) for images, _ in batches]


def held_in_memory(batches: Sequence) -> int:
    """Bytes of validation images the caller holds in memory (the in-memory part of :class:`SpilledBatches`)."""
    if isinstance(batches, (SpilledBatches, Selected)):
        inner = batches.items if isinstance(batches, Selected) else batches
        return inner.in_memory_bytes
    return sum(nbytes(images) for images, _ in batches)
