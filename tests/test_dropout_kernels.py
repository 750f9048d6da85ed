"""Counter-based dropout under the interpreter: the kernels' masks equal the PyTorch Philox
(`backends/philox.py`) bit for bit at odd shapes, in every kernel that draws them, and the
masks have the right rate, independence and determinism."""

from __future__ import annotations

import os
import sys

_TRITON_PRELOADED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from carzero_fast.backends.philox import (  # noqa: E402
    SITE_ATTENTION,
    SITE_FFN_BRANCH,
    SITE_FFN_HIDDEN,
    SITE_SIMR,
    ChunkPos,
    DropoutSpec,
    chunk_dropout_torch,
    keep_torch,
    tag,
)
from carzero_fast.kernels import add_layer_norm, attention, attention_backward, linear  # noqa: E402

SPEC = DropoutSpec.make(0.25, 0x5DEECE66D1234567)


@pytest.fixture(autouse=True, scope="module")
def _interpreter_active():
    if _TRITON_PRELOADED:
        pytest.fail("Triton was imported before TRITON_INTERPRET=1 was set")


def _chunk_keep(pos: ChunkPos, rows: int, cols: int, tag_: int, spec=SPEC) -> torch.Tensor:
    """PyTorch mask of a chunk's rows (item-major pairs) × columns."""
    r = torch.arange(rows)
    items, queries = (pos.n0 + r // pos.cols)[:, None], (pos.m0 + r % pos.cols)[:, None]
    return keep_torch(spec, items, queries, torch.arange(cols)[None, :], tag_)


# ------------------------------------------------------------------------- the masks


CHUNKS = [(1, 1, ChunkPos(0, 0, 1)), (21, 45, ChunkPos(3, 5, 7)),
          (40, 300, ChunkPos(1000, 70000, 8))]  # fmt: skip


@pytest.mark.parametrize(("rows", "cols", "pos"), CHUNKS)
def test_chunk_dropout_torch_is_the_chunks_mask(rows, cols, pos):
    """`chunk_dropout_torch` (the PyTorch form of what the kernels do to a chunk's rows, the
    backward tests' oracle): row r is pair (n0 + r // cols, m0 + r % cols), scaled in fp32 and
    rounded once."""
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows))
    keep = _chunk_keep(pos, rows, cols, tag(SITE_FFN_BRANCH, 3))
    got = chunk_dropout_torch(x, SPEC, pos, tag(SITE_FFN_BRANCH, 3))
    assert torch.equal(got, torch.where(keep, x * SPEC.scale, 0.0))
    got16 = chunk_dropout_torch(x, SPEC, pos, tag(SITE_FFN_BRANCH, 3), torch.bfloat16)
    assert torch.equal(got16, torch.where(keep, x * SPEC.scale, 0.0).bfloat16())


def test_mask_rate_and_independence():
    """Keep rate within 5 binomial sigmas of 1 − p; seeds, tags, pairs and columns (those
    drawn by one Philox call too) each change the mask (agreement near that of independent
    masks)."""
    spec = DropoutSpec.make(0.1, 12345)
    items, queries = torch.arange(64)[:, None, None], torch.arange(64)[None, :, None]
    cols = torch.arange(48)[None, None, :]
    keep = keep_torch(spec, items, queries, cols, tag(SITE_ATTENTION, 0))
    n, q = keep.numel(), 1 - spec.threshold / 2**32
    assert abs(keep.float().mean().item() - q) < 5 * math.sqrt(q * (1 - q) / n)
    independent = q * q + (1 - q) ** 2  # P(two independent masks agree)
    others = [
        keep_torch(DropoutSpec.make(0.1, 12346), items, queries, cols, tag(SITE_ATTENTION, 0)),
        keep_torch(spec, items, queries, cols, tag(SITE_ATTENTION, 1)),
        keep_torch(spec, items, queries, cols, tag(SITE_ATTENTION, 0, 1)),
        keep_torch(spec, items + 1, queries, cols, tag(SITE_ATTENTION, 0)),
        # one Philox call draws four neighbouring columns: its outputs must be independent
        *(keep_torch(spec, items, queries, cols + s, tag(SITE_ATTENTION, 0)) for s in (1, 2, 3)),
        keep_torch(spec, items, queries, cols + 4, tag(SITE_ATTENTION, 0)),
    ]
    for other in others:
        agree = (other == keep).float().mean().item()
        assert abs(agree - independent) < 0.01, agree
    assert torch.equal(keep, keep_torch(spec, items, queries, cols, tag(SITE_ATTENTION, 0)))
    assert spec.threshold / 2**32 == pytest.approx(0.1, abs=1e-9)
    assert spec.scale == pytest.approx(1 / (1 - spec.threshold / 2**32))


# ------------------------------------------------------------------ the kernels' masks


@pytest.mark.parametrize("route", ["triton", "library"])
@pytest.mark.parametrize("tma", [False, True], ids=["pointer", "tma"])
def test_linear_dropout_epilogue(tma, route, monkeypatch):
    # "library": `plain` runs PyTorch's GEMM, the dropout call must still run the kernel
    monkeypatch.setenv("CARZERO_FAST_TRITON_GEMM", route)
    dtype = torch.bfloat16 if tma else torch.float32
    rows, k, n_out, pos = 35, 48, 80, ChunkPos(2, 9, 7)
    g = torch.Generator().manual_seed(3)
    a, w = torch.randn(rows, k, generator=g), torch.randn(n_out, k, generator=g) / 7
    a, w, b = a.to(dtype), w.to(dtype), torch.randn(n_out, generator=g).to(dtype)
    t = tag(SITE_FFN_HIDDEN, 2)
    got = linear(a, w, b, relu=True, dropout=(SPEC, pos, t), tma=tma)
    plain = linear(a, w, b, relu=True, tma=tma)
    keep = _chunk_keep(pos, rows, n_out, t)
    assert torch.equal(got == 0, ~keep | (plain == 0))  # exactly the mask's zeros
    want = torch.where(keep, plain.float() * SPEC.scale, 0.0)
    # the kernel scales before its one rounding; `plain` was rounded before the scale (16-bit),
    # or is PyTorch's fp32 GEMM, which sums in another order ("library")
    if dtype != torch.float32:
        tol = 2.0**-7  # plain was rounded once more
    else:
        tol = 0.0 if route == "triton" else 1e-5
    assert torch.allclose(got.float(), want, rtol=tol, atol=1e-6)


