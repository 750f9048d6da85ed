"""Loading CARZero weights: names, prefixes, unused keys, clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import make_aligner, rel_err

import carzero_fast as cf

USED = [
    "decoder.layers.{i}.multihead_attn.in_proj_weight",
    "decoder.layers.{i}.multihead_attn.in_proj_bias",
    "decoder.layers.{i}.multihead_attn.out_proj.weight",
    "decoder.layers.{i}.multihead_attn.out_proj.bias",
    "decoder.layers.{i}.norm2.weight",
    "decoder.layers.{i}.norm2.bias",
    "decoder.layers.{i}.norm3.weight",
    "decoder.layers.{i}.norm3.bias",
    "decoder.layers.{i}.linear1.weight",
    "decoder.layers.{i}.linear1.bias",
    "decoder.layers.{i}.linear2.weight",
    "decoder.layers.{i}.linear2.bias",
]


def test_parameter_names_are_the_originals_used_names(golden_weights):
    al = cf.CrossAttentionAligner(cf.AlignerConfig(d_model=64, n_layers=2))
    expected = {k.format(i=i) for i in range(2) for k in USED}
    expected |= {"decoder_norm.weight", "decoder_norm.bias"}
    expected |= {f"mlp_head.{j}.{t}" for j in (0, 3, 6, 9) for t in ("weight", "bias")}
    assert {n for n, _ in al.named_parameters()} == expected
    # ... and exactly the golden file's keys less the original's unused ones
    unused = {k for k in golden_weights if "self_attn" in k or "norm1" in k}
    unused |= {"logit_scale", "decoder.norm.weight", "decoder.norm.bias"}
    assert expected == set(golden_weights) - unused


def test_round_trip(golden_weights):
    al = cf.CrossAttentionAligner.from_carzero_state_dict(golden_weights)
    again = cf.CrossAttentionAligner.from_carzero_state_dict(al.state_dict())
    for (n, a), (_, b) in zip(al.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    for k, v in al.state_dict().items():
        assert torch.equal(v, golden_weights[k])


@pytest.mark.parametrize(
    "prefix", ["fusion_module.", "CARZero.fusion_module.", "model.CARZero.fusion_module."]
)
def test_whole_model_and_lightning_checkpoints(golden, golden_weights, prefix):
    sd = {prefix + k: v for k, v in golden_weights.items()}
    sd["CARZero.img_encoder.cls_token"] = torch.zeros(1, 1, 64)  # other modules are skipped
    sd["CARZero.text_encoder.embeddings.word_embeddings.weight"] = torch.zeros(10, 64)
    for wrapped in (sd, {"state_dict": sd, "epoch": 3}):
        al = cf.CrossAttentionAligner.from_carzero_state_dict(wrapped).eval()
        with torch.no_grad():
            i2t = al(golden["inputs.img_tokens"], golden["inputs.txt_tokens"][:, 0])
        assert rel_err(i2t, golden["outputs.i2t"]) < 1e-5


def test_a_second_fusion_module_is_refused_not_mixed_in(golden_weights):
    """An EMA copy or a module whose name ends in "fusion_module" (aux_fusion_module) must not
    overwrite the model's own weights."""
    sd = {"CARZero.fusion_module." + k: v for k, v in golden_weights.items()}
    ema = {"ema.CARZero.fusion_module." + k: torch.zeros_like(v) for k, v in sd.items()}
    with pytest.raises(ValueError, match="more than one fusion module"):
        cf.CrossAttentionAligner.from_carzero_state_dict({**sd, **ema})
    aux = {"CARZero.aux_fusion_module.decoder_norm.weight": torch.zeros(64)}
    al = cf.CrossAttentionAligner.from_carzero_state_dict({**sd, **aux})
    assert torch.equal(al.decoder_norm.weight, golden_weights["decoder_norm.weight"])


def test_head_count_is_not_guessed_when_four_does_not_divide_d(golden_weights):
    al = cf.CrossAttentionAligner(cf.AlignerConfig(d_model=30, n_heads=3, n_layers=1))
    with pytest.raises(ValueError, match="4 heads do not divide d_model = 30"):
        cf.CrossAttentionAligner.from_carzero_state_dict(al.state_dict())
    again = cf.CrossAttentionAligner.from_carzero_state_dict(al.state_dict(), al.config)
    assert again.config.n_heads == 3


