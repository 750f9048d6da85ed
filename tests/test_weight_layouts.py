"""Weights in any layout and values that are not finite, on every backend.

Parametrizations (`torch.nn.utils.parametrize`, which the README says work) can hand the
backends weights that are not contiguous: a gain shared over a LayerNorm (stride 0), a bias
taken every other element, a column-major matrix, an `in_proj` cut from a wider matrix. The
Triton kernels read vectors with unit stride and matrices by rows, and `chunked`'s gradient
buffers are indexed with the weights' strides: each backend must give `reference`'s logits
and gradients whatever the layout. And a NaN must reach the logits as it does in PyTorch
(the fused ReLU once dropped it).
"""

from __future__ import annotations

import os
import sys

# Before Triton's first import (see tests/test_kernels.py).
_TRITON_PRELOADED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import make_aligner, random_mask, rel_err  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

import carzero_fast as cf  # noqa: E402

CFG = cf.AlignerConfig(d_model=32, n_heads=2, n_layers=2, d_ffn=48, head_dims=(24, 16))
BACKENDS = ("chunked", "triton")


@pytest.fixture(autouse=True, scope="module")
def _interpreter_active():
    if _TRITON_PRELOADED:
        pytest.fail("Triton was imported before TRITON_INTERPRET=1 was set (see this module's top)")


class SharedGain(nn.Module):
    """One gain for the whole LayerNorm: stride 0."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w[:1].expand_as(w)


class EveryOther(nn.Module):
    """The same values at stride 2."""

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return torch.stack([b, b], -1)[..., 0]


class ColumnMajor(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.t().contiguous().t()


class LeftPart(nn.Module):
    """The left D columns of a wider stored matrix: rows at stride 2·D."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w[:, : w.shape[1] // 2]

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return torch.cat([w, torch.zeros_like(w)], 1)


LAYOUTS = [
    ("decoder_norm", "weight", SharedGain),
    ("decoder.layers.0.norm3", "bias", EveryOther),
    ("decoder.layers.1.linear1", "bias", EveryOther),
    ("decoder.layers.0.multihead_attn", "in_proj_bias", EveryOther),
    ("decoder.layers.0.multihead_attn", "in_proj_weight", LeftPart),
    ("decoder.layers.1.linear2", "weight", ColumnMajor),
    ("mlp_head.0", "weight", ColumnMajor),
]


def _parametrized() -> cf.CrossAttentionAligner:
    al = make_aligner(CFG, seed=3)
    for part, name, kind in LAYOUTS:
        parametrize.register_parametrization(al.get_submodule(part), name, kind())
    return al


def _step(al: cf.CrossAttentionAligner, backend: str) -> tuple[torch.Tensor, ...]:
    """Both directions' loss with ragged masks → (loss, image and text token gradients,
    every parameter's gradient)."""
    g = torch.Generator().manual_seed(0)
    img = torch.randn(3, 7, CFG.d_model, generator=g).requires_grad_()
    txt = torch.randn(3, 5, CFG.d_model, generator=g).requires_grad_()
    al.zero_grad(set_to_none=True)
    loss = cf.carzero_loss(*cf.alignment_logits(al, img, txt, random_mask(3, 7, 1),
                                                random_mask(3, 5, 2), backend=backend,
                                                chunk_budget_bytes=1))  # fmt: skip
    loss.backward()
    return (loss, img.grad, txt.grad, *(p.grad for p in al.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_parametrized_weights_in_any_layout(backend):
    al = _parametrized()
    layouts = [getattr(al.get_submodule(part), name) for part, name, _ in LAYOUTS]
    assert not any(t.is_contiguous() for t in layouts)  # what the test is about
    g = torch.Generator().manual_seed(4)
    memory, queries = torch.randn(4, 9, CFG.d_model, generator=g), torch.randn(5, CFG.d_model)
    with torch.no_grad():
        want = al(memory, queries, backend="reference")
        assert rel_err(al(memory, queries, backend=backend, chunk_budget_bytes=1), want) < 1e-5
    ref, got = _step(al, "reference"), _step(al, backend)
    for r, x in zip(ref[:3], got[:3], strict=True):  # loss, token gradients
        assert rel_err(x, r) < 1e-5
    # the parameters' together: the last bias's gradient is 0 but for rounding (a constant
    # added to every logit leaves the softmax as it is)
    flat = [torch.cat([t.flatten() for t in grads[3:]]) for grads in (got, ref)]
    assert rel_err(*flat) < 1e-5


@pytest.mark.parametrize("backend", ("reference", *BACKENDS))
def test_nan_reaches_the_logits(backend):
    """A NaN token gives its item's logits NaN (not the ReLU's 0); a NaN weight every logit."""
    al = make_aligner(CFG, seed=5)
    g = torch.Generator().manual_seed(6)
    memory, queries = torch.randn(3, 6, CFG.d_model, generator=g), torch.randn(4, CFG.d_model)
    memory[1, 2, 5] = float("nan")
    with torch.no_grad():
        out = al(memory, queries, backend=backend)
        assert out[1].isnan().all() and not out[[0, 2]].isnan().any()
        al.decoder.layers[1].linear1.weight[3, 4] = float("nan")
        assert al(memory[[0, 2]], queries, backend=backend).isnan().all()
