"""Cost model and chunk planning of the streaming executor (DESIGN.md §2–3)."""

from __future__ import annotations

import numbers
from typing import NamedTuple

from ..config import AlignerConfig

# Defaults when the caller gives no budget. Training chunks are larger: their weight-gradient
# GEMMs have the chunk's pairs as inner dimension, and small chunks starve them (a B = 48
# step on the 2-core CPU: 6.23 s at 80 MiB, 5.88 s at 120, 5.62 s at 144; BENCHMARKS.md).
DEFAULT_CHUNK_BUDGET_BYTES = 32 * 2**20
DEFAULT_TRAIN_CHUNK_BUDGET_BYTES = 120 * 2**20
# On a GPU each chunk costs ~200 launches of host time whatever its size: with the CPU
# defaults an H200 training step at N = M = 256 spent 33× the reference's time waiting on the
# host (BENCHMARKS.md), so CUDA chunks are large.
DEFAULT_CUDA_CHUNK_BUDGET_BYTES = 512 * 2**20
DEFAULT_CUDA_TRAIN_CHUNK_BUDGET_BYTES = 2**30


def default_budget(device_type: str, training: bool) -> int:
    """The chunk budget (bytes) used when the caller gives none."""
    if device_type == "cuda":
        if training:
            return DEFAULT_CUDA_TRAIN_CHUNK_BUDGET_BYTES
        return DEFAULT_CUDA_CHUNK_BUDGET_BYTES
    return DEFAULT_TRAIN_CHUNK_BUDGET_BYTES if training else DEFAULT_CHUNK_BUDGET_BYTES


class ChunkPlan(NamedTuple):
    items: int  # memory items per chunk
    queries: int  # queries per chunk
    folded: bool  # attention form (see `use_folded_form`)


