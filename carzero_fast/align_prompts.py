"""`carzero-fast align-prompts`: free-text reports or label phrases → CARZero prompts, for review.

CARZero's prompt alignment rewrites every report or label into one standard sentence per
finding, `"There is {finding}."` (a finding that is absent: `"There is no {finding}."`). This
command does that with a local text-generation model (`--model DIR`, a `transformers`
directory: nothing is downloaded) or, without one, with deterministic rules. Its output is a
CSV meant to be read by a person before the prompts are used (e.g. copied, once reviewed,
into a `score --classes` .json mapping each class to its prompts: `score` reads .txt and .json
class files, not this CSV); no input is ever left out of it.

Input: a `.txt` (one phrase or report per line) or a `.csv` with a header row (the text is the
`--column` column, the first one by default); blank lines at the end of either are ignored.

Output CSV, one row per extracted finding, at least one row per input record:

* `row`: 1-based number of the input record (the line of a `.txt`, the data row of a `.csv`
  after its header), so several findings of one report point back to it;
* `source`: the input text as given;
* `prompt`: the template with the finding filled in, or empty when nothing usable was found.
  Every non-empty prompt matches the template's shape (the template's fixed text around a
  lower-case finding of letters, digits, spaces and `,-/()`, at most 12 words), whichever path
  produced it: unvalidated text never reaches this column;
* `method`: `llm` (the model's line, validated) or `rules`;
* `status`: `ok`; `negated` (an absent finding, rendered with "no": CARZero keeps negative
  findings as prompts of their own, "There is no pneumothorax."); `needs_review` (the model's
  output failed validation and the rules stood in, uncertain wording such as "possible", a
  clause that is not a noun phrase, a normal statement or remark, an empty line, nothing found);
* `note`: why a row needs review, or what to check (e.g. words of a model's finding that are
  not in the input: a model may paraphrase "heart is enlarged" as cardiomegaly, or invent).

The model is asked, with a fixed instruction and three worked examples, for one finding per
line in the template's exact form, and decodes greedily (the same input gives the same
output). Its answer is taken only if every line it wrote matches the template's shape;
otherwise that input gets the rules' rows, all `needs_review`, with the model's offending line
in `note`. A model that cannot be loaded, or that raises while generating, stops the run with
exit code 2 and nothing written: quietly falling back to rules for every input would hide it.

The rules are `carzero_fast.prompt_rules`'s (its docstring says what they do).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from .prompt_rules import (
    Finding,
    UsageError,
    check_finding,
    check_template,
    dedupe,
    prompt_pattern,
    render,
    rule_align,
)
from .prompts import DEFAULT_TEMPLATE

__all__ = ["Finding", "align", "llm_align", "load_generator", "main", "prompt_pattern",
           "read_inputs", "rule_align"]  # fmt: skip

PROG = "carzero-fast align-prompts"
COLUMNS = ["row", "source", "prompt", "method", "status", "note"]

# few-shot examples for the model: (input, findings as "finding" / "no finding")
EXAMPLES = [
    ("Pleural Effusion", ["pleural effusion"]),
    ("FINDINGS: Small left pleural effusion. No pneumothorax.",
     ["small left pleural effusion", "no pneumothorax"]),
    ("IMPRESSION: 1. The heart is enlarged. 2. No focal consolidation or edema.",
     ["cardiomegaly", "no focal consolidation", "no edema"]),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def load_generator(model_dir: str | os.PathLike) -> Callable:
    """A greedy CPU `transformers` text-generation pipeline from a local directory."""
    path = Path(model_dir)
    if not path.is_dir():
        raise UsageError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise UsageError(f"{path} is not a transformers model directory (no config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    try:
        # loaded here with local_files_only, so a bad directory never turns into a download
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device=-1)
    except Exception as e:  # whatever transformers raises, the user needs the one line
        raise UsageError(f"{path} could not be loaded as a local text-generation model: "
                         f"{type(e).__name__}: {e}") from e  # fmt: skip
    tok = generator.tokenizer
    if tok is not None and tok.pad_token_id is None and tok.eos_token_id is not None:
        generator.model.generation_config.pad_token_id = tok.eos_token_id  # quiets a warning
    return generator


def instruction(text: str, template: str) -> str:
    """The few-shot prompt asking the model for the findings of `text`, one per line."""
    pos, neg = render(template, "[finding]"), render(template, "[finding]", negated=True)
    head = (f'Rewrite each chest X-ray report as its findings, one per line, each written '
            f'exactly as "{pos}", or "{neg}" when the finding is absent. Write the finding in '
            "lower case, keep words such as left, right, small and large, and write nothing "
            "else.\n\n")  # fmt: skip
    shots = []
    for report, findings in EXAMPLES:
        lines = [render(template, f[3:], True) if f.startswith("no ") else render(template, f)
                 for f in findings]  # fmt: skip
        shots.append(f"Report: {report}\nFindings:\n" + "\n".join(lines) + "\n")
    one_line = " ".join(text.split())  # a line break in the report would read as a new finding
    return head + "\n".join(shots) + f"\nReport: {one_line}\nFindings:\n"


def _generate(generator: Callable, prompt: str, max_new_tokens: int) -> str:
    """The model's continuation of `prompt` (greedy, so the same input gives the same text)."""
    out = generator(prompt, max_new_tokens=max_new_tokens, do_sample=False,
                    return_full_text=False)  # fmt: skip
    return out[0]["generated_text"]


