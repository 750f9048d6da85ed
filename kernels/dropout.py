"""Counter-based dropout in the kernels: `keep_mask` / `chunk_keep` draw the masks that
`carzero_fast.backends.philox` defines (and computes in PyTorch) inside any kernel's
epilogue, and `apply_dropout` multiplies a chunk's rows by their mask and scale: the backward
of the dropouts whose mask cannot be read back from the saved values (residual branches,
SimR).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from carzero_fast.backends.philox import ChunkPos, DropoutSpec

# `apply_dropout`'s tile: rows × columns per program
APPLY_BLOCK_R, APPLY_BLOCK_C = 16, 128


@triton.jit
def keep_mask(seed, threshold, col0, o_query, o_item, drop_tag, BLOCK_C: tl.constexpr):  # noqa: ANN001, ANN201
    """bool `[R, BLOCK_C]`, True where kept: columns col0 … col0 + BLOCK_C − 1 (col0 a
    multiple of 4) of the rows whose query and item indices are o_query, o_item `[R]`.

    One Philox call draws four neighbouring columns (column c is output c % 4 of the call on
    counter c // 4): a quarter of the calls of one per element, whose integer work was most of
    what a mask added to a kernel (sm_90 instruction counts, BENCHMARKS.md)."""
    R: tl.constexpr = o_query.shape[0]
    o_c4 = col0 // 4 + tl.arange(0, BLOCK_C // 4)  # [BLOCK_C // 4]
    b_c4 = o_c4[None, :] + 0 * o_query[:, None]  # [R, BLOCK_C // 4]
    b_r0, b_r1, b_r2, b_r3 = tl.philox(seed, b_c4, o_query[:, None] + 0 * b_c4,
                                       o_item[:, None] + 0 * b_c4, drop_tag + 0 * b_c4)  # fmt: skip
    # [R, BLOCK_C // 4, 2, 2] row-major is [R, BLOCK_C] with column 4j + t from output t
    b_r = tl.reshape(tl.join(tl.join(b_r0, b_r2), tl.join(b_r1, b_r3)), [R, BLOCK_C])
    return b_r.to(tl.int64) >= threshold


@triton.jit
def chunk_keep(seed, threshold, o_r, col0, n0, m0, cols, drop_tag, BLOCK_C: tl.constexpr):  # noqa: ANN001, ANN201
    """keep_mask for chunk rows o_r `[R]` (pair (n0 + r // cols, m0 + r % cols)) × columns
    col0 … col0 + BLOCK_C − 1 → `[R, BLOCK_C]`."""
    return keep_mask(seed, threshold, col0, m0 + o_r % cols, n0 + o_r // cols, drop_tag,
                     BLOCK_C)  # fmt: skip


@triton.jit
def apply_dropout_kernel(
    p_x,  # [R, C] gradient (or values) of the dropped tensor, any float dtype
    p_out,  # [R, C] x ∘ keep · scale, p_out's dtype
    n_rows,
    n_cols,
    stride_x,
    stride_out,
    seed,
    threshold,
    scale,
    n0,
    m0,
    cols,
    drop_tag,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    o_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    col0 = tl.program_id(1) * BLOCK_C
    o_c = col0 + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    m_x = (o_r < n_rows)[:, None] & (o_c < n_cols)[None, :]
    b_x = tl.load(p_x + o_r[:, None] * stride_x + o_c[None, :], mask=m_x, other=0.0)
    b_keep = chunk_keep(seed, threshold, o_r, col0, n0, m0, cols, drop_tag, BLOCK_C)
    b_y = tl.where(b_keep, b_x.to(tl.float32) * scale, 0.0)
    tl.store(p_out + o_r[:, None] * stride_out + o_c[None, :], b_y.to(p_out.dtype.element_ty),
             mask=m_x)  # fmt: skip


def apply_dropout(
    x: Tensor, spec: DropoutSpec, pos: ChunkPos, tag_: int, out: Tensor | None = None
) -> Tensor:
    """x `(R, C)`, one row per pair of the chunk at `pos` → x ∘ keep · scale (in `out`)."""
    if out is None:
        out = torch.empty_like(x)
    n_rows, n_cols = x.shape
    if x.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("apply_dropout: rows need unit stride")
    grid = (triton.cdiv(n_rows, APPLY_BLOCK_R), triton.cdiv(n_cols, APPLY_BLOCK_C))
    apply_dropout_kernel[grid](x, out, n_rows, n_cols, x.stride(0), out.stride(0), spec.seed,
                               spec.threshold, spec.scale, pos.n0, pos.m0, pos.cols, tag_,
                               BLOCK_R=APPLY_BLOCK_R, BLOCK_C=APPLY_BLOCK_C)  # fmt: skip
    return out
