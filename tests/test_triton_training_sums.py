"""16-bit training's bias gradients summed inside the kernels that make their dy (the
LayerNorm backward for the residual branches, the ReLU backward for the layers before a ReLU,
the dQ kernel for the query projections): each the same step as summing apart, every other
gradient bit for bit. Under Triton's CPU interpreter."""

from __future__ import annotations

import os
import sys

# Before Triton's first import (see tests/test_kernels.py).
_TRITON_PRELOADED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import make_aligner, rel_err  # noqa: E402
from test_triton_training import CONFIGS, budget_for, grad_names, make_tokens, train_step  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _interpreter_active():
    if _TRITON_PRELOADED:
        pytest.fail("Triton was imported before TRITON_INTERPRET=1 was set (see this module's top)")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "dropout"])
def test_16_bit_branch_gradients_from_the_layer_norm_backward(train, monkeypatch, triton_only):
    """16-bit training takes each residual branch's dy (16-bit; in train mode through the
    branch's dropout mask) and its bias gradient (column sums) from the LayerNorm backward
    that made dx, and in train mode decoder_norm's backward takes SimR's mask itself: the
    same step as casting (or `chunk_dropout_torch` on) dx and dy and summing apart (every gradient
    bit for bit but the summed biases, which add the same numbers in another order)."""
    import carzero_fast.kernels as kernels
    from carzero_fast.backends.philox import chunk_dropout_torch

    al = make_aligner(CONFIGS["d64h4"], seed=5, dtype=torch.bfloat16).train(train)
    img, txt = make_tokens(64, 3, 4, seed=6, dtype=torch.bfloat16)
    budget = budget_for(al.config, (2, 4), 3, 4)  # item blocks of 2 and 1
    torch.manual_seed(11)  # the directions' dropout seeds
    fused = train_step(al, "triton", img, txt, budget=budget)
    real, seen = kernels.layer_norm_backward, []

    def cast_and_sum(x, weight, dy, eps, dres=None, dx16=None, dropout=None, dx16_tag=None,
                     dy_tag=None):  # fmt: skip
        if dy_tag is not None:  # SimR's mask on the output's gradient, applied apart
            dy = chunk_dropout_torch(dy, *dropout, dy_tag)
        out = real(x, weight, dy, eps, dres)
        seen.append((dx16 is not None, dx16_tag is not None))
        if dx16 is None:
            return out
        if dx16_tag is None:
            dx16.copy_(out.dx)
        else:
            dx16.copy_(chunk_dropout_torch(out.dx, *dropout, dx16_tag, dx16.dtype))
        return out._replace(dx16_sum=dx16.sum(0, dtype=torch.float32))

    monkeypatch.setattr(kernels, "layer_norm_backward", cast_and_sum)
    torch.manual_seed(11)
    apart = train_step(al, "triton", img, txt, budget=budget)
    branches = [drop for has_dx16, drop in seen if has_dx16]
    assert branches and len(branches) < len(seen)  # LN0's backward has no branch
    assert all(branches) if train else not any(branches)
    for name, a, b in zip(grad_names(al), fused, apart, strict=True):
        if name.endswith(("linear2.bias", "out_proj.bias")):
            assert rel_err(a, b) < 1e-5, name
        else:
            assert torch.equal(a, b), name


def test_bias_gradients_from_the_relu_backward(monkeypatch, triton_only):
    """The backward takes the bias gradient of every layer before a ReLU (linear1, the
    head's hidden layers) from the pass that applies the ReLU's mask (`relu_backward`): the
    same step as PyTorch's `threshold_backward` and a sum apart, every gradient bit for bit
    but those biases, which add the same numbers in another order."""
    import carzero_fast.kernels as kernels

    al = make_aligner(CONFIGS["d96h2"], seed=8, dtype=torch.bfloat16)
    img, txt = make_tokens(96, seed=9, dtype=torch.bfloat16)
    fused = train_step(al, "triton", img, txt)
    calls = []

    def apart(dy, act):
        calls.append(dy.shape)
        return kernels.relu_backward_torch(dy, act)

    monkeypatch.setattr(kernels, "relu_backward", apart)
    torch_path = train_step(al, "triton", img, txt)
    # per direction: linear1 in each layer, the head's hidden layers after the first
    assert len(calls) == 2 * (al.config.n_layers + len(al.config.head_dims) - 1)
    for name, a, b in zip(grad_names(al), fused, torch_path, strict=True):
        if name.endswith("linear1.bias") or (name.startswith("mlp_head.") and name.endswith(
                ".bias") and name != f"mlp_head.{3 * len(al.config.head_dims)}.bias"):  # fmt: skip
            assert rel_err(a, b) < 1e-5, name
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_query_bias_gradients_from_the_dq_kernel(dtype, monkeypatch, triton_only):
    """Layers after the first take the query projection's bias gradient from the column sums
    the dQ kernel writes (`dq_sum`): the same step as summing dq apart (what the linear
    backward did), every gradient bit for bit but those biases, which add the same numbers
    in another order."""
    import carzero_fast.kernels as kernels

    al = make_aligner(CONFIGS["d64h4"], seed=12, dtype=dtype)
    img, txt = make_tokens(64, seed=13, dtype=dtype)
    fused = train_step(al, "triton", img, txt)
    real, sums = kernels.attention_backward, []

    def sum_apart(*args, dq_sum=None, **kwargs):
        dq, dk, dv = real(*args, **kwargs)
        if dq_sum is not None:
            sums.append(dq.dtype)
            dq_sum.copy_(dq.sum(0, dtype=torch.float32))
        return dq, dk, dv

    monkeypatch.setattr(kernels, "attention_backward", sum_apart)
    apart = train_step(al, "triton", img, txt)
    assert sums == [dtype] * (2 * (al.config.n_layers - 1))  # both directions, layers 2…
    for name, a, b in zip(grad_names(al), fused, apart, strict=True):
        if name.endswith("in_proj_bias"):
            assert rel_err(a, b) < 1e-5, name
        else:
            assert torch.equal(a, b), name
