"""Reading CARZero fusion-module state dicts: prefixes, unused keys, config inference."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from .config import AlignerConfig

# Parameters the original module stores but never uses in its forward pass.
_UNUSED = re.compile(
    r"^(decoder\.layers\.\d+\.self_attn\..+|decoder\.layers\.\d+\.norm1\.(weight|bias)"
    r"|logit_scale|decoder\.norm\.(weight|bias))$"
)


def extract_fusion_state_dict(state_dict: Mapping[str, object]) -> dict[str, Tensor]:
    """The fusion module's own keys, from its state dict or from a whole model/Lightning one.

    A whole CARZero model stores the module under `...fusion_module.` (behind any Lightning
    prefix such as `CARZero.`); when such keys exist only they are used, and they must share
    one prefix (a second copy, e.g. an EMA's, is refused rather than mixed in).
    A Lightning checkpoint dict (with a `state_dict` entry) is unwrapped first. Without a
    fusion module, an aligner saved inside a wrapper (`module.` of DDP, `_orig_mod.` of
    torch.compile, `module.aligner.` of a DDP-wrapped `DistributedCARZeroLoss`) is found by
    its one `decoder_norm.weight` and taken with that prefix removed.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    # `fusion_module.` as a whole name: at the start or after a ".", not in "aux_fusion_module."
    where = {k: m.end() for k in state_dict if (m := re.search(r"(^|\.)fusion_module\.", k))}
    prefixes = sorted({k[:end] for k, end in where.items()})
    if len(prefixes) > 1:
        raise ValueError(f"the state dict holds more than one fusion module ({prefixes}): "
                         "pass the one to load on its own")  # fmt: skip
    if not where and "decoder_norm.weight" not in state_dict:
        anchors = [k for k in state_dict if k.endswith(".decoder_norm.weight")]
        if len(anchors) == 1:  # a wrapper's prefix
            prefix = anchors[0][: -len("decoder_norm.weight")]
            where = {k: len(prefix) for k in state_dict if k.startswith(prefix)}
    out = {k[end:]: state_dict[k] for k, end in where.items()} if where else dict(state_dict)
    for k, v in out.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"checkpoint key '{k}' holds a {type(v).__name__}, not a tensor")
    return out


def drop_unused(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The keys the computation uses: the original's unused parameters removed."""
    return {k: v for k, v in state_dict.items() if not _UNUSED.match(k)}


def infer_config(state_dict: Mapping[str, Tensor], dropout: float = 0.1) -> AlignerConfig:
    """An `AlignerConfig` from tensor shapes. The head count is not in any shape: CARZero's
    is 4, which is assumed here (a d_model it does not divide raises; pass a config)."""
    sizes = []
    for key in ("decoder_norm.weight", "decoder.layers.0.linear1.weight"):
        if key not in state_dict:
            raise KeyError(f"cannot infer the aligner config: checkpoint key {key!r} is missing")
        if state_dict[key].dim() == 0:
            raise ValueError(f"cannot infer the aligner config: checkpoint key {key!r} is a "
                             "0-dim tensor, not a weight (misshapen)")  # fmt: skip
        sizes.append(state_dict[key].shape[0])
    d_model, d_ffn = sizes
    # n_layers from every used key of a layer (layer 0 has one: its linear1.weight), so that a
    # layer missing one key, even the last layer's in_proj_weight, is still counted and its
    # missing key named by the loader
    layer_ids = {
        int(m.group(1)) for k in state_dict if (m := re.match(r"^decoder\.layers\.(\d+)\.", k))
    }
    n_layers = max(layer_ids) + 1
    head_dims = _head_dims(state_dict)
    if d_model % 4:
        raise ValueError(f"cannot infer the aligner config: CARZero's 4 heads do not divide "
                         f"d_model = {d_model}; pass an AlignerConfig")  # fmt: skip
    n_heads = 4
    return AlignerConfig(
        d_model=d_model,
        n_heads=n_heads,
        n_layers=n_layers,
        d_ffn=d_ffn,
        head_dims=head_dims,
        dropout=dropout,
    )


def _head_dims(state_dict: Mapping[str, Tensor]) -> tuple[int, ...]:
    """The MLP head's hidden widths: the output width of each `mlp_head.{i}` Linear (from its
    weight, or its bias when the weight is missing), less the last one when that maps to one
    logit. A head whose last Linear is missing entirely thus keeps all the widths it shows, and
    the loader names the missing layer's keys (instead of misreading the last hidden layer as
    the output layer and reporting its shape)."""
    widths: dict[int, int] = {}
    for k, v in state_dict.items():
        m = re.match(r"^mlp_head\.(\d+)\.(weight|bias)$", k)
        if m and v.dim() >= 1:
            widths.setdefault(int(m.group(1)), v.shape[0])
    if not widths:
        raise KeyError("cannot infer the aligner config: no 'mlp_head.{i}.weight' keys")
    outs = [widths[i] for i in sorted(widths)]
    return tuple(outs[:-1] if outs[-1] == 1 else outs)
