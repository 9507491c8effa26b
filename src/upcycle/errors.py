"""One exception family, so the CLI can turn any of them into a one-line message and exit code 2."""


class UpcycleError(Exception):
    """Bad input or an impossible request; the message says what was wrong and what to do."""


class PlanError(UpcycleError, ValueError):
    """A plan that cannot be applied (bad field value, layer out of range, ...)."""


class UpcycleWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI prints `upcycle: warning:`)."""


def nonfinite(name: str, t, where: str = "") -> None:
    """Warn once for a floating tensor holding NaN or Inf values (they survive conversion unchanged)."""
    import warnings

    import torch

    if not t.dtype.is_floating_point or not t.numel():
        return
    flat, step = t.reshape(-1), 1 << 20  # in slices: the check allocates no tensor-sized mask
    if all(bool(torch.isfinite(flat[i : i + step]).all()) for i in range(0, flat.numel(), step)):
        return
    n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    warnings.warn(
        f"{where + ': ' if where else ''}tensor {name} holds {n_nan} NaN and {n_inf} Inf value(s); the output "
        "carries them: check the checkpoint",
        UpcycleWarning,
        stacklevel=2,
    )
