"""The chunked backend's "folded" attention: forward, and a hand-written backward.

Per head h (DESIGN.md §3; `chunked_stages.py`'s docstring), with X = LN0(memory) `(n, P, D)`,
qk_h the query already folded into token space `(…, D)` and Wv_h, bv_h the head's value
projection:

    s_h = qk_h·Xᵀ + bias            # [n, m, P]  (computed as X·qk_hᵀ, laid out [n, P, m])
    p_h = softmax(s_h)              # [n, m, P]  (a view of the [n, P, m] softmax)
    a_h = dropout(p_h)              # [n, m, P]
    c_h = a_h·X                     # [n, m, D]
    o_h = c_h·Wv_hᵀ + Σa_h·bv_h     # [n, m, dh]   (Σa_h = 1 without dropout)

Why not autograd: the gradient into X has two terms per head, a_hᵀ·dc_h and ds_hᵀ·qk_h,
each a product whose inner dimension is the chunk's m queries (~48). Autograd runs them as
2·H separate products of that inner dimension and adds them up; on a 2-core CPU they ran at
~28 GFLOP/s (profile of a training step at N = M = 48). Here they are one batched product
with inner dimension 2·H·m (about 4× the rate in that profile), and the per-head partial sums
disappear. The saved state is smaller too: p_h and the dropout mask instead of p_h and a_h.

Scores and their gradient are products with the P tokens as rows: `X·qk_hᵀ` `(P, m)` per
item ran 10–15% faster than `qk_h·Xᵀ` `(m, P)` (2-core CPU; 50–60% for layer 1's query
block shared by all items, one (n·P × D)·(D × m) product), and the weighted sum a_h·X takes
the transposed weights at full speed. So s_h, p_h and ds_h live as `[n, P, m]` and are read
as `[n, m, P]` through transposed views.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .cpu_gemm import bmm, linear, mm, mm_t
from .dropout import Dropout


def _scores_t(qk_h: Tensor, normed: Tensor, shared: bool) -> Tensor:
    """Transposed scores: qk_h `(n·m, D)` (one row per pair) or `(m, D)` (shared by all n
    items) → `(n, P, m)`."""
    n, p, d = normed.shape
    if shared:  # one product against every item's tokens
        return mm_t(normed.reshape(n * p, d), qk_h).view(n, p, -1)
    return bmm(normed, qk_h.view(n, -1, d).transpose(1, 2))


def folded_forward(
    qk: Iterable[Tensor],
    normed: Tensor,
    wv: tuple[Tensor, ...],
    bv: tuple[Tensor, ...],
    bias: Tensor | None,
    drop: Dropout,
    shared: bool,
    saved: list[tuple[Tensor, Tensor | None, Tensor]] | None = None,
) -> Tensor:
    """Attention output before the output projection, `(n, m, D)`.

    qk: per head `(n·m, D)` or `(m, D)` (`shared`); may be a lazy iterable (one head's query
    alive at a time). `saved`, when given, receives per head (p_h, kept-mask or None, c_h)
    for the backward.
    """
    outs = []
    for qk_h, wv_h, bv_h in zip(qk, wv, bv, strict=True):
        s = _scores_t(qk_h, normed, shared)  # [n, P, m]
        if bias is not None:
            s = s + bias.transpose(1, 2)
        prob = torch.softmax(s, dim=1).transpose(1, 2)  # [n, m, P], a view
        keep = drop.keep(prob.shape, prob.device) if drop.active else None  # int16 0/1
        a = prob if keep is None else (prob * keep.to(prob.dtype)).mul_(drop.scale)
        c = bmm(a, normed)  # [n, m, D]: attention-weighted tokens
        if keep is None:
            outs.append(linear(c, wv_h, bv_h))  # [n, m, dh]
        else:  # dropped weights no longer sum to one: bv scales with their sum
            outs.append(linear(c, wv_h) + a.sum(-1, keepdim=True) * bv_h)
        if saved is not None:
            saved.append((prob, keep, c))
    return torch.cat(outs, dim=-1)


class FoldedAttention(torch.autograd.Function):
    """`folded_forward` with the backward described in the module docstring.

    Inputs after the options: H queries qk_h, X `(n, P, D)`, H Wv_h `(dh, D)`, H bv_h `(dh,)`.
    """

    @staticmethod
    def forward(ctx, bias, drop, shared, n_heads, *tensors):  # noqa: ANN001
        qk, normed = tensors[:n_heads], tensors[n_heads]
        wv, bv = tensors[n_heads + 1 : 2 * n_heads + 1], tensors[2 * n_heads + 1 :]
        saved: list[tuple[Tensor, Tensor | None, Tensor]] = []
        out = folded_forward(qk, normed, wv, bv, bias, drop, shared, saved)
        probs, keeps, cs = zip(*saved, strict=True)
        ctx.save_for_backward(normed, *qk, *wv, *bv, *probs, *cs)
        ctx.keeps, ctx.shared, ctx.n_heads = keeps, shared, n_heads
        ctx.scale = drop.scale  # 1 without dropout
        return out

    @staticmethod
    def backward(ctx, g_out):  # noqa: ANN001
        h_n = ctx.n_heads
        normed, *rest = ctx.saved_tensors
        qk, wv, bv = rest[:h_n], rest[h_n : 2 * h_n], rest[2 * h_n : 3 * h_n]
        probs, cs = rest[3 * h_n : 4 * h_n], rest[4 * h_n :]
        need_qk = ctx.needs_input_grad[4 : 4 + h_n]
        need_x = ctx.needs_input_grad[4 + h_n]
        need_wv = ctx.needs_input_grad[5 + h_n : 5 + 2 * h_n]
        need_bv = ctx.needs_input_grad[5 + 2 * h_n :]
        n, p, d = normed.shape
        m, dh = g_out.shape[1], wv[0].shape[0]
        # X's gradient = Σ_h ds_hᵀ·qk_h + a_hᵀ·dc_h: one product over the stacked operands,
        # rows ordered (query, term) so that a term's rows over all pairs share one stride
        # and dc_h is written there by its GEMM directly
        lhs = normed.new_empty((n, m, 2 * h_n, p)) if need_x else None  # [ds_h…, a_h…]
        rhs = normed.new_empty((n, m, 2 * h_n, d)) if need_x else None  # [qk_h…, dc_h…]
        g_qk, g_wv, g_bv = [], [], []
        for h in range(h_n):
            g_h = g_out[..., h * dh : (h + 1) * dh]  # [n, m, dh]
            prob, keep, c = probs[h], ctx.keeps[h], cs[h]
            if keep is not None:  # saved as int16: a float multiplier is ~5× faster than it
                keep = keep.to(prob.dtype)
            a = None  # [n, m, P] the dropped weights, where needed
            if need_x or (keep is not None and need_bv[h]):
                # written in place into the stacked operand (ds_h, computed [n, P, m], is
                # the one term copied in, transposed)
                a = lhs[:, :, h_n + h] if need_x else torch.empty_like(prob)
                torch.mul(prob, ctx.scale, out=a)
                if keep is not None:
                    a.mul_(keep)
            g_wv.append(mm(g_h.reshape(n * m, dh).t(), c.reshape(n * m, d)) if need_wv[h] else None)
            if not need_bv[h]:
                g_bv.append(None)
            elif keep is None:
                g_bv.append(g_h.sum((0, 1)))
            else:
                g_bv.append((g_h * a.sum(-1, keepdim=True)).sum((0, 1)))
            # one product over the chunk's pairs (a batched product per item with the weight
            # expanded ran at half the rate in a profile)
            g_h2 = g_h.reshape(n * m, dh)
            if not need_x:
                dc = mm_t(g_h2, wv[h].t()).view(n, m, d)
            else:  # [n, m, D], rows 2H·D apart in the stacked operand
                # PyTorch's mm (MKL): oneDNN would be faster but has no `out=`, and the copy
                # into the stack costs what it gains
                dc = rhs[:, :, h_n + h]
                mm(g_h2, wv[h], out=dc.view(n * m, d))
            da = bmm(normed, dc.transpose(1, 2))  # [n, P, m], as the scores
            if keep is not None:  # bv·Σa: every weight's gradient gets g_h·bv_h
                da += (g_h * bv[h]).sum(-1)[:, None, :]
                da.mul_(keep.transpose(1, 2)).mul_(ctx.scale)
            prob_t = prob.transpose(1, 2)  # [n, P, m]
            ds = da.sub_((da * prob_t).sum(1, keepdim=True)).mul_(prob_t)  # softmax backward
            if need_qk[h]:
                if ctx.shared:  # the query met every item: sum over items in the product
                    g_qk.append(mm(ds.view(n * p, m).t(), normed.reshape(n * p, d)))
                else:
                    g_qk.append(bmm(ds.transpose(1, 2), normed).view(n * m, d))
            else:
                g_qk.append(None)
            if need_x:
                lhs[:, :, h] = ds.transpose(1, 2)
                rhs[:, :, h] = qk[h].view(-1, m, d)  # broadcast over items when shared
        g_x = None
        if need_x:
            g_x = bmm(lhs.view(n, m * 2 * h_n, p).transpose(1, 2),
                            rhs.view(n, m * 2 * h_n, d))  # fmt: skip
        return (None, None, None, None, *g_qk, g_x, *g_wv, *g_bv)


def attention_folded(
    qk: Iterable[Tensor],
    normed: Tensor,
    wv: tuple[Tensor, ...],
    bv: tuple[Tensor, ...],
    bias: Tensor | None,
    drop: Dropout,
    shared: bool,
) -> Tensor:
    """Multi-head attention with the K/V projections folded into the query side (exact).

    qk: per head the query in token space, `(n·m, D)` with one row per pair, or `(m, D)`
    shared by all n items (`shared`, layer 1); normed `(n, P, D)` = LN0(memory); bias
    `(n, 1, P)` additive → `(n, m, D)`, before the output projection. Under autograd it runs
    `FoldedAttention`; otherwise the plain loop, one head's state alive at a time.
    """
    if torch.is_grad_enabled():
        qk = tuple(qk)  # autograd keeps every head's query anyway
        if any(t.requires_grad for t in (*qk, normed, *wv, *bv)):
            return FoldedAttention.apply(bias, drop, shared, len(qk), *qk, normed, *wv, *bv)
    return folded_forward(qk, normed, wv, bv, bias, drop, shared)
