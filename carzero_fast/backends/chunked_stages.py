"""The stages of the `chunked` backend in plain PyTorch: what one chunk of pairs computes.

Work is split by what it depends on (DESIGN.md §3):

- per query (shared by all N items): `x0 = LN0(q)` and layer 1's query projection, once
  (`prepare`);
- per memory item: `LN0(memory)` (and, in the "kv" form, every layer's K and V), once per
  item block (`item_stage`);
- per pair: everything else, for one chunk `(items n0:n1) × (queries m0:m1)` at a time
  (`pair_chunk_forward`).

Two exact forms of the attention, chosen per call by the cost model (`use_folded_form`):

- "kv": K, V = LN0(mem)·Wkᵀ, LN0(mem)·Wvᵀ per item and layer (4·P·D² FLOPs per item and
  layer), then per pair q·Kᵀ and softmax·V per head (4·P·D FLOPs);
- "folded": never projects the memory. Per head, q·K_hᵀ = (Wk_hᵀ q_h)·LN0(mem)ᵀ + q_h·bk_h,
  and the last term is constant over keys, so softmax drops it; softmax·V_h =
  Wv_h·(softmax·LN0(mem)) + bv_h. Per pair that is 4·D² + 4·H·P·D FLOPs instead of 4·P·D,
  and nothing per item. It wins while an item meets fewer than P·D / (D + (H−1)·P) queries
  (111 for images, 71 for texts at CARZero dims: training batches); "kv" wins above.

The executor (`chunked.py`) runs them chunk by chunk; each fused Triton kernel replaces one of
these stages and is tested against it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import AlignerConfig
from ..weights import AlignerWeights
from .cpu_gemm import linear, matmul
from .dropout import Dropout
from .external_attention import external_attention
from .folded_attention import attention_folded

# ---------------------------------------------------------------------------------------------
# Per-call preparation: everything shared by all chunks, computed once
# ---------------------------------------------------------------------------------------------


class LayerPlan(NamedTuple):
    """One layer's weights as the chunk stages consume them.

    Each is its own tensor (a slice or per-head piece of a parameter made once per call), so
    that a chunk's backward never slices a parameter: slicing in every chunk would zero-fill
    a parameter-sized gradient per chunk.
    """

    norm2_w: Tensor  # [D]
    norm2_b: Tensor  # [D]
    q_w: Tensor  # [D, D]
    q_b: Tensor  # [D]
    kv_w: Tensor | None  # [2D, D], "kv" form
    kv_b: Tensor | None  # [2D]
    k_heads: tuple[Tensor, ...]  # H × [dh, D], "folded" form (1/sqrt(dh) is in the query)
    v_heads: tuple[Tensor, ...]  # H × [dh, D]
    v_bias_heads: tuple[Tensor, ...]  # H × [dh]
    out_w: Tensor  # [D, D]
    out_b: Tensor  # [D]
    norm3_w: Tensor  # [D]
    norm3_b: Tensor  # [D]
    linear1_w: Tensor  # [F, D]
    linear1_b: Tensor  # [F]
    linear2_w: Tensor  # [D, F]
    linear2_b: Tensor  # [D]


class Prepared(NamedTuple):
    """Per-call state shared by every chunk."""

    x0: Tensor  # [M, D] LN0(queries): each pair's initial residual stream
    q1: Tensor  # [M, D] layer 1's projected query (it does not depend on the item)
    q1_folded: tuple[Tensor, ...]  # H × [M, D]: q1 in token space per head ("folded" form)
    norm0_w: Tensor  # [D]
    norm0_b: Tensor  # [D]
    layers: tuple[LayerPlan, ...]
    head: tuple[tuple[Tensor, Tensor], ...]


def prepare(w: AlignerWeights, cfg: AlignerConfig, queries: Tensor, folded: bool) -> Prepared:
    """Query stage and weight layout: queries `(M, D)` → `Prepared`."""
    d, dh, eps = cfg.d_model, cfg.head_dim, cfg.layer_norm_eps
    scale = 1.0 / math.sqrt(dh)
    layers = []
    for lw in w.layers:
        # views: in backward their gradients accumulate into the weights' own buffers
        q_w, k_w, v_w = lw.in_proj_w.split(d)
        q_b, _, v_b = lw.in_proj_b.split(d)
        if folded:
            kv_w = kv_b = None
            k_heads, v_heads, v_bias_heads = k_w.split(dh), v_w.split(dh), v_b.split(dh)
        else:
            kv_w, kv_b = lw.in_proj_w[d:], lw.in_proj_b[d:]
            k_heads = v_heads = v_bias_heads = ()
        layers.append(LayerPlan(
            lw.norm2_w, lw.norm2_b, q_w, q_b, kv_w, kv_b, k_heads, v_heads, v_bias_heads,
            lw.out_proj_w, lw.out_proj_b, lw.norm3_w, lw.norm3_b,
            lw.linear1_w, lw.linear1_b, lw.linear2_w, lw.linear2_b,
        ))  # fmt: skip
    x0 = F.layer_norm(queries, (d,), w.norm0_w, w.norm0_b, eps)
    lp = layers[0]
    q1 = linear(F.layer_norm(x0, (d,), lp.norm2_w, lp.norm2_b, eps), lp.q_w, lp.q_b)
    q1_folded = tuple(fold_query(q1 * scale, lp)) if folded else ()
    return Prepared(x0, q1, q1_folded, w.norm0_w, w.norm0_b, tuple(layers), w.head)


def fold_query(q: Tensor, lp: LayerPlan) -> Iterator[Tensor]:
    """Projected queries already scaled by 1/sqrt(dh), `(rows, D)` → per head `q_h·Wk_h`,
    `(rows, D)`: the query in token space, so that its scores are a product with LN0(memory)
    itself. Lazy: a chunk holds one head's at a time."""
    # split, not per-head slicing: its backward is one concatenation, where slicing would
    # zero-fill a query-sized gradient per head
    dh = lp.k_heads[0].shape[0]
    return (linear(q_h, wk, w_in_out=True)
            for q_h, wk in zip(q.split(dh, dim=-1), lp.k_heads, strict=True))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Stages (plain PyTorch; each fused kernel replaces one of these and is tested against it)
