"""The stock transformers MoE targets as data rows (Mixtral, Qwen2-MoE, Qwen3-MoE, FlexOlmo), and
`why_not`: every reason a plan and model cannot be written as one exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from upcycle.errors import UpcycleError
from upcycle.methods.plan import UpcyclePlan

LAYOUTS = ("legacy", "fused")

# Width of the null shared expert written to Qwen2-MoE for a model without one (3 * D parameters a layer).
NULL_SHARED_EXPERT_WIDTH = 1


# Config fields every target shares with the Llama-family source config.
_COMMON = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


@dataclass(frozen=True)
class Target:
    name: str  # our name, = the stock model_type
    architecture: str
    sources: tuple[str, ...]  # source model_types whose attention the target reproduces
    every_layer: bool  # the class makes every layer MoE
    always_normalizes: bool  # the class always renormalises the top-k weights
    experts_prefix: str  # where a layer's MoE block lives, legacy keys
    router_key: str  # router weight name inside the block, legacy keys
    expert_names: tuple[str, str, str]  # (gate, up, down) per-expert names, legacy keys
    zero_qkv_bias: bool = False  # write zero q/k/v biases for sources without them
    shared_expert: bool = False  # the class always builds a (sigmoid-gated) shared expert


TARGETS: dict[str, Target] = {
    "mixtral": Target(
        "mixtral",
        "MixtralForCausalLM",
        ("llama", "mistral"),
        True,
        True,
        "block_sparse_moe",
        "gate.weight",
        ("w1", "w3", "w2"),
    ),
    "qwen2_moe": Target(
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        ("llama", "mistral", "qwen2"),
        False,
        False,
        "mlp",
        "gate.weight",
        ("gate_proj", "up_proj", "down_proj"),
        zero_qkv_bias=True,
        shared_expert=True,
    ),
    "qwen3_moe": Target(
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        ("qwen3",),
        False,
        False,
        "mlp",
        "gate.weight",
        ("gate_proj", "up_proj", "down_proj"),
    ),
    "flex_olmo": Target(
        "flex_olmo",
        "FlexOlmoForCausalLM",
        ("olmo2",),
        True,
        False,
        "mlp",
        "gate.weight",
        ("gate_proj", "up_proj", "down_proj"),
    ),
    "olmoe": Target(
        "olmoe", "OlmoeForCausalLM", (), True, False, "mlp", "gate.weight", ("gate_proj", "up_proj", "down_proj")
    ),
}


def _cfg(config: Any) -> dict:
    return config if isinstance(config, dict) else config.to_dict()


def why_not(
    target: str, config: Any, plan: UpcyclePlan, moe_layers: list[int], structure: dict | None = None
) -> list[str]:
    """Every reason the stock class `target` cannot represent this upcycled model exactly (empty: it can)."""
    if target not in TARGETS:
        raise UpcycleError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
    t, c = TARGETS[target], _cfg(config)
    src, L = c.get("model_type"), c.get("num_hidden_layers")
    reasons = []
    if target == "olmoe":
        reasons.append(
            "OLMoE's block is pre-norm with RMSNorm over the full q and k projections; no dense "
            "transformers class computes that attention (OLMo has no q/k norm and a parameter-free "
            "LayerNorm, OLMo-2/3 normalise after each sublayer), so no upcycled model maps onto it "
            "exactly; OLMo-2 sources export exactly to flex_olmo"
        )
        return reasons
    if src not in t.sources:
        why = {
            "qwen2": "Qwen2 attention has q/k/v biases, which Mixtral lacks",
            "qwen3": "Qwen3 attention normalises q and k per head, which only Qwen3-MoE does",
            "olmo2": "OLMo-2 normalises q, k and each sublayer's output, which only FlexOlmo does",
        }.get(src, "its attention differs")
        reasons.append(
            f"{t.architecture} reproduces the attention of {', '.join(t.sources)} models, not {src!r} ({why})"
        )
    if plan.router not in (None, "topk"):  # None: a decoder's default, top-k
        reasons.append(
            f"router {plan.router!r}: stock decoder classes route tokens to their top-k experts "
            "only (expert choice and soft routing have no stock class)"
        )
    if plan.capacity_factor is not None:
        reasons.append(f"capacity_factor {plan.capacity_factor}: stock classes never drop tokens")
    normalize = plan.normalize_weights
    if t.always_normalizes and not normalize:
        reasons.append(
            f"{t.architecture} always renormalises the top-k weights; this plan does not "
            "(use --to qwen2_moe, whose norm_topk_prob can be off)"
        )
    if t.every_layer and sorted(moe_layers) != list(range(L)):
        dense = [i for i in range(L) if i not in moe_layers]
        reasons.append(
            f"{t.architecture} makes every layer MoE; layers {_short(dense)} are dense here "
            "(upcycle with --layers all, or export --to qwen2_moe, which interleaves)"
        )
    if c.get("mlp_bias"):
        reasons.append("the MLPs have biases; stock MoE experts have none")
    if c.get("attention_bias") and src not in ("qwen3", "olmo2"):
        reasons.append("attention_bias: the source's o_proj has a bias, which the stock attention lacks")
    if (structure or {}).get("shared_expert") and not t.shared_expert:
        reasons.append(f"the MoE layers have a shared expert; {t.architecture} has none (use --to qwen2_moe)")
    if src == "mistral" and c.get("sliding_window") and target != "mixtral":
        reasons.append(
            f"sliding_window {c['sliding_window']}: {t.architecture} slides on alternate layers "
            "only; Mixtral slides on all, like Mistral"
        )
    return reasons


def _short(xs: list[int]) -> str:
    return ", ".join(map(str, xs)) if len(xs) <= 8 else f"{', '.join(map(str, xs[:8]))}, ... ({len(xs)} layers)"


def check_exportable(
    target: str, config: Any, plan: UpcyclePlan, moe_layers: list[int], structure: dict | None = None
) -> None:
    reasons = why_not(target, config, plan, moe_layers, structure)
    if reasons:
        arch = TARGETS[target].architecture
        raise UpcycleError(f"cannot export to {arch} exactly: " + "; ".join(reasons))
