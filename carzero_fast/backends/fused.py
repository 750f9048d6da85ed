"""The `triton` backend: the streaming executor's pair stages on fused Triton kernels.

Same split of work as `chunked` (DESIGN.md §3), in the "kv" form (on a GPU the per-item K/V
projections are cheap next to the pairs at the batch sizes this backend is for):

- per query (plain PyTorch, O(M·D²)): `x0 = LN0(q)` and layer 1's query projection;
- per block of memory items: `LN0(memory)` (`add_layer_norm` without an add), then the K and
  V of every layer in one GEMM into a `(items·P, L·2D)` buffer;
- per chunk of pairs (those items × a block of queries, item-major rows), for each layer:
  Q projection → `attention` → output projection → `add_layer_norm` (residual add, LN3) →
  linear1 (ReLU) → linear2 → `add_layer_norm` (residual add, the next LN2 or decoder_norm);
  then the MLP head, whose last hidden layer reduces each row to its logit and writes it
  straight into the `(N, M)` scores.

The residual stream is fp32 in every dtype (16-bit inputs round only GEMM operands, as
autocast does). Chunk buffers are allocated once per call and reused, so memory is
`rows·(3·D + F + max(head))` elements + `rows·D` fp32 (the stream) + `items·P·(L·2D + D)`
elements (LN0(memory), K/V) + the scores, never O(N·M·D).
Nothing reads back to the host inside the loop.

Forward only: the backward kernels are a later issue (issue 4). `run_backend` sends calls that
need gradients or dropout to the `chunked` backend, which computes the same function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import AlignerConfig
from ..weights import AlignerWeights

# Default memory for one chunk's buffers (plus one item block's K/V). Large chunks keep each
# GEMM large (~45k rows at CARZero dims) and the launches few (~38 per chunk): at 256 MiB an
# H200 waited on kernel launches (BENCHMARKS.md).
DEFAULT_FUSED_BUDGET_BYTES = 512 * 2**20


def kernels_available() -> bool:
    try:
        import triton  # noqa: F401

        from .. import kernels  # noqa: F401
    except ImportError:
        return False
    return True


def check_device(t: Tensor) -> None:
    from ..kernels.common import interpreting

    if t.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"backend 'triton' needs CUDA tensors, got {t.device.type} ones; use 'chunked' "
            "(or 'auto') there, or set TRITON_INTERPRET=1 to run the kernels through "
            "Triton's CPU interpreter"
        )


def plan_fused(
    cfg: AlignerConfig, n: int, m: int, p: int, itemsize: int, budget: int
) -> tuple[int, int]:
    """(items per block, queries per chunk) for a memory budget in bytes."""
    widest = max(cfg.d_ffn, *cfg.head_dims)
    per_pair = itemsize * (3 * cfg.d_model + widest + max(cfg.head_dims)) + 4 * cfg.d_model
    per_item = p * itemsize * (2 * cfg.n_layers + 1) * cfg.d_model
    queries = max(1, min(m, budget // (2 * per_pair)))
    items = max(1, min(n, budget // (queries * per_pair + per_item)))
    return items, queries


def _buffer(pool: Tensor, rows: int, cols: int) -> Tensor:
    """A contiguous `(rows, cols)` view at the start of a flat pool."""
    return pool[: rows * cols].view(rows, cols)


def triton_forward(
    w: AlignerWeights,
    cfg: AlignerConfig,
    memory: Tensor,
    queries: Tensor,
    memory_mask: Tensor | None,
    chunk_budget_bytes: int | None = None,
) -> Tensor:
    """memory `(N, P, D)`, queries `(M, D)`, mask `(N, P)` bool → logits `(N, M)`, streamed
    through the fused kernels (no autograd, no dropout)."""
    from ..kernels import add_layer_norm, attention
    from ..kernels import linear as linear_kernel

    # one TMA descriptor per (buffer, block) for the whole call: the buffers are reused
    linear = functools.partial(linear_kernel, descriptors={})

    check_device(memory)
    n, p, d = memory.shape
    m = queries.shape[0]
    out = memory.new_zeros((n, m))
    if n == 0 or m == 0:
        return out
    eps, n_layers, n_heads = cfg.layer_norm_eps, cfg.n_layers, cfg.n_heads
    budget = DEFAULT_FUSED_BUDGET_BYTES if chunk_budget_bytes is None else chunk_budget_bytes
    if budget <= 0:
        raise ValueError(f"chunk_budget_bytes must be positive, got {budget}")
    items, block_q = plan_fused(cfg, n, m, p, memory.element_size(), budget)

    # per query: the initial residual stream and layer 1's query (independent of the item).
    # The residual stream stays fp32 in every dtype: 16-bit inputs then round only GEMM
    # operands, as autocast would (half the error of a 16-bit stream, for D·4 bytes a row).
    x0 = F.layer_norm(queries.float(), (d,), w.norm0_w.float(), w.norm0_b.float(), eps)
    l0 = w.layers[0]
    y0 = F.layer_norm(x0, (d,), l0.norm2_w.float(), l0.norm2_b.float(), eps).to(memory.dtype)
    q1 = F.linear(y0, l0.in_proj_w[:d], l0.in_proj_b[:d]).contiguous()
    # every layer's K and V projections stacked: one GEMM per item block
    kv_w = torch.cat([lw.in_proj_w[d:] for lw in w.layers]).contiguous()  # [L·2D, D]
    kv_b = torch.cat([lw.in_proj_b[d:] for lw in w.layers]).contiguous()
    q_w = [lw.in_proj_w[:d].contiguous() for lw in w.layers]
    q_b = [lw.in_proj_b[:d].contiguous() for lw in w.layers]
    head = [(hw.contiguous(), hb.contiguous()) for hw, hb in w.head]
    mask8 = memory_mask.to(torch.int8) if memory_mask is not None else None

    rows = items * block_q
    widest = max(cfg.d_ffn, *cfg.head_dims)
    kw = dict(dtype=memory.dtype, device=memory.device)
    x = torch.empty((rows, d), dtype=torch.float32, device=memory.device)  # residual stream
    y, q, o = (torch.empty((rows, d), **kw) for _ in range(3))  # LN out, q / branch out, attn
    pool_a = torch.empty(rows * widest, **kw)  # FFN hidden, head layers 0, 2, …
    pool_b = torch.empty(rows * max(cfg.head_dims), **kw)  # head layers 1, 3, …
    y_mem = torch.empty((items * p, d), **kw)
    kv = torch.empty((items * p, 2 * n_layers * d), **kw)
    norms = [(lw.norm2_w, lw.norm2_b) for lw in w.layers[1:]] + [(w.norm0_w, w.norm0_b)]

    for n0 in range(0, n, items):
        ni = min(items, n - n0)
        mem = memory[n0 : n0 + ni].reshape(ni * p, d)
        if mem.stride(-1) != 1:
            mem = mem.contiguous()
        add_layer_norm(mem, w.norm0_w, w.norm0_b, eps, y_mem[: ni * p])
        kv_i = linear(y_mem[: ni * p], kv_w, kv_b, out=kv[: ni * p])
        mask_i = mask8[n0 : n0 + ni] if mask8 is not None else None
        for m0 in range(0, m, block_q):
            mc = min(block_q, m - m0)
            r = ni * mc
            xc, yc, qc, oc = x[:r], y[:r], q[:r], o[:r]
            for li, lw in enumerate(w.layers):
                k_l = kv_i[:, 2 * li * d : (2 * li + 1) * d]  # [ni·P, D] strided views
                v_l = kv_i[:, (2 * li + 1) * d : (2 * li + 2) * d]
                if li == 0:  # the stream starts as x0, broadcast over the chunk's items
                    attention(q1[m0 : m0 + mc], k_l, v_l, n_heads, ni, mc, shared_queries=True,
                              mask=mask_i, out=oc)  # fmt: skip
                    stream = x0[m0 : m0 + mc]
                else:  # yc holds this layer's LN2(x), from the previous add_layer_norm
                    linear(yc, q_w[li], q_b[li], out=qc)
                    attention(qc, k_l, v_l, n_heads, ni, mc, mask=mask_i, out=oc)
                    stream = xc
                linear(oc, lw.out_proj_w, lw.out_proj_b, out=qc)  # branch output
                add_layer_norm(stream, lw.norm3_w, lw.norm3_b, eps, yc, delta=qc, x_out=xc)
                h = _buffer(pool_a, r, cfg.d_ffn)
                linear(yc, lw.linear1_w, lw.linear1_b, relu=True, out=h)
                linear(h, lw.linear2_w, lw.linear2_b, out=qc)
                add_layer_norm(xc, *norms[li], eps, yc, delta=qc, x_out=xc)
            _head(linear, head, yc, pool_a, pool_b, out[n0 : n0 + ni, m0 : m0 + mc])
    return out


def _head(
    linear: Callable[..., Tensor],
    head: list[tuple[Tensor, Tensor]],
    y: Tensor,
    pool_a: Tensor,
    pool_b: Tensor,
    scores: Tensor,
) -> None:
    """The MLP head over a chunk's decoder_norm'ed rows `(r, D)` → `scores` `(ni, mc)` (a view
    of the output), with the last hidden layer and the logit fused when narrow enough."""
    from ..kernels.configs import HEAD_MAX_WIDTH

    r, last = y.shape[0], len(head) - 2  # head[last] is the last hidden layer
    a = y
    for i in range(last):
        out = _buffer(pool_a if i % 2 == 0 else pool_b, r, head[i][0].shape[0])
        a = linear(a, *head[i], relu=True, out=out)
    (hw, hb), (lw, lb) = head[last], head[last + 1]
    if hw.shape[0] <= HEAD_MAX_WIDTH:
        linear(a, hw, hb, relu=True, head=(lw[0], lb), out=scores, logit_cols=scores.shape[1])
    else:
        out = _buffer(pool_a if last % 2 == 0 else pool_b, r, hw.shape[0])
        a = linear(a, hw, hb, relu=True, out=out)
        scores.copy_(F.linear(a, lw, lb).view(scores.shape))


def triton_both_directions(
    w: AlignerWeights,
    cfg: AlignerConfig,
    img_tokens: Tensor,
    txt_tokens: Tensor,
    img_mask: Tensor | None,
    txt_mask: Tensor | None,
    chunk_budget_bytes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Both directions, globals from row 0 → (i2t `(N, M)`, t2i `(M, N)`)."""
    i2t = triton_forward(w, cfg, img_tokens, txt_tokens[:, 0], img_mask, chunk_budget_bytes)
    t2i = triton_forward(w, cfg, txt_tokens, img_tokens[:, 0], txt_mask, chunk_budget_bytes)
    return i2t, t2i
