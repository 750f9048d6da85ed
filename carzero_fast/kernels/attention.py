"""Cross-attention of a block of queries over one memory item's keys, all in registers.

Memory-item-major: program (query block, head, item) reads that item's K and V for one head
(≤ 256 keys in CARZero, L2-resident across the item's query blocks), runs an online softmax
over key blocks (the scores never leave registers; in log2 units, so that each weight is one
FMA and an exp2; the accumulators rescaled only when a row's max jumps, see the loop) and
writes the head's slice of the output.
Queries are per pair (`q_item_stride` = queries per item) or shared by every item (layer 1:
its query does not depend on the item, `q_item_stride` = 0). An optional key mask (True =
ignore) comes per item.

Head dimensions that are not a power of two (CARZero: 192 = 3 × 64) are held as up to four
power-of-two column slices, each with its own query block and accumulator (no padding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from carzero_fast.backends.philox import ChunkPos, DropoutSpec

from .common import FP_FUSION, LN2, LOG2E, cdiv, check_matrices, mma, next_power_of_2, upcast_dots
from .configs import attention_config, dot_precision
from .dropout import keep_mask


@triton.jit
def _slice_rows(p_rows, col0, m_rows, HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr):
    """Columns col0 : col0 + BLOCK_C of a head (zero past HEAD_DIM) for rows `p_rows`."""
    o_c = col0 + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    return tl.load(p_rows + o_c[None, :], mask=m_rows[:, None] & (o_c[None, :] < HEAD_DIM),
                   other=0.0)  # fmt: skip


@triton.jit
def _slice_cols(p_rows, col0, m_rows, HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr):
    """The same slice transposed, `[BLOCK_C, rows]` (keys as the right operand of Q·Kᵀ)."""
    o_c = col0 + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    return tl.load(p_rows + o_c[:, None], mask=m_rows[None, :] & (o_c[:, None] < HEAD_DIM),
                   other=0.0)  # fmt: skip


@triton.jit
def _head(p_rows, m_rows, HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr,
          N_SLICES: tl.constexpr):  # fmt: skip
    """A head's columns of rows `p_rows` `[R, 1]` as up to four `[R, BLOCK_C]` slices (those
    past N_SLICES alias the first and are never used)."""
    b_0 = _slice_rows(p_rows, 0, m_rows, HEAD_DIM, BLOCK_C)
    b_1 = b_0
    b_2 = b_0
    b_3 = b_0
    if N_SLICES > 1:
        b_1 = _slice_rows(p_rows, BLOCK_C, m_rows, HEAD_DIM, BLOCK_C)
    if N_SLICES > 2:
        b_2 = _slice_rows(p_rows, 2 * BLOCK_C, m_rows, HEAD_DIM, BLOCK_C)
    if N_SLICES > 3:
        b_3 = _slice_rows(p_rows, 3 * BLOCK_C, m_rows, HEAD_DIM, BLOCK_C)
    return b_0, b_1, b_2, b_3


@triton.jit
def _store_slice(p_rows, col0, b_x, m_rows, ACCUMULATE: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_C: tl.constexpr):  # fmt: skip
    """Write (or add, ACCUMULATE) columns col0 … col0 + BLOCK_C − 1 of a head, `b_x`
    `[R, BLOCK_C]`, at rows `p_rows` `[R, 1]` in their dtype."""
    o_c = col0 + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    m_x = m_rows[:, None] & (o_c[None, :] < HEAD_DIM)
    if ACCUMULATE:  # this program owns the tile: a plain read-add-write, no atomics
        b_x += tl.load(p_rows + o_c[None, :], mask=m_x, other=0.0)
    tl.store(p_rows + o_c[None, :], b_x.to(p_rows.dtype.element_ty), mask=m_x)


@triton.jit
def _store_head(p_rows, b_0, b_1, b_2, b_3, m_rows, ACCUMULATE: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr, N_SLICES: tl.constexpr):  # fmt: skip
    """Write (or add, ACCUMULATE) a head's slices `[R, BLOCK_C]` at rows `p_rows` `[R, 1]`."""
    _store_slice(p_rows, 0, b_0, m_rows, ACCUMULATE, HEAD_DIM, BLOCK_C)
    if N_SLICES > 1:
        _store_slice(p_rows, BLOCK_C, b_1, m_rows, ACCUMULATE, HEAD_DIM, BLOCK_C)
    if N_SLICES > 2:
        _store_slice(p_rows, 2 * BLOCK_C, b_2, m_rows, ACCUMULATE, HEAD_DIM, BLOCK_C)
    if N_SLICES > 3:
        _store_slice(p_rows, 3 * BLOCK_C, b_3, m_rows, ACCUMULATE, HEAD_DIM, BLOCK_C)


