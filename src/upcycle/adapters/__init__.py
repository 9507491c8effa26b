"""Where each architecture keeps its blocks and MLPs, as data.

An adapter names paths and keys; surgery code reads them and never branches on the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from ..errors import UpcycleError


@dataclass(frozen=True)
class MLPAdapter:
    family: str
    model_types: tuple[str, ...]
    layers: str  # dotted path of the ModuleList of blocks, from the top model
    mlp: str  # attribute of a block that holds the MLP
    up: str  # projection names inside the MLP (nn.Linear modules)
    down: str
    gate: str | None  # None: not a gated MLP
    act_key: str  # config field naming the activation (transformers ACT2FN key)
    bias_key: str | None  # config field saying whether the MLP has biases (None: never)
    layers_key: str = "num_hidden_layers"
    hidden_key: str = "hidden_size"
    intermediate_key: str = "intermediate_size"

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def mlp_prefix(self, i: int) -> str:
        return f"{self.layers}.{i}.{self.mlp}"

    def dense_key(self, i: int, proj: str, kind: str = "weight") -> str:
        return f"{self.mlp_prefix(i)}.{proj}.{kind}"

    def has_bias(self, config: Any) -> bool:
        return bool(getattr(config, self.bias_key, False)) if self.bias_key else False

    def dims(self, config: Any) -> tuple[int, int, int]:
        """(num_layers, hidden_size, intermediate_size) of a config."""
        return (getattr(config, self.layers_key), getattr(config, self.hidden_key),
                getattr(config, self.intermediate_key))


LLAMA_LIKE = MLPAdapter(
    family="llama-like decoder",
    model_types=("llama", "mistral", "qwen2", "qwen3", "olmo2", "cohere"),
    layers="model.layers", mlp="mlp", up="up_proj", down="down_proj", gate="gate_proj",
    act_key="hidden_act", bias_key="mlp_bias",
)

ADAPTERS: tuple[MLPAdapter, ...] = (LLAMA_LIKE,)


def supported_model_types() -> list[str]:
    return [t for a in ADAPTERS for t in a.model_types]


def adapter_for(config: Any, source: str = "config.json") -> MLPAdapter:
    model_type = getattr(config, "model_type", None)
    for a in ADAPTERS:
        if model_type in a.model_types:
            return a
    raise UpcycleError(
        f"{source}: model_type {model_type!r} is not supported yet; supported: {', '.join(supported_model_types())}"
    )
