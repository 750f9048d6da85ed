"""Zero-shot scoring end to end: checkpoints, prompts, `convert`, `score` (tiny random models)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rel_err
from PIL import Image

import carzero_fast as cf
from carzero_fast.cli import main as cli
from carzero_fast.model import CARZeroModel
from carzero_fast.prompts import PromptCache, read_classes

transformers = pytest.importorskip("transformers")
pydicom = pytest.importorskip("pydicom")

from tiny_carzero import bert_dir, tiny_model  # noqa: E402

from carzero_fast.encoders.image import preprocess_file  # noqa: E402

CLASSES = ["effusion", "pneumothorax", "cardiomegaly"]


def _bert_dir(root: Path) -> Path:
    return bert_dir(root)


def _model(bert: Path) -> CARZeroModel:
    return tiny_model(bert, aligner_layers=1)


def _carzero_ckpt(model: CARZeroModel, path: Path, extra: object = None) -> Path:
    """A checkpoint laid out like CARZero's Lightning one."""
    sd = {}
    for k, v in model.img_encoder.state_dict().items():
        sd[f"CARZero.img_encoder.model.{k}"] = v
    for k, v in model.text_encoder.model.state_dict().items():
        sd[f"CARZero.text_encoder.model.{k}"] = v
    for k, v in model.aligner.state_dict().items():
        sd[f"CARZero.fusion_module.{k}"] = v
    sd["CARZero.fusion_module.logit_scale"] = torch.ones(())
    ckpt = {"state_dict": sd, "epoch": 7}
    if extra is not None:
        ckpt["hyper_parameters"] = extra
    torch.save(ckpt, path)
    return path


def _write_dicom(path: Path, arr: np.ndarray) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("zs")
    bert = _bert_dir(root)
    model = _model(bert)
    model_dir = model.save_pretrained(root / "model")
    imgs = root / "images"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(17):
        h, w = (300 + 13 * i, 260 + 7 * (i % 5))
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(imgs / f"x{i:02d}.png")
    for i in range(3):
        _write_dicom(imgs / f"d{i}.dcm", rng.integers(0, 4096, (280, 240)))
    (imgs / "broken.png").write_bytes(b"\x89PNG not really")
    classes = root / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    return Namespace(root=root, bert=bert, model=model, model_dir=model_dir, images=imgs,
                     classes=classes)  # fmt: skip


def _direct_scores(model: CARZeroModel, paths: list[Path]) -> torch.Tensor:
    prompts = [f"There is {c}." for c in CLASSES]
    with torch.no_grad():
        txt = model.encode_texts(prompts)
        img = model.encode_images(torch.stack([preprocess_file(p) for p in paths]))
        return cf.zero_shot_scores(model.aligner, img, txt)


def _read(path: Path) -> list[list[str]]:
    return list(csv.reader(path.open(newline="")))


def _score_args(s: Namespace, out: Path, *extra: str) -> list[str]:
    return ["score", "--model", str(s.model_dir), "--images", str(s.images), "--classes",
            str(s.classes), "--out", str(out), "--batch-size", "4", "--workers", "2",
            *extra]  # fmt: skip


def test_checkpoint_and_directory_load_back_identically(setup, tmp_path):
    s = setup
    ckpt = _carzero_ckpt(s.model, tmp_path / "carzero.ckpt")
    from_ckpt = CARZeroModel.from_checkpoint(ckpt, tokenizer=s.bert, vit_heads=4)
    from_dir = CARZeroModel.from_checkpoint(s.model_dir)
    paths = sorted(s.images.glob("x0*.png"))[:3]
    ref = _direct_scores(s.model, paths)
    assert torch.equal(_direct_scores(from_ckpt, paths), ref)
    assert torch.equal(_direct_scores(from_dir, paths), ref)


def test_model_call_scores_images_against_prompts(setup):
    s = setup
    pixels = torch.stack([preprocess_file(p) for p in sorted(s.images.glob("x0*.png"))[:2]])
    prompts = ["There is edema.", "There is effusion.", "No finding."]
    with torch.no_grad():
        got = s.model(pixels, prompts, backend="chunked")
        want = cf.zero_shot_scores(s.model.aligner, s.model.encode_images(pixels),
                                   s.model.encode_texts(prompts), backend="reference")  # fmt: skip
    assert got.shape == (2, 3) and rel_err(got, want) < 1e-5