@triton.jit
def _rescale(b_max, b_new, b_sum, b_o0, b_o1, b_o2, b_o3, N_SLICES: tl.constexpr):  # noqa: ANN001, ANN202
    """The running sum and a head's accumulator slices moved from max b_max to b_new
    (`[BLOCK_M]`, log2 units)."""
    b_alpha = tl.exp2(b_max - b_new)  # [BLOCK_M]
    b_o0 = b_o0 * b_alpha[:, None]
    if N_SLICES > 1:
        b_o1 = b_o1 * b_alpha[:, None]
    if N_SLICES > 2:
        b_o2 = b_o2 * b_alpha[:, None]
    if N_SLICES > 3:
        b_o3 = b_o3 * b_alpha[:, None]
    return b_sum * b_alpha, b_o0, b_o1, b_o2, b_o3


@triton.jit
def _keep(seed, threshold, o_m, p0, n0, m0, item, drop_tag, BLOCK_P: tl.constexpr):  # noqa: ANN001, ANN202
    """Dropout keep mask of the weights of queries o_m `[BLOCK_M]` over keys p0 … p0 +
    BLOCK_P − 1 → `[BLOCK_M, BLOCK_P]`."""
    return keep_mask(seed, threshold, p0, m0 + o_m, n0 + item + 0 * o_m, drop_tag, BLOCK_P)


