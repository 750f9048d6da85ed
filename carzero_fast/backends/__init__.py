"""Backend registry: one executor interface, several implementations."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..config import AlignerConfig
from ..weights import AlignerWeights
from .chunked import chunked_both_directions, chunked_forward
from .fused import (
    KERNEL_DTYPES,
    draw_dropout,
    kernels_unavailable,
    triton_both_directions,
    triton_forward,
)
from .fused_train import Job, triton_train
from .reference import reference_forward

BACKENDS = ("auto", "reference", "chunked", "triton")


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The concrete backend `name` stands for on `device` (for inputs of `dtype`): "auto" is
    "triton" on CUDA devices (when its kernels can run there: a warning says why not) for
    the dtypes they compute in (not float64), "chunked" elsewhere."""
    check_backend_name(name)
    if name != "auto" or device.type != "cuda" or dtype not in (None, *KERNEL_DTYPES):
        return "chunked" if name == "auto" else name
    reason = kernels_unavailable(device)
    if reason is None:
        return "triton"
    warnings.warn(f"backend 'auto' runs 'chunked' on CUDA: {reason}", RuntimeWarning,
                  stacklevel=2)  # fmt: skip
    return "chunked"


def autocast_dtype(name: str, x: Tensor) -> torch.dtype | None:
    """Under an active `torch.autocast`, the dtype backend `name` casts inputs like `x` and
    the parameters to, or None to run them as they are.

    `reference` is plain PyTorch: autocast applies to its ops as usual (None here). `chunked`
    and `triton` run with autocast turned off, since their recomputing backward must see the
    forward's dtypes: `chunked` computes in the inputs' dtype (None), `triton` in autocast's
    16-bit dtype, whose training path rounds the GEMM operands and keeps the residual stream,
    LayerNorm and softmax in fp32, as autocast does (calls without gradients: the 16-bit
    stream by default, `fused.inference_stream_dtype`). float64 is never cast (nor by
    autocast).
    """
    if name != "triton" or not torch.is_autocast_enabled(x.device.type):
        return None
    dtype = torch.get_autocast_dtype(x.device.type)
    if x.dtype in (torch.float64, dtype) or dtype not in KERNEL_DTYPES:
        return None
    return dtype


def _autocast_active(name: str, x: Tensor) -> bool:
    return name != "reference" and torch.is_autocast_enabled(x.device.type)


def _needs_autograd(w: AlignerWeights, *t: Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in (*t, *w.flatten()))


def run_backend(
    name: str,
    w: AlignerWeights,
    cfg: AlignerConfig,
    memory: Tensor,
    queries: Tensor,
    memory_mask: Tensor | None,
    *,
    training: bool,
    chunk_budget_bytes: int | None = None,
) -> Tensor:
    """Dispatch to a backend; every backend returns `(N, M)` logits in the dtype it computes
    in: the inputs', or autocast's (`autocast_dtype`)."""
    name = resolve_backend(name, memory.device, memory.dtype)
    if _autocast_active(name, memory):
        dtype = autocast_dtype(name, memory) or memory.dtype
        with torch.autocast(memory.device.type, enabled=False):
            return run_backend(name, w.to(dtype), cfg, memory.to(dtype), queries.to(dtype),
                               memory_mask, training=training,
                               chunk_budget_bytes=chunk_budget_bytes)  # fmt: skip
    if name == "reference":
        return reference_forward(w, cfg, memory, queries, memory_mask, training)
    if name == "triton":
        drop = draw_dropout(cfg, training)
        if _needs_autograd(w, memory, queries):
            (out,) = triton_train(w, cfg, (memory, queries), [Job(0, 1, memory_mask, drop)],
                                  chunk_budget_bytes)  # fmt: skip
            return out
        return triton_forward(w, cfg, memory, queries, memory_mask, chunk_budget_bytes, drop)
    return chunked_forward(w, cfg, memory, queries, memory_mask, training, chunk_budget_bytes)


def run_backend_both(
    name: str,
    w: AlignerWeights,
    cfg: AlignerConfig,
    img_tokens: Tensor,
    txt_tokens: Tensor,
    img_mask: Tensor | None,
    txt_mask: Tensor | None,
    *,
    training: bool,
    chunk_budget_bytes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Both directions, globals from row 0 → (i2t `(N, M)`, t2i `(M, N)`)."""
    name = resolve_backend(name, img_tokens.device, img_tokens.dtype)
    if _autocast_active(name, img_tokens):
        dtype = autocast_dtype(name, img_tokens) or img_tokens.dtype
        with torch.autocast(img_tokens.device.type, enabled=False):
            return run_backend_both(name, w.to(dtype), cfg, img_tokens.to(dtype),
                                    txt_tokens.to(dtype), img_mask, txt_mask, training=training,
                                    chunk_budget_bytes=chunk_budget_bytes)  # fmt: skip
    if name == "reference":
        return (
            reference_forward(w, cfg, img_tokens, txt_tokens[:, 0], img_mask, training),
            reference_forward(w, cfg, txt_tokens, img_tokens[:, 0], txt_mask, training),
        )
    if name == "triton":
        if _needs_autograd(w, img_tokens, txt_tokens):
            jobs = [Job(0, 1, img_mask, draw_dropout(cfg, training)),
                    Job(1, 0, txt_mask, draw_dropout(cfg, training))]  # fmt: skip
            i2t, t2i = triton_train(w, cfg, (img_tokens, txt_tokens), jobs, chunk_budget_bytes)
            return i2t, t2i
        return triton_both_directions(
            w, cfg, img_tokens, txt_tokens, img_mask, txt_mask, chunk_budget_bytes, training
        )
    return chunked_both_directions(
        w, cfg, img_tokens, txt_tokens, img_mask, txt_mask, training, chunk_budget_bytes
    )
