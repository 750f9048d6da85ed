"""Disease vocabularies → CARZero prompts, and an on-disk cache of their embeddings.

A class file is either `.txt` (one finding per line, turned into a prompt by a template,
CARZero's `"There is {finding}."` by default) or `.json` (class → prompt or list of prompts,
used as written). Several prompts per class are ensembled by the scorer (mean of logits).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

DEFAULT_TEMPLATE = "There is {finding}."


def template_problem(template: str) -> str | None:
    """Why `template` is not a prompt template, or None: it must hold `{finding}` exactly once
    and no other braces (it is filled by plain replacement, so `{x}` or `{}` would reach the
    prompt as text; the one-finding shape is also what align-prompts parses back)."""
    rest = template.replace("{finding}", "")
    if template.count("{finding}") != 1 or "{" in rest or "}" in rest:
        return (f"the template must contain '{{finding}}' exactly once and no other braces, "
                f"got {template!r}")  # fmt: skip
    return None


def fill_template(template: str, finding: str) -> str:
    """The prompt for `finding` (plain replacement: braces in `finding` stay as they are)."""
    return template.replace("{finding}", finding)


def read_classes(path: str | os.PathLike, template: str = DEFAULT_TEMPLATE) -> dict[str, list[str]]:
    """Class file → {class name: [prompt, ...]} in file order.

    Raises ValueError naming the problem: a missing file, a file that is not UTF-8, an empty
    line, a duplicate class, an empty prompt list, a bad template (`template_problem`), an
    unknown suffix.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"class file {p} does not exist")
    problem = template_problem(template)
    if problem is not None:
        raise ValueError(problem)
    if p.suffix.lower() not in (".json", ".txt"):
        raise ValueError(f"class file {p} must be .txt (one class per line) or .json")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"class file {p} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    if p.suffix.lower() == ".json":
        try:
            raw = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as e:
            raise ValueError(f"class file {p} is not valid JSON: {e}") from e
        except _RepeatedKey as e:
            raise ValueError(f"class file {p} repeats class {e.args[0]!r}") from None
        if not isinstance(raw, dict) or not raw:
            raise ValueError(f"class file {p} must map class names to prompts")
        out: dict[str, list[str]] = {}
        for name, prompts in raw.items():
            prompts = [prompts] if isinstance(prompts, str) else prompts
            if (
                not isinstance(prompts, list)
                or not prompts
                or not all(isinstance(t, str) and t.strip() for t in prompts)
            ):
                raise ValueError(f"class {name!r} in {p} needs a non-empty list of prompts")
            name = name.strip()  # as a .txt line's: the class is a CSV column's name
            if not name:
                raise ValueError(f"class file {p} has an empty class name")
            if name in out:
                raise ValueError(f"class file {p} repeats class {name!r}")
            out[name] = [t.strip() for t in prompts]
        return out
    # lines as editors and `wc -l` count them, as align-prompts reads its .txt input
    # (str.splitlines also breaks at \x0c, \x85, U+2028 …, shifting later line numbers)
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()  # a trailing newline is not an empty class
    out = {}
    for i, line in enumerate(lines, 1):
        name = line.strip()
        if not name:
            raise ValueError(f"class file {p}: line {i} is empty")
        if name in out:
            raise ValueError(f"class file {p}: line {i} repeats class {name!r}")
        out[name] = [fill_template(template, name)]
    if not out:
        raise ValueError(f"class file {p} lists no classes")
    return out


class _RepeatedKey(ValueError):
    """A key repeated in one JSON object (`json` would keep its last value silently)."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """`json.loads`' object hook: the object as a dict, a repeated key refused."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(key)
        out[key] = value
    return out


class PromptCache:
    """Prompt embeddings on disk, one safetensors file per text-encoder fingerprint, keyed by
    the prompt's text: a vocabulary is encoded once per model."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str) -> None:
        self.path = Path(directory) / f"prompts-{fingerprint[:32]}.safetensors"
        self._store: dict[str, Tensor] = self._read() if self.path.exists() else {}

    def _read(self) -> dict[str, Tensor]:
        """The file's entries; a file that cannot be read (cut short by a full disk, not
        safetensors, entries that are not `(Pt, D)` embeddings) is a cache miss, with a
        warning: its prompts are encoded again and the file rewritten."""
        try:
            store = load_file(str(self.path))
            bad = next((k for k, e in store.items() if e.dim() != 2), None)
            if bad is not None:
                raise ValueError(f"entry {bad} has shape {tuple(store[bad].shape)}, not (Pt, D)")
        except Exception as e:  # noqa: BLE001 — safetensors raises its own error type
            warnings.warn(f"prompt cache {self.path} cannot be read ({e}): ignored, its prompts "
                          "are encoded again and the file rewritten", stacklevel=3)  # fmt: skip
            return {}
        return store

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, texts: list[str]) -> list[Tensor | None]:
        return [self._store.get(self.key(t)) for t in texts]

    def put(self, texts: list[str], embeddings: Tensor) -> None:
        """Add `(len(texts), Pt, D)` embeddings and rewrite the file atomically."""
        for t, e in zip(texts, embeddings, strict=True):
            self._store[self.key(t)] = e.detach().to("cpu", torch.float32).contiguous()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        save_file(self._store, str(tmp))
        os.replace(tmp, self.path)


def state_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's parameter names, shapes and bytes (fp32), to key caches."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def text_fingerprint(text_encoder: torch.nn.Module) -> str:
    """The key of a text encoder's prompt cache: its weights (`state_fingerprint`), and what
    else decides an embedding without being a weight: the recipe's `max_length` and
    `n_layers_summed` (from the model directory's config.json) and the tokenizer (its class,
    lower-casing and vocabulary), so that editing either never reuses stale embeddings."""
    tok = text_encoder.tokenizer
    recipe = {
        "weights": state_fingerprint(text_encoder),
        "max_length": text_encoder.max_length,
        "n_layers_summed": text_encoder.n_layers_summed,
        "tokenizer": type(tok).__name__,
        "lower_case": getattr(tok, "do_lower_case", None),
        "vocab": sorted(tok.get_vocab().items()),
    }
    return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()
