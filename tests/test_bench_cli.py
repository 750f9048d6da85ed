"""The benchmark CLI runs end to end (tiny dims; timings are not asserted)."""

from __future__ import annotations

import json

from carzero_fast.bench import main as bench_main
from carzero_fast.cli import main as cli_main


def test_bench_writes_a_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--n", "3", "--m", "2", "--p", "5", "--train-batch", "2", "--d-model", "32",
            "--repeats", "1", "--json", str(out)]  # fmt: skip
    assert cli_main(["bench", *args]) == 0
    table = capsys.readouterr().out
    assert "| forward | chunked | bf16 |" in table and "| train | reference | fp32 |" in table
    rows = json.loads(out.read_text())["rows"]
    assert {(r["task"], r["backend"], r["dtype"]) for r in rows} == {
        ("forward", "reference", "fp32"),
        ("forward", "chunked", "fp32"),
        ("forward", "reference", "bf16"),
        ("forward", "chunked", "bf16"),
        ("train", "reference", "fp32"),
        ("train", "chunked", "fp32"),
    }
    base = [r for r in rows if r["backend"] == "reference" and r["dtype"] == "fp32"]
    assert all(r["speedup_vs_reference_fp32"] == 1.0 for r in base)
    assert all(r["peak_extra_mib"] > 0 and r["time_s"] > 0 for r in rows)


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
