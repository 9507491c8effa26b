"""FLOPs accounting, one convention for every report.

Training FLOPs per token (`flops_per_token`) = 6 N + 12 L d_attn T, with N the parameters a token
passes through in matmuls, excluding the input-embedding lookup and including the output projection
(tied or not), MoE experts counted K times for top-k (min(C, E) for expert choice, E for soft) plus
the router, L attention layers, d_attn = heads * head_dim and T the sequence length. 6N is forward
(2N) + backward (4N) (Kaplan et al. 2020, §2.1; Hoffmann et al. 2022, App. F); 12 L d_attn T is the
attention score and value matmuls, forward and backward, without the causal saving (Chowdhery et al.
2022, PaLM, App. B).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from upcycle.moe.attention import moa_modules
from upcycle.moe.block import moe_blocks


def _attention_dims(config) -> tuple[int, int]:
    """(attention layers, heads * head_dim) of a transformers config."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, heads * head_dim


def active_params(model: nn.Module, dense: bool = False, seq_len: int | None = None) -> int:
    """Parameters a token passes through in matmuls: every parameter once, except the input embedding
    (a lookup), plus the output projection when it is tied to it; an MoE block's experts count
    experts_per_token / E of their size (expert choice: over groups of seq_len tokens when given), plus the
    router. dense=True: what the dense source model had (one expert per MoE block, no router)."""
    emb = getattr(model.get_input_embeddings(), "weight", None)  # ViT's patch embedding is a matmul: counted
    out = model.get_output_embeddings()
    expert_scale: dict[int, float] = {}
    routers: set[int] = set()
    for _, b in moe_blocks(model):
        E = b.num_experts
        k = 1.0 if dense else b.router_config.experts_per_token(E, seq_len)
        for p in b.experts.parameters():
            expert_scale[id(p)] = k / E
        for p in b.router.parameters():
            routers.add(id(p))
    for _, a in moa_modules(model):  # BAM attention experts: a token uses all N (soft router)
        for p in a.per_expert_parameters():  # dense: one expert's share (shared K/V count whole)
            expert_scale[id(p)] = 1.0 / a.num_experts if dense else 1.0
        routers.add(id(a.router.weight))
    n = 0.0
    for p in {id(p): p for p in model.parameters()}.values():
        if p is emb or (dense and id(p) in routers):
            continue
        n += p.numel() * expert_scale.get(id(p), 1.0)
    if out is not None and out.weight is emb:
        n += emb.numel()
    return int(round(n))


def flops_per_token(model: nn.Module, seq_len: int, dense: bool = False) -> int:
    """Training (forward + backward) FLOPs per token: 6 N_active + 12 L d_attn T (module docstring).
    For a config without weights: flops_per_token(model_on_meta(config, plan), seq_len)."""
    L, d_attn = _attention_dims(model.config)
    moa = [a.num_experts for _, a in moa_modules(model)] if not dense else []  # N x the score/value matmuls
    return 6 * active_params(model, dense, seq_len) + 12 * d_attn * seq_len * (L + sum(moa) - len(moa))


def model_on_meta(config, plan=None) -> nn.Module:
    """A model of this config (upcycled by plan) with no storage: for counting parameters and FLOPs."""
    from upcycle.io.models import meta_model
    from upcycle.methods.surgery import convert_structure

    model = meta_model(config)
    if plan is not None:
        with torch.device("meta"):
            convert_structure(model, plan)
    return model
