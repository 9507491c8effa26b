"""upcycle: dense Transformer checkpoints -> Mixture-of-Experts models."""

from upcycle._version import __version__
from upcycle.errors import PlanError, UpcycleError
from upcycle.formats.load import load
from upcycle.formats.native import save
from upcycle.methods.plan import UpcyclePlan
from upcycle.methods.surgery import upcycle, upcycle_state_dict

__all__ = ["UpcyclePlan", "UpcycleError", "PlanError", "load", "save", "upcycle", "upcycle_state_dict", "__version__"]
