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

from upcycle.adapters import MLPAdapter, adapter_for, stacks_for
from upcycle.errors import UpcycleError
from upcycle.methods.init import init_layer, plan_structure
from upcycle.methods.layers import select_layers
from upcycle.methods.plan import UpcyclePlan
from upcycle.methods.record import ConversionRecord
from upcycle.moe.block import MoEBlock, RouterConfig, SharedExpert
from upcycle.moe.experts import Experts

# MoE tensor names inside a block, and the dense projection they come from.
_EXPERT_PARAMS = (
    ("gate_proj", "gate", "weight"),
    ("up_proj", "up", "weight"),
    ("down_proj", "down", "weight"),
    ("gate_bias", "gate", "bias"),
    ("up_bias", "up", "bias"),
    ("down_bias", "down", "bias"),
)


def applied_plan(plan: UpcyclePlan, config, model: nn.Module | None = None) -> UpcyclePlan:
    """The plan as it applies to this model: the family's router where the plan names none (expert choice
    when any stack is an encoder or vision stack, top-k for decoder language models; UpcyclePlan.for_family).
    Saved plans are written resolved, so upcycle.json says what ran."""
    if plan.router is not None:
        return plan
    return plan.for_family(all(a.causal for a in stacks_for(config, model=model)))


def moe_layers(plan: UpcyclePlan, config) -> list[int] | dict[str, list[int]]:
    return layers_record(plan_stacks(plan, config))


def plan_stacks(
    plan: UpcyclePlan, config, model: nn.Module | None = None, keys=None, layers=None
) -> list[tuple[MLPAdapter, UpcyclePlan, list[int]]]:
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


def dense_mlp_keys(adapter: MLPAdapter, i: int) -> dict[str, str]:
    """{init.py tensor name ("gate", "up", "down", "gate_bias", ...): dense key} of layer i's MLP."""
    out = {}
    for _, proj_attr, kind in _EXPERT_PARAMS:
        proj = getattr(adapter, proj_attr)
        if proj is not None:
            out[proj_attr + ("_bias" if kind == "bias" else "")] = adapter.dense_key(i, proj, kind)
    return out


