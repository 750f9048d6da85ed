"""Benchmarks: every backend side by side in one process, against a GEMM ceiling measured
in the same run (DESIGN.md §2). `python -m benchmarks` and `carzero-fast bench` run `main`.

Figures:
- time: median wall time of `repeats` runs, backends interleaved round by round so that a
  slow phase of the machine hits all of them alike;
- model GFLOP/s: the original algorithm's FLOPs (pairs × `flops_per_pair` + items × K/V
  projections; ×3 for a training step: forward + backward) over time. The same count for
  every backend, so it is a rate of useful work; a backend that recomputes or folds does other
  FLOPs than it is credited with;
- executed GFLOP/s: the FLOPs the path really executes (the chunked backend folds projections
  and, in training, recomputes its forward but for the chunk the forward keeps:
  `chunked.executed_flops`, `chunked.last_chunk`) over time;
- ceiling: the fastest dense GEMM of the dtype measured in this process (PyTorch's product or
  oneDNN's, whichever is faster), executed GFLOP/s over it;
- peak extra memory: tensor bytes alive at once beyond the inputs and the model
  (`track_memory`), from a separate, untimed run. Each dtype's rows run a copy of the model in
  that dtype (as a bf16 user would hold it), so no row counts a per-call cast of the weights;
  the training step's inputs are made once, outside the measured call, and its counted bytes
  are what the step allocates: activations, the inputs' and parameters' gradients;
- ratio: the reference's time (fp32, the baseline) over this row's time.

`main` first asks glibc to keep freed memory (`memory.retain_freed_memory`, `--malloc keep`):
with its defaults the reference page-faults ~1 GB of fresh memory in per call, which made it
10–40% slower depending on what ran before it. `--malloc default` measures that case.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .aligner import CrossAttentionAligner
from .backends.chunked import last_chunk
from .backends.cpu_gemm import fp32_products, mm_t, onednn_enabled
from .backends.plan import default_budget, executed_flops, plan_chunks, use_folded_form
from .config import AlignerConfig
from .csvfiles import write_json
from .loss import alignment_logits, carzero_loss
from .memory import device_sync as _sync
from .memory import retain_freed_memory, track_memory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Row:
    task: str  # "forward" (one direction, no grad) or "train" (both directions + backward)
    backend: str
    dtype: str
    n: int
    m: int
    p: int
    time_s: float
    pairs_per_s: float
    model_gflops: float  # the original algorithm's FLOPs over time
    executed_gflops: float  # the FLOPs this path executes over time
    ceiling_gflops: float
    frac_ceiling: float  # executed over the GEMM ceiling
    peak_extra_mib: float
    speedup_vs_reference_fp32: float | None = None


def gemm_ceiling(dtype: torch.dtype, device: torch.device, repeats: int = 5,
                 rows: int | None = None) -> float:  # fmt: skip
    """Fastest dense GEMM rate (GFLOP/s) over CARZero-like shapes, measured now: the best of
    PyTorch's own product and the chunked backend's route (`cpu_gemm.mm_t`: oneDNN for fp32 on
    CPU), so that no row is judged against a slower library than the one it uses.

    rows: the products' row count (default 8192 on CPU, 65536 on CUDA: large enough to reach
    the rate; a smoke run passes a small one). On CUDA each timing spans 10 products back to
    back between synchronisations, so that the host's launch time is not counted in. Where
    the route computes a 16-bit dtype's products in fp32 (`cpu_gemm.fp32_products`: this
    PyTorch has no native 16-bit CPU kernel), PyTorch's own product of that dtype is its
    generic loop, 60–150× slower (~1 GFLOP/s on AVX2, BENCHMARKS.md), and only the route is timed.
    """
    best = 0.0
    rows = rows or (8192 if device.type == "cpu" else 65536)
    calls = 1 if device.type == "cpu" else 10
    for k, n in ((768, 1024), (1024, 768), (768, 768)):
        a = torch.randn(rows, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        route = lambda x, y: mm_t(x, y.t())  # noqa: E731
        for product in (route,) if fp32_products(a) else (torch.mm, route):
            product(a, b)
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(calls):
                    product(a, b)
                _sync(device)
                rate = calls * 2 * rows * k * n / (time.perf_counter() - t0) / 1e9
                best = max(best, rate)
    return best


def interleaved_median(fns: dict, repeats: int, device: torch.device) -> dict:
    """Median wall time of each of `fns` (name → call) over `repeats` rounds, after one
    warm-up call each; the calls alternate round by round, so a slow phase of the machine
    hits every one alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for key, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _peak_mib(fn: Callable[[], object]) -> float:
    with track_memory() as tracker:
        fn()
    return tracker.peak_bytes / 2**20


