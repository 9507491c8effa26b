"""The MoE-from-scratch baseline: the upcycled architecture, randomly initialised; and parameter counts."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from upcycle.adapters import adapter_for
from upcycle.errors import UpcycleError
from upcycle.methods.plan import UpcyclePlan
from upcycle.methods.record import ConversionRecord


@torch.no_grad()
def moe_from_scratch(dense_config, plan: UpcyclePlan, seed: int | None = None) -> nn.Module:
    """A randomly initialised MoE of exactly the shape `surgery.upcycle(dense, plan)` produces.

    Non-MoE parameters get the model's own Hugging Face initialisation (normal(0, initializer_range) for
    linear and embedding weights, ones for norms). Experts get independent normal(0, initializer_range)
    weights (zero biases), like the dense MLP they replace would at initialisation, and so does a shared
    expert (its sigmoid gate row zero); routers follow the plan
    (router_init, router_std). `seed` (default: plan.seed) makes the whole model reproducible; the global
    torch RNG is left as it was.
    """
    from transformers import AutoModelForCausalLM

    from upcycle.methods.routers import init_router
    from upcycle.methods.surgery import convert_structure

    seed = plan.seed if seed is None else seed
    plan = plan.replace(seed=seed)
    config = copy.deepcopy(dense_config)
    adapter = adapter_for(config)
    if getattr(config, "upcycle", None):
        raise UpcycleError("moe_from_scratch takes the dense model's config; this one is already upcycled")
    std = float(getattr(config, "initializer_range", 0.02))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dtype = config.dtype if isinstance(getattr(config, "dtype", None), torch.dtype) else torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = convert_structure(model, plan)
    blocks = adapter.layer_list(model)
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7)
    for i in layers:
        block = getattr(blocks[i], adapter.mlp)
        for name, p in block.experts.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
        block.router.weight.copy_(init_router(plan, i, block.router.weight.shape[1], block.router.weight.dtype))
        if block.shared_expert is not None:  # like the experts; the gate row starts at zero (gate 1/2)
            for name, p in block.shared_expert.named_parameters():
                p.copy_(
                    torch.zeros_like(p)
                    if name.startswith("gate.")
                    else torch.randn(p.shape, generator=g, dtype=torch.float32) * std
                )
    from upcycle.methods.surgery import applied_plan

    record = ConversionRecord(applied_plan(plan, model.config, model), layers)
    model.config.upcycle = record.config_entry() | {"init": "from_scratch"}
    return model.eval()


def num_params(model: nn.Module) -> int:
    """Parameters counted once (tied weights once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
