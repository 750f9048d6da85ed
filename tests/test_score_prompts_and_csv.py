"""What `score` reads and writes besides images: class files and prompt ensembles (and
classes that would score the same), the prompt cache and its key, torn and exact CSV cells,
image lists, and what a resume compares with the run before."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import rel_err

import carzero_fast as cf
from carzero_fast.cli import main as cli
from carzero_fast.model import CARZeroModel

transformers = pytest.importorskip("transformers")
pydicom = pytest.importorskip("pydicom")

from tiny_carzero import CLASSES, collection, read_csv, score_args  # noqa: E402

from carzero_fast.encoders.image import preprocess_file  # noqa: E402
from carzero_fast.prompts import PromptCache, read_classes  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return collection(tmp_path_factory.mktemp("prompts"))


def test_prompt_ensembles_and_cache(setup, tmp_path):
    s = setup
    classes = tmp_path / "c.json"
    classes.write_text('{"effusion": ["There is effusion.", "There is left effusion."], '
                       '"edema": "There is edema."}')  # fmt: skip
    parsed = read_classes(classes)
    assert parsed == {"effusion": ["There is effusion.", "There is left effusion."],
                      "edema": ["There is edema."]}  # fmt: skip
    out, cache = tmp_path / "e.csv", tmp_path / "cache"
    args = score_args(s, out, "--cache-dir", str(cache))
    args[args.index("--classes") + 1] = str(classes)
    assert cli(args) == 0
    files = list(cache.glob("prompts-*.safetensors"))
    assert len(files) == 1
    prompts = [t for ts in parsed.values() for t in ts]
    cached = PromptCache(cache, files[0].name[len("prompts-") : -len(".safetensors")])
    assert all(e is not None for e in cached.get(prompts))
    rows = read_csv(out)[1:]
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


def test_classes_that_would_score_the_same_are_refused(setup, tmp_path, capsys):
    """Findings that CARZero's cleaning reduces to the same words (non-ASCII letters, a
    number, case) would give identical columns: refused by name before anything runs."""
    from carzero_fast.score import UsageError, _check_prompts

    template = "There is {finding}."
    with pytest.raises(UsageError, match="'気胸'.*template's own words"):
        _check_prompts({"edema": ["There is edema."], "気胸": ["There is 気胸."]}, template)
    with pytest.raises(UsageError, match="'grade 2'.*'there is effusion grade'.*'grade 1'"):
        _check_prompts({"grade 1": ["There is effusion grade 1."],
                        "grade 2": ["There is effusion grade 2."]}, template)  # fmt: skip
    with pytest.raises(UsageError, match="class 'Edema'"):  # JSON classes: prompt sets
        _check_prompts({"edema": ["There is edema.", "Edema is seen."],
                        "Edema": ["edema is SEEN.", "There is Edema."]})  # fmt: skip
    _check_prompts({"edema": ["There is edema."], "more": ["There is edema.", "Edema is seen."]})
    classes = tmp_path / "c.txt"
    classes.write_text("effusion\nEffusion\n")
    out = tmp_path / "s.csv"
    args = score_args(setup, out)
    args[args.index("--classes") + 1] = str(classes)
    assert cli(args) == 2
    assert "class 'Effusion'" in capsys.readouterr().err and not out.exists()


def test_an_unreadable_prompt_cache_is_a_cache_miss(setup, tmp_path):
    """A cache file cut short (a full disk) or not safetensors: a warning, the prompts
    encoded again, the file rewritten."""
    from carzero_fast.prompts import text_fingerprint
    from carzero_fast.score import _encode_prompts

    s = setup
    prompts = [f"There is {c}." for c in CLASSES]
    cache = tmp_path / "cache"
    with torch.no_grad():
        want = _encode_prompts(s.model, prompts, str(cache))
        (path,) = cache.glob("prompts-*.safetensors")
        for junk in (b"", path.read_bytes()[:100]):
            path.write_bytes(junk)
            with pytest.warns(UserWarning, match="cannot be read"):
                assert torch.equal(_encode_prompts(s.model, prompts, str(cache)), want)
            cached = PromptCache(cache, text_fingerprint(s.model.text_encoder))
            assert all(e is not None for e in cached.get(prompts))  # rewritten


def test_image_list_rows_and_non_image_arguments(setup, tmp_path):
    """Spreadsheet rows with no cell filled are skipped; a first row naming a file without
    an image suffix (a DICOM named by its UID) is an image, not a header; an empty path cell,
    a cell over csv's size limit and a list given as an image are refused by name."""
    from carzero_fast.score import UsageError, list_images

    s = setup
    uid = tmp_path / "1.2.840.113619.2.55"
    uid.write_bytes((s.images / "d0.dcm").read_bytes())
    listing = tmp_path / "list.csv"
    listing.write_text(f"{uid},x\r\n{s.images / 'x00.png'},y\r\n,\r\n , \r\n,,\r\n")
    assert list_images([str(listing)]) == [uid, s.images / "x00.png"]
    listing.write_text(f"path\n{s.images / 'x00.png'}\n,note\n")
    with pytest.raises(UsageError, match="row 3: the first cell .* is empty"):
        list_images([str(listing)])
    listing.write_text(f"path\n{'x' * 200_000}.png\n")
    with pytest.raises(UsageError, match="cannot be read as CSV: field larger"):
        list_images([str(listing)])
    as_text = tmp_path / "list.txt"
    as_text.write_text(f"{s.images / 'x00.png'}\n")
    with pytest.raises(UsageError, match="list.txt looks like a list of images"):
        list_images([str(as_text)])


def test_resume_after_removing_an_unreadable_image_and_adding_files_to_the_model(
        setup, tmp_path, capsys):  # fmt: skip
    """What the errors CSV invites: the unreadable image deleted (its error row names no
    listed image: dropped, not a reason to refuse), a new image added. Files beside the
    model's own (notes, a prompt cache) do not change its identity; its config does."""
    import shutil

    s = setup
    model = tmp_path / "model"
    shutil.copytree(s.model_dir, model)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name in ("x00.png", "x01.png", "x02.png"):
        (imgs / name).write_bytes((s.images / name).read_bytes())
    (imgs / "x03.png").write_bytes(b"unreadable")
    out, fresh = tmp_path / "s.csv", tmp_path / "fresh.csv"
    args = score_args(s, out, "--cache-dir", str(model / "cache"))
    args[args.index("--images") + 1] = str(imgs)
    args[args.index("--model") + 1] = str(model)
    assert cli(args) == 0
    (imgs / "x03.png").unlink()
    (imgs / "x04.png").write_bytes((s.images / "x04.png").read_bytes())
    (model / "notes.txt").write_text("fine-tuned on ...")
    assert cli([*args, "--resume"]) == 0
    assert not Path(f"{out}.errors.csv").exists()
    assert cli([a if a != str(out) else str(fresh) for a in args]) == 0
    assert out.read_text() == fresh.read_text()
    config = model / "config.json"
    config.write_text(config.read_text().replace("{", '{"note": 1, ', 1))
    capsys.readouterr()
    assert cli([*args, "--resume"]) == 2
    assert "changed since the run that wrote" in capsys.readouterr().err
