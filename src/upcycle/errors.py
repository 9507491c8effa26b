"""One exception family, so the CLI can turn any of them into a one-line message and exit code 2."""


class UpcycleError(Exception):
    """Bad input or an impossible request; the message says what was wrong and what to do."""


class PlanError(UpcycleError, ValueError):
    """A plan that cannot be applied (bad field value, layer out of range, ...)."""
