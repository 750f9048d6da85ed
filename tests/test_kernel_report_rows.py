"""The compile report's own logic, fast: how it reads a build's resources, tensor-core use and
shared memory, when it reports an error, its exit status, and that it builds the
configurations the launchers run. `tests/test_kernel_report.py` compiles every configuration
(minutes) and passes only while nothing spills and everything fits: these tests feed the
report canned `cuobjdump`/PTX text, so that a gate that stopped reading spills or `wgmma`
fails here, not only on the day a configuration spills."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from carzero_fast.kernels import configs as kc
from carzero_fast.kernels import report

# `cuobjdump --dump-resource-usage` of a Triton cubin (Triton 3.x's wheel), spilling
RESOURCES = """
Resource usage:
 Common:
  GLOBAL:0
 Function linear_kernel:
  REG:255 STACK:24 SHARED:1024 LOCAL:8 CONSTANT[0]:656 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
WGMMA_PTX = """
	wgmma.fence.sync.aligned;
	wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1, %f2}, %rd1, %rd2, 1, 1, 1, 0, 1;
	wgmma.commit_group.sync.aligned;
"""
MMA_PTX = "\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1, %f2, %f3, %f4}, ...;\n"
FMA_PTX = "\tfma.rn.f32 \t%f3, %f1, %f2, %f3;\n\tld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\n"


def _cuobjdump(text: str):  # noqa: ANN202
    def run(cmd, **kwargs):  # noqa: ANN001, ANN003, ANN202
        assert cmd[1] == "--dump-resource-usage" and cmd[2].endswith(".cubin")
        return SimpleNamespace(stdout=text, returncode=0)

    return run


def test_resources_count_stack_and_local_bytes_as_spills(monkeypatch):
    monkeypatch.setattr(report.subprocess, "run", _cuobjdump(RESOURCES))
    assert report._resources(b"cubin") == {"registers": 255, "spill_bytes": 32}
    clean = RESOURCES.replace("STACK:24", "STACK:0").replace("LOCAL:8", "LOCAL:0")
    monkeypatch.setattr(report.subprocess, "run", _cuobjdump(clean.replace("REG:255", "REG:96")))
    assert report._resources(b"cubin") == {"registers": 96, "spill_bytes": 0}


def _fake_build(monkeypatch, builds: dict) -> None:
    """`compile_report` over one job per entry of `builds` (kernel → (ptx, shared bytes, or an
    exception to raise)), each with its own canned resources."""
    jobs = [(name, dict(dtype=dtype, precision=prec), name, {}, {}, 4, 2, True)
            for name, (_, _, dtype, prec) in builds.items()]  # fmt: skip
    monkeypatch.setattr(report, "_jobs", lambda arch: jobs)

    def compile_(fn, sig, const, arch, warps, stages):  # noqa: ANN001, ANN202
        ptx, shared, _, _ = builds[fn]
        if isinstance(ptx, Exception):
            raise ptx
        return SimpleNamespace(asm={"cubin": fn.encode(), "ptx": ptx},
                               metadata=SimpleNamespace(shared=shared))  # fmt: skip

    monkeypatch.setattr(report, "_compile", compile_)
    monkeypatch.setattr(report, "_resources", lambda cubin: {"registers": 100 + len(cubin),
                                                             "spill_bytes": 0})  # fmt: skip


BUILDS = {
    "hopper": (WGMMA_PTX, 96 * 1024, "bf16", "ieee"),
    "ampere": (MMA_PTX, 48 * 1024, "bf16", "ieee"),
    "fma": (FMA_PTX, 16 * 1024, "fp32", "ieee"),
    "tf32_fma": (FMA_PTX, 16 * 1024, "fp32", "tf32"),
    "broken": (RuntimeError("PassManager::run failed\nout of resource: shared memory"), 0,
               "fp16", "ieee"),
}  # fmt: skip


def test_rows_say_which_tensor_core_instructions_the_ptx_has(monkeypatch):
    """`wgmma` is Hopper's warpgroup MMA, `mma.sync` Ampere's: both are tensor cores, only
    the first is `wgmma` (which sm_90's 16-bit forward must reach); FMA code is neither.
    IEEE fp32 rows are marked as FMA by design, TF32 ones are not."""
    _fake_build(monkeypatch, BUILDS)
    rows = {r["kernel"]: r for r in report.compile_report(90)}
    assert (rows["hopper"]["tensor_cores"], rows["hopper"]["wgmma"]) == (True, True)
    assert (rows["ampere"]["tensor_cores"], rows["ampere"]["wgmma"]) == (True, False)
    assert (rows["fma"]["tensor_cores"], rows["fma"]["wgmma"]) == (False, False)
    assert rows["fma"]["ieee_fp32"] and not rows["tf32_fma"]["ieee_fp32"]
    assert not rows["hopper"]["ieee_fp32"]
    assert rows["hopper"]["registers"] == 106 and rows["hopper"]["shared_bytes"] == 96 * 1024
    assert all(r["error"] is None for k, r in rows.items() if k != "broken")


def test_a_failed_build_is_a_row_with_its_error(monkeypatch):
    _fake_build(monkeypatch, BUILDS)
    rows = {r["kernel"]: r for r in report.compile_report(80)}
    broken = rows["broken"]
    assert broken["error"] == "RuntimeError: out of resource: shared memory"
    assert broken["registers"] is None and broken["tensor_cores"] is None
    assert set(rows) == set(BUILDS)  # the others still built


