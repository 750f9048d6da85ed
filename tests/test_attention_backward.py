"""The attention backward kernels and the forward's log-sum-exp, under the interpreter,
against PyTorch autograd of the stage they differentiate (fp64 on the same rounded inputs)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from carzero_fast.kernels import (  # noqa: E402, I001
    attention,
    attention_backward,
    attention_backward_torch,
    attention_torch,
    configs,
)


@pytest.fixture(params=[64, 32, 16], ids=["slice64", "slice32", "slice16"])
def slice_cfg(request):  # noqa: ANN001, ANN201
    """The backward's head-dim slice width (`block_c`): the shipped 64 (one slice, padded,
    for these head dims ≤ 64), 32 (48 = 32 + a partial slice) and 16 (three or four slices,
    as CARZero's 192 = 3 × 64 runs on a GPU). The interpreter reads the Hopper tables."""
    old = {kind: configs.shipped(90, kind)["attention_bwd"] for kind in configs.KINDS}
    for kind, cfg in old.items():
        configs.override("attention_bwd", 90, kind, cfg._replace(block_c=request.param))
    yield request.param
    for kind, cfg in old.items():
        configs.override("attention_bwd", 90, kind, cfg)


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """Relative error; the floor keeps analytically-zero gradients (one key: the softmax is
    constant, so dq = dk = 0) from dividing rounding noise by zero."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / max(float(b.norm()), floor))


def _case(n, m, p, heads, d, shared, masked, dtype, seed=0):  # noqa: ANN001, ANN202
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(m if shared else n * m, d, generator=g)
    kv = torch.randn(n * p, 3 * d, generator=g)  # K and V as column slices of a wider buffer
    mask = None
    if masked:
        lengths = torch.randint(1, p + 1, (n,), generator=g)
        mask = (torch.arange(p)[None, :] >= lengths[:, None]).to(torch.int8)
    dout = torch.randn(n * m, d, generator=g)
    return q.to(dtype), kv.to(dtype), mask, dout.to(dtype)


def _grads(q, k, v, dout, heads, n, m, shared, mask, dtype):  # noqa: ANN001, ANN202
    """PyTorch autograd of `attention_torch` in `dtype` → (dq, dk, dv)."""
    leaves = [t.detach().to(dtype).contiguous().requires_grad_(True) for t in (q, k, v)]
    out = attention_torch(*leaves, heads, n, m, shared_queries=shared, mask=mask)
    out.backward(dout.to(dtype))
    return [t.grad for t in leaves]


CASES = [(3, 37, 19, 2, 96), (2, 5, 1, 4, 64), (2, 9, 97, 4, 64), (1, 33, 197, 1, 48),
         (2, 7, 23, 1, 64)]


@pytest.mark.parametrize("n,m,p,heads,d", CASES)
@pytest.mark.parametrize("shared", [False, True], ids=["per-pair", "shared"])
@pytest.mark.parametrize("masked", [False, True], ids=["all-keys", "ragged-mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_matches_autograd(n, m, p, heads, d, shared, masked, dtype, slice_cfg,
                                   nan_buffers):  # fmt: skip
    # nan_buffers: the buffers the backward allocates (dq, delta, dk, dv) start as NaN
    q, kv, mask, dout = _case(n, m, p, heads, d, shared, masked, dtype)
    k, v = kv[:, d : 2 * d], kv[:, 2 * d :]
    lse = torch.full((n * m, heads), float("nan"))
    out = attention(q, k, v, heads, n, m, shared_queries=shared, mask=mask, lse=lse)
    dq, dk, dv = attention_backward(q, k, v, out, dout, lse, heads, n, m,
                                    shared_queries=shared, mask=mask)  # fmt: skip
    if shared:  # the shared rows' gradient sums the per-pair ones over items
        dq = dq.view(n, m, d).sum(0)
    ref = _grads(q, k, v, dout, heads, n, m, shared, mask, torch.float64)
    floor = 0.1 * float(ref[2].norm())  # dv's scale: the size of the terms dq and dk sum
    if dtype == torch.float32:
        for got, want in zip((dq, dk, dv), ref, strict=True):
            assert _rel(got, want, floor) < 1e-5
    else:  # no worse than twice PyTorch's own bf16 autograd of the same stage
        own = _grads(q, k, v, dout, heads, n, m, shared, mask, dtype)
        for got, mine, want in zip((dq, dk, dv), own, ref, strict=True):
            assert _rel(got, want, floor) <= 2 * _rel(mine, want, floor) + 1e-6


@pytest.mark.parametrize("n,m,p,heads,d", CASES[:3])
@pytest.mark.parametrize("shared", [False, True], ids=["per-pair", "shared"])
def test_the_written_out_backward_is_autograds(n, m, p, heads, d, shared):
    """`attention_backward_torch`, the kernels' math in PyTorch, against autograd (fp64)."""
    q, kv, mask, dout = _case(n, m, p, heads, d, shared, True, torch.float32)
    k, v = kv[:, d : 2 * d], kv[:, 2 * d :]
    dq, dk, dv = attention_backward_torch(q, k, v, dout, heads, n, m, shared_queries=shared,
                                          mask=mask)  # fmt: skip
    if shared:
        dq = dq.view(n, m, d).sum(0)
    ref = _grads(q, k, v, dout, heads, n, m, shared, mask, torch.float64)
    floor = 0.1 * float(ref[2].norm())  # one key (P = 1): dq and dk are exactly zero
    for got, want in zip((dq, dk, dv), ref, strict=True):
        assert got.dtype == torch.float32
        assert _rel(got, want, floor) < 1e-5


def test_forward_stores_the_log_sum_exp():
    n, m, p, heads, d = 2, 7, 13, 2, 32
    q, kv, mask, _ = _case(n, m, p, heads, d, False, True, torch.float32)
    k, v = kv[:, d : 2 * d], kv[:, 2 * d :]
    lse = torch.full((n * m, heads), float("nan"))
    attention(q, k, v, heads, n, m, mask=mask, lse=lse)
    qh = q.view(n, m, heads, d // heads).transpose(1, 2)
    kh = k.reshape(n, p, heads, d // heads).transpose(1, 2)
    s = qh @ kh.transpose(-1, -2) / math.sqrt(d // heads)  # [n, H, m, P]
    s = s.masked_fill(mask.bool()[:, None, None, :], float("-inf"))
    want = torch.logsumexp(s, dim=-1).transpose(1, 2).reshape(n * m, heads)
    assert _rel(lse, want) < 1e-6


def _masked_forward(n, m, p, heads, d, dtype):  # noqa: ANN001, ANN202
    """Per-pair queries over ragged keys: inputs, the forward's output and its LSE."""
    q, kv, mask, dout = _case(n, m, p, heads, d, False, True, dtype)
    k, v = kv[:, d : 2 * d], kv[:, 2 * d :]
    lse = torch.empty((n * m, heads))
    out = attention(q, k, v, heads, n, m, mask=mask, lse=lse)
    return q, k, v, mask, dout, out, lse


def test_backward_accumulates_into_given_buffers():
    """dk/dv given (column slices of one fp32 accumulator, as training passes an item block's
    K/V gradient): the gradients are added to what they hold, every other column untouched."""
    n, m, p, heads, d = 2, 5, 11, 2, 32
    q, k, v, mask, dout, out, lse = _masked_forward(n, m, p, heads, d, torch.float32)
    _, dk, dv = attention_backward(q, k, v, out, dout, lse, heads, n, m, mask=mask)
    acc = torch.randn(n * p, 3 * d, generator=torch.Generator().manual_seed(3))
    before = acc.clone()
    attention_backward(q, k, v, out, dout, lse, heads, n, m, mask=mask, dk=acc[:, :d],
                       dv=acc[:, 2 * d :])  # fmt: skip
    assert torch.allclose(acc[:, :d], before[:, :d] + dk, atol=1e-6)
    assert torch.equal(acc[:, d : 2 * d], before[:, d : 2 * d])
    assert torch.allclose(acc[:, 2 * d :], before[:, 2 * d :] + dv, atol=1e-6)
    with pytest.raises(ValueError, match="both"):
        attention_backward(q, k, v, out, dout, lse, heads, n, m, dk=acc[:, :d])


def test_dq_in_the_gemm_dtype_is_the_rounded_fp32_dq():
    """dq_dtype=bf16 (what training asks for layers > 1) stores the same values rounded once
    to nearest-even, bit for bit what the fp32 result's cast gives."""
    n, m, p, heads, d = 2, 9, 23, 2, 64
    q, k, v, mask, dout, out, lse = _masked_forward(n, m, p, heads, d, torch.bfloat16)
    dq32, _, _ = attention_backward(q, k, v, out, dout, lse, heads, n, m, mask=mask)
    dq16, _, _ = attention_backward(q, k, v, out, dout, lse, heads, n, m, mask=mask,
                                    dq_dtype=torch.bfloat16)  # fmt: skip
    assert dq16.dtype == torch.bfloat16
    assert torch.equal(dq16, dq32.to(torch.bfloat16))


# (dtype, queries per item, heads, D, query blocks of the dQ kernel per item on CPU)
DQ_SUM_CASES = [(torch.float32, 37, 2, 96, 2), (torch.bfloat16, 131, 2, 96, 2),
                (torch.bfloat16, 9, 1, 48, 1)]


@pytest.mark.parametrize(("dtype", "m", "heads", "d", "blocks"), DQ_SUM_CASES)
def test_dq_column_sums(dtype, m, heads, d, blocks):
    """dq_sum (the query projection's bias gradient, from the dQ kernel's per-program
    partials) is the column sum of dq as returned (rounded to the GEMM dtype first): over
    ragged query blocks, and a head narrower than its 64-column slice."""
    n, p = 3, 23
    block_m = configs.attention_bwd_config(torch.device("cpu"), dtype).dq_block_m
    assert -(-m // block_m) == blocks
    q, k, v, mask, dout, out, lse = _masked_forward(n, m, p, heads, d, dtype)
    dq_sum = torch.full((d,), float("nan"))
    dq, _, _ = attention_backward(q, k, v, out, dout, lse, heads, n, m, mask=mask,
                                  dq_dtype=dtype, dq_sum=dq_sum)  # fmt: skip
    assert _rel(dq_sum, dq.double().sum(0)) < 1e-6
    with pytest.raises(ValueError, match=rf"dq_sum must be fp32 of shape \({d},\)"):
        attention_backward(q, k, v, out, dout, lse, heads, n, m, dq_sum=torch.empty(d + 1))
