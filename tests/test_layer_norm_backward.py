"""The add + LayerNorm backward kernel under the interpreter, against fp64 autograd."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from carzero_fast.backends.philox import (  # noqa: E402
    SITE_ATTN_BRANCH,
    SITE_FFN_BRANCH,
    SITE_SIMR,
    ChunkPos,
    DropoutSpec,
    chunk_dropout_torch,
    tag,
)
from carzero_fast.kernels import layer_norm_backward, layer_norm_backward_torch  # noqa: E402
from carzero_fast.kernels import layernorm as kln  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# 0: one program per row block (shipped); 1: one program per "SM" (the interpreter counts
# 2), each looping over several row blocks and writing one row of partials
@pytest.fixture(params=[0, 1], ids=["program_per_block", "looping_programs"])
def programs_per_sm(request, monkeypatch):
    monkeypatch.setattr(kln, "LN_BWD_PROGRAMS_PER_SM", request.param)
    return request.param


@pytest.mark.parametrize("rows,d", [(1, 64), (13, 97), (37, 768)])
@pytest.mark.parametrize("with_residual_grad", [False, True])
@pytest.mark.parametrize("dy_dtype", [torch.float32, torch.bfloat16])
def test_matches_autograd(rows, d, with_residual_grad, dy_dtype, programs_per_sm):
    g = torch.Generator().manual_seed(rows * d)
    x = torch.randn(rows, d, generator=g) * 3 + 1  # the stream after the add, fp32
    w, b = 1 + 0.2 * torch.randn(d, generator=g), 0.1 * torch.randn(d, generator=g)
    dy = torch.randn(rows, d, generator=g).to(dy_dtype)
    dres = torch.randn(rows, d, generator=g) if with_residual_grad else None
    dx, dw, db, none = layer_norm_backward(x, w, dy, 1e-5, dres)
    assert none is None

    x64, w64, b64 = (t.double().requires_grad_(True) for t in (x, w, b))
    y = F.layer_norm(x64, (d,), w64, b64, 1e-5)
    loss = (y * dy.double()).sum() + ((x64 * dres.double()).sum() if dres is not None else 0)
    loss.backward()
    assert _rel(dx, x64.grad) < 1e-5
    assert _rel(dw, w64.grad) < 1e-5
    assert _rel(db, b64.grad) < 1e-5
    # the kernel's math written out in PyTorch (layer_norm_backward_torch), against the same
    for got, want in zip(layer_norm_backward_torch(x, w, dy, 1e-5, dres),
                         (x64.grad, w64.grad, b64.grad), strict=True):  # fmt: skip
        assert _rel(got, want) < 1e-5


def test_uses_the_given_eps(programs_per_sm):
    """The kernel recomputes the statistics with the caller's eps (the config's, not
    LayerNorm's default): rows of small spread, whose gradients at eps 1e-5 differ."""
    g = torch.Generator().manual_seed(3)
    d, eps = 48, 1e-2
    x = 0.05 * torch.randn(9, d, generator=g) + 1  # variance 2.5e-3: eps is a fifth of it
    w, b = 1 + 0.2 * torch.randn(d, generator=g), 0.1 * torch.randn(d, generator=g)
    dy = torch.randn(9, d, generator=g)

    def autograd(eps):  # noqa: ANN001, ANN202
        x64, w64, b64 = (t.double().requires_grad_(True) for t in (x, w, b))
        (F.layer_norm(x64, (d,), w64, b64, eps) * dy.double()).sum().backward()
        return x64.grad, w64.grad, b64.grad

    want = autograd(eps)
    assert _rel(autograd(1e-5)[0], want[0]) > 1e-2  # the test can tell the two apart
    for got in (layer_norm_backward(x, w, dy, eps)[:3], layer_norm_backward_torch(x, w, dy, eps)):
        for a, b_ in zip(got, want, strict=True):
            assert _rel(a, b_) < 1e-5


def test_deterministic_and_empty(programs_per_sm):
    x, w, dy = torch.randn(50, 96), torch.rand(96), torch.randn(50, 96)
    first = layer_norm_backward(x, w, dy, 1e-5)
    again = layer_norm_backward(x, w, dy, 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(first[:3], again[:3], strict=True))
    if programs_per_sm:  # 2 programs over 13 row blocks
        assert kln.multiprocessors(x.device) == 2
    dx, dw, db, _ = layer_norm_backward(torch.empty(0, 8), torch.ones(8), torch.empty(0, 8), 1e-5)
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros(8)) and torch.equal(db, dw)


