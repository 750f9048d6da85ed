"""The streaming `chunked` backend against the `reference` oracle at CARZero dims (D=768)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_aligner, random_mask, rel_err

import carzero_fast as cf
from carzero_fast.backends import plan
from carzero_fast.backends.chunked import (
    chunked_forward,
    executed_flops,
    plan_chunks,
    use_folded_form,
)


@pytest.fixture(scope="module")
def aligner():
    return make_aligner(cf.AlignerConfig(), seed=1)


def _inputs(n, m, p, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, 768, generator=g, dtype=dtype), torch.randn(
        m, 768, generator=g, dtype=dtype
    )


@pytest.mark.parametrize("form", ["kv", "folded"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("n", "m", "p"), [(1, 1, 1), (3, 17, 197), (17, 3, 97), (5, 1, 17)])
def test_fp32_matches_reference(aligner, form, masked, n, m, p):
    mem, q = _inputs(n, m, p)
    mask = random_mask(n, p, seed=n + m + p) if masked else None
    with torch.no_grad():
        ref = aligner(mem, q, mask, backend="reference")
        # a small budget forces several item blocks and query blocks
        for budget in (1, 64 * 2**20):
            out = chunked_forward(
                aligner.weights(), aligner.config, mem, q, mask, False, budget, form
            )
            assert out.shape == (n, m)
            assert rel_err(out, ref) < 1e-5


def test_auto_backend_and_module_budget(aligner):
    mem, q = _inputs(4, 5, 33)
    with torch.no_grad():
        ref = aligner(mem, q, backend="reference")
        assert rel_err(aligner(mem, q), ref) < 1e-5  # "auto" → chunked on CPU
        assert rel_err(aligner(mem, q, backend="chunked", chunk_budget_bytes=1), ref) < 1e-5


@pytest.mark.parametrize(("n", "m"), [(0, 3), (3, 0), (0, 0)])
def test_empty_batches_give_empty_results(aligner, n, m):
    mem, q = _inputs(n, m, 9)
    for backend in ("reference", "chunked"):
        out = aligner(mem, q, backend=backend)
        assert out.shape == (n, m)


@pytest.mark.parametrize("frozen_tokens", [False, True])
def test_empty_batch_reaches_every_parameter(frozen_tokens):
    """No pairs, still a graph through every weight (zero gradients): a DDP rank with an
    empty batch must join the gradient all-reduce, and frozen features must not leave the
    output without a graph."""
    al = make_aligner(cf.AlignerConfig(d_model=32, n_heads=2, n_layers=2, d_ffn=48), seed=2)
    img = torch.randn(0, 5, 32, requires_grad=not frozen_tokens)
    txt = torch.randn(0, 4, 32, requires_grad=not frozen_tokens)
    i2t, t2i = cf.alignment_logits(al, img, txt, backend="chunked")
    assert i2t.shape == t2i.shape == (0, 0) and i2t.requires_grad
    (i2t.sum() + t2i.sum()).backward()
    for name, p in al.named_parameters():
        assert p.grad is not None and not p.grad.any(), name


@pytest.mark.parametrize("form", ["kv", "folded"])
def test_fp32_gradients_match_reference(aligner, form):
    n, m, p = 3, 4, 17
    mem, q = _inputs(n, m, p, seed=3)
    mask = random_mask(n, p, seed=5)
    g_out = torch.randn(n, m, generator=torch.Generator().manual_seed(7))
    grads = []
    for run in ("reference", form):
        mem_ = mem.clone().requires_grad_(True)
        q_ = q.clone().requires_grad_(True)
        aligner.zero_grad(set_to_none=True)
        if run == "reference":
            out = aligner(mem_, q_, mask, backend="reference")
        else:
            out = chunked_forward(aligner.weights(), aligner.config, mem_, q_, mask, False, 1, run)
        (out * g_out).sum().backward()
        grads.append([mem_.grad, q_.grad] + [p.grad for p in aligner.parameters()])
    for name, a, b in zip(
        ["memory", "queries"] + [n for n, _ in aligner.named_parameters()], *grads, strict=True
    ):
        assert rel_err(a, b) < 1e-4, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_no_worse_than_reference(aligner, dtype):
    """Relative RMS error against the fp32 reference, judged by the reference's own error in
    the same dtype (×2), not by a fixed loose tolerance."""
    mem, q = _inputs(6, 7, 197, seed=11)
    with torch.no_grad():
        exact = aligner(mem, q, backend="reference")
        ref_low = aligner(mem.to(dtype), q.to(dtype), backend="reference")
        out = aligner(mem.to(dtype), q.to(dtype), backend="chunked")
    assert out.dtype == dtype
    ref_err = rel_err(ref_low, exact)
    assert rel_err(out, exact) <= max(2 * ref_err, 1e-3)
    assert rel_err(out, exact) < 2e-2


def test_cost_model_picks_the_cheaper_form():
    cfg = cf.AlignerConfig()
    assert use_folded_form(cfg, 64, 197) and use_folded_form(cfg, 110, 197)
    assert not use_folded_form(cfg, 112, 197)
    assert use_folded_form(cfg, 70, 98) and not use_folded_form(cfg, 72, 98)


def test_cost_model_agrees_with_executed_flops():
    cfg = cf.AlignerConfig()
    for p in (98, 197):
        for m in (8, 48, 64, 150, 256, 1024):
            cheaper = executed_flops(cfg, 64, m, p, True) < executed_flops(cfg, 64, m, p, False)
            assert use_folded_form(cfg, m, p) == cheaper, (m, p)
    # the original's count at N = M = 64: the kv form does the same per-item work
    original = 64 * 64 * cfg.flops_per_pair(197) + 64 * cfg.kv_flops_per_item(197)
    assert executed_flops(cfg, 64, 64, 197, False) < original
    assert executed_flops(cfg, 64, 64, 197, True) < 0.75 * original


def test_chunk_plan_depends_on_budget_not_batch():
    cfg = cf.AlignerConfig()
    small = plan_chunks(cfg, 10_000, 10_000, 197, 4, 32 * 2**20, False, False)
    large = plan_chunks(cfg, 100_000, 100_000, 197, 4, 32 * 2**20, False, False)
    assert small == large
    big = plan_chunks(cfg, 10_000, 10_000, 197, 4, 256 * 2**20, False, False)
    assert big.items * big.queries > small.items * small.queries


@pytest.mark.parametrize("total, step", [(48, 9), (48, 10), (10, 3), (97, 1), (7, 100), (1, 1)])
def test_chunks_cover_the_range_in_near_equal_pieces(total, step):
    """As few chunks as the plan's step allows, no piece over the step, sizes within one of
    each other (no small tail chunk)."""
    pieces = plan.pieces(total, step)
    assert len(pieces) == -(-total // step)
    assert pieces[0][0] == 0 and pieces[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(pieces[:-1], pieces[1:], strict=True))
    sizes = [b - a for a, b in pieces]
    assert max(sizes) <= step and max(sizes) - min(sizes) <= 1
    assert plan.pieces(0, step) == []


@pytest.mark.parametrize("total, step, granule", [
    (64, 12, 2), (48, 10, 2), (48, 9, 2), (64, 11, 2), (65, 12, 2), (7, 100, 4), (97, 16, 16),
    (97, 15, 16), (3, 2, 2), (1, 1, 2),
])  # fmt: skip
def test_chunks_in_multiples_of_the_granule(total, step, granule):
    """Pieces of at most `step`, multiples of `granule` except the last, near-equal in
    granules; a step below the granule falls back to plain pieces."""
    pieces = plan.pieces(total, step, granule)
    assert pieces[0][0] == 0 and pieces[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(pieces[:-1], pieces[1:], strict=True))
    sizes = [b - a for a, b in pieces]
    assert max(sizes) <= step and min(sizes) > 0
    g = granule if step >= granule else 1
    assert all(s % g == 0 for s in sizes[:-1])
    units = [-(-s // g) for s in sizes]
    assert max(units) - min(units) <= 1
    assert len(pieces) == math.ceil(math.ceil(total / g) / (step // g))  # as few as allowed
    if g == 1:
        assert pieces == plan.pieces(total, step)
