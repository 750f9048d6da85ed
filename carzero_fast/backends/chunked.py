"""The `chunked` backend: all N×M pairs streamed through plain PyTorch ops in bounded chunks.

The stages (`chunked_stages.py`) split the work by what it depends on: per query, once; per
memory item, once per item block; per pair, one chunk `(items n0:n1) × (queries m0:m1)` at a
time. This executor runs them: only a chunk of pairs is alive at any moment, so memory is
O(chunk + N·M) (the logits), never O(N·M·D).

Training goes through `_ChunkedAlign`, an `autograd.Function` that saves the inputs only and
recomputes each chunk in backward; dropout masks come from a generator seeded per chunk, so
recomputation sees the same masks as the forward. The forward's last chunk keeps its graph
(it would be rebuilt first thing in backward anyway): the backward runs the chunks in reverse
and starts from it, one chunk fewer to recompute at no extra peak memory. One kept chunk at a
time: a call that keeps one lets go of an earlier call's that no backward has taken yet, with
the gradient buffers it made (several calls summed into one loss would otherwise hold a chunk
and a set of weight gradients each until the backward).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..config import AlignerConfig
from ..validation import check_first_order, raise_for_functorch
from ..weights import AlignerWeights
from .chunked_stages import Prepared, item_stage, pair_chunk_forward, prepare
from .cpu_gemm import fp32_products
from .dropout import Dropout
from .kept import mark_pending, release_pending, take_kept
from .plan import (
    ChunkPlan,
    check_budget,
    default_budget,
    executed_flops,
    pieces,
    plan_chunks,
    use_folded_form,
)

__all__ = ["ChunkPlan", "Dropout", "chunked_both_directions", "chunked_forward",
           "executed_flops", "last_chunk", "plan_chunks", "use_folded_form"]  # fmt: skip

# ---------------------------------------------------------------------------------------------
# Executor
# ---------------------------------------------------------------------------------------------


@torch.compiler.assume_constant_result
def _cpu_threads() -> int:
    # a constant to torch.compile (an int from a torch.* call would break its graph): a
    # compiled call keeps the thread count it was traced with, which moves only the item
    # blocks' bounds
    return torch.get_num_threads()


def _item_granule(device: torch.device) -> int:
    return _cpu_threads() if device.type == "cpu" else 1


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


class Job(NamedTuple):
    """One direction: the memory is `tokens[memory]`; the queries are `tokens[queries]` when
    that is `(M, D)`, else its row 0 (the globals, as CARZero feeds them). Its item blocks and
    query chunks are fixed when it is made: the backward recomputes exactly the forward's
    chunks (and their dropout masks, keyed by chunk) even if the thread count changed."""

    memory: int
    queries: int
    mask: Tensor | None
    plan: ChunkPlan
    seed: int | None  # dropout seed, None = no dropout
    blocks: list[tuple[int, int]]  # item bounds (n0, n1)
    chunks: list[tuple[int, int]]  # query bounds (m0, m1)


def _queries(tokens: tuple[Tensor, ...] | list[Tensor], job: Job) -> Tensor:
    src = tokens[job.queries]
    return src if src.dim() == 2 else src[:, 0]


class _Block(NamedTuple):
    """One item block ready for its pairs' chunks. Under autograd `item_in` are leaves that
    collect the gradients of all the block's chunks, sent back through `item` once."""

    n0: int
    n1: int
    mem: Tensor  # [n, P, D]: a leaf in backward
    item: list[Tensor]  # `item_stage` of mem
    item_in: list[Tensor]
    bias: Tensor | None  # [n, 1, P]


def _open_block(
    prep: Prepared, cfg: AlignerConfig, job: Job, memory: Tensor, n0: int, n1: int, grad: bool
) -> _Block:
    mem = memory[n0:n1]
    if grad:
        mem = mem.detach().requires_grad_(memory.requires_grad)
    item = item_stage(prep, cfg, mem, job.plan.folded)
    bias = _mask_bias(job.mask, n0, n1, memory.dtype)
    return _Block(n0, n1, mem, item, _leaves(item) if grad else item, bias)


def _chunk_logits(
    prep: Prepared, cfg: AlignerConfig, job: Job, training: bool, block: _Block, m0: int, m1: int
) -> Tensor:
    """Logits `(n, m1 - m0)` of one chunk; its dropout masks depend on (seed, n0, m0) only."""
    drop = Dropout(cfg.dropout if training else 0.0, job.seed, (block.n0, m0), block.mem.device)
    return pair_chunk_forward(prep, cfg, slice(m0, m1), block.item_in, job.plan.folded,
                              block.bias, drop)  # fmt: skip