# ---------------------------------------------------------------------------------------------


def item_stage(prep: Prepared, cfg: AlignerConfig, memory: Tensor, folded: bool) -> list[Tensor]:
    """memory `(n, P, D)` → what the pairs of these items attend over.

    folded: `[LN0(memory)]`; otherwise per layer K and V, `[K_1, V_1, K_2, ...]`, `(n, P, D)`.
    """
    d = cfg.d_model
    normed = F.layer_norm(memory, (d,), prep.norm0_w, prep.norm0_b, cfg.layer_norm_eps)
    if folded:
        return [normed]
    kvs = []
    for lp in prep.layers:
        kv = linear(normed, lp.kv_w, lp.kv_b)  # [n, P, 2D]
        kvs += [kv[..., :d], kv[..., d:]]
    return kvs


def attention_kv(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, n_heads: int, drop: Dropout
) -> Tensor:
    """Multi-head attention over projected keys/values (no output projection).

    q `(n, m, D)`, k/v `(n, P, D)`, bias `(n, 1, P)` additive (-inf = masked) → `(n, m, D)`.
    """
    n, m, d = q.shape
    dh = d // n_heads
    qh = q.view(n, m, n_heads, dh).transpose(1, 2)  # [n, H, m, dh]
    kh = k.view(n, -1, n_heads, dh).transpose(1, 2)  # [n, H, P, dh]
    vh = v.view(n, -1, n_heads, dh).transpose(1, 2)  # [n, H, P, dh]
    mask = None if bias is None else bias[:, None]  # [n, 1, 1, P]
    if not drop.active and mask is None:  # flash-attn / xformers when selected (GPU check)
        o = external_attention(q.view(n, m, n_heads, dh), k.view(n, -1, n_heads, dh),
                               v.view(n, -1, n_heads, dh))  # fmt: skip
        if o is not None:
            return o.reshape(n, m, d)
    if not drop.active:
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    else:  # explicit form: the dropout mask must come from the chunk's generator
        s = matmul(qh, kh.transpose(-1, -2)) * (1.0 / math.sqrt(dh))  # [n, H, m, P]
        if mask is not None:
            s = s + mask
        o = matmul(drop(torch.softmax(s, dim=-1)), vh)
    return o.transpose(1, 2).reshape(n, m, d)


