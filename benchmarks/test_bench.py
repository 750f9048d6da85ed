"""pytest-benchmark timings (`pytest benchmarks/ -n 0`, one process); not part of the test suite.

Each group holds the reference and the chunked backend at the same size, so pytest-benchmark's
comparison table shows the ratio. Sizes are small enough for a 2-core CPU. Like
`python -m benchmarks`, the session keeps freed memory (`retain_freed_memory`), so that the
reference is not timed page-faulting its activations in (carzero_fast/bench.py).
"""

from __future__ import annotations

import pytest
import torch

import carzero_fast as cf
from carzero_fast.memory import retain_freed_memory

N = M = 16


@pytest.fixture(scope="module", autouse=True)
def _no_page_faults():
    retain_freed_memory()


@pytest.fixture(scope="module")
def aligner():
    torch.manual_seed(0)
    return cf.CrossAttentionAligner().eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_forward(benchmark, aligner, backend, dtype):
    benchmark.group = f"forward {N}x{M} P=197"
    mem = torch.randn(N, 197, 768, dtype=dtype)
    q = torch.randn(M, 768, dtype=dtype)
    with torch.no_grad():
        out = benchmark(aligner, mem, q, backend=backend)
    assert out.shape == (N, M)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_training_step(benchmark, aligner, backend):
    benchmark.group = f"training step B={N}"
    img, txt = torch.randn(N, 197, 768), torch.randn(N, 98, 768)
    aligner.train()

    def step():
        i, t = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        aligner.zero_grad(set_to_none=True)
        loss = cf.carzero_loss(*cf.alignment_logits(aligner, i, t, backend=backend))
        loss.backward()
        return loss

    loss = benchmark.pedantic(step, rounds=2, iterations=1)
    aligner.eval()
    assert torch.isfinite(loss)