def _executed(cfg, backend, shapes, model_flops, device, train=False) -> float:  # noqa: ANN001
    """FLOPs a backend executes for the (n, m, p) jobs in `shapes` (fp32)."""
    if backend != "chunked":
        return model_flops
    folded = [use_folded_form(cfg, m, p) for _, m, p in shapes]
    fwd = sum(executed_flops(cfg, n, m, p, f) for (n, m, p), f in zip(shapes, folded, strict=True))
    if not train:
        return fwd
    # forward, its recomputation (but for the last job's last chunk, which the forward keeps)
    # and a backward of twice the forward
    n, m, p = shapes[-1]
    plan = plan_chunks(cfg, n, m, p, 4, default_budget(device.type, True), True, folded[-1])
    (n0, n1), (m0, m1) = last_chunk(plan, n, m, device)
    return 4 * fwd - executed_flops(cfg, n1 - n0, m1 - m0, p, folded[-1])


def run(
    n: int = 64,
    m: int = 64,
    p_img: int = 197,
    p_txt: int = 98,
    dtypes: tuple[str, ...] = ("fp32", "bf16"),
    backends: tuple[str, ...] = ("reference", "chunked"),
    train_batch: int = 48,
    repeats: int = 3,
    config: AlignerConfig | None = None,
    device: str = "cpu",
    measure_memory: bool = True,
    ceiling_rows: int | None = None,
) -> list[Row]:
    """Forward rows (one direction, images as memory, N×M pairs) and training rows (a CARZero
    step on a square batch, both directions); reference fp32 is the baseline of every ratio."""
    dev = torch.device(device)
    cfg = config or AlignerConfig()
    torch.manual_seed(0)
    al = CrossAttentionAligner(cfg).to(dev)
    work = [(b, d) for d in dtypes for b in backends]
    if ("reference", "fp32") not in work:
        work.insert(0, ("reference", "fp32"))
    ceilings = {d: gemm_ceiling(DTYPES[d], dev, rows=ceiling_rows)
                for d in {d for _, d in work}}  # fmt: skip
    rows: list[Row] = []

    # forward: one direction, no grad
    if n > 0 and m > 0:
        al.eval()
        mem = torch.randn(n, p_img, cfg.d_model, device=dev)
        q = torch.randn(m, cfg.d_model, device=dev)
        inputs = {d: (mem.to(DTYPES[d]), q.to(DTYPES[d])) for d in ceilings}
        models = {d: al if d == "fp32" else copy.deepcopy(al).to(DTYPES[d]) for d in ceilings}

        def fwd(b: str, d: str) -> Callable[[], object]:
            def f() -> object:
                with torch.no_grad():
                    return models[d](*inputs[d], backend=b)

            return f

        times = interleaved_median({w: fwd(*w) for w in work}, repeats, dev)
        flops = n * m * cfg.flops_per_pair(p_img) + n * cfg.kv_flops_per_item(p_img)
        for b, d in work:
            t = times[(b, d)]
            done = _executed(cfg, b, [(n, m, p_img)], flops, dev)
            rows.append(Row("forward", b, d, n, m, p_img, t, n * m / t, flops / t / 1e9,
                            done / t / 1e9, ceilings[d], done / t / 1e9 / ceilings[d],
                            _peak_mib(fwd(b, d)) if measure_memory else float("nan")))  # fmt: skip

    # training step: both directions, CARZero's loss, backward; fp32 (the training dtype here)
    if train_batch > 0:
        al.train()
        bt = train_batch
        img = torch.randn(bt, p_img, cfg.d_model, device=dev, requires_grad=True)
        txt = torch.randn(bt, p_txt, cfg.d_model, device=dev, requires_grad=True)

        def step(b: str) -> Callable[[], object]:
            def f() -> object:
                img.grad = txt.grad = None
                al.zero_grad(set_to_none=True)
                loss = carzero_loss(*alignment_logits(al, img, txt, backend=b))
                loss.backward()
                return loss

            return f

        train_backends = [b for b in backends if b in ("reference", "chunked")]
        if "reference" not in train_backends:
            train_backends.insert(0, "reference")
        times = interleaved_median({b: step(b) for b in train_backends}, max(1, repeats - 1), dev)
        flops = 3 * bt * bt * (cfg.flops_per_pair(p_img) + cfg.flops_per_pair(p_txt))
        flops += 3 * bt * (cfg.kv_flops_per_item(p_img) + cfg.kv_flops_per_item(p_txt))
        for b in train_backends:
            t = times[b]
            # forward + recomputation + backward (2×) for chunked; forward + backward otherwise
            done = _executed(cfg, b, [(bt, bt, p_img), (bt, bt, p_txt)], flops, dev, train=True)
            rows.append(Row("train", b, "fp32", bt, bt, p_img, t, 2 * bt * bt / t,
                            flops / t / 1e9, done / t / 1e9, ceilings["fp32"],
                            done / t / 1e9 / ceilings["fp32"],
                            _peak_mib(step(b)) if measure_memory else float("nan")))  # fmt: skip
        al.zero_grad(set_to_none=True)
        img.grad = txt.grad = None

    for task in ("forward", "train"):
        base = [
            r for r in rows if r.task == task and r.backend == "reference" and r.dtype == "fp32"
        ]
        for r in rows:
            if r.task == task and base:
                r.speedup_vs_reference_fp32 = base[0].time_s / r.time_s
    return rows


