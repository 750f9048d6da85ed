"""The chunked backend's attention on flash-attn / xformers (stand-ins here: the libraries
are CUDA-only; the stand-ins compute with SDPA in the libraries' layout, so the plumbing —
layout, selection, where it applies — is what is tested)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import make_aligner, random_mask

import carzero_fast as cf
from carzero_fast.backends.chunked import chunked_forward
from carzero_fast.backends.external_attention import available, use_attention

CFG = cf.AlignerConfig(d_model=64, n_heads=4, n_layers=2, d_ffn=96, head_dims=(48, 24))


def _bmhk_attention(q, k, v):  # noqa: ANN001, ANN202
    """Both libraries' layout: (batch, seq, heads, head_dim) in and out."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


@pytest.fixture
def fakes(monkeypatch):
    calls = {"flash_attn": 0, "xformers": 0}

    def flash_attn_func(q, k, v):  # noqa: ANN001, ANN202
        calls["flash_attn"] += 1
        return _bmhk_attention(q, k, v)

    def memory_efficient_attention(q, k, v):  # noqa: ANN001, ANN202
        calls["xformers"] += 1
        return _bmhk_attention(q, k, v)

    flash = types.ModuleType("flash_attn")
    flash.flash_attn_func = flash_attn_func
    xf, xf_ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    xf_ops.memory_efficient_attention = memory_efficient_attention
    xf.ops = xf_ops
    monkeypatch.setitem(sys.modules, "flash_attn", flash)
    monkeypatch.setitem(sys.modules, "xformers", xf)
    monkeypatch.setitem(sys.modules, "xformers.ops", xf_ops)
    return calls


def _run(dtype, mask=None):  # noqa: ANN001, ANN202
    al = make_aligner(CFG, dtype=dtype)
    mem = torch.randn(5, 17, 64).to(dtype)
    q = torch.randn(7, 64).to(dtype)
    with torch.no_grad():
        return chunked_forward(al.weights(), CFG, mem, q, mask, False, 20000, "kv")


@pytest.mark.parametrize("impl", ["flash_attn", "xformers"])
def test_selected_library_runs_the_kv_attention(fakes, impl):
    want = _run(torch.bfloat16)
    with use_attention(impl):
        got = _run(torch.bfloat16)
    assert fakes[impl] > 0
    assert torch.equal(got, want)  # same math in another layout: the same bits


def test_libraries_are_skipped_where_they_do_not_apply(fakes):
    with use_attention("flash_attn"):
        _run(torch.float32)  # 16-bit only
        _run(torch.bfloat16, mask=random_mask(5, 17))  # no key mask
    assert fakes["flash_attn"] == 0


def test_selection_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown attention"):
        with use_attention("cudnn"):
            pass
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails
    assert available()["flash_attn"] is False
    with pytest.raises(ImportError, match="not installed"):
        with use_attention("flash_attn"):
            pass
