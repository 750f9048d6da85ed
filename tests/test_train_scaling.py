"""The training-scaling benchmark: its memory model and a smoke run at a tiny config."""

from __future__ import annotations

import json

from benchmarks.train_scaling import fit, largest_batch, main


def test_fit_recovers_a_quadratic_and_largest_batch_inverts_it():
    coef = fit([2, 4, 8, 16], [1 + 0.5 * b + 0.25 * b * b for b in (2, 4, 8, 16)])
    assert all(abs(x - y) < 1e-9 for x, y in zip(coef, [1.0, 0.5, 0.25], strict=True))
    # 1 + 0.5 B + 0.25 B² ≤ 100 ⇔ B ≤ 18.9
    assert largest_batch(coef, 100.0) == 18
    assert largest_batch(coef, 1.0) == 0
    assert largest_batch([0.0, 1.0, 0.0], 1e3) == 1000  # linear, from two points
    assert largest_batch([0.0, 1.0, -0.1], 1e3, limit=64) == 64  # a plateau: capped
    # a fit through small batches that dips (negative linear term): 0.5 MiB at B = 1, 0.2 at
    # 2 and 3, 0.5 at 4; within 0.3 MiB the measured 2 and 3 fit, not "none"
    coef = fit([2, 3, 4], [0.2, 0.2, 0.5])
    assert largest_batch(coef, 0.3) == 3


def test_bad_arguments_are_refused_before_the_run(capsys, tmp_path):
    for args, words in ((["--batches", "8"], "two or more"),
                        (["--batches", "2,,x"], "two or more"),
                        (["--batches", "2,3", "--backends", "nope"], "unknown backend 'nope'"),
                        (["--batches", "2,3", "--d-model", "30"], "multiple of 4"),
                        (["--batches", "2,3", "--json", str(tmp_path / "no" / "x.json")],
                         "cannot write --json")):  # fmt: skip
        assert main(args) == 2, args
        assert words in capsys.readouterr().err, args


def test_smoke_run_writes_rows_and_models(tmp_path, capsys):
    out = tmp_path / "ts.json"
    assert main(["--batches", "2,3,5", "--d-model", "32", "--budget-mib", "3", "--repeats", "1",
                 "--json", str(out), "--malloc", "default"]) == 0  # fmt: skip
    res = json.loads(out.read_text())
    assert res["malloc"] == "default"
    assert {(r["backend"], r["batch"]) for r in res["rows"]} == {
        (b, n) for b in ("reference", "chunked") for n in (2, 3, 5)
    }
    for name, m in res["models"].items():
        assert m["largest_batch_in_budget"] >= 1, name
        assert m["measured_peak_at_checked_mib"] <= 3 or m["checked_batch"] == 1, name
    # the reference keeps per-pair activations: its B² term is the larger one
    assert res["models"]["reference"]["c_mib_per_pair"] > res["models"]["chunked"]["c_mib_per_pair"]
    assert "largest B in 3 MiB" in capsys.readouterr().out
