"""`CrossAttentionAligner`: CARZero's fusion module with pluggable execution backends."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from torch import Tensor, nn

from .checkpoint import drop_unused, extract_fusion_state_dict, infer_config
from .config import AlignerConfig
from .validation import check_inputs, check_token_pair
from .weights import AlignerWeights, LayerWeights


class _DecoderLayer(nn.Module):
    """Parameter holder with the original layer's used names (no self-attention, no norm1)."""

    def __init__(self, cfg: AlignerConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.multihead_attn = nn.MultiheadAttention(d, cfg.n_heads, dropout=cfg.dropout)
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.norm3 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.linear1 = nn.Linear(d, cfg.d_ffn)
        self.linear2 = nn.Linear(cfg.d_ffn, d)

    def weights(self) -> LayerWeights:
        a = self.multihead_attn
        return LayerWeights(
            self.norm2.weight, self.norm2.bias, a.in_proj_weight, a.in_proj_bias,
            a.out_proj.weight, a.out_proj.bias, self.norm3.weight, self.norm3.bias,
            self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias,
        )  # fmt: skip


class _Decoder(nn.Module):
    def __init__(self, cfg: AlignerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_DecoderLayer(cfg) for _ in range(cfg.n_layers))


def _mlp_head(cfg: AlignerConfig) -> nn.Sequential:
    mods: list[nn.Module] = []
    widths = (cfg.d_model, *cfg.head_dims)
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        mods += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(cfg.dropout)]
    mods.append(nn.Linear(widths[-1], 1))
    return nn.Sequential(*mods)  # Linear layers at indices 0, 3, 6, 9 as in CARZero


