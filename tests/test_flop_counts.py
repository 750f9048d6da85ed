"""The FLOP formulas the benchmarks divide by, against the matrix products each path really
dispatches (counted at PyTorch's dispatcher): a formula that credits work nobody executes
would inflate every TFLOP/s and fraction of the ceiling quoted from it."""

from __future__ import annotations

import pytest
import torch
from conftest import make_aligner
from torch.utils._python_dispatch import TorchDispatchMode

import carzero_fast as cf
from carzero_fast.backends.chunked import chunked_forward
from carzero_fast.backends.plan import executed_flops

aten = torch.ops.aten


class GemmFlops(TorchDispatchMode):
    """2·m·k·n of every matrix product dispatched, and 4·items·heads·m·P·dh of SDPA."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        p = func.overloadpacket
        if p is aten.mm:
            self.flops += 2 * args[0].shape[0] * args[0].shape[1] * args[1].shape[1]
        elif p in (aten.addmm, aten.addmm_):
            self.flops += 2 * args[1].shape[0] * args[1].shape[1] * args[2].shape[1]
        elif p is aten.bmm:
            a, b = args[0], args[1]
            self.flops += 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        elif p in (aten.baddbmm, aten.baddbmm_):
            a, b = args[1], args[2]
            self.flops += 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        elif "scaled_dot_product" in p.__name__:
            q, k = args[0], args[1]  # [items, H, m, dh], [items, H, P, dh]
            self.flops += 4 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1]
        elif p in (aten.matmul, aten.linear, aten.einsum, aten.mv, aten.addmv, aten.dot):
            raise AssertionError(f"uncounted product {func}")  # (composites decompose first)
        return func(*args, **(kwargs or {}))


CFG = cf.AlignerConfig(d_model=64, n_heads=4, n_layers=2, d_ffn=96, head_dims=(80, 48, 24))


def _count(fn) -> int:  # noqa: ANN001
    with torch.no_grad(), GemmFlops() as counter:
        fn()
    return counter.flops


@pytest.mark.parametrize("n,m,p", [(5, 7, 17), (3, 1, 9)])
def test_flop_formulas_are_the_products_each_path_runs(n, m, p):
    al = make_aligner(CFG)
    mem, q = torch.randn(n, p, CFG.d_model), torch.randn(m, CFG.d_model)
    original = n * m * CFG.flops_per_pair(p) + n * CFG.kv_flops_per_item(p)
    assert _count(lambda: al(mem, q, backend="reference")) == original
    for form in ("kv", "folded"):
        counted = _count(lambda f=form: chunked_forward(al.weights(), CFG, mem, q, None, False,
                                                         form=f))  # fmt: skip
        assert counted == executed_flops(CFG, n, m, p, folded=form == "folded")
    # the streaming paths project layer 1's queries once per query, not once per pair: the
    # useful count (the benchmarks' denominator) is below the original's by that projection
    useful = executed_flops(CFG, n, m, p, folded=False)
    assert original - useful == (n - 1) * m * 2 * CFG.d_model**2


def test_bench_rows_credit_the_products_each_backend_runs(monkeypatch):
    """`carzero_fast.bench`'s figures at a tiny config, every call run once under the counter
    (time 1 s): a row's model FLOPs are what the reference dispatches (its forward, and a
    training step: forward, backward of twice the forward, loss), its executed FLOPs what its
    own path dispatches. The chunked training step's count models the recomputation (all but
    the kept last chunk) within 2%; a forward without the K/V projections, a step counted as
    2× or 3× the forward instead of 3× and 4×, or executed FLOPs equal to the model's, are off
    by 5% or more."""
    from carzero_fast import bench

    counted = {}

    def count_once(fns, repeats, device):  # noqa: ANN001, ANN202
        for key, fn in fns.items():
            with GemmFlops() as counter:
                fn()
            counted[key] = counter.flops
        return dict.fromkeys(fns, 1.0)

    monkeypatch.setattr(bench, "interleaved_median", count_once)
    monkeypatch.setattr(bench, "gemm_ceiling", lambda *args, **kwargs: 1.0)
    cfg = cf.AlignerConfig(d_model=32, n_heads=4, n_layers=2, d_ffn=48, head_dims=(40, 24))
    rows = bench.run(3, 2, 5, 4, ("fp32",), ("reference", "chunked"), 2, 1, cfg,
                     measure_memory=False)  # fmt: skip
    assert {(r.task, r.backend) for r in rows} == {(t, b) for t in ("forward", "train")
                                                    for b in ("reference", "chunked")}  # fmt: skip
    for r in rows:
        done = counted[(r.backend, r.dtype) if r.task == "forward" else r.backend]
        if r.backend == "reference":
            assert r.model_gflops * 1e9 == pytest.approx(done, rel=1e-12), r
            assert r.executed_gflops == r.model_gflops
        elif r.task == "forward":
            assert r.executed_gflops * 1e9 == pytest.approx(done, rel=1e-12), r
        else:
            assert r.executed_gflops * 1e9 == pytest.approx(done, rel=0.02), (r, done)
    model = {r.task: r.model_gflops for r in rows}
    assert all(r.model_gflops == model[r.task] for r in rows)  # one count for every backend