def chunk_bounds(
    plan: ChunkPlan, n: int, m: int, device: torch.device
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The item blocks and query chunks of a job planned as `plan` over n items × m queries
    (CPU item blocks are multiples of the thread count, so that each thread gets whole items)."""
    return pieces(n, plan.items, _item_granule(device)), pieces(m, plan.queries)


def last_chunk(
    plan: ChunkPlan, n: int, m: int, device: torch.device
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Item and query bounds of the last chunk of a job planned as `plan` over n items × m
    queries: the chunk a training forward keeps for the backward."""
    blocks, chunks = chunk_bounds(plan, n, m, device)
    return blocks[-1], chunks[-1]


def _forward_chunks(
    prep: Prepared,
    cfg: AlignerConfig,
    job: Job,
    training: bool,
    memory: Tensor,
    out: Tensor,
    skip_last: bool = False,
) -> None:
    """Every chunk's logits into `out` `(N, M)`, no autograd (the last one skipped if asked:
    `_keep_last_chunk` runs it)."""
    blocks, chunks = job.blocks, job.chunks
    for n0, n1 in blocks:
        block = _open_block(prep, cfg, job, memory, n0, n1, grad=False)
        for m0, m1 in chunks:
            if not (skip_last and (n1, m1) == (blocks[-1][1], chunks[-1][1])):
                out[n0:n1, m0:m1] = _chunk_logits(prep, cfg, job, training, block, m0, m1)


class _Direction(NamedTuple):
    """One job's query stage under autograd: `prep_in` (leaves) collects the gradients of all
    its chunks, sent back through `prep` and into `q_leaf` once."""

    q_leaf: Tensor
    prep: Prepared
    prep_in: Prepared


def _open_direction(
    w: AlignerWeights, cfg: AlignerConfig, tokens: list[Tensor], job: Job, need_q: bool
) -> _Direction:
    q_leaf = _queries(tokens, job).detach().requires_grad_(need_q)
    prep = prepare(w, cfg, q_leaf, job.plan.folded)
    return _Direction(q_leaf, prep, _leaves(prep))


class _KeptChunk(NamedTuple):
    """The forward's last chunk with its autograd graph: the backward starts with it instead
    of recomputing it. It is alive at the end of the forward, where the backward would build
    it anyway, so the peak does not move."""

    block: _Block
    logits: Tensor  # [n, m] with its graph


class _Kept(NamedTuple):
    """What the forward leaves to the backward beside its inputs."""

    tokens: list[Tensor]  # the leaves of `_grad_leaves`, gradient buffers attached
    flat: list[Tensor]
    direction: _Direction  # of the last job
    chunk: list[_KeptChunk]  # its last chunk; emptied by the backward that takes it


def _grad_leaves(
    tokens: tuple[Tensor, ...],
    flat: tuple[Tensor, ...],
    needs_tokens: tuple[bool, ...],
    needs_flat: tuple[bool, ...],
) -> tuple[list[Tensor], list[Tensor]]:
    """Detached (not copied) tokens and weights; only what needs a gradient is differentiated
    (a frozen aligner costs no dW). Each weight gets one gradient buffer: both directions and
    every piece (split, slice) accumulate into it."""
    tokens_leaf = [t.detach().requires_grad_(need)
                   for t, need in zip(tokens, needs_tokens, strict=True)]  # fmt: skip
    flat_leaf = []
    for t, need in zip(flat, needs_flat, strict=True):
        leaf = t.detach()
        if need:
            grad = torch.zeros_like(leaf)
            if grad.stride() != leaf.stride():
                # not dense (a parametrization's slice or expand): the buffer is dense, and
                # the pieces index it with their leaf's strides, so the leaf is made dense too
                leaf = leaf.contiguous()
            leaf.requires_grad_(True)
            leaf.grad = grad
        flat_leaf.append(leaf)
    return tokens_leaf, flat_leaf


def _keep_last_chunk(ctx, cfg, job, training, tokens, flat, out) -> _Kept:  # noqa: ANN001
    """Run the last chunk of `job` under autograd, its logits into `out`; keep its graph."""
    needs = ctx.needs_input_grad[5:]  # after (cfg, jobs, training, keep, n_tokens)
    needs_tokens, needs_flat = needs[: len(tokens)], needs[len(tokens) :]
    with torch.enable_grad():
        tokens_leaf, flat_leaf = _grad_leaves(tokens, flat, needs_tokens, needs_flat)
        w = AlignerWeights.unflatten(flat_leaf, cfg.n_layers)
        direction = _open_direction(w, cfg, tokens_leaf, job, needs_tokens[job.queries])
        memory = tokens_leaf[job.memory]
        (n0, n1), (m0, m1) = job.blocks[-1], job.chunks[-1]
        block = _open_block(direction.prep_in, cfg, job, memory, n0, n1, grad=True)
        s = _chunk_logits(direction.prep_in, cfg, job, training, block, m0, m1)
    out[n0:n1, m0:m1] = s.detach()
    return _Kept(tokens_leaf, flat_leaf, direction, [_KeptChunk(block, s)])


def _backward_chunks(
    prep: Prepared,
    cfg: AlignerConfig,
    job: Job,
    training: bool,
    memory: Tensor,
    g_mem: Tensor | None,
    g_out: Tensor,
    kept: list[_KeptChunk],
) -> None:
    """Recompute and back-propagate every chunk, last first: where the forward ended, so that
    the chunk it kept (popped from `kept`, when there) is the first and is not recomputed.
    Memory's gradient is added into `g_mem`."""
    blocks, chunks = job.blocks, job.chunks
    first = kept.pop() if kept else None
    for n0, n1 in reversed(blocks):
        if first is not None:
            block = first.block
        else:
            block = _open_block(prep, cfg, job, memory, n0, n1, grad=True)
        for m0, m1 in reversed(chunks):
            if first is not None:
                s, first = first.logits, None
            else:
                s = _chunk_logits(prep, cfg, job, training, block, m0, m1)
            torch.autograd.backward(s, g_out[n0:n1, m0:m1])
            s = None  # its graph (and what its nodes hold outside saved tensors) let go of now
        _backward_tree(block.item, block.item_in)
        if block.mem.grad is not None:
            g_mem[n0:n1] += block.mem.grad
        block = None  # freed before the next block is built


class _ChunkedAlign(torch.autograd.Function):
    """Forward saves only inputs; backward recomputes chunk by chunk (no per-pair activations).

    Several directions over the same tokens (i2t and t2i of a training step) run in one node,
    so the weights' gradient is accumulated once, and the global rows' gradients land in the
    token gradients directly. With `keep` (a backward will follow), the forward's last chunk
    keeps its graph (`_KeptChunk`) and the backward runs the jobs and chunks in reverse,
    starting from it.
    """

    @staticmethod
    def forward(ctx, cfg, jobs, training, keep, n_tokens, *tensors):  # noqa: ANN001
        tokens, flat = tensors[:n_tokens], tensors[n_tokens:]
        w = AlignerWeights.unflatten(flat, cfg.n_layers)
        outs = []
        ctx.kept = None
        for i, job in enumerate(jobs):
            memory, queries = tokens[job.memory], _queries(tokens, job)
            out = memory.new_empty((memory.shape[0], queries.shape[0]))
            last = keep and i == len(jobs) - 1
            _forward_chunks(prepare(w, cfg, queries, job.plan.folded), cfg, job, training,
                            memory, out, skip_last=last)  # fmt: skip
            if last:  # (the no-grad query stage is freed by now)
                release_pending()
                ctx.kept = _keep_last_chunk(ctx, cfg, job, training, tokens, flat, out)
                mark_pending(ctx)
            outs.append(out)
        ctx.save_for_backward(*tensors)
        ctx.cfg, ctx.jobs, ctx.training, ctx.n_tokens = cfg, jobs, training, n_tokens
        # An output the loss does not use gets None, not zeros: its job is skipped in backward.
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    @torch.compiler.disable  # runs eagerly inside a compiled training step's backward
    def backward(ctx, *g_outs):  # noqa: ANN001
        check_first_order("chunked", "reference")
        saved = ctx.saved_tensors
        cfg, n_jobs = ctx.cfg, len(ctx.jobs)
        needs = ctx.needs_input_grad[5:]  # after (cfg, jobs, training, keep, n_tokens)
        needs_tokens = needs[: ctx.n_tokens]
        kept = take_kept(ctx)
        if kept is not None:  # taken apart: each piece is let go of as soon as it is used
            tokens, flat_leaf = kept.tokens, kept.flat
            kept = [(kept.direction, kept.chunk)]  # the last job's
        else:
            tokens, flat_leaf = _grad_leaves(saved[: ctx.n_tokens], saved[ctx.n_tokens :],
                                             needs_tokens, needs[ctx.n_tokens :])  # fmt: skip
            kept = []
        g_tokens = [torch.zeros_like(t) if need else None
                    for t, need in zip(tokens, needs_tokens, strict=True)]  # fmt: skip
        # The recomputation runs in the forward's dtypes, also when backward() is called
        # inside an autocast region.
        no_autocast = torch.autocast(tokens[0].device.type, enabled=False)
        with torch.enable_grad(), no_autocast:
            w = AlignerWeights.unflatten(flat_leaf, cfg.n_layers)
            for i in reversed(range(n_jobs)):  # the kept chunk is the last job's
                job, g_out = ctx.jobs[i], g_outs[i]
                direction, kept_chunk = kept.pop() if kept else (None, [])
                if g_out is None:
                    continue
                if direction is None:
                    direction = _open_direction(w, cfg, tokens, job, needs_tokens[job.queries])
                _backward_chunks(direction.prep_in, cfg, job, ctx.training, tokens[job.memory],
                                 g_tokens[job.memory], g_out, kept_chunk)  # fmt: skip
                _backward_tree(direction.prep, direction.prep_in)
                g_q, q_leaf = g_tokens[job.queries], direction.q_leaf
                if q_leaf.grad is not None:
                    (g_q if g_q.dim() == 2 else g_q[:, 0]).add_(q_leaf.grad)
                direction = q_leaf = None  # freed before the next job
        # Drop the leaves' references so that autograd can take the gradients without a copy.
        grads = [t.grad for t in flat_leaf]
        for t in flat_leaf:
            t.grad = None
        return (None, None, None, None, None, *g_tokens, *grads)


def _check_form(form: str) -> None:
    if form not in ("auto", "kv", "folded"):
        raise ValueError(f"unknown attention form {form!r}; choose auto, kv or folded")


def _budget(chunk_budget_bytes: int | None, grad: bool, device_type: str) -> int:
    return check_budget(chunk_budget_bytes, default_budget(device_type, grad))


def _make_job(cfg, tokens, mem_i, q_i, mask, training, budget, form, grad) -> Job:  # noqa: ANN001
    memory = tokens[mem_i]
    n, p, _ = memory.shape
    m = tokens[q_i].shape[0]
    folded = use_folded_form(cfg, m, p) if form == "auto" else form == "folded"
    # 16-bit products computed in fp32 (`cpu_gemm.fp32_products`) hold fp32 operand copies
    itemsize = 4 if fp32_products(memory) else memory.element_size()
    plan = plan_chunks(cfg, n, m, p, itemsize, budget, grad, folded)
    seed = _draw_seed() if training and cfg.dropout > 0.0 else None
    return Job(mem_i, q_i, mask, plan, seed, *chunk_bounds(plan, n, m, memory.device))


@torch.compiler.disable  # a host integer: a graph break under torch.compile either way
def _draw_seed() -> int:
    """From torch's default CPU generator: reproducible under torch.manual_seed, no sync."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def _apply(w, cfg, tokens, pairs, training, chunk_budget_bytes, form) -> tuple[Tensor, ...]:  # noqa: ANN001
    """Run the jobs `pairs` = [(memory index, queries index, mask), ...] over `tokens`."""
    _check_form(form)
    flat = w.flatten()
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*tokens, *flat))
    # Dropout masks are drawn per chunk: a train-mode call plans as a training step does, with
    # or without autograd, so that the same seed gives the same masks (a reentrant checkpoint
    # runs its forward under no_grad and its recomputation with gradients).
    plan_grad = grad or (training and cfg.dropout > 0.0)
    budget = _budget(chunk_budget_bytes, plan_grad, tokens[0].device.type)
    jobs = [_make_job(cfg, tokens, mi, qi, mask, training, budget, form, plan_grad)
            for mi, qi, mask in pairs]  # fmt: skip
    if any(tokens[j.memory].shape[0] == 0 or tokens[j.queries].shape[0] == 0 for j in jobs):
        # Empty batches: zeros connected to every input and weight (no chunk to run), so a
        # backward reaches the parameters: DDP on a rank with no pairs still joins the
        # gradient all-reduce, and a frozen-feature caller still gets a graph.
        anchor = sum(0.0 * t.sum() for t in (*tokens, *flat))
        return tuple(
            tokens[j.memory].new_zeros((tokens[j.memory].shape[0], tokens[j.queries].shape[0]))
            + anchor
            for j in jobs
        )
    args = (cfg, jobs, training, grad, len(tokens), *tokens, *flat)
    if grad:
        return _apply_with_autograd(*args)
    try:
        return _ChunkedAlign.apply(*args)
    except RuntimeError as e:
        raise_for_functorch(e, "chunked")
        raise


@torch.compiler.disable
def _apply_with_autograd(*args: object) -> tuple[Tensor, ...]:
    """`_ChunkedAlign.apply` outside torch.compile's tracing (a graph break): its forward
    attaches gradient buffers to views of weights and its backward recomputes under autograd,
    which dynamo cannot trace. Calls without gradients stay traceable."""
    try:
        return _ChunkedAlign.apply(*args)
    except RuntimeError as e:
        raise_for_functorch(e, "chunked")
        raise


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
