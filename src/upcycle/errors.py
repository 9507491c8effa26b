"""One exception family, so the CLI can turn any of them into a one-line message and exit code 2."""


class UpcycleError(Exception):
    """Bad input or an impossible request; the message says what was wrong and what to do."""


class PlanError(UpcycleError, ValueError):
    """A plan that cannot be applied (bad field value, layer out of range, ...)."""


class UpcycleWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI prints `upcycle: warning:`)."""


# Per float dtype: the integer type of its bits and the exponent mask; a value is NaN or Inf iff all its
# exponent bits are ones.
EXPONENT_BITS = {
    "F32": ("<u4", 0x7F800000),
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
    "F64": ("<u8", 0x7FF0 << 48),
}


def any_nonfinite_bits(raw, kind: str) -> bool:
    """Whether a buffer of little-endian floats of safetensors dtype `kind` (F32, F16, BF16, F64) holds a NaN
    or an Inf: integer operations through numpy, so no float kernel or thread pool is started."""
    import numpy as np

    if kind not in EXPONENT_BITS:
        return False
    itype, mask = EXPONENT_BITS[kind]
    bits = np.frombuffer(raw, dtype=itype)
    return bool(((bits & mask) == mask).any())


def warn_nonfinite(name: str, where: str = "") -> None:
    import warnings

    warnings.warn(
        f"{where + ': ' if where else ''}tensor {name} holds NaN or Inf values; the output carries them: check the "
        "checkpoint",
        UpcycleWarning,
        stacklevel=3,
    )


def nonfinite(name: str, t, where: str = "") -> None:
    """Warn for a floating CPU tensor holding NaN or Inf values (they survive conversion unchanged)."""
    import torch

    kinds = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
    if t.dtype not in kinds or not t.numel() or t.device.type != "cpu":
        return
    flat = t.detach().contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy()
    step = 1 << 20
    if any(any_nonfinite_bits(raw[i : i + step], kinds[t.dtype]) for i in range(0, raw.size, step)):
        warn_nonfinite(name, where)
