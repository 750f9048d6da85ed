"""The `chunked` backend: all N×M pairs streamed through plain PyTorch ops in bounded chunks.

Work is split by what it depends on (DESIGN.md §3):

- per query (shared by all N items): `x0 = LN0(q)` and layer 1's query projection, once;
- per memory item: `LN0(memory)` (and, in the "kv" form, every layer's K and V), once per
  item block;
- per pair: everything else, for one chunk `(items n0:n1) × (queries m0:m1)` at a time.

Only a chunk of pairs is alive at any moment, so memory is O(chunk + N·M) (the logits), never
O(N·M·D). Training goes through `_ChunkedAlign`, an `autograd.Function` that saves the inputs
only and recomputes each chunk in backward; dropout masks come from a generator seeded per
chunk, so recomputation sees the same masks as the forward.

Two exact forms of the attention, chosen per call by the cost model (`use_folded_form`):

- "kv": K, V = LN0(mem)·Wkᵀ, LN0(mem)·Wvᵀ per item and layer (4·P·D² FLOPs per item and
  layer), then per pair q·Kᵀ and softmax·V per head (4·P·D FLOPs);
- "folded": never projects the memory. Per head, q·K_hᵀ = (Wk_hᵀ q_h)·LN0(mem)ᵀ + q_h·bk_h,
  and the last term is constant over keys, so softmax drops it; softmax·V_h =
  Wv_h·(softmax·LN0(mem)) + bv_h. Per pair that is 4·D² + 4·H·P·D FLOPs instead of 4·P·D,
  and nothing per item. It wins while an item meets fewer than P·D / (D + (H−1)·P) queries
  (111 for images, 71 for texts at CARZero dims: training batches); "kv" wins above.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..config import AlignerConfig
from ..weights import AlignerWeights
from .cpu_gemm import linear
from .dropout import Dropout
from .external_attention import external_attention
from .folded_attention import attention_folded
from .plan import (
    ChunkPlan,
    default_budget,
    executed_flops,
    plan_chunks,
    use_folded_form,
)

__all__ = ["ChunkPlan", "Dropout", "chunked_both_directions", "chunked_forward",
           "executed_flops", "plan_chunks", "use_folded_form"]  # fmt: skip

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
        s = torch.matmul(qh, kh.transpose(-1, -2)) * (1.0 / math.sqrt(dh))  # [n, H, m, P]
        if mask is not None:
            s = s + mask
        o = torch.matmul(drop(torch.softmax(s, dim=-1)), vh)
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


# ---------------------------------------------------------------------------------------------
# Executor
# ---------------------------------------------------------------------------------------------


def _chunks(total: int, step: int, granule: int = 1) -> list[tuple[int, int]]:
    """[0, total) in pieces of at most `step`, of near-equal size (48 items at step 9 → 6 × 8,
    not 5 × 9 + 3: no small tail chunk with small GEMMs), each a multiple of `granule` where
    `step` allows it (the last piece then takes what is left).

    The item loop's granule is the CPU thread count: PyTorch's CPU `bmm` (the per-item
    attention products) splits its batch over the threads, so on 2 threads an item block of 11
    ran at 150 GFLOP/s where blocks of 10 or 12 ran at 170–180 (BENCHMARKS.md)."""
    if step < granule:
        granule = 1
    units = -(-total // granule)
    count = -(-units // (step // granule))
    if count == 0:
        return []
    bounds = [min(total, i * units // count * granule) for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _item_granule(device: torch.device) -> int:
    return torch.get_num_threads() if device.type == "cpu" else 1


def _mask_bias(mask: Tensor | None, n0: int, n1: int, dtype: torch.dtype) -> Tensor | None:
    """bool mask `(N, P)` (True = ignore) → additive bias `(n1-n0, 1, P)`: 0 or -inf."""
    if mask is None:
        return None
    bias = torch.zeros(mask[n0:n1].shape, dtype=dtype, device=mask.device)
    return bias.masked_fill_(mask[n0:n1], float("-inf"))[:, None, :]


def _weight_piece(t: Tensor) -> bool:
    """A view of a leaf whose gradient buffer exists (a piece of a weight in backward)."""
    base = t._base
    return base is not None and base.is_leaf and base.grad is not None


def _leaf(t: Tensor | None) -> Tensor | None:
    if t is None or t.is_leaf:
        return t  # collects its own gradient already, or needs none
    leaf = t.detach().requires_grad_(True)
    if _weight_piece(t):
        # Its gradient accumulates (in place) straight into the weight's gradient buffer:
        # no piece-sized gradients alive beside it, nothing to send back afterwards.
        g = t._base.grad
        offset = g.storage_offset() + t.storage_offset() - t._base.storage_offset()
        leaf.grad = g.as_strided(t.shape, t.stride(), offset)
    return leaf


def _leaves(tree: object) -> object:
    """The same structure with every derived tensor detached (no copy) into a leaf that
    collects gradients over many chunks."""
    flat, spec = tree_flatten(tree)
    return tree_unflatten([_leaf(t) for t in flat], spec)


def _backward_tree(tree: object, leaves: object) -> None:
    """Send the gradients collected by `_leaves(tree)` back through `tree`'s graph (weight
    pieces' gradients are in place already)."""
    flat, flat_leaves = tree_flatten(tree)[0], tree_flatten(leaves)[0]
    pairs = [(t, g.grad) for t, g in zip(flat, flat_leaves, strict=True)
             if g is not None and g is not t and g.grad is not None
             and not _weight_piece(t)]  # fmt: skip
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def _run_chunks(
    prep: Prepared,
    cfg: AlignerConfig,
    job: Job,
    training: bool,
    memory: Tensor,
    out: Tensor,
    g_out: Tensor | None = None,
) -> None:
    """The chunk loop shared by forward (writes logits into `out`) and backward (`g_out`
    given: back-propagates each chunk and adds memory's gradient into `out`).

    In backward, `prep` holds leaves that collect gradients; each item block's state is
    detached so that its pairs' chunks back-propagate into one buffer, which then goes back
    through the item stage once.
    """
    n, m, plan = memory.shape[0], prep.x0.shape[0], job.plan
    p_drop = cfg.dropout if training else 0.0
    for n0, n1 in _chunks(n, plan.items, _item_granule(memory.device)):
        mem = memory[n0:n1]
        if g_out is not None:
            mem = mem.detach().requires_grad_(memory.requires_grad)
        item = item_stage(prep, cfg, mem, plan.folded)
        item_in = _leaves(item) if g_out is not None else item
        bias = _mask_bias(job.mask, n0, n1, memory.dtype)
        for m0, m1 in _chunks(m, plan.queries):
            drop = Dropout(p_drop, job.seed, (n0, m0), memory.device)
            s = pair_chunk_forward(prep, cfg, slice(m0, m1), item_in, plan.folded, bias, drop)
            if g_out is None:
                out[n0:n1, m0:m1] = s
            else:
                torch.autograd.backward(s, g_out[n0:n1, m0:m1])
        if g_out is not None:
            _backward_tree(item, item_in)
            if mem.grad is not None:
                out[n0:n1] += mem.grad


