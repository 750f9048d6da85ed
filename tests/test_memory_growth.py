"""The chunked backend's peak memory does not grow with N·M·D: at one chunk shape, more pairs
add only what is per pair in the outputs (the logits, and in training their gradients), per
query (the query stage) and per item (the inputs' gradients).

The per-pair attention state is as large as a D-wide row here (H·P ≥ D, as at CARZero dims,
4 × 197 > 768), so that keeping any per-pair tensor for every pair (the features before the
head, every layer's attention probabilities) shows up as growth; `tests/test_training.py`'s
check (H·P = 12 ≪ D = 128, growth allowed up to a third of an N·M·D tensor) lets attention
probabilities kept for all pairs pass.

Sizes are small and chunks as large as the fixed shape allows: the tracker costs a Python
call per op, and a training chunk is hundreds of ops.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_aligner

import carzero_fast as cf
from carzero_fast.backends.chunked import chunked_both_directions, chunked_forward
from carzero_fast.backends.plan import ChunkPlan, plan_chunks, use_folded_form
from carzero_fast.memory import track_memory

CFG = cf.AlignerConfig(d_model=64, n_heads=4, n_layers=2, d_ffn=64, head_dims=(32, 16),
                       dropout=0.0)  # fmt: skip
P = 17  # tokens an item, both modalities: H·P = 68 ≥ D
D = CFG.d_model
ITEMSIZE = 4  # fp32


@pytest.fixture(autouse=True)
def _one_thread():
    """One CPU thread: what is measured is bytes, not time, and a chunk is hundreds of small
    ops. On the 2-core CPU with other work running, two threads' parallel regions cost
    milliseconds each (a training step here: 98 s on 2 threads, 0.8 s on 1). The CPU item
    granule (the thread count) is 1 then, so chunks are exactly the plan's shape."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _budget_for(want: ChunkPlan, n: int, m: int, training: bool) -> int:
    """The smallest chunk budget whose plan for n items × m queries is `want`: sizes that
    are multiples of its items and queries then run chunks of exactly that shape."""
    budget = 2**10
    while budget < 2**26:
        plan = plan_chunks(CFG, n, m, P, ITEMSIZE, budget, training, want.folded)
        if plan == want:
            return budget
        if plan.queries > want.queries or plan.queries == want.queries and plan.items > want.items:
            break  # queries grow with the budget, then items
        budget += budget // 64
    raise AssertionError(f"no budget plans {want} for {n} × {m}")


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, P, D, generator=torch.Generator().manual_seed(seed))


# -- without gradients: N items grow 16 → 64 (whole item blocks), M queries stay ------------

N_SMALL, N_LARGE, M = 16, 64, 32
FWD_PLAN_ITEMS = 8  # a divisor of both sizes


@pytest.mark.parametrize("form", ["kv", "folded"])
def test_forward_peak_grows_with_the_logits_only(form):
    """One call's peak grows by the logits (N·M) alone: the chunk shape, the query stage and
    everything per item block stay; a per-pair tensor kept for all pairs would add
    N·M·(its width)."""
    al = make_aligner(CFG, seed=3)
    plan = ChunkPlan(FWD_PLAN_ITEMS, M, form == "folded")
    budget = _budget_for(plan, N_SMALL, M, training=False)
    assert plan_chunks(CFG, N_LARGE, M, P, ITEMSIZE, budget, False, plan.folded) == plan
    queries = _tokens(M, 0)[:, 0]

    def peak(n: int) -> int:
        memory = _tokens(n, n)
        with torch.no_grad(), track_memory() as tracker:
            chunked_forward(al.weights(), CFG, memory, queries, None, False, budget, form)
        return tracker.peak_bytes

    growth = peak(N_LARGE) - peak(N_SMALL)
    logits = (N_LARGE - N_SMALL) * M * ITEMSIZE
    features = logits * D  # what keeping one D-wide row a pair would add
    assert growth <= logits + 1024, (growth, logits, features)


def test_zero_shot_peak_grows_with_the_logits_and_queries_only():
    """Both directions in eval mode (`zero_shot_scores`): N images grow, M prompts stay, so
    images are items one way and queries the other. The peak grows by the logits of both
    directions, their sum and mean (N·M each), and by the image-side query stage (LN0 of the
    globals and layer 1's query, N·D each), nothing a pair beyond the logits."""
    al = make_aligner(CFG, seed=4)
    assert not any(use_folded_form(CFG, m, P) for m in (N_SMALL, N_LARGE, M))  # "kv" always
    q = 16  # queries a chunk: fixed while the images (queries of t2i) grow
    al.chunk_budget_bytes = _budget_for(ChunkPlan(1, q, False), M, N_SMALL, training=False)
    for n, m in ((N_SMALL, M), (M, N_SMALL), (N_LARGE, M), (M, N_LARGE)):
        got = plan_chunks(CFG, n, m, P, ITEMSIZE, al.chunk_budget_bytes, False, False)
        assert got == ChunkPlan(1, q, False), (n, m, got)
    prompts = _tokens(M, 0)

    def peak(n: int) -> int:
        images = _tokens(n, n)
        with torch.no_grad(), track_memory() as tracker:
            cf.zero_shot_scores(al, images, prompts, backend="chunked")
        return tracker.peak_bytes

    growth = peak(N_LARGE) - peak(N_SMALL)
    logits = (N_LARGE - N_SMALL) * M * ITEMSIZE
    query_stage = 2 * (N_LARGE - N_SMALL) * D * ITEMSIZE
    assert growth <= 4 * logits + query_stage + 1024, (growth, logits, query_stage)


