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
import torch

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
    assert got["pass_fp32"] and got["pass_bf16"] and got["pass_variants"] and got["pass_nan"]
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


# -- the GPU check's verdicts, in process and fast: paths replaced by outputs of known error --

# the rows of `gpu_check.VARIANTS`, each given its own bf16 error below
VARIANT_ERRORS = {"": 0.010, ", own GEMMs": 0.011, ", fp32 stream": 0.012,
                  ", adds in passes": 0.013, ", SDPA attention": 0.014,
                  ", fp32 stream + SDPA": 0.015}  # fmt: skip
ROUTE_ENV = {"CARZERO_FAST_TRITON_GEMM": "triton", "CARZERO_FAST_TRITON_STREAM": "fp32",
             "CARZERO_FAST_TRITON_RESIDUAL": "pass", "CARZERO_FAST_TRITON_ATTENTION": "library"}


def _route() -> str:
    """Which `VARIANTS` row the environment selects now."""
    from benchmarks import gpu_check

    for name, env in gpu_check.VARIANTS.items():
        if all(os.environ.get(k) == env.get(k) for k in ROUTE_ENV):
            return name
    raise AssertionError("an environment no variant sets")


def _fake_check(monkeypatch, errors: dict):  # noqa: ANN202
    """A smoke `Check` whose models return all-ones logits (the references) or ones times
    (1 + error) for the other paths: each path's relative error is known. `errors` by
    (model, backend): "fp32" (the fp32 model), "bf16" (the bf16 model), and for the bf16
    model's one direction on triton a function of the route."""
    import carzero_fast as cf
    from benchmarks import gpu_check

    chk = gpu_check.Check(torch.device("cpu"), smoke=True)

    def outputs(model: str, backend: str, n: int, m: int, t2i: bool = False) -> torch.Tensor:
        if backend == "reference" and model in ("fp32", "oracle"):
            return torch.ones(n, m, dtype=torch.float64)
        err = errors.get((model, backend, "t2i"), errors[(model, backend)]) if t2i else errors[
            (model, backend)]  # fmt: skip
        err = err(_route()) if callable(err) else err
        return torch.full((n, m), 1 + err, dtype=torch.float64)

    def both(model: str):  # noqa: ANN202
        def f(a, b, a_mask=None, b_mask=None, *, backend, **kw):  # noqa: ANN001, ANN003, ANN202
            return (outputs(model, backend, len(a), len(b)),
                    outputs(model, backend, len(b), len(a), t2i=True))  # fmt: skip

        return f

    def one(model: str):  # noqa: ANN202
        def f(mem, q, mask=None, *, backend, **kw):  # noqa: ANN001, ANN003, ANN202
            out = outputs(model, backend, len(mem), len(q))
            if not errors.get(("drops_nan", backend)):  # an item with a NaN token: NaN logits
                out[mem.isnan().flatten(1).any(1)] = float("nan")
            return out

        return f

    for attr, model in (("al", "fp32"), ("al16", "bf16"), ("al16_fp32", "oracle")):
        object.__setattr__(getattr(chk, attr), "both_directions", both(model))
        object.__setattr__(getattr(chk, attr), "forward", one(model + "_one"))
    monkeypatch.setattr(cf, "zero_shot_scores", lambda al, a, b, *args, backend, **kw: outputs(
        "fp32" if al is chk.al else "?", "zero_shot_" + backend, len(a), len(b))
        if backend != "reference" else torch.ones(len(a), len(b), dtype=torch.float64))  # fmt: skip
    return chk


def _errors(triton_bf16: float = 0.015, variant=VARIANT_ERRORS.get, fp32: float = 5e-5):  # noqa: ANN001, ANN202
    """The paths' errors; `triton_bf16` and `fp32` (triton's) in the second direction only."""
    return {("fp32", "triton"): lambda route: 6e-5 if route == ", SDPA attention" else 5e-5,
            ("fp32", "triton", "t2i"): lambda route: 6e-5 if route == ", SDPA attention" else fp32,
            ("fp32", "chunked"): 2e-5, ("fp32", "zero_shot_triton"): 3e-5,
            ("bf16", "triton"): 0.015, ("bf16", "triton", "t2i"): triton_bf16,
            ("bf16", "chunked"): 0.01, ("bf16_one", "triton"): variant,
            ("bf16_one", "chunked"): 0.01, ("oracle_one", "reference"): 0.0}  # fmt: skip


