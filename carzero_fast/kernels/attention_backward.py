"""Backward of `attention` (FlashAttention-2 style): P recomputed from the forward's LSE.

Two kernels per call. The dQ kernel (program per query block, head, item) runs first and
also stores delta = rowsum(dO ∘ O), the softmax Jacobian's diagonal term. The dK/dV kernel
(program per key block, head, item) loops over the item's query blocks, so an item's key
gradients stay in one program (memory-item-major, no atomics) and are added straight into
the caller's fp32 accumulators.

The head dimension is held as up to four power-of-two column slices of `block_c` columns
(192 = 3 × 64), as in the forward: no padding to 256, a quarter fewer FLOPs and registers
than one padded tile. The dK/dV kernel keeps its accumulators transposed, `[BLOCK_C, keys]`:
the matrix products' M dimension is then the 64-wide slice, which is what Hopper's wgmma
needs (a 32-key tile as M would fall back to mma.sync, and 64 keys × 6 accumulators of a
padded head would spill). `block_c` = 256 gives the padded single tile back (a config knob
for tuning on a GPU).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from carzero_fast.backends.philox import ChunkPos, DropoutSpec

from .attention import _drop_args, _head, _keep, _store_head, check_keys
from .common import FP_FUSION, LOG2E, cdiv, check_matrices, mma, next_power_of_2, upcast_dots
from .configs import attention_bwd_config, dot_precision


@triton.jit
def _dot_t(b_a0, b_a1, b_a2, b_a3, b_b0, b_b1, b_b2, b_b3, acc, N_SLICES: tl.constexpr,
           PRECISION: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """acc + Σ_c a_c · b_cᵀ over the slices: a `[R, BLOCK_C]`, b `[S, BLOCK_C]` → `[R, S]`."""
    acc = mma(b_a0, tl.trans(b_b0), acc, PRECISION, UPCAST)
    if N_SLICES > 1:
        acc = mma(b_a1, tl.trans(b_b1), acc, PRECISION, UPCAST)
    if N_SLICES > 2:
        acc = mma(b_a2, tl.trans(b_b2), acc, PRECISION, UPCAST)
    if N_SLICES > 3:
        acc = mma(b_a3, tl.trans(b_b3), acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _store_dq_slice(p_rows, p_cols, col0, b_x, m_rows, SUM: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """Store columns col0 … col0 + BLOCK_C − 1 of a head's dq rows `p_rows` `[R, 1]` in their
    dtype and, with SUM, the column sums of what was stored at `p_cols` (the head's first
    column of this program's row of partials). Slice by slice: fewer registers alive."""
    o_c = col0 + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    m_c = o_c < HEAD_DIM
    b_x = b_x.to(p_rows.dtype.element_ty)  # [R, BLOCK_C]
    tl.store(p_rows + o_c[None, :], b_x, mask=m_rows[:, None] & m_c[None, :])
    if SUM:  # rows past the queries are zero: their dO rows loaded as zeros
        tl.store(p_cols + o_c, tl.sum(b_x.to(tl.float32), axis=0), mask=m_c)


@triton.jit
def attention_dq_kernel(
    p_q,  # [*, D] queries, as the forward took them
    p_k,  # [items·P, *] keys
    p_v,  # [items·P, *] values
    p_mask,  # [items, P] int8, 1 = ignore the key; HAS_MASK
    p_out,  # [items·m, D] the forward's output
    p_do,  # [items·m, D] its gradient
    p_lse,  # [items·m, H] fp32, the forward's log-sum-exp
    p_delta,  # [items·m, H] fp32, written here: rowsum(dO ∘ O) for the dK/dV kernel
    p_dq,  # [items·m, D] per-pair query gradients
    p_dq_parts,  # [items·query blocks, D] fp32 column sums of each program's dq, SUM_DQ
    n_queries,  # queries per item (m)
    n_keys,  # P
    stride_q,
    q_item_stride,  # query row of (item i, query j) = i·q_item_stride + j
    stride_kv,
    stride_mask,
    stride_out,
    stride_do,
    stride_dq,
    scale,
    seed,  # DROPOUT, as the forward's
    threshold,
    drop_scale,
    n0,
    m0,
    drop_tag,
    HEAD_DIM: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DROPOUT: tl.constexpr,
    SUM_DQ: tl.constexpr,
):
    pid_m, head, item = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_heads = tl.num_programs(1)
    N_SLICES: tl.constexpr = (HEAD_DIM + BLOCK_C - 1) // BLOCK_C
    c0 = head * HEAD_DIM
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] queries of this item
    m_m = o_m < n_queries
    o_row = item * n_queries + o_m  # this pair's rows of out / dout / lse / delta / dq
    b_do0, b_do1, b_do2, b_do3 = _head(p_do + o_row[:, None] * stride_do + c0, m_m, HEAD_DIM,
                                       BLOCK_C, N_SLICES)  # [BLOCK_M, BLOCK_C] each  # fmt: skip
    # delta = rowsum(dO ∘ O): computed here, before q is loaded (O's slices are dead by then),
    # and stored for the dK/dV kernel that runs next
    b_o0, b_o1, b_o2, b_o3 = _head(p_out + o_row[:, None] * stride_out + c0, m_m, HEAD_DIM,
                                   BLOCK_C, N_SLICES)  # fmt: skip
    b_delta = tl.sum(b_do0.to(tl.float32) * b_o0.to(tl.float32), axis=1)  # [BLOCK_M]
    if N_SLICES > 1:
        b_delta += tl.sum(b_do1.to(tl.float32) * b_o1.to(tl.float32), axis=1)
    if N_SLICES > 2:
        b_delta += tl.sum(b_do2.to(tl.float32) * b_o2.to(tl.float32), axis=1)
    if N_SLICES > 3:
        b_delta += tl.sum(b_do3.to(tl.float32) * b_o3.to(tl.float32), axis=1)
    tl.store(p_delta + o_row * n_heads + head, b_delta, mask=m_m)
    p_qrows = p_q + (item * q_item_stride + o_m)[:, None] * stride_q + c0
    b_q0, b_q1, b_q2, b_q3 = _head(p_qrows, m_m, HEAD_DIM, BLOCK_C, N_SLICES)
    # exp(s·scale − lse) as exp2(s·scale·log2 e − lse·log2 e): one FMA and an exp2 a weight
    qk_scale = scale * LOG2E
    b_lse = tl.load(p_lse + o_row * n_heads + head, mask=m_m, other=0.0) * LOG2E
    b_dq0 = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)  # [BLOCK_M, BLOCK_C]
    b_dq1 = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    b_dq2 = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    b_dq3 = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for p0 in range(0, n_keys, BLOCK_P):
        o_p = p0 + tl.arange(0, BLOCK_P)  # [BLOCK_P]
        m_p = o_p < n_keys
        if HAS_MASK:
            m_p = m_p & (tl.load(p_mask + item * stride_mask + o_p, mask=m_p, other=1) == 0)
        o_kvrows = (item * n_keys + o_p)[:, None] * stride_kv + c0  # [BLOCK_P, 1] offsets
        b_k0, b_k1, b_k2, b_k3 = _head(p_k + o_kvrows, m_p, HEAD_DIM, BLOCK_C, N_SLICES)
        b_v0, b_v1, b_v2, b_v3 = _head(p_v + o_kvrows, m_p, HEAD_DIM, BLOCK_C, N_SLICES)
        b_s = _dot_t(b_q0, b_q1, b_q2, b_q3, b_k0, b_k1, b_k2, b_k3,
                     tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32), N_SLICES, PRECISION,
                     UPCAST)  # [BLOCK_M, BLOCK_P] scores  # fmt: skip
        b_p = tl.where(m_m[:, None] & m_p[None, :], tl.exp2(b_s * qk_scale - b_lse[:, None]), 0.0)
        b_dp = _dot_t(b_do0, b_do1, b_do2, b_do3, b_v0, b_v1, b_v2, b_v3,
                      tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32), N_SLICES, PRECISION,
                      UPCAST)  # [BLOCK_M, BLOCK_P] weight gradients  # fmt: skip
        if DROPOUT:  # O = (P∘Z)·V·s: the weights' gradient goes through the mask
            b_keep = _keep(seed, threshold, o_m, p0, n0, m0, item, drop_tag + head, BLOCK_P)
            b_dp = tl.where(b_keep, b_dp * drop_scale, 0.0)
        b_ds = (b_p * (b_dp - b_delta[:, None])).to(b_k0.dtype)  # score gradients
        b_dq0 = mma(b_ds, b_k0, b_dq0, PRECISION, UPCAST)
        if N_SLICES > 1:
            b_dq1 = mma(b_ds, b_k1, b_dq1, PRECISION, UPCAST)
        if N_SLICES > 2:
            b_dq2 = mma(b_ds, b_k2, b_dq2, PRECISION, UPCAST)
        if N_SLICES > 3:
            b_dq3 = mma(b_ds, b_k3, b_dq3, PRECISION, UPCAST)
    # with SUM_DQ, also the query projection's bias gradient: Σ over rows of dq as stored,
    # one row of partials per program, summed by the caller in a fixed order
    p_dqrows = p_dq + o_row[:, None] * stride_dq + c0  # [BLOCK_M, 1]
    p_parts = p_dq_parts + (item * tl.num_programs(0) + pid_m) * n_heads * HEAD_DIM + c0
    _store_dq_slice(p_dqrows, p_parts, 0, b_dq0 * scale, m_m, SUM_DQ, HEAD_DIM, BLOCK_C)
    if N_SLICES > 1:
        _store_dq_slice(p_dqrows, p_parts, BLOCK_C, b_dq1 * scale, m_m, SUM_DQ, HEAD_DIM,
                        BLOCK_C)  # fmt: skip
    if N_SLICES > 2:
        _store_dq_slice(p_dqrows, p_parts, 2 * BLOCK_C, b_dq2 * scale, m_m, SUM_DQ, HEAD_DIM,
                        BLOCK_C)  # fmt: skip
    if N_SLICES > 3:
        _store_dq_slice(p_dqrows, p_parts, 3 * BLOCK_C, b_dq3 * scale, m_m, SUM_DQ, HEAD_DIM,
                        BLOCK_C)  # fmt: skip


