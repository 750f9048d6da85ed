"""The benchmark CLI runs end to end (tiny dims; timings are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from carzero_fast import bench
from carzero_fast.aligner import CrossAttentionAligner
from carzero_fast.bench import main as bench_main
from carzero_fast.cli import main as cli_main
from carzero_fast.config import AlignerConfig


def test_bench_writes_a_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--n", "3", "--m", "2", "--p", "5", "--train-batch", "2", "--d-model", "32",
            "--repeats", "1", "--json", str(out), "--malloc", "default",
            "--ceiling-rows", "64"]  # fmt: skip  (8192 rows of bf16 take minutes without AVX-512)
    assert cli_main(["bench", *args]) == 0
    table = capsys.readouterr().out
    assert "| forward | chunked | bf16 |" in table and "| train | reference | fp32 |" in table
    result = json.loads(out.read_text())
    assert result["machine"]["malloc"] == "default"
    rows = result["rows"]
    assert {(r["task"], r["backend"], r["dtype"]) for r in rows} == {
        ("forward", "reference", "fp32"),
        ("forward", "chunked", "fp32"),
        ("forward", "reference", "bf16"),
        ("forward", "chunked", "bf16"),
        ("train", "reference", "fp32"),
        ("train", "chunked", "fp32"),
    }
    base = {r["task"]: r["time_s"] for r in rows
            if r["backend"] == "reference" and r["dtype"] == "fp32"}  # fmt: skip
    for r in rows:  # every figure from its own row's time and the same run's baseline
        assert r["peak_extra_mib"] > 0
        assert r["speedup_vs_reference_fp32"] == pytest.approx(base[r["task"]] / r["time_s"])
        assert r["frac_ceiling"] == pytest.approx(r["executed_gflops"] / r["ceiling_gflops"])
        pairs = r["n"] * r["m"] * (2 if r["task"] == "train" else 1)
        assert r["pairs_per_s"] == pytest.approx(pairs / r["time_s"])
    machine = result["machine"]
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["onednn_bf16"] in ("True", "False", "unknown")
    assert machine["chunked_16bit_products"] in {f"bf16 {a}, fp16 {b}" for a in ("fp32", "native")
                                                 for b in ("fp32", "native")}  # fmt: skip


def test_16bit_ceiling_times_the_route_only_where_it_computes_in_fp32(monkeypatch):
    """Where the chunked route computes a 16-bit dtype's products in fp32, PyTorch's own
    product of that dtype (a generic loop, minutes at the default rows without AVX-512) is
    not timed; elsewhere both are, and the ceiling is the faster."""
    from carzero_fast.backends import cpu_gemm

    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: calls.append(a.dtype) or real_mm(a, b))
    for wide, want in ((frozenset({torch.bfloat16}), []), (frozenset(), [torch.bfloat16] * 18)):
        monkeypatch.setattr(cpu_gemm, "_FP32_PRODUCTS", wide)
        calls.clear()
        assert bench.gemm_ceiling(torch.bfloat16, torch.device("cpu"), repeats=5, rows=16) > 0
        assert [c for c in calls if c == torch.bfloat16] == want


def test_cli_usage_and_bad_arguments(capsys):
    assert cli_main(["--help"]) == 0
    assert "bench" in capsys.readouterr().out
    assert cli_main(["frobnicate"]) == 2
    try:
        bench_main(["--dtypes", "fp8"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("an unknown dtype must be refused")
    assert "unknown dtype 'fp8'" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "words"), [
    (["--backends", "nope"], "unknown backend 'nope'"),
    (["--backends", "triton"], "triton runs on CUDA devices only"),
    (["--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["--p", "-1"], "--p must be at least 1"),
    (["--n", "-3"], "--n must be at least 0"),
    (["--device", "nope"], "--device nope: "),
    (["--json", "/dev/null/x.json"], "--json /dev/null/x.json: cannot make its folder"),
])  # fmt: skip
def test_bad_arguments_are_refused_before_anything_is_timed(capsys, monkeypatch, args, words):
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("timed before checking"))
    with pytest.raises(SystemExit) as e:
        bench_main(args)
    assert e.value.code == 2 and words in capsys.readouterr().err


_FAULTS = """
import resource, sys, torch
from carzero_fast.memory import retain_freed_memory
if sys.argv[1] == "keep":
    print(retain_freed_memory(), file=sys.stderr)