def _model_lines(raw: str) -> list[str]:
    """The model's answer lines: up to the first blank line after them or the next example."""
    lines: list[str] = []
    for line in raw.splitlines():
        s = line.strip()
        if not s:
            if lines:
                break
            continue
        if s.lower().startswith(("report:", "findings:")):
            break
        lines.append(re.sub(r"^(?:[-*•]|\d{1,2}[.)])\s+", "", s))  # list bullets are fine
    return lines


def llm_align(generator: Callable, text: str, template: str = DEFAULT_TEMPLATE,
              max_new_tokens: int = 48) -> list[Finding]:  # fmt: skip
    """The model's findings of `text` if every line it wrote has the template's shape, else the
    rules' findings, all marked needs_review with the reason."""
    check_template(template)
    if not text.strip():
        return rule_align(text, template)
    try:
        raw = _generate(generator, instruction(text, template), max_new_tokens)
    except Exception as e:
        # a run that quietly fell back to rules for every input would hide a broken model
        raise UsageError(f"the model failed: {type(e).__name__}: {e} (an input too long for "
                         "the model? shorten or split it)") from e  # fmt: skip
    lines = _model_lines(raw)
    if not lines:
        return _fallback(text, template, f"model output has no finding line: {raw[:80]!r}")
    pattern, source_words = prompt_pattern(template), set(re.findall(r"[a-z0-9]+", text.lower()))
    rows = []
    for i, line in enumerate(lines):
        m = pattern.match(line)
        finding = m["finding"].lower() if m is not None else ""
        problem = "does not match the template" if m is None else check_finding(finding)
        if problem:
            cut = i == len(lines) - 1 and not raw.rstrip(" ").endswith("\n")
            hint = " (the last line may be cut off: raise --max-new-tokens)" if cut else ""
            return _fallback(text, template, f"model output failed validation: {line[:80]!r} "
                             f"{problem}{hint}")  # fmt: skip
        negated = m["neg"] is not None
        new = [w for w in re.findall(r"[a-z0-9]+", finding) if w not in source_words]
        note = f"not in the input: {' '.join(new)}" if new else ""
        status = "negated" if negated else "ok"
        rows.append(Finding(render(template, finding, negated), status, "llm", note))
    return dedupe(rows)


def _fallback(text: str, template: str, reason: str) -> list[Finding]:
    """The rules' rows for `text`, all needs_review: the model was asked and did not answer."""
    rows = []
    for f in rule_align(text, template):
        note = f"{reason}; rule-based instead" + (f" ({f.note})" if f.note else "")
        rows.append(Finding(f.prompt, "needs_review", "rules", note))
    return rows


# ---------------------------------------------------------------------------------------------
# Files and the command
# ---------------------------------------------------------------------------------------------


def _read_utf8(p: Path) -> str:
    """The file's text as stored (UTF-8, a leading BOM dropped, line ends untouched so that
    the csv module sees a quoted cell's own line breaks); UsageError naming the file if it is
    not UTF-8."""
    try:
        return p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"input {p} is not UTF-8 text ({e.reason} at byte {e.start}); "
                         "convert it, e.g. with iconv -t UTF-8") from e  # fmt: skip


