"""One lent-GPU session in one call: the checks and timings BENCHMARKS.md plans, in order.

    CARZERO_COMMIT=<commit> python -m benchmarks.gpu_session --out $OUT   # on the GPU machine

A device session is short (15 minutes of device time, at most 10 a command), and what comes
back from `$OUT` is at most 8 files, two folders deep. So this runs each step of the plan
(`STEPS`: correctness, the forward, training, the kernel sweeps) as its own process under its
own time limit (a hang or a kernel fault costs that step, not the rest: an illegal address
is sticky in a CUDA context), and after every step rewrites three files in `--out`:

- `results.tgz`: every step's JSON and markdown (its `--out` folder) and its log;
- `session.log`: all the steps' output, in order;
- `summary.md`: a line per step (exit status, seconds, limit) and each step's markdown table.

The limits add up to 570 s, under one command's 600 s. `--steps` runs a subset;
`--scale` multiplies every limit (a second call after a cut-off one, say).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Step:
    name: str
    module: str  # run as `python -m module --out <work>/<name> *args`
    args: tuple[str, ...]
    limit_s: int


# Most needed first: a step cut short by the command's end loses the least there. Limits
# from earlier runs on an H200 (a section's seconds in benchmarks/results, plus ~30 s of
# start-up and kernel compilation for each process).
STEPS = (
    Step("check", "benchmarks.gpu_check", ("--no-compile", "--only", "correctness"), 90),
    Step("forward", "benchmarks.gpu_check",
         ("--no-compile", "--only", "one_direction,zero_shot,profile"), 120),  # fmt: skip
    Step("training", "benchmarks.gpu_check",
         ("--no-compile", "--only", "training,profile_training"), 210),  # fmt: skip
    Step("tune", "benchmarks.tune_gpu",
         ("--only", "passes,attention,dropout,dq_sums,layer_norm_bwd"), 150),  # fmt: skip
)


@dataclass
class Outcome:
    step: Step
    returncode: int | None  # None: killed at its limit
    seconds: float
    limit_s: float  # the step's, times --scale


def commit() -> str:
    """CARZERO_COMMIT, else git's HEAD (the device's copy may carry a stale .git: set it)."""
    if os.environ.get("CARZERO_COMMIT"):
        return os.environ["CARZERO_COMMIT"]
    try:
        git = ["git", "rev-parse", "--short", "HEAD"]
        head = subprocess.run(git, cwd=ROOT, text=True, capture_output=True, timeout=10,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head} (git; CARZERO_COMMIT unset)"


def _tee(text: str, files: tuple[io.TextIOBase, ...]) -> None:
    for f in files:
        f.write(text)
        f.flush()


def run_step(step: Step, work: Path, log: io.TextIOBase, scale: float,
             extra: list[str]) -> Outcome:  # fmt: skip
    """Runs one step, its output streamed to stdout, `log` and `<work>/<name>.log`."""
    out = work / step.name
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", step.module, "--out", str(out), *step.args, *extra]
    limit = step.limit_s * scale
    t0 = time.monotonic()
    with open(work / f"{step.name}.log", "w") as own:
        files = (sys.stdout, log, own)
        _tee(f"== {step.name}: {' '.join(cmd[1:])} (limit {limit:.0f} s)\n", files)
        # its own process group, so that a step killed at its limit takes its children along
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)  # fmt: skip
        killer = _Deadline(proc, limit)
        for line in proc.stdout:  # type: ignore[union-attr]
            _tee(line, files)
        proc.wait()
        killer.cancel()
        seconds = time.monotonic() - t0
        rc = None if killer.fired else proc.returncode
        result = "killed at its limit" if rc is None else f"exit {rc}"
        _tee(f"== {step.name}: {result}, {seconds:.0f} s\n", files)
    return Outcome(step, rc, seconds, limit)


class _Deadline:
    """Kills a process group once `limit` seconds have passed (a timer thread)."""

    def __init__(self, proc: subprocess.Popen, limit: float) -> None:
        self.fired = False
        self._proc = proc
        self._timer = threading.Timer(limit, self._kill)
        self._timer.daemon = True
        self._timer.start()

    def _kill(self) -> None:
        self.fired = True
        try:
            os.killpg(self._proc.pid, 9)
        except ProcessLookupError:
            pass

    def cancel(self) -> None:
        self._timer.cancel()


def step_table(outcomes: list[Outcome]) -> str:
    """A line per step: exit status, seconds, limit."""
    lines = ["| step | result | seconds | limit |", "|---|---|---:|---:|"]
    for o in outcomes:
        result = "killed at its limit" if o.returncode is None else f"exit {o.returncode}"
        lines.append(f"| {o.step.name} | {result} | {o.seconds:.0f} | {o.limit_s:.0f} |")
    return "\n".join(lines)


def summary(outcomes: list[Outcome], work: Path, head: str) -> str:
    """The step table, then each step's markdown tables."""
    lines = [f"# GPU session at {head}", "", step_table(outcomes)]
    for o in outcomes:
        for md in sorted((work / o.step.name).glob("*.md")):
            lines += ["", f"## {o.step.name}: {md.name}", "", md.read_text().rstrip()]
    return "\n".join(lines) + "\n"


def pack(work: Path, out: Path, outcomes: list[Outcome], head: str) -> None:
    """Rewrites `results.tgz` and `summary.md` in `out` (each through a temporary name, so a
    kill mid-write leaves the previous complete file)."""
    tmp = out / "results.tgz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(work, arcname="gpu_session")
    tmp.replace(out / "results.tgz")
    tmp = out / "summary.md.tmp"
    tmp.write_text(summary(outcomes, work, head))
    tmp.replace(out / "summary.md")


def main(argv: list[str] | None = None, steps: tuple[Step, ...] = STEPS) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="where the three files go ($OUT)")
    parser.add_argument("--steps", default="",
                        help=f"comma-separated subset of {', '.join(s.name for s in steps)}")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every limit")
    parser.add_argument("--smoke", action="store_true", help="pass --smoke to every step")
    args = parser.parse_args(argv)
    names = [s for s in args.steps.split(",") if s]
    unknown = set(names) - {s.name for s in steps}
    if unknown:
        parser.error(f"unknown --steps {sorted(unknown)}; choose from "
                     f"{', '.join(s.name for s in steps)}")  # fmt: skip
    if args.scale <= 0:
        parser.error("--scale must be positive")
    chosen = [s for s in steps if not names or s.name in names]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    head = commit()
    os.environ.setdefault("CARZERO_COMMIT", head)
    os.environ["PYTHONUNBUFFERED"] = "1"
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    extra = ["--smoke"] if args.smoke else []
    work = Path(tempfile.mkdtemp(prefix="gpu_session_"))
    outcomes: list[Outcome] = []
    try:
        with open(out / "session.log", "w") as log:
            log.write(f"commit {head}\n")
            for step in chosen:
                outcomes.append(run_step(step, work, log, args.scale, extra))
                pack(work, out, outcomes, head)
        # the steps' tables, then the step table last: the device tool returns the tail
        print(summary(outcomes, work, head))
        print(step_table(outcomes))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(o.returncode == 0 for o in outcomes) else 1

if __name__ == "__main__":
    sys.exit(main())
