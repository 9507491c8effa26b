"""The optimizer: AdamW with decay on matrices and experts and none on norms and biases, its state
keyed by parameter name (so it survives wrapping and resharding), and the carry-over of a dense run's
moments to the MoE parameters it was upcycled into (`carry_over_optimizer_state`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from upcycle.errors import UpcycleError
from upcycle.train.config import TrainConfig


def named_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on parameters of 2 or more dimensions, none on norms and biases. Each group
    lists parameter names (a tied parameter once)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(name)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _adamw_impl(params) -> dict:
    """The fused AdamW kernel where it applies (plain CPU/CUDA tensors): one pass over each tensor and no
    per-step temporaries (a dense SmolLM2 CPU step: 4.25 s fused vs 7.13 s foreach,
    results/train_speed_cpu.md). Sharded (FSDP2 DTensor) parameters keep the per-tensor loop."""
    from torch.distributed.tensor import DTensor

    params = list(params)
    if params and all(p.device.type in ("cpu", "cuda") and not isinstance(p, DTensor) for p in params):
        return {"fused": True}
    return {"foreach": False}


def build_optimizer(model: nn.Module, config: TrainConfig, names_model: nn.Module | None = None):
    """AdamW over `model`'s parameters; names come from `names_model` (the unwrapped model)."""
    names_model = names_model or model
    params = dict(model.named_parameters())
    groups = named_param_groups(names_model, config.weight_decay)
    opt = torch.optim.AdamW(
        [{"params": [params[n] for n in g["params"]], "weight_decay": g["weight_decay"]} for g in groups],
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        **_adamw_impl(params.values()),
    )
    opt._upcycle_names = [g["params"] for g in groups]  # parameter names per group, for name-keyed states
    return opt


def named_optimizer_state(opt) -> dict:
    """torch's index-keyed optimizer state dict with parameter names as keys instead."""
    sd = opt.state_dict()
    names = [n for g in opt._upcycle_names for n in g]
    index = {i: names[i] for g in sd["param_groups"] for i in g["params"]}
    groups = [dict(g, params=[index[i] for i in g["params"]]) for g in sd["param_groups"]]
    return {"state": {index[i]: s for i, s in sd["state"].items()}, "param_groups": groups}


def load_named_optimizer_state(opt, named: dict, config: TrainConfig | None = None) -> None:
    """Load a name-keyed state (from `named_optimizer_state` or `carry_over_optimizer_state`). Names the
    state lacks start fresh; hyperparameters come from `config` when given."""
    ours = [n for g in opt._upcycle_names for n in g]
    index = {n: i for i, n in enumerate(ours)}
    unknown = sorted(set(named["state"]) - set(index))
    if unknown:
        raise UpcycleError(f"optimizer state has parameters this model lacks: {unknown[:3]}")
    current = opt.state_dict()["param_groups"]
    opts = named["param_groups"][0] if named.get("param_groups") else {}
    groups = []
    for g, cur in zip(opt._upcycle_names, current):
        merged = {k: v for k, v in opts.items() if k not in ("params", "weight_decay")}
        groups.append(dict(cur, **merged, params=[index[n] for n in g]))
    # Copies: torch's load_state_dict keeps the given tensors, and steps would then change the caller's dict.
    state = {
        index[n]: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for n, s in named["state"].items()
    }
    opt.load_state_dict({"state": state, "param_groups": groups})
    if config is not None:
        for g, wd in zip(opt.param_groups, (config.weight_decay, 0.0)):
            g.update(betas=(config.beta1, config.beta2), eps=config.eps, weight_decay=wd)