def machine_info() -> dict[str, str]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            info["cpu"] = f"{names[0]} ({len(names)} logical cores)"
    except OSError:
        pass
    # what the CPU's products run on: without native bf16 (AVX2 only) PyTorch's bf16 GEMMs take
    # a generic loop, 60–150× slower than fp32 on such a machine (the reference's bf16 rows show
    # it), and the chunked backend computes its 16-bit products in fp32 (`cpu_gemm`)
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    try:
        info["onednn_bf16"] = str(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        info["onednn_bf16"] = "unknown"
    cpu = torch.zeros(0)
    info["chunked_fp32_products"] = "oneDNN" if onednn_enabled(cpu) else "PyTorch"
    info["chunked_16bit_products"] = ", ".join(
        f"{name} {'fp32' if fp32_products(cpu.to(dt)) else 'native'}"
        for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)))  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["commit"] = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = "unknown"
    return info


def markdown(rows: list[Row]) -> str:
    head = ("| task | backend | dtype | N×M (P) | time | pairs/s | model GFLOP/s "
            "| executed GFLOP/s (of GEMM ceiling) | peak extra MiB | speed-up vs reference fp32 |\n"
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    lines = [head]
    for r in rows:
        ratio = "" if r.speedup_vs_reference_fp32 is None else f"{r.speedup_vs_reference_fp32:.2f}×"
        lines.append(
            f"| {r.task} | {r.backend} | {r.dtype} | {r.n}×{r.m} ({r.p}) | {r.time_s:.3f} s "
            f"| {r.pairs_per_s:,.0f} | {r.model_gflops:.1f} | {r.executed_gflops:.1f} "
            f"({100 * r.frac_ceiling:.0f}% of {r.ceiling_gflops:.0f}) | {r.peak_extra_mib:.1f} "
            f"| {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="carzero-fast bench",
        description="Time every backend side by side at CARZero dims (D=768, 4 layers).",
    )
    ap.add_argument("--n", type=int, default=64, help="memory items (images) per forward")
    ap.add_argument("--m", type=int, default=64, help="queries (text globals) per forward")
    ap.add_argument("--p", type=int, default=197, help="tokens per image (CLS + patches)")
    ap.add_argument("--train-batch", type=int, default=48, help="training step batch, 0 = skip")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, fp16")
    ap.add_argument("--backends", default="reference,chunked", help="comma list of backends")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d-model", type=int, default=768, help="smaller values for a smoke run")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    ap.add_argument("--ceiling-rows", type=int, default=None,
                    help="rows of the GEMM-ceiling products (default 8192 on CPU, 65536 on "
                         "CUDA; small values for a smoke run)")  # fmt: skip
    ap.add_argument("--json", type=Path, help="also write rows and machine info as JSON here")
    ap.add_argument("--malloc", choices=("keep", "default"), default="keep",
                    help="keep: glibc keeps freed memory (no page faults after warm-up, the "
                         "strictest baseline); default: glibc's defaults")  # fmt: skip
    args = ap.parse_args(argv)
    dtypes, backends = _check_args(ap, args)  # before anything is timed
    malloc = retain_freed_memory() if args.malloc == "keep" else "default"
    d_model = args.d_model
    cfg = AlignerConfig(d_model=d_model, n_heads=4 if d_model % 4 == 0 else 1)
    rows = run(args.n, args.m, args.p, 98, dtypes, backends, args.train_batch, args.repeats,
               cfg, args.device, not args.no_memory, args.ceiling_rows)  # fmt: skip
    info = machine_info()
    info["malloc"] = malloc
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    print(markdown(rows))
    if args.json:
        write_json(args.json, {"machine": info, "rows": [asdict(r) for r in rows]})
    return 0


