"""The GPU scripts' dry runs on CPU (`--smoke`, kernels under the interpreter): a GPU session
is short and rare, so a script that fails there costs its whole device budget. Subprocesses:
the scripts pick the interpreter before Triton's first import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the tests' faster interpreter (tests/triton_interpreter.py) in a child process
FAST_INTERPRETER = (
    f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
    "import triton_interpreter; triton_interpreter.install()\n"
)
# `python -m MODULE ARGS` with it
RUN_MODULE = FAST_INTERPRETER + (
    "import runpy\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)


def _run(module: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-c", RUN_MODULE, module, "--smoke", "--out", str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_gpu_check_correctness_section(tmp_path):
    """Every triton route's error in bf16 within 2× chunked's, SDPA's fp32 error with masks,
    written to the JSON, and the script's exit status says so."""
    proc = _run("benchmarks.gpu_check", tmp_path, "--only", "correctness", "--no-training",
                "--no-compile")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["correctness"]
    got = result["result"]
    assert got["pass_fp32"] and got["pass_bf16"] and got["pass_variants"]
    routes = {k for k in got if k.startswith("triton_bf16_one_direction")}
    assert routes == {"triton_bf16_one_direction" + name for name in
                      ("", ", own GEMMs", ", fp32 stream", ", adds in passes",
                       ", SDPA attention", ", fp32 stream + SDPA")}  # fmt: skip
    assert (tmp_path / "gpu_check.md").exists()
    env = json.loads((tmp_path / "gpu_check.json").read_text())["environment"]
    assert env["kernels"] == "sm_90, table 9"  # the interpreter runs Hopper's table


def test_tune_gpu_layer_norm_backward_sweep(tmp_path):
    """Every candidate of the LayerNorm-backward sweep runs (no error rows, each once), and
    every kind of the forward's add + LayerNorm pass is timed; only the sections asked for
    run, and none failed."""
    proc = _run("benchmarks.tune_gpu", tmp_path, "--only", "passes,dq_sums,layer_norm_bwd")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "tune_gpu.json").read_text())
    assert result["errors"] == {} and "dropout" not in result and result["attention"] == []
    rows = json.loads((tmp_path / "tune_gpu.json").read_text())["layer_norm_bwd"]
    assert rows and all("us" in r and "error" not in r for r in rows), rows
    assert len(rows) == len({(r["rows"], r["warps"], r["programs_per_sm"]) for r in rows})
    assert set(json.loads((tmp_path / "tune_gpu.json").read_text())["add_layer_norm"]) == {
        "add, stream in place",
        "add, no stream out (LN3)",
        "add both branches, stream in place",
        "add both branches, no stream out",
        "16-bit stream read, shift",
    }
    assert set(json.loads((tmp_path / "tune_gpu.json").read_text())["residual_gemm"]) == {
        "out proj", "linear2"}
    dq_sums = json.loads((tmp_path / "tune_gpu.json").read_text())["dq_sums"]
    assert set(dq_sums) == {"backward with dq_sum", "backward without", "PyTorch sum over dq"}
    assert all("us" in row for row in dq_sums.values())


def test_tune_gpu_names_an_unknown_section(tmp_path):
    """A typo in --only fails at once (it used to run the unguarded parts and exit 0)."""
    proc = _run("benchmarks.tune_gpu", tmp_path, "--only", "layer_norm_bwd,atention")
    assert proc.returncode == 2 and "atention" in proc.stderr
    assert not (tmp_path / "tune_gpu.json").exists()