@torch.no_grad()
def carry_over_optimizer_state(dense_state: dict, dense_model: nn.Module, moe_model: nn.Module, plan=None) -> dict:
    """A dense run's AdamW state, mapped onto the upcycled model (Sparse Upcycling's vision recipe).

    Every moment tensor goes through the same operator as its parameter: `upcycle_state_dict` with the
    plan's experts as copies, so expert e of exp_avg / exp_avg_sq is the dense MLP's; parameters that
    are not upcycled keep their state as is (same step count). Routers are new parameters: zero
    moments and step 0, which is exactly Adam's state before its first update (a carried step count
    would switch off the bias correction and make the router's first updates ~3x too large).
    `dense_state` is name-keyed (`optimizer.pt` of an `upcycle train` checkpoint) or torch's
    index-keyed `optimizer.state_dict()` of `build_optimizer(dense_model)`. Returns a name-keyed state.
    """
    from upcycle.methods.plan import UpcyclePlan
    from upcycle.methods.surgery import upcycle_state_dict

    if plan is None:
        info = getattr(moe_model.config, "upcycle", None)
        if not info:
            raise UpcycleError("the MoE model has no plan in its config; pass plan=")
        plan = UpcyclePlan.from_dict({k: v for k, v in info.items() if k != "moe_layers"})
    state = dense_state["state"]
    if state and all(isinstance(k, int) for k in state):  # torch's index-keyed form
        names = [n for g in named_param_groups(dense_model, 0.0) for n in g["params"]]
        index = {i: names[i] for g in dense_state["param_groups"] for i in g["params"]}
        state = {index[i]: s for i, s in state.items()}
    dense_names = {n for n, _ in dense_model.named_parameters()}
    unknown = sorted(set(state) - dense_names)
    if unknown:
        raise UpcycleError(
            f"the dense optimizer state has parameters the dense model lacks: {unknown[:3]}; "
            "is it the state of this model?"
        )
    if plan.expert_init in ("partition", "granular", "qwen2") or plan.shared_mlp != "none":
        what = f"expert_init={plan.expert_init}" if plan.shared_mlp == "none" else f"shared_mlp={plan.shared_mlp}"
        raise UpcycleError(
            f"optimizer carry-over copies the dense MLP's AdamW moments onto every expert; {what} "
            "slices, rescales or splits the MLP, so those moments would not belong to the new "
            "parameters. Carry-over works with expert_init copy, noise and drop; otherwise start "
            "from a fresh optimizer (the paper's language recipe)"
        )
    moment_plan = plan.replace(expert_init="copy", router_init="zeros")
    keys = sorted({k for s in state.values() for k, v in s.items() if torch.is_tensor(v) and v.dim() > 0})
    mapped: dict[str, dict[str, torch.Tensor]] = {}
    for k in keys:
        for name, t in upcycle_state_dict(
            {n: s[k] for n, s in state.items() if k in s}, moment_plan, moe_model.config
        ).items():
            mapped.setdefault(name, {})[k] = t.clone()
    if plan.expert_init == "drop":
        _zero_dropped_moments(mapped, plan, moe_model.config)
    steps = {n: s["step"] for n, s in state.items() if "step" in s}
    step = next(iter(steps.values())) if steps else torch.tensor(0.0)
    moe_params = dict(moe_model.named_parameters())
    out: dict[str, dict] = {}
    for name, s in mapped.items():
        if name not in moe_params:
            continue
        is_router = name.endswith(".router.weight") and name not in state
        s["step"] = torch.zeros_like(step) if is_router else (steps.get(name, step)).clone()
        out[name] = s
    groups = [dict(g, params=[n for n in g["params"]]) for g in named_param_groups(moe_model, 0.0)]
    opts = {k: v for k, v in (dense_state.get("param_groups") or [{}])[0].items() if k not in ("params",)}
    return {"state": out, "param_groups": [dict(opts, params=g["params"]) for g in groups]}


def _zero_dropped_moments(mapped: dict[str, dict[str, torch.Tensor]], plan, config) -> None:
    """Drop-Upcycling re-draws a share of each expert's neurons: their moments start at zero (Adam's state
    of a new parameter), the kept neurons keep the dense moments."""
    from upcycle.methods.init import drop_sets
    from upcycle.methods.surgery import plan_stacks

    for adapter, stack_plan, layers in plan_stacks(plan, config):
        for i in layers:
            prefix = adapter.mlp_prefix(i) + ".experts."
            for name, s in mapped.items():
                if not name.startswith(prefix):
                    continue
                proj = name[len(prefix) :]
                for t in s.values():
                    E, width = t.shape[0], t.shape[2] if proj == "down_proj" else t.shape[1]
                    for e, S in enumerate(drop_sets(stack_plan, i, E, width)):
                        if proj == "down_proj":
                            t[e][:, S] = 0
                        elif proj != "down_bias":
                            t[e][S] = 0
