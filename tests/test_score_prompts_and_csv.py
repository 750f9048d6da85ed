"""What `score` reads and writes besides images: class files and prompt ensembles, the
prompt cache and its key, torn and exact CSV cells, and headerless image lists."""

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
