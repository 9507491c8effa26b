"""Which layers become MoE layers.

A selection is written the same way in YAML and on the command line:

    all                 every layer
    every_k:K[:OFFSET]  layers i with i % K == OFFSET (default OFFSET = K - 1, so every_k:2 = 1, 3, 5, ...;
                        Sparse Upcycling's "every other layer, starting with the second")
    first_n:N           layers 0 .. N-1
    last_n:N            the last N layers
    middle_n:N          N layers centred in the stack (flaxformer MIDDLE: L - N <= 2i < L + N)
    1,3,5   or [1, 3, 5] an explicit list
"""

from __future__ import annotations

from upcycle.errors import PlanError

DEFAULT_LAYERS = "every_k:2:1"
_KINDS = ("all", "every_k", "first_n", "last_n", "middle_n")


def parse_layers(spec: str | list[int] | tuple[int, ...]) -> str | tuple[int, ...]:
    """Normalise a selection; a malformed one raises PlanError. Range checks need the model: see select_layers."""
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise PlanError("layers: the explicit list is empty; give at least one layer index")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
            raise PlanError(f"layers: explicit list must hold integers, got {list(spec)!r}")
        if len(set(spec)) != len(spec):
            raise PlanError(f"layers: explicit list repeats an index: {list(spec)!r}")
        return tuple(sorted(spec))
    if not isinstance(spec, str) or not spec.strip():
        raise PlanError(f"layers: expected a list of indices or one of {', '.join(_KINDS)}, got {spec!r}")
    spec = spec.strip()
    if spec[0].isdigit() or spec[0] == "-":
        try:
            ints = [int(s) for s in spec.rstrip(",").split(",")]  # an empty element (0,2,,3) is a typo, not a skip
        except ValueError:
            raise PlanError(f"layers: {spec!r} is not a comma-separated list of integers") from None
        return parse_layers(ints)
    kind, *args = spec.split(":")
    if kind not in _KINDS:
        raise PlanError(f"layers: unknown selection {kind!r}; use one of {', '.join(_KINDS)} or a list like 1,3,5")
    try:
        nums = [int(a) for a in args]
    except ValueError:
        raise PlanError(f"layers: arguments of {spec!r} must be integers") from None
    expected = {"all": (0, 0), "every_k": (1, 2), "first_n": (1, 1), "last_n": (1, 1), "middle_n": (1, 1)}[kind]
    if not expected[0] <= len(nums) <= expected[1]:
        raise PlanError(f"layers: {spec!r} has the wrong number of arguments (see `{kind}` in the docs)")
    if kind == "every_k":
        k = nums[0]
        offset = nums[1] if len(nums) > 1 else k - 1
        if k < 1 or not 0 <= offset < k:
            raise PlanError(f"layers: every_k needs K >= 1 and 0 <= OFFSET < K, got K={k}, OFFSET={offset}")
        return f"every_k:{k}:{offset}"
    if kind != "all" and nums[0] < 1:
        raise PlanError(f"layers: {kind} needs N >= 1, got {nums[0]}")
    return spec


def select_layers(spec: str | list[int] | tuple[int, ...], num_layers: int) -> list[int]:
    """The sorted layer indices a selection picks in a model with `num_layers` layers."""
    spec = parse_layers(spec)
    L = num_layers
    if isinstance(spec, tuple):
        bad = [i for i in spec if not 0 <= i < L]
        if bad:
            raise PlanError(f"layers: index {bad[0]} is out of range: the model has {L} layers (0..{L - 1})")
        return list(spec)
    kind, *args = spec.split(":")
    nums = [int(a) for a in args]
    if kind == "all":
        return list(range(L))
    if kind == "every_k":
        k, offset = nums
        picked = [i for i in range(L) if i % k == offset]
    else:
        n = nums[0]
        if n > L:
            raise PlanError(f"layers: {spec} asks for {n} layers but the model has {L}")
        if kind == "first_n":
            picked = list(range(n))
        elif kind == "last_n":
            picked = list(range(L - n, L))
        else:  # middle_n
            picked = [i for i in range(L) if L - n <= 2 * i < L + n]
    if not picked:
        raise PlanError(f"layers: {spec} selects no layer of a {L}-layer model")
    return picked
