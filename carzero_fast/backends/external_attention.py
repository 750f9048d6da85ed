"""Off-the-shelf attention kernels for the `chunked` backend's "kv" stage.

The GPU check compares the fused `triton` backend with the best PyTorch-level alternative:
`chunked` with its attention on flash-attn's or xformers' kernels (the optional `[gpu]`
extras). `use_attention("flash_attn" | "xformers" | "sdpa")` selects one for a block of code;
they apply where those libraries can: no dropout, no key mask, 16-bit inputs (elsewhere the
stage stays on PyTorch's SDPA, which computes the same function).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

IMPLS = ("sdpa", "flash_attn", "xformers")
_selected = "sdpa"


def available() -> dict[str, bool]:
    """Which implementations can be imported here."""
    found = {"sdpa": True}
    for name, module in (("flash_attn", "flash_attn"), ("xformers", "xformers.ops")):
        try:
            importlib.import_module(module)
            found[name] = True
        except ImportError:
            found[name] = False
    return found


@contextmanager
def use_attention(name: str) -> Iterator[None]:
    """Run the chunked backend's kv-form attention on `name` inside the block."""
    global _selected
    if name not in IMPLS:
        raise ValueError(f"unknown attention implementation {name!r}; choose one of {IMPLS}")
    if not available()[name]:
        raise ImportError(f"{name} is not installed (pip install -e '.[gpu]')")
    previous, _selected = _selected, name
    try:
        yield
    finally:
        _selected = previous


def external_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
    """q `(n, m, H, dh)`, k/v `(n, P, H, dh)` → `(n, m, H, dh)` on the selected library, or
    None where it does not apply (SDPA then runs)."""
    if _selected == "sdpa" or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if _selected == "flash_attn":
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v)  # softmax scale 1/sqrt(dh) by default
    from xformers.ops import memory_efficient_attention

    return memory_efficient_attention(q, k, v)  # same layout, same default scale
