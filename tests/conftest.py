"""Shared helpers: seeded aligners with non-trivial weights, error measures, golden data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import triton_interpreter
from safetensors.torch import load_file

import carzero_fast as cf

# Without a GPU, Triton's kernels can only run interpreted. The modules that run kernels set
# this too, before Triton's first import; setting it here as well makes any selection of test
# files work in any order (a module that imports Triton through the backends, collected before
# those modules, would otherwise load the compiler and make them fail at their guard).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist every worker is a process of its own: one thread each (and for the
# processes a test starts), so that two workers on two cores do not run four GEMM threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

GOLDEN = Path(__file__).parent / "data" / "carzero_d64_l2.safetensors"


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """‖a − b‖ / max(‖b‖, floor), in float64; NaN anywhere fails every comparison."""
    a, b = a.detach().double(), b.detach().double()
    if torch.isnan(a).any():
        return float("inf")
    return float((a - b).norm() / max(float(b.norm()), floor, 1e-300))


def assert_directions_draw_independent_dropout(
    al: cf.CrossAttentionAligner, tokens: torch.Tensor, backend: str, min_diff: float
) -> None:
    """i2t and t2i of one call each draw their own dropout seed, without and with autograd.
    With the same tokens on both sides the two directions compute the same pairs (i2t[n, m]
    and t2i[n, m] both score tokens n against the globals of m): equal in eval mode,
    different in training mode unless both used the same masks."""
    for grad in (False, True):  # no autograd, and a training step's call
        img, txt = tokens.clone().requires_grad_(grad), tokens.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            i2t, t2i = cf.alignment_logits(al.eval(), img, txt, backend=backend)
        assert rel_err(t2i, i2t) < 1e-6
        torch.manual_seed(10)
        with torch.set_grad_enabled(grad):
            i2t, t2i = cf.alignment_logits(al.train(), img, txt, backend=backend)
        assert rel_err(t2i, i2t) > min_diff, grad


@pytest.fixture(autouse=True, scope="session")
def _interpreter_patches_the_language_once():
    """`triton_interpreter.install` (a third off an interpreter test's time) where this
    process runs Triton interpreted: the modules that run kernels set TRITON_INTERPRET=1
    before Triton's first import, so Triton is imported by now (and not imported here)."""
    undo = triton_interpreter.install() if "triton" in sys.modules else None
    yield
    if undo is not None:
        undo()


@pytest.fixture
def nan_buffers(monkeypatch):  # noqa: ANN001, ANN201
    """Every tensor allocated through torch.empty / empty_like / Tensor.new_empty while the
    test runs starts as NaN (floating dtypes), so that an element read before it is written,
    or never written, shows up in the comparison."""

    def nan_filled(alloc):  # noqa: ANN001, ANN202
        def nan_alloc(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            t = alloc(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        return nan_alloc

    for name in ("empty", "empty_like"):
        monkeypatch.setattr(torch, name, nan_filled(getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "new_empty", nan_filled(torch.Tensor.new_empty))


@pytest.fixture(params=["fp32", "native"])
def products16(request, monkeypatch):  # noqa: ANN001, ANN201
    """Run a test with the chunked backend's 16-bit CPU products computed in fp32 (as on
    CPUs without native 16-bit GEMMs) and with PyTorch's 16-bit products, whatever this CPU
    has (`cpu_gemm.fp32_products`)."""
    from carzero_fast.backends import cpu_gemm

    wide = {torch.bfloat16, torch.float16} if request.param == "fp32" else set()
    monkeypatch.setattr(cpu_gemm, "_FP32_PRODUCTS", frozenset(wide))
    return request.param


def make_aligner(
    cfg: cf.AlignerConfig | None = None, seed: int = 0, dtype: torch.dtype = torch.float32
) -> cf.CrossAttentionAligner:
    """An aligner whose every parameter is random (biases and norms included), so that no
    term of the math hides behind a zero or a one."""
    torch.manual_seed(seed)
    al = cf.CrossAttentionAligner(cfg)
    with torch.no_grad():
        for name, p in al.named_parameters():
            if name.endswith("norm2.weight") or "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return al.to(dtype).eval()


def random_mask(n: int, p: int, seed: int = 0) -> torch.Tensor:
    """Ragged key-padding mask (True = ignore), at least one visible token per item."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, p + 1, (n,), generator=g)
    return torch.arange(p)[None, :] >= lengths[:, None]


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same `(N, P)` values with strides (1, N), as a transposed `(P, N)` mask gives:
    kernels that index rows as `r·stride(0) + c` must not be handed it as is."""
    out = t.t().contiguous().t()
    assert out.stride() == (1, t.shape[0]) and torch.equal(out, t)
    return out


@pytest.fixture(scope="session")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN))


@pytest.fixture(scope="session")
def golden_weights(golden: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("weights.") :]: v for k, v in golden.items() if k.startswith("weights.")}


@pytest.fixture
def triton_only(monkeypatch):
    """Fail if a call meant for the fused kernels falls back to the chunked backend."""
    import carzero_fast.backends as backends

    def refuse(*args, **kwargs):
        raise AssertionError("the triton backend fell back to chunked")

    monkeypatch.setattr(backends, "chunked_forward", refuse)
    monkeypatch.setattr(backends, "chunked_both_directions", refuse)
