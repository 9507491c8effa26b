"""The results file every benchmark writes: title, what was measured, machine, date, command, tables."""

from __future__ import annotations

import datetime as _dt
import sys
from pathlib import Path


def command(script: str, argv: list[str] | None) -> str:
    """The command line that reproduces this run."""
    return f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])


def write_report(
    out: Path, title: str, header: str, machine: str, cmd: str, body: str, notes: tuple[str, ...] = ()
) -> None:
    """Write the markdown results file atomically (a reader never sees half of it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    text = (
        f"# {title}\n\n{header}.\n\n- Machine: {machine}\n- Date: {_dt.date.today().isoformat()}\n"
        f"- Command: `{cmd.strip()}`\n" + "".join(f"- {n}\n" for n in notes) + f"\n{body}\n"
    )
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
