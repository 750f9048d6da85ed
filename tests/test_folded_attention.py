"""The chunked backend's folded attention: hand-written backward against autograd."""

from __future__ import annotations

import pytest
import torch

from carzero_fast.backends.dropout import Dropout
from carzero_fast.backends.folded_attention import FoldedAttention, folded_forward


def _inputs(n, m, p, d, heads, shared, dtype, masked, normed_grad=True):
    g = torch.Generator().manual_seed(n * 100 + m * 10 + p)
    dh = d // heads

    def rnd(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)

    qk = [rnd(m if shared else n * m, d) for _ in range(heads)]
    normed = rnd(n, p, d, grad=normed_grad)
    wv = [rnd(dh, d) for _ in range(heads)]
    bv = [rnd(dh) for _ in range(heads)]
    bias = None
    if masked:  # ragged: item i hides its last i tokens (at least one token stays visible)
        mask = torch.zeros(n, p, dtype=torch.bool)
        for i in range(n):
            mask[i, p - min(i, p - 1) :] = True
        bias = torch.zeros(n, p, dtype=dtype).masked_fill_(mask, float("-inf"))[:, None, :]
    return (*qk, normed, *wv, *bv), bias


def _drop(p_drop):
    return Dropout(p_drop, 11 if p_drop else None, (0, 0), torch.device("cpu"))


def _split(t, heads):
    return t[:heads], t[heads], t[heads + 1 : 2 * heads + 1], t[2 * heads + 1 :]


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("p_drop", [0.0, 0.3])
@pytest.mark.parametrize("masked", [False, True])
def test_folded_attention_gradcheck_fp64(shared, p_drop, masked):
    heads = 2
    t, bias = _inputs(3, 5, 7, 8, heads, shared, torch.float64, masked)

    def f(*x):  # a fresh Dropout per call: the same masks every time
        return FoldedAttention.apply(bias, _drop(p_drop), shared, heads, *x)

    assert torch.autograd.gradcheck(f, t)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("normed_grad", [False, True])
def test_folded_attention_matches_autograd_fp32(shared, normed_grad):
    """Odd shapes, dropout and a ragged mask: output and every gradient as autograd's."""
    heads, n, m, p, d = 3, 4, 7, 19, 24
    t, bias = _inputs(n, m, p, d, heads, shared, torch.float32, True, normed_grad)
    g_out = torch.randn(n, m, d, generator=torch.Generator().manual_seed(5))
    out = FoldedAttention.apply(bias, _drop(0.2), shared, heads, *t)
    grads = torch.autograd.grad(out, [x for x in t if x.requires_grad], g_out)
    qk, normed, wv, bv = _split(t, heads)
    ref = folded_forward(qk, normed, wv, bv, bias, _drop(0.2), shared)  # plain autograd
    ref_grads = torch.autograd.grad(ref, [x for x in t if x.requires_grad], g_out)
    assert torch.equal(out, ref)
    for a, b in zip(grads, ref_grads, strict=True):
        assert ((a - b).norm() / b.norm()).item() < 1e-5


def test_folded_attention_bf16_error_like_autograd():
    """bf16: the gradients' error against fp64 is no worse than 2× autograd's own in bf16."""
    heads, n, m, p, d = 2, 3, 6, 17, 16
    t64, bias64 = _inputs(n, m, p, d, heads, False, torch.float64, True)
    g64 = torch.randn(n, m, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = torch.autograd.grad(folded_forward(*_split(t64, heads), bias64, _drop(0.0), False),
                                t64, g64)  # fmt: skip
    t16 = [x.detach().bfloat16().requires_grad_(True) for x in t64]
    bias16, g16 = bias64.bfloat16(), g64.bfloat16()
    ours = torch.autograd.grad(FoldedAttention.apply(bias16, _drop(0.0), False, heads, *t16),
                               t16, g16)  # fmt: skip
    theirs = torch.autograd.grad(folded_forward(*_split(t16, heads), bias16, _drop(0.0), False),
                                 t16, g16)  # fmt: skip
    for a, b, e in zip(ours, theirs, exact, strict=True):
        err = ((a.double() - e).norm() / e.norm()).item()
        err_ref = ((b.double() - e).norm() / e.norm()).item()
        assert err <= 2 * err_ref, (err, err_ref)
