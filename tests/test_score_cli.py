"""`carzero-fast score` end to end (tiny random models): scores against direct calls,
half precision, resume after a kill, bad input, image listings, failures mid-run, and
sharding under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import rel_err

import carzero_fast as cf
from carzero_fast.cli import main as cli
from carzero_fast.model import CARZeroModel

transformers = pytest.importorskip("transformers")
pydicom = pytest.importorskip("pydicom")

from tiny_carzero import (  # noqa: E402
    CLASSES,
    carzero_ckpt,
    collection,
    direct_scores,
    read_csv,
    score_args,
)

from carzero_fast.encoders.image import preprocess_file  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return collection(tmp_path_factory.mktemp("score"))


def test_score_end_to_end(setup, tmp_path):
    s = setup
    out = tmp_path / "scores.csv"
    assert cli(score_args(s, out)) == 0
    rows = read_csv(out)
    assert rows[0] == ["path", *CLASSES]
    readable = sorted(p for p in s.images.iterdir() if p.name != "broken.png")
    assert [Path(r[0]) for r in rows[1:]] == readable
    got = torch.tensor([[float(v) for v in r[1:]] for r in rows[1:]])
    direct = direct_scores(s.model, readable)
    assert rel_err(got, direct) < 1e-6
    errors = read_csv(Path(f"{out}.errors.csv"))
    assert [Path(r[0]).name for r in errors[1:]] == ["broken.png"]
    # the same images from a CSV list (header, paths relative to it), as probabilities
    listing = s.images / "list.csv"
    listing.write_text("path\n" + "".join(f"{p.name}\n" for p in reversed(readable)))
    probs = tmp_path / "probs.csv"
    args = score_args(s, probs, "--probabilities")
    args[args.index("--images") + 1] = str(listing)
    try:
        assert cli(args) == 0
    finally:
        listing.unlink()
    rows = read_csv(probs)
    assert [Path(r[0]) for r in rows[1:]] == readable[::-1]  # the list's order
    got = torch.tensor([[float(v) for v in r[1:]] for r in rows[1:]])
    assert rel_err(got, torch.sigmoid(direct.flip(0))) < 1e-6


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_score_in_half_precision(setup, tmp_path, dtype, capsys, monkeypatch):
    """`--dtype` runs the whole model (encoders, prompts, aligner) in that dtype: the scores
    differ from fp32's (the dtype is applied) by no more than 2× the error of PyTorch's own
    module in that dtype (the reference backend on a cast copy of the model). On a CPU
    without native products of the dtype, a note says fp32 is faster."""
    from carzero_fast.backends import cpu_gemm

    s = setup
    out = tmp_path / "scores.csv"
    monkeypatch.setattr(cpu_gemm, "has_native_cpu_products", lambda dtype: dtype == torch.float16)
    assert cli(score_args(s, out, "--dtype", dtype)) == 0
    note = "no native bf16 matrix products" in capsys.readouterr().err
    assert note == (dtype == "bf16")
    rows = read_csv(out)
    paths = [Path(r[0]) for r in rows[1:]]
    got = torch.tensor([[float(v) for v in r[1:]] for r in rows[1:]])
    exact = direct_scores(s.model, paths)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    cast = CARZeroModel.from_checkpoint(s.model_dir).to(half)
    prompts = [f"There is {c}." for c in CLASSES]
    with torch.no_grad():
        pixels = torch.stack([preprocess_file(p) for p in paths]).to(half)
        img, txt = cast.encode_images(pixels), cast.encode_texts(prompts)
        torch_half = cf.zero_shot_scores(cast.aligner, img, txt, backend="reference")
    baseline = rel_err(torch_half.float(), exact)
    assert 0 < rel_err(got, exact) <= 2 * baseline, (rel_err(got, exact), baseline)


def test_score_killed_then_resumed_gives_the_same_csv(setup, tmp_path):
    s = setup
    full = tmp_path / "full.csv"
    assert cli(score_args(s, full)) == 0
    out = tmp_path / "resumed.csv"
    env = dict(os.environ, CARZERO_FAST_SCORE_DIE_AFTER_BATCHES="2")
    proc = subprocess.run([sys.executable, "-m", "carzero_fast.cli", *score_args(s, out)],
                          env=env, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 137
    assert not out.exists()  # OUT appears only once complete
    part = tmp_path / "resumed.csv.part-00000-of-00001"
    assert 1 < len(read_csv(part)) < len(read_csv(full))  # header + the batches before the kill
    with part.open("a") as f:
        f.write(str(s.images / "x16.png") + ",0.5")  # a row torn by the kill
    assert cli(score_args(s, out, "--resume")) == 0
    assert out.read_text() == full.read_text()
    assert Path(f"{out}.errors.csv").read_text() == Path(f"{full}.errors.csv").read_text()
    assert not list(tmp_path.glob("*.part-*"))
    run = json.loads(Path(f"{out}.run.json").read_text())  # the scores' provenance stays
    assert run["dtype"] == "fp32" and run["batch_size"] == 4 and not run["probabilities"]
    assert run["prompts"] == {c: [f"There is {c}."] for c in CLASSES}
    # resuming a finished run has nothing left to do and gives the same file
    assert cli(score_args(s, out, "--resume")) == 0
    assert out.read_text() == full.read_text()


def test_score_bad_input_exits_2_and_writes_nothing(setup, tmp_path, capsys):
    s = setup
    out = tmp_path / "s.csv"
    dup = tmp_path / "dup.txt"
    dup.write_text("effusion\nedema\neffusion\n")
    dup_json = tmp_path / "dup.json"  # json.loads would keep the last one silently
    dup_json.write_text('{"effusion": "There is effusion.", "effusion": ["There is edema."]}')
    empty = tmp_path / "empty.txt"
    empty.write_text("effusion\n\nedema\n")
    one_word = tmp_path / "one_word.json"
    one_word.write_text('{"effusion": ["There is effusion.", "Effusion."]}')
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"\xc9panchement\n")
    ckpt = tmp_path / "carzero.ckpt"
    ckpt.write_bytes(b"")  # a file: score takes a directory, whatever is in it
    cases = [
        (["--images", str(tmp_path / "nope.png")], "do not exist"),
        (["--classes", str(dup)], "repeats class 'effusion'"),
        (["--classes", str(dup_json)], "repeats class 'effusion'"),
        (["--classes", str(empty)], "line 2 is empty"),
        (["--classes", str(latin1)], f"class file {latin1} is not UTF-8"),
        (["--model", str(tmp_path)], "not a carzero_fast model directory"),
        (["--model", str(ckpt)], f"convert the CARZero checkpoint first (carzero-fast convert "
                                 f"{ckpt} MODEL_DIR --tokenizer BERT_DIR)"),  # fmt: skip
        (["--classes", str(one_word)], "class 'effusion': prompt 'Effusion.' is empty after "
                                       "CARZero's text cleaning"),  # fmt: skip
        (["--template", "{finding}"], "prompt 'effusion' is empty"),  # .txt classes
        (["--template", "There is {finding} {x}."], "'{finding}' exactly once and no other"),
        (["--template", "There is {finding} {}."], "'{finding}' exactly once and no other"),
        (["--backend", "fast"], "unknown backend 'fast'"),
        (["--workers", "0"], "--workers must be positive"),
        (["--errors", str(tmp_path)], f"--errors {tmp_path} is a directory"),
        (["--errors", str(tmp_path / "no" / "e.csv")], "the folder of --errors"),
    ]
    for override, message in cases:
        args = score_args(s, out)
        for k in range(0, len(override), 2):
            if override[k] not in args:
                args += override[k : k + 2]
            else:
                args[args.index(override[k]) + 1] = override[k + 1]
        assert cli(args) == 2, override
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, (override, err)
        assert not out.exists() and not Path(f"{out}.errors.csv").exists()
    assert cli(score_args(s, tmp_path / "no" / "s.csv")) == 2
    assert f"the folder of --out, {tmp_path / 'no'}, does not exist" in capsys.readouterr().err
    out.write_text("path,x\n")
    assert cli(score_args(s, out)) == 2
    assert "--resume" in capsys.readouterr().err
    out.unlink()

    # an existing file given as --errors is neither overwritten nor deleted, resumed or not
    labels = tmp_path / "labels.csv"
    labels.write_text("important,data\n")
    for resume in ([], ["--resume"]):
        assert cli(score_args(s, out, "--errors", str(labels), *resume)) == 2
        assert str(labels) in capsys.readouterr().err
        assert labels.read_text() == "important,data\n" and not out.exists()
    assert cli(score_args(s, out, "--errors", str(out))) == 2
    assert "--out and --errors name the same file" in capsys.readouterr().err


def _fail_after(monkeypatch, n_batches: int) -> list[int]:
    """Make the batch after the first `n_batches` fail, once (as a device error would);
    returns the log of scored batches."""
    import carzero_fast.score as score

    calls: list[int] = []
    failed: list[int] = []
    real = score._score

    def scored(*args, **kwargs):
        calls.append(1)
        if len(calls) == n_batches + 1 and not failed:
            failed.append(1)
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(score, "_score", scored)
    return calls


def test_resume_refuses_other_options_and_matches_any_spelling(setup, tmp_path, monkeypatch,
                                                               capsys):  # fmt: skip
    """--resume continues only a run of the same model, prompts and options (OUT.run.json),
    and finds the earlier rows whether the images are named relative or absolute."""
    s = setup
    full = tmp_path / "full.csv"
    assert cli(score_args(s, full)) == 0
    monkeypatch.chdir(s.images.parent)
    out = tmp_path / "s.csv"
    relative = score_args(s, out)
    relative[relative.index("--images") + 1] = s.images.name
    calls = _fail_after(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="device lost"):
        cli(relative)
    capsys.readouterr()
    for extra, named in ((["--probabilities"], "--probabilities"), (["--dtype", "bf16"], "--dtype"),
                         (["--template", "No {finding}."], "the prompts"),
                         (["--batch-size", "5"], "--batch-size")):  # fmt: skip
        args = score_args(s, out, "--resume", *extra)
        if "--batch-size" in extra:
            args[args.index("--batch-size") + 1] = "5"
            args = args[: -2]
        assert cli(args) == 2, extra
        err = capsys.readouterr().err
        assert named in err and "changed since the run" in err, (extra, err)
    calls.clear()
    assert cli(score_args(s, out, "--resume")) == 0  # absolute paths this time
    assert len(calls) == 6 - 2  # 21 images in 6 batches, 2 were kept
    assert out.read_text() == full.read_text()  # spelled as this run lists them


def test_image_listing(setup, tmp_path, capsys):
    """CSV lists with Excel's BOM and any header; folders named; links to folders followed
    (a loop once); a file name that is not UTF-8 refused before anything is written."""
    from carzero_fast.score import UsageError, list_images

    s = setup
    listing = tmp_path / "list.csv"
    listing.write_text("\ufefffilename\n" + "".join(f"{p}\n" for p in sorted(s.images.glob("x0*"))),
                       encoding="utf-8")  # fmt: skip
    assert list_images([str(listing)]) == sorted(s.images.glob("x0*"))
    with pytest.raises(UsageError, match="is a folder"):
        list_images([str(s.images / "x00.png"), str(s.images)])
    latin1 = tmp_path / "latin1.csv"  # named, with the offending byte's offset
    latin1.write_bytes(b"path\n" + str(s.images / "x00.png").encode() + b"\nR\xe9sum\xe9.png\n")
    with pytest.raises(UsageError, match=rf"image list {latin1} is not UTF-8 text .* at byte "
                       rf"{6 + len(str(s.images / 'x00.png').encode()) + 1}\)"):  # fmt: skip
        list_images([str(latin1)])
    # one file in two spellings is one image twice (OUT would hold its row twice, the first
    # one under the other spelling): refused like a repeated path
    for twice in (s.images / "x00.png", s.images / ".." / s.images.name / "x00.png"):
        with pytest.raises(UsageError, match="names a file twice"):
            list_images([str(s.images / "x00.png"), str(s.images / "x01.png"), str(twice)])
    tree = tmp_path / "tree"
    (tree / "a").mkdir(parents=True)
    (tree / "a" / "one.png").write_bytes(b"")
    (tree / "linked").symlink_to(s.images, target_is_directory=True)
    (tree / "a" / "up").symlink_to(tree, target_is_directory=True)  # a loop
    found = list_images([str(tree)])
    assert found[0] == tree / "a" / "one.png" and len(found) == 1 + 21
    odd = tmp_path / "odd"
    odd.mkdir()
    with open(os.path.join(os.fsencode(odd), b"caf\xe9.png"), "wb") as f:
        f.write(b"")
    out = tmp_path / "o.csv"
    args = score_args(s, out)
    args[args.index("--images") + 1] = str(odd)
    assert cli(args) == 2
    assert "not a valid UTF-8 name" in capsys.readouterr().err
    assert not list(tmp_path.glob("o.csv*"))


def test_resume_retry_errors_reads_unreadable_images_again(setup, tmp_path):
    """An image that failed (e.g. a network read) is kept as an error on --resume, and read
    again with --retry-errors: its batch is scored again and the errors CSV goes."""
    s = setup
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name in ("x00.png", "x01.png", "x02.png"):
        (imgs / name).write_bytes((s.images / name).read_bytes())
    (imgs / "x03.png").write_bytes(b"not yet")
    out = tmp_path / "s.csv"
    args = score_args(s, out)
    args[args.index("--images") + 1] = str(imgs)
    assert cli(args) == 0
    assert [Path(r[0]).name for r in read_csv(Path(f"{out}.errors.csv"))[1:]] == ["x03.png"]
    (imgs / "x03.png").write_bytes((s.images / "x03.png").read_bytes())
    assert cli([*args, "--resume"]) == 0
    assert len(read_csv(out)) == 1 + 3  # still an error: not read again
    assert cli([*args, "--resume", "--retry-errors"]) == 0
    assert [Path(r[0]).name for r in read_csv(out)[1:]] == ["x00.png", "x01.png", "x02.png",
                                                       "x03.png"]  # fmt: skip
    assert not Path(f"{out}.errors.csv").exists()
    assert cli([*args, "--retry-errors"]) == 2  # only with --resume


def test_resume_after_an_interrupted_retry_lists_each_image_once(setup, tmp_path,
                                                                 monkeypatch):  # fmt: skip
    """An image that a stopped --retry-errors run scored is no error any more on the next
    --resume (the finished errors CSV of the run before still lists it): OUT holds it, the
    errors CSV does not."""
    s = setup
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    names = [f"x{i:02d}.png" for i in range(8)]  # two batches of 4
    for name in names:
        (imgs / name).write_bytes(b"not yet" if name in ("x01.png", "x05.png")
                                  else (s.images / name).read_bytes())  # fmt: skip
    out = tmp_path / "s.csv"
    args = score_args(s, out)
    args[args.index("--images") + 1] = str(imgs)
    assert cli(args) == 0
    for name in ("x01.png", "x05.png"):
        (imgs / name).write_bytes((s.images / name).read_bytes())
    _fail_after(monkeypatch, 1)  # the retry scores the first batch (x01 now), then stops
    with pytest.raises(RuntimeError, match="device lost"):
        cli([*args, "--resume", "--retry-errors"])
    assert cli([*args, "--resume"]) == 0  # x05 stays an error: not read again
    assert [Path(r[0]).name for r in read_csv(out)[1:]] == [n for n in names if n != "x05.png"]
    assert [Path(r[0]).name for r in read_csv(Path(f"{out}.errors.csv"))[1:]] == ["x05.png"]


def test_score_refuses_models_that_cannot_run(setup, tmp_path, capsys, monkeypatch):
    """Models whose files do not fit, or that cannot take the 224-px crops, and a backend that
    cannot run on the device: one line, exit 2, nothing written."""
    import json
    import shutil

    from carzero_fast.encoders.image import VisionTransformer, ViTConfig

    s = setup
    out = tmp_path / "s.csv"
    wide = shutil.copytree(s.model_dir, tmp_path / "wide")
    cfg = json.loads((wide / "config.json").read_text())
    cfg["aligner"]["d_ffn"] = 64  # the weights are 48 wide
    (wide / "config.json").write_text(json.dumps(cfg))
    lacking = shutil.copytree(s.model_dir, tmp_path / "lacking")
    del cfg["aligner"]
    (lacking / "config.json").write_text(json.dumps(cfg))
    truncated = shutil.copytree(s.model_dir, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    edited = {}  # config.json edited so that it no longer fits the weights or the encoders
    for name, edit in (("text_key", lambda c: c["text"].update(max_len=9)),
                       ("vit_size", lambda c: c["vit"].update(img_size=448))):  # fmt: skip
        edited[name] = shutil.copytree(s.model_dir, tmp_path / name)
        c = json.loads((edited[name] / "config.json").read_text())
        edit(c)
        (edited[name] / "config.json").write_text(json.dumps(c))
    no_tokenizer = shutil.copytree(s.model_dir, tmp_path / "no_tokenizer")
    shutil.rmtree(no_tokenizer / "tokenizer")
    torch.manual_seed(0)
    vit96 = VisionTransformer(ViTConfig(img_size=96, patch_size=32, embed_dim=32, depth=1,
                                        num_heads=4))  # fmt: skip
    small = CARZeroModel(vit96, s.model.text_encoder, s.model.aligner)
    ckpt = carzero_ckpt(small, tmp_path / "small.ckpt")
    assert cli(["convert", str(ckpt), str(tmp_path / "small"), "--tokenizer", str(s.bert),
                "--vit-heads", "4"]) == 0  # fmt: skip
    assert "warning: the model's ViT takes 96×96-px images" in capsys.readouterr().err
    cases = [
        (["--model", str(wide)], "the fusion_module weights do not fit the aligner configuration "
                                 "in config.json: checkpoint key 'decoder.layers.0.linear1.bias' "
                                 "has shape (48,), expected (64,)"),  # fmt: skip
        (["--model", str(lacking)], "config.json lacks the aligner configuration"),
        (["--model", str(edited["text_key"])], "config.json: text: "),
        (["--model", str(edited["vit_size"])], "config.json does not fit model.safetensors: "),
        (["--model", str(truncated)], f"{weights} cannot be read as safetensors"),
        (["--model", str(no_tokenizer)], "lacks its tokenizer folder"),
        (["--model", str(tmp_path / "small")], "the model's ViT takes 96×96-px images"),
    ]
    # triton on a CPU without Triton's interpreter (other test files turn it on for the session)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cases.append((["--backend", "triton", "--device", "cpu"], "--backend triton cannot run "
                  "here: backend 'triton'"))  # fmt: skip
    for override, message in cases:
        args = score_args(s, out, *override)
        if override[0] == "--model":
            args[args.index("--model") + 1] = override[1]
            args = args[: -len(override)]
        assert cli(args) == 2, override
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, (override, err)
        assert not out.exists() and not Path(f"{out}.errors.csv").exists()
    with pytest.raises(ValueError, match="lacks the aligner"):
        CARZeroModel.from_checkpoint(lacking)


def test_score_failing_mid_run_keeps_the_scored_batches(setup, tmp_path, monkeypatch, capsys):
    """An error after the first batch: OUT is not written, the part holding the scored batch
    stays for --resume (the error says so), the still empty errors part goes; an error before
    any batch leaves nothing at all."""
    import carzero_fast.score as score

    s = setup
    calls = []
    real_score = score._score

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real_score(*args, **kwargs)

    monkeypatch.setattr(score, "_score", fail_second)
    out = tmp_path / "s.csv"
    with pytest.raises(RuntimeError, match="device lost"):
        cli(score_args(s, out))
    assert "rerun with --resume" in capsys.readouterr().err
    assert not out.exists() and not Path(f"{out}.errors.csv").exists()
    part = tmp_path / "s.csv.part-00000-of-00001"
    # the first batch (the sorted list starts d0-d2.dcm, broken.png): 3 scores; its errors
    # part holds broken.png
    assert [Path(r[0]).name for r in read_csv(part)[1:]] == ["d0.dcm", "d1.dcm", "d2.dcm"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "s.csv.errors.csv.part-00000-of-00001", "s.csv.part-00000-of-00001", "s.csv.run.json"]
    # a fresh run is refused (it would overwrite the parts); --resume continues
    assert cli(score_args(s, out)) == 2
    assert "--resume" in capsys.readouterr().err
    calls.clear()
    monkeypatch.setattr(score, "_score", real_score)
    assert cli(score_args(s, out, "--resume")) == 0
    assert len(read_csv(out)) == 1 + 20 and len(read_csv(Path(f"{out}.errors.csv"))) == 1 + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "s.csv", "s.csv.errors.csv", "s.csv.run.json"]

    def fail_first(*args, **kwargs):
        raise RuntimeError("device lost at once")

    monkeypatch.setattr(score, "_score", fail_first)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(RuntimeError, match="device lost at once"):
        cli(score_args(s, other / "o.csv"))
    assert not list(other.iterdir())  # nothing scored: nothing kept


def _torchrun_worker(rank: int, world: int, port: int, args: list[str], die_rank: int) -> None:
    """One rank of `carzero-fast score` as torchrun would start it (env:// rendezvous)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    if die_rank >= 0:
        os.environ.update(CARZERO_FAST_SCORE_DIE_AFTER_BATCHES="1",
                          CARZERO_FAST_SCORE_DIE_RANK=str(die_rank))  # fmt: skip
    torch.set_num_threads(1)
    code = cli(args)
    if code:
        raise SystemExit(code)
    # The command destroyed its process group; leave without the interpreter's teardown,
    # where gloo's native threads can abort a process whose work is done (see
    # tests/test_distributed.py::_finish).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _torchrun(args: list[str], world: int = 2, die_rank: int = -1) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_torchrun_worker, args=(world, port, args, die_rank), nprocs=world, join=True)


def test_score_sharded_under_torchrun_equals_one_process_and_resumes(setup, tmp_path):
    s = setup
    single = tmp_path / "single.csv"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same GEMM path, so the same last bits
    try:
        assert cli(score_args(s, single)) == 0
    finally:
        torch.set_num_threads(threads)
    sharded = tmp_path / "sharded.csv"
    _torchrun(score_args(s, sharded))
    assert sharded.read_text() == single.read_text()
    assert Path(f"{sharded}.errors.csv").read_text() == Path(f"{single}.errors.csv").read_text()
    assert not list(tmp_path.glob("*.part-*"))

    resumed = tmp_path / "resumed.csv"
    with pytest.raises(Exception):  # noqa: B017 — rank 1 dies (exit 137) after one batch
        _torchrun(score_args(s, resumed), die_rank=1)
    assert not resumed.exists()  # only part files so far: the CSV appears once complete
    _torchrun(score_args(s, resumed, "--resume"))
    assert resumed.read_text() == single.read_text()

    # killed with 2 ranks, resumed by one process: the 2 ranks' complete batches are kept
    resharded = tmp_path / "resharded.csv"
    with pytest.raises(Exception):  # noqa: B017
        _torchrun(score_args(s, resharded), die_rank=1)
    torch.set_num_threads(1)
    try:
        assert cli(score_args(s, resharded, "--resume")) == 0
    finally:
        torch.set_num_threads(threads)
    assert resharded.read_text() == single.read_text()
    assert not list(tmp_path.glob("*.part-*"))


def test_default_workers_share_the_usable_cpus(monkeypatch):
    """--workers defaults to the CPUs this process may use (its affinity mask, not the
    machine's count), split among torchrun's local ranks, at least one each."""
    from carzero_fast import score

    monkeypatch.setattr(score.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert score.default_workers() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert score.default_workers() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert score.default_workers() == 1
    monkeypatch.setattr(score.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert score.default_workers() == 1
    args = ["--model", "m", "--images", "a", "--classes", "c", "--out", "o"]
    assert score.parser().parse_args(args).workers is None  # main() fills in default_workers()