def test_missing_unknown_and_misshapen_keys(golden_weights):
    sd = dict(golden_weights)
    del sd["decoder.layers.1.linear2.bias"]
    with pytest.raises(KeyError, match="missing key.*decoder.layers.1.linear2.bias"):
        cf.CrossAttentionAligner.from_carzero_state_dict(sd)
    sd = dict(golden_weights, **{"decoder.layers.0.extra.weight": torch.zeros(3)})
    with pytest.raises(KeyError, match=r"unknown key.*decoder.layers.0.extra.weight"):
        cf.CrossAttentionAligner.from_carzero_state_dict(sd)
    sd = dict(golden_weights)
    sd["decoder.layers.0.norm3.weight"] = torch.zeros(63)
    with pytest.raises(ValueError, match=r"decoder.layers.0.norm3.weight' has shape \(63,\)"):
        cf.CrossAttentionAligner.from_carzero_state_dict(sd)
    with pytest.raises(KeyError, match="decoder_norm.weight"):
        cf.CrossAttentionAligner.from_carzero_state_dict({"foo": torch.zeros(1)})
    with pytest.raises(KeyError, match="missing key"):  # a config that does not fit
        cf.CrossAttentionAligner.from_carzero_state_dict(
            golden_weights, cf.AlignerConfig(d_model=64, n_layers=3)
        )


def test_inference_names_the_missing_keys(golden_weights):
    """The config is inferred from every key of a layer and of the head, so that a missing key
    is named instead of shrinking the inferred shape (or crashing the inference)."""
    load = cf.CrossAttentionAligner.from_carzero_state_dict
    no_in_proj = {k: v for k, v in golden_weights.items() if "in_proj_weight" not in k}
    with pytest.raises(KeyError, match=r"missing key.*layers.0.multihead_attn.in_proj_weight"
                                       r".*layers.1.multihead_attn.in_proj_weight"):  # fmt: skip
        load(no_in_proj)
    last = "decoder.layers.1.multihead_attn.in_proj_weight"
    with pytest.raises(KeyError, match=r"n_layers=2.*missing key\(s\) \['" + last + r"'\]"):
        load({k: v for k, v in golden_weights.items() if k != last})
    no_out = {k: v for k, v in golden_weights.items() if not k.startswith("mlp_head.9.")}
    with pytest.raises(KeyError, match=r"missing key\(s\) \['mlp_head.9.bias', 'mlp_head.9.w"):
        load(no_out)
    no_layers = {k: v for k, v in golden_weights.items() if not k.startswith("decoder.layers.")}
    with pytest.raises(KeyError, match="decoder.layers.0.linear1.weight' is missing"):
        load(no_layers)
    for key in ("decoder_norm.weight", "decoder.layers.0.linear1.weight"):  # not an IndexError
        with pytest.raises(ValueError, match=f"'{key}' is a 0-dim tensor"):
            load({**golden_weights, key: torch.tensor(1.0)})


def test_unused_keys_are_ignored_only_when_they_are_the_originals(golden_weights):
    sd = dict(golden_weights)
    sd["decoder.layers.0.norm4.weight"] = torch.zeros(64)
    with pytest.raises(KeyError, match="norm4"):
        cf.CrossAttentionAligner.from_carzero_state_dict(sd)


def test_default_config_state_dict_loads_back():
    al = make_aligner()
    sd = {"fusion_module." + k: v for k, v in al.state_dict().items()}
    sd["fusion_module.logit_scale"] = torch.tensor(2.0)
    back = cf.CrossAttentionAligner.from_carzero_state_dict(sd)
    assert back.config == cf.AlignerConfig()
    for k, v in al.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


def test_an_aligner_saved_inside_a_wrapper_loads(golden_weights):
    """DDP's `module.`, torch.compile's `_orig_mod.`, a DDP-wrapped loss module's
    `module.aligner.`: the one prefix before `decoder_norm.weight` is removed."""
    want = cf.CrossAttentionAligner.from_carzero_state_dict(golden_weights).state_dict()
    for prefix in ("module.", "_orig_mod.", "module.aligner."):
        sd = {prefix + k: v for k, v in golden_weights.items()}
        got = cf.CrossAttentionAligner.from_carzero_state_dict(sd).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
