"""Dense model -> MoE model.

`upcycle_state_dict` is the pure part: (dense state dict, plan) -> MoE state dict. `convert_structure`
swaps the chosen MLP modules for empty MoE blocks of the right shape, and `upcycle` puts the two
together on a live transformers model.
"""

from __future__ import annotations

import copy
import math
from typing import Iterable

import torch
import torch.nn as nn
from transformers.activations import ACT2FN

from .adapters import MLPAdapter, adapter_for, stacks_for
from .experts import Experts
from .layers import select_layers
from .moe import MoEBlock, RouterConfig, SharedExpert
from .plan import UpcyclePlan

# MoE tensor names inside a block, and the dense projection they come from.
_EXPERT_PARAMS = (("gate_proj", "gate", "weight"), ("up_proj", "up", "weight"), ("down_proj", "down", "weight"),
                  ("gate_bias", "gate", "bias"), ("up_bias", "up", "bias"), ("down_bias", "down", "bias"))


def moe_layers(plan: UpcyclePlan, config) -> list[int] | dict[str, list[int]]:
    return layers_record(plan_stacks(plan, config))


def plan_stacks(plan: UpcyclePlan, config, model: nn.Module | None = None, keys=None,
                layers=None) -> list[tuple[MLPAdapter, UpcyclePlan, list[int]]]:
    """(adapter, plan of that stack, MoE layer indices) for every stack of the model: one for decoders,
    encoders and ViT, encoder then decoder for T5 (the layer selection applies to each stack). `layers`:
    given indices instead of the plan's (a list for one stack, {stack: list} for several). Expert choice
    in a causal stack raises PlanError (`UpcyclePlan.for_stack`)."""
    out = []
    for a in stacks_for(config, model=model, keys=keys):
        given = layers.get(a.stack, []) if isinstance(layers, dict) else layers
        picked = list(given) if given is not None else select_layers(plan.layers, getattr(config, a.layers_key))
        out.append((a, plan.for_stack(a), picked))
    return out


def layers_record(stacks) -> list[int] | dict[str, list[int]]:
    """`moe_layers` as written in config.json / upcycle.json: a list, or {stack: list} for T5."""
    if len(stacks) == 1:
        return list(stacks[0][2])
    return {a.stack: list(ls) for a, _, ls in stacks}


def _generator(seed: int, layer: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + layer) * 16 + stream)