class CrossAttentionAligner(nn.Module):
    """CARZero's fusion module: every (memory item, query) pair → one logit.

    Each query runs through `n_layers` pre-norm cross-attention layers over one memory item's
    tokens, then `decoder_norm` and the MLP head. `named_parameters()` carries the original's
    used names, so weights load from CARZero checkpoints (`from_carzero_state_dict`).

    Args:
        config: the module's shape; CARZero's defaults when omitted.
        backend: "auto" (the best available for the inputs' device: "triton" on NVIDIA
            GPUs from sm_80 with Triton >= 3.4, "chunked" elsewhere), "reference"
            (materialises every pair like the original: the oracle), "chunked" (streams pair
            chunks through PyTorch ops) or "triton" (the same streaming on fused Triton
            kernels, forward and training).
        chunk_budget_bytes: memory the streaming backends may use for one chunk of pairs
            (None: chunked 32 MiB, or 120 MiB when gradients are needed, 512 MiB / 1 GiB on
            CUDA; triton 512 MiB, or 8 GiB when gradients are needed, at most 1/8 of the GPU).
    """

    def __init__(
        self,
        config: AlignerConfig | None = None,
        backend: str = "auto",
        *,
        chunk_budget_bytes: int | None = None,
    ) -> None:
        super().__init__()
        from .backends import check_backend_name
        from .backends.plan import check_budget

        if config is not None and not isinstance(config, AlignerConfig):
            raise TypeError(f"config must be an AlignerConfig, got {type(config).__name__} "
                            "(e.g. AlignerConfig(**values))")  # fmt: skip
        self.config = config if config is not None else AlignerConfig()
        self.backend = check_backend_name(backend)
        self.chunk_budget_bytes = chunk_budget_bytes
        check_budget(chunk_budget_bytes, 0)
        self.decoder = _Decoder(self.config)
        self.decoder_norm = nn.LayerNorm(self.config.d_model, eps=self.config.layer_norm_eps)
        self.mlp_head = _mlp_head(self.config)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """CARZero's initialisation: N(0, 0.02) for projections, zero biases, unit norms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.MultiheadAttention):
                nn.init.normal_(m.in_proj_weight, std=0.02)
                nn.init.zeros_(m.in_proj_bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def weights(self) -> AlignerWeights:
        """The parameters (not copies) in the layout the backends consume."""
        self._check_parts()
        head = tuple((m.weight, m.bias) for m in self.mlp_head if isinstance(m, nn.Linear))
        layers = tuple(layer.weights() for layer in self.decoder.layers)
        return AlignerWeights(self.decoder_norm.weight, self.decoder_norm.bias, layers, head)

    def set_dropout(self, p: float) -> CrossAttentionAligner:
        """Set the dropout probability of every site (the config's and every part's, which
        must agree: the backends apply `config.dropout` everywhere); returns the aligner."""
        self.config = dataclasses.replace(self.config, dropout=p)  # validated there
        for m in self.modules():
            if isinstance(m, nn.MultiheadAttention):
                m.dropout = self.config.dropout
            elif isinstance(m, nn.Dropout):
                m.p = self.config.dropout
        return self

    def _check_parts(self) -> None:
        """The backends read the submodules' weights and the config, and never call the
        submodules' forward: refuse what would then be skipped silently (forward hooks, e.g.
        torch.nn.utils.prune's or the old weight_norm's, which recompute `weight` in a
        pre-hook; a dropout or LayerNorm eps set on a part, not in the config; a layer added)
        or misread (a layer replaced by another kind, e.g. by quantize_dynamic, or an
        activation other than ReLU)."""
        cfg = self.config
        if len(self.decoder.layers) != cfg.n_layers or len(self.mlp_head) != 3 * len(
                cfg.head_dims) + 1:  # fmt: skip
            raise TypeError(f"the aligner has {len(self.decoder.layers)} decoder layers and "
                            f"{len(self.mlp_head)} head modules, its config {cfg.n_layers} "
                            f"and {3 * len(cfg.head_dims) + 1}: build an aligner of the new "
                            "shape (CrossAttentionAligner(AlignerConfig(...))) and load the "
                            "weights into it")  # fmt: skip
        kinds = {"decoder_norm": nn.LayerNorm}
        for i in range(cfg.n_layers):
            for part, kind in (("multihead_attn", nn.MultiheadAttention), ("norm2", nn.LayerNorm),
                               ("norm3", nn.LayerNorm), ("linear1", nn.Linear),
                               ("linear2", nn.Linear)):  # fmt: skip
                kinds[f"decoder.layers.{i}.{part}"] = kind
        for i in range(len(cfg.head_dims)):  # Linear, ReLU, Dropout, …, Linear
            kinds.update({f"mlp_head.{3 * i}": nn.Linear, f"mlp_head.{3 * i + 1}": nn.ReLU,
                          f"mlp_head.{3 * i + 2}": nn.Dropout})  # fmt: skip
        kinds[f"mlp_head.{3 * len(cfg.head_dims)}"] = nn.Linear
        # every name of a part shared by two places (a tied layer) is checked
        modules = dict(self.named_modules(remove_duplicate=False))
        for name, kind in kinds.items():
            part = modules.get(name)
            if not isinstance(part, kind):
                kind_of = type(part)
                got = "missing" if part is None else f"{kind_of.__module__}.{kind_of.__name__}"
                raise TypeError(f"aligner part {name} is {got}, not torch.nn.{kind.__name__}: the "
                                "backends compute the original's layer there from its "
                                "parameters (a replaced or quantised layer is not "
                                "supported)")  # fmt: skip
        for name, m in modules.items():
            rate = (m.dropout if isinstance(m, nn.MultiheadAttention)
                    else m.p if isinstance(m, nn.Dropout) else cfg.dropout)  # fmt: skip
            if rate != cfg.dropout:
                raise ValueError(f"aligner part {name} has dropout {rate}, the config "
                                 f"{cfg.dropout}: the backends apply config.dropout at every "
                                 "site of the original; set it with "
                                 "aligner.set_dropout(p)")  # fmt: skip
            if isinstance(m, nn.LayerNorm) and m.eps != cfg.layer_norm_eps:
                raise ValueError(f"aligner part {name} has eps {m.eps}, the config "
                                 f"{cfg.layer_norm_eps}: the backends use the config's; build "
                                 "the aligner with AlignerConfig(layer_norm_eps=...)")  # fmt: skip
            if name and (m._forward_hooks or m._forward_pre_hooks):
                raise RuntimeError(f"aligner part {name} has forward hooks (e.g. "
                                   "torch.nn.utils.prune's): the backends read the parts' "
                                   "weights and never call their forward, so the hooks would "
                                   "be skipped; hook the aligner itself (its forward: "
                                   "both_directions, alignment_logits and zero_shot_scores "
                                   "do not call it), or make pruning permanent with "
                                   "prune.remove")  # fmt: skip

    def _call_settings(self, backend: str | None, budget: int | None) -> tuple[str, int | None]:
        """Per-call overrides of the module's backend and chunk budget (checked here, also
        for `reference`, which has no chunks)."""
        from .backends.plan import check_budget

        check_budget(budget, 0)
        return (
            backend if backend is not None else self.backend,
            budget if budget is not None else self.chunk_budget_bytes,
        )

    def forward(
        self,
        memory: Tensor,
        queries: Tensor,
        memory_mask: Tensor | None = None,
        *,
        backend: str | None = None,
        chunk_budget_bytes: int | None = None,
    ) -> Tensor:
        """Logits of every pair.

        Args:
            memory: `(N, P, D)` tokens of N items (e.g. images: CLS + patches).
            queries: `(M, D)` one global vector per item of the other modality.
            memory_mask: optional bool `(N, P)`, True = ignore that token (not in the original,
                which attends to every token; an opt-in extra).
            backend: overrides the module's backend for this call.
            chunk_budget_bytes: overrides the module's chunk budget for this call.

        Returns:
            `(N, M)` logits in the inputs' dtype; `[n, m]` scores memory item n with query m.
        """
        from .backends import run_backend

        check_inputs(self.config, memory, queries, memory_mask, self.decoder_norm.weight)
        name, budget = self._call_settings(backend, chunk_budget_bytes)
        weights = self.weights().to(memory.dtype)
        return run_backend(
            name,
            weights,
            self.config,
            memory,
            queries,
            memory_mask,
            training=self.training,
            chunk_budget_bytes=budget,
        )

    def both_directions(
        self,
        img_tokens: Tensor,
        txt_tokens: Tensor,
        img_mask: Tensor | None = None,
        txt_mask: Tensor | None = None,
        *,
        backend: str | None = None,
        chunk_budget_bytes: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """CARZero's two directions, the globals taken from row 0 of each token tensor.

        Args:
            img_tokens: `(N, Pi, D)`; txt_tokens: `(M, Pt, D)`; optional bool masks
                `(N, Pi)`, `(M, Pt)` (True = ignore the token).

        Returns:
            (i2t `(N, M)`: images as memory, text globals as queries;
             t2i `(M, N)`: texts as memory, image globals as queries). The streaming backend
            runs both in one autograd node (one weight-gradient accumulation).
        """
        from .backends import run_backend_both

        check_token_pair(self.config, img_tokens, txt_tokens)
        param = self.decoder_norm.weight
        check_inputs(self.config, img_tokens, txt_tokens[:, 0], img_mask, param,
                     ("img_mask", "img_tokens"))  # fmt: skip
        check_inputs(self.config, txt_tokens, img_tokens[:, 0], txt_mask, param,
                     ("txt_mask", "txt_tokens"))  # fmt: skip
        name, budget = self._call_settings(backend, chunk_budget_bytes)
        return run_backend_both(
            name,
            self.weights().to(img_tokens.dtype),
            self.config,
            img_tokens,
            txt_tokens,
            img_mask,
            txt_mask,
            training=self.training,
            chunk_budget_bytes=budget,
        )

    @classmethod
    def from_carzero_state_dict(
        cls,
        state_dict: Mapping[str, object],
        config: AlignerConfig | None = None,
        **kwargs: object,
    ) -> CrossAttentionAligner:
        """Build an aligner from CARZero weights.

        Accepts the fusion module's own state dict, or a whole CARZero model / Lightning
        checkpoint state dict (then only the keys after `fusion_module.` are used). The
        original's unused parameters (`self_attn.*`, `norm1.*`, `logit_scale`, the
        `decoder.norm.*` alias of `decoder_norm`) are ignored; any missing, unknown or
        misshapen key raises a `KeyError`/`ValueError` naming it. Without `config` the sizes
        come from the shapes and the head count, which no shape holds, is CARZero's 4: pass a
        config for another (the aligner's own state dict does not record it either).
        """
        sd = extract_fusion_state_dict(state_dict)
        used = drop_unused(sd)
        cfg = config if config is not None else infer_config(used)
        model = cls(cfg, **kwargs)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(used))
        unknown = sorted(set(used) - set(expected))
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing key(s) {missing}")
            if unknown:
                parts.append(f"unknown key(s) {unknown}")
            raise KeyError(f"CARZero fusion state dict does not fit {cfg}: " + "; ".join(parts))
        for k, v in used.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise ValueError(
                    f"checkpoint key '{k}' has shape {tuple(v.shape)}, expected "
                    f"{tuple(expected[k].shape)} for {cfg}"
                )
            if not v.is_floating_point():
                raise TypeError(f"checkpoint key '{k}' has dtype {v.dtype}, expected floating")
        model.load_state_dict({k: v.float() for k, v in used.items()})
        return model
