"""The record of what a conversion did: plan, MoE layers, block structure, tied weights, source and
versions. Every writer and reader of that record goes through this type:

    config.json "upcycle" entry   `config_entry()`; read back by `registry.record_from_config`
    upcycle.json                  `to_json()` (the native format adds its header); `registry.record_from_json`
    the model's structure         `registry.rebuild(record, model)`: empty MoE (and MoA) modules of the
                                  right shape, through the converter the plan's method registers

so loading dispatches on the record, never on the type of a plan. This module is a leaf: the
converters that write `config.upcycle` use it without importing the registry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

# The block shape facts beyond the plan (`surgery.structure_of`), stored beside it.
STRUCTURE_KEYS = ("expert_intermediate_size", "shared_expert")


@dataclass
class ConversionRecord:
    plan: Any  # UpcyclePlan, or BamPlan for BAM / BTX
    moe_layers: list[int] | dict[str, list[int]]
    structure: dict = field(default_factory=dict)
    tied_weights: dict[str, str] = field(default_factory=dict)
    source: dict = field(default_factory=lambda: {"path": None, "weights": {}})
    versions: dict[str, str] = field(default_factory=dict)
    created: str | None = None

    def config_entry(self) -> dict:
        """config.json's "upcycle" entry: the plan, the MoE layers and the block structure."""
        return self.plan.to_dict() | {"moe_layers": self.moe_layers} | self.structure

    def to_json(self) -> dict:
        """upcycle.json's body (the format writes its own header in front of it)."""
        created = self.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return {
            "plan": self.plan.to_dict(),
            "moe_layers": self.moe_layers,
            "tied_weights": self.tied_weights,
            **self.structure,
            "source": self.source,
            "versions": self.versions,
            "created": created,
        }
