"""The host's share of a `triton` forward: the Python time of one call with every kernel
launch and every PyTorch GEMM replaced by a counter, so what is left is the executor's and
the launchers' own work (plans, views, argument checks, grids, the Triton launch call up to
the driver). On a GPU that time overlaps the kernels; where it exceeds them (small calls),
the call is host-bound.

    python -m benchmarks.host_time [--items 22] [--queries 8] [--reps 15]

Runs on the CPU under Triton's interpreter (`TRITON_INTERPRET=1`, set here before Triton's
import), with the GPU's routes: the plain-epilogue GEMMs and the residual adds on PyTorch's
GEMM (`CARZERO_FAST_TRITON_GEMM=library`), as 16-bit calls on CUDA run them. The budget gives
one item per block over all queries, so `--items` sets the number of item blocks: 22 is the
plan of N = M = 1024 at CARZero dims (512 MiB, 16-bit stream). Real Triton launches add
their own C launcher's time, which the stubs leave out; PyTorch's other operations (the
weights' concatenation for the K/V projection, LN0 of the queries, views) still run, on the
CPU here where a GPU would queue them. `us_per_launch` divides the whole call, per-call
work included, by its launches.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

os.environ["TRITON_INTERPRET"] = "1"  # before Triton's first import

import torch  # noqa: E402

import carzero_fast as cf  # noqa: E402
from carzero_fast.backends.fused import plan_fused, triton_forward  # noqa: E402

from .gpu_common import with_env  # noqa: E402


@contextmanager
def stubbed_launches() -> Iterator[dict[str, int]]:
    """Triton kernel launches and PyTorch's GEMMs (`addmm`, its ReLU form and the in-place
    `addmm_` of the residual adds) do nothing but count; the outputs keep what they held."""
    from triton.runtime.interpreter import InterpretedFunction

    counts = {"triton": 0, "gemm": 0}

    def launcher(self, grid):  # noqa: ANN001, ANN202
        def launch(*args: object, **kwargs: object) -> None:
            counts["triton"] += 1

        return launch

    def gemm(bias: torch.Tensor, a: torch.Tensor, w: torch.Tensor, *,
             out: torch.Tensor) -> torch.Tensor:  # fmt: skip
        counts["gemm"] += 1
        return out

    def gemm_into(self: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        counts["gemm"] += 1
        return self

    saved = (InterpretedFunction.__getitem__, torch.addmm, torch._addmm_activation,
             torch.Tensor.addmm_)  # fmt: skip
    InterpretedFunction.__getitem__ = launcher
    torch.addmm, torch._addmm_activation, torch.Tensor.addmm_ = gemm, gemm, gemm_into
    try:
        yield counts
    finally:
        (InterpretedFunction.__getitem__, torch.addmm, torch._addmm_activation,
         torch.Tensor.addmm_) = saved  # fmt: skip


def one_block_per_item(cfg: cf.AlignerConfig, n: int, m: int, p: int) -> int:
    """The smallest budget whose plan is blocks of one item over all `m` queries (16-bit)."""
    budget = 1
    while plan_fused(cfg, n, m, p, 2, budget, 2) != (1, m):
        budget = int(budget * 1.05) + 1
    return budget


def measure(cfg: cf.AlignerConfig, items: int, queries: int, reps: int,
            p: int = 197) -> dict:  # fmt: skip
    """Host ms of one forward (median of `reps`, after a warm-up) and launches per call."""
    torch.manual_seed(0)
    al = cf.CrossAttentionAligner(cfg).eval().to(torch.bfloat16)
    mem = torch.randn(items, p, cfg.d_model).bfloat16()
    q = torch.randn(queries, cfg.d_model).bfloat16()
    budget = one_block_per_item(cfg, items, queries, p)
    w = al.weights()
    # the GPU's route for the plain-epilogue GEMMs and the residual adds, while `call` runs
    call = with_env(lambda: triton_forward(w, cfg, mem, q, None, budget, None),
                    CARZERO_FAST_TRITON_GEMM="library")  # fmt: skip
    with torch.no_grad(), stubbed_launches() as counts:
        call()
        counts.update(triton=0, gemm=0)
        call()
        launches = dict(counts)
        times = [_time(call) for _ in range(reps)]
    ms = statistics.median(times) * 1e3
    total = launches["triton"] + launches["gemm"]
    return {"item_blocks": items, "queries": queries, "p": p,
            "triton_launches": launches["triton"], "gemm_calls": launches["gemm"],
            "host_ms": ms, "host_ms_min": min(times) * 1e3,
            "us_per_launch": ms * 1e3 / max(total, 1)}  # fmt: skip


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=22, help="item blocks (one item each)")
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--tiny", action="store_true", help="a small config (for tests)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = (cf.AlignerConfig(d_model=64, n_heads=4, n_layers=2, d_ffn=96, head_dims=(48, 24))
           if args.tiny else cf.AlignerConfig())  # fmt: skip
    r = measure(cfg, args.items, args.queries, args.reps)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['item_blocks']} item blocks: {r['triton_launches']} Triton launches + "
              f"{r['gemm_calls']} GEMM calls, host {r['host_ms']:.2f} ms a forward (min "
              f"{r['host_ms_min']:.2f}), {r['us_per_launch']:.1f} µs a launch")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