def test_gpu_check_correctness_compares_each_path_with_its_oracle(monkeypatch):
    """fp32 paths against `reference` fp32, bf16 ones against the bf16 model's weights in
    fp32 (`reference`): each recorded error is the one its path was given, and every
    verdict holds (triton's bf16 error within 2× chunked's, fp32 under 1e-4)."""
    got = _fake_check(monkeypatch, _errors()).correctness()
    approx = pytest.approx
    assert got["triton_fp32"] == approx([5e-5] * 2) and got["chunked_fp32"] == approx([2e-5] * 2)
    assert got["triton_bf16"] == approx([0.015] * 2) and got["chunked_bf16"] == approx([0.01] * 2)
    assert got["zero_shot_fp32"] == approx(3e-5)
    assert got["chunked_bf16_one_direction"] == approx(0.01)
    for name, err in VARIANT_ERRORS.items():
        assert got["triton_bf16_one_direction" + name] == approx(err), name
    # the SDPA fp32 check runs the fp32 model's both directions on the library attention
    assert got["triton_fp32_sdpa"] == approx([6e-5] * 2)
    assert got["pass_fp32"] and got["pass_bf16"] and got["pass_variants"] and got["pass_nan"]


VERDICTS = ("pass_fp32", "pass_bf16", "pass_variants", "pass_nan")


@pytest.mark.parametrize(("errors", "verdict"), [
    (_errors(fp32=2e-4), "pass_fp32"),
    (_errors(triton_bf16=0.025), "pass_bf16"),  # 2.5× chunked's error
    (_errors(variant=lambda r: 0.025 if r == ", adds in passes" else 0.01), "pass_variants"),
    ({**_errors(), ("drops_nan", "triton"): True}, "pass_nan"),  # a NaN token scored finite
])  # fmt: skip
def test_gpu_check_correctness_fails_a_path_over_its_bound(monkeypatch, errors, verdict):
    got = _fake_check(monkeypatch, errors).correctness()
    flags = {k: got[k] for k in VERDICTS}
    assert flags == {k: k != verdict for k in flags}


@pytest.mark.parametrize("failing", [None, *VERDICTS])
def test_gpu_check_exit_status_follows_every_verdict(monkeypatch, tmp_path, failing):
    from benchmarks import gpu_check

    verdicts = {k: k != failing for k in VERDICTS}
    monkeypatch.setattr(gpu_check.Check, "correctness", lambda self: dict(verdicts))
    monkeypatch.setattr(gpu_check, "gemm_ceiling_tflops", lambda dev, smoke: {"256^3": 1.0})
    status = gpu_check.main(["--smoke", "--out", str(tmp_path), "--only", "correctness",
                             "--no-training", "--no-compile"])  # fmt: skip
    assert status == (0 if failing is None else 1)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["correctness"]
    assert saved["result"] == verdicts


def test_rel_is_the_norm_of_the_difference_over_the_oracles():
    from benchmarks.gpu_common import rel

    oracle = torch.tensor([3.0, 4.0])  # norm 5
    assert rel(oracle + torch.tensor([1.0, 1.0]), oracle) == pytest.approx(2**0.5 / 5)
    assert rel(oracle, oracle + torch.tensor([0.0, 5.0])) == pytest.approx(5 / 90**0.5)
    assert rel(torch.tensor([3.0, float("nan")]), oracle) == float("inf")
    assert rel(torch.tensor([3.0, float("inf")]), oracle) == float("inf")
    # computed in float64: a bf16 path's small error is not rounded away
    assert rel(torch.tensor([1.0 + 2**-7], dtype=torch.bfloat16), torch.ones(1)) == 2**-7


def _fake_cuda_graphs(monkeypatch, events: list[str]) -> None:
    """torch.cuda's streams and graphs as recorders of what `graph_replay` asks of them."""
    import contextlib

    class Stream:
        def __init__(self, dev: object = None) -> None:
            pass

        def wait_stream(self, other: object) -> None:
            events.append("wait")

    class Graph:
        def replay(self) -> None:
            events.append("replay")

    @contextlib.contextmanager
    def capture(graph: Graph):  # noqa: ANN202
        events.append("capture")
        yield
        events.append("captured")

    @contextlib.contextmanager
    def on_stream(stream: Stream):  # noqa: ANN202
        events.append("side stream")
        yield

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda dev=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)


def test_graph_replay_captures_once_after_warming_and_checks_the_replay(monkeypatch, capsys):
    """The CUDA-graph row's callable: the first call runs eagerly, warms on a side stream,
    captures, replays and compares with the eager result; every later call only replays and
    returns the captured output. A replay off by rounding is reported and timed; one that
    differs by more than 1e-2 raises, so the row records an error instead of a time."""
    from benchmarks.gpu_common import graph_replay

    events: list[str] = []
    _fake_cuda_graphs(monkeypatch, events)
    values = iter([1.0, 1.0, 1.0])

    def fn() -> torch.Tensor:
        events.append("fn")
        return torch.full((3,), next(values))

    run = graph_replay(fn, torch.device("cuda", 0))
    assert torch.equal(run(), torch.ones(3))
    assert events == ["fn", "wait", "side stream", "fn", "wait", "capture", "fn", "captured",
                      "replay"]  # fmt: skip
    events.clear()
    assert torch.equal(run(), torch.ones(3)) and torch.equal(run(), torch.ones(3))
    assert events == ["replay", "replay"]  # no eager call, no capture
    assert "replay against an eager call: bit for bit" in capsys.readouterr().out

    values = iter([1.0, 1.0, 1.001])  # another GEMM algorithm's rounding: reported, timed
    assert torch.equal(graph_replay(fn, torch.device("cuda", 0))(), torch.full((3,), 1.001))
    assert "relative difference 1.00e-03" in capsys.readouterr().out
    values = iter([1.0, 1.0, 1.5])  # the captured call computes something else
    with pytest.raises(AssertionError, match="replay differs from an eager call: relative"):
        graph_replay(fn, torch.device("cuda", 0))()


