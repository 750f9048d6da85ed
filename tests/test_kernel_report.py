"""Compile gate (DESIGN.md §4): every shipped kernel configuration builds for sm_90, sm_80 and
(with `-m slow`) sm_120 (the consumer Blackwells, which run Ampere's table with their own code
generation) without a GPU, without local-memory spills, within the shared memory of its
table's GPUs, and its matrix code reaches the tensor cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# one xdist worker builds the reports (a module fixture would otherwise run on each worker)
pytestmark = pytest.mark.xdist_group("kernel_report")

# sm_120 builds Ampere's table (sm_80's: the same kernels and configurations) with its own code
# generation; its ~2 minutes of compiling run with `-m slow`
ARCHS = (90, 80, pytest.param(120, marks=pytest.mark.slow))
# every kernel the backends launch (the TMA GEMM only where the table uses TMA: sm_90)
KERNELS = {"linear", "attention", "attention_dq", "attention_dkdv", "add_layer_norm",
           "layer_norm_backward", "relu_backward"}  # fmt: skip


def _describe(row: dict) -> str:
    cfg = ", ".join(f"{k}={v}" for k, v in row["config"].items())
    return f"sm_{row['arch']} {row['kernel']} [{cfg}]"


@pytest.fixture(scope="module")
def reports(request: pytest.FixtureRequest) -> dict[int, list[dict]]:
    """`python -m carzero_fast.kernels --arch A --json` for each arch the selected tests ask
    for, run in parallel."""
    archs = sorted({item.callspec.params["arch"] for item in request.session.items
                    if item.path == request.path and hasattr(item, "callspec")})  # fmt: skip
    # The compiler, not the interpreter: other test modules set TRITON_INTERPRET=1 in this
    # process (before Triton's first import), and a child would inherit it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    procs = {
        arch: subprocess.Popen(
            [sys.executable, "-m", "carzero_fast.kernels", "--arch", str(arch), "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=root,
        )
        for arch in archs
    }
    out = {}
    for arch, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            pytest.fail(f"the sm_{arch} compile report took over 10 minutes")
        try:
            out[arch] = json.loads(stdout)
        except json.JSONDecodeError:
            pytest.fail(f"sm_{arch} report (exit {proc.returncode}) printed no JSON:\n{stderr}")
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles(reports, arch):
    rows = reports[arch]
    assert {r["kernel"] for r in rows} == KERNELS | ({"linear_tma"} if arch == 90 else set())
    errors = [f"{_describe(r)}: {r['error']}" for r in rows if r["error"]]
    assert not errors, "\n".join(errors)
    for r in rows:
        assert r["arch"] == arch and r["registers"], _describe(r)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_spills(reports, arch):
    spills = [f"{_describe(r)}: {r['spill_bytes']} B" for r in reports[arch] if r["spill_bytes"]]
    assert not spills, "\n".join(spills)


@pytest.mark.parametrize("arch", ARCHS)
def test_matrix_kernels_use_tensor_cores(reports, arch):
    """Every dot but IEEE fp32 (FMA code by design) must run on the tensor cores; on sm_90
    the forward's 16-bit ones as wgmma. (The first attention backward kernels hold the head
    padded to 256 columns, which leaves only tiles too small for wgmma without spills: they
    run mma.sync until they get the forward's 64-wide slices.)"""
    rows = [r for r in reports[arch] if r["matrix"]]
    assert rows
    scalar = [_describe(r) for r in rows if not r["ieee_fp32"] and not r["tensor_cores"]]
    assert not scalar, "\n".join(scalar)
    if arch == 90:
        half = [r for r in rows if r["config"]["dtype"] in ("bf16", "fp16")
                and r["kernel"] in ("linear", "linear_tma", "attention")]  # fmt: skip
        assert half
        no_wgmma = [_describe(r) for r in half if not r["wgmma"]]
        assert not no_wgmma, "\n".join(no_wgmma)
