"""Bad input gets a clear error that names the problem."""

from __future__ import annotations

import pytest
import torch
from conftest import make_aligner, rel_err

import carzero_fast as cf

CFG = cf.AlignerConfig(d_model=16, n_heads=2, n_layers=1, d_ffn=8, head_dims=(8,))


@pytest.fixture(scope="module")
def al():
    return make_aligner(CFG)


def _ok(n=3, m=2, p=5, dtype=torch.float32):
    return torch.randn(n, p, 16, dtype=dtype), torch.randn(m, 16, dtype=dtype)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda: (torch.randn(3, 5, 12), torch.randn(2, 16)), ValueError, "D = 12"),
        (lambda: (torch.randn(3, 5, 16), torch.randn(2, 12)), ValueError, "D = 12"),
        (lambda: (torch.randn(5, 16), torch.randn(2, 16)), ValueError, "memory must be (N, P, D)"),
        (
            lambda: (torch.randn(3, 5, 16), torch.randn(1, 2, 16)),
            ValueError,
            "queries must be (M, D)",
        ),
        (lambda: (torch.randn(3, 0, 16), torch.randn(2, 16)), ValueError, "P = 0"),
        (lambda: (torch.randn(3, 5, 16), torch.randn(2, 16).double()), TypeError, "float64"),
        (lambda: (torch.randn(3, 5, 16).int(), torch.randn(2, 16)), TypeError, "int32"),
        (lambda: (torch.randn(3, 5, 16).numpy(), torch.randn(2, 16)), TypeError, "ndarray"),
        (lambda: (torch.randn(3, 5, 16), torch.randn(2, 16, device="meta")), ValueError, "meta"),
    ],
)
def test_bad_tensors(al, backend, make, error, words):
    mem, q = make()
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        al(mem, q, backend=backend)


@pytest.mark.parametrize(
    ("mask", "error", "words"),
    [
        (torch.zeros(3, 4, dtype=torch.bool), ValueError, r"memory_mask must be \(N, P\)"),
        (torch.zeros(3, 5), TypeError, "bool"),
        ([[False] * 5] * 3, TypeError, "bool"),
        (torch.tensor([[False] * 5, [True] * 5, [True] * 5]), ValueError, r"item\(s\) \[1, 2\]"),
    ],
)
def test_bad_masks(al, mask, error, words):
    mem, q = _ok()
    with pytest.raises(error, match=words):
        al(mem, q, mask)


def test_parameters_on_another_device(al):
    mem, q = _ok()
    meta = make_aligner(CFG).to("meta")
    with pytest.raises(ValueError, match="parameters are on meta"):
        meta(mem, q)


def test_unknown_backend_and_budget(al):
    mem, q = _ok()
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        al(mem, q, backend="fast")
    with pytest.raises(ValueError, match="unknown backend"):
        cf.CrossAttentionAligner(CFG, backend="cuda")
    for backend in ("reference", "chunked"):  # the reference has no chunks, but says so too
        with pytest.raises(ValueError, match="chunk_budget_bytes must be positive, got -3"):
            al(mem, q, backend=backend, chunk_budget_bytes=-3)
        for bad in (0.5, 1.5, "1000", float("inf"), True):  # 0.5 read as "got 0"; 1.5 passed
            with pytest.raises(TypeError, match=r"chunk_budget_bytes must be an integer number"):
                al(mem, q, backend=backend, chunk_budget_bytes=bad)
    with pytest.raises(TypeError, match="got 2.0"):
        cf.CrossAttentionAligner(CFG, chunk_budget_bytes=2.0)
    import numpy as np

    assert al(mem, q, backend="chunked", chunk_budget_bytes=np.int64(1)).shape == (3, 2)
    txt = torch.randn(2, 4, 16)
    for fn in (cf.zero_shot_scores, cf.alignment_logits):  # a per-call budget there too
        with pytest.raises(ValueError, match="chunk_budget_bytes must be positive"):
            fn(al, mem, txt, backend="chunked", chunk_budget_bytes=-1)
    one_pair = cf.zero_shot_scores(al, mem, txt, backend="chunked", chunk_budget_bytes=1)
    assert rel_err(one_pair, cf.zero_shot_scores(al, mem, txt, backend="reference")) < 1e-5


