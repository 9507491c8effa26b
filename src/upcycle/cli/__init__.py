"""The `upcycle` command.

    upcycle sparse [--model DIR] [--plan plan.yaml] [--<plan field> VALUE ...] --out DIR
    upcycle check DIR --against DENSE_DIR [--text FILE]
    upcycle plan [--plan plan.yaml] [--<plan field> VALUE ...]      print the resolved plan as YAML

Plan fields are flags of the same name as their YAML keys (`--num_experts 8`; `--num-experts` works
too); flags override the plan file. Any bad input ends with a one-line error and exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
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


class _Parser(argparse.ArgumentParser):
    """argparse with the promise's one error line: `upcycle: error: COMMAND: what`, exit 2, and where the
    flags are listed, instead of the usage block (subcommands' parsers are of this class too)."""

    def error(self, message: str):
        where = self.prog.removeprefix("upcycle").strip()
        print(
            f"upcycle: error: {where + ': ' if where else ''}{message} (`{self.prog} --help` lists them)",
            file=sys.stderr,
        )
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from upcycle._version import __version__

    p = _Parser(prog="upcycle", description="Turn dense Transformer checkpoints into MoE models.")
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


# Arguments that name what a command writes (or a place inside it), never an input to protect from it.
_NOT_INPUTS = {"command", "out", "publish", "resume", "debug"}


def input_paths(args: argparse.Namespace) -> list[str]:
    """Every existing path the command line names as an input: positional or flag values, in lists too,
    and the PATH of NAME=PATH forms (branch --domains)."""
    found = []
    for dest, value in vars(args).items():
        if dest in _NOT_INPUTS or value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, (str, os.PathLike)):
                for cand in {str(v), str(v).split("=", 1)[-1]}:
                    if cand and os.path.exists(cand):
                        found.append(cand)
    return found


def refuse_outputs_over_inputs(args: argparse.Namespace) -> None:
    """The one rule for every command that writes: its --out (and --publish) may not be an input, hold
    one, or be the working directory or above it."""
    from upcycle.io.dirs import refuse_out_over_inputs

    if not getattr(COMMANDS[args.command], "OUT_REPLACES", True):
        return
    inputs = input_paths(args)
    for flag in ("out", "publish"):
        if getattr(args, flag, None) is not None:
            others = inputs + ([str(args.out)] if flag == "publish" and getattr(args, "out", None) else [])
            refuse_out_over_inputs(getattr(args, flag), others, flag=f"--{flag}")


def _show_our_warnings() -> None:
    """Our warnings as one `upcycle: warning:` line each, on stderr."""
    import warnings

    from upcycle.errors import UpcycleWarning

    default = warnings.showwarning
    if getattr(default, "upcycle", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UpcycleWarning):
            print(f"upcycle: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    show.upcycle = True
    warnings.showwarning = show
    warnings.simplefilter("always", UpcycleWarning)


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that every temporary directory is removed on the way out."""


def _on_sigterm(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_unwinds():
    """SIGTERM unwinds like Ctrl-C (the main thread only; the previous handler is put back)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    for i, a in enumerate(argv):  # an empty path would read as "." (the working directory), silently
        if not a.strip():
            after = f" after {argv[i - 1]}" if i else ""
            print(f"upcycle: error: an empty argument{after}; give a value", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    _show_our_warnings()
    with _sigterm_unwinds():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        refuse_outputs_over_inputs(args)
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
        print(
            "upcycle: interrupted; nothing was written (a training run resumes from its last checkpoint)",
            file=sys.stderr,
        )
        return 130
    except Terminated:
        print(
            "upcycle: terminated (SIGTERM); nothing was written (a training run resumes from its last checkpoint)",
            file=sys.stderr,
        )
        return 143


if __name__ == "__main__":
    sys.exit(main())
