"""CARZero's text encoder: BERT through `transformers`, with the word-level token recipe CARZero
inherits from GLoRIA (`aggregate_tokens`).

Recipe, per text:
  1. clean as CARZero's inference does (`process_text`): split into sentences at "." and at
     numbering ("1."), drop sentences of fewer than two `\\w+` words, lower-case, keep the
     ASCII of each `\\w+` run, join everything with single spaces;
  2. tokenise to `max_length` (97) tokens: [CLS] ... [SEP], truncated, padded with [PAD];
  3. run BERT with all hidden states and sum the last `n_layers_summed` (4) → (97, D);
  4. merge word pieces into words by summing ("pne", "##umo", "##thorax" → one row), keep the
     [SEP] row, stop there, and fill zero rows up to 97 → (97, D);
  5. sentence embedding = mean of those 97 rows, zero rows included (as CARZero does).
The output memory is (M, 1 + 97, D): the sentence embedding in row 0, the 97 word rows after it,
the layout the aligner takes (global in row 0).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

_WORD_RE = re.compile(r"\w+")
_NUMBERING_RE = re.compile(r"[0-9]+\.")
_CONTINUATION = "##"  # WordPiece marks a piece that continues the previous one with this prefix
# AutoTokenizer silently builds an empty-vocabulary tokenizer from a bare model directory, so the
# presence of a vocabulary is checked by hand before loading.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_prompts(texts: object) -> None:
    """A list (or tuple) of strings, else TypeError: a lone string would be read as one
    prompt per character."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"prompts must be a list of strings, got {type(texts).__name__}"
                        + (" (wrap one prompt in a list)" if isinstance(texts, str) else ""))
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"prompts must be strings, got a {type(bad[0]).__name__}")


def clean_text(text: str) -> str:
    """CARZero's prompt cleaning (its `process_text`): sentences split at "." and at numbering,
    those of fewer than two `\\w+` words dropped, the rest lower-cased `\\w+` runs (ASCII only)
    joined by single spaces.

    "There is a  Left-sided EFFUSION." → "there is a left sided effusion"; "Effusion." → ""
    (a one-word sentence is dropped, as CARZero drops it).
    """
    text = text.replace("\n", " ")
    sentences = [s for part in _NUMBERING_RE.split(text) for s in part.split(".")]
    kept = []
    for sentence in sentences:
        words = _WORD_RE.findall(sentence.replace("\ufffd\ufffd", " ").lower())
        if len(words) <= 1:
            continue
        ascii_words = [w.encode("ascii", "ignore").decode("ascii") for w in words]
        kept.append(" ".join(w for w in ascii_words if w))
    return " ".join(kept)


def _group_wordpieces(tokens: list[str], sep_token: str) -> tuple[list[int], list[str]]:
    """Assign each token up to and including the first `sep_token` to a word.

    A token starting with "##" continues the current word; any other token starts a new word
    (so [CLS] is the first word); `sep_token` is a word of its own and ends the walk.
    Returns (word index of each of the first n tokens, the n_words merged word strings), with
    the "##" prefixes dropped from the strings ("pne" "##umo" → "pneumo").
    """
    word_ids: list[int] = []
    words: list[str] = []
    for token in tokens:
        if token == sep_token:
            word_ids.append(len(words))
            words.append(token)
            return word_ids, words
        if token.startswith(_CONTINUATION) and words:
            word_ids.append(len(words) - 1)
            words[-1] += token[len(_CONTINUATION) :]
        else:
            # A leading "##" with no word before it starts the first word, as in GLoRIA.
            word_ids.append(len(words))
            words.append(token.removeprefix(_CONTINUATION))
    raise ValueError(f"no {sep_token!r} token in {tokens[:8]}...: cannot find the end of the text")


def merge_wordpieces(
    token_embs: torch.Tensor, tokens: list[str], max_length: int, *, sep_token: str = "[SEP]"
) -> tuple[torch.Tensor, list[str]]:
    """Sum the embeddings of the word pieces of each word; zero rows after [SEP].

    token_embs: (L, D), one row per entry of `tokens` (L = len(tokens)).
    Returns (word_embs (max_length, D) in token_embs' dtype and device, words), where row i of
    word_embs is the sum of the pieces of words[i] for i < len(words) and zero after.
    """
    if token_embs.ndim != 2 or token_embs.shape[0] != len(tokens):
        raise ValueError(
            f"token_embs must be (L, D) with L = len(tokens) = {len(tokens)}, "
            f"got {tuple(token_embs.shape)}"
        )
    word_ids, words = _group_wordpieces(tokens, sep_token)
    if len(words) > max_length:
        raise ValueError(f"{len(words)} words do not fit in max_length={max_length} rows")
    index = torch.tensor(word_ids, device=token_embs.device)
    out = token_embs.new_zeros(max_length, token_embs.shape[1])
    # Out of place, so that gradients reach token_embs.
    return out.index_add(0, index, token_embs[: len(word_ids)]), words