def touch():  # what a reference call does: blocks of a few MiB, written, then freed
    ts = [torch.ones(3 * 2**20) for _ in range(20)]  # 20 × 12 MiB
    del ts

touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_is_reused_without_page_faults():
    """After `retain_freed_memory`, allocating what was just freed faults few fresh pages
    in: 1–7 of the 20 blocks (3072–21504 faults over 24 runs on 2026-11-29; which blocks
    glibc hands back varies from run to run). With glibc's defaults all 240 MiB is faulted
    in again (61429–61430 faults)."""
    faults = {}
    for mode in ("keep", "default"):
        run = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True,
                             text=True, check=True)  # fmt: skip
        faults[mode] = int(run.stdout.split()[-1])
        if mode == "keep":
            assert run.stderr.strip().splitlines()[-1].startswith("retain freed memory")
    pages = 20 * 12 * 2**20 // 4096
    assert faults["keep"] < pages // 2, faults
    assert faults["default"] > pages * 9 // 10, faults  # the case the benchmark avoids


def test_bench_memory_counts_the_backend_not_a_weight_cast(monkeypatch):
    """bf16 rows run a bf16 model: a per-call cast of fp32 weights (7.8 MiB here, far more
    than the activations of 2×2 pairs) must not be counted as the backend's memory."""
    monkeypatch.setattr(bench, "gemm_ceiling", lambda *args, **kwargs: 1.0)  # not timed here
    cfg = AlignerConfig(d_model=256, n_heads=4)
    rows = bench.run(2, 2, 5, 3, ("bf16",), ("reference", "chunked"), 0, 1, cfg)
    params = list(CrossAttentionAligner(cfg).parameters())
    weights_mib = sum(p.numel() for p in params) * 2 / 2**20
    # a product computed in fp32 (`cpu_gemm.fp32_products`) holds its weight's fp32 copy
    from carzero_fast.backends.cpu_gemm import fp32_products

    one_weight = max(p.numel() for p in params) * 4 / 2**20
    for r in rows:
        cast = one_weight if fp32_products(torch.zeros(0, dtype=torch.bfloat16)) else 0.0
        limit = weights_mib / 8 + (cast if r.backend == "chunked" else 0.0)
        assert 0 < r.peak_extra_mib < limit, (r.backend, r.dtype, r.peak_extra_mib)


def test_gemm_ceiling_is_the_fastest_rate_of_its_products(monkeypatch):
    """Under a clock that makes every timed product take 1 s, the ceiling is 2·rows·K·N FLOPs
    over that second for the largest of the CARZero-like shapes (768 × 1024): the best
    product, not the last one timed (768 × 768), and two FLOPs per multiply-add."""
    from types import SimpleNamespace

    ticks = iter(range(10**6))
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    rows = 16
    got = bench.gemm_ceiling(torch.float32, torch.device("cpu"), repeats=2, rows=rows)
    assert got == pytest.approx(2 * rows * 768 * 1024 / 1e9)


def test_bench_peak_memory_leaves_out_the_inputs(monkeypatch):
    """A forward row's peak extra memory is what one call allocates beyond its inputs and the
    model, which exist before it: the same bytes `track_memory` counts around a direct call on
    inputs made beforehand (a row whose timed call copied its inputs counted them too)."""
    from carzero_fast.memory import track_memory

    monkeypatch.setattr(bench, "gemm_ceiling", lambda *args, **kwargs: 1.0)  # not timed here
    cfg = AlignerConfig(d_model=32, n_heads=4, n_layers=2, d_ffn=48, head_dims=(40, 24))
    n, m, p = 3, 2, 64  # inputs (24 KiB) larger than a chunked call's extra memory
    rows = bench.run(n, m, p, 5, ("fp32",), ("reference", "chunked"), 0, 1, cfg)
    torch.manual_seed(0)  # as `run` makes its model and inputs
    al = CrossAttentionAligner(cfg).eval()
    mem, q = torch.randn(n, p, cfg.d_model), torch.randn(m, cfg.d_model)
    for r in rows:
        with torch.no_grad(), track_memory() as tracker:
            al(mem, q, backend=r.backend)
        assert r.peak_extra_mib == tracker.peak_bytes / 2**20, r
