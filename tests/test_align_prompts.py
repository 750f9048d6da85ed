"""`carzero-fast align-prompts`: the rules on hand cases, the command end to end, its errors,
and the model path with a tiny random GPT-2 built here (its output must never reach the
prompt column unvalidated) and with a stand-in generator that answers well."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from carzero_fast import align_prompts as ap
from carzero_fast.align_prompts import (
    COLUMNS,
    check_template,
    main,
    prompt_pattern,
    read_inputs,
    rule_align,
)

REPORT = (
    "INDICATION: cough, rule out pneumonia. FINDINGS: 1. There is a small left pleural "
    "effusion. 2. No pneumothorax, focal consolidation, or pulmonary edema. IMPRESSION: Small "
    "left pleural effusion."
)


def found(text: str, template: str = "There is {finding}.") -> list[tuple[str, str]]:
    return [(f.prompt, f.status) for f in rule_align(text, template)]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == COLUMNS
    return rows


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Pleural Effusion", [("There is pleural effusion.", "ok")]),
        ("cardiomegaly", [("There is cardiomegaly.", "ok")]),
        ("Enlarged Cardiomediastinum", [("There is enlarged cardiomediastinum.", "ok")]),
        ("  Lung Opacity ", [("There is lung opacity.", "ok")]),
        ("No Finding", [("There is no finding.", "negated")]),
    ],
)
def test_label_phrases(text, expected):
    assert found(text) == expected


def test_report_with_sections_numbering_and_negated_list():
    # the indication is not a finding; the impression repeats a finding, kept once; "no"
    # negates the whole list after it
    assert found(REPORT) == [
        ("There is small left pleural effusion.", "ok"),
        ("There is no pneumothorax.", "negated"),
        ("There is no focal consolidation.", "negated"),
        ("There is no pulmonary edema.", "negated"),
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "FINDINGS: Small left pleural effusion. No pneumothorax.",
            [("There is small left pleural effusion.", "ok"), ("There is no pneumothorax.",
                                                                "negated")],
        ),  # fmt: skip
        ("There is no evidence of pneumothorax.", [("There is no pneumothorax.", "negated")]),
        ("Effusion is not seen.", [("There is no effusion.", "negated")]),
        ("Pneumothorax has resolved.", [("There is no pneumothorax.", "negated")]),
        ("Interval resolution of the left effusion.", [("There is no left effusion.", "negated")]),
        (
            "Small effusion, no pneumothorax",
            [("There is small effusion.", "ok"), ("There is no pneumothorax.", "negated")],
        ),
        (
            "Bibasilar atelectasis and small left effusion.",
            [("There is bibasilar atelectasis.", "ok"), ("There is small left effusion.", "ok")],
        ),
        # "left" alone is no finding: the "and" does not separate two
        ("Left and right pleural effusions.", [("There is left and right pleural effusions.",
                                                "ok")]),  # fmt: skip
        ("Cardiomegaly is again seen.", [("There is cardiomegaly.", "ok")]),
        ("1.5 cm nodule in the right upper lobe.", [("There is 1.5 cm nodule in right upper "
                                                     "lobe.", "ok")]),  # fmt: skip
        (
            "Cardiomegaly; mild pulmonary edema\nno effusion",
            [
                ("There is cardiomegaly.", "ok"),
                ("There is mild pulmonary edema.", "ok"),
                ("There is no effusion.", "negated"),
            ],
        ),
        # the rules can say these need a person, not what they mean
        ("Possible right lower lobe pneumonia.", [("There is right lower lobe pneumonia.",
                                                   "needs_review")]),  # fmt: skip
        ("The heart is enlarged.", [("There is heart is enlarged.", "needs_review")]),
        ("Heart size is normal.", [("", "needs_review")]),
        # two remarks are two rows: rows without a prompt are told apart by their notes
        ("Heart size is normal. Lungs are clear.", [("", "needs_review"),
                                                    ("", "needs_review")]),  # fmt: skip
        ("No interval change.", [("", "needs_review")]),
        ("Recommend follow-up CT.", [("", "needs_review")]),
        ("Lungs are clear without consolidation.", [("", "needs_review"),
                                                    ("There is no consolidation.", "negated")]),
        # a connector before a negation cue is not part of the finding before it
        ("Mild cardiomegaly with no pleural effusion.", [("There is mild cardiomegaly.", "ok"),
                                                         ("There is no pleural effusion.",
                                                          "negated")]),
        ("Cardiomegaly and no effusion.", [("There is cardiomegaly.", "ok"),
                                           ("There is no effusion.", "negated")]),
        # a qualified finding after a negated one: present or denied? a person decides
        ("No pneumothorax, small left pleural effusion.", [
            ("There is no pneumothorax.", "negated"),
            ("There is no small left pleural effusion.", "needs_review")]),
        # "not" and work-up wording: for a person
        ("Effusion, not pneumothorax.", [("There is effusion.", "ok"),
                                         ("There is not pneumothorax.", "needs_review")]),
        ("Rule out pneumonia.", [("There is pneumonia.", "needs_review")]),
        ("Evaluate for pneumothorax.", [("There is pneumothorax.", "needs_review")]),
        # "vs." does not end the sentence: both alternatives stay one row, for review
        ("Likely atelectasis vs. pneumonia.", [("", "needs_review")]),
        ("Nodule: 5 mm", [("", "needs_review")]),  # ":" is not part of a finding
        ("INDICATION: cough.", [("", "needs_review")]),  # nothing found
        ("", [("", "needs_review")]),
        ("   ", [("", "needs_review")]),
    ],
)  # fmt: skip
def test_rules_hand_cases(text, expected):
    rows = rule_align(text)
    assert [(f.prompt, f.status) for f in rows] == expected
    assert all(f.method == "rules" for f in rows)
    assert all(f.note for f in rows if f.status == "needs_review")  # a reason for the reader
    pattern = prompt_pattern("There is {finding}.")
    assert all(pattern.match(f.prompt) for f in rows if f.prompt)


def test_empty_input_note():
    assert rule_align("")[0].note == "empty input"
    assert rule_align("INDICATION: cough.")[0].note == "no finding found"


def test_custom_template():
    template = "A chest x-ray showing {finding}."
    assert found("FINDINGS: Small left pleural effusion. No pneumothorax.", template) == [
        ("A chest x-ray showing small left pleural effusion.", "ok"),
        ("A chest x-ray showing no pneumothorax.", "negated"),
    ]
    pattern = prompt_pattern(template)
    m = pattern.match("A chest x-ray showing no pneumothorax.")
    assert m and m["neg"] == "no " and m["finding"] == "pneumothorax"
    assert not pattern.match("There is pneumothorax.")
    assert not pattern.match("A chest x-ray showing pneumothorax!")  # the fixed text is exact
    for bad in ("There is a finding.", "{finding} and {finding}", "{finding} {x}"):
        with pytest.raises(ValueError, match="finding"):
            check_template(bad)


def test_default_pattern():
    pattern = prompt_pattern("There is {finding}.")
    for good in ("There is pleural effusion.", "There is no pneumothorax.",
                 "There is 1.5 cm nodule in right upper lobe.", "there is Edema."):  # fmt: skip
        assert pattern.match(good), good
    for bad in ("There is .", "There is pleural effusion", "There is effusion. And more.",
                "There is effusion: left.", "Effusion.", " There is effusion."):  # fmt: skip
        assert not pattern.match(bad), bad


# ---------------------------------------------------------------------------------------------
# Input files
# ---------------------------------------------------------------------------------------------


def test_read_inputs_txt_and_csv(tmp_path):
    txt = tmp_path / "in.txt"
    txt.write_text("Edema\n\nNo pneumothorax\n\n\n")  # an empty record, then the file's end
    assert read_inputs(txt) == ["Edema", "", "No pneumothorax"]

    table = tmp_path / "in.csv"
    with table.open("w", newline="") as f:
        csv.writer(f).writerows([["id", "report"], ["a", "Line one.\nNo effusion."],
                                 ["b", ""], ["c"]])  # fmt: skip
    assert read_inputs(table) == ["a", "b", "c"]  # the first column by default
    assert read_inputs(table, "report") == ["Line one.\nNo effusion.", "", ""]
    with table.open("a", newline="") as f:  # blank lines at the end: no records
        f.write("\r\n\n\n")
    assert read_inputs(table) == ["a", "b", "c"]
    (tmp_path / "gap.csv").write_text("report\nEdema\n\nEffusion\n\n")  # one inside: kept
    assert read_inputs(tmp_path / "gap.csv") == ["Edema", "", "Effusion"]
    with pytest.raises(ValueError, match="no column 'text'.*id, report"):
        read_inputs(table, "text")
    with pytest.raises(ValueError, match=".csv input only"):
        read_inputs(txt, "report")
    (tmp_path / "in.json").write_text("{}")
    with pytest.raises(ValueError, match="must be .txt"):
        read_inputs(tmp_path / "in.json")
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no lines"):
        read_inputs(tmp_path / "blank.txt")
    # lines as editors count them: a form feed or U+2028 inside a line does not split it
    (tmp_path / "odd.txt").write_text("Edema\x0cnote\r\nEffusion\u2028here\nlast line\n")
    assert read_inputs(tmp_path / "odd.txt") == ["Edema\x0cnote", "Effusion\u2028here",
                                                 "last line"]  # fmt: skip
    (tmp_path / "headless.csv").write_text("\nreport\nEdema\n")
    with pytest.raises(ValueError, match="the header row, is empty"):
        read_inputs(tmp_path / "headless.csv")
    (tmp_path / "huge.csv").write_text("report\n" + "x" * 200_000 + "\n")
    with pytest.raises(ValueError, match="not a CSV this command can read"):
        read_inputs(tmp_path / "huge.csv")


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def test_cli_txt_end_to_end(tmp_path, capsys):
    lines = ["Pleural Effusion", "", "FINDINGS: Small left pleural effusion. No pneumothorax.",
             "Heart size is normal."]  # fmt: skip
    src = tmp_path / "labels.txt"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "aligned.csv"
    assert main([str(src), "--out", str(out)]) == 0
    rows = read_csv(out)
    assert len(rows) >= len(lines)
    assert sorted({int(r["row"]) for r in rows}) == [1, 2, 3, 4]  # no input left out
    assert all(r["source"] == lines[int(r["row"]) - 1] for r in rows)
    assert [(r["row"], r["prompt"], r["status"]) for r in rows] == [
        ("1", "There is pleural effusion.", "ok"),
        ("2", "", "needs_review"),
        ("3", "There is small left pleural effusion.", "ok"),
        ("3", "There is no pneumothorax.", "negated"),
        ("4", "", "needs_review"),
    ]
    assert {r["method"] for r in rows} == {"rules"}
    assert "4 inputs → 5 rows" in capsys.readouterr().err
    # no temporary file left behind
    assert {p.name for p in tmp_path.iterdir()} == {"labels.txt", "aligned.csv"}


def test_cli_csv_column(tmp_path):
    src = tmp_path / "reports.csv"
    with src.open("w", newline="") as f:
        csv.writer(f).writerows([["study", "text"], ["s1", REPORT], ["s2", "Cardiomegaly"],
                                 ["s3", ""]])  # fmt: skip
    out = tmp_path / "aligned.csv"
    assert main([str(src), "--out", str(out), "--column", "text"]) == 0
    rows = read_csv(out)
    assert [(r["row"], r["prompt"]) for r in rows] == [
        ("1", "There is small left pleural effusion."),
        ("1", "There is no pneumothorax."),
        ("1", "There is no focal consolidation."),
        ("1", "There is no pulmonary edema."),
        ("2", "There is cardiomegaly."),
        ("3", ""),
    ]
    assert rows[0]["source"] == REPORT and rows[-1]["status"] == "needs_review"


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "carzero-fast align-prompts" in text and "--max-new-tokens" in text


def error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err  # transformers may have written progress bars before it
    assert err.splitlines()[-1].startswith("carzero-fast align-prompts: ")
    return err


def test_cli_errors_write_nothing(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("Edema\n")
    out = tmp_path / "out.csv"
    assert "does not exist" in error(capsys, [str(tmp_path / "nope.txt"), "--out", str(out)])
    assert "does not exist" in error(capsys, [str(src), "--out", str(out), "--model",
                                              str(tmp_path / "no_model")])  # fmt: skip
    (tmp_path / "empty_dir").mkdir()
    assert "no config.json" in error(capsys, [str(src), "--out", str(out), "--model",
                                              str(tmp_path / "empty_dir")])  # fmt: skip
    assert "{finding}" in error(capsys, [str(src), "--out", str(out), "--template", "Edema."])
    assert "positive" in error(capsys, [str(src), "--out", str(out), "--max-new-tokens", "0"])
    assert "does not exist" in error(capsys, [str(src), "--out", str(tmp_path / "x" / "o.csv")])
    for latin1 in (tmp_path / "latin1.txt", tmp_path / "latin1.csv"):  # "Épanchement"
        latin1.write_bytes(b"text\n\xc9panchement pleural\n")
        err = error(capsys, [str(latin1), "--out", str(out)])
        assert f"input {latin1} is not UTF-8" in err and "Traceback" not in err
    assert not out.exists()

    out.write_text("keep me\n")
    assert "--force" in error(capsys, [str(src), "--out", str(out)])
    assert out.read_text() == "keep me\n"
    assert main([str(src), "--out", str(out), "--force"]) == 0
    assert read_csv(out)[0]["prompt"] == "There is edema."
    before = src.read_bytes()  # its own input, not even with --force
    assert "is the input file" in error(capsys, [str(src), "--out", str(src), "--force"])
    assert src.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# The model path
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A random 1-layer GPT-2 and a word-level tokenizer trained here on the instruction."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    import torch

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"])
    tok.train_from_iterator([ap.instruction(REPORT, "There is {finding}.")], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                                pad_token="[PAD]", eos_token="[EOS]")  # fmt: skip
    torch.manual_seed(0)
    eos = fast.eos_token_id
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=512,
                                     vocab_size=len(fast), bos_token_id=eos,
                                     eos_token_id=eos)  # fmt: skip
    out = tmp_path_factory.mktemp("align") / "gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def test_random_model_output_never_reaches_the_prompts(tiny_gpt2, tmp_path):
    generator = ap.load_generator(tiny_gpt2)
    prompt = ap.instruction("No pneumothorax.", "There is {finding}.")
    raw = ap._generate(generator, prompt, 16)
    assert raw.strip() and raw == ap._generate(generator, prompt, 16)  # it ran, greedily

    lines = ["FINDINGS: Small left pleural effusion. No pneumothorax.", "", "cardiomegaly"]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "aligned.csv"
    assert main([str(src), "--out", str(out), "--model", str(tiny_gpt2)]) == 0
    rows = read_csv(out)
    # the same prompts as the rules alone, each marked for review with the model's failure
    assert [r["prompt"] for r in rows] == [
        "There is small left pleural effusion.",
        "There is no pneumothorax.",
        "",
        "There is cardiomegaly.",
    ]
    assert {r["method"] for r in rows} == {"rules"}
    assert {r["status"] for r in rows} == {"needs_review"}
    notes = [r["note"] for r in rows if r["source"]]
    assert all("model output" in n and "rule-based instead" in n for n in notes), notes
    assert rows[2]["note"] == "empty input"  # the model is not asked about an empty line


def test_valid_model_lines_are_taken(tiny_gpt2, tmp_path, monkeypatch):
    answers = {
        "Small left pleural effusion. No pneumothorax.": (
            "There is small left pleural effusion.\nThere is No pneumothorax.\n\nReport: x"
        ),
        "The heart is enlarged.": "  1. THERE IS Cardiomegaly.\nReport: Edema\nFindings:\n",
        "Edema": "There is edema.\nThere is edema.\n",  # repeated: kept once
        "Left effusion": "There is left effusion.\nsome garbage\n",  # one bad line: all rules
    }
    seen = []

    def fake_generate(generator, prompt: str, max_new_tokens: int) -> str:
        report = prompt.rsplit("Report: ", 1)[1].split("\n")[0]
        seen.append(max_new_tokens)
        return answers[report]

    monkeypatch.setattr(ap, "_generate", fake_generate)
    src = tmp_path / "in.txt"
    src.write_text("\n".join(answers) + "\n")
    out = tmp_path / "aligned.csv"
    argv = [str(src), "--out", str(out), "--model", str(tiny_gpt2), "--max-new-tokens", "20"]
    assert main(argv) == 0
    assert seen == [20] * 4
    rows = read_csv(out)
    assert [(r["row"], r["prompt"], r["method"], r["status"], r["note"]) for r in rows] == [
        ("1", "There is small left pleural effusion.", "llm", "ok", ""),
        ("1", "There is no pneumothorax.", "llm", "negated", ""),
        ("2", "There is cardiomegaly.", "llm", "ok", "not in the input: cardiomegaly"),
        ("3", "There is edema.", "llm", "ok", ""),
        ("4", "There is left effusion.", "rules", "needs_review",
         "model output failed validation: 'some garbage' does not match the template; "
         "rule-based instead"),
    ]  # fmt: skip


def test_model_that_raises_stops_the_run(tiny_gpt2, tmp_path, monkeypatch, capsys):
    def broken(generator, prompt: str, max_new_tokens: int) -> str:
        raise IndexError("index out of range in self")

    monkeypatch.setattr(ap, "_generate", broken)
    src = tmp_path / "in.txt"
    src.write_text("Edema\n")
    out = tmp_path / "aligned.csv"
    err = error(capsys, [str(src), "--out", str(out), "--model", str(tiny_gpt2)])
    assert "input row 1: the model failed: IndexError" in err
    assert not out.exists()
