"""Training on the `triton` backend: a recomputing `autograd.Function` over the fused kernels.

Forward: `triton_forward` per direction; the node saves the inputs only (tokens, weights).
Backward, per direction (DESIGN.md §3, "backward recomputes"):

- the query stage (`x0 = LN0(q)`, layer 1's Q) runs under PyTorch autograd once; its outputs'
  gradients are summed over every chunk and sent back through it at the end;
- per block of memory items: LN0(memory) and every layer's K/V (kernels), and an fp32 dK/dV
  accumulator for the block;
- per chunk of pairs (`fused_chunk.py`): the forward again (`pair_layers`, now one buffer
  set per layer and the softmax log-sum-exp kept), then back through the head,
  decoder_norm and the layers in reverse: `layer_norm_backward` for every residual add +
  LayerNorm (with 16-bit GEMMs or dropout it also writes the residual branch's dy in the
  GEMM dtype, through the branch's dropout mask in training mode, and that linear layer's
  bias gradient: no cast, mask pass or row reduction apart), `attention_backward` for the
  attention (dK/dV of an item's key block in one program, added into the block's
  accumulator; layer 1's shared queries get their per-pair dq summed over items), GEMMs for
  every linear layer, `relu_backward` for each ReLU (with the bias gradient of the layer
  before it);
- after a block's chunks: the K/V projection's and LN0's backward give the memory tokens'
  gradient.

Weight gradients accumulate in fp32, one `dW += dYᵀ·X` GEMM per linear layer and chunk (no
atomics); every reduction runs in a fixed order, so gradients are deterministic.
Memory: the inputs, the `(N, M)` logits and one chunk's activations (`plan_train`), never
O(N·M·D). Dropout (training mode) uses the counter-based masks of `philox.py` in every
kernel, so the recomputation sees the forward's masks; its backward reads the ReLU+dropout
masks from the saved (dropped) values and redraws the others (the residual branches' and
SimR's in `layer_norm_backward`, the attention weights' in its kernels).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import AlignerConfig
from ..validation import check_first_order, raise_for_functorch
from ..weights import AlignerWeights
from .fused import (
    CallPlan,
    LayerBuffers,
    call_plan,
    check_device,
    item_stage,
    kernel_mask,
    launch_device,
    query_stage,
    triton_forward,
)
from .fused_chunk import (
    Chunk,
    add_norm,
    chunk_backward,
    chunk_buffers,
    item_buffers,
    linear_backward,
    recompute,
)
from .kept import mark_pending, release_pending, take_kept
from .philox import ChunkPos, DropoutSpec
from .plan import check_budget, fit_plan, kv_width, pieces, widest_row

# Training chunks keep every layer's activations: ~75 KB a pair at CARZero dims in bf16, so
# 8 GiB holds ~115k pairs, a whole direction at N = M = 256 (65k pairs), which the forward
# then keeps: nothing is recomputed. On an H200 (BENCHMARKS.md, def1bc8) a step at
# N = M = 256 took 59.8 ms at 4 GiB and 50.0 at 8, peaking at 4.3 and 7.2 GiB; at 1024,
# 762 and 735 ms, peaking at 4.8 and 9.0 GiB. A smaller GPU gets an eighth of its memory.
DEFAULT_FUSED_TRAIN_BUDGET_BYTES = 8 * 2**30


def default_train_budget(device: torch.device) -> int:
    """The training chunk budget when the caller gives none: 8 GiB, at most 1/8 of a GPU."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return min(DEFAULT_FUSED_TRAIN_BUDGET_BYTES, total // 8)
    return DEFAULT_FUSED_TRAIN_BUDGET_BYTES


def plan_train(
    cfg: AlignerConfig, n: int, m: int, p: int, itemsize: int, budget: int
) -> tuple[int, int]:
    """(items per block, queries per chunk) of the backward for a memory budget in bytes."""
    d, f, n_layers, s = cfg.d_model, cfg.d_ffn, cfg.n_layers, itemsize
    widest = max(f, *cfg.head_dims)
    saved = n_layers * (8 * d + s * (4 * d + f) + 4 * cfg.n_heads) + s * sum(cfg.head_dims)
    per_pair = saved + s * d + 16 * d + 2 * s * widest  # + scratch and the gradients in flight
    per_item = p * (s * d + (s + 4) * 2 * n_layers * d + 4 * d)  # LN0, K/V, dK/dV, dmemory
    return fit_plan(n, m, per_pair, per_item, budget, widest_row(cfg), kv_width(cfg, p))