def test_bad_configs():
    with pytest.raises(ValueError, match="divisible"):
        cf.AlignerConfig(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="dropout"):
        cf.AlignerConfig(dropout=1.0)
    with pytest.raises(ValueError, match="n_layers"):
        cf.AlignerConfig(n_layers=0)
    for eps in (0.0, -1e-5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="layer_norm_eps must be positive and finite"):
            cf.AlignerConfig(layer_norm_eps=eps)
    # sizes that are not integers fail here, not in a view() deep in a backend
    for kw, words in (({"n_heads": 4.0}, "n_heads must be an integer, got 4.0"),
                      ({"d_model": "32"}, "d_model must be an integer, got '32'"),
                      ({"n_layers": True}, "n_layers must be an integer"),
                      ({"head_dims": (1024.9, 512)}, "head_dims must be an integer, got 1024.9"),
                      ({"head_dims": "12"}, "head_dims must be a sequence of widths"),
                      ({"dropout": "0.1"}, "dropout must be a number")):  # fmt: skip
        with pytest.raises(TypeError, match=words):
            cf.AlignerConfig(**kw)
    import numpy as np

    cfg = cf.AlignerConfig(d_model=np.int64(32), n_heads=4, head_dims=[np.int32(8)], dropout=0)
    assert type(cfg.d_model) is int and cfg.head_dims == (8,) and type(cfg.dropout) is float


def test_loss_and_scores_inputs(al):
    with pytest.raises(ValueError, match="square"):
        cf.carzero_loss(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="differ in shape"):
        cf.carzero_loss(torch.randn(3, 3), torch.randn(4, 4))
    with pytest.raises(TypeError, match="floating-point logits, got t2i torch.int64"):
        cf.carzero_loss(torch.randn(3, 3), torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="img_tokens must be"):
        cf.zero_shot_scores(al, torch.randn(3, 16), torch.randn(2, 4, 16))


@pytest.mark.parametrize(
    ("img", "txt", "error", "words"),
    [
        ((2, 5, 16), (3, 0, 16), ValueError, "txt_tokens has 0 tokens"),
        ((2, 0, 16), (3, 4, 16), ValueError, "img_tokens has 0 tokens"),
        ((2, 5, 16), (3, 4, 12), ValueError, "txt_tokens has D = 12"),
        ((2, 5, 12), (3, 4, 16), ValueError, "img_tokens has D = 12"),
        ((2, 5, 16), (3, 16), ValueError, r"txt_tokens must be \(items, tokens, D\)"),
    ],
)
def test_both_directions_name_the_token_tensors(al, img, txt, error, words):
    """Checked before row 0 is taken as the other direction's queries: the error names the
    caller's tensor, not the "queries" of one direction (and no IndexError on 0 tokens)."""
    img_t, txt_t = torch.randn(img), torch.randn(txt)
    with pytest.raises(error, match=words):
        al.both_directions(img_t, txt_t)
    with pytest.raises(error, match=words):
        cf.zero_shot_scores(al, img_t, txt_t)
    with pytest.raises(TypeError, match="img_tokens are torch.float32 but txt_tokens are"):
        al.both_directions(torch.randn(2, 5, 16), torch.randn(3, 4, 16).double())



def test_both_directions_name_the_masks():
    al = make_aligner(CFG)
    img, txt = torch.randn(2, 5, 16), torch.randn(3, 4, 16)
    hidden = torch.zeros(3, 4, dtype=torch.bool)
    hidden[1] = True
    for kw, error, words in (({"img_mask": torch.zeros(2, 4, dtype=torch.bool)}, ValueError,
                              r"img_mask must be \(N, P\) = \(2, 5\)"),
                             ({"txt_mask": torch.zeros(3, 4)}, TypeError,
                              "txt_mask must be a bool tensor"),
                             ({"txt_mask": hidden}, ValueError,
                              r"txt_mask hides every token of item\(s\) \[1\]")):  # fmt: skip
        with pytest.raises(error, match=words):
            cf.zero_shot_scores(al, img, txt, **kw)