@triton.jit
def attention_dkdv_kernel(
    p_q,  # [*, D] queries
    p_k,  # [items·P, *] keys
    p_v,  # [items·P, *] values
    p_mask,  # [items, P] int8, 1 = ignore the key; HAS_MASK
    p_do,  # [items·m, D] the output's gradient
    p_lse,  # [items·m, H] fp32
    p_delta,  # [items·m, H] fp32, from the dQ kernel
    p_dk,  # [items·P, D] fp32 key gradients (added into with ACCUMULATE)
    p_dv,  # [items·P, D] fp32 value gradients, same strides as p_dk
    n_queries,  # m
    n_keys,  # P
    stride_q,
    q_item_stride,
    stride_kv,
    stride_mask,
    stride_do,
    stride_dkv,
    scale,
    seed,
    threshold,
    drop_scale,
    n0,
    m0,
    drop_tag,
    HEAD_DIM: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    pid_p, head, item = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_heads = tl.num_programs(1)
    N_SLICES: tl.constexpr = (HEAD_DIM + BLOCK_C - 1) // BLOCK_C
    qk_scale = scale * LOG2E  # exp(x) = exp2(x·log2 e), as in the dQ kernel
    c0 = head * HEAD_DIM
    o_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P] keys of this item
    m_p = o_p < n_keys
    if HAS_MASK:
        m_p = m_p & (tl.load(p_mask + item * stride_mask + o_p, mask=m_p, other=1) == 0)
    o_kv = item * n_keys + o_p
    o_kvrows = o_kv[:, None] * stride_kv + c0  # [BLOCK_P, 1] offsets
    b_k0, b_k1, b_k2, b_k3 = _head(p_k + o_kvrows, m_p, HEAD_DIM, BLOCK_C, N_SLICES)
    b_v0, b_v1, b_v2, b_v3 = _head(p_v + o_kvrows, m_p, HEAD_DIM, BLOCK_C, N_SLICES)
    # transposed accumulators [BLOCK_C, BLOCK_P]: the slice is the products' M dimension
    b_dkt0 = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    b_dkt1 = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    b_dkt2 = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    b_dkt3 = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    b_dvt0 = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    b_dvt1 = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    b_dvt2 = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    b_dvt3 = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for q0 in range(0, n_queries, BLOCK_M):
        o_m = q0 + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        m_m = o_m < n_queries
        o_row = item * n_queries + o_m  # this pair's rows of dout / lse / delta
        p_qrows = p_q + (item * q_item_stride + o_m)[:, None] * stride_q + c0
        b_q0, b_q1, b_q2, b_q3 = _head(p_qrows, m_m, HEAD_DIM, BLOCK_C, N_SLICES)
        b_do0, b_do1, b_do2, b_do3 = _head(p_do + o_row[:, None] * stride_do + c0, m_m,
                                           HEAD_DIM, BLOCK_C, N_SLICES)  # fmt: skip
        b_lse = tl.load(p_lse + o_row * n_heads + head, mask=m_m, other=0.0)  # [BLOCK_M]
        b_lse = b_lse * LOG2E  # log2 units, as exp2 below takes them
        b_delta = tl.load(p_delta + o_row * n_heads + head, mask=m_m, other=0.0)
        b_s = _dot_t(b_q0, b_q1, b_q2, b_q3, b_k0, b_k1, b_k2, b_k3,
                     tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32), N_SLICES, PRECISION,
                     UPCAST)  # [BLOCK_M, BLOCK_P] scores  # fmt: skip
        b_p = tl.where(m_m[:, None] & m_p[None, :], tl.exp2(b_s * qk_scale - b_lse[:, None]), 0.0)
        b_dp = _dot_t(b_do0, b_do1, b_do2, b_do3, b_v0, b_v1, b_v2, b_v3,
                      tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32), N_SLICES, PRECISION,
                      UPCAST)  # fmt: skip
        if DROPOUT:  # O = (P∘Z)·V·s: dV sees the dropped weights, dP the mask
            b_keep = _keep(seed, threshold, o_m, pid_p * BLOCK_P, n0, m0, item, drop_tag + head,
                           BLOCK_P)  # fmt: skip
            b_pv = tl.where(b_keep, b_p * drop_scale, 0.0).to(b_do0.dtype)
            b_dp = tl.where(b_keep, b_dp * drop_scale, 0.0)
        else:
            b_pv = b_p.to(b_do0.dtype)  # [BLOCK_M, BLOCK_P] the weights V met
        b_ds = (b_p * (b_dp - b_delta[:, None])).to(b_q0.dtype)  # score gradients
        # dVᵀ_c += dO_cᵀ·P and dKᵀ_c += Q_cᵀ·dS, per slice
        b_dvt0 = mma(tl.trans(b_do0), b_pv, b_dvt0, PRECISION, UPCAST)
        b_dkt0 = mma(tl.trans(b_q0), b_ds, b_dkt0, PRECISION, UPCAST)
        if N_SLICES > 1:
            b_dvt1 = mma(tl.trans(b_do1), b_pv, b_dvt1, PRECISION, UPCAST)
            b_dkt1 = mma(tl.trans(b_q1), b_ds, b_dkt1, PRECISION, UPCAST)
        if N_SLICES > 2:
            b_dvt2 = mma(tl.trans(b_do2), b_pv, b_dvt2, PRECISION, UPCAST)
            b_dkt2 = mma(tl.trans(b_q2), b_ds, b_dkt2, PRECISION, UPCAST)
        if N_SLICES > 3:
            b_dvt3 = mma(tl.trans(b_do3), b_pv, b_dvt3, PRECISION, UPCAST)
            b_dkt3 = mma(tl.trans(b_q3), b_ds, b_dkt3, PRECISION, UPCAST)
    o_dkv = o_kv[:, None] * stride_dkv + c0  # [BLOCK_P, 1] offsets
    m_out = o_p < n_keys
    _store_head(p_dk + o_dkv, tl.trans(b_dkt0) * scale, tl.trans(b_dkt1) * scale,
                tl.trans(b_dkt2) * scale, tl.trans(b_dkt3) * scale, m_out, ACCUMULATE,
                HEAD_DIM, BLOCK_C, N_SLICES)  # fmt: skip
    _store_head(p_dv + o_dkv, tl.trans(b_dvt0), tl.trans(b_dvt1), tl.trans(b_dvt2),
                tl.trans(b_dvt3), m_out, ACCUMULATE, HEAD_DIM, BLOCK_C, N_SLICES)  # fmt: skip


