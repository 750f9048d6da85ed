"""Deterministic findings of free-text reports or label phrases, NegEx style (the rules of
`carzero-fast align-prompts`, and its check of every prompt's shape).

Rules, in order: lower-case; drop the sections that are not findings (indication, history,
comparison, technique, recommendation, …) and keep the text of findings / impression /
conclusion; split into sentences on `. ; ? !`, line breaks, list numbers ("1.") and the
NegEx termination words "but", "however", "although"; in a sentence, a negation cue ("no",
"without", "negative for", "free of", "no evidence of", "resolved", …) negates everything after
it up to the sentence's end, so "no effusion, pneumothorax or edema" gives three negated
findings (but an item of the list that opens with a size, side or severity word, "no
pneumothorax, small left effusion", is more often present than denied: `needs_review`; so are
"not" in a finding and work-up wording such as "rule out"), and a trailing cue ("is not seen",
"has resolved") negates the clause before it;
split findings on commas and "and" (and "or" when negated), but only where every part has a
head word, so "left and right effusions" stays whole; strip "there is/are", "evidence of", "is
seen/noted/present", articles and "interval"; keep laterality, size and severity words (left,
small, mild, …: they are part of the finding). Normal statements and remarks ("heart size is
normal", "no interval change", "recommend follow-up") become no prompt (the rules cannot tell
which finding they deny) but a `needs_review` row naming the clause. Duplicate prompts of one
record are kept once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .prompts import DEFAULT_TEMPLATE, fill_template, template_problem

__all__ = ["MAX_WORDS", "Finding", "UsageError", "check_finding", "check_template",
           "dedupe", "prompt_pattern", "render", "rule_align"]  # fmt: skip

MAX_WORDS = 12  # a finding longer than this is a sentence, not a label: review it

# a finding: starts with a letter, digit or "(", then letters, digits, spaces, ",-/()" and
# decimal points between digits ("1.5 cm")
FINDING_RE = r"[a-z0-9(](?:[a-z0-9 ,\-/()]|(?<=\d)\.(?=\d))*"

KEEP_SECTIONS = {"findings", "finding", "impression", "impressions", "conclusion",
                 "conclusions", "opinion", "summary"}  # fmt: skip
SECTION_RE = re.compile(
    r"\b(findings|finding|impressions|impression|conclusions|conclusion|opinion|summary"
    r"|clinical history|clinical information|history|indications|indication"
    r"|reason for examination|reason for exam|comparisons|comparison|technique|examination"
    r"|exam|procedure|recommendations|recommendation)\s*:"
)
# "1." or "2)" before a space: a list number, read as a sentence break ("1.5" is not one)
NUMBERING_RE = re.compile(r"(?:^|(?<=[\s:;.]))\d{1,2}[.)](?=\s|$)")
# (the period of "vs." does not end a sentence: "atelectasis vs. pneumonia" is one finding)
SENTENCE_RE = re.compile(r"[;?!]|(?<!\bvs)\.(?!\d)|\b(?:but|however|although|though)\b")
# connectors left dangling before a negation cue ("cardiomegaly with no effusion")
TRAILING_CONNECTOR_RE = re.compile(r"(?:[\s,]+|\s+(?:with|and|or|nor|plus)\b)+$")
PRE_NEGATION_RE = re.compile(
    r"\b(?:no evidence of|no signs? of|no|without|negative for|free of|absence of"
    r"|resolution of|resolved)\b"
)
POST_NEGATION_RE = re.compile(
    r"\s+(?:(?:is|are|was|were|has|have)\s+)?(?:been\s+)?(?:resolved|absent"
    r"|not (?:seen|identified|present|visualized|evident|appreciated)"
    r"|no longer (?:seen|present|visualized|evident|appreciated))$"
)
# remarks and normal statements: not findings, and the rules cannot tell which finding they
# deny ("heart size is normal"), so they are shown for review instead of being guessed at
NON_FINDING_RE = re.compile(
    r"\b(?:normal|unremarkable|clear|within normal limits|intact|recommend\w*|correlat\w*"
    r"|follow[- ]?up|compared?|comparison|discussed|notified|called|change|changes)\b"
)
NEGATED_LIST_RE = r"\s*,\s*(?:and\s+|or\s+|nor\s+)?|\s+(?:and|or|nor)\s+"
UNCERTAIN_RE = re.compile(
    r"\b(?:possible|possibly|probable|probably|likely|questionable|suspected|suspicious for"
    r"|suggestive of|suggesting|concerning for|may represent|may be|could represent|could be"
    r"|cannot be excluded|can not be excluded|cannot exclude|not excluded|definite"
    r"|rule out|ruled out|r/o|evaluate for|evaluation for|assess for|to exclude)(?![\w/])"
)
# uncertain too, but removing the word would merge two findings into one ("a versus b")
UNCERTAIN_KEEP_RE = re.compile(r"\b(?:versus|vs)\b")
LEAD_RE = re.compile(
    r"^(?:there (?:is|are|was|were|has been|have been)|(?:findings|evidence|signs?) (?:of|for)"
    r"|consistent with|compatible with)(?:\s+|$)"
)
SEEN_RE = re.compile(
    r"\b(?:is|are|was|were|has been|have been)(?: (?:again|also|now|still|newly))? (?:seen"
    r"|noted|present|identified|demonstrated|visualized|observed|evident|redemonstrated"
    r"|visible|appreciated)\b"
)
VERB_RE = re.compile(r"\b(?:is|are|was|were|has|have|appears?|seems?)\b")
FILLER_WORDS = {"a", "an", "the", "interval", "again", "also", "otherwise"}
# words that qualify a finding but are none by themselves ("left and right effusions")
MODIFIERS = {"left", "right", "bilateral", "bibasilar", "basilar", "apical", "upper", "lower",
             "middle", "small", "large", "tiny", "trace", "minimal", "mild", "moderate",
             "severe", "new", "increased", "decreased", "stable", "of", "in", "at", "with",
             "on", "to"} | FILLER_WORDS  # fmt: skip

# words that open a finding of their own rather than continue a negated list
QUALIFIERS = MODIFIERS - FILLER_WORDS - {"of", "in", "at", "with", "on", "to"}


class UsageError(ValueError):
    """Bad input: reported as one line on stderr with exit code 2."""


@dataclass(frozen=True)
class Finding:
    """One output row's result for an input record (its `row` and `source` come from it)."""

    prompt: str
    status: str  # ok, negated or needs_review
    method: str  # llm or rules
    note: str = ""