class Job(NamedTuple):
    """One direction: the memory is `tokens[memory]`; the queries are `tokens[queries]` when
    that is `(M, D)`, else its row 0 (the globals, as CARZero feeds them)."""

    memory: int
    queries: int
    mask: Tensor | None
    plan: ChunkPlan
    seed: int | None  # dropout seed, None = no dropout


def _queries(tokens: tuple[Tensor, ...], job: Job) -> Tensor:
    src = tokens[job.queries]
    return src if src.dim() == 2 else src[:, 0]


class _ChunkedAlign(torch.autograd.Function):
    """Forward saves only inputs; backward recomputes chunk by chunk (no per-pair activations).

    Several directions over the same tokens (i2t and t2i of a training step) run in one node,
    so the weights' gradient is accumulated once, and the global rows' gradients land in the
    token gradients directly.
    """

    @staticmethod
    def forward(ctx, cfg, jobs, training, n_tokens, *tensors):  # noqa: ANN001
        tokens, flat = tensors[:n_tokens], tensors[n_tokens:]
        w = AlignerWeights.unflatten(flat, cfg.n_layers)
        outs = []
        for job in jobs:
            memory, queries = tokens[job.memory], _queries(tokens, job)
            out = memory.new_empty((memory.shape[0], queries.shape[0]))
            prep = prepare(w, cfg, queries, job.plan.folded)
            _run_chunks(prep, cfg, job, training, memory, out)
            outs.append(out)
        ctx.save_for_backward(*tensors)
        ctx.cfg, ctx.jobs, ctx.training, ctx.n_tokens = cfg, jobs, training, n_tokens
        return tuple(outs)

    @staticmethod
    def backward(ctx, *g_outs):  # noqa: ANN001
        saved = ctx.saved_tensors
        tokens, flat = saved[: ctx.n_tokens], saved[ctx.n_tokens :]
        cfg = ctx.cfg
        needs = ctx.needs_input_grad[4:]  # after (cfg, jobs, training, n_tokens)
        needs_tokens, needs_flat = needs[: ctx.n_tokens], needs[ctx.n_tokens :]
        g_tokens = [torch.zeros_like(t) if need else None
                    for t, need in zip(tokens, needs_tokens, strict=True)]  # fmt: skip
        with torch.enable_grad():
            # Only what needs a gradient is differentiated (a frozen aligner costs no dW).
            tokens = [t.detach().requires_grad_(need)
                      for t, need in zip(tokens, needs_tokens, strict=True)]  # fmt: skip
            flat_leaf = [t.detach().requires_grad_(need)
                         for t, need in zip(flat, needs_flat, strict=True)]  # fmt: skip
            for t in flat_leaf:
                if t.requires_grad:  # one buffer per weight: both directions and every
                    t.grad = torch.zeros_like(t)  # piece (split, slice) accumulate into it
            w = AlignerWeights.unflatten(flat_leaf, cfg.n_layers)
            for job, g_out in zip(ctx.jobs, g_outs, strict=True):
                if g_out is None:
                    continue
                q_leaf = _queries(tokens, job).detach().requires_grad_(needs_tokens[job.queries])
                prep = prepare(w, cfg, q_leaf, job.plan.folded)
                prep_in = _leaves(prep)
                g_mem = g_tokens[job.memory]
                _run_chunks(prep_in, cfg, job, ctx.training, tokens[job.memory], g_mem, g_out)
                _backward_tree(prep, prep_in)
                g_q = g_tokens[job.queries]
                if q_leaf.grad is not None:
                    (g_q if g_q.dim() == 2 else g_q[:, 0]).add_(q_leaf.grad)
        # Drop the leaves' references so that autograd can take the gradients without a copy.
        grads = [t.grad for t in flat_leaf]
        for t in flat_leaf:
            t.grad = None
        return (None, None, None, None, *g_tokens, *grads)