def upcycle_state_dict(
    dense: dict[str, torch.Tensor], plan: UpcyclePlan, config, data_rows: dict[int, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The MoE state dict of `plan` applied to a dense state dict (`init.init_layer` per layer, every stack
    of the model). Tensors that are not touched are shared with the input (no copy). `data_rows`: router
    rows of router_init=data (`init.data_router_rows`)."""
    out = dict(dense)
    for adapter, stack_plan, layers in plan_stacks(plan, config, keys=dense.keys()):
        _upcycle_stack(out, adapter, stack_plan, layers, getattr(config, adapter.act_key), data_rows)
    return out


def _upcycle_stack(
    out: dict,
    adapter: MLPAdapter,
    plan: UpcyclePlan,
    layers: list[int],
    act: str,
    data_rows: dict[int, torch.Tensor] | None = None,
) -> None:
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


def make_moe_block(
    config,
    plan: UpcyclePlan,
    adapter: MLPAdapter,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    structure: dict | None = None,
) -> MoEBlock:
    """An uninitialised MoE block. `structure` overrides the shape where it differs from a copy of the
    dense MLP: {"expert_intermediate_size": F, "shared_expert": {"intermediate_size": S, "gated": bool}}
    (models imported from stock checkpoints)."""
    _, D, Fd = adapter.dims(config)
    structure = {**plan_structure(plan, Fd), **(structure or {})}
    act = ACT2FN[getattr(config, adapter.act_key)]
    dropout = float(getattr(config, adapter.inner_dropout_key, 0.0) or 0.0) if adapter.inner_dropout_key else 0.0
    experts = Experts(
        plan.num_experts,
        D,
        structure.get("expert_intermediate_size") or Fd,
        act,
        gated=adapter.gate is not None,
        bias=adapter.has_bias(config),
        dtype=dtype,
        device=device,
        dropout=dropout,
    )
    shared = structure.get("shared_expert")
    shared_mlp = (
        SharedExpert(D, shared["intermediate_size"], act, shared.get("gated", True), dtype=dtype, device=device)
        if shared
        else None
    )
    return MoEBlock(experts, RouterConfig.from_plan(plan), shared_mlp)


def structure_of(model: nn.Module) -> dict:
    """The shape facts `make_moe_block` needs beyond the plan, read off a model's MoE blocks."""
    from upcycle.moe.block import moe_blocks

    blocks = moe_blocks(model)
    if not blocks:
        return {}
    b = blocks[0][1]
    _, _, Fd = adapter_for(model.config).dims(model.config)
    out: dict = {}
    if b.experts.intermediate_size != Fd:
        out["expert_intermediate_size"] = b.experts.intermediate_size
    if isinstance(b.shared_expert, SharedExpert):
        out["shared_expert"] = {
            "intermediate_size": b.shared_expert.intermediate_size,
            "gated": b.shared_expert.gate is not None,
        }
    return out


def convert_structure(
    model: nn.Module, plan: UpcyclePlan, layers: Iterable[int] | None = None, structure: dict | None = None
) -> list[int]:
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
def upcycle(model: nn.Module, plan: UpcyclePlan, inplace: bool = False, progress=None, tokenizer=None) -> nn.Module:
    """Sparse upcycling of a transformers model: the chosen MLPs become MoE blocks whose experts are
    initialised from the dense MLP (plan.expert_init, see init.py), routers new. Everything else is
    untouched. router_init=data runs the dense model on plan.router_prompts first (needs `tokenizer`)."""
    from upcycle.moe.block import moe_blocks

    if not isinstance(plan, UpcyclePlan):
        raise UpcycleError(
            f"upcycle: plan must be an UpcyclePlan (UpcyclePlan.from_dict reads a mapping), got {type(plan).__name__}"
        )
    if moe_blocks(model) or getattr(model.config, "upcycle", None):
        raise UpcycleError("upcycle: this model is upcycled already (it has MoE layers); give it the dense model")
    if not inplace:
        model = copy.deepcopy(model)
    config = model.config
    stacks = plan_stacks(plan, config, model=model)
    data_rows = None
    if plan.router_init == "data":
        from upcycle.errors import PlanError
        from upcycle.methods.routers import data_router_rows

        if tokenizer is None:
            raise PlanError("router_init=data runs the dense model on router_prompts: give a tokenizer")
        if len(stacks) != 1 or not stacks[0][0].causal:
            raise PlanError(
                "router_init=data: supported for decoder language models only (it runs the dense "
                "model on text prompts); use router_init normal for encoders, ViT and T5"
            )
        adapter, _, layers = stacks[0]
        was_training = model.training
        data_rows = data_router_rows(model.eval(), tokenizer, plan, layers, adapter)
        model.train(was_training)
    for adapter, stack_plan, layers in stacks:
        blocks = adapter.layer_list(model)
        act = getattr(config, adapter.act_key)
        for i in layers:
            prefix = adapter.mlp_prefix(i) + "."
            # initialised on the CPU, whatever the model's device: the same experts and routers everywhere
            moe_sd = {k: v.cpu() for k, v in adapter.dense_mlp_state(blocks[i], i).items()}
            _upcycle_stack(moe_sd, adapter, stack_plan, [i], act, data_rows)
            up = adapter.dense_up(blocks[i]).weight
            block = make_moe_block(config, stack_plan, adapter, up.dtype, up.device)
            block.load_state_dict({k[len(prefix) :]: v for k, v in moe_sd.items()}, strict=True)
            adapter.set_mlp(blocks[i], block)
            if progress is not None:
                progress.update(1)
    wire_padding_mask(model, [a for a, _, _ in stacks])
    model.config.upcycle = ConversionRecord(applied_plan(plan, config, model), layers_record(stacks)).config_entry()
    return model
