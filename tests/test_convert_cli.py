"""`carzero-fast convert` and checkpoints end to end (tiny random models): loading a
CARZero Lightning checkpoint or our directory, what convert refuses, and what it leaves behind."""

from __future__ import annotations

import json
import os
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from conftest import rel_err

import carzero_fast as cf
from carzero_fast.cli import main as cli
from carzero_fast.model import CARZeroModel

transformers = pytest.importorskip("transformers")
pydicom = pytest.importorskip("pydicom")

from tiny_carzero import carzero_ckpt, collection, direct_scores  # noqa: E402

from carzero_fast.encoders.image import preprocess_file  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return collection(tmp_path_factory.mktemp("convert"))


def test_checkpoint_and_directory_load_back_identically(setup, tmp_path):
    s = setup
    ckpt = carzero_ckpt(s.model, tmp_path / "carzero.ckpt")
    from_ckpt = CARZeroModel.from_checkpoint(ckpt, tokenizer=s.bert, vit_heads=4)
    from_dir = CARZeroModel.from_checkpoint(s.model_dir)
    paths = sorted(s.images.glob("x0*.png"))[:3]
    ref = direct_scores(s.model, paths)
    assert torch.equal(direct_scores(from_ckpt, paths), ref)
    assert torch.equal(direct_scores(from_dir, paths), ref)


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
    ckpt = carzero_ckpt(s.model, tmp_path / "carzero.ckpt")
    out = tmp_path / "converted"
    assert cli(["convert", str(ckpt), str(out), "--tokenizer", str(s.bert),
                "--vit-heads", "4"]) == 0  # fmt: skip
    paths = sorted(s.images.glob("x1*.png"))[:2]
    assert torch.equal(direct_scores(CARZeroModel.from_checkpoint(out), paths),
                       direct_scores(s.model, paths))  # fmt: skip


def test_convert_rejects_bad_checkpoints_and_leaves_nothing(setup, tmp_path, capsys):
    s = setup
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"encoder.layer.0.weight": torch.zeros(2)}}, other)
    out = tmp_path / "out"
    assert cli(["convert", str(other), str(out), "--tokenizer", str(s.bert)]) == 2
    assert "not a CARZero checkpoint" in capsys.readouterr().err
    assert not out.exists()

    pickled = carzero_ckpt(s.model, tmp_path / "pickled.ckpt", extra=Namespace(lr=1e-4))
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
        return carzero_ckpt(model, path, extra=make_extra(importlib.import_module(name)))
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
    bad = carzero_ckpt(s.model, tmp_path / "bad.ckpt", extra={"x": _RunsCode(marker)})
    out = tmp_path / "converted"
    assert cli(["convert", str(bad), str(out), "--tokenizer", str(s.bert),
                "--vit-heads", "4"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "cannot be read safely" in err and "system" in err and "--trust-checkpoint" in err
    assert not marker.exists() and not out.exists()
    assert cli(["convert", str(ckpt), str(out), "--tokenizer", str(s.bert),
                "--vit-heads", "0"]) == 2  # fmt: skip
    assert "num_heads must be a positive int, got 0" in capsys.readouterr().err
    assert not out.exists()

    assert cli(["convert", str(ckpt), str(out), "--tokenizer", str(s.bert),
                "--vit-heads", "4"]) == 0, capsys.readouterr().err  # fmt: skip
    paths = sorted(s.images.glob("x0*.png"))[:2]
    assert torch.equal(direct_scores(CARZeroModel.from_checkpoint(out), paths),
                       direct_scores(s.model, paths))  # fmt: skip


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
    ckpt = carzero_ckpt(s.model, tmp_path / "c.ckpt")
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
    ckpt = carzero_ckpt(s.model, tmp_path / "c.ckpt")
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
    base = torch.load(carzero_ckpt(s.model, tmp_path / "c.ckpt"), weights_only=True)
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
    ckpt = carzero_ckpt(s.model, tmp_path / "c.ckpt")
    out = tmp_path / "missing" / "out"
    assert cli(["convert", str(ckpt), str(out), "--tokenizer", str(s.bert)]) == 2
    assert "does not exist" in capsys.readouterr().err and not out.parent.exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    assert cli(["convert", str(ckpt), str(a_file / "out"), "--tokenizer", str(s.bert)]) == 2
    assert f"({a_file}) is a file" in capsys.readouterr().err

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


def test_model_api_inputs_and_what_save_refuses(setup, tmp_path):
    """Pixels follow the model's dtype (as prompts do); checkpoint-file options given with a
    model directory are refused, not ignored; a parametrized model is not saved as its
    parametrizations' originals (a directory from_checkpoint would refuse)."""
    from torch.nn.utils import parametrize

    s = setup
    model = CARZeroModel.from_checkpoint(s.model_dir).to(torch.bfloat16)
    pixels = torch.stack([preprocess_file(p) for p in sorted(s.images.glob("x0*.png"))[:2]])
    assert pixels.dtype == torch.float32
    with torch.no_grad():
        assert model.encode_images(pixels).dtype == torch.bfloat16
        assert model(pixels, ["There is effusion."]).shape == (2, 1)
    with pytest.raises(ValueError, match="model directory: .* vit_heads are for a CARZero"):
        CARZeroModel.from_checkpoint(s.model_dir, vit_heads=4)

    class Scale(torch.nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    parametrize.register_parametrization(model.aligner.mlp_head[0], "weight", Scale())
    with pytest.raises(ValueError, match=r"aligner.mlp_head.0 has parametrizations.*remove_"):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_a_file_that_is_no_checkpoint_is_named_so(setup, tmp_path):
    """An HTML error page saved under the checkpoint's name is not called a legacy pickle
    with objects to trust (the advice would be to unpickle it)."""
    page = tmp_path / "CARZero_best_model.ckpt"
    page.write_text("<html><body>404 Not Found</body></html>\n")
    with pytest.raises(ValueError, match=r"is not a PyTorch checkpoint \(it starts with b'<html"):
        CARZeroModel.from_checkpoint(page, tokenizer=setup.bert)