class _KeptChunk(NamedTuple):
    """The last chunk of a direction's backward plan, run by the forward as the backward runs
    it: the backward starts there (it walks its chunks in reverse) and reuses the buffers, so
    one chunk fewer is recomputed, its item block's K/V are not projected again, and the peak
    does not move."""

    n0: int
    m0: int
    chunk: Chunk  # views of the buffers below
    bufs: list[LayerBuffers]  # the backward's full-size chunk buffers
    head_bufs: list[Tensor]
    y_mem: Tensor  # the backward's item-block buffers, already holding block n0's LN0(memory)
    kv: Tensor  # ... and its K/V of every layer


def forward_keeping_last(
    w: AlignerWeights,
    cfg: AlignerConfig,
    memory: Tensor,
    queries: Tensor,
    mask: Tensor | None,
    budget: int,
    dropout: DropoutSpec | None = None,
) -> tuple[Tensor, _KeptChunk]:
    """`triton_forward`'s logits `(N, M)`, with the pairs of the backward plan's last chunk
    computed the backward's way and their activations kept."""
    from ..kernels import linear as linear_kernel

    n, p, d = memory.shape
    m = queries.shape[0]
    items, block_q = plan_train(cfg, n, m, p, memory.element_size(), budget)
    n0, m0 = pieces(n, items)[-1][0], pieces(m, block_q)[-1][0]  # as `direction_backward`
    ni, mc = n - n0, m - m0
    out = memory.new_empty((n, m))
    for rows, cols in ((slice(0, n0), slice(0, m)), (slice(n0, n), slice(0, m0))):
        if rows.start < rows.stop and cols.start < cols.stop:  # the pairs before that chunk
            mask_r = mask[rows] if mask is not None else None
            out[rows, cols] = triton_forward(w, cfg, memory[rows], queries[cols], mask_r, budget,
                                             dropout, torch.float32, rows.start,
                                             sdpa=False)  # fmt: skip
    linear = functools.partial(linear_kernel, descriptors={})
    cp = call_plan(w, cfg, *query_stage(w, cfg, queries))
    mem = memory[n0:].reshape(ni * p, d).contiguous()
    y_mem, kv = item_buffers(cfg, items, memory)
    kv_i = kv[: ni * p]
    item_stage(linear, w, cfg, cp, mem, y_mem[: ni * p], kv_i)
    mask_i = kernel_mask(mask[n0:] if mask is not None else None)
    bufs, head_bufs = chunk_buffers(cfg, items * block_q, memory.dtype, memory.device)
    drop = (dropout, ChunkPos(n0, m0, mc)) if dropout is not None else None
    r = ni * mc
    chunk = recompute(linear, w, cfg, cp, kv_i, mask_i, ni, slice(m0, m),
                       [b.rows(r) for b in bufs], [h[:r] for h in head_bufs], drop)  # fmt: skip
    out[n0:, m0:] = F.linear(chunk.head_in[-1], *cp.head[-1]).view(ni, mc)
    return out, _KeptChunk(n0, m0, chunk, bufs, head_bufs, y_mem, kv)


