"""The methods' registry: a stored plan dict names its method (none for sparse upcycling, "bam" or
"btx" for mixing), and each method registers its plan class and its structure converter here.

`plan_from_dict` and `converter_for` are what `record.ConversionRecord` dispatches through;
`plan_from_meta` reads the sparse plan a stock export needs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from upcycle.errors import UpcycleError
from upcycle.methods import bam, surgery
from upcycle.methods.bam import METHODS, BamPlan
from upcycle.methods.plan import UpcyclePlan
from upcycle.methods.record import STRUCTURE_KEYS, ConversionRecord


def plan_from_meta(meta: dict) -> UpcyclePlan:
    """The plan part of a `config.upcycle` / upcycle.json entry (which also holds layers and shapes)."""

    if meta.get("method") == "bam":
        raise UpcycleError(
            "BAM's attention experts (a soft mixture of N attentions) have no stock transformers "
            "class; keep the native format (upcycle.load reads it) or mix with `upcycle btx`"
        )
    names = {f.name for f in dataclasses.fields(UpcyclePlan)}
    return UpcyclePlan.from_dict({k: v for k, v in meta.items() if k in names})


def _method(d: dict[str, Any]) -> str:
    return d.get("method") if d.get("method") in METHODS else "sparse"


def plan_from_dict(d: dict[str, Any], source: str = "plan"):
    """The plan a native model was written with: a BamPlan for method bam / btx, else an UpcyclePlan."""
    d = {k: v for k, v in d.items() if k != "moe_layers"}
    return PLANS[_method(d)].from_dict(d, source)


def converter_for(plan) -> Callable[..., list[int]]:
    """`convert_structure(model, plan, layers, structure=None)` of the plan's method."""
    return CONVERTERS[_method(plan.to_dict())]


PLANS = {"sparse": UpcyclePlan, "bam": BamPlan, "btx": BamPlan}
CONVERTERS = {"sparse": surgery.convert_structure, "bam": bam.convert_structure, "btx": bam.convert_structure}


def record_from_json(meta: dict, source: str = "upcycle.json") -> ConversionRecord:
    """The record an upcycle.json holds (its format header already checked)."""
    if not isinstance(meta.get("plan"), dict) or not isinstance(meta.get("moe_layers"), (list, dict)):
        raise UpcycleError(f"{source}: no plan or moe_layers entry; the directory is damaged: convert the model again")
    return ConversionRecord(
        plan=plan_from_dict(meta["plan"], source=source),
        moe_layers=meta["moe_layers"],
        structure={k: meta[k] for k in STRUCTURE_KEYS if k in meta},
        tied_weights=meta.get("tied_weights", {}),
        source=meta.get("source", {"path": None, "weights": {}}),
        versions=meta.get("versions", {}),
        created=meta.get("created"),
    )


def record_from_config(entry: dict, source: str = "config.json") -> ConversionRecord:
    """The record a model's `config.upcycle` holds (the plan fields, moe_layers and the structure)."""
    plan = {k: v for k, v in entry.items() if k not in STRUCTURE_KEYS}
    structure = {k: entry[k] for k in STRUCTURE_KEYS if k in entry}
    return ConversionRecord(plan_from_dict(plan, source=source), entry.get("moe_layers"), structure)


def rebuild(record: ConversionRecord, model) -> list[int]:
    """Give `model` (the dense class, weights not yet loaded) the record's structure, in place, through
    the converter of the plan's method."""
    convert = converter_for(record.plan)
    return convert(model, record.plan, record.moe_layers, structure=record.structure or None)
