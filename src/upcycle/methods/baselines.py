"""The models sparse upcycling is compared against, built from the same dense checkpoint or config.

Sparse Upcycling (Komatsuzaki et al., ICLR 2023) spends extra compute on a dense checkpoint in several
ways and compares them at equal compute:
- dense continued training: the dense model itself (nothing to build);
- sparse upcycling: `surgery.upcycle(model, plan)`;
- an MoE of the same shape trained from scratch: `moe_from_scratch(config, plan)`;
- a deeper dense model warm-started from the checkpoint ("depth tiling"): `depth_tile(model, ...)`.

Both builders are pure: the input model is left untouched and the result owns its parameters.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from upcycle.adapters import adapter_for
from upcycle.errors import UpcycleError
from upcycle.methods.plan import UpcyclePlan

TILE_MODES = ("stack", "interleave")


def tile_order(num_layers: int, target: int, mode: str = "stack") -> list[int]:
    """Source layer of each layer of the deeper model.

    stack:      the whole stack again on top, [0..L-1, 0..L-1, ...], cut at `target` (progressive stacking,
                Gong et al. 2019; G_stack, Du et al. 2024; SOLAR's depth up-scaling stacks two copies too).
    interleave: every layer repeated in place, [0, 0, 1, 1, ...]; for a target that is not a multiple of L
                the repeats are spread evenly (layer j of the new model is floor(j * L / target)).
    """
    if mode not in TILE_MODES:
        raise UpcycleError(f"depth tiling mode {mode!r} is not one of {', '.join(TILE_MODES)}")
    if target < num_layers:
        raise UpcycleError(f"depth tiling makes a model deeper: {target} layers < the model's {num_layers}")
    if mode == "stack":
        return [j % num_layers for j in range(target)]
    return [j * num_layers // target for j in range(target)]


def _empty_model(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older layout
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        return AutoModelForCausalLM.from_config(
            config, dtype=config.dtype if isinstance(config.dtype, torch.dtype) else None
        )


@torch.no_grad()
def depth_tile(
    model: nn.Module, num_layers: int | None = None, factor: float | None = None, mode: str = "stack"
) -> nn.Module:
    """A deeper dense model warm-started from `model` by repeating its layers (Sparse Upcycling's "dense
    upcycling" baseline; the paper cites Rae et al. 2021 for warm-starting deeper models).

    Give the new depth as `num_layers` or as `factor` x the current depth (rounded); `mode` says which layer
    each new layer copies (see `tile_order`; stack is the default, the common choice in the literature).
    Everything else (embeddings, final norm, head) is copied. Every layer's attention gets its own
    `layer_idx`, so the KV cache gives each layer its own slot. Not function preserving: the deeper model
    computes a different function and needs continued training.
    """
    from upcycle.moe.block import moe_blocks

    if moe_blocks(model):
        raise UpcycleError("depth_tile works on dense models; this one has MoE layers")
    config = model.config
    adapter = adapter_for(config)
    L = adapter.dims(config)[0]
    if (num_layers is None) == (factor is None):
        raise UpcycleError("depth_tile: give exactly one of num_layers or factor")
    target = num_layers if num_layers is not None else round(L * factor)
    if not isinstance(target, int) or isinstance(target, bool):
        raise UpcycleError(f"depth_tile: num_layers must be an integer, got {target!r}")
    src = tile_order(L, target, mode)

    new_config = copy.deepcopy(config)
    setattr(new_config, adapter.layers_key, target)
    if getattr(new_config, "layer_types", None) is not None:  # per-layer attention kinds (sliding window)
        new_config.layer_types = [config.layer_types[s] for s in src]
    if getattr(new_config, "max_window_layers", None) is not None and getattr(new_config, "use_sliding_window", False):
        raise UpcycleError("depth_tile: models with max_window_layers sliding attention are not supported yet")
    ref = next(model.parameters())
    new_config.dtype = ref.dtype
    new = _empty_model(new_config).to(ref.device)

    prefix = adapter.layers + "."
    state = {}
    for k, v in model.state_dict().items():
        if not k.startswith(prefix):
            state[k] = v
    old_blocks = adapter.layer_list(model)
    for j, s in enumerate(src):
        for k, v in old_blocks[s].state_dict().items():
            state[f"{prefix}{j}.{k}"] = v
    missing, unexpected = new.load_state_dict(state, strict=False)
    tied = set(getattr(new, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise UpcycleError(
            f"depth_tile: weights do not fit the deeper model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    new.tie_weights()
    for j, block in enumerate(adapter.layer_list(new)):  # the constructor numbers them; make sure
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = j
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    new.config.depth_tiling = {"source_layers": L, "mode": mode, "source_of_layer": src}
    return new.train(model.training)


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

    model.config.upcycle = applied_plan(plan, model.config, model).to_dict() | {
        "moe_layers": layers,
        "init": "from_scratch",
    }
    return model.eval()


def num_params(model: nn.Module) -> int:
    """Parameters counted once (tied weights once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