def plan_chunks(
    cfg: AlignerConfig,
    n: int,
    m: int,
    p: int,
    itemsize: int,
    budget: int,
    training: bool,
    folded: bool,
) -> ChunkPlan:
    """Chunk shape from a memory budget (bytes), never from N·M: the queries first (half of
    what one item leaves, at most), then as many items as fit.

    A chunk's working set is `fixed + items·per_item + items·queries·per_pair`, counted from
    what the chunked backend holds at its peak. Measured with `memory.track_memory` (CARZero
    dims and H·P ≫ D, fp32 and bf16, with and without dropout), a training chunk's pairs held
    0.7–0.95 of `per_pair`, and planned chunks 0.3–0.9 of their budget in training, up to
    0.97 without autograd (H·P ≫ D, many items):

    - without autograd, a pair holds a few D-wide rows, one FFN row, the head's widest row and
      the attention state alive at once: "kv" runs all heads in one SDPA (scores and
      probabilities, 2·H·P, where it cannot fuse them), folded one head at a time (scores,
      probabilities, weighted tokens). An item holds its normalised tokens, and in the "kv"
      form every layer's K and V.
    - in training, autograd keeps every layer's rows for the chunk's backward, with the
      attention state of every head ("kv": the probabilities and their dropped copy, H·P
      each; folded: a head's query in token space, its weighted tokens and probabilities),
      and the int16 dropout masks when `cfg.dropout` > 0; then one layer's attention backward
      runs at a time (folded: its operands stacked over the heads) or the head's backward.
      An item also holds gradients: its tokens' gradient accumulating over the chunks
      ("kv": every layer's K/V gradients, then their slices' and projection's gradients
      when the block sends them back: 4·L + 8 token tensors at the peak, measured).
      `fixed`: one weight-sized gradient returned to autograd at a time.

    A chunk holds at least one item and one query, so a budget below `fixed + per_item +
    per_pair` is exceeded by that one chunk: at CARZero dims, fp32, P = 197, below 0.6 MiB
    (folded) / 5.2 MiB ("kv") without autograd, 5.6 / 17 MiB in training. Above that no
    planned chunk exceeds the budget.
    """
    d, f, h, layers = cfg.d_model, cfg.d_ffn, cfg.n_heads, cfg.n_layers
    tokens = p * d  # one item's normalised tokens
    if training:
        rows = 6 * d + f  # per layer: residual in/mid, LN outputs, Q, attention output, FFN hidden
        if folded:
            attn = h * (2 * d + p)  # per layer and head: q in token space, weighted tokens, p_h
            # one layer's backward: stacked [ds_h, a_h] and [qk_h, dc_h] (2·H·(P + D)), the
            # queries' gradients (H·D), one head's softmax backward (3·P)
            attn_grad = 2 * h * (d + p) + h * d + 3 * p
            per_item = 4 * tokens  # tokens, their gradient, the backward's two addends
        else:
            attn = 2 * h * p  # all heads: probabilities and their dropped copy
            attn_grad = 3 * h * p
            # every layer's K/V and their gradients, then the slices' and the projection's
            # gradients in the item's backward (measured: 4·L + 8 token tensors)
            per_item = (4 * layers + 8) * tokens
        head = 2 * d + sum(cfg.head_dims) + 2 * max(cfg.head_dims)
        per_pair = (layers * (rows + attn) + max(attn_grad, head)) * itemsize
        if cfg.dropout > 0.0:  # int16 masks saved for the backward
            per_pair += 2 * (layers * (h * p + 2 * d) + d)
        fixed = d * max(d, f, cfg.head_dims[0]) * itemsize
    else:
        attn = 2 * d + 2 * p if folded else 2 * h * p
        per_pair = (5 * d + f + max(cfg.head_dims) + attn) * itemsize
        per_item = (1 if folded else 2 * layers + 1) * tokens
        fixed = 0
    per_item = (per_item + 2 * p) * itemsize  # + LN0's statistics (mean, 1/std a token)
    # one item is the least a chunk holds: reserved before the queries take their half
    queries = max(1, min(m, (budget - fixed - per_item) // (2 * per_pair)))
    items = max(1, min(n, (budget - fixed) // (queries * per_pair + per_item)))
    return ChunkPlan(items, queries, folded)


def use_folded_form(cfg: AlignerConfig, queries_per_item: int, n_tokens: int) -> bool:
    """Cost model: fold the K/V projections into the queries when that needs fewer FLOPs.

    Per item and layer, "kv" costs 4·P·D² + m·4·P·D, "folded" m·(4·D² + 4·H·P·D).
    """
    d, h, p = cfg.d_model, cfg.n_heads, n_tokens
    return queries_per_item * (d + (h - 1) * p) < p * d


def executed_flops(cfg: AlignerConfig, n: int, m: int, n_tokens: int, folded: bool) -> int:
    """FLOPs this backend's forward executes for n items × m queries (GEMMs only; compare
    `AlignerConfig.flops_per_pair`, the original's count). Layer 1's query work is per query."""
    d, h, p, f = cfg.d_model, cfg.n_heads, n_tokens, cfg.d_ffn
    widths = (d, *cfg.head_dims, 1)
    head = sum(2 * a * b for a, b in zip(widths[:-1], widths[1:], strict=True))
    proj = 2 * d * d  # one D×D projection of one row
    if folded:
        attn = 4 * h * p * d + 2 * proj  # scores, weighted tokens, Wv, Wo
        pair = attn + 4 * d * f + (cfg.n_layers - 1) * (attn + 2 * proj + 4 * d * f) + head
        return n * m * pair + m * 2 * proj
    attn = 4 * p * d + proj  # q·Kᵀ, softmax·V, Wo
    pair = attn + 4 * d * f + (cfg.n_layers - 1) * (attn + proj + 4 * d * f) + head
    return n * m * pair + m * proj + n * cfg.kv_flops_per_item(p)


def pieces(total: int, step: int, granule: int = 1) -> list[tuple[int, int]]:
    """[0, total) in pieces of at most `step`, of near-equal size (48 items at step 9 → 6 × 8,
    not 5 × 9 + 3: no small tail chunk with small GEMMs), each a multiple of `granule` where
    `step` allows it (the last piece then takes what is left).

    The chunked backend's item loop takes the CPU thread count as granule: PyTorch's CPU
    `bmm` (the per-item attention products) splits its batch over the threads, so on 2
    threads an item block of 11 ran at 150 GFLOP/s where blocks of 10 or 12 ran at 170–180
    (BENCHMARKS.md)."""
    if step < granule:
        granule = 1
    units = -(-total // granule)
    count = -(-units // (step // granule))
    if count == 0:
        return []
    bounds = [min(total, i * units // count * granule) for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def widest_row(cfg: AlignerConfig) -> int:
    """The widest per-pair row the fused kernels index (elements)."""
    return max(2 * cfg.d_model, cfg.d_ffn, *cfg.head_dims)


def kv_width(cfg: AlignerConfig, p: int) -> int:
    """Elements per item of the widest per-item buffer: every layer's K/V of its P tokens."""
    return p * 2 * cfg.n_layers * cfg.d_model


# The kernels compute element offsets in int32: no buffer they index may hold 2^31 elements.
# Half that leaves room for the products of masked tail lanes (a block past the last row).
INDEX_LIMIT = 2**30
# The attention kernels launch one program per item along CUDA's grid z axis (≤ 65535).
MAX_ITEMS = 65535


def fit_plan(n: int, m: int, per_pair: int, per_item: int, budget: int, pair_width: int,
             item_width: int) -> tuple[int, int]:  # fmt: skip
    """The fused backends' (items, queries) per chunk: queries first (half the budget at
    most), then items; within the budget (bytes), and within the kernels' indexing: a chunk's
    pair buffers (items·queries rows of at most `pair_width` elements), an item block's
    buffers (`item_width` elements an item) and its rows of the `(N, M)` scores stay under
    `INDEX_LIMIT` elements."""
    if pair_width > INDEX_LIMIT or item_width > INDEX_LIMIT:
        raise ValueError(f"one pair row ({pair_width} elements) or one item's K/V "
                         f"({item_width}) exceeds the kernels' 32-bit indexing "
                         f"({INDEX_LIMIT} elements a buffer)")  # fmt: skip
    queries = max(1, min(m, budget // (2 * per_pair), INDEX_LIMIT // pair_width))
    items = min(n, budget // (queries * per_pair + per_item), MAX_ITEMS,
                INDEX_LIMIT // (queries * pair_width), INDEX_LIMIT // item_width,
                INDEX_LIMIT // max(m, 1))  # fmt: skip
    return max(1, items), queries


def check_budget(chunk_budget_bytes: int | None, default: int) -> int:
    """The budget in bytes: `default` for None, else a positive integer (numpy's too), or an
    error naming the argument (a float is refused: 0.5 used to read as "got 0")."""
    if chunk_budget_bytes is None:
        return default
    value = chunk_budget_bytes
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"chunk_budget_bytes must be an integer number of bytes, got {value!r}")
    if value <= 0:
        raise ValueError(f"chunk_budget_bytes must be positive, got {value}")
    return int(value)