# ---------------------------------------------------------------------------------------------
# The template
# ---------------------------------------------------------------------------------------------


def check_template(template: str) -> None:
    """Raise UsageError unless `template` holds `{finding}` once and no other braces."""
    problem = template_problem(template)
    if problem is not None:
        raise UsageError(problem)


def render(template: str, finding: str, negated: bool = False) -> str:
    """The prompt for `finding` ("no " before it when negated)."""
    return fill_template(template, f"no {finding}" if negated else finding)


def prompt_pattern(template: str) -> re.Pattern[str]:
    """The shape every prompt must have: the template's fixed text (any case) around an
    optional "no " (group `neg`) and a finding (group `finding`)."""
    before, after = template.split("{finding}")
    return re.compile(
        "^" + re.escape(before) + rf"(?P<neg>no )?(?P<finding>{FINDING_RE})" + re.escape(after)
        + "$", re.IGNORECASE,
    )  # fmt: skip


def check_finding(finding: str) -> str:
    """'' if `finding` is a valid finding, else why not."""
    if not re.fullmatch(FINDING_RE, finding) or finding != finding.strip(" ,"):
        return "has characters outside a-z 0-9 space ,-/()"
    if len(finding.split()) > MAX_WORDS:
        return f"is longer than {MAX_WORDS} words"
    return ""


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------


def _sentences(text: str) -> list[str]:
    """Lower-cased sentences of the finding sections of `text`."""
    t = re.sub(r"[\r\n]+", " ; ", text.lower())
    t = re.sub(r"\s+", " ", t)
    parts = SECTION_RE.split(t)  # [text before any header, header, body, header, body, …]
    kept = [parts[0]] + [body for head, body in zip(parts[1::2], parts[2::2], strict=True)
                         if head in KEEP_SECTIONS]  # fmt: skip
    out = []
    for body in kept:
        body = NUMBERING_RE.sub(" ; ", body)
        out += [s.strip(" ,:-") for s in SENTENCE_RE.split(body)]
    return [s for s in out if s]


def _has_head(part: str) -> bool:
    return any(w not in MODIFIERS for w in re.findall(r"[a-z0-9]+", part))


