"""The `upcycle` command.

    upcycle sparse [--model DIR] [--plan plan.yaml] [--<plan field> VALUE ...] --out DIR
    upcycle check DIR --against DENSE_DIR [--text FILE]
    upcycle plan [--plan plan.yaml] [--<plan field> VALUE ...]      print the resolved plan as YAML

Plan fields are flags of the same name as their YAML keys (`--num_experts 8`; `--num-experts` works
too); flags override the plan file. Any bad input ends with a one-line error and exit code 2."""

from __future__ import annotations

import argparse
import errno
import sys

from upcycle.cli import (
    bam,
    bam_experiment,
    branch,
    btx,
    check,
    eval,
    experiment,
    export,
    plan,
    plot,
    sparse,
    tile,
    train,
    vit_experiment,
)
from upcycle.errors import UpcycleError

# The static command table: each module has HELP, add_arguments(parser) and run(args) -> int (and may
# have DESCRIPTION; its docstring otherwise), and imports anything heavy inside run().
COMMANDS = {
    "sparse": sparse,
    "check": check,
    "plan": plan,
    "bam": bam,
    "bam-experiment": bam_experiment,
    "branch": branch,
    "btx": btx,
    "export": export,
    "eval": eval,
    "experiment": experiment,
    "plot": plot,
    "train": train,
    "tile": tile,
    "vit-experiment": vit_experiment,
}
BUILT_IN = ("sparse", "check", "plan")  # described by their one-line DESCRIPTION or HELP, not a docstring


def build_parser() -> argparse.ArgumentParser:
    from upcycle._version import __version__

    p = argparse.ArgumentParser(prog="upcycle", description="Turn dense Transformer checkpoints into MoE models.")
    p.add_argument("--version", action="version", version=f"upcycle {__version__}")
    p.add_argument("--debug", action="store_true", help="show the traceback behind an error (before the command)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, mod in COMMANDS.items():
        if name in BUILT_IN:
            sp = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", None))
        else:
            sp = sub.add_parser(
                name,
                help=mod.HELP,
                description=getattr(mod, "DESCRIPTION", mod.__doc__),
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        mod.add_arguments(sp)
    return p


_OS_ADVICE = {
    errno.EROFS: "the file system is read-only: give an output directory on a writable disk",
    errno.ENOSPC: "the disk is full: free some space or give an output directory on another disk",
    errno.EDQUOT: "the disk quota is exhausted: free some space or give an output directory elsewhere",
    errno.ENAMETOOLONG: "a file name is too long: give a shorter output directory name",
    errno.EACCES: "permission denied: give a path you can write to",
    errno.EPERM: "operation not permitted: give a path you can write to",
}


def os_error_message(e: OSError) -> str:
    """One line for an OSError: the file, what the system said, and what to do."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f) or "a file"
    what = e.strerror or str(e)
    return f"{where}: {what}; {_OS_ADVICE.get(e.errno, 'check the path and the disk, then run again')}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except UpcycleError as e:
        if args.debug:
            raise
        print(f"upcycle: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk said no while reading or writing: say which file and what to do
        if args.debug:
            raise
        print(f"upcycle: error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("upcycle: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
