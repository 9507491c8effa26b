"""Mixture of attention experts (BAM, Zhang et al. 2024, arXiv 2408.08274, §3.4) with a soft router.

Every token uses every attention expert; a per-token router g(h) = softmax(W_r h) over the N experts
(fp32) weights their outputs:

    MoA(H)_t = sum_j g_j(h_t) * MHA_j(H)_t,     MHA_j(H) = concat_i(head_i^j) W_o^j

kv="experts": expert j keeps its model's Wq, Wk, Wv, Wo (and q/k norms), so j has its own keys and values.
kv="shared":  Wk, Wv are shared by all experts (one set of keys and values); Wq, Wo stay per expert.

How it runs: the N experts' heads are stacked as extra heads of ONE attention call, so the host
architecture's attention kernels (eager, sdpa, ...), attention mask, RoPE function and KV cache objects
work unchanged (`cache.update(k, v, layer_idx)` stores N * kv_heads heads per layer for
kv="experts", kv_heads for kv="shared"). GQA keeps its grouping because each query head is placed
next to the query heads that read the same key head:

    experts  query heads in expert-major order (j, h), keys (j, h_kv): query (j, h) reads key
             (j, h // g), i.e. stacked index // g with g = heads / kv_heads
    shared   query heads in head-major order (h, j), keys (h_kv): query (h, j) reads key h // g,
             i.e. stacked index // (N g)

The router weights scale each expert's head outputs before one matmul with the experts' stacked
output projections [W_o^1 ... W_o^N], which is the sum above. The module takes the place of the host's
attention module (same call signature: hidden_states, position_embeddings, attention_mask,
cache, **kwargs; returns (output, None); transformers before 5.24 named the cache `past_key_values`),
so the decoder layer needs no change, whether it is
sequential (Llama) or parallel (Cohere: y = x + Attn(LN x) + MLP(LN x), the BAM block).

Parameters (names in the state dict, under the layer's attention prefix):
    router.weight (N, D)   q_proj (N, H*hd, D)   k_proj, v_proj (N, Hkv*hd, D) | (Hkv*hd, D) shared
    o_proj (N, D, H*hd)    q_bias / k_bias / v_bias / o_bias when the host has attention biases
    q_norms.j / k_norms.j  copies of the host's per-head q/k norm modules (k_norms.0 only when shared)
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from upcycle.errors import UpcycleError

KV_MODES = ("experts", "shared")


def _rope_function(template: nn.Module):
    """The host architecture's own `apply_rotary_pos_emb` (Cohere rotates interleaved pairs, Llama halves)."""
    fn = getattr(sys.modules.get(type(template).__module__), "apply_rotary_pos_emb", None)
    if fn is None:
        raise UpcycleError(
            f"{type(template).__name__}: its module has no apply_rotary_pos_emb; mixture of "
            "attention supports RoPE decoders (Llama, Mistral, Qwen2/3, Cohere)"
        )
    return fn