def ffn_stage(lp: LayerPlan, cfg: AlignerConfig, x: Tensor, drop: Dropout) -> Tensor:
    """Pre-norm FFN with its residual: x `(..., D)` → `(..., D)`."""
    y = F.layer_norm(x, (cfg.d_model,), lp.norm3_w, lp.norm3_b, cfg.layer_norm_eps)
    h = drop.relu_kept(linear(y, lp.linear1_w, lp.linear1_b))  # unscaled
    # both dropouts' scales s in one GEMM: drop(b2 + s·h·W2ᵀ) = kept(s·b2 + s²·h·W2ᵀ)
    s = drop.scale
    return x + drop.kept(linear(h, lp.linear2_w, lp.linear2_b, alpha=s * s, beta=s))


def head_stage(prep: Prepared, cfg: AlignerConfig, x: Tensor, drop: Dropout) -> Tensor:
    """decoder_norm then the MLP head: x `(..., D)` → logits `(...)`. The input of every
    Linear is dropped (decoder_norm's output, then each ReLU's), so each GEMM takes the
    dropout scale as its alpha."""
    x = drop.kept(F.layer_norm(x, (cfg.d_model,), prep.norm0_w, prep.norm0_b,
                               cfg.layer_norm_eps))  # fmt: skip
    last = len(prep.head) - 1
    for i, (hw, hb) in enumerate(prep.head):
        x = linear(x, hw, hb, alpha=drop.scale)
        if i < last:
            x = drop.relu_kept(x)
    return x.squeeze(-1)


def pair_chunk_forward(
    prep: Prepared,
    cfg: AlignerConfig,
    queries: slice,
    item: list[Tensor],
    folded: bool,
    bias: Tensor | None,
    drop: Dropout,
) -> Tensor:
    """All layers and the head for n items (their `item_stage` state) × the queries in
    `queries` (a slice of `prep.x0`/`prep.q1`) → logits `(n, m)`."""
    n, d, scale = item[0].shape[0], cfg.d_model, 1.0 / math.sqrt(cfg.head_dim)
    x = prep.x0[queries]  # [m, D], broadcast over the n items by the first residual add
    m = x.shape[0]
    for i, lp in enumerate(prep.layers):
        if i == 0:  # layer 1's query does not depend on the item: prepared once per query
            if folded:
                qk = tuple(t[queries] for t in prep.q1_folded)
                o = attention_folded(qk, item[0], lp.v_heads, lp.v_bias_heads, bias, drop,
                                     shared=True)  # fmt: skip
            else:
                o = attention_kv(prep.q1[queries].expand(n, m, d), item[0], item[1], bias,
                                 cfg.n_heads, drop)  # fmt: skip
        else:
            y = F.layer_norm(x, (d,), lp.norm2_w, lp.norm2_b, cfg.layer_norm_eps)
            if folded:  # the attention's 1/sqrt(dh) rides on the projection's GEMM
                q = linear(y.view(-1, d), lp.q_w, lp.q_b, alpha=scale, beta=scale)
                o = attention_folded(fold_query(q, lp), item[0], lp.v_heads, lp.v_bias_heads,
                                     bias, drop, shared=False)  # fmt: skip
            else:
                q = linear(y, lp.q_w, lp.q_b)  # [n, m, D]
                o = attention_kv(q, item[2 * i], item[2 * i + 1], bias, cfg.n_heads, drop)
        x = x + drop.kept(linear(o, lp.out_w, lp.out_b, alpha=drop.scale, beta=drop.scale))
        x = ffn_stage(lp, cfg, x, drop)
    return head_stage(prep, cfg, x, drop)
