"""One chunk of pairs in the `triton` backend's backward (`fused_train.py` walks the chunks).

`recompute` runs the chunk's forward again, keeping every layer's activations (`pair_layers`
with one buffer set per layer, the softmax log-sum-exp kept); `chunk_backward` goes back
through the MLP head, decoder_norm and the layers in reverse, adding into the fp32 weight
gradients, the item block's dK/dV and the per-query gradients of the query stage. The buffers
(`chunk_buffers`, `item_buffers`) are allocated once per direction and reused by every chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..config import AlignerConfig
from ..weights import AlignerWeights
from .fused import CallPlan, Drop, LayerBuffers, pair_layers
from .philox import SITE_ATTENTION, SITE_ATTN_BRANCH, SITE_FFN_BRANCH, SITE_HEAD, SITE_SIMR, tag


def linear_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    g_w: Tensor | None,
    g_b: Tensor | None,
    relu_of: Tensor | None = None,
    drop_scale: float = 1.0,
    dy_sum: Tensor | None = None,
    sum_dx: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Backward of `y = x·Wᵀ + b`: dy `(r, out)`, x `(r, in)` → (dx `(r, in)`, Σ dx or None).

    Adds dW = dyᵀ·x and db = Σ dy into the fp32 accumulators (when given; `dy_sum`: Σ dy
    already summed, fp32 `(out,)`, e.g. by the LayerNorm backward that made dy). With `relu_of`
    (x itself: a ReLU output, possibly dropped and scaled by `drop_scale`), dx is the gradient
    before that ReLU and dropout: an element of x is > 0 exactly where the ReLU passed it
    and dropout kept it, so x alone carries both masks. `sum_dx` (with `relu_of`): also the
    column sums of dx, fp32 `(in,)`, from the same pass (`kernels.relu_backward`): the bias
    gradient of the layer that made x.
    """
    dy = dy.to(weight.dtype)
    if g_w is not None:
        g_w.add_(torch.mm(dy.t(), x))
        g_b.add_(dy.sum(0, dtype=torch.float32) if dy_sum is None else dy_sum)
    if relu_of is not None and drop_scale != 1.0:
        weight = weight * drop_scale  # the dropout's scale on the small weight: one pass less
    dx = torch.mm(dy, weight)
    if relu_of is None:
        return dx, None
    if sum_dx:  # one pass for the mask and the next layer's bias gradient
        from ..kernels import relu_backward

        return relu_backward(dx, relu_of)
    return torch.ops.aten.threshold_backward(dx, relu_of, 0), None


def add_norm(g_w: Tensor, g_b: Tensor, dg: Tensor, db: Tensor) -> None:
    """A LayerNorm's γ/β gradients of one chunk into their fp32 accumulators."""
    g_w.add_(dg)
    g_b.add_(db)


class Chunk(NamedTuple):
    """One chunk's recomputed forward."""

    bufs: list[LayerBuffers]
    head_in: list[Tensor]  # the input of every head layer: decoder_norm'ed rows, then hiddens


def recompute(linear, w, cfg, cp, kv, mask, ni, queries, bufs, head_bufs, drop) -> Chunk:  # noqa: ANN001
    y = pair_layers(linear, w, cfg, cp, kv, mask, ni, queries, bufs, drop)
    acts = [y]
    for i, ((hw, hb), out) in enumerate(zip(cp.head[:-1], head_bufs, strict=True)):
        h_drop = (*drop, tag(SITE_HEAD, i)) if drop else None
        acts.append(linear(acts[-1], hw, hb, relu=True, out=out, dropout=h_drop))
    return Chunk(bufs, acts)


