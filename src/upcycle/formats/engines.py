"""Whether an exported stock checkpoint computes exactly what our model computes in each engine people
serve and evaluate with, and why not where it does not.

What each engine does with a target was read in its source and measured in the engines lane
(`pytest -m engines`, figures in results/engines/): transformers 5 and lm-eval (which loads through
transformers 5) take every exact target; transformers 4.57 and vLLM read the per-expert ("legacy")
tensors; llama.cpp's converter and kernels put fixed limits on Qwen2-MoE and Qwen3-MoE:

    qwen2moe   every layer needs experts and a shared expert (its converter has no name for a dense
               MLP), the output head must be a tensor of its own (no tied embeddings), and the top-k
               weights are never renormalised, whatever `norm_topk_prob` says
    qwen3moe   every layer needs experts, and the top-k weights are always renormalised
    FlexOlmo   no converter class
"""

from __future__ import annotations

from typing import Any

from upcycle.formats.targets import TARGETS, _cfg, why_not
from upcycle.methods.plan import UpcyclePlan

ENGINES = ("transformers 5", "transformers 4.57", "vLLM", "llama.cpp", "lm-eval")


def engine_reasons(
    target: str,
    config: Any,
    plan: UpcyclePlan,
    moe_layers: list[int],
    structure: dict | None = None,
    layout: str = "legacy",
) -> dict[str, list[str]]:
    """{engine: every reason the export to `target` is not exact there} (an empty list: exact)."""
    base = why_not(target, config, plan, moe_layers, structure)
    if base:
        return {e: ["not exportable exactly: " + "; ".join(base)] for e in ENGINES}
    c = _cfg(config)
    L = c["num_hidden_layers"]
    dense = [i for i in range(L) if i not in set(moe_layers)]
    shared = (structure or {}).get("shared_expert")
    out: dict[str, list[str]] = {e: [] for e in ENGINES}
    if layout == "fused":
        out["transformers 4.57"].append("reads per-expert tensors only (export with --layout legacy)")
        out["vLLM"].append("its native loaders read per-expert tensors; only --layout legacy is proven")
        out["llama.cpp"].append("only --layout legacy is proven")
    cpp = out["llama.cpp"]
    if target == "qwen2_moe":
        if dense:
            cpp.append(f"its Qwen2-MoE converter refuses dense layers ({len(dense)} here; upcycle with --layers all)")
        if plan.normalize_weights:
            cpp.append("its qwen2moe graph never renormalises the top-k weights (norm_topk_prob is ignored)")
        if c.get("tie_word_embeddings"):
            cpp.append("its qwen2moe model needs an output head of its own; this model ties it to the embeddings")
        if shared and not shared.get("gated", True):
            cpp.append(
                "an ungated shared expert is written with a zero gate, and llama.cpp's sigmoid (silu(g)/g) is 0/0 there"
            )
    elif target == "qwen3_moe":
        if dense:
            cpp.append(f"its Qwen3-MoE model needs experts in every layer ({len(dense)} dense here)")
        if not plan.normalize_weights:
            cpp.append("its qwen3moe graph always renormalises the top-k weights (norm_topk_prob is ignored)")
    elif target == "flex_olmo":
        cpp.append("its converter has no FlexOlmo class")
    return out


def explain_lines(
    config: Any, plan: UpcyclePlan, moe_layers: list[int], structure: dict | None = None, layout: str = "legacy"
) -> list[str]:
    """The `upcycle export --explain` report: per target, whether it fits, then per engine."""
    lines = []
    for name, t in TARGETS.items():
        base = why_not(name, config, plan, moe_layers, structure)
        lines.append(f"{name:10s} {t.architecture:22s} " + ("exact" if not base else "no: " + "; ".join(base)))
        if base:
            continue
        for engine, reasons in engine_reasons(name, config, plan, moe_layers, structure, layout).items():
            lines.append(f"    {engine:18s} " + ("exact" if not reasons else "not exact: " + "; ".join(reasons)))
    return lines