@pytest.mark.parametrize(("arch", "over"), [(90, False), (80, True), (86, True), (120, True),
                                            (100, False)])  # fmt: skip
def test_shared_memory_over_the_tables_gpus_limit_is_an_error(monkeypatch, arch, over):
    """96 KiB fits every table's GPUs; 100 KiB is over the 99 KB a block gets on sm_86/89/120
    (Ampere's table), not over Hopper's 227 KB; a byte over 227 KB fails Hopper's too."""
    builds = {"near_ampere": (MMA_PTX, 96 * 1024, "bf16", "ieee"),
              "over_ampere": (MMA_PTX, 100 * 1024, "bf16", "ieee"),
              "over_hopper": (WGMMA_PTX, 227 * 1024 + 1, "bf16", "ieee")}  # fmt: skip
    _fake_build(monkeypatch, builds)
    rows = {r["kernel"]: r for r in report.compile_report(arch)}
    assert rows["near_ampere"]["error"] is None
    assert (rows["over_ampere"]["error"] is not None) == over
    if over:
        assert rows["over_ampere"]["error"].startswith(f"shared memory: {100 * 1024} B, over the "
                                                       f"{99 * 1024} B")  # fmt: skip
    assert rows["over_hopper"]["error"].startswith("shared memory: ")


def test_main_exits_nonzero_on_any_error_row(monkeypatch, capsys):
    good = {
        "kernel": "linear",
        "config": {"block_m": 64},
        "arch": 90,
        "registers": 96,
        "spill_bytes": 0,
        "shared_bytes": 1024,
        "tensor_cores": True,
        "error": None,
    }
    bad = dict(good, kernel="attention", error="shared memory: 1 B, over the 0 B")
    for rows, status in (([good], 0), ([good, bad], 1)):
        monkeypatch.setattr(report, "compile_report", lambda arch, rows=rows: rows)
        assert report.main(["--arch", "90", "--json"]) == status
        assert json.loads(capsys.readouterr().out) == rows
        assert report.main(["--arch", "80"]) == status
        text = capsys.readouterr().out
        assert "sm_80 linear" in text and ("shared memory: 1 B" in text) == bool(status)


@pytest.mark.parametrize("arch", [90, 80, 120])
def test_jobs_build_the_configurations_the_launchers_run(monkeypatch, arch):
    """Each build's tiles are what the launchers ask for on a GPU of that capability
    (`configs.*_config`, dropout on for the training rows), 16-bit linear layers on TMA only
    where the table uses it, and dropout's linear tiles no wider than `DROPOUT_BLOCK_N`."""
    from carzero_fast.kernels.attention_backward import slice_width
    from carzero_fast.kernels.linear import DROPOUT_BLOCK_N

    monkeypatch.setattr(kc, "_capability", lambda index: arch)
    gpu = torch.device("cuda", 0)  # a name: only its capability is read
    jobs = report._jobs(arch)
    kernels = {j[0] for j in jobs}
    assert ("linear_tma" in kernels) == (arch == 90)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    seen = set()
    precision_before = torch.backends.cuda.matmul.fp32_precision
    for kernel, desc, _, _, const, warps, stages, _ in jobs:
        if kernel not in ("linear", "attention", "attention_dq", "attention_dkdv"):
            continue
        precision = desc["precision"]
        dtype = dtypes[desc["dtype"]]
        torch.backends.cuda.matmul.fp32_precision = "tf32" if precision == "tf32" else "none"
        try:
            if kernel == "linear":
                cfg = kc.linear_config(gpu, dtype, head=const["HEAD"])
                block_n = min(cfg.block_n, DROPOUT_BLOCK_N) if const["DROPOUT"] else cfg.block_n
                assert (const["BLOCK_M"], const["BLOCK_N"], const["BLOCK_K"], warps, stages) == (
                    cfg.block_m,
                    block_n,
                    cfg.block_k,
                    cfg.num_warps,
                    cfg.num_stages,
                ), desc
            elif kernel == "attention":
                cfg = kc.attention_config(gpu, dtype, dropout=const["DROPOUT"])
                assert (const["BLOCK_M"], const["BLOCK_P"], const["RESCALE_LOG2"], warps,
                        stages) == (cfg.block_m, cfg.block_p, cfg.rescale_log2, cfg.num_warps,
                                    cfg.num_stages), desc  # fmt: skip
            else:
                cfg = kc.attention_bwd_config(gpu, dtype, dropout=const["DROPOUT"])
                dq = kernel == "attention_dq"
                want = ((cfg.dq_block_m, cfg.dq_block_p, cfg.dq_stages) if dq
                        else (cfg.dkdv_block_m, cfg.dkdv_block_p, cfg.dkdv_stages))  # fmt: skip
                assert (const["BLOCK_M"], const["BLOCK_P"], stages) == want, desc
                assert warps == cfg.num_warps
                assert const["BLOCK_C"] == slice_width(report.HEAD_DIM, cfg.block_c)
        finally:
            torch.backends.cuda.matmul.fp32_precision = precision_before
        seen.add((kernel, precision, const.get("DROPOUT")))
    for kernel in ("linear", "attention", "attention_dq", "attention_dkdv"):
        for precision in ("ieee", "tf32"):
            assert {(kernel, precision, False), (kernel, precision, True)} <= seen
