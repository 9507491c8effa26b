"""The record of what a conversion did: plan, MoE layers, block structure, tied weights, source and
versions. Every writer and reader of that record goes through this type:

    config.json "upcycle" entry   `config_entry()` / `from_config(entry)`
    upcycle.json                  `to_json()` / `from_json(meta)` (the native format adds its header)
    the model's structure         `rebuild(model)`: swaps in empty MoE (and MoA) modules of the right
                                  shape, through the converter the plan's method registers

so loading dispatches on the record, never on the type of a plan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from upcycle.methods.registry import converter_for, plan_from_dict

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

    @classmethod
    def from_json(cls, meta: dict, source: str = "upcycle.json") -> ConversionRecord:
        return cls(
            plan=plan_from_dict(meta["plan"], source=source),
            moe_layers=meta["moe_layers"],
            structure={k: meta[k] for k in STRUCTURE_KEYS if k in meta},
            tied_weights=meta.get("tied_weights", {}),
            source=meta.get("source", {"path": None, "weights": {}}),
            versions=meta.get("versions", {}),
            created=meta.get("created"),
        )

    @classmethod
    def from_config(cls, entry: dict, source: str = "config.json") -> ConversionRecord:
        """From a model's `config.upcycle` (the plan fields with moe_layers and the structure beside them)."""
        structure = {k: entry[k] for k in STRUCTURE_KEYS if k in entry}
        plan = {k: v for k, v in entry.items() if k not in STRUCTURE_KEYS}
        return cls(plan=plan_from_dict(plan, source=source), moe_layers=entry.get("moe_layers"), structure=structure)

    def rebuild(self, model) -> list[int]:
        """Give `model` (the dense class, weights not yet loaded) the converted structure, in place."""
        return converter_for(self.plan)(model, self.plan, self.moe_layers, structure=self.structure or None)