def test_parts_the_backends_would_bypass_are_refused():
    """The backends read the parts' weights and never call their forward: a forward hook
    (prune's recomputes `weight` in one) or a replaced layer is refused, not skipped."""
    from torch.nn.utils import prune

    al = make_aligner(CFG)
    mem, q = _ok()
    want = al(mem, q, backend="chunked")
    prune.l1_unstructured(al.mlp_head[0], "weight", amount=0.5)
    for backend in ("reference", "chunked"):
        with pytest.raises(RuntimeError, match="part mlp_head.0 has forward hooks.*prune.remove"):
            al(mem, q, backend=backend)
    prune.remove(al.mlp_head[0], "weight")  # pruning made permanent: the pruned weights run
    pruned = al(mem, q, backend="chunked")
    assert not torch.equal(pruned, want)
    al.decoder.layers[0].linear1 = torch.nn.Identity()
    with pytest.raises(TypeError, match=r"decoder.layers.0.linear1 is torch.nn.modules.linear."
                                        r"Identity, not torch.nn.Linear"):  # fmt: skip
        cf.zero_shot_scores(al, mem, mem[:2])


def test_settings_on_the_parts_that_the_backends_would_not_see_are_refused():
    """The backends take dropout and eps from the config and compute ReLU between the head's
    Linear layers: a part that says otherwise is refused by name (all backends, reference
    included), and `set_dropout` changes every site at once."""
    import copy

    from torch import nn

    base = make_aligner(CFG).train()
    mem, q = _ok()
    cases = (
        (lambda a: setattr(a.mlp_head[2], "p", 0.0), ValueError,
         r"mlp_head.2 has dropout 0.0, the config 0.1.*set_dropout"),
        (lambda a: setattr(a.decoder.layers[0].multihead_attn, "dropout", 0.0), ValueError,
         "decoder.layers.0.multihead_attn has dropout 0.0"),
        (lambda a: setattr(a.decoder_norm, "eps", 1e-6), ValueError,
         r"decoder_norm has eps 1e-06, the config 1e-05"),
        (lambda a: a.mlp_head.__setitem__(1, nn.GELU()), TypeError,
         "mlp_head.1 is torch.nn.modules.activation.GELU, not torch.nn.ReLU"),
        (lambda a: a.decoder.layers.append(copy.deepcopy(a.decoder.layers[0])), TypeError,
         "2 decoder layers and 4 head modules, its config 1 and 4"),
    )  # fmt: skip
    for change, error, words in cases:
        al = copy.deepcopy(base)
        change(al)
        for backend in ("reference", "chunked"):
            with pytest.raises(error, match=words):
                al(mem, q, backend=backend)
    al = copy.deepcopy(base).set_dropout(0.0)
    assert al.config.dropout == 0.0 and al.mlp_head[2].p == 0.0
    assert torch.equal(al(mem, q, backend="chunked"), al.eval()(mem, q, backend="chunked"))
    with pytest.raises(ValueError, match="dropout must be in"):
        al.set_dropout(1.0)
    with pytest.raises(TypeError, match="config must be an AlignerConfig, got dict"):
        cf.CrossAttentionAligner({"d_model": 16})


def test_a_part_shared_by_two_places_is_checked_under_each_name():
    """A tied layer (one module at two places) is no missing part: it runs, as the
    reference computes it."""
    al = make_aligner(cf.AlignerConfig(d_model=16, n_heads=2, n_layers=2, d_ffn=8,
                                       head_dims=(8,)))  # fmt: skip
    al.decoder.layers[1].multihead_attn = al.decoder.layers[0].multihead_attn
    al.decoder.layers[0].norm2 = al.decoder_norm
    mem, q = _ok()
    assert rel_err(al(mem, q, backend="chunked"), al(mem, q, backend="reference")) < 1e-5
