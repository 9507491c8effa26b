"""Dense model -> MoE model.

`upcycle_state_dict` is the pure part: (dense state dict, plan) -> MoE state dict. `convert_structure`
swaps the chosen MLP modules for empty MoE blocks of the right shape, and `upcycle` puts the two
together on a live transformers model.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn as nn
from transformers.activations import ACT2FN

from .adapters import MLPAdapter, adapter_for
from .experts import Experts
from .init import init_layer, plan_structure
from .layers import select_layers
from .moe import MoEBlock, RouterConfig, SharedExpert
from .plan import UpcyclePlan

# MoE tensor names inside a block, and the dense projection they come from.
_EXPERT_PARAMS = (("gate_proj", "gate", "weight"), ("up_proj", "up", "weight"), ("down_proj", "down", "weight"),
                  ("gate_bias", "gate", "bias"), ("up_bias", "up", "bias"), ("down_bias", "down", "bias"))


def moe_layers(plan: UpcyclePlan, config) -> list[int]:
    adapter = adapter_for(config)
    return select_layers(plan.layers, adapter.dims(config)[0])


def dense_mlp_keys(adapter: MLPAdapter, i: int) -> dict[str, str]:
    """{init.py tensor name ("gate", "up", "down", "gate_bias", ...): dense key} of layer i's MLP."""
    out = {}
    for _, proj_attr, kind in _EXPERT_PARAMS:
        proj = getattr(adapter, proj_attr)
        if proj is not None:
            out[proj_attr + ("_bias" if kind == "bias" else "")] = adapter.dense_key(i, proj, kind)
    return out


def upcycle_state_dict(dense: dict[str, torch.Tensor], plan: UpcyclePlan, config,
                       data_rows: dict[int, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The MoE state dict of `plan` applied to a dense state dict (`init.init_layer` per layer). Tensors
    that are not touched are shared with the input (no copy). `data_rows`: router rows of
    router_init=data (`init.data_router_rows`)."""
    adapter = adapter_for(config)
    layers = select_layers(plan.layers, adapter.dims(config)[0])
    act = getattr(config, adapter.act_key)
    out = dict(dense)
    for i in layers:
        prefix = adapter.mlp_prefix(i)
        mlp = {}
        for name, key in dense_mlp_keys(adapter, i).items():
            if key not in out:
                if name.endswith("_bias"):
                    continue
                raise KeyError(f"dense state dict has no {key!r}: is this checkpoint a {adapter.family}?")
            mlp[name] = out.pop(key)
        for k, v in init_layer(plan, i, mlp, act, data_rows).items():
            out[f"{prefix}.{k}"] = v
    return out


def make_moe_block(config, plan: UpcyclePlan, adapter: MLPAdapter, dtype: torch.dtype,
                   device: torch.device | str | None = None, structure: dict | None = None) -> MoEBlock:
    """An uninitialised MoE block. `structure` overrides the shape where it differs from a copy of the
    dense MLP: {"expert_intermediate_size": F, "shared_expert": {"intermediate_size": S, "gated": bool}}
    (models imported from stock checkpoints)."""
    _, D, Fd = adapter.dims(config)
    structure = {**plan_structure(plan, Fd), **(structure or {})}
    act = ACT2FN[getattr(config, adapter.act_key)]
    experts = Experts(plan.num_experts, D, structure.get("expert_intermediate_size") or Fd, act,
                      gated=adapter.gate is not None, bias=adapter.has_bias(config), dtype=dtype, device=device)
    shared = structure.get("shared_expert")
    shared_mlp = SharedExpert(D, shared["intermediate_size"], act, shared.get("gated", True), dtype=dtype,
                              device=device) if shared else None
    return MoEBlock(experts, RouterConfig.from_plan(plan), shared_mlp)


def structure_of(model: nn.Module) -> dict:
    """The shape facts `make_moe_block` needs beyond the plan, read off a model's MoE blocks."""
    from .moe import moe_blocks

    blocks = moe_blocks(model)
    if not blocks:
        return {}
    b = blocks[0][1]
    _, _, Fd = adapter_for(model.config).dims(model.config)
    out: dict = {}
    if b.experts.intermediate_size != Fd:
        out["expert_intermediate_size"] = b.experts.intermediate_size
    if isinstance(b.shared_expert, SharedExpert):
        out["shared_expert"] = {"intermediate_size": b.shared_expert.intermediate_size,
                                "gated": b.shared_expert.gate is not None}
    return out


def convert_structure(model: nn.Module, plan: UpcyclePlan, layers: Iterable[int] | None = None,
                      structure: dict | None = None) -> list[int]:
    """Replace the MLP of each chosen layer by an (uninitialised) MoE block, in place."""
    config = model.config
    adapter = adapter_for(config)
    layers = list(layers) if layers is not None else select_layers(plan.layers, adapter.dims(config)[0])
    blocks = adapter.layer_list(model)
    for i in layers:
        old = getattr(blocks[i], adapter.mlp)
        ref = getattr(old, adapter.up).weight if not isinstance(old, MoEBlock) else old.experts.up_proj
        setattr(blocks[i], adapter.mlp, make_moe_block(config, plan, adapter, ref.dtype, ref.device, structure))
    return layers


@torch.no_grad()
def upcycle(model: nn.Module, plan: UpcyclePlan, inplace: bool = False, progress=None,
            tokenizer=None) -> nn.Module:
    """Sparse upcycling of a transformers model: the chosen MLPs become MoE blocks whose experts are
    initialised from the dense MLP (plan.expert_init, see init.py), routers new. Everything else is
    untouched. router_init=data runs the dense model on plan.router_prompts first (needs `tokenizer`)."""
    if not inplace:
        model = copy.deepcopy(model)
    config = model.config
    adapter = adapter_for(config)
    layers = select_layers(plan.layers, adapter.dims(config)[0])
    blocks = adapter.layer_list(model)
    data_rows = None
    if plan.router_init == "data":
        from .errors import PlanError
        from .init import data_router_rows

        if tokenizer is None:
            raise PlanError("router_init=data runs the dense model on router_prompts: give a tokenizer")
        was_training = model.training
        data_rows = data_router_rows(model.eval(), tokenizer, plan, layers, adapter)
        model.train(was_training)
    for i in layers:
        prefix = adapter.mlp_prefix(i) + "."
        mlp = getattr(blocks[i], adapter.mlp)
        dense = {prefix + k: v for k, v in mlp.state_dict().items()}
        one = plan.replace(layers=[i])
        moe_sd = upcycle_state_dict(dense, one, config, data_rows)
        block = make_moe_block(config, plan, adapter, mlp.get_submodule(adapter.up).weight.dtype,
                               mlp.get_submodule(adapter.up).weight.device)
        block.load_state_dict({k[len(prefix):]: v for k, v in moe_sd.items()}, strict=True)
        setattr(blocks[i], adapter.mlp, block)
        if progress is not None:
            progress.update(1)
    model.config.upcycle = plan.to_dict() | {"moe_layers": layers}
    return model