def chunk_backward(
    w: AlignerWeights,
    grads: AlignerWeights | None,
    cfg: AlignerConfig,
    cp: CallPlan,
    chunk: Chunk,
    kv: Tensor,
    mask: Tensor | None,
    ni: int,
    queries: slice,
    g_scores: Tensor,
    g_kv: Tensor,
    g_x0: Tensor,
    g_q1: Tensor,
    drop: Drop | None = None,
) -> None:
    """Back-propagate one chunk: g_scores `(ni·mc,)` → adds into the weight gradients, the
    item block's dK/dV `g_kv` `(ni·P, L·2D)` and the per-query `g_x0`, `g_q1` `(M, D)`.
    With `drop` (training mode), through the forward's dropout masks."""
    from ..kernels import attention_backward, layer_norm_backward

    d, eps, n_heads = cfg.d_model, cfg.layer_norm_eps, cfg.n_heads
    scale = drop[0].scale if drop else 1.0

    def ln_backward(x: Tensor, weight: Tensor, dy: Tensor, site: int, layer: int,
                    dres: Tensor | None = None, dropped_output: bool = False):  # noqa: ANN202  # fmt: skip
        """A LayerNorm's backward whose dx also enters a residual branch's linear layer (the
        branch `site` of `layer`): with 16-bit GEMMs or dropout it writes that layer's dy (dx
        through the branch's mask, in training mode) and its bias gradient too → (dx fp32,
        dγ, dβ, branch: (dy, Σ dy), or None: fp32 without dropout, dx is the layer's dy).
        `dropped_output`: the LayerNorm's output was dropped (SimR) and dy is the gradient of
        the dropped output (the kernel takes it back through that mask)."""
        if not drop and w.norm0_w.dtype == torch.float32:
            return (*layer_norm_backward(x, weight, dy, eps, dres)[:3], None)
        dx16 = torch.empty(x.shape, dtype=w.norm0_w.dtype, device=x.device)
        tags = {}
        if drop:
            tags = dict(dx16_tag=tag(site, layer),
                        dy_tag=tag(SITE_SIMR, 0) if dropped_output else None)  # fmt: skip
        out = layer_norm_backward(x, weight, dy, eps, dres, dx16=dx16, dropout=drop, **tags)
        return out.dx, out.dw, out.db, (dx16, out.dx16_sum)

    def branch_backward(dx: Tensor, branch, *args, **kwargs) -> tuple[Tensor, Tensor | None]:  # noqa: ANN001
        """`linear_backward` of a residual branch's linear layer from the stream's dx, or
        from the layer's dy and bias gradient that `ln_backward` made (`branch`)."""
        if branch is None:
            return linear_backward(dx, *args, **kwargs)
        return linear_backward(branch[0], *args, dy_sum=branch[1], **kwargs)

    gh = grads.head if grads is not None else [(None, None)] * len(w.head)
    acts, head = chunk.head_in, cp.head
    # the logit layer (width → 1), then the hidden layers back to decoder_norm's output
    if grads is not None:
        gh[-1][0].add_(g_scores[None, :] @ acts[-1].float())
        gh[-1][1].add_(g_scores.sum())
    da = (g_scores[:, None] * head[-1][0].float()).masked_fill_(acts[-1] <= 0, 0.0) * scale
    da_sum = None
    for i in reversed(range(len(head) - 1)):  # acts[i] (i > 0) is layer i − 1's ReLU output
        sum_dx = i > 0 and gh[i - 1][1] is not None  # that layer's bias gradient
        da, da_sum = linear_backward(da, acts[i], head[i][0], *gh[i],
                                     relu_of=acts[i] if i else None, drop_scale=scale,
                                     dy_sum=da_sum, sum_dx=sum_dx)  # fmt: skip
    bufs = chunk.bufs
    dx, dg, db, branch = ln_backward(bufs[-1].x_out, w.norm0_w, da, SITE_FFN_BRANCH,
                                     cfg.n_layers - 1, dropped_output=True)  # fmt: skip
    if grads is not None:
        add_norm(grads.norm0_w, grads.norm0_b, dg, db)
    mc = g_x0[queries].shape[0]
    for li in reversed(range(cfg.n_layers)):
        b, lw = bufs[li], w.layers[li]
        gl = grads.layers[li] if grads is not None else None

        def g(name: str, rows: slice | None = None, gl=gl) -> Tensor | None:  # noqa: ANN001
            t = getattr(gl, name) if gl is not None else None
            return t[rows] if t is not None and rows is not None else t

        # x_out = x_mid + drop(linear2(drop(relu(linear1(LN3(x_mid))))))
        dh, dh_sum = branch_backward(dx, branch, b.h, lw.linear2_w, g("linear2_w"),
                                     g("linear2_b"), relu_of=b.h, drop_scale=scale,
                                     sum_dx=g("linear1_b") is not None)  # fmt: skip
        dy3, _ = linear_backward(dh, b.y3, lw.linear1_w, g("linear1_w"), g("linear1_b"),
                                 dy_sum=dh_sum)  # fmt: skip
        dx_mid, dg, db, branch = ln_backward(b.x_mid, lw.norm3_w, dy3, SITE_ATTN_BRANCH, li,
                                             dres=dx)  # fmt: skip
        if gl is not None:
            add_norm(gl.norm3_w, gl.norm3_b, dg, db)
        # x_mid = x_in + drop(out_proj(attention(q, K, V)))
        do, _ = branch_backward(dx_mid, branch, b.o, lw.out_proj_w, g("out_proj_w"),
                                g("out_proj_b"))  # fmt: skip
        k_cols = slice(2 * li * d, (2 * li + 1) * d)
        v_cols = slice((2 * li + 1) * d, (2 * li + 2) * d)
        q = cp.q1[queries] if li == 0 else b.q
        a_drop = (*drop, tag(SITE_ATTENTION, li)) if drop else None
        # layer 1's per-pair dq is summed over items in fp32; the others go into a GEMM, the
        # dQ kernel summing their columns (the query projection's bias gradient) on the way
        q_rows = slice(0, d)
        dq_sum = None
        if li > 0 and g("in_proj_b", q_rows) is not None:
            dq_sum = torch.empty(d, dtype=torch.float32, device=dx_mid.device)
        dq, _, _ = attention_backward(q, kv[:, k_cols], kv[:, v_cols], b.o, do, b.lse, n_heads,
                                      ni, mc, shared_queries=li == 0, mask=mask,
                                      dk=g_kv[:, k_cols], dv=g_kv[:, v_cols], dropout=a_drop,
                                      dq_dtype=torch.float32 if li == 0 else q.dtype,
                                      dq_sum=dq_sum)  # fmt: skip
        if li == 0:  # x_in is x0 and q is q1, both shared by the chunk's items
            g_q1[queries] += dq.view(ni, mc, d).sum(0)
            g_x0[queries] += dx_mid.view(ni, mc, d).sum(0)
        else:  # q = LN2(x_in)·Wqᵀ + bq, x_in the previous layer's x_out
            dy2, _ = linear_backward(dq, bufs[li - 1].y_next, cp.q_w[li],
                                     g("in_proj_w", q_rows), g("in_proj_b", q_rows),
                                     dy_sum=dq_sum)  # fmt: skip
            dx, dg, db, branch = ln_backward(bufs[li - 1].x_out, lw.norm2_w, dy2,
                                             SITE_FFN_BRANCH, li - 1, dres=dx_mid)  # fmt: skip
            if gl is not None:
                add_norm(gl.norm2_w, gl.norm2_b, dg, db)