def test_add_layer_norm_dropout_on_branch_and_output():
    rows, d, pos = 21, 96, ChunkPos(4, 1, 3)
    x, delta = torch.randn(rows, d), torch.randn(rows, d)
    w, b = 1 + 0.1 * torch.randn(d), 0.1 * torch.randn(d)
    y, x_out = torch.empty(rows, d), torch.empty(rows, d)
    t_delta, t_y = tag(SITE_FFN_BRANCH, 1), tag(SITE_SIMR, 0)
    add_layer_norm(x, w, b, 1e-5, y, delta=delta, x_out=x_out, dropout=(SPEC, pos),
                   delta_tag=t_delta, y_tag=t_y)  # fmt: skip
    s = x + delta * _chunk_keep(pos, rows, d, t_delta) * SPEC.scale
    want_y = F.layer_norm(s, (d,), w, b, 1e-5) * _chunk_keep(pos, rows, d, t_y) * SPEC.scale
    assert torch.allclose(x_out, s, atol=1e-6)
    assert torch.allclose(y, want_y, atol=1e-5)


def _attention_torch_dropout(q, k, v, heads, n, m, pos, layer, shared, mask):
    """Attention with each head's weights dropped by the PyTorch mask of pair (n0 + i, m0 + j)."""
    d = k.shape[1]
    dh, p = d // heads, k.shape[0] // n
    q = q.expand(n, m, d) if shared else q.view(n, m, d)
    k, v = k.reshape(n, p, d), v.reshape(n, p, d)
    items = (pos.n0 + torch.arange(n))[:, None, None]
    queries = (pos.m0 + torch.arange(m))[None, :, None]
    outs = []
    for h in range(heads):
        c = slice(h * dh, (h + 1) * dh)
        s = q[..., c] @ k[..., c].transpose(1, 2) / math.sqrt(dh)  # [n, m, P]
        if mask is not None:
            s = s.masked_fill(mask.bool()[:, None, :], float("-inf"))
        keep = keep_torch(SPEC, items, queries, torch.arange(p)[None, None, :],
                          tag(SITE_ATTENTION, layer, h))  # fmt: skip
        outs.append((torch.softmax(s, -1) * keep * SPEC.scale) @ v[..., c])
    return torch.cat(outs, -1).reshape(n * m, d)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(params=[None, 16], ids=["shipped-keys", "16-keys"])
def forward_key_block(request):
    """The forward's shipped key block, or 16 keys a step (Ampere's TF32 tiles with dropout,
    which the interpreter's Hopper table does not ship): P = 19 then ends in a ragged block."""
    from carzero_fast.kernels import configs as kc

    if request.param is None:
        yield
        return
    old = {kind: kc.shipped(90, kind)["attention"] for kind in kc.KINDS}
    for kind, cfg in old.items():
        kc.override("attention", 90, kind, cfg._replace(block_p=request.param))
    yield
    for kind, cfg in old.items():
        kc.override("attention", 90, kind, cfg)


@pytest.mark.parametrize("shared", [False, True], ids=["per-pair", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_dropout_forward_and_backward(shared, dtype, forward_key_block):
    """Forward and all three gradients against autograd of the same-mask PyTorch attention
    in fp64 on the same inputs: fp32 within 1e-5, bf16 within 2× PyTorch's own bf16 error."""
    n, m, p, heads, d, pos, layer = 3, 5, 19, 2, 64, ChunkPos(7, 11, 5), 2
    g = torch.Generator().manual_seed(0)
    q = torch.randn(m if shared else n * m, d, generator=g).to(dtype)
    kv = torch.randn(n * p, 2 * d, generator=g).to(dtype)
    k, v = kv[:, :d], kv[:, d:]
    mask = (torch.arange(p)[None, :] >= torch.tensor([19, 4, 11])[:, None]).to(torch.int8)
    dout = torch.randn(n * m, d, generator=g).to(dtype)
    drop = (SPEC, pos, tag(SITE_ATTENTION, layer))
    lse = torch.empty(n * m, heads)
    out = attention(q, k, v, heads, n, m, shared_queries=shared, mask=mask, lse=lse,
                    dropout=drop)  # fmt: skip
    dq, dk, dv = attention_backward(q, k, v, out, dout, lse, heads, n, m, shared_queries=shared,
                                    mask=mask, dropout=drop)  # fmt: skip
    if shared:
        dq = dq.view(n, m, d).sum(0)

    def torch_grads(work_dtype):  # noqa: ANN001, ANN202
        leaves = [t.to(work_dtype).requires_grad_(True) for t in (q, k, v)]
        o = _attention_torch_dropout(*leaves, heads, n, m, pos, layer, shared, mask)
        o.backward(dout.to(work_dtype))
        return [o.detach()] + [t.grad for t in leaves]

    exact = torch_grads(torch.float64)
    own = torch_grads(dtype) if dtype != torch.float32 else None
    for i, got in enumerate((out, dq, dk, dv)):
        err = _rel(got, exact[i])
        assert err < (1e-5 if own is None else 2 * _rel(own[i], exact[i]) + 1e-6), (i, err)