def init_router(plan: UpcyclePlan, layer: int, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Router weight (E, D): normal(0, std) by default (flaxformer / the paper), zeros, or a centred
    uniform with the same std."""
    E, std = plan.num_experts, plan.router_std
    if plan.router_init == "zeros":
        w = torch.zeros(E, hidden_size)
    elif plan.router_init == "normal":
        w = torch.randn(E, hidden_size, generator=_generator(plan.seed, layer, 0)) * std
    else:  # uniform with standard deviation std
        a = std * math.sqrt(3.0)
        w = (torch.rand(E, hidden_size, generator=_generator(plan.seed, layer, 0)) * 2 - 1) * a
    return w.to(dtype)


def init_experts(plan: UpcyclePlan, layer: int, dense: torch.Tensor, which: int) -> torch.Tensor:
    """(E, ...) expert tensor from one dense tensor: copies, or copies plus independent noise."""
    out = dense.unsqueeze(0).expand(plan.num_experts, *dense.shape).clone()
    if plan.expert_init == "noise" and plan.noise_std > 0:
        g = _generator(plan.seed, layer, 1 + which)
        noise = torch.randn(out.shape, generator=g, dtype=torch.float32) * plan.noise_std
        out = (out.float() + noise).to(dense.dtype)
    return out


def upcycle_state_dict(dense: dict[str, torch.Tensor], plan: UpcyclePlan, config) -> dict[str, torch.Tensor]:
    """The MoE state dict of `plan` applied to a dense state dict. Tensors that are not touched are
    shared with the input (no copy)."""
    out = dict(dense)
    for adapter, stack_plan, layers in plan_stacks(plan, config, keys=dense.keys()):
        _upcycle_stack(out, adapter, stack_plan, layers)
    return out


def _upcycle_stack(out: dict, adapter: MLPAdapter, plan: UpcyclePlan, layers: list[int]) -> None:
    for i in layers:
        prefix = adapter.mlp_prefix(i)
        for n, (moe_name, proj_attr, kind) in enumerate(_EXPERT_PARAMS):
            proj = getattr(adapter, proj_attr)
            if proj is None:
                continue
            key = adapter.dense_key(i, proj, kind)
            if key not in out:
                if kind == "bias":
                    continue
                raise KeyError(f"dense state dict has no {key!r}: is this checkpoint a {adapter.family}?")
            out[f"{prefix}.experts.{moe_name}"] = init_experts(plan, i, out.pop(key), n)
        ref = out[f"{prefix}.experts.up_proj"]
        out[f"{prefix}.router.weight"] = init_router(plan, i, ref.shape[-1], ref.dtype)


def make_moe_block(config, plan: UpcyclePlan, adapter: MLPAdapter, dtype: torch.dtype,
                   device: torch.device | str | None = None, structure: dict | None = None) -> MoEBlock:
    """An uninitialised MoE block. `structure` overrides the shape where it differs from a copy of the
    dense MLP: {"expert_intermediate_size": F, "shared_expert": {"intermediate_size": S, "gated": bool}}
    (models imported from stock checkpoints)."""
    _, D, Fd = adapter.dims(config)
    structure = structure or {}
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
    """Replace the MLP of each chosen layer by an (uninitialised) MoE block, in place. Returns the MoE
    layers (`layers_record`: a list, or {stack: list} for T5)."""
    config = model.config
    stacks = plan_stacks(plan, config, model=model, layers=layers)
    for adapter, stack_plan, picked in stacks:
        blocks = adapter.layer_list(model)
        for i in picked:
            old = adapter.get_mlp(blocks[i])
            ref = old.experts.up_proj if isinstance(old, MoEBlock) else adapter.dense_up(blocks[i]).weight
            adapter.set_mlp(blocks[i], make_moe_block(config, stack_plan, adapter, ref.dtype, ref.device, structure))
    wire_padding_mask(model, [a for a, _, _ in stacks])
    return layers_record(stacks)


class _PaddingMask:
    """Forward pre-hook on the module that receives a stack's attention mask (BertModel, T5Stack): hands
    the (batch, sequence) mask to that module's MoE blocks for the call, and a forward hook takes it back,
    so no mask outlives its forward pass. Holds no module reference: deep copies stay independent."""

    def __init__(self, arg: str):
        self.arg = arg
        self.index: int | None = None

    def _position(self, module: nn.Module) -> int | None:
        if self.index is None:
            import inspect

            names = list(inspect.signature(module.forward).parameters)
            self.index = names.index(self.arg) if self.arg in names else -1
        return self.index if self.index >= 0 else None

    def __call__(self, module, args, kwargs):
        mask = kwargs.get(self.arg)
        pos = self._position(module)
        if mask is None and pos is not None and pos < len(args):
            mask = args[pos]
        if mask is not None and (not torch.is_tensor(mask) or mask.dim() != 2):
            mask = None  # only (batch, sequence) masks of 0/1 describe padding
        _set_masks(module, mask)


def _set_masks(module: nn.Module, mask) -> None:
    for m in module.modules():
        if isinstance(m, MoEBlock):
            m.token_mask = mask


def _clear_masks(module, args, kwargs, output):
    _set_masks(module, None)


def wire_padding_mask(model: nn.Module, adapters: list[MLPAdapter]) -> None:
    """Hooks that pass each stack's padding mask to its MoE blocks (once per module)."""
    for a in adapters:
        if a.mask_module is None:
            continue
        module = model.get_submodule(a.mask_module)
        if getattr(module, "_upcycle_padding_mask", False):
            continue
        module.register_forward_pre_hook(_PaddingMask(a.mask_arg), with_kwargs=True)
        module.register_forward_hook(_clear_masks, with_kwargs=True, always_call=True)
        module._upcycle_padding_mask = True


@torch.no_grad()
def upcycle(model: nn.Module, plan: UpcyclePlan, inplace: bool = False, progress=None) -> nn.Module:
    """Sparse upcycling of a transformers model: the chosen MLPs become MoE blocks whose experts are
    initialised from the dense MLP, routers new. Everything else is untouched."""
    if not inplace:
        model = copy.deepcopy(model)
    config = model.config
    stacks = plan_stacks(plan, config, model=model)
    for adapter, stack_plan, layers in stacks:
        blocks = adapter.layer_list(model)
        for i in layers:
            prefix = adapter.mlp_prefix(i) + "."
            dense = adapter.dense_mlp_state(blocks[i], i)
            moe_sd = dict(dense)
            _upcycle_stack(moe_sd, adapter, stack_plan, [i])
            up = adapter.dense_up(blocks[i]).weight
            block = make_moe_block(config, stack_plan, adapter, up.dtype, up.device)
            block.load_state_dict({k[len(prefix):]: v for k, v in moe_sd.items()}, strict=True)
            adapter.set_mlp(blocks[i], block)
            if progress is not None:
                progress.update(1)
    wire_padding_mask(model, [a for a, _, _ in stacks])
    model.config.upcycle = plan.to_dict() | {"moe_layers": layers_record(stacks)}
    return model
