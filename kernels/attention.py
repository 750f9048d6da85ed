"""Cross-attention of a block of queries over one memory item's keys, all in registers.

Memory-item-major: program (query block, head, item) reads that item's K and V for one head
(≤ 256 keys in CARZero, L2-resident across the item's query blocks), runs an online softmax
over key blocks (the scores never leave registers) and writes the head's slice of the output.
Queries are per pair (`q_item_stride` = queries per item) or shared by every item (layer 1:
its query does not depend on the item, `q_item_stride` = 0). An optional key mask (True =
ignore) comes per item.

Head dimensions that are not a power of two (CARZero: 192) are padded to the next one in
registers (masked loads); the padding costs FLOPs only in this stage (~9% of a pair's work).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .common import mma, upcast_dots
from .configs import attention_config, dot_precision


@triton.jit
def attention_kernel(
    p_q,  # [*, D] queries, already projected
    p_k,  # [items·P, *] keys (a column slice of the per-item K/V buffer)
    p_v,  # [items·P, *] values
    p_mask,  # [items, P] int8, 1 = ignore the key; HAS_MASK
    p_out,  # [items·m, D]
    n_queries,  # queries per item in this chunk (m)
    n_keys,  # P
    stride_q,
    q_item_stride,  # query row of (item i, query j) = i·q_item_stride + j
    stride_kv,
    stride_mask,
    stride_out,
    scale,
    HEAD_DIM: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    SPLIT_P: tl.constexpr,
):
    pid, head, item = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # a program writes BLOCK_DO of the head's (padded) BLOCK_DH output columns: fp32 without
    # tensor cores cannot hold a whole [BLOCK_M, BLOCK_DH] accumulator without spilling
    pid_m, pid_d = pid // (BLOCK_DH // BLOCK_DO), pid % (BLOCK_DH // BLOCK_DO)
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] queries of this item
    o_d = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)  # [BLOCK_DO]
    m_m = o_m < n_queries
    m_d = o_d < HEAD_DIM
    o_col = head * HEAD_DIM + o_d  # this head's columns

    p_qrow = p_q + (item * q_item_stride + o_m)[:, None] * stride_q  # [BLOCK_M, 1]

    # running max starts finite so that a fully masked key block gives exp(−inf) = 0, not NaN
    b_max = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)  # [BLOCK_M]
    b_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # [BLOCK_M]
    b_acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)  # [BLOCK_M, BLOCK_DO]
    for p0 in range(0, n_keys, BLOCK_P):
        o_p = p0 + tl.arange(0, BLOCK_P)  # [BLOCK_P]
        m_p = o_p < n_keys
        o_kv = item * n_keys + o_p  # [BLOCK_P] rows of K/V
        # scores over head-dim slices: the query block is re-read (from L1/L2) rather than
        # held whole in registers beside the accumulator
        b_s = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)  # [BLOCK_M, BLOCK_P]
        for c0 in tl.static_range(0, BLOCK_DH, BLOCK_C):
            o_c = c0 + tl.arange(0, BLOCK_C)  # [BLOCK_C]
            m_c = o_c < HEAD_DIM
            b_q = tl.load(
                p_qrow + head * HEAD_DIM + o_c[None, :], mask=m_m[:, None] & m_c[None, :], other=0.0
            )  # [BLOCK_M, BLOCK_C]
            b_kt = tl.load(
                p_k + o_kv[None, :] * stride_kv + head * HEAD_DIM + o_c[:, None],
                mask=m_p[None, :] & m_c[:, None],
                other=0.0,
            )  # [BLOCK_C, BLOCK_P]
            b_s = mma(b_q, b_kt, b_s, PRECISION, UPCAST)
        b_s = b_s * scale  # [BLOCK_M, BLOCK_P]
        m_key = m_p
        if HAS_MASK:
            b_ignore = tl.load(p_mask + item * stride_mask + o_p, mask=m_p, other=1)
            m_key = m_key & (b_ignore == 0)
        b_s = tl.where(m_key[None, :], b_s, float("-inf"))
        b_new = tl.maximum(b_max, tl.max(b_s, axis=1))  # [BLOCK_M]
        b_alpha = tl.exp(b_max - b_new)
        b_p = tl.exp(b_s - b_new[:, None])  # [BLOCK_M, BLOCK_P]
        b_sum = b_sum * b_alpha + tl.sum(b_p, axis=1)
        b_v = tl.load(
            p_v + o_kv[:, None] * stride_kv + o_col[None, :],
            mask=m_p[:, None] & m_d[None, :],
            other=0.0,
        )  # [BLOCK_P, BLOCK_DO]
        b_acc = b_acc * b_alpha[:, None]
        # 16-bit weights in two parts (hi + lo): rounding softmax weights to bf16 alone would
        # add ~2⁻⁹ relative error per layer, more than the rest of the stage; the second
        # product costs ~2% of a pair's FLOPs
        b_p_hi = b_p.to(b_v.dtype)
        b_acc = mma(b_p_hi, b_v, b_acc, PRECISION, UPCAST)
        if SPLIT_P:
            b_p_lo = (b_p - b_p_hi.to(tl.float32)).to(b_v.dtype)
            b_acc = mma(b_p_lo, b_v, b_acc, PRECISION, UPCAST)
        b_max = b_new
    b_out = b_acc / b_sum[:, None]
    o_out = (item * n_queries + o_m)[:, None] * stride_out + o_col[None, :]
    tl.store(p_out + o_out, b_out.to(p_out.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])


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
) -> Tensor:
    """Multi-head attention of each item's queries over its own keys (no projections).

    q `(n_items·n_queries, D)` one row per pair, item-major (or `(n_queries, D)` shared by
    every item); k, v `(n_items·P, D)` (row-strided views are fine, e.g. column slices of one
    K/V buffer); mask `(n_items, P)` int8 (1 = ignore) → `(n_items·n_queries, D)`.
    """
    d = q.shape[1]
    n_keys = k.shape[0] // max(n_items, 1)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(1) != 1:
            raise ValueError(f"attention: {name} needs unit stride along its last dimension")
    if k.stride(0) != v.stride(0):
        raise ValueError("attention: k and v must share a row stride")
    if out is None:
        out = q.new_empty((n_items * n_queries, d))
    head_dim = d // n_heads
    cfg = attention_config(q.device, q.dtype)
    block_dh = max(16, triton.next_power_of_2(head_dim))
    block_p = min(cfg.block_p, max(16, triton.next_power_of_2(n_keys)))
    block_out = block_dh if cfg.block_out == 0 else min(cfg.block_out, block_dh)
    grid = (triton.cdiv(n_queries, cfg.block_m) * (block_dh // block_out), n_heads, n_items)
    attention_kernel[grid](
        q, k, v, mask, out, n_queries, n_keys, q.stride(0),
        0 if shared_queries else n_queries, k.stride(0),
        mask.stride(0) if mask is not None else 0, out.stride(0), 1.0 / math.sqrt(head_dim),
        HEAD_DIM=head_dim, HAS_MASK=mask is not None, PRECISION=dot_precision(q.dtype),
        UPCAST=upcast_dots(q.dtype), BLOCK_M=cfg.block_m, BLOCK_P=block_p, BLOCK_DH=block_dh,
        BLOCK_C=min(64, block_dh), BLOCK_DO=block_out,
        SPLIT_P=q.dtype in (torch.bfloat16, torch.float16),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
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