def direction_backward(
    w: AlignerWeights,
    grads: AlignerWeights | None,
    cfg: AlignerConfig,
    cp: CallPlan,
    memory: Tensor,
    mask: Tensor | None,
    g_out: Tensor,
    g_memory: Tensor | None,
    budget: int,
    dropout: DropoutSpec | None = None,
    kept: _KeptChunk | None = None,
) -> tuple[Tensor, Tensor]:
    """One direction's backward: g_out `(N, M)` → adds into `grads` (fp32) and `g_memory`
    `(N, P, D)`; returns the gradients of the query stage's outputs (g_x0, g_q1) `(M, D)`.

    Chunks run last first: `kept` (`forward_keeping_last`), when given, is the first and is
    not recomputed."""
    from ..kernels import layer_norm_backward
    from ..kernels import linear as linear_kernel

    linear = functools.partial(linear_kernel, descriptors={})
    n, p, d = memory.shape
    m = cp.x0.shape[0]
    items, block_q = plan_train(cfg, n, m, p, memory.element_size(), budget)
    if kept is not None:
        bufs, head_bufs, y_mem, kv = kept.bufs, kept.head_bufs, kept.y_mem, kept.kv
    else:
        bufs, head_bufs = chunk_buffers(cfg, items * block_q, memory.dtype, memory.device)
        y_mem, kv = item_buffers(cfg, items, memory)
    g_kv = torch.empty((items * p, 2 * cfg.n_layers * d), dtype=torch.float32,
                       device=memory.device)  # fmt: skip
    g_x0 = torch.zeros((m, d), dtype=torch.float32, device=memory.device)
    g_q1 = torch.zeros_like(g_x0)
    g_kv_w = torch.zeros(cp.kv_w.shape, dtype=torch.float32, device=memory.device)
    g_kv_b = torch.zeros(cp.kv_b.shape, dtype=torch.float32, device=memory.device)
    mask8 = kernel_mask(mask)
    g_out = g_out.float()
    # near-equal blocks and chunks (no small tail: the last one is the one the forward keeps)
    for n0, n1 in reversed(pieces(n, items)):
        ni = n1 - n0
        mem = memory[n0 : n0 + ni].reshape(ni * p, d)
        if mem.stride(-1) != 1:
            mem = mem.contiguous()
        y_i, kv_i, g_kv_i = y_mem[: ni * p], kv[: ni * p], g_kv[: ni * p]
        if kept is None or kept.n0 != n0:  # the kept chunk's block is projected already
            item_stage(linear, w, cfg, cp, mem, y_i, kv_i)
        g_kv_i.zero_()
        mask_i = mask8[n0 : n0 + ni] if mask8 is not None else None
        for m0, m1 in reversed(pieces(m, block_q)):
            mc = m1 - m0
            r, queries = ni * mc, slice(m0, m0 + mc)
            drop = (dropout, ChunkPos(n0, m0, mc)) if dropout is not None else None
            if kept is not None and (kept.n0, kept.m0) == (n0, m0):
                chunk, kept = kept.chunk, None
            else:
                chunk = recompute(linear, w, cfg, cp, kv_i, mask_i, ni, queries,
                                   [b.rows(r) for b in bufs], [h[:r] for h in head_bufs],
                                   drop)  # fmt: skip
            g_scores = g_out[n0 : n0 + ni, m0 : m0 + mc].reshape(r)
            chunk_backward(w, grads, cfg, cp, chunk, kv_i, mask_i, ni, queries, g_scores,
                            g_kv_i, g_x0, g_q1, drop)  # fmt: skip
        # kv = LN0(memory)·Wkvᵀ + bkv, then LN0's backward to the memory tokens
        g_w = g_kv_w if grads is not None else None
        dy_mem, _ = linear_backward(g_kv_i, y_i, cp.kv_w, g_w, g_kv_b)
        d_mem, dg, db, _ = layer_norm_backward(mem, w.norm0_w, dy_mem, cfg.layer_norm_eps)
        if g_memory is not None:
            g_memory[n0 : n0 + ni] += d_mem.view(ni, p, d)
        if grads is not None:
            add_norm(grads.norm0_w, grads.norm0_b, dg, db)
    if grads is not None:  # the stacked K/V projection back into each layer's in_proj
        for li, gl in enumerate(grads.layers):
            gl.in_proj_w[d:].add_(g_kv_w[2 * li * d : (2 * li + 2) * d])
            gl.in_proj_b[d:].add_(g_kv_b[2 * li * d : (2 * li + 2) * d])
    return g_x0, g_q1


class Job(NamedTuple):
    """One direction: memory `tokens[memory]`, queries `tokens[queries]` (row 0 if 3-D),
    and its dropout (training mode) or None."""

    memory: int
    queries: int
    mask: Tensor | None
    dropout: DropoutSpec | None = None


def _queries(tokens: tuple[Tensor, ...] | list[Tensor], job: Job) -> Tensor:
    src = tokens[job.queries]
    return src if src.dim() == 2 else src[:, 0]