class MoAttention(nn.Module):
    """N attention experts with a soft per-token router; built empty from a template host attention
    module (its shapes, norms, RoPE and attention implementation) and filled from a state dict."""

    def __init__(self, template: nn.Module, num_experts: int, kv: str = "experts"):
        super().__init__()
        if kv not in KV_MODES:
            raise UpcycleError(f"kv must be one of {', '.join(KV_MODES)}, got {kv!r}")
        if num_experts < 1:
            raise UpcycleError(f"num_experts must be at least 1, got {num_experts}")
        q, k, o = template.q_proj, template.k_proj, template.o_proj
        hd = template.head_dim
        self.num_experts, self.kv, self.head_dim = num_experts, kv, hd
        self.hidden_size = q.in_features
        self.num_heads = q.out_features // hd
        self.num_kv_heads = k.out_features // hd
        g = self.num_heads // self.num_kv_heads
        # What the host's attention kernels read off the module.
        self.config = template.config
        self.layer_idx = template.layer_idx
        self.scaling = template.scaling
        self.is_causal = True
        self.attention_dropout = getattr(template, "attention_dropout", 0.0)
        self.sliding_window = getattr(template, "sliding_window", None)
        self.num_key_value_groups = g if kv == "experts" else g * num_experts
        self._rope = _rope_function(template)

        N, D, H, Hkv = num_experts, self.hidden_size, self.num_heads, self.num_kv_heads
        w = dict(dtype=q.weight.dtype, device=q.weight.device)
        kv_shape = (N, Hkv * hd, D) if kv == "experts" else (Hkv * hd, D)
        # Uninitialised on purpose: always filled from dense models or a checkpoint.
        self.router = nn.Linear(D, N, bias=False, **w)
        self.q_proj = nn.Parameter(torch.empty(N, H * hd, D, **w))
        self.k_proj = nn.Parameter(torch.empty(kv_shape, **w))
        self.v_proj = nn.Parameter(torch.empty(kv_shape, **w))
        self.o_proj = nn.Parameter(torch.empty(N, D, H * hd, **w))
        has_bias = q.bias is not None
        self.q_bias = nn.Parameter(torch.empty(N, H * hd, **w)) if has_bias else None
        self.k_bias = nn.Parameter(torch.empty(kv_shape[:-1], **w)) if has_bias else None
        self.v_bias = nn.Parameter(torch.empty(kv_shape[:-1], **w)) if has_bias else None
        self.o_bias = nn.Parameter(torch.empty(N, D, **w)) if o.bias is not None else None
        qn, kn = getattr(template, "q_norm", None), getattr(template, "k_norm", None)
        for norm in (qn, kn):
            if (
                norm is not None
                and getattr(norm, "weight", None) is not None
                and norm.weight.dim() == 1
                and norm.weight.numel() != hd
            ):
                raise UpcycleError(
                    f"{type(template).__name__}: q/k norms over all heads at once (OLMo-2 style) "
                    "are not supported by mixture of attention; per-head norms are"
                )
        self.q_norms = nn.ModuleList(copy.deepcopy(qn) for _ in range(N)) if qn is not None else None
        self.k_norms = (
            nn.ModuleList(copy.deepcopy(kn) for _ in range(N if kv == "experts" else 1)) if kn is not None else None
        )
        self.last_probs: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, kv={self.kv}, heads={self.num_heads}, "
            f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"
        )

    def per_expert_parameters(self) -> list[nn.Parameter]:
        """Parameters stacked over the N experts (not the router, not shared K/V)."""
        names = ["q_proj", "o_proj", "q_bias", "o_bias"] + (
            ["k_proj", "v_proj", "k_bias", "v_bias"] if self.kv == "experts" else []
        )
        out = [getattr(self, n) for n in names if getattr(self, n) is not None]
        if self.q_norms is not None:
            out += list(self.q_norms.parameters())
        if self.k_norms is not None and self.kv == "experts":
            out += list(self.k_norms.parameters())
        return out

    def router_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(..., N) soft routing weights, computed in fp32."""
        from upcycle.moe.routing import router_logits

        return torch.softmax(router_logits(x, self.router.weight), dim=-1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        *lead, D = hidden_states.shape
        N, H, Hkv, hd = self.num_experts, self.num_heads, self.num_kv_heads, self.head_dim
        x = hidden_states
        q = F.linear(
            x, self.q_proj.reshape(N * H * hd, D), None if self.q_bias is None else self.q_bias.reshape(-1)
        ).view(*lead, N, H, hd)
        if self.kv == "experts":
            k = F.linear(
                x, self.k_proj.reshape(N * Hkv * hd, D), None if self.k_bias is None else self.k_bias.reshape(-1)
            ).view(*lead, N, Hkv, hd)
            v = F.linear(
                x, self.v_proj.reshape(N * Hkv * hd, D), None if self.v_bias is None else self.v_bias.reshape(-1)
            ).view(*lead, N * Hkv, hd)
        else:
            k = F.linear(x, self.k_proj, self.k_bias).view(*lead, 1, Hkv, hd)
            v = F.linear(x, self.v_proj, self.v_bias).view(*lead, Hkv, hd)
        if self.q_norms is not None:
            q = torch.stack([self.q_norms[j](q[..., j, :, :]) for j in range(N)], dim=-3)
        if self.k_norms is not None:
            k = torch.stack([self.k_norms[j](k[..., j, :, :]) for j in range(k.shape[-3])], dim=-3)
        if self.kv == "experts":
            q = q.reshape(*lead, N * H, hd)  # expert-major heads (j, h)
        else:
            q = q.transpose(-3, -2).reshape(*lead, H * N, hd)  # head-major heads (h, j)
        k = k.reshape(*lead, -1, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        cos, sin = position_embeddings
        q, k = self._rope(q, k, cos, sin)
        cache = cache if cache is not None else past_key_values  # the keyword's name before transformers 5.24
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, _eager_attention)
        extra = {"sliding_window": self.sliding_window} if self.sliding_window is not None else {}
        out, _ = attend(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **extra,
            **kwargs,
        )  # (B, T, heads, hd)
        probs = self.router_probs(x)  # (B, T, N) fp32
        self.last_probs = probs
        p = probs.to(out.dtype)
        if self.kv == "experts":
            out = out.reshape(*lead, N, H * hd) * p.unsqueeze(-1)
        else:
            out = (out.reshape(*lead, H, N, hd) * p.unsqueeze(-1).unsqueeze(-3)).transpose(-3, -2)
        wo = self.o_proj.permute(1, 0, 2).reshape(D, N * H * hd)  # [W_o^1 ... W_o^N]
        y = F.linear(out.reshape(*lead, N * H * hd), wo)
        if self.o_bias is not None:
            y = y + p @ self.o_bias
        return y, None


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention with GQA by repetition (used when the host names no other kernel)."""
    g = module.num_key_value_groups
    key = key.repeat_interleave(g, dim=1)
    value = value.repeat_interleave(g, dim=1)
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        w = w + attention_mask[:, :, :, : key.shape[-2]]
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = F.dropout(w, p=dropout, training=module.training)
    return torch.matmul(w, value).transpose(1, 2).contiguous(), w


def moa_modules(model: nn.Module) -> list[tuple[str, MoAttention]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoAttention)]