def read_inputs(path: str | os.PathLike, column: str | None = None) -> list[str]:
    """The input records: the lines of a `.txt` or the `column` cells (default: the first
    column) of a `.csv` with a header row; blank lines at the end of either are dropped."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"input {p} does not exist")
    suffix = p.suffix.lower()
    if suffix not in (".txt", ".csv"):
        raise UsageError(f"input {p} must be .txt (one text per line) or .csv")
    if suffix == ".txt":
        if column is not None:
            raise UsageError("--column applies to .csv input only")
        # lines as editors and `wc -l` count them (str.splitlines also breaks at \x0c, \x85,
        # U+2028 …, which would shift every later row number)
        lines = [line.removesuffix("\r") for line in _read_utf8(p).split("\n")]
        while lines and not lines[-1].strip():
            lines.pop()  # the file's last newline(s), not empty records
        if not lines:
            raise UsageError(f"input {p} has no lines")
        return lines
    try:
        rows = list(csv.reader(io.StringIO(_read_utf8(p), newline="")))
    except csv.Error as e:  # e.g. a cell over the csv module's field size limit
        raise UsageError(f"input {p} is not a CSV this command can read: {e}") from None
    while len(rows) > 1 and not rows[-1]:
        rows.pop()  # blank lines at the file's end, not empty records (as in a .txt)
    if not rows:
        raise UsageError(f"input {p} is empty")
    header = rows[0]
    if not header:
        raise UsageError(f"input {p}: the first line, the header row, is empty")
    name = header[0] if column is None else column
    if name not in header:
        raise UsageError(f"input {p} has no column {name!r}; its columns: {', '.join(header)}")
    k = header.index(name)
    records = [r[k] if k < len(r) else "" for r in rows[1:]]
    if not records:
        raise UsageError(f"input {p} has a header but no rows")
    return records


def align(texts: list[str], template: str = DEFAULT_TEMPLATE, generator: Callable | None = None,
          max_new_tokens: int = 48, progress: bool = False) -> list[dict[str, str]]:  # fmt: skip
    """Output rows (COLUMNS) for the input records, at least one per record."""
    check_template(template)
    out = []
    for i, text in enumerate(texts, 1):
        if generator is None:
            found = rule_align(text, template)
        else:
            try:
                found = llm_align(generator, text, template, max_new_tokens)
            except UsageError as e:
                if progress:
                    print(file=sys.stderr)  # end the progress line before the message
                raise UsageError(f"input row {i}: {e}") from e
        for f in found:
            out.append({"row": str(i), "source": text, "prompt": f.prompt, "method": f.method,
                        "status": f.status, "note": f.note})  # fmt: skip
        if progress:
            print(f"\r{i}/{len(texts)} inputs", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return out


def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    """Write through a temporary file and an atomic rename: never a half-written CSV."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Standardise reports or label phrases into CARZero prompts "
        '("There is {finding}.") with a local text-generation model or rules, as a CSV to '
        "review: row, source, prompt, method (llm/rules), status (ok/negated/needs_review), "
        "note.",
    )
    p.add_argument("input", help=".txt (one phrase or report per line) or .csv with a header")
    p.add_argument("--out", required=True, help="output CSV (written atomically)")
    p.add_argument("--model", help="local transformers text-generation model directory "
                   "(default: rules only)")  # fmt: skip
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help="prompt template, with "
                   "{finding} (default: %(default)r)")  # fmt: skip
    p.add_argument("--column", help=".csv input: the text column (default: the first)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="model tokens per input "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    return p


def main(argv: list[str] | None = None) -> int:
    """`carzero-fast align-prompts`; 2 on bad input, with nothing written."""
    args = parser().parse_args(argv)
    try:
        check_template(args.template)
        if args.max_new_tokens <= 0:
            raise UsageError("--max-new-tokens must be positive")
        out = Path(args.out)
        if out.is_dir():
            raise UsageError(f"--out {out} is a directory")
        if out.exists() and not args.force:
            raise UsageError(f"{out} exists: pass --force to overwrite it")
        if out.exists() and Path(args.input).exists() and out.samefile(args.input):
            raise UsageError(f"--out {out} is the input file")  # even with --force
        if not out.parent.is_dir():
            raise UsageError(f"output directory {out.parent} does not exist")
        if not os.access(out.parent, os.W_OK):  # found now, not after a slow generation
            raise UsageError(f"output directory {out.parent} is not writable")
        texts = read_inputs(args.input, args.column)
        generator = load_generator(args.model) if args.model else None
        rows = align(texts, args.template, generator, args.max_new_tokens,
                     progress=generator is not None)  # fmt: skip
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    try:
        write_csv(out, rows)
    except OSError as e:
        print(f"{PROG}: cannot write {out}: {e}", file=sys.stderr)
        return 2
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "negated", "needs_review")}
    print(f"{len(texts)} inputs → {len(rows)} rows in {out}: {counts['ok']} ok, "
          f"{counts['negated']} negated, {counts['needs_review']} needs_review",
          file=sys.stderr)  # fmt: skip
    return 0