def slice_width(head_dim: int, block_c: int) -> int:
    """Columns per head slice: at most `block_c`, at most four slices, a power of two ≥ 16."""
    width = max(16, min(block_c, next_power_of_2(head_dim)))
    return max(width, next_power_of_2(cdiv(head_dim, 4)))


def attention_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    dout: Tensor,
    lse: Tensor,
    n_heads: int,
    n_items: int,
    n_queries: int,
    *,
    shared_queries: bool = False,
    mask: Tensor | None = None,
    dk: Tensor | None = None,
    dv: Tensor | None = None,
    dropout: tuple[DropoutSpec, ChunkPos, int] | None = None,
    dq_dtype: torch.dtype = torch.float32,
    dq_sum: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `attention` (same arguments, plus its output `out`, the output's gradient
    `dout` and the `lse` it stored) → (dq per pair `(n_items·n_queries, D)`, dk, dv
    `(n_items·P, D)`), fp32 (dq in `dq_dtype`: the GEMM dtype when the next use is the
    query projection's backward, which saves a cast). With shared queries, the shared rows'
    gradient is the per-pair dq summed over items (left to the caller, who owns that
    reduction's order).

    dk, dv: fp32 `(n_items·P, D)` buffers (row-strided views are fine, one row stride for
    both) that the key/value gradients are added into, e.g. an item block's accumulators
    over its query chunks; new ones are returned when not given. dropout: as the forward's.
    dq_sum: an fp32 `(D,)` tensor that receives Σ over rows of dq as returned (the query
    projection's bias gradient), from partial sums the dQ kernel writes: no pass over dq.
    """
    d = q.shape[1]
    check_matrices("attention_backward", q=q, k=k, v=v, mask=mask, out=out, dout=dout,
                   lse=lse, dk=dk, dv=dv)  # fmt: skip
    n_keys = check_keys("attention_backward", q, k, v, n_heads, n_items, mask)
    head_dim = d // n_heads
    rows = n_items * n_queries
    if out.shape != (rows, d) or dout.shape != (rows, d):
        raise ValueError(f"attention_backward: out and dout must be ({rows}, {d}), got "
                         f"{tuple(out.shape)} and {tuple(dout.shape)}")  # fmt: skip
    if lse.shape != (rows, n_heads) or lse.dtype != torch.float32:
        raise ValueError(f"attention_backward: lse must be fp32 ({rows}, {n_heads}), got "
                         f"{lse.dtype} {tuple(lse.shape)}")  # fmt: skip
    delta = torch.empty((rows, n_heads), dtype=torch.float32, device=q.device)  # by the dQ kernel
    # every valid row and head column is stored by exactly one program: no zero-fill needed
    dq = torch.empty((rows, d), dtype=dq_dtype, device=q.device)
    accumulate = dk is not None
    if dk is None or dv is None:
        if dk is not None or dv is not None:
            raise ValueError("attention_backward: give both dk and dv, or neither")
        dk = torch.empty((n_items * n_keys, d), dtype=torch.float32, device=q.device)
        dv = torch.empty_like(dk)
    if (dk.dtype != torch.float32 or dv.dtype != torch.float32 or dk.stride() != dv.stride()
            or dk.shape != k.shape or dv.shape != k.shape):  # fmt: skip
        raise ValueError(f"attention_backward: dk and dv must be fp32 {tuple(k.shape)} with "
                         "the same strides")  # fmt: skip
    cfg = attention_bwd_config(q.device, q.dtype, dropout is not None)
    keys_pow2 = max(16, next_power_of_2(n_keys))  # no key tile wider than the keys
    common = dict(HEAD_DIM=head_dim, HAS_MASK=mask is not None, PRECISION=dot_precision(q.dtype),
                  UPCAST=upcast_dots(q.dtype), BLOCK_C=slice_width(head_dim, cfg.block_c),
                  DROPOUT=dropout is not None, num_warps=cfg.num_warps,
                  enable_fp_fusion=FP_FUSION)  # fmt: skip
    scale, drop_args = 1.0 / math.sqrt(head_dim), _drop_args(dropout)
    q_item_stride = 0 if shared_queries else n_queries
    mask_stride = mask.stride(0) if mask is not None else 0
    q_blocks = cdiv(n_queries, cfg.dq_block_m)
    parts = None
    if dq_sum is not None:
        if dq_sum.shape != (d,) or dq_sum.dtype != torch.float32:
            raise ValueError(f"attention_backward: dq_sum must be fp32 of shape ({d},), got "
                             f"{dq_sum.dtype} {tuple(dq_sum.shape)}")  # fmt: skip
        parts = torch.empty((n_items * q_blocks, d), dtype=torch.float32, device=q.device)
    # without sums, delta stands in for the partials' pointer (fp32, never written through it)
    attention_dq_kernel[(q_blocks, n_heads, n_items)](
        q, k, v, mask, out, dout, lse, delta, dq, delta if parts is None else parts, n_queries,
        n_keys, q.stride(0), q_item_stride, k.stride(0), mask_stride, out.stride(0),
        dout.stride(0), dq.stride(0), scale, *drop_args, **common, BLOCK_M=cfg.dq_block_m,
        BLOCK_P=min(cfg.dq_block_p, keys_pow2), SUM_DQ=parts is not None,
        num_stages=cfg.dq_stages,
    )  # fmt: skip
    if parts is not None:  # fixed order: deterministic
        torch.sum(parts, dim=0, out=dq_sum)
    block_p = min(cfg.dkdv_block_p, keys_pow2)
    attention_dkdv_kernel[(cdiv(n_keys, block_p), n_heads, n_items)](
        q, k, v, mask, dout, lse, delta, dk, dv, n_queries, n_keys, q.stride(0), q_item_stride,
        k.stride(0), mask_stride, dout.stride(0), dk.stride(0), scale, *drop_args, **common,
        BLOCK_M=cfg.dkdv_block_m, BLOCK_P=block_p, ACCUMULATE=accumulate,
        num_stages=cfg.dkdv_stages,
    )  # fmt: skip
    return dq, dk, dv


def attention_backward_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    n_heads: int,
    n_items: int,
    n_queries: int,
    *,
    shared_queries: bool = False,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """What the two kernels compute, written out in PyTorch (fp32, no dropout): the weights
    P recomputed, dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P ∘ (dP − rowsum(dO ∘ O)), dQ = dS·K·scale,
    dK = dSᵀ·Q·scale, per item and head. Arguments as `attention_backward`'s → (dq per pair
    `(n_items·n_queries, D)`, dk, dv `(n_items·P, D)`)."""
    d = q.shape[1]
    dh = d // n_heads
    scale = 1.0 / math.sqrt(dh)
    if shared_queries:
        q = q.expand(n_items, n_queries, d).reshape(-1, d)

    def heads(t: Tensor) -> Tensor:  # (items·rows, D) → [items, H, rows, dh]
        return t.float().reshape(n_items, -1, n_heads, dh).transpose(1, 2)

    qh, kh, vh, doh = heads(q), heads(k), heads(v), heads(dout)
    s = qh @ kh.transpose(-1, -2) * scale  # [items, H, m, P]
    if mask is not None:
        s = s.masked_fill(mask.bool()[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    delta = (doh * (p @ vh)).sum(-1, keepdim=True)  # rowsum(dO ∘ O) = rowsum(P ∘ dP)
    ds = p * (doh @ vh.transpose(-1, -2) - delta)  # [items, H, m, P]

    def rows(t: Tensor) -> Tensor:  # [items, H, rows, dh] → (items·rows, D)
        return t.transpose(1, 2).reshape(-1, d)

    return (rows(ds @ kh * scale), rows(ds.transpose(-1, -2) @ qh * scale),
            rows(p.transpose(-1, -2) @ doh))  # fmt: skip