@pytest.mark.parametrize(("dtype", "drop"), [(torch.bfloat16, False), (torch.float16, False),
                                           (torch.bfloat16, True), (torch.float32, True)],
                         ids=["bf16", "fp16", "bf16-dropout", "fp32-dropout"])  # fmt: skip
def test_writes_the_branch_gradient_with_its_column_sums(dtype, drop, programs_per_sm):
    """`dx16`: dx in the GEMM dtype (what the residual branch's linear layer takes), and with
    `dropout` (training mode, a branch dropped before its add) exactly `chunk_dropout_torch(dx)`
    (the mask `philox.keep_torch` draws, the scale, one rounding); `dx16_sum` its column sums
    in fp32 (that layer's bias gradient); dx, dγ, dβ as without it, bit for bit."""
    rows, d = 37, 97
    spec, pos, t = DropoutSpec.make(0.3, 99), ChunkPos(3, 11, 5), tag(SITE_ATTN_BRANCH, 2)
    dropout = dict(dropout=(spec, pos), dx16_tag=t) if drop else {}
    g = torch.Generator().manual_seed(5)
    x = torch.randn(rows, d, generator=g) * 2 + 0.5
    w = 1 + 0.2 * torch.randn(d, generator=g)
    dy = torch.randn(rows, d, generator=g).to(dtype)
    dres = torch.randn(rows, d, generator=g)
    plain = layer_norm_backward(x, w, dy, 1e-5, dres)
    dx16 = torch.full((rows, d), float("nan"), dtype=dtype)
    got = layer_norm_backward(x, w, dy, 1e-5, dres, dx16=dx16, **dropout)
    for a, b in zip(got[:3], plain[:3], strict=True):
        assert torch.equal(a, b)
    if drop:
        want = chunk_dropout_torch(plain.dx, spec, pos, t, dtype)
        assert 0.2 < (want == 0).float().mean() < 0.4  # the mask is on (p = 0.3)
    else:
        want = plain.dx.to(dtype)
    assert torch.equal(dx16, want)
    assert _rel(got.dx16_sum, want.double().sum(0)) < 1e-6
    assert got.dx16_sum.dtype == torch.float32
    with pytest.raises(ValueError, match="dx16"):
        layer_norm_backward(x, w, dy, 1e-5, dx16=dx16[:, :-1])
    with pytest.raises(ValueError, match="dx16"):
        layer_norm_backward(x, w, dy, 1e-5, dropout=(spec, pos), dx16_tag=t)
    with pytest.raises(ValueError, match="dy_tag"):
        layer_norm_backward(x, w, dy, 1e-5, dy_tag=t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_takes_a_dropped_outputs_gradient_back_through_its_mask(dtype, programs_per_sm):
    """`dy_tag` (the LayerNorm's output was dropped after it, SimR): the same as the
    backward of `chunk_dropout_torch(dy)`, bit for bit, with the branch's dropped dx16 beside it."""
    rows, d = 29, 97
    spec, pos = DropoutSpec.make(0.3, 7), ChunkPos(2, 4, 3)
    t_y, t_x = tag(SITE_SIMR, 0), tag(SITE_FFN_BRANCH, 3)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(rows, d, generator=g) * 2 - 0.5
    w = 1 + 0.2 * torch.randn(d, generator=g)
    dy = torch.randn(rows, d, generator=g).to(dtype)
    dy_in = chunk_dropout_torch(dy, spec, pos, t_y)
    want16, got16 = (torch.full((rows, d), float("nan"), dtype=dtype) for _ in range(2))
    want = layer_norm_backward(x, w, dy_in, 1e-5, dx16=want16, dropout=(spec, pos),
                               dx16_tag=t_x)  # fmt: skip
    got = layer_norm_backward(x, w, dy, 1e-5, dx16=got16, dropout=(spec, pos), dx16_tag=t_x,
                              dy_tag=t_y)  # fmt: skip
    for a, b in zip((*got[:3], got16), (*want[:3], want16), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(got.dx16_sum, want.dx16_sum)
    assert not torch.equal(dy_in, dy)  # the mask is on
