"""From a stored plan record to its plan: `plan_from_dict` dispatches on the record's method
(sparse upcycling, BAM, BTX); `plan_from_meta` reads the plan of a native directory's upcycle.json.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from upcycle.errors import UpcycleError
from upcycle.methods.bam import METHODS, BamPlan
from upcycle.methods.plan import UpcyclePlan


def plan_from_meta(meta: dict) -> UpcyclePlan:
    """The plan part of a `config.upcycle` / upcycle.json entry (which also holds layers and shapes)."""

    if meta.get("method") == "bam":
        raise UpcycleError(
            "BAM's attention experts (a soft mixture of N attentions) have no stock transformers "
            "class; keep the native format (upcycle.load reads it) or mix with `upcycle btx`"
        )
    names = {f.name for f in dataclasses.fields(UpcyclePlan)}
    return UpcyclePlan.from_dict({k: v for k, v in meta.items() if k in names})


def plan_from_dict(d: dict[str, Any], source: str = "plan"):
    """The plan a native model was written with: a BamPlan for method bam / btx, else an UpcyclePlan."""
    from upcycle.methods.plan import UpcyclePlan

    d = {k: v for k, v in d.items() if k != "moe_layers"}
    if d.get("method") in METHODS:
        return BamPlan.from_dict(d, source)
    return UpcyclePlan.from_dict(d, source)