def _check_form(form: str) -> None:
    if form not in ("auto", "kv", "folded"):
        raise ValueError(f"unknown attention form {form!r}; choose auto, kv or folded")


def _budget(chunk_budget_bytes: int | None, grad: bool, device_type: str) -> int:
    if chunk_budget_bytes is None:
        return default_budget(device_type, grad)
    budget = int(chunk_budget_bytes)
    if budget <= 0:
        raise ValueError(f"chunk_budget_bytes must be positive, got {budget}")
    return budget


def _make_job(cfg, tokens, mem_i, q_i, mask, training, budget, form, grad) -> Job:  # noqa: ANN001
    memory = tokens[mem_i]
    n, p, _ = memory.shape
    m = tokens[q_i].shape[0]
    folded = use_folded_form(cfg, m, p) if form == "auto" else form == "folded"
    plan = plan_chunks(cfg, n, m, p, memory.element_size(), budget, grad, folded)
    seed = None
    if training and cfg.dropout > 0.0:
        # From torch's default CPU generator: reproducible under torch.manual_seed, no sync.
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    return Job(mem_i, q_i, mask, plan, seed)


def _apply(w, cfg, tokens, pairs, training, chunk_budget_bytes, form) -> tuple[Tensor, ...]:  # noqa: ANN001
    """Run the jobs `pairs` = [(memory index, queries index, mask), ...] over `tokens`."""
    _check_form(form)
    flat = w.flatten()
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*tokens, *flat))
    budget = _budget(chunk_budget_bytes, grad, tokens[0].device.type)
    jobs = [_make_job(cfg, tokens, mi, qi, mask, training, budget, form, grad)
            for mi, qi, mask in pairs]  # fmt: skip
    if any(tokens[j.memory].shape[0] == 0 or tokens[j.queries].shape[0] == 0 for j in jobs):
        # Empty batches: plain autograd-connected zeros (no chunk to run).
        anchor = sum(0.0 * t.sum() for t in tokens)
        return tuple(
            tokens[j.memory].new_zeros((tokens[j.memory].shape[0], tokens[j.queries].shape[0]))
            + anchor
            for j in jobs
        )
    return _ChunkedAlign.apply(cfg, jobs, training, len(tokens), *tokens, *flat)


def chunked_forward(
    w: AlignerWeights,
    cfg: AlignerConfig,
    memory: Tensor,
    queries: Tensor,
    memory_mask: Tensor | None,
    training: bool,
    chunk_budget_bytes: int | None = None,
    form: str = "auto",
) -> Tensor:
    """memory `(N, P, D)`, queries `(M, D)`, mask `(N, P)` → logits `(N, M)`, streamed.

    form: "auto" (by the cost model), "kv" or "folded" (both exact; tests exercise each).
    """
    (out,) = _apply(w, cfg, (memory, queries), [(0, 1, memory_mask)], training,
                    chunk_budget_bytes, form)  # fmt: skip
    return out


def chunked_both_directions(
    w: AlignerWeights,
    cfg: AlignerConfig,
    img_tokens: Tensor,
    txt_tokens: Tensor,
    img_mask: Tensor | None,
    txt_mask: Tensor | None,
    training: bool,
    chunk_budget_bytes: int | None = None,
    form: str = "auto",
) -> tuple[Tensor, Tensor]:
    """CARZero's two directions in one autograd node, globals taken from row 0:
    img `(N, Pi, D)`, txt `(M, Pt, D)` → (i2t `(N, M)`, t2i `(M, N)`)."""
    i2t, t2i = _apply(w, cfg, (img_tokens, txt_tokens), [(0, 1, img_mask), (1, 0, txt_mask)],
                      training, chunk_budget_bytes, form)  # fmt: skip
    return i2t, t2i
