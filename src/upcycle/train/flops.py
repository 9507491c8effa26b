"""FLOPs accounting, one convention for every report.

Training FLOPs per token of a decoder (`flops_per_token`) = 6 N + 12 L d_attn T, with N the parameters a
token passes through in matmuls, excluding the input-embedding lookup and including the output projection
(tied or not), MoE experts counted K times for top-k (min(C, E) for expert choice, E for soft) plus the
router, L attention layers, d_attn = heads * head_dim and T the sequence length. 6N is forward (2N) +
backward (4N) (Kaplan et al. 2020, §2.1; Hoffmann et al. 2022, App. F); 12 L d_attn T is the attention
score and value matmuls, forward and backward, without the causal saving (Chowdhery et al. 2022, PaLM,
App. B). N counts norms and biases too (under 0.1% of a decoder's parameters).

Training FLOPs of one input of an encoder or a ViT (`flops_per_example`), T tokens that all attend to each
other (a ViT image: its patches and CLS) = 6 T N_w + 6 N_head + 12 L d_attn T^2: the same attention term,
T times (an encoder has no mask, so there is no causal saving to leave out), N_w only the weights of
matmuls (linear and convolution weights, the experts' stacked projections by their share, the routers; no
biases, norms or added embeddings), and N_head the weights of a head that runs once per input (a
classifier on the CLS token). Expert choice routes each input as one group of T tokens: E ceil(C T / E) / T
experts per token, 40/17 at C = 2, E = 8, T = 17.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from upcycle.moe.attention import MoAttention, moa_modules
from upcycle.moe.block import moe_blocks
from upcycle.moe.experts import Experts


def _attention_dims(config) -> tuple[int, int]:
    """(attention layers, heads * head_dim) of a transformers config."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, heads * head_dim


def _shares(model: nn.Module, dense: bool, seq_len: int | None) -> dict[int, float]:
    """The share of a parameter (by id) that a token passes through, where it is not all of it: an MoE
    block's experts experts_per_token / E (expert choice: over groups of seq_len tokens when given), BAM's
    attention experts all N (soft router). dense=True: what the dense source model had, one expert's share
    (shared K/V count whole) and no routers."""
    share: dict[int, float] = {}
    for _, b in moe_blocks(model):
        E = b.num_experts
        k = 1.0 if dense else b.router_config.experts_per_token(E, seq_len)
        share.update((id(p), k / E) for p in b.experts.parameters())
        if dense:
            share.update((id(p), 0.0) for p in b.router.parameters())
    for _, a in moa_modules(model):
        share.update((id(p), 1.0 / a.num_experts if dense else 1.0) for p in a.per_expert_parameters())
        if dense:
            share[id(a.router.weight)] = 0.0
    return share


def _matmul_weights(model: nn.Module) -> set[int]:
    """Ids of the weights that multiply activations: linear and convolution weights, the stacked
    projections of experts and attention experts (not their biases or norms)."""
    out: set[int] = set()
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            out.add(id(m.weight))
        elif isinstance(m, (Experts, MoAttention)):
            out.update(id(p) for name, p in m.named_parameters(recurse=False) if name.endswith("_proj"))
    return out


def active_params(model: nn.Module, dense: bool = False, seq_len: int | None = None, embedding: bool = False) -> int:
    """Parameters a token passes through in matmuls: every parameter once, except the input embedding
    (a lookup), plus the output projection when it is tied to it; an MoE block's experts count
    experts_per_token / E of their size (expert choice: over groups of seq_len tokens when given), plus the
    router. dense=True: what the dense source model had (one expert per MoE block, no router).
    embedding=True: the input embedding counts too, once, as model cards count active parameters (what
    `upcycle sparse` prints)."""
    share = _shares(model, dense, seq_len)
    emb = getattr(model.get_input_embeddings(), "weight", None)  # ViT's patch embedding is a matmul: counted
    out = model.get_output_embeddings()
    n = 0.0
    for p in model.parameters():
        if p is emb and not embedding:
            continue
        n += p.numel() * share.get(id(p), 1.0)
    if out is not None and out.weight is emb and not embedding:
        n += emb.numel()
    return int(round(n))


def flops_per_token(model: nn.Module, seq_len: int, dense: bool = False) -> int:
    """Training (forward + backward) FLOPs per token: 6 N_active + 12 L d_attn T (module docstring).
    For a config without weights: flops_per_token(model_on_meta(config, plan), seq_len)."""
    L, d_attn = _attention_dims(model.config)
    moa = [a.num_experts for _, a in moa_modules(model)] if not dense else []  # N x the score/value matmuls
    return 6 * active_params(model, dense, seq_len) + 12 * d_attn * seq_len * (L + sum(moa) - len(moa))


def flops_per_example(model: nn.Module, tokens: int, dense: bool = False, head: nn.Module | None = None) -> int:
    """Training FLOPs of one input of `tokens` tokens with no attention mask (an encoder's sequence; a ViT
    image, patches and CLS): 6 T N_w + 6 N_head + 12 L d_attn T^2 (module docstring). head: the module that
    runs once per input rather than per token (ViT's classifier). dense=True: the dense model this one came
    from."""
    share = _shares(model, dense, tokens)
    weights = _matmul_weights(model)
    in_head = {id(p) for p in head.parameters()} if head is not None else set()
    n = 0.0
    for p in model.parameters():
        if id(p) in weights and id(p) not in in_head:
            n += p.numel() * share.get(id(p), 1.0)
    n_head = sum(p.numel() for p in head.parameters() if id(p) in weights) if head is not None else 0
    L, d_attn = _attention_dims(model.config)
    return int(round(6 * tokens * n + 6 * n_head + 12 * L * d_attn * tokens * tokens))


def model_on_meta(config, plan=None) -> nn.Module:
    """A model of this config (upcycled by plan) with no storage: for counting parameters and FLOPs."""
    from upcycle.io.models import meta_model
    from upcycle.methods.surgery import convert_structure

    model = meta_model(config)
    if plan is not None:
        with torch.device("meta"):
            convert_structure(model, plan)
    return model