def test_a_failing_check_costs_only_its_own_entry(tmp_path):
    """A check that raises (here triton's zero-shot scores) is recorded as its error; the
    section's other checks still run and are recorded, and the run fails."""
    patch = FAST_INTERPRETER + (
        "import carzero_fast as cf\n"
        "from benchmarks import gpu_check\n"
        "plain = cf.zero_shot_scores\n"
        "def failing(*a, backend=None, **k):\n"
        "    if backend == 'triton':\n"
        "        raise RuntimeError('an injected kernel failure')\n"
        "    return plain(*a, backend=backend, **k)\n"
        "cf.zero_shot_scores = failing\n"
        "sys.exit(gpu_check.main(sys.argv[1:]))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-c", patch, "--smoke", "--out", str(tmp_path), "--only",
           "correctness", "--no-training", "--no-compile"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    got = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["correctness"]
    got = got["result"]
    assert got["zero_shot_fp32"] == "error: RuntimeError: an injected kernel failure"
    assert not got["pass_fp32"]
    assert all(isinstance(v, float) for v in got["triton_fp32"] + got["chunked_fp32"])
    assert got["pass_bf16"] and got["pass_variants"]
    assert "an injected kernel failure" in proc.stderr  # its traceback, for the log


FAKE_STEP = """\
import sys, time
from pathlib import Path
out = Path(sys.argv[sys.argv.index("--out") + 1])
kind = sys.argv[-1]
print("step", kind, "starts", flush=True)
if kind == "ok":
    (out / "table.md").write_text("| row | ms |\\n|---|---:|\\n| fake | 1.0 |\\n")
    (out / "result.json").write_text("{}")
elif kind == "fail":
    sys.exit(3)
else:  # hangs past its limit
    time.sleep(60)
"""


def test_gpu_session_runs_each_step_under_its_limit(tmp_path, monkeypatch, capsys):
    """The session runner's plumbing, with stand-in steps: a step that hangs is killed at its
    limit and one that fails costs only itself; every step's files and log are packed into
    results.tgz, all output goes to session.log in order, and summary.md has a line per step
    and each step's tables."""
    import tarfile

    from benchmarks import gpu_session

    (tmp_path / "fake_step.py").write_text(FAKE_STEP)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("CARZERO_COMMIT", "abc1234")
    steps = tuple(gpu_session.Step(kind, "fake_step", (kind,), limit)
                  for kind, limit in (("ok", 60), ("hang", 2), ("fail", 60)))  # fmt: skip
    out = tmp_path / "out"
    t0 = time.monotonic()
    assert gpu_session.main(["--out", str(out)], steps=steps) == 1
    assert time.monotonic() - t0 < 30
    assert sorted(p.name for p in out.iterdir()) == ["results.tgz", "session.log", "summary.md"]
    with tarfile.open(out / "results.tgz") as tar:
        names = set(tar.getnames())
    assert {"gpu_session/ok/table.md", "gpu_session/ok/result.json", "gpu_session/ok.log",
            "gpu_session/hang.log", "gpu_session/fail.log"} <= names  # fmt: skip
    log = (out / "session.log").read_text()
    assert log.startswith("commit abc1234\n")
    assert log.index("step ok starts") < log.index("step hang starts") < log.index(
        "step fail starts")
    summary = (out / "summary.md").read_text()
    assert "| ok | exit 0 |" in summary and "| hang | killed at its limit |" in summary
    assert "| fail | exit 3 |" in summary and "| fake | 1.0 |" in summary
    assert capsys.readouterr().out.rstrip().endswith("| fail | exit 3 | 0 | 60 |")


def test_gpu_session_plan_names_real_sections(capsys):
    """Every step of the shipped plan asks its script for sections that script has, and an
    unknown step name is refused before anything runs."""
    from benchmarks import gpu_check, gpu_session, tune_gpu

    known = {"benchmarks.gpu_check": gpu_check.SECTIONS, "benchmarks.tune_gpu": tune_gpu.SECTIONS}
    for step in gpu_session.STEPS:
        only = step.args[step.args.index("--only") + 1].split(",")
        assert set(only) <= set(known[step.module]), step
    assert sum(s.limit_s for s in gpu_session.STEPS) <= 570  # one device command: 600 s
    with pytest.raises(SystemExit):
        gpu_session.main(["--out", "/nonexistent/x", "--steps", "check,trainig"])
    assert "trainig" in capsys.readouterr().err