class TextEncoder(nn.Module):
    """BERT (`self.model`, the transformers model, its parameter names kept) plus its tokenizer,
    producing CARZero's text memory (M, 1 + max_length, D): sentence embedding in row 0.

    The tokenizer must be a WordPiece one ("##" continuation pieces, [CLS] ... [SEP]).
    """

    def __init__(
        self, model: nn.Module, tokenizer: Any, max_length: int = 97, n_layers_summed: int = 4
    ) -> None:
        super().__init__()
        if max_length < 2:
            raise ValueError(f"max_length must be ≥ 2 (room for [CLS] and [SEP]), got {max_length}")
        if n_layers_summed < 1:
            raise ValueError(f"n_layers_summed must be ≥ 1, got {n_layers_summed}")
        if tokenizer.sep_token is None or tokenizer.cls_token is None:
            raise ValueError("the tokenizer has no [CLS]/[SEP] tokens; a BERT tokenizer is needed")
        n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        if n_layers is not None and n_layers_summed > n_layers + 1:
            raise ValueError(f"n_layers_summed={n_layers_summed} but the model has "
                             f"{n_layers + 1} hidden states (embeddings included)")  # fmt: skip
        max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if max_positions is not None and max_length > max_positions:
            raise ValueError(
                f"max_length={max_length} exceeds the model's {max_positions} positions"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.n_layers_summed = n_layers_summed

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kw: Any) -> TextEncoder:
        """Load the model (AutoModel) and tokenizer (AutoTokenizer) from a local `directory`,
        never from the network; `kw` (max_length, n_layers_summed) go to the constructor."""
        path = Path(directory)
        if not path.is_dir():
            raise ValueError(f"text encoder directory {str(path)!r} does not exist")
        if not (path / "config.json").is_file() or not any(
            (path / f).is_file() for f in _WEIGHT_FILES
        ):
            raise ValueError(
                f"no model in {str(path)!r}: expected config.json and one of {_WEIGHT_FILES}"
            )
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise ValueError(f"no tokenizer in {str(path)!r}: expected one of {TOKENIZER_FILES}")
        try:
            model = AutoModel.from_pretrained(path, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load a text encoder from {str(path)!r}: {e}") from e
        return cls(model, tokenizer, **kw)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write model weights, config and tokenizer files to `directory` (transformers' own
        format), so that `from_pretrained(directory)` restores this encoder. The recipe settings
        (max_length, n_layers_summed) are not stored: pass them again if not the defaults."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    @property
    def hidden_size(self) -> int:
        """D, the width of the token embeddings."""
        return int(self.model.config.hidden_size)

    def _tokenize(self, texts: list[str]) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
        """Clean and tokenise `texts` to (M, max_length) id tensors, plus the token strings."""
        encoding = self.tokenizer(
            [clean_text(t) for t in texts],
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        tokens = [
            self.tokenizer.convert_ids_to_tokens(ids) for ids in encoding["input_ids"].tolist()
        ]
        return dict(encoding), tokens

    def words(self, texts: list[str]) -> list[list[str]]:
        """The merged words of each text, [CLS] first and [SEP] last, no padding:
        "There is effusion." → ["[CLS]", "there", "is", "effusion", "[SEP]"]. Row i + 1 of
        `forward`'s output for a text belongs to its words[i]."""
        _, tokens = self._tokenize(texts)
        return [_group_wordpieces(t, self.tokenizer.sep_token)[1] for t in tokens]

    def forward(self, texts: list[str]) -> torch.Tensor:
        """Encode M texts → (M, 1 + max_length, D) on the model's device, in its dtype:
        row 0 the sentence embedding, rows 1.. the word embeddings, zero after [SEP]."""
        check_prompts(texts)
        param = next(self.model.parameters())
        device, dtype = param.device, param.dtype
        m, length, d = len(texts), self.max_length, self.hidden_size
        if m == 0:
            return torch.zeros(0, 1 + length, d, device=device, dtype=dtype)

        encoding, tokens = self._tokenize(texts)
        out = self.model(
            **{k: v.to(device) for k, v in encoding.items()}, output_hidden_states=True
        )
        hidden = out.hidden_states  # embeddings + one per layer, each (M, L, D)
        if self.n_layers_summed > len(hidden):
            raise ValueError(
                f"n_layers_summed={self.n_layers_summed} but the model has {len(hidden)} hidden "
                "states (embeddings included)"
            )
        # Accumulate in float32 so that a bf16/fp16 model loses no precision in the sums.
        token_embs = sum(h.float() for h in hidden[-self.n_layers_summed :])  # (M, L, D)

        # One index_add over the whole batch instead of one per text: token j of text i goes to
        # row i * length + (its word index); tokens after [SEP] are not added anywhere.
        src_rows: list[int] = []
        dst_rows: list[int] = []
        for i, text_tokens in enumerate(tokens):
            word_ids, _ = _group_wordpieces(text_tokens, self.tokenizer.sep_token)
            src_rows.extend(i * length + j for j in range(len(word_ids)))
            dst_rows.extend(i * length + w for w in word_ids)
        src = token_embs.reshape(m * length, d)[torch.tensor(src_rows, device=device)]
        word_embs = token_embs.new_zeros(m * length, d).index_add(
            0, torch.tensor(dst_rows, device=device), src
        )
        word_embs = word_embs.reshape(m, length, d)
        # CARZero's sentence embedding: the mean over all max_length rows, padding zeros included.
        sentence = word_embs.mean(dim=1, keepdim=True)
        return torch.cat([sentence, word_embs], dim=1).to(dtype)
