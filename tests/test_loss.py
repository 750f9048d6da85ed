"""CARZero's loss and zero-shot scores."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_aligner, rel_err

import carzero_fast as cf


def test_loss_is_symmetric_infonce_on_both_matrices():
    g = torch.Generator().manual_seed(0)
    i2t, t2i = torch.randn(5, 5, generator=g), torch.randn(5, 5, generator=g)
    t = torch.arange(5)

    def sym(s):
        return (F.cross_entropy(s, t) + F.cross_entropy(s.t(), t)) / 2

    assert rel_err(cf.carzero_loss(i2t, t2i), sym(i2t) + sym(t2i)) < 1e-7
    # the diagonal is the positive pair: raising it lowers the loss
    assert cf.carzero_loss(i2t + 5 * torch.eye(5), t2i) < cf.carzero_loss(i2t, t2i)


def test_zero_shot_scores_average_both_directions():
    cfg = cf.AlignerConfig(d_model=16, n_heads=2, n_layers=1, d_ffn=8, head_dims=(8,))
    al = make_aligner(cfg)
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(4, 6, 16, generator=g), torch.randn(3, 5, 16, generator=g)
    with torch.no_grad():
        zs = cf.zero_shot_scores(al, img, txt)
        i2t = al(img, txt[:, 0])
        t2i = al(txt, img[:, 0])
    assert zs.shape == (4, 3)
    assert rel_err(zs, (i2t + t2i.t()) / 2) < 1e-6


def test_loss_keeps_float64_and_refuses_empty_or_non_square_logits():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert cf.carzero_loss(a, b).dtype == torch.float64
    assert torch.autograd.gradcheck(cf.carzero_loss, (a, b))
    assert cf.carzero_loss(a.bfloat16(), b.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="at least one pair"):
        cf.carzero_loss(torch.empty(0, 0), torch.empty(0, 0))
    with pytest.raises(ValueError, match=r"square \(B, B\) logits .* got i2t \(3, 4\)"):
        cf.carzero_loss(torch.zeros(3, 4), torch.zeros(4, 3))