def _uniques(text: str) -> tuple[str, ...]:
    """A comma list's names, each once, in order."""
    return tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))


def _check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[tuple, tuple]:
    """(dtypes, backends); `ap.error` (exit 2, one line) for what would fail after minutes
    of timing: unknown names, sizes and repeats out of range, a device that is not there, a
    --json that cannot be written."""
    from .backends import BACKENDS

    dtypes, backends = _uniques(args.dtypes), _uniques(args.backends)
    for what, names, known in (("dtype", dtypes, DTYPES), ("backend", backends, BACKENDS)):
        if not names:
            ap.error(f"no {what} given")
        for name in names:
            if name not in known:
                ap.error(f"unknown {what} {name!r}; choose from {', '.join(known)}")
    for flag, value, low in (("--n", args.n, 0), ("--m", args.m, 0), ("--p", args.p, 1),
                             ("--train-batch", args.train_batch, 0),
                             ("--repeats", args.repeats, 1), ("--d-model", args.d_model, 1),
                             ("--ceiling-rows", args.ceiling_rows or 1, 1)):  # fmt: skip
        if value < low:
            ap.error(f"{flag} must be at least {low}, got {value}")
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        ap.error(f"--device {args.device}: {(str(e).splitlines() or ['not available'])[0]}")
    if "triton" in backends and device.type != "cuda":
        ap.error("--backends triton runs on CUDA devices only (on a GPU: --device cuda, or "
                 "python3 -m benchmarks.gpu_check)")  # fmt: skip
    if args.json is not None:
        folder = args.json.parent
        if args.json.is_dir():
            ap.error(f"--json {args.json} is a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            ap.error(f"--json {args.json}: cannot make its folder ({e.strerror or e})")
        if not os.access(folder, os.W_OK):
            ap.error(f"--json {args.json}: cannot write in {folder}")
    return dtypes, backends
