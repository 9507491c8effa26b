"""Sparse upcycling tensor by tensor, for checkpoints larger than RAM.

`upcycle_items` lists the tensors of the upcycled model in the order of its state dict, each with a
producer that builds it when called, from a lazily read `SafetensorsSource`. A copied expert stack
(E, F, D) is an expanded view of the dense tensor, written E times from the same pages. Peak memory is
about one source tensor (two when casting) plus the writer's staging; noise initialisation builds the
(E, ...) stack as `init.init_experts` does. The expert and router values come from the same
initialisers as the in-memory path, so the outputs are equal.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch

from upcycle.errors import UpcycleError, nonfinite, warn_nonfinite
from upcycle.io.models import meta_model
from upcycle.io.safetensors import SafetensorsSource
from upcycle.io.writer import Item
from upcycle.methods.plan import UpcyclePlan


def resolve_dtype(config: Any, source: SafetensorsSource, dtype: torch.dtype | None) -> torch.dtype:
    """The output dtype: `dtype`, else what transformers' `from_pretrained(dtype="auto")` picks
    (config.dtype, then the index's metadata, then the first floating tensor of the first file)."""
    if dtype is not None:
        return dtype
    d = getattr(config, "dtype", None) or source.index_metadata.get("dtype") or source.first_float_dtype()
    d = getattr(torch, d) if isinstance(d, str) else d
    return d or torch.float32


def upcycle_items(
    source: SafetensorsSource, plan: UpcyclePlan, config: Any, dtype: torch.dtype | None = None
) -> tuple[list[Item], dict[str, str], list[int]]:
    """The native output of `plan` applied to `source`, as (items in state-dict order, {dropped tied
    key: key it is tied to}, MoE layer indices). Floating tensors are cast to the output dtype (see
    `resolve_dtype`) before experts and routers are built, as the in-memory path does."""
    from upcycle.adapters import adapter_for
    from upcycle.methods.init import init_experts, init_layer
    from upcycle.methods.routers import init_router
    from upcycle.methods.surgery import _EXPERT_PARAMS, convert_structure, dense_mlp_keys

    if plan.router_init == "data":
        raise UpcycleError(
            "router_init=data runs the dense model on router_prompts, which the streaming converter "
            "never loads; convert in memory (upcycle sparse --stream false)"
        )
    out_dtype = resolve_dtype(config, source, dtype)
    adapter = adapter_for(config)
    model = meta_model(config, out_dtype)
    layers = convert_structure(model, plan)
    _, D, Fd = adapter.dims(config)
    act = getattr(config, adapter.act_key)
    # copy and noise build each expert stack from its own dense tensor; every other initialiser (and a shared
    # expert) builds a layer's tensors together (`init.init_layer`), once, kept until all are written.
    per_tensor = plan.expert_init in ("copy", "noise") and plan.shared_mlp == "none"
    moe_keys: dict[str, tuple[int, int, str]] = {}  # output key -> (layer, index in _EXPERT_PARAMS, dense key)
    routers: dict[str, int] = {}
    layer_keys: dict[str, tuple[int, str]] = {}  # output key -> (layer, name inside the block)
    dense_keys: dict[int, dict[str, str]] = {}
    for i in layers:
        prefix = adapter.mlp_prefix(i)
        dense_keys[i] = dense_mlp_keys(adapter, i)
        for n, (moe_name, proj_attr, kind) in enumerate(_EXPERT_PARAMS):
            proj = getattr(adapter, proj_attr)
            if proj is not None:
                moe_keys[f"{prefix}.experts.{moe_name}"] = (i, n, adapter.dense_key(i, proj, kind))
        routers[f"{prefix}.router.weight"] = i
        if not per_tensor:
            for name in model.get_submodule(prefix).state_dict():
                layer_keys[f"{prefix}.{name}"] = (i, name)

    def load(key: str, dtype: torch.dtype) -> torch.Tensor:
        if source.info(key).dtype.is_floating_point and source.has_nonfinite(key):
            warn_nonfinite(key, str(source.info(key).file))
        t = source.read(key)
        return t.to(dtype) if t.dtype.is_floating_point else t

    def experts(i: int, n: int, key: str, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
        def produce() -> torch.Tensor:
            dense = load(key, dtype)
            if plan.expert_init == "noise" and plan.noise_std > 0:
                return init_experts(plan, i, dense, n)
            return dense.unsqueeze(0).expand(plan.num_experts, *dense.shape)  # = init_experts' copies, no copy

        return produce

    built: dict[int, dict[str, torch.Tensor]] = {}

    def from_layer(i: int, name: str, dtype: torch.dtype) -> torch.Tensor:
        if i not in built:  # read_copy: the dense tensors are used after the next read
            mlp = {n: source.read_copy(k).to(dtype) for n, k in dense_keys[i].items() if k in source}
            for n, t in mlp.items():
                nonfinite(dense_keys[i][n], t, str(source.info(dense_keys[i][n]).file))  # copies: a plain scan
            built[i] = init_layer(plan, i, mlp, act)
        t = built[i].pop(name)
        if not built[i]:
            del built[i]
        return t

    dense_shapes = {
        "gate": (Fd, D),
        "up": (Fd, D),
        "down": (D, Fd),
        "gate_bias": (Fd,),
        "up_bias": (Fd,),
        "down_bias": (D,),
    }
    for i in layers:
        for n, key in dense_keys[i].items():
            if key in source and source.info(key).shape != dense_shapes[n]:
                raise UpcycleError(
                    f"{source.info(key).file}: tensor {key!r} has shape {list(source.info(key).shape)}, "
                    f"but config.json implies {list(dense_shapes[n])}"
                )

    for key, info in source.tensors.items():
        if not info.dtype.is_floating_point and (key.endswith(".weight") or key.endswith(".bias")):
            raise UpcycleError(
                f"{info.file}: tensor {key} is {info.dtype}, not floating point; weights must be float: re-save the model"
            )
    items, tied, seen = [], {}, {}
    for name, p in model.state_dict(keep_vars=True).items():
        if id(p) in seen:
            tied[name] = seen[id(p)]
            continue
        seen[id(p)] = name
        shape, want = tuple(p.shape), p.dtype  # the model's dtype for it: what from_pretrained would load
        if name in layer_keys:
            i, inner = layer_keys[name]
            key = moe_keys.get(name, (0, 0, dense_keys[i]["up"]))[2]
            if key not in source:
                raise UpcycleError(
                    f"{source.dir}: the checkpoint has no tensor {key!r}, which a "
                    f"{config.model_type} model with this config.json needs; is it the right "
                    "config for these weights?"
                )
            produce = partial(from_layer, i, inner, want)
        elif name in routers:
            produce = partial(init_router, plan, routers[name], shape[1], want)
        else:
            key = moe_keys[name][2] if name in moe_keys else name
            if key not in source:
                raise UpcycleError(
                    f"{source.dir}: the checkpoint has no tensor {key!r}, which a "
                    f"{config.model_type} model with this config.json needs; is it the right "
                    "config for these weights?"
                )
            if name not in moe_keys and source.info(key).shape != shape:
                raise UpcycleError(
                    f"{source.info(key).file}: tensor {key!r} has shape {list(source.info(key).shape)}, "
                    f"but config.json implies {list(shape)}"
                )
            if not source.info(key).dtype.is_floating_point:
                want = source.info(key).dtype
            produce = experts(*moe_keys[name], want) if name in moe_keys else partial(load, key, want)
        items.append(Item(name, shape, want, produce))
    return items, tied, layers


def upcycled_structure(plan: UpcyclePlan, config: Any) -> dict:
    """The block shape facts native.save records (`surgery.structure_of`), from the plan."""
    from upcycle.adapters import adapter_for
    from upcycle.methods.init import plan_structure

    adapter = adapter_for(config)
    return plan_structure(plan, adapter.dims(config)[2])
