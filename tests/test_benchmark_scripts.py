"""The CPU measurement scripts in benchmarks/ run and report what they say (small sizes; the
figures themselves are BENCHMARKS.md's, never asserted here)."""

from __future__ import annotations

import sys

import pytest

from benchmarks import decode_speed, rss


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_rss_reports_each_case_from_a_fresh_process(capsys, monkeypatch):
    # two of the four cases (a process each, ~4 s of imports); the child runs all four below
    monkeypatch.setattr(rss, "CASES", [("forward", "chunked"), ("train", "reference")])
    assert rss.main(["--small", "--calls", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| case | backend | tensors MiB")
    rows = [line.split("|")[1:-1] for line in table[2:]]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        ("forward N=M=8", "chunked"), ("training step B=6", "reference")]  # fmt: skip
    for r in rows:
        assert float(r[2]) > 0 and float(r[3]) >= 0  # tensors tracked; a rise, never negative


def test_rss_child_counts_tensors_it_allocates():
    one = rss.child("forward", "reference", 4, small=True, calls=1)
    four = rss.child("forward", "reference", 8, small=True, calls=1)
    assert len(one["rss_mib"]) == 1
    assert four["tensors_mib"] > 2 * one["tensors_mib"]  # the reference keeps every pair
    for task, backend in rss.CASES:
        assert rss.child(task, backend, 4, small=True, calls=1)["tensors_mib"] > 0


def test_decode_speed_measures_each_file_and_the_pool(tmp_path):
    files = decode_speed.make_files(tmp_path, sizes=[(70, 90), (90, 70)])
    assert sorted(f.name for f in files) == ["x70x90.jpg", "x70x90.png", "x90x70.jpg",
                                             "x90x70.png"]  # fmt: skip
    ms = decode_speed.per_image_ms(files, repeats=1)
    assert set(ms) == {f.name for f in files} and all(v > 0 for v in ms.values())
    assert decode_speed.rate(files, 6, workers=2) > 0
    with pytest.raises(SystemExit):
        decode_speed.main(["--workers", "0"])
