"""YAML files of dataclasses (plans, training configs, recipes): keys are the field names.

The checks every such file gets, with the same messages: the file exists, it is YAML, it is a mapping,
and every key is a field.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import yaml

from upcycle.errors import UpcycleError


def option(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field that is also a YAML key and a command-line flag: `help` (and any of argparse's
    `choices`, ...) go in its metadata, where `cli.common.add_dataclass_flags` reads them. A dict or list
    default gets a fresh copy per instance."""
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def read_mapping(path: str | Path, what: str, error: type[UpcycleError] = UpcycleError) -> dict[str, Any]:
    """The mapping in a YAML file; `what` names the file in messages ("plan file", "recipe")."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}); save the {what} as UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # an unhashable key: the base loader says what is wrong with it
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (line {key_node.start_mark.line + 1})", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def check_fields(cls: type, d: Any, source: str, what: str, error: type[UpcycleError] = UpcycleError) -> None:
    """Raise unless `d` is a mapping whose keys are all fields of the dataclass `cls`."""
    if not isinstance(d, dict):
        raise error(f"{source}: expected a mapping of {what}, got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise error(f"{source}: unknown key {unknown[0]!r}; valid keys are {', '.join(names)}")


def numbers(cls: type, d: dict[str, Any], source: str, error: type[UpcycleError] = UpcycleError) -> dict[str, Any]:
    """`d` with its numbers read by the dataclass fields' types, the one place every file of dataclasses gets them.

    YAML 1.1 reads `1e-3` and `3e7` as strings (its floats need a dot): a float field takes them as floats;
    an int-only field takes an integral number in any spelling (`3e7`, `30000000.0`) as an int and refuses a
    fractional one. Other values pass unchanged, for the dataclass's own checks."""
    out = dict(d)
    kinds = {
        f.name: set(re.findall(r"\w+", f.type if isinstance(f.type, str) else str(f.type)))
        for f in dataclasses.fields(cls)
    }
    for k, v in d.items():
        words = kinds.get(k, set())
        if isinstance(v, bool) or not isinstance(v, (str, int, float)) or "bool" in words:
            continue
        if isinstance(v, str):
            if "str" in words:
                continue  # a field that takes text keeps it
            try:
                x = float(v)
            except ValueError:
                continue  # not a number: the field's own check names what it expects
        else:
            x = v
        if "float" in words:
            out[k] = float(x) if isinstance(v, str) else v
        elif "int" in words:
            if not (math.isfinite(x) and float(x).is_integer()):
                raise error(f"{source}: {k} must be an integer, got {v!r}")
            out[k] = int(x)
    return out


def recipe_from_dict(cls: type, d: Any, source: str, tiny: bool = False) -> Any:
    """A study's recipe (a dataclass with a `name` field) from a YAML mapping: keys checked, its `tiny:`
    overrides applied when asked for, numbers read by field type; a missing or wrong argument is one error."""
    check_fields(cls, d, source, "recipe keys")
    d = dict(d)
    if tiny:
        default = next(f.default for f in dataclasses.fields(cls) if f.name == "name")
        d = with_tiny(cls, d, source, default)
    try:
        return cls(**numbers(cls, d, source))
    except TypeError as e:
        raise UpcycleError(f"{source}: {e}") from None


def with_tiny(cls: type, d: dict[str, Any], source: str, default_name: str) -> dict[str, Any]:
    """A recipe mapping with its `tiny:` overrides applied (what `--tiny` runs: a smoke-test size), its
    name marked "(tiny)"; the overrides' keys are checked against the dataclass `cls`."""
    over = d.get("tiny")
    if not over:
        raise UpcycleError(f"{source}: --tiny needs a `tiny:` section of overrides in the recipe")
    if not isinstance(over, dict):
        raise UpcycleError(f"{source}: tiny: expected a mapping of recipe keys, got {type(over).__name__}")
    bad = sorted(set(over) - {f.name for f in dataclasses.fields(cls)} - {"tiny"})
    if bad:
        raise UpcycleError(f"{source}: tiny: unknown key {bad[0]!r}")
    merged = {**d, **over}  # an override may rename the recipe too
    return merged | {"name": f"{merged.get('name', default_name)} (tiny)"}


def dump(d: dict[str, Any], path: str | Path | None = None) -> str:
    """YAML text of `d` in field order, also written to `path` when given."""
    text = yaml.safe_dump(d, sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text
