"""upcycle: dense Transformer checkpoints -> Mixture-of-Experts models."""

__version__ = "0.1.0"

from .errors import PlanError, UpcycleError  # noqa: E402
from .native import load, save  # noqa: E402
from .plan import UpcyclePlan  # noqa: E402
from .surgery import upcycle, upcycle_state_dict  # noqa: E402

__all__ = ["UpcyclePlan", "UpcycleError", "PlanError", "load", "save", "upcycle", "upcycle_state_dict", "__version__"]
