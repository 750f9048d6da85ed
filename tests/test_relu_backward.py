"""The ReLU backward + column sums kernel under the interpreter, against PyTorch."""

from __future__ import annotations

import importlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from carzero_fast.kernels import relu_backward, relu_backward_torch  # noqa: E402

krb = importlib.import_module("carzero_fast.kernels.relu_backward")  # not the function


@pytest.fixture(params=[1, 4], ids=["few_programs", "more_programs"])
def programs_per_sm(request, monkeypatch):
    """Row programs per SM (the interpreter counts 2): each program loops over several row
    blocks and writes one row of partial sums."""
    monkeypatch.setattr(krb, "PROGRAMS_PER_SM", request.param)
    return request.param


@pytest.mark.parametrize("rows,cols", [(1, 5), (37, 97), (100, 300), (65, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_threshold_backward_and_sums(rows, cols, dtype, programs_per_sm):
    """dx exactly PyTorch's `threshold_backward` (a mask, no arithmetic), its column sums the
    same numbers added in another order: fp32 to rounding."""
    g = torch.Generator().manual_seed(rows + cols)
    dy = torch.randn(rows, cols, generator=g).to(dtype)
    act = torch.relu(torch.randn(rows, cols, generator=g)).to(dtype)  # zeros where it cut
    act[0, 0] = -0.0  # a negative zero did not pass the ReLU either
    dx, sums = relu_backward(dy, act)
    want_dx, _ = relu_backward_torch(dy, act)
    assert dx.dtype == dtype and torch.equal(dx, want_dx)
    assert dx[0, 0] == 0 and (dx == 0).any()
    want = want_dx.double().sum(0)
    assert sums.dtype == torch.float32
    assert float((sums.double() - want).norm() / want.norm()) < 1e-6


def test_strided_rows_empty_and_bad_input():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(20, 64, generator=g)
    dy, act = base[::2, :48], torch.relu(base[1::2, 16:])  # row-strided views
    dx, sums = relu_backward(dy, act)
    want_dx, want_sums = relu_backward_torch(dy, act)
    assert torch.equal(dx, want_dx) and torch.allclose(sums, want_sums, rtol=1e-6)
    dx, sums = relu_backward(torch.empty(0, 8), torch.empty(0, 8))
    assert dx.shape == (0, 8) and torch.equal(sums, torch.zeros(8))
    with pytest.raises(ValueError, match="one 2-D shape"):
        relu_backward(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="unit stride"):
        relu_backward(torch.zeros(4, 3).t(), torch.zeros(3, 4))