def test_convert_command(setup, tmp_path):
    s = setup
    ckpt = _carzero_ckpt(s.model, tmp_path / "carzero.ckpt")
    out = tmp_path / "converted"
    assert cli(["convert", str(ckpt), str(out), "--tokenizer", str(s.bert),
                "--vit-heads", "4"]) == 0  # fmt: skip
    paths = sorted(s.images.glob("x1*.png"))[:2]
    assert torch.equal(_direct_scores(CARZeroModel.from_checkpoint(out), paths),
                       _direct_scores(s.model, paths))  # fmt: skip


def test_convert_rejects_bad_checkpoints_and_leaves_nothing(setup, tmp_path, capsys):
    s = setup
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"encoder.layer.0.weight": torch.zeros(2)}}, other)
    out = tmp_path / "out"
    assert cli(["convert", str(other), str(out), "--tokenizer", str(s.bert)]) == 2
    assert "not a CARZero checkpoint" in capsys.readouterr().err
    assert not out.exists()

    pickled = _carzero_ckpt(s.model, tmp_path / "pickled.ckpt", extra=Namespace(lr=1e-4))
    assert cli(["convert", str(pickled), str(out), "--tokenizer", str(s.bert), "--vit-heads",
                "4", "--trust-checkpoint"]) == 0  # fmt: skip

    assert cli(["convert", str(tmp_path / "missing.ckpt"), str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err

    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    assert cli(["convert", str(text), str(tmp_path / "o3"), "--tokenizer", str(s.bert)]) == 2
    err = capsys.readouterr().err
    assert "is not a checkpoint torch can read" in err and "--trust-checkpoint" not in err
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    assert cli(["convert", str(pickled), str(a_file), "--tokenizer", str(s.bert)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert a_file.read_text() == "mine" and not (tmp_path / "o3").exists()


class _RunsCode:
    """Unpickling this runs `touch PATH` (what a malicious checkpoint could do)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _ckpt_with_objects_of_a_gone_module(model, path, name, source, make_extra):  # noqa: ANN001
    """A CARZero checkpoint at `path` whose extra entries, `make_extra(module)`, hold objects
    of a module `name` (its code `source`) that is gone once the file is written: it is not
    installed where convert runs."""
    import importlib

    folder = path.parent / f"{name}_gone"
    folder.mkdir()
    (folder / f"{name}.py").write_text(source)
    sys.path.insert(0, str(folder))
    try:
        return _carzero_ckpt(model, path, extra=make_extra(importlib.import_module(name)))
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(name, None)
        (folder / f"{name}.py").unlink()


def test_convert_reads_python_objects_as_placeholders(setup, tmp_path, capsys):
    """A Lightning checkpoint's hyper-parameters (CARZero saves an OmegaConf config) converts
    without --trust-checkpoint and without the objects' package: they are read as inert
    placeholders, and nothing in the file runs."""
    s = setup
    ckpt = _ckpt_with_objects_of_a_gone_module(
        s.model, tmp_path / "lightning.ckpt", "hparams_lib",
        "class Config:\n    def __init__(self, **kw):\n        self.__dict__.update(kw)\n",
        lambda lib: {"cfg": lib.Config(lr=1e-4, nested=Namespace(a=1)), "epochs": [1, 2]})

    marker = tmp_path / "ran"
    bad = _carzero_ckpt(s.model, tmp_path / "bad.ckpt", extra={"x": _RunsCode(marker)})
    out = tmp_path / "converted"
    assert cli(["convert", str(bad), str(out), "--tokenizer", str(s.bert),
                "--vit-heads", "4"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "cannot be read safely" in err and "system" in err and "--trust-checkpoint" in err
    assert not marker.exists() and not out.exists()

    assert cli(["convert", str(ckpt), str(out), "--tokenizer", str(s.bert),
                "--vit-heads", "4"]) == 0, capsys.readouterr().err  # fmt: skip
    paths = sorted(s.images.glob("x0*.png"))[:2]
    assert torch.equal(_direct_scores(CARZeroModel.from_checkpoint(out), paths),
                       _direct_scores(s.model, paths))  # fmt: skip


def test_python_containers_in_a_checkpoint_are_read_as_placeholders(setup, tmp_path):
    """Objects that receive items when unpickled (a dict or list subclass of a package that is
    not installed, a defaultdict) are read too: the weights-only reader adds items to exact
    dicts and lists only, so their placeholders are plain ones; nothing is imported."""
    from collections import defaultdict

    from carzero_fast.model import read_state_dict

    s = setup
    ckpt = _ckpt_with_objects_of_a_gone_module(
        s.model, tmp_path / "lightning.ckpt", "containers_lib",
        "class AttrDict(dict):\n    pass\n\n\nclass Items(list):\n    pass\n",
        lambda lib: {"cfg": lib.AttrDict(lr=1e-4, sub=lib.AttrDict(a=1)),
                     "items": lib.Items([1, 2]), "counts": defaultdict(list, a=[1])})
    sd = read_state_dict(ckpt)
    assert torch.equal(sd["CARZero.fusion_module.decoder_norm.weight"],
                       s.model.aligner.decoder_norm.weight)  # fmt: skip
    assert "containers_lib" not in sys.modules


def test_score_end_to_end(setup, tmp_path):
    s = setup
    out = tmp_path / "scores.csv"
    assert cli(_score_args(s, out)) == 0
    rows = _read(out)
    assert rows[0] == ["path", *CLASSES]
    readable = sorted(p for p in s.images.iterdir() if p.name != "broken.png")
    assert [Path(r[0]) for r in rows[1:]] == readable
    got = torch.tensor([[float(v) for v in r[1:]] for r in rows[1:]])
    direct = _direct_scores(s.model, readable)
    assert rel_err(got, direct) < 1e-6
    errors = _read(Path(f"{out}.errors.csv"))
    assert [Path(r[0]).name for r in errors[1:]] == ["broken.png"]
    # the same images from a CSV list (header, paths relative to it), as probabilities
    listing = s.images / "list.csv"
    listing.write_text("path\n" + "".join(f"{p.name}\n" for p in reversed(readable)))
    probs = tmp_path / "probs.csv"
    args = _score_args(s, probs, "--probabilities")
    args[args.index("--images") + 1] = str(listing)
    try:
        assert cli(args) == 0
    finally:
        listing.unlink()
    rows = _read(probs)
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
    assert cli(_score_args(s, out, "--dtype", dtype)) == 0
    note = "no native bf16 matrix products" in capsys.readouterr().err
    assert note == (dtype == "bf16")
    rows = _read(out)
    paths = [Path(r[0]) for r in rows[1:]]
    got = torch.tensor([[float(v) for v in r[1:]] for r in rows[1:]])
    exact = _direct_scores(s.model, paths)
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
    assert cli(_score_args(s, full)) == 0
    out = tmp_path / "resumed.csv"
    env = dict(os.environ, CARZERO_FAST_SCORE_DIE_AFTER_BATCHES="2")
    proc = subprocess.run([sys.executable, "-m", "carzero_fast.cli", *_score_args(s, out)],
                          env=env, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 137
    assert not out.exists()  # OUT appears only once complete
    part = tmp_path / "resumed.csv.part-00000-of-00001"
    assert 1 < len(_read(part)) < len(_read(full))  # header + the batches before the kill
    with part.open("a") as f:
        f.write(str(s.images / "x16.png") + ",0.5")  # a row torn by the kill
    assert cli(_score_args(s, out, "--resume")) == 0
    assert out.read_text() == full.read_text()
    assert Path(f"{out}.errors.csv").read_text() == Path(f"{full}.errors.csv").read_text()
    assert not list(tmp_path.glob("*.part-*"))
    run = json.loads(Path(f"{out}.run.json").read_text())  # the scores' provenance stays
    assert run["dtype"] == "fp32" and run["batch_size"] == 4 and not run["probabilities"]
    assert run["prompts"] == {c: [f"There is {c}."] for c in CLASSES}
    # resuming a finished run has nothing left to do and gives the same file
    assert cli(_score_args(s, out, "--resume")) == 0
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
        args = _score_args(s, out)
        for k in range(0, len(override), 2):
            if override[k] not in args:
                args += override[k : k + 2]
            else:
                args[args.index(override[k]) + 1] = override[k + 1]
        assert cli(args) == 2, override
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, (override, err)
        assert not out.exists() and not Path(f"{out}.errors.csv").exists()
    assert cli(_score_args(s, tmp_path / "no" / "s.csv")) == 2
    assert f"the folder of --out, {tmp_path / 'no'}, does not exist" in capsys.readouterr().err
    out.write_text("path,x\n")
    assert cli(_score_args(s, out)) == 2
    assert "--resume" in capsys.readouterr().err
    out.unlink()

    # an existing file given as --errors is neither overwritten nor deleted, resumed or not
    labels = tmp_path / "labels.csv"
    labels.write_text("important,data\n")
    for resume in ([], ["--resume"]):
        assert cli(_score_args(s, out, "--errors", str(labels), *resume)) == 2
        assert str(labels) in capsys.readouterr().err
        assert labels.read_text() == "important,data\n" and not out.exists()
    assert cli(_score_args(s, out, "--errors", str(out))) == 2
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
    assert cli(_score_args(s, full)) == 0
    monkeypatch.chdir(s.images.parent)
    out = tmp_path / "s.csv"
    relative = _score_args(s, out)
    relative[relative.index("--images") + 1] = s.images.name
    calls = _fail_after(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="device lost"):
        cli(relative)
    capsys.readouterr()
    for extra, named in ((["--probabilities"], "--probabilities"), (["--dtype", "bf16"], "--dtype"),
                         (["--template", "No {finding}."], "the prompts"),
                         (["--batch-size", "5"], "--batch-size")):  # fmt: skip
        args = _score_args(s, out, "--resume", *extra)
        if "--batch-size" in extra:
            args[args.index("--batch-size") + 1] = "5"
            args = args[: -2]
        assert cli(args) == 2, extra
        err = capsys.readouterr().err
        assert named in err and "differs from the run" in err, (extra, err)
    calls.clear()
    assert cli(_score_args(s, out, "--resume")) == 0  # absolute paths this time
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
    args = _score_args(s, out)
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
    args = _score_args(s, out)
    args[args.index("--images") + 1] = str(imgs)
    assert cli(args) == 0
    assert [Path(r[0]).name for r in _read(Path(f"{out}.errors.csv"))[1:]] == ["x03.png"]
    (imgs / "x03.png").write_bytes((s.images / "x03.png").read_bytes())
    assert cli([*args, "--resume"]) == 0
    assert len(_read(out)) == 1 + 3  # still an error: not read again
    assert cli([*args, "--resume", "--retry-errors"]) == 0
    assert [Path(r[0]).name for r in _read(out)[1:]] == ["x00.png", "x01.png", "x02.png",
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
    args = _score_args(s, out)
    args[args.index("--images") + 1] = str(imgs)
    assert cli(args) == 0
    for name in ("x01.png", "x05.png"):
        (imgs / name).write_bytes((s.images / name).read_bytes())
    _fail_after(monkeypatch, 1)  # the retry scores the first batch (x01 now), then stops
    with pytest.raises(RuntimeError, match="device lost"):
        cli([*args, "--resume", "--retry-errors"])
    assert cli([*args, "--resume"]) == 0  # x05 stays an error: not read again
    assert [Path(r[0]).name for r in _read(out)[1:]] == [n for n in names if n != "x05.png"]
    assert [Path(r[0]).name for r in _read(Path(f"{out}.errors.csv"))[1:]] == ["x05.png"]


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
    no_tokenizer = shutil.copytree(s.model_dir, tmp_path / "no_tokenizer")
    shutil.rmtree(no_tokenizer / "tokenizer")
    torch.manual_seed(0)
    vit96 = VisionTransformer(ViTConfig(img_size=96, patch_size=32, embed_dim=32, depth=1,
                                        num_heads=4))  # fmt: skip
    small = CARZeroModel(vit96, s.model.text_encoder, s.model.aligner)
    ckpt = _carzero_ckpt(small, tmp_path / "small.ckpt")
    assert cli(["convert", str(ckpt), str(tmp_path / "small"), "--tokenizer", str(s.bert),
                "--vit-heads", "4"]) == 0  # fmt: skip
    assert "warning: the model's ViT takes 96×96-px images" in capsys.readouterr().err
    cases = [
        (["--model", str(wide)], "the fusion_module weights do not fit the aligner configuration "
                                 "in config.json: checkpoint key 'decoder.layers.0.linear1.bias' "
                                 "has shape (48,), expected (64,)"),  # fmt: skip
        (["--model", str(lacking)], "config.json lacks the aligner configuration"),
        (["--model", str(truncated)], f"{weights} cannot be read as safetensors"),
        (["--model", str(no_tokenizer)], "lacks its tokenizer folder"),
        (["--model", str(tmp_path / "small")], "the model's ViT takes 96×96-px images"),
    ]
    # triton on a CPU without Triton's interpreter (other test files turn it on for the session)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cases.append((["--backend", "triton", "--device", "cpu"], "--backend triton cannot run "
                  "here: backend 'triton'"))  # fmt: skip
    for override, message in cases:
        args = _score_args(s, out, *override)
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
        cli(_score_args(s, out))
    assert "rerun with --resume" in capsys.readouterr().err
    assert not out.exists() and not Path(f"{out}.errors.csv").exists()
    part = tmp_path / "s.csv.part-00000-of-00001"
    # the first batch (the sorted list starts d0-d2.dcm, broken.png): 3 scores; its errors
    # part holds broken.png
    assert [Path(r[0]).name for r in _read(part)[1:]] == ["d0.dcm", "d1.dcm", "d2.dcm"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "s.csv.errors.csv.part-00000-of-00001", "s.csv.part-00000-of-00001", "s.csv.run.json"]
    # a fresh run is refused (it would overwrite the parts); --resume continues
    assert cli(_score_args(s, out)) == 2
    assert "--resume" in capsys.readouterr().err
    calls.clear()
    monkeypatch.setattr(score, "_score", real_score)
    assert cli(_score_args(s, out, "--resume")) == 0
    assert len(_read(out)) == 1 + 20 and len(_read(Path(f"{out}.errors.csv"))) == 1 + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "s.csv", "s.csv.errors.csv", "s.csv.run.json"]

    def fail_first(*args, **kwargs):
        raise RuntimeError("device lost at once")

    monkeypatch.setattr(score, "_score", fail_first)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(RuntimeError, match="device lost at once"):
        cli(_score_args(s, other / "o.csv"))
    assert not list(other.iterdir())  # nothing scored: nothing kept


def test_prompt_ensembles_and_cache(setup, tmp_path):
    s = setup
    classes = tmp_path / "c.json"
    classes.write_text('{"effusion": ["There is effusion.", "There is left effusion."], '
                       '"edema": "There is edema."}')  # fmt: skip
    parsed = read_classes(classes)
    assert parsed == {"effusion": ["There is effusion.", "There is left effusion."],
                      "edema": ["There is edema."]}  # fmt: skip
    out, cache = tmp_path / "e.csv", tmp_path / "cache"
    args = _score_args(s, out, "--cache-dir", str(cache))
    args[args.index("--classes") + 1] = str(classes)
    assert cli(args) == 0
    files = list(cache.glob("prompts-*.safetensors"))
    assert len(files) == 1
    prompts = [t for ts in parsed.values() for t in ts]
    cached = PromptCache(cache, files[0].name[len("prompts-") : -len(".safetensors")])
    assert all(e is not None for e in cached.get(prompts))
    rows = _read(out)[1:]
    paths = [Path(r[0]) for r in rows]
    with torch.no_grad():
        img = s.model.encode_images(torch.stack([preprocess_file(p) for p in paths]))
        per = cf.zero_shot_scores(s.model.aligner, img, s.model.encode_texts(prompts))
    want = torch.stack([per[:, :2].mean(1), per[:, 2]], dim=1)
    got = torch.tensor([[float(v) for v in r[1:]] for r in rows])
    assert rel_err(got, want) < 1e-6
    assert read_classes(s.classes, "No {finding} is seen.")["effusion"] == ["No effusion is seen."]
    spaced = tmp_path / "spaced.json"  # names trimmed as .txt lines are: one class, refused
    spaced.write_text('{" edema": "There is edema.", "effusion ": "There is effusion."}')
    assert list(read_classes(spaced)) == ["edema", "effusion"]
    spaced.write_text('{"effusion": "There is effusion.", "effusion ": "There is edema."}')
    with pytest.raises(ValueError, match="repeats class 'effusion'"):
        read_classes(spaced)
    with pytest.raises(ValueError, match="finding"):
        read_classes(s.classes, "There is nothing.")
    odd = tmp_path / "odd.txt"  # lines as editors count them: \x0c and U+2028 split nothing
    odd.write_text("edema\x0cnote\r\neffusion\u2028here\n\nlast\n")
    with pytest.raises(ValueError, match="line 3 is empty"):
        read_classes(odd)
    odd.write_text("edema\x0cnote\r\neffusion\u2028here\n")
    assert list(read_classes(odd)) == ["edema\x0cnote", "effusion\u2028here"]


def test_prompt_cache_is_keyed_by_the_text_encoders_weights(setup, tmp_path):
    """Two text encoders of the same shapes (a fine-tuned copy) share no cache entries: the
    second model's prompts are its own embeddings, not the first one's from the cache."""
    from carzero_fast.score import _encode_prompts

    s = setup
    other = CARZeroModel.from_checkpoint(s.model_dir)
    with torch.no_grad():  # same names and shapes, other weights
        other.text_encoder.model.embeddings.word_embeddings.weight.mul_(1.5)
    prompts = [f"There is {c}." for c in CLASSES]
    cache = str(tmp_path / "cache")
    with torch.no_grad():
        first = _encode_prompts(s.model, prompts, cache)
        second = _encode_prompts(other, prompts, cache)
        assert torch.equal(first, s.model.encode_texts(prompts))
        assert torch.equal(second, other.encode_texts(prompts))
    assert not torch.equal(first, second)
    assert len(list((tmp_path / "cache").glob("prompts-*.safetensors"))) == 2


def test_prompt_cache_is_keyed_by_the_recipe_and_the_tokenizer(setup, tmp_path):
    """What decides an embedding without being a weight keys the cache too: the recipe's
    max_length (config.json) and the tokenizer's vocabulary."""
    from carzero_fast.prompts import text_fingerprint
    from carzero_fast.score import _encode_prompts

    s = setup
    other = CARZeroModel.from_checkpoint(s.model_dir)
    assert text_fingerprint(other.text_encoder) == text_fingerprint(s.model.text_encoder)
    other.text_encoder.max_length = 5  # "There is ..." is cut to [CLS], 3 words, [SEP]
    prompts = [f"There is {c}." for c in CLASSES]
    cache = str(tmp_path / "cache")
    with torch.no_grad():
        first = _encode_prompts(s.model, prompts, cache)
        second = _encode_prompts(other, prompts, cache)
        assert torch.equal(second, other.encode_texts(prompts))
    assert second.shape[1] == 6 and first.shape[1] != 6
    grown = CARZeroModel.from_checkpoint(s.model_dir)
    grown.text_encoder.tokenizer.add_tokens(["zzzfinding"])
    assert text_fingerprint(grown.text_encoder) != text_fingerprint(s.model.text_encoder)


def test_a_row_torn_inside_its_last_cell_is_dropped(tmp_path):
    """A kill inside a batch's write can cut the last number short: the row still has every
    cell, but no line end. Resuming must drop it (its image is scored again), not keep the
    truncated score."""
    from carzero_fast.csvfiles import iter_complete_rows

    part = tmp_path / "scores.csv.part-00000-of-00001"
    header = ["path", *CLASSES]
    part.write_text("path,effusion,pneumothorax,cardiomegaly\r\n"
                    "a.png,0.25,-1.5,2\r\n"
                    "b.png,0.125,3.5,-0.7")  # the write of "-0.75\r\n" cut short
    assert list(iter_complete_rows(part, header)) == [["a.png", "0.25", "-1.5", "2"]]
    part.write_bytes(part.read_bytes() + b"5\r\n")  # the row completed
    assert [r[0] for r in iter_complete_rows(part, header)] == ["a.png", "b.png"]


def test_score_cells_read_back_as_the_float32_scores():
    """9 significant digits: every float32 score, read back from the CSV, is the same float32
    (with 6 the scores move by up to 5e-6 relative, which the end-to-end test's 1e-6 bound on
    the whole matrix's relative error lets through)."""
    from carzero_fast.score import _format_rows

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 3, generator=g) * torch.logspace(-3, 3, 64)[:, None]
    text = _format_rows([Path(f"x{i}.png") for i in range(64)], scores)
    back = torch.tensor([[float(v) for v in r[1:]] for r in csv.reader(text.splitlines())],
                        dtype=torch.float32)  # fmt: skip
    assert torch.equal(back, scores)


def test_image_list_without_a_header_keeps_its_first_row(setup, tmp_path):
    """A CSV list whose first cell is an image (any suffix case) has no header: every row is
    an image, the first one included."""
    from carzero_fast.score import list_images

    s = setup
    paths = sorted(s.images.glob("x0*.png"))[:3]
    listing = tmp_path / "list.csv"
    listing.write_text("".join(f"{p}\n" for p in paths))
    assert list_images([str(listing)]) == paths
    upper = tmp_path / "X.PNG"
    upper.write_bytes(paths[0].read_bytes())
    listing.write_text(f"{upper}\n{paths[1]}\n")
    assert list_images([str(listing)]) == [upper, paths[1]]


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
        assert cli(_score_args(s, single)) == 0
    finally:
        torch.set_num_threads(threads)
    sharded = tmp_path / "sharded.csv"
    _torchrun(_score_args(s, sharded))
    assert sharded.read_text() == single.read_text()
    assert Path(f"{sharded}.errors.csv").read_text() == Path(f"{single}.errors.csv").read_text()
    assert not list(tmp_path.glob("*.part-*"))

    resumed = tmp_path / "resumed.csv"
    with pytest.raises(Exception):  # noqa: B017 — rank 1 dies (exit 137) after one batch
        _torchrun(_score_args(s, resumed), die_rank=1)
    assert not resumed.exists()  # only part files so far: the CSV appears once complete
    _torchrun(_score_args(s, resumed, "--resume"))
    assert resumed.read_text() == single.read_text()

    # killed with 2 ranks, resumed by one process: the 2 ranks' complete batches are kept
    resharded = tmp_path / "resharded.csv"
    with pytest.raises(Exception):  # noqa: B017
        _torchrun(_score_args(s, resharded), die_rank=1)
    torch.set_num_threads(1)
    try:
        assert cli(_score_args(s, resharded, "--resume")) == 0
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


def _copy_bert(s: Namespace, dest: Path, drop: tuple[str, ...] = ()) -> Path:
    dest.mkdir()
    for f in s.bert.iterdir():
        if f.name not in drop:
            (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_convert_refuses_a_tokenizer_without_its_vocabulary(setup, tmp_path, capsys):
    """transformers builds a tokenizer that maps every word to [UNK] from a folder without
    vocab.txt / tokenizer.json; a vocabulary larger than the embedding fails only at encoding.
    Both are refused when the model loads, for a checkpoint and for our directory."""
    s = setup
    ckpt = _carzero_ckpt(s.model, tmp_path / "c.ckpt")
    no_vocab = _copy_bert(s, tmp_path / "no_vocab", drop=("vocab.txt", "tokenizer.json"))
    out = tmp_path / "out"
    heads = ["--vit-heads", "4"]
    assert cli(["convert", str(ckpt), str(out), "--tokenizer", str(no_vocab), *heads]) == 2
    assert "no tokenizer in" in capsys.readouterr().err and not out.exists()

    big = _copy_bert(s, tmp_path / "big", drop=("tokenizer.json",))
    words = (big / "vocab.txt").read_text().splitlines()
    (big / "vocab.txt").write_text("\n".join(words + [f"extra{i}" for i in range(9)]) + "\n")
    assert cli(["convert", str(ckpt), str(out), "--tokenizer", str(big), *heads]) == 2
    err = capsys.readouterr().err
    assert f"has {len(words) + 9} tokens but the text encoder embeds {len(words)}" in err

    copy = tmp_path / "model"
    copy.mkdir()
    for f in s.model_dir.rglob("*"):
        if f.is_file() and f.name not in ("vocab.txt", "tokenizer.json"):
            (copy / f.relative_to(s.model_dir)).parent.mkdir(exist_ok=True)
            (copy / f.relative_to(s.model_dir)).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="no tokenizer in"):
        CARZeroModel.from_checkpoint(copy)


def test_convert_keeps_bert_in_float32_whatever_its_config_says(setup, tmp_path):
    s = setup
    half = _copy_bert(s, tmp_path / "half")
    cfg = json.loads((half / "config.json").read_text())
    (half / "config.json").write_text(json.dumps({**cfg, "dtype": "float16",
                                                  "torch_dtype": "float16"}))  # fmt: skip
    ckpt = _carzero_ckpt(s.model, tmp_path / "c.ckpt")
    out = tmp_path / "out"
    assert cli(["convert", str(ckpt), str(out), "--tokenizer", str(half), "--vit-heads", "4"]) == 0
    for loaded in (CARZeroModel.from_checkpoint(ckpt, tokenizer=half, vit_heads=4),
                   CARZeroModel.from_checkpoint(out)):  # fmt: skip
        want = s.model.text_encoder.model.state_dict()
        for name, a in loaded.text_encoder.model.state_dict().items():
            b = want[name]
            assert a.dtype == torch.float32 and torch.equal(a, b), name


def test_convert_names_keys_it_leaves_out_and_refuses_ambiguous_ones(setup, tmp_path, capsys):
    s = setup
    base = torch.load(_carzero_ckpt(s.model, tmp_path / "c.ckpt"), weights_only=True)
    sd = dict(base["state_dict"])
    extra = {**sd, "CARZero.multi_modal_vision_proj.weight": torch.zeros(2, 2)}
    # saved by transformers < 4.31: a buffer the model rebuilds
    extra["CARZero.text_encoder.model.embeddings.position_ids"] = torch.arange(128)[None]
    torch.save({"state_dict": extra}, tmp_path / "extra.ckpt")
    out = tmp_path / "out"
    assert cli(["convert", str(tmp_path / "extra.ckpt"), str(out), "--tokenizer", str(s.bert),
                "--vit-heads", "4"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "warning:" in err and "1 key(s) outside" in err and "multi_modal_vision_proj" in err

    key = next(k for k in sd if k.startswith("CARZero.fusion_module."))
    twice = {**sd, key.removeprefix("CARZero."): sd[key].clone()}
    torch.save({"state_dict": twice}, tmp_path / "twice.ckpt")
    out2 = tmp_path / "out2"
    assert cli(["convert", str(tmp_path / "twice.ckpt"), str(out2), "--tokenizer", str(s.bert),
                "--vit-heads", "4"]) == 2  # fmt: skip
    assert "appears twice" in capsys.readouterr().err and not out2.exists()

    not_tensor = {**sd, "CARZero.fusion_module.some_count": 3}
    torch.save({"state_dict": not_tensor}, tmp_path / "int.ckpt")
    assert cli(["convert", str(tmp_path / "int.ckpt"), str(out2), "--tokenizer", str(s.bert),
                "--vit-heads", "4"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "'CARZero.fusion_module.some_count' holds a int, not a tensor" in err
    assert "Traceback" not in err and not out2.exists()


def test_convert_checks_where_it_writes_first_and_leaves_nothing(setup, tmp_path, capsys,
                                                                 monkeypatch):  # fmt: skip
    s = setup
    ckpt = _carzero_ckpt(s.model, tmp_path / "c.ckpt")
    out = tmp_path / "missing" / "out"
    assert cli(["convert", str(ckpt), str(out), "--tokenizer", str(s.bert)]) == 2
    assert "does not exist" in capsys.readouterr().err and not out.parent.exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    assert cli(["convert", str(ckpt), str(a_file / "out"), "--tokenizer", str(s.bert)]) == 2
    assert "does not exist" in capsys.readouterr().err

    # the API makes missing parents, and removes them again when the write fails
    import carzero_fast.model as model_module

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_module, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        s.model.save_pretrained(tmp_path / "new" / "deeper" / "model")
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(model_module, "save_file", disk_full)
    assert cli(["convert", str(ckpt), str(tmp_path / "o"), "--tokenizer", str(s.bert),
                "--vit-heads", "4"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "c.ckpt"]


def test_save_writes_through_a_symbolic_link(setup, tmp_path, capsys):
    empty, link = tmp_path / "empty", tmp_path / "link"
    empty.mkdir()
    link.symlink_to(empty, target_is_directory=True)
    assert setup.model.save_pretrained(link) == link
    assert link.is_symlink() and (empty / "config.json").is_file()
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "later")
    setup.model.save_pretrained(dangling)
    assert dangling.is_symlink() and (tmp_path / "later" / "model.safetensors").is_file()
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert cli(["convert", str(tmp_path / "unread.ckpt"), str(loop)]) == 2
    assert "symbolic link that cannot be followed" in capsys.readouterr().err


def test_saved_model_has_the_umasks_modes(setup, tmp_path):
    old = os.umask(0o022)
    try:
        out = setup.model.save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o755
    for f in out.rglob("*"):
        assert (f.stat().st_mode & 0o777) == (0o755 if f.is_dir() else 0o644), f