def test_gpu_check_rows_time_every_path_and_ratio_against_the_baselines(monkeypatch):
    """A row's ms, useful TFLOP/s and fraction of the ceiling come from its own time; its
    × reference and × chunked from the baselines' times over its own (train-mode rows
    against the train-mode baselines); a path that raises is a row with its error and the
    others still run."""
    from benchmarks import gpu_check

    chk = gpu_check.Check.__new__(gpu_check.Check)
    chk.results, chk.ceiling, chk.dev = {"rows": []}, 0.5, torch.device("cpu")
    saves = []
    chk.save = lambda: saves.append(len(chk.results["rows"]))
    seconds = {}

    def path(name: str, s: float | None):  # noqa: ANN202
        def fn() -> None:
            if s is None:
                raise RuntimeError("an injected failure")

        seconds[fn] = s
        return fn

    monkeypatch.setattr(gpu_check, "median_time", lambda fn, dev, reps=3: seconds[fn] or fn())
    monkeypatch.setattr(gpu_check, "peak_extra_mib", lambda fn, dev: 7.0)
    fns = {"reference": ("fp16", path("reference", 4.0)), "chunked": ("bf16", path("c", 2.0)),
           "triton": ("bf16", path("t", 1.0)), "broken": ("bf16", path("b", None)),
           "reference, dropout": ("fp16", path("rd", 8.0)),
           "triton, dropout": ("bf16", path("td", 2.0))}  # fmt: skip
    chk._time_all("case", fns, flops=3e12)
    rows = {r["backend"]: r for r in chk.results["rows"]}
    assert rows["broken"]["error"] == "RuntimeError('an injected failure')"
    triton = rows["triton"]
    assert triton["ms"] == 1000.0 and triton["tflops"] == pytest.approx(3.0)
    assert triton["frac_ceiling"] == pytest.approx(6.0) and triton["peak_extra_mib"] == 7.0
    assert triton["x_reference"] == pytest.approx(4.0) and triton["x_chunked"] == pytest.approx(2.0)
    assert rows["triton, dropout"]["x_reference"] == pytest.approx(4.0)  # 8 s / 2 s
    assert "x_chunked" not in rows["triton, dropout"]  # no train-mode chunked row
    assert rows["reference"]["x_reference"] == 1.0
    assert saves == [1, 2, 3, 4, 5, 6]  # saved after every row, failed ones too
    table = gpu_check.markdown(chk.results)
    assert "| case | broken | | failed: RuntimeError('an injected failure') |" in table
    assert "| case | triton | bf16 | 1000.00 | 3.0 | 600.0% | 4.00 | 2.00 |" in table


PROBE_STEP = """\
import subprocess, sys, time
from pathlib import Path
kind, session = sys.argv[-2], Path(sys.argv[-1])
if kind == "probe":  # what the session has written so far
    summary = session / "summary.md"
    packed = (session / "results.tgz").exists()
    print("probe saw", packed, summary.exists() and "| first | exit 0 |" in summary.read_text())
elif kind == "spawn":  # a child of its own (a compile worker, say), then a hang
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    (session.parent / "child.pid").write_text(str(child.pid))
    time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_gpu_session_packs_after_each_step_and_kills_a_steps_children(tmp_path, monkeypatch):
    """results.tgz and summary.md are rewritten after every step (a session cut off by the
    command's end keeps what ran); a step killed at its limit (times --scale) takes its own
    children along, so the session goes on at once instead of waiting on their output."""
    from benchmarks import gpu_session

    (tmp_path / "probe_step.py").write_text(PROBE_STEP)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    out = tmp_path / "out"
    steps = tuple(gpu_session.Step(kind, "probe_step", (kind, str(out)), limit)
                  for kind, limit in (("first", 60), ("probe", 60), ("spawn", 4)))  # fmt: skip
    t0 = time.monotonic()
    assert gpu_session.main(["--out", str(out), "--scale", "0.5"], steps=steps) == 1
    assert time.monotonic() - t0 < 20
    assert "probe saw True True" in (out / "session.log").read_text()
    assert "| spawn | killed at its limit | 2 | 2 |" in (out / "summary.md").read_text()
    pid = int((tmp_path / "child.pid").read_text())

    def alive() -> bool:  # a zombie is dead (a container's init may never reap it)
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    for _ in range(50):
        if not alive():
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        raise AssertionError("the killed step's child outlived it")
