"""The depth-tiling plan: a deeper dense model made by repeating the layers of a dense one."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

MODES = ("stack", "interleave")


@dataclass(frozen=True)
class DepthTilingPlan:
    """`method: depth_tiling` in YAML; every field is also a flag of the same name."""

    num_layers: int | None = field(default=None, metadata={"help": "layers of the deeper model"})
    factor: float | None = field(default=None, metadata={"help": "or: new depth = round(factor x layers)"})
    mode: str = field(
        default="stack", metadata={"help": "stack ([0..L-1, 0..L-1]) | interleave ([0,0,1,1,..])", "choices": MODES}
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
        if self.mode not in MODES:
            raise PlanError(f"mode: choose one of {', '.join(MODES)}, got {self.mode!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"method": "depth_tiling", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict, source: str = "plan") -> "DepthTilingPlan":
        from upcycle import yamlio
        from upcycle.errors import PlanError

        d = dict(d) if isinstance(d, dict) else d
        method = d.pop("method", None) if isinstance(d, dict) else None
        if method != "depth_tiling":
            raise PlanError(f"{source}: expected `method: depth_tiling`, got {method!r}")
        yamlio.check_fields(cls, d, source, "depth tiling fields", PlanError)
        try:
            return cls(**d)
        except PlanError as e:
            raise PlanError(f"{source}: {e}") from None
