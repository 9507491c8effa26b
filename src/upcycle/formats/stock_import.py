"""Importing stock transformers MoE directories (Mixtral, Qwen2-MoE, Qwen3-MoE, FlexOlmo) back into
our model: the host dense class with MoE blocks, tensor by tensor (`native_items`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn

from upcycle.errors import UpcycleError
from upcycle.formats.stock import _layer
from upcycle.formats.targets import _COMMON
from upcycle.methods.plan import UpcyclePlan
from upcycle.methods.record import ConversionRecord

# The dense class each stock MoE class is imported into (the attention that class computes).
_IMPORT_HOST = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3", "flex_olmo": "olmo2"}


def is_stock_moe(path: str | Path) -> bool:
    f = Path(path) / "config.json"
    return f.is_file() and json.loads(f.read_text()).get("model_type") in _IMPORT_HOST


def stock_moe_layers(c: dict) -> list[int]:
    """Which layers of a stock checkpoint are MoE (the Qwen rule for Qwen2/3-MoE; all for Mixtral, FlexOlmo)."""
    L = c["num_hidden_layers"]
    if c["model_type"] in ("mixtral", "flex_olmo"):
        return list(range(L))
    skip, step = set(c.get("mlp_only_layers") or []), c.get("decoder_sparse_step") or 1
    return [i for i in range(L) if i not in skip and _num_experts(c) > 0 and (i + 1) % step == 0]


def _num_experts(c: dict) -> int:
    return c.get("num_experts") or c.get("num_local_experts") or 0  # Qwen3-MoE saves the alias


_STOCK_EXPERT = re.compile(r"(model\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$")


def native_items(
    items: Iterable[tuple[str, torch.Tensor]], c: dict, moe_layers: list[int]
) -> tuple[dict[str, torch.Tensor], dict]:
    """Our state dict and structure from a stock checkpoint's tensors (legacy or fused layout)."""
    names = dict(zip(("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj")))
    moe = set(moe_layers)
    out: dict[str, torch.Tensor] = {}
    per_expert: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    shared: dict[str, torch.Tensor] = {}
    for name, x in items:
        name = name.replace(".block_sparse_moe.", ".mlp.")
        m = _STOCK_EXPERT.match(name)
        if m:
            per_expert.setdefault((m.group(1), names.get(m.group(3), m.group(3))), {})[int(m.group(2))] = x
        elif name.endswith(".mlp.gate.weight") and _layer(name) in moe:
            out[name.replace(".mlp.gate.weight", ".mlp.router.weight")] = x
        elif name.endswith(".mlp.experts.gate_up_proj"):
            g, u = x.chunk(2, dim=1)
            out[name.replace("gate_up_proj", "gate_proj")] = g.contiguous()
            out[name.replace("gate_up_proj", "up_proj")] = u.contiguous()
        elif ".mlp.shared_expert" in name:
            shared[name] = x
        else:
            out[name] = x
    for (base, proj), experts in per_expert.items():
        out[f"{base}.mlp.experts.{proj}"] = torch.stack([experts[j] for j in range(len(experts))])
    structure: dict = {}
    if shared and any(t.any() for k, t in shared.items() if "down_proj" in k):
        size = next(t for k, t in shared.items() if k.endswith("shared_expert.down_proj.weight")).shape[1]
        structure["shared_expert"] = {"intermediate_size": size, "gated": True}
        for k, x in shared.items():
            out[k.replace(".mlp.shared_expert_gate.", ".mlp.shared_expert.gate.")] = x
    expert_F = c.get("moe_intermediate_size") or c["intermediate_size"]
    if expert_F != c["intermediate_size"]:
        structure["expert_intermediate_size"] = expert_F
    return out, structure


def host_config(c: dict):
    """The dense transformers config whose attention, norms and dense MLPs the stock MoE class has."""
    from transformers import AutoConfig

    host = _IMPORT_HOST[c["model_type"]]
    if host == "mistral" and not c.get("sliding_window"):
        host = "llama"  # Mistral without a sliding window is Llama
    kw = {k: c[k] for k in _COMMON if k in c and c[k] is not None}
    kw["intermediate_size"] = c["intermediate_size"]
    if "dtype" in c:
        kw["dtype"] = c["dtype"]
    if host == "mistral":
        kw["sliding_window"] = c["sliding_window"]
    if host in ("qwen3", "olmo2"):
        kw["attention_bias"] = c.get("attention_bias", False)
    if c.get("use_sliding_window"):
        raise UpcycleError(
            f"{c['model_type']} checkpoint uses a sliding window on some layers; importing that is not supported"
        )
    if host == "qwen2" and c.get("qkv_bias") is False:
        raise UpcycleError("qwen2_moe checkpoint without q/k/v biases: import it is not supported yet")
    return AutoConfig.for_model(host, **kw)


def import_stock(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Our model from a stock Mixtral / Qwen2-MoE / Qwen3-MoE directory (weights through safetensors only),
    with `config.upcycle` set, so it trains, evaluates, saves and exports like an upcycled model."""

    from upcycle.io.models import empty_model
    from upcycle.io.safetensors import weight_files
    from upcycle.methods.surgery import convert_structure

    path = Path(path)
    c = json.loads((path / "config.json").read_text())
    if c.get("model_type") not in _IMPORT_HOST:
        raise UpcycleError(
            f"{path / 'config.json'}: model_type {c.get('model_type')!r} is not a stock MoE class "
            f"upcycle imports ({', '.join(_IMPORT_HOST)})"
        )
    files = weight_files(path)
    if not files:
        raise UpcycleError(
            f"{path}: no safetensors weights (model.safetensors or an index); convert the "
            "checkpoint to safetensors first"
        )
    layers = stock_moe_layers(c)
    if not layers:
        raise UpcycleError(f"{path / 'config.json'}: no MoE layers (num_experts 0 or every layer in mlp_only_layers)")
    E = _num_experts(c)
    normalize = True if c["model_type"] == "mixtral" else bool(c.get("norm_topk_prob", False))
    plan = UpcyclePlan(
        num_experts=E,
        router="topk",
        top_k=c["num_experts_per_tok"],
        normalize=normalize,
        layers=tuple(layers) if len(layers) < c["num_hidden_layers"] else "all",
        aux_loss_coef=c.get("router_aux_loss_coef", 0.01) or 0.0,
    )
    from upcycle.io.safetensors import SafetensorsSource

    with SafetensorsSource(path) as src:
        state, structure = native_items(((k, src.read_copy(k)) for k in src.tensors), c, layers)
    config = host_config(c)
    stored = next(iter(state.values())).dtype
    model = empty_model(config, stored)
    convert_structure(model, plan, layers, structure=structure)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise UpcycleError(
            f"{path}: weights do not match a {c['model_type']} model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    model.tie_weights()
    model.config.upcycle = ConversionRecord(plan, layers, structure).config_entry()
    if dtype is not None:
        model.to(dtype)
    return model.eval()
