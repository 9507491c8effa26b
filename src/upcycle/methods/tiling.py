"""Depth tiling: a deeper dense model made by repeating the layers of a dense one (the plan,
`DepthTilingPlan`, and the converter, `depth_tile`), the paper's dense baseline at matched compute.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from upcycle.adapters import adapter_for
from upcycle.errors import UpcycleError
from upcycle.io.models import empty_model

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


@torch.no_grad()
def check_family(config: Any, source: str = "config.json") -> None:
    """Depth tiling repeats the blocks of a decoder LM (the llama-like families); refuse anything else before
    it is loaded."""
    from upcycle.adapters import LLAMA_LIKE

    adapter = adapter_for(config, source)
    if adapter.family != LLAMA_LIKE.family:
        raise UpcycleError(
            f"{source}: depth tiling deepens decoder LMs ({', '.join(LLAMA_LIKE.model_types)}); "
            f"{config.model_type} is a {adapter.family}"
        )


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
    check_family(config, "model")
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
    new = empty_model(new_config, new_config.dtype if isinstance(new_config.dtype, torch.dtype) else None).to(
        ref.device
    )

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


@dataclass(frozen=True)
class DepthTilingPlan:
    """`method: depth_tiling` in YAML; every field is also a flag of the same name."""

    num_layers: int | None = field(default=None, metadata={"help": "layers of the deeper model"})
    factor: float | None = field(default=None, metadata={"help": "or: new depth = round(factor x layers)"})
    mode: str = field(
        default="stack",
        metadata={"help": "stack ([0..L-1, 0..L-1]) | interleave ([0,0,1,1,..])", "choices": TILE_MODES},
    )

    def __post_init__(self) -> None:
        from upcycle.errors import PlanError

        if (self.num_layers is None) == (self.factor is None):
            raise PlanError("depth tiling: give exactly one of num_layers or factor")
        if self.num_layers is not None and (
            isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1
        ):
            raise PlanError(f"num_layers: expected a positive integer, got {self.num_layers!r}")
        if self.factor is not None and (
            isinstance(self.factor, bool)
            or not isinstance(self.factor, (int, float))
            or not math.isfinite(self.factor)
            or self.factor < 1
        ):
            raise PlanError(f"factor: expected a number of at least 1, got {self.factor!r}")
        if self.mode not in TILE_MODES:
            raise PlanError(f"mode: choose one of {', '.join(TILE_MODES)}, got {self.mode!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"method": "depth_tiling", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict, source: str = "plan") -> "DepthTilingPlan":
        from upcycle.errors import PlanError
        from upcycle.io import yamlio

        d = dict(d) if isinstance(d, dict) else d
        method = d.pop("method", None) if isinstance(d, dict) else None
        if method != "depth_tiling":
            raise PlanError(f"{source}: expected `method: depth_tiling`, got {method!r}")
        yamlio.check_fields(cls, d, source, "depth tiling fields", PlanError)
        d = yamlio.numbers(cls, d, source, PlanError)
        try:
            return cls(**d)
        except PlanError as e:
            raise PlanError(f"{source}: {e}") from None
