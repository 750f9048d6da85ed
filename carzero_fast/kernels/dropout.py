"""Counter-based dropout in the kernels: `keep_mask` / `chunk_keep` draw the masks that
`carzero_fast.backends.philox` defines (and computes in PyTorch: `keep_torch`, and
`chunk_dropout_torch` for a chunk's rows) inside the kernel that applies them, forward and
backward alike.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
