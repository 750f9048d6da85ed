"""The text encoder follows CARZero's recipe: cleaned text, 97 tokens, the last 4 BERT layers
summed, word pieces merged by summing, zero rows after [SEP], sentence = mean of the 97 rows.
A tiny random BERT and a hand-written vocabulary stand in for the real ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer

from carzero_fast.encoders.text import TextEncoder, clean_text, merge_wordpieces

# "pneumothorax" → "pne" "##umo" "##thorax"; "effusions" → "effusion" "##s".
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "there", "is", "a", "no", "small", "left",
         "right", "sided", "effusion", "##s", "pne", "##umo", "##thorax", "and"]  # fmt: skip
ID = {w: i for i, w in enumerate(VOCAB)}
L, D = 97, 32


def _tiny_bert_dir(root: Path) -> Path:
    """A seeded 5-layer BERT (D = 32) and a WordPiece tokenizer, saved to `root`/bert."""
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizer(vocab=str(root / "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=D, num_hidden_layers=5,
                        num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=128)  # fmt: skip
    model = BertModel(config)
    out = root / "bert"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return _tiny_bert_dir(tmp_path_factory.mktemp("text_encoder"))


@pytest.fixture(scope="module")
def encoder(bert_dir) -> TextEncoder:
    return TextEncoder.from_pretrained(bert_dir).eval()


def _last4(encoder: TextEncoder, ids: list[int]) -> torch.Tensor:
    """Sum of the last 4 hidden states of the model for ids padded to L → (L, D)."""
    n = len(ids)
    input_ids = torch.tensor([ids + [ID["[PAD]"]] * (L - n)])
    mask = torch.tensor([[1] * n + [0] * (L - n)])
    with torch.no_grad():
        hs = encoder.model(
            input_ids=input_ids,
            attention_mask=mask,
            token_type_ids=torch.zeros_like(input_ids),
            output_hidden_states=True,
        ).hidden_states
    assert len(hs) == 6  # embeddings + 5 layers
    return (hs[-1] + hs[-2] + hs[-3] + hs[-4])[0]


def test_clean_text():
    assert clean_text("There is a  Left-sided EFFUSION.") == "there is a left sided effusion"
    assert clean_text("  ...!!  ") == ""
    assert clean_text("No\npneumothorax;\tsmall") == "no pneumothorax small"
    # CARZero's process_text: sentences split at "." and numbering, one-word sentences dropped,
    # non-ASCII characters removed from words
    assert clean_text("Effusion.") == ""
    assert clean_text("1. Small effusion. 2. Edema. No pneumothorax") == (
        "small effusion no pneumothorax"
    )
    assert clean_text("Pleural effusión seen.") == "pleural effusin seen"


def test_hand_computed_memory(encoder):
    text = "There is a small PNEUMOTHORAX, and effusions."
    tokens = ["[CLS]", "there", "is", "a", "small", "pne", "##umo", "##thorax", "and",
              "effusion", "##s", "[SEP]"]  # fmt: skip
    groups = [[0], [1], [2], [3], [4], [5, 6, 7], [8], [9, 10], [11]]
    h = _last4(encoder, [ID[t] for t in tokens])
    expected_words = torch.zeros(L, D)
    for w, idx in enumerate(groups):
        expected_words[w] = h[idx].sum(dim=0)
    expected = torch.cat([expected_words.mean(dim=0, keepdim=True), expected_words])

    with torch.no_grad():
        out = encoder([text])
    assert out.shape == (1, 1 + L, D) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)
    # Padding rows are exactly zero; row 0 is the mean of all 97 rows, zeros included.
    assert torch.count_nonzero(out[0, 1 + len(groups) :]) == 0
    torch.testing.assert_close(out[0, 0], out[0, 1:].sum(0) / L, rtol=1e-6, atol=1e-6)
    assert encoder.words([text]) == [["[CLS]", "there", "is", "a", "small", "pneumothorax",
                                      "and", "effusions", "[SEP]"]]  # fmt: skip


def test_merge_wordpieces_helper():
    tokens = ["[CLS]", "no", "pne", "##umo", "##thorax", "[SEP]", "[PAD]", "[PAD]"]
    embs = torch.arange(8 * 3, dtype=torch.float64).reshape(8, 3)
    words_embs, words = merge_wordpieces(embs, tokens, max_length=6)
    assert words == ["[CLS]", "no", "pneumothorax", "[SEP]"]
    expected = torch.zeros(6, 3, dtype=torch.float64)
    expected[0], expected[1], expected[3] = embs[0], embs[1], embs[5]
    expected[2] = embs[2] + embs[3] + embs[4]
    assert torch.equal(words_embs, expected)
    with pytest.raises(ValueError, match="SEP"):
        merge_wordpieces(embs[:3], tokens[:3], max_length=6)
    with pytest.raises(ValueError, match="max_length"):
        merge_wordpieces(embs, tokens, max_length=3)


def test_truncation_keeps_sep_last(encoder):
    # "a pneumothorax" is 4 tokens; 95 = 23 * 4 + 3 content tokens fit, so the cut falls inside
    # the 24th "pneumothorax" ("pne" "##umo" survive), and [SEP] closes the text.
    text = " ".join(["A pneumothorax"] * 40)
    words = encoder.words([text])[0]
    assert words == ["[CLS]"] + ["a", "pneumothorax"] * 23 + ["a", "pneumo", "[SEP]"]
    n = len(words)
    with torch.no_grad():
        out = encoder([text])[0]
    ids = [ID["[CLS]"]] + [ID["a"], ID["pne"], ID["##umo"], ID["##thorax"]] * 24
    h = _last4(encoder, ids[:96] + [ID["[SEP]"]])
    torch.testing.assert_close(out[n], h[96], rtol=1e-5, atol=1e-5)  # the [SEP] row
    torch.testing.assert_close(out[n - 1], h[94] + h[95], rtol=1e-5, atol=1e-5)  # "pneumo"
    assert torch.count_nonzero(out[n]) > 0 and torch.count_nonzero(out[n + 1 :]) == 0


def test_words_and_edge_cases(encoder):
    assert encoder.words(["There is EFFUSION.", "xyz effusion", "?!"]) == [
        ["[CLS]", "there", "is", "effusion", "[SEP]"],
        ["[CLS]", "[UNK]", "effusion", "[SEP]"],
        ["[CLS]", "[SEP]"],
    ]
    with torch.no_grad():
        empty = encoder([])
        blank = encoder(["...", ""])
    assert empty.shape == (0, 1 + L, D) and empty.dtype == torch.float32
    assert blank.shape == (2, 1 + L, D)
    assert torch.count_nonzero(blank[:, 1:3].abs().sum(-1)) == 4  # [CLS], [SEP] rows
    assert torch.count_nonzero(blank[:, 3:]) == 0
    torch.testing.assert_close(blank[0], blank[1])


def test_batch_equals_single(encoder):
    texts = ["No pneumothorax.", "There is a small left sided effusion and a right pneumothorax.",
             "Effusions"]  # fmt: skip
    with torch.no_grad():
        batch = encoder(texts)
        singles = torch.cat([encoder([t]) for t in texts])
    torch.testing.assert_close(batch, singles, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(encoder, tmp_path):
    encoder.save_pretrained(tmp_path / "saved")
    again = TextEncoder.from_pretrained(tmp_path / "saved").eval()
    texts = ["There is a small pneumothorax.", "no effusions"]
    with torch.no_grad():
        assert torch.equal(again(texts), encoder(texts))
    assert again.words(texts) == encoder.words(texts)


def test_parameter_names_dtype_and_gradients(bert_dir):
    enc = TextEncoder.from_pretrained(bert_dir, max_length=20).eval()
    bert = BertModel.from_pretrained(bert_dir)
    # CARZero's `text_encoder.model.*` keys load with the prefix stripped to `model.*`.
    assert set(enc.state_dict()) == {f"model.{k}" for k in bert.state_dict()}
    enc.load_state_dict({f"model.{k}": v for k, v in bert.state_dict().items()})

    out = enc(["a small pneumothorax"])
    assert out.shape == (1, 21, D)
    out.sum().backward()
    assert enc.model.embeddings.word_embeddings.weight.grad is not None

    enc64 = enc.to(torch.float64)
    with torch.no_grad():
        out64 = enc64(["a small pneumothorax"])
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out.detach(), rtol=1e-4, atol=1e-4)


def test_missing_model_or_tokenizer(bert_dir, tmp_path):
    with pytest.raises(ValueError, match="nowhere"):
        TextEncoder.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        TextEncoder.from_pretrained(tmp_path / "empty")

    model_only, tokenizer_only = tmp_path / "model_only", tmp_path / "tokenizer_only"
    BertModel.from_pretrained(bert_dir).save_pretrained(model_only)
    BertTokenizer.from_pretrained(bert_dir).save_pretrained(tokenizer_only)
    with pytest.raises(ValueError, match="no tokenizer in .*model_only"):
        TextEncoder.from_pretrained(model_only)
    with pytest.raises(ValueError, match="no model in .*tokenizer_only"):
        TextEncoder.from_pretrained(tokenizer_only)


def test_prompts_must_be_a_list_of_strings(encoder, bert_dir):
    """A lone string would be one prompt per character: refused, as is a non-string; too
    many summed layers are refused when the encoder is built, not at its first call."""
    for bad, words in (("There is effusion.", "got str .wrap one prompt in a list"),
                       (["There is effusion.", None], "must be strings, got a NoneType"),
                       ((t for t in ["a b"]), "got generator")):  # fmt: skip
        with pytest.raises(TypeError, match=words):
            encoder(bad)
    assert encoder(("There is effusion.",)).shape == (1, 1 + L, D)
    with pytest.raises(ValueError, match="n_layers_summed=7 but the model has 6 hidden states"):
        TextEncoder.from_pretrained(bert_dir, n_layers_summed=7)
