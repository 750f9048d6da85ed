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


@triton.jit
def keep_mask(seed, threshold, o_col, o_query, o_item, drop_tag):  # noqa: ANN001, ANN201
    """bool block, True where kept; o_col/o_query/o_item int32 blocks of one shape."""
    b_r, _, _, _ = tl.philox(seed, o_col, o_query, o_item, drop_tag + 0 * o_col)
    return b_r.to(tl.int64) >= threshold


@triton.jit
def chunk_keep(seed, threshold, o_r, o_col, n0, m0, cols, drop_tag):  # noqa: ANN001, ANN201
    """keep_mask for chunk rows o_r `[R]` × columns o_col `[C]` → `[R, C]`."""
    b_item = (n0 + o_r // cols)[:, None] + 0 * o_col[None, :]  # [R, C]
    b_query = (m0 + o_r % cols)[:, None] + 0 * o_col[None, :]
    b_col = o_col[None, :] + 0 * o_r[:, None]
    return keep_mask(seed, threshold, b_col, b_query, b_item, drop_tag)


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
    o_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    m_x = (o_r < n_rows)[:, None] & (o_c < n_cols)[None, :]
    b_x = tl.load(p_x + o_r[:, None] * stride_x + o_c[None, :], mask=m_x, other=0.0)
    b_keep = chunk_keep(seed, threshold, o_r, o_c, n0, m0, cols, drop_tag)  # [BLOCK_R, BLOCK_C]
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
    grid = (triton.cdiv(n_rows, 16), triton.cdiv(n_cols, 128))
    apply_dropout_kernel[grid](x, out, n_rows, n_cols, x.stride(0), out.stride(0), spec.seed,
                               spec.threshold, spec.scale, pos.n0, pos.m0, pos.cols, tag_,
                               BLOCK_R=16, BLOCK_C=128)  # fmt: skip
    return out