def chunk_buffers(cfg: AlignerConfig, rows: int, dtype: torch.dtype, device: torch.device):  # noqa: ANN202
    """Per-layer buffers (one scratch `branch` shared by all layers) and the head's."""
    d, f = cfg.d_model, cfg.d_ffn
    kw = dict(dtype=dtype, device=device)
    f32 = dict(dtype=torch.float32, device=device)
    branch = torch.empty((rows, d), **kw)
    bufs = [
        LayerBuffers(
            q=torch.empty((rows, d), **kw) if li else torch.empty((0, d), **kw),
            o=torch.empty((rows, d), **kw),
            lse=torch.empty((rows, cfg.n_heads), **f32),
            x_mid=torch.empty((rows, d), **f32),
            y3=torch.empty((rows, d), **kw),
            h=torch.empty((rows, f), **kw),
            x_out=torch.empty((rows, d), **f32),
            y_next=torch.empty((rows, d), **kw),
            branch=branch,
            ffn_branch=branch,
        )
        for li in range(cfg.n_layers)
    ]
    head = [torch.empty((rows, width), **kw) for width in cfg.head_dims]
    return bufs, head


def item_buffers(cfg: AlignerConfig, items: int, memory: Tensor) -> tuple[Tensor, Tensor]:
    """An item block's LN0(memory) `(items·P, D)` and every layer's K/V `(items·P, L·2D)`."""
    p, d = memory.shape[1], cfg.d_model
    kw = dict(dtype=memory.dtype, device=memory.device)
    return (torch.empty((items * p, d), **kw),
            torch.empty((items * p, 2 * cfg.n_layers * d), **kw))  # fmt: skip