@triton.jit
def attention_kernel(
    p_q,  # [*, D] queries, already projected
    p_k,  # [items·P, *] keys (a column slice of the per-item K/V buffer)
    p_v,  # [items·P, *] values
    p_mask,  # [items, P] int8, 1 = ignore the key; HAS_MASK
    p_out,  # [items·m, D]
    p_lse,  # [items·m, H] fp32 log-sum-exp of the scaled scores, STORE_LSE (for backward)
    n_queries,  # queries per item in this chunk (m)
    n_keys,  # P
    stride_q,
    q_item_stride,  # query row of (item i, query j) = i·q_item_stride + j
    stride_kv,
    stride_mask,
    stride_out,
    scale,
    seed,  # DROPOUT on the attention weights (kernels/dropout.py): pair (n0 + item, m0 + query)
    threshold,
    drop_scale,
    n0,
    m0,
    drop_tag,  # tag(site, layer); the head is added here
    HEAD_DIM: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,  # head-dim slice; the head is 1 to 4 slices (HEAD_DIM ≤ 4·BLOCK_C)
    STORE_LSE: tl.constexpr,
    DROPOUT: tl.constexpr,
    RESCALE_LOG2: tl.constexpr,  # growth of a row's max (log2 units) that forces a rescale
):
    pid_m, head, item = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    N_SLICES: tl.constexpr = (HEAD_DIM + BLOCK_C - 1) // BLOCK_C
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] queries of this item
    m_m = o_m < n_queries
    c0 = head * HEAD_DIM
    p_qrows = p_q + (item * q_item_stride + o_m)[:, None] * stride_q + c0  # [BLOCK_M, 1]

    # The head dim is held as up to four power-of-two slices (192 = 3 × 64), each slice its
    # own query block and accumulator: no padding to 256, and q stays in registers.
    b_q0, b_q1, b_q2, b_q3 = _head(p_qrows, m_m, HEAD_DIM, BLOCK_C, N_SLICES)  # [BLOCK_M, BLOCK_C]
    b_o0 = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)  # [BLOCK_M, BLOCK_C]
    b_o1 = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    b_o2 = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    b_o3 = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)

    # Scores in log2 units (scale·log2 e folded in: one FMA and an exp2 per weight). The
    # running max starts finite so that a fully masked key block gives exp2(−inf) = 0, not NaN.
    qk_scale = scale * LOG2E
    b_max = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)  # [BLOCK_M]
    b_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # [BLOCK_M]
    for p0 in range(0, n_keys, BLOCK_P):
        o_p = p0 + tl.arange(0, BLOCK_P)  # [BLOCK_P]
        m_p = o_p < n_keys
        p_krows = p_k + (item * n_keys + o_p)[None, :] * stride_kv + c0  # [1, BLOCK_P]
        p_vrows = p_v + (item * n_keys + o_p)[:, None] * stride_kv + c0  # [BLOCK_P, 1]
        b_s = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)  # [BLOCK_M, BLOCK_P]
        b_s = mma(b_q0, _slice_cols(p_krows, 0, m_p, HEAD_DIM, BLOCK_C), b_s, PRECISION, UPCAST)
        if N_SLICES > 1:
            b_kt = _slice_cols(p_krows, BLOCK_C, m_p, HEAD_DIM, BLOCK_C)  # [BLOCK_C, BLOCK_P]
            b_s = mma(b_q1, b_kt, b_s, PRECISION, UPCAST)
        if N_SLICES > 2:
            b_kt = _slice_cols(p_krows, 2 * BLOCK_C, m_p, HEAD_DIM, BLOCK_C)
            b_s = mma(b_q2, b_kt, b_s, PRECISION, UPCAST)
        if N_SLICES > 3:
            b_kt = _slice_cols(p_krows, 3 * BLOCK_C, m_p, HEAD_DIM, BLOCK_C)
            b_s = mma(b_q3, b_kt, b_s, PRECISION, UPCAST)
        m_key = m_p
        if HAS_MASK:
            b_ignore = tl.load(p_mask + item * stride_mask + o_p, mask=m_p, other=1)
            m_key = m_key & (b_ignore == 0)
        b_s = tl.where(m_key[None, :], b_s, float("-inf"))
        b_new = tl.maximum(b_max, tl.max(b_s, axis=1) * qk_scale)  # [BLOCK_M]
        # Rescale the accumulators only when some row's max grew by more than RESCALE_LOG2
        # (0: at every key block, the textbook online softmax, with no branch). Otherwise the
        # stale max stays the reference: the weights, then ≤ 2^RESCALE_LOG2 (8: far below
        # fp16's 65504), round to 16 bits with the same relative error, and out = Σ p·v / Σ p
        # is the same quotient. Once a row's scores settle, this skips the HEAD_DIM
        # multiplies per query and key block (6 a score at 32 keys and head dim 192) that
        # rescaling the accumulators costs.
        if RESCALE_LOG2 > 0:
            if tl.max(b_new - b_max, axis=0) > RESCALE_LOG2:
                b_sum, b_o0, b_o1, b_o2, b_o3 = _rescale(b_max, b_new, b_sum, b_o0, b_o1, b_o2,
                                                         b_o3, N_SLICES)  # fmt: skip
                b_max = b_new
        else:
            b_sum, b_o0, b_o1, b_o2, b_o3 = _rescale(b_max, b_new, b_sum, b_o0, b_o1, b_o2, b_o3,
                                                     N_SLICES)  # fmt: skip
            b_max = b_new
        b_p = tl.exp2(b_s * qk_scale - b_max[:, None])  # [BLOCK_M, BLOCK_P]
        b_sum += tl.sum(b_p, axis=1)  # the softmax's own sum: before dropout
        if DROPOUT:
            b_p = tl.where(_keep(seed, threshold, o_m, p0, n0, m0, item, drop_tag + head,
                                 BLOCK_P), b_p, 0.0)  # fmt: skip
        b_p = b_p.to(p_v.dtype.element_ty)  # rounded like flash attention's P
        b_v = _slice_rows(p_vrows, 0, m_p, HEAD_DIM, BLOCK_C)  # [BLOCK_P, BLOCK_C]
        b_o0 = mma(b_p, b_v, b_o0, PRECISION, UPCAST)
        if N_SLICES > 1:
            b_v = _slice_rows(p_vrows, BLOCK_C, m_p, HEAD_DIM, BLOCK_C)
            b_o1 = mma(b_p, b_v, b_o1, PRECISION, UPCAST)
        if N_SLICES > 2:
            b_v = _slice_rows(p_vrows, 2 * BLOCK_C, m_p, HEAD_DIM, BLOCK_C)
            b_o2 = mma(b_p, b_v, b_o2, PRECISION, UPCAST)
        if N_SLICES > 3:
            b_v = _slice_rows(p_vrows, 3 * BLOCK_C, m_p, HEAD_DIM, BLOCK_C)
            b_o3 = mma(b_p, b_v, b_o3, PRECISION, UPCAST)

    if STORE_LSE:
        n_heads = tl.num_programs(1)
        b_lse = (b_max + tl.log2(b_sum)) * LN2  # natural log of Σ exp
        tl.store(p_lse + (item * n_queries + o_m) * n_heads + head, b_lse, mask=m_m)
    b_inv = (drop_scale if DROPOUT else 1.0) / b_sum[:, None]  # [BLOCK_M, 1]
    p_orows = p_out + (item * n_queries + o_m)[:, None] * stride_out + c0  # [BLOCK_M, 1]
    _store_head(p_orows, b_o0 * b_inv, b_o1 * b_inv, b_o2 * b_inv, b_o3 * b_inv, m_m, False,
                HEAD_DIM, BLOCK_C, N_SLICES)  # fmt: skip