def _split_items(text: str, separators: str) -> list[str]:
    """`text` split on `separators` when every part has a head word, else `[text]`."""
    parts = [p.strip(" ,") for p in re.split(separators, text)]
    parts = [p for p in parts if p]
    if len(parts) > 1 and all(_has_head(p) for p in parts):
        return parts
    return [text.strip(" ,")]


def _clean(item: str) -> tuple[str, list[str]]:
    """(the finding in `item`, the uncertainty cues found)."""
    s = item.strip(" ,:-")
    while (m := LEAD_RE.match(s)) is not None:  # "there is evidence of …"
        s = s[m.end() :]
    s = SEEN_RE.sub(" ", s)
    cues = UNCERTAIN_RE.findall(s) + UNCERTAIN_KEEP_RE.findall(s)
    s = UNCERTAIN_RE.sub(" ", s)
    s = " ".join(w for w in s.split() if w not in FILLER_WORDS)
    return s.strip(" ,:-"), cues


def _rule_finding(item: str, negated: bool, template: str) -> Finding | None:
    """The row for one item, or None for a fragment without a head word."""
    finding, cues = _clean(item)
    if not finding or not _has_head(finding):
        return None
    problem = check_finding(finding)
    if problem:
        return Finding("", "needs_review", "rules", f"{finding!r} {problem}")
    prompt = render(template, finding, negated)
    if cues:
        return Finding(prompt, "needs_review", "rules", f"uncertain wording: {', '.join(cues)}")
    if VERB_RE.search(finding):
        return Finding(prompt, "needs_review", "rules", "not reduced to a noun phrase")
    if re.search(r"\bnot\b", finding):  # "effusion, not pneumothorax": which does it deny?
        return Finding(prompt, "needs_review", "rules", "'not' in the finding: the rules do "
                       "not read what it negates")  # fmt: skip
    return Finding(prompt, "negated" if negated else "ok", "rules")


def _clauses(sentence: str) -> list[tuple[str, bool]]:
    """(clause, negated) pairs of a sentence, NegEx style."""
    m = POST_NEGATION_RE.search(sentence)
    if m is not None:
        # a trailing cue negates back to the last comma ("pneumothorax has resolved")
        head, _, clause = sentence[: m.start()].rpartition(",")
        return _clauses(head) + [(clause, True)]
    m = PRE_NEGATION_RE.search(sentence)
    if m is not None:
        # the cue negates the rest of the sentence; what comes before it is read on its own
        head = TRAILING_CONNECTOR_RE.sub("", sentence[: m.start()])
        return _clauses(head) + [(sentence[m.end() :], True)]
    return [(sentence, False)] if sentence.strip(" ,") else []


def rule_align(text: str, template: str = DEFAULT_TEMPLATE) -> list[Finding]:
    """Deterministic findings of one report or phrase: at least one row, see the module doc."""
    check_template(template)
    if not text.strip():
        return [Finding("", "needs_review", "rules", "empty input")]
    rows: list[Finding] = []
    for sentence in _sentences(text):
        for clause, negated in _clauses(sentence):
            if negated:  # "no effusion, pneumothorax or edema": a list, all negated
                segments = _split_items(clause, NEGATED_LIST_RE)
            else:  # "small effusion, lungs otherwise clear": the comma ends a finding
                segments = [s for s in clause.split(",") if s.strip()]
            for k, segment in enumerate(segments):
                if NON_FINDING_RE.search(segment):
                    rows.append(Finding("", "needs_review", "rules",
                                        f"no finding in {segment.strip()!r}: a normal statement "
                                        "or a remark"))  # fmt: skip
                    continue
                items = [segment] if negated else _split_items(segment, r"\s+and\s+")
                found = [f for f in (_rule_finding(i, negated, template) for i in items) if f]
                first = segment.split()[0].lower() if segment.split() else ""
                if negated and k > 0 and first in QUALIFIERS:
                    # "no pneumothorax, small left effusion": a qualified finding after the
                    # negated one is more often present than denied; a person decides
                    found = [Finding(f.prompt, "needs_review", "rules", "a qualified finding "
                                     "after a negated one: negated, or present?")
                             for f in found]  # fmt: skip
                rows += found
    return dedupe(rows) or [Finding("", "needs_review", "rules", "no finding found")]


def dedupe(rows: list[Finding]) -> list[Finding]:
    seen, out = set(), []
    for f in rows:
        key = f.prompt or f.note
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out
