"""Peak tensor memory of a region of code, on any device, deterministically.

`track_memory()` counts the bytes of every tensor storage created while it is active and
releases them when the storage dies, so `peak_bytes` is the most tensor memory the region had
alive at once beyond what existed before it (allocator caching and fragmentation excluded).
It works on CPU, where PyTorch keeps no allocator statistics, and is what the tests use to
show that a path's memory does not grow with N·M·D. Overhead: one Python call per op.
"""

from __future__ import annotations

import ctypes
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class MemoryTracker(TorchDispatchMode):
    """Dispatch mode that tracks live and peak bytes of storages created inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self.live_bytes -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._seen or key in inputs:
                continue  # a view, an in-place result or an empty tensor
            self._seen.add(key)
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(storage, self._release, key, nbytes)
        return out


@contextmanager
def track_memory() -> Iterator[MemoryTracker]:
    """`with track_memory() as m: ...` then `m.peak_bytes`."""
    tracker = MemoryTracker()
    with tracker:
        yield tracker


def device_sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU): before reading a host clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory of one call of `fn` above what was allocated before it, in MiB: the CUDA
    allocator's peak on a GPU, live tensor bytes (`track_memory`) elsewhere."""
    if device.type != "cuda":
        with track_memory() as tracker:
            fn()
        return tracker.peak_bytes / 2**20
    device_sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    device_sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def retain_freed_memory() -> str:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS: from now on
    a process that allocates and frees the same sizes again stops page-faulting fresh pages in.

    Why a benchmark wants it: with glibc's defaults a `reference` call on CPU faults in
    ~0.6–2 GB of fresh pages per call (its freed activations go back to the OS between calls;
    how much depends on what ran before), which cost it 10–40% of its time on the 2-core CPU
    (BENCHMARKS.md). Keeping freed memory measures every backend at its best, the strictest
    baseline. Process-wide and not undone. Returns what was done, for the record.
    """
    if not sys.platform.startswith("linux"):
        return "default (not Linux)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        # mmap threshold: 32 MiB is glibc's maximum (larger blocks are always mmapped);
        # trim threshold -1: never trim (a finite one, even 2 GiB, still let the heap top go
        # back to the OS between calls when several backends ran in one process)
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
              and libc.mallopt(_M_TRIM_THRESHOLD, -1)
              and libc.mallopt(_M_TOP_PAD, 2**30))  # fmt: skip
    except (OSError, AttributeError):
        return "default (no glibc mallopt)"
    if not ok:
        return "default (mallopt refused)"
    return "retain freed memory (glibc: mmap threshold 32 MiB, no trim, 1 GiB top pad)"
