"""The launchers' host-side helpers and `benchmarks/host_time.py`, which measures the host's
share of a triton forward with every launch stubbed (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from carzero_fast.kernels.common import cdiv, next_power_of_2

ROOT = Path(__file__).resolve().parents[1]


def test_grid_helpers_equal_tritons():
    """`cdiv` and `next_power_of_2` replace Triton's (wrapped, slower on the host) in every
    launcher's grid and tile arithmetic: they must give the same numbers."""
    for a in [*range(0, 2100), 2**20 - 1, 2**20, 2**20 + 1, 2**31 - 1, 2**31, 3 * 2**33 + 5]:
        assert next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in (1, 2, 3, 4, 7, 16, 32, 64, 97, 128, 197, 256):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


def _host_time(*args: str) -> dict:
    """In a child: the script selects Triton's interpreter before Triton's first import."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "benchmarks.host_time", "--tiny", "--reps", "2",
                          "--json", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def test_host_time_counts_each_item_blocks_launches():
    """Every launch of a forward is stubbed and counted: the Triton kernels (attention, add +
    LayerNorm, the head) and PyTorch's GEMMs (the plain-epilogue layers, the residual adds)
    both grow by the same number per item block, and the host time is a positive figure."""
    one, three, five = (_host_time("--items", str(n), "--queries", "4") for n in (1, 3, 5))
    assert [r["item_blocks"] for r in (one, three, five)] == [1, 3, 5]
    for kind in ("triton_launches", "gemm_calls"):
        assert 0 < three[kind] - one[kind] == five[kind] - three[kind], kind
    for r in (one, three, five):
        launches = r["triton_launches"] + r["gemm_calls"]
        assert 0 < r["host_ms_min"] <= r["host_ms"]
        assert r["us_per_launch"] == pytest.approx(r["host_ms"] * 1e3 / launches)
