"""Helpers shared by the GPU check's sections (`gpu_check.py`, `gpu_training.py`): timing (also
`train_scaling.py`'s), the GEMM ceiling, the test model, error measures, and switches that
change a backend's route while one call runs."""

from __future__ import annotations

import os
import statistics
import time
import traceback
from collections.abc import Callable

import torch

import carzero_fast as cf
from carzero_fast.memory import device_sync as sync

BUDGET = 512 * 2**20  # the same chunk budget for chunked and triton (triton's default)


def median_time(fn: Callable[[], object], dev: torch.device, reps: int = 3) -> float:
    fn()  # warm-up: JIT, autotuning caches, allocator
    times = []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def graph_replay(fn: Callable[[], torch.Tensor], dev: torch.device) -> Callable[[], torch.Tensor]:
    """`fn` captured in a CUDA graph at the first call and replayed at every call after: the
    same kernels without the host's launches or the gaps between them, so that beside `fn`'s
    own row it measures what launching costs (a measurement, not a route of the package).

    The first call runs `fn` eagerly (compiles, plans), warms it on a side stream as
    PyTorch's capture recipe asks, captures, replays, and compares the replay's result with
    the eager call's: it prints whether they are bit for bit the same, and raises when they
    differ by more than 1e-2 relative (a replay reading stale buffers, not another GEMM
    algorithm's rounding). The graph's memory pool stays allocated between calls, so a
    replay's peak extra memory reads ~0: the eager row's is the call's memory.
    """
    state: dict[str, object] = {}

    def run() -> torch.Tensor:
        if "graph" not in state:
            eager = fn()
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn()
            graph.replay()
            same = torch.equal(out, eager)
            diff = 0.0 if same else rel(out, eager)
            print(f"  graph replay against an eager call: "
                  f"{'bit for bit' if same else f'relative difference {diff:.2e}'}", flush=True)
            if diff > 1e-2:
                raise AssertionError(f"the graph's replay differs from an eager call: "
                                     f"relative difference {diff:.2e}")  # fmt: skip
            state.update(graph=graph, out=out)
            return out
        state["graph"].replay()
        return state["out"]

    return run


def gemm_ceiling_tflops(dev: torch.device, smoke: bool) -> dict[str, float]:
    """bf16 GEMM rates now: a large square product and CARZero's FFN shape."""
    shapes = {"8192^3": (8192, 8192, 8192), "65536x768x1024": (65536, 768, 1024)}
    if smoke:
        shapes = {"256^3": (256, 256, 256)}
    out = {}
    calls = 2 if smoke else 30  # back to back between syncs: the host's ~15 µs a call hidden
    for name, (m, k, n) in shapes.items():
        a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        b = torch.randn(k, n, device=dev, dtype=torch.bfloat16)
        c = torch.empty(m, n, device=dev, dtype=torch.bfloat16)

        def products(a: torch.Tensor = a, b: torch.Tensor = b, c: torch.Tensor = c) -> None:
            for _ in range(calls):
                torch.mm(a, b, out=c)

        t = median_time(products, dev, reps=5) / calls
        out[name] = 2 * m * k * n / t / 1e12
    return out


def make_model(cfg: cf.AlignerConfig, dev: torch.device) -> cf.CrossAttentionAligner:
    """Random weights everywhere (norms and biases too), eval mode."""
    torch.manual_seed(0)
    al = cf.CrossAttentionAligner(cfg)
    with torch.no_grad():
        for name, p in al.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return al.to(dev).eval()


def record(out: dict, key: str, fn: Callable[[], object]) -> object | None:
    """out[key] = fn(), or the text of the error it raised (printed with its traceback): a
    failed check costs its own entry only, the section's other checks and timings still run
    and are recorded. Returns fn()'s value, or None when it raised."""
    try:
        out[key] = fn()
    except Exception as e:  # noqa: BLE001 — recorded in the results, the run goes on
        traceback.print_exc()
        out[key] = f"error: {type(e).__name__}: {e}"[:1000]
        return None
    return out[key]


def passed(values: object, test: Callable[[object], bool]) -> bool:
    """test(values), False when a check recorded an error instead of its values."""
    if isinstance(values, str) and values.startswith("error:"):
        return False
    return bool(test(values))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm())


def autocast(dev: torch.device):  # noqa: ANN201
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cpu", enabled=False)


def with_env(fn: Callable[[], object], **env: str) -> Callable[[], object]:
    """`fn` with environment variables set while it runs (the backends read their routes at
    every call), e.g. `CARZERO_FAST_TRITON_GEMM="triton"`: the triton backend's plain-epilogue
    GEMMs on its own kernel against the default (cuBLAS for bf16)."""

    def run() -> object:
        old = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for name, value in old.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value

    return run