class _TritonAlign(torch.autograd.Function):
    """Forward on the fused kernels saving only inputs; backward recomputes chunk by chunk.
    Both directions of a training step share one node (one set of weight accumulators).
    The last job's last backward chunk is the exception: the forward keeps its activations
    (`forward_keeping_last`) and the backward, running jobs and chunks in reverse, starts
    from it. One kept chunk at a time: a call lets go of an earlier call's that no backward
    has taken yet (calls summed into one loss would each hold up to a chunk budget)."""

    @staticmethod
    def forward(ctx, cfg, jobs, budget, n_tokens, *tensors):  # noqa: ANN001
        # An output the loss does not use gets None, not zeros: its job is skipped in backward.
        ctx.set_materialize_grads(False)
        with launch_device(tensors[0]):
            return _TritonAlign._forward(ctx, cfg, jobs, budget, n_tokens, *tensors)

    @staticmethod
    @torch.compiler.disable  # runs eagerly inside a compiled training step's backward
    def backward(ctx, *g_outs):  # noqa: ANN001
        check_first_order("triton", "reference")
        # Unpacked once: non-reentrant torch.utils.checkpoint refuses a second unpack.
        saved = ctx.saved_tensors
        # In the forward's dtypes, also when backward() is called inside an autocast region.
        no_autocast = torch.autocast(saved[0].device.type, enabled=False)
        with launch_device(saved[0]), no_autocast:
            return _TritonAlign._backward(ctx, saved, *g_outs)

    @staticmethod
    def _forward(ctx, cfg, jobs, budget, n_tokens, *tensors):  # noqa: ANN001
        tokens, flat = tensors[:n_tokens], tensors[n_tokens:]
        w = AlignerWeights.unflatten(flat, cfg.n_layers)
        outs = [
            triton_forward(w, cfg, tokens[j.memory], _queries(tokens, j), j.mask, budget,
                           j.dropout, torch.float32, sdpa=False)  # fmt: skip
            for j in jobs[:-1]
        ]
        j = jobs[-1]
        release_pending()  # one kept chunk at a time (kept.py)
        out, ctx.kept = forward_keeping_last(w, cfg, tokens[j.memory], _queries(tokens, j),
                                             j.mask, budget, j.dropout)  # fmt: skip
        mark_pending(ctx)
        outs.append(out)
        ctx.save_for_backward(*tensors)
        ctx.cfg, ctx.jobs, ctx.budget, ctx.n_tokens = cfg, jobs, budget, n_tokens
        return tuple(outs)

    @staticmethod
    def _backward(ctx, saved, *g_outs):  # noqa: ANN001
        cfg, n_tokens = ctx.cfg, ctx.n_tokens
        tokens, flat = saved[:n_tokens], saved[n_tokens:]
        needs = ctx.needs_input_grad[4:]  # after (cfg, jobs, budget, n_tokens)
        needs_tokens, needs_flat = needs[:n_tokens], needs[n_tokens:]
        need_w = any(needs_flat)
        g_tokens = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) if need else None
                    for t, need in zip(tokens, needs_tokens, strict=True)]  # fmt: skip
        g_flat = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in flat]
        grads = AlignerWeights.unflatten(g_flat, cfg.n_layers) if need_w else None
        leaves = [t.detach().requires_grad_(need) for t, need in zip(flat, needs_flat, strict=True)]
        w_leaf = AlignerWeights.unflatten(leaves, cfg.n_layers)
        w = AlignerWeights.unflatten(list(flat), cfg.n_layers)
        kept = take_kept(ctx)
        for i in reversed(range(len(ctx.jobs))):  # the kept chunk is the last job's
            job, g_out = ctx.jobs[i], g_outs[i]
            job_kept, kept = (kept if i == len(ctx.jobs) - 1 else None), None
            if g_out is None:
                continue
            q_in = _queries(tokens, job).detach().requires_grad_(needs_tokens[job.queries])
            with torch.enable_grad():  # the query stage, once, under autograd
                x0, q1 = query_stage(w_leaf, cfg, q_in)
            with torch.no_grad():
                cp = call_plan(w, cfg, x0, q1)
                g_x0, g_q1 = direction_backward(w, grads, cfg, cp, tokens[job.memory],
                                                job.mask, g_out, g_tokens[job.memory],
                                                ctx.budget, job.dropout, job_kept)  # fmt: skip
            job_kept = None  # its buffers were the backward's: freed with them
            # x0 needs no grad when decoder_norm and the queries are frozen, q1 still can
            # (layer 1's norm2 and the q rows of its in_proj)
            stage = [(t, g) for t, g in ((x0, g_x0), (q1, g_q1)) if t.requires_grad]
            if stage:
                torch.autograd.backward([t for t, _ in stage], [g.to(t.dtype) for t, g in stage])
            g_q = g_tokens[job.queries]
            if q_in.grad is not None:
                (g_q if g_q.dim() == 2 else g_q[:, 0]).add_(q_in.grad)
        out_flat = []
        for t, leaf, acc, need in zip(flat, leaves, g_flat, needs_flat, strict=True):
            if leaf.grad is not None:
                acc.add_(leaf.grad)
            out_flat.append(acc.to(t.dtype) if need else None)
        out_tokens = [g.to(t.dtype) if g is not None else None
                      for g, t in zip(g_tokens, tokens, strict=True)]  # fmt: skip
        return (None, None, None, None, *out_tokens, *out_flat)


@torch.compiler.disable  # see `_apply_with_autograd` in chunked.py
def triton_train(
    w: AlignerWeights,
    cfg: AlignerConfig,
    tokens: tuple[Tensor, ...],
    jobs: list[Job],
    chunk_budget_bytes: int | None = None,
) -> tuple[Tensor, ...]:
    """Differentiable logits of each job over `tokens` (with its dropout), one autograd node."""
    check_device(tokens[0])
    budget = check_budget(chunk_budget_bytes, default_train_budget(tokens[0].device))
    if any(tokens[j.memory].shape[0] == 0 or tokens[j.queries].shape[0] == 0 for j in jobs):
        anchor = sum(0.0 * t.sum() for t in (*tokens, *w.flatten()))  # empty, still connected
        return tuple(tokens[j.memory].new_zeros((tokens[j.memory].shape[0],
                                                 tokens[j.queries].shape[0])) + anchor
                     for j in jobs)  # fmt: skip
    w = w.contiguous()  # a parametrization may give strided weights (a copy node then)
    try:
        return _TritonAlign.apply(cfg, jobs, budget, len(tokens), *tokens, *w.flatten())
    except RuntimeError as e:
        raise_for_functorch(e, "triton")
        raise