# -- training: N = M (CARZero's loss is square) grow 16 → 24 -------------------------------

B_SMALL, B_LARGE = 16, 24
TRAIN_QUERIES = 8  # a divisor of both sizes; a chunk is 1 item × 8 queries at both


@pytest.mark.parametrize("form", ["auto", "folded"])
def test_training_peak_grows_by_a_few_floats_a_pair(form):
    """A training step, both directions and CARZero's loss. Beyond the inputs' gradients
    (N·P·D each) and the query stages (N·D rows and their gradients), the peak grows by a few
    floats a pair: the logits, their gradients and the loss's softmaxes. Keeping one D-wide
    row a pair would add 64 floats, every layer's attention probabilities L·H·P = 136 a
    direction."""
    al = make_aligner(CFG, seed=5).train()
    folded = form == "folded"
    if not folded:  # the cost model picks "kv" at both sizes
        assert not use_folded_form(CFG, B_SMALL, P) and not use_folded_form(CFG, B_LARGE, P)
    plan = ChunkPlan(1, TRAIN_QUERIES, folded)
    budget = _budget_for(plan, B_SMALL, B_SMALL, training=True)
    assert plan_chunks(CFG, B_LARGE, B_LARGE, P, ITEMSIZE, budget, True, folded) == plan

    def peak(n: int) -> int:
        img, txt = _tokens(n, n).requires_grad_(True), _tokens(n, n + 1).requires_grad_(True)
        al.zero_grad(set_to_none=True)
        with track_memory() as tracker:
            if folded:
                i2t, t2i = chunked_both_directions(al.weights(), CFG, img, txt, None, None,
                                                   True, budget, form)  # fmt: skip
            else:
                al.chunk_budget_bytes = budget
                i2t, t2i = cf.alignment_logits(al, img, txt, backend="chunked")
            cf.carzero_loss(i2t, t2i).backward()
        return tracker.peak_bytes

    growth = peak(B_LARGE) - peak(B_SMALL)
    rows = B_LARGE - B_SMALL
    input_grads = 2 * rows * P * D * ITEMSIZE
    # per direction: LN0 of the globals and layer 1's query (folded: also its H heads in
    # token space), each with its gradient
    query_stages = 2 * 2 * (2 + (CFG.n_heads if folded else 0)) * rows * D * ITEMSIZE
    pairs = B_LARGE**2 - B_SMALL**2
    per_pair = (growth - input_grads - query_stages) / pairs
    assert per_pair <= 12 * ITEMSIZE, (growth, input_grads, query_stages, per_pair)


# -- the plan against its budget: a chunk of the planned shape holds no more than the budget --

BUDGET = 2**20


@pytest.mark.parametrize("training", [False, True], ids=["no_grad", "training"])
@pytest.mark.parametrize("form", ["kv", "folded"])
@pytest.mark.parametrize("bound", ["queries", "items"])
def test_a_planned_chunk_stays_within_its_budget(training, form, bound):
    """`plan_chunks` promises that no planned chunk exceeds the budget (above the one-item,
    one-query minimum): one chunk of exactly the planned shape, run with the dropout masks of
    training mode on, peaks within it. `bound`: the queries' half of the budget binds (as
    many queries as the plan takes, one item), or the items do (8 queries, the items that
    fit). A plan that let the queries take the whole budget, left the attention state or the
    dropout masks out of its per-pair bytes, went over (1.05–1.6× the budget); the shipped
    plan uses 0.58–0.97 of it."""
    cfg = cf.AlignerConfig(d_model=64, n_heads=4, n_layers=2, d_ffn=64, head_dims=(32, 16),
                           dropout=0.1)  # fmt: skip
    folded = form == "folded"
    plan = plan_chunks(cfg, 10**6, 10**6 if bound == "queries" else 8, P, ITEMSIZE, BUDGET,
                       training, folded)  # fmt: skip
    assert plan.items > 1 or plan.queries > 8  # above the minimum chunk
    al = make_aligner(cfg, seed=3).train(training)
    mem = _tokens(plan.items, 0).requires_grad_(training)
    q = _tokens(plan.queries, 1)[:, 0].requires_grad_(training)
    with track_memory() as tracker:
        if training:
            chunked_forward(al.weights(), cfg, mem, q, None, True, BUDGET, form).sum().backward()
        else:
            with torch.no_grad():
                chunked_forward(al.weights(), cfg, mem, q, None, False, BUDGET, form)
    assert tracker.peak_bytes <= BUDGET, (plan, tracker.peak_bytes / BUDGET)
    assert tracker.peak_bytes >= BUDGET // 2, (plan, tracker.peak_bytes / BUDGET)  # not idle


def test_dropout_masks_are_planned_in_training_only():
    """Training with dropout saves int16 masks a pair for the backward: fewer pairs fit a
    budget than without dropout; without autograd no mask is kept and the plan is the same."""
    drop = cf.AlignerConfig(d_model=64, n_heads=4, n_layers=2, d_ffn=64, head_dims=(32, 16),
                            dropout=0.1)  # fmt: skip
    for folded in (False, True):

        def pairs(cfg: cf.AlignerConfig, training: bool, folded: bool = folded) -> int:
            plan = plan_chunks(cfg, 10**6, 10**6, P, ITEMSIZE, BUDGET, training, folded)
            return plan.items * plan.queries

        assert pairs(drop, True) < pairs(CFG, True)
        assert pairs(drop, False) == pairs(CFG, False)