def _drop_args(dropout: tuple[DropoutSpec, ChunkPos, int] | None) -> tuple:
    """(seed, threshold, scale, n0, m0, tag) for the kernels (zeros when off)."""
    if dropout is None:
        return (0, 0, 1.0, 0, 0, 0)
    spec, pos, drop_tag = dropout
    return (spec.seed, spec.threshold, spec.scale, pos.n0, pos.m0, drop_tag)


def check_keys(fn: str, q: Tensor, k: Tensor, v: Tensor, n_heads: int, n_items: int,
               mask: Tensor | None) -> int:  # fmt: skip
    """What the attention kernels assume of their keys, values and mask beyond
    `check_matrices`: D split evenly into heads, k and v `(n_items·P, D)` sharing a row
    stride, mask int8 `(n_items, P)`. Returns P, the keys per item."""
    d = q.shape[1]
    if d % n_heads:
        raise ValueError(f"{fn}: D = {d} does not split into {n_heads} heads")
    if k.shape != v.shape or k.shape[1] != d or k.shape[0] % max(n_items, 1):
        raise ValueError(f"{fn}: k and v must be (n_items·P, {d}) with n_items = {n_items}, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")  # fmt: skip
    if k.stride(0) != v.stride(0):
        raise ValueError(f"{fn}: k and v must share a row stride")
    n_keys = k.shape[0] // max(n_items, 1)
    if mask is not None and (mask.dtype != torch.int8 or mask.shape != (n_items, n_keys)):
        raise ValueError(f"{fn}: mask must be int8 ({n_items}, {n_keys}) (1 = ignore), got "
                         f"{mask.dtype} {tuple(mask.shape)}")  # fmt: skip
    return n_keys


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    n_heads: int,
    n_items: int,
    n_queries: int,
    *,
    shared_queries: bool = False,
    mask: Tensor | None = None,
    out: Tensor | None = None,
    lse: Tensor | None = None,
    dropout: tuple[DropoutSpec, ChunkPos, int] | None = None,
) -> Tensor:
    """Multi-head attention of each item's queries over its own keys (no projections).

    q `(n_items·n_queries, D)` one row per pair, item-major (or `(n_queries, D)` shared by
    every item); k, v `(n_items·P, D)` (row-strided views are fine, e.g. column slices of one
    K/V buffer); mask `(n_items, P)` int8 (1 = ignore) → `(n_items·n_queries, D)`. With
    `lse` (fp32 `(n_items·n_queries, H)`) the softmax log-sum-exp of every row and head is
    stored there, what `attention_backward` needs. dropout = (spec, the chunk's position,
    tag(site, layer)) drops attention weights (after the softmax, before the values).
    """
    d = q.shape[1]
    check_matrices("attention", q=q, k=k, v=v, mask=mask, out=out, lse=lse)
    n_keys = check_keys("attention", q, k, v, n_heads, n_items, mask)
    rows = n_items * n_queries
    if q.shape[0] != (n_queries if shared_queries else rows):
        raise ValueError(f"attention: q must have {n_queries if shared_queries else rows} rows "
                         f"(shared_queries={shared_queries}), got {q.shape[0]}")  # fmt: skip
    if out is None:
        out = q.new_empty((rows, d))
    if out.shape != (rows, d):
        raise ValueError(f"attention: out must be ({rows}, {d}), got {tuple(out.shape)}")
    if lse is not None and (lse.shape != (rows, n_heads) or lse.dtype != torch.float32):
        raise ValueError(f"attention: lse must be fp32 ({rows}, {n_heads}), got {lse.dtype} "
                         f"{tuple(lse.shape)}")  # fmt: skip
    head_dim = d // n_heads
    cfg = attention_config(q.device, q.dtype, dropout is not None)
    # slices of ≤ 64 columns, at most four (power-of-two widths ≥ 16 for the tensor cores)
    block_c = max(16, min(64, next_power_of_2(head_dim)))
    block_c = max(block_c, next_power_of_2(cdiv(head_dim, 4)))
    block_p = min(cfg.block_p, max(16, next_power_of_2(n_keys)))
    grid = (cdiv(n_queries, cfg.block_m), n_heads, n_items)
    attention_kernel[grid](
        q, k, v, mask, out, lse, n_queries, n_keys, q.stride(0),
        0 if shared_queries else n_queries, k.stride(0),
        mask.stride(0) if mask is not None else 0, out.stride(0), 1.0 / math.sqrt(head_dim),
        *_drop_args(dropout), HEAD_DIM=head_dim, HAS_MASK=mask is not None,
        PRECISION=dot_precision(q.dtype), UPCAST=upcast_dots(q.dtype), BLOCK_M=cfg.block_m,
        BLOCK_P=block_p, BLOCK_C=block_c, STORE_LSE=lse is not None,
        DROPOUT=dropout is not None, RESCALE_LOG2=cfg.rescale_log2, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return out


def attention_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    n_heads: int,
    n_items: int,
    n_queries: int,
    *,
    shared_queries: bool = False,
    mask: Tensor | None = None,
) -> Tensor:
    """The PyTorch stage `attention` replaces (same arguments)."""
    d = q.shape[1]
    dh = d // n_heads
    if shared_queries:
        q = q.expand(n_items, n_queries, d).reshape(-1, d)
    qh = q.view(n_items, n_queries, n_heads, dh).transpose(1, 2)
    kh = k.reshape(n_items, -1, n_heads, dh).transpose(1, 2)
    vh = v.reshape(n_items, -1, n_heads, dh).transpose(1, 2)
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(mask.bool(), float("-inf"))[:, None, None, :]
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias)
    return o.transpose(1, 2).reshape(n_items * n_queries, d)
