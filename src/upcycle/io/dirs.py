"""Output directories: atomic writes (a temporary sibling renamed into place), disk-space checks,
source hashes, and the side files (tokenizer, generation config) copied next to the weights.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from upcycle.errors import UpcycleError


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_disk_space(out_dir: Path, nbytes: int, margin: int = 64 << 20) -> None:
    """Raise UpcycleError if the filesystem that will hold `out_dir` has less than nbytes + margin free."""
    parent = Path(out_dir).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < nbytes + margin:
        raise UpcycleError(
            f"not enough disk space for {out_dir}: need {_size(nbytes)} plus a {_size(margin)} reserve, "
            f"{parent} has {_size(free)} free; free some space or choose another --out"
        )


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "added_tokens.json",
)


def parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    raise UpcycleError(f"max_shard_size: cannot read {size!r}; write it like 5GB or 500MB")


def sha256_files(files: list[Path]) -> dict[str, str]:
    out = {}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
        out[f.name] = "sha256:" + h.hexdigest()
    return out


def refuse_existing(out_dir: Path, overwrite: bool = False) -> None:
    """The one output-exists rule: an existing output directory is replaced only with overwrite."""
    if Path(out_dir).exists() and not overwrite:
        raise UpcycleError(f"output directory already exists: {out_dir} (choose another --out or pass --overwrite)")


@contextmanager
def atomic_dir(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `out_dir`; on success rename it to `out_dir`.

    The temporary directory is `.NAME.tmp-PID-XXXX`: an exception (KeyboardInterrupt included)
    removes it; one left by a killed process is removed by the next writer of the same `out_dir`."""
    out_dir = Path(out_dir)
    refuse_existing(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        yield tmp
        _default_permissions(tmp)
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, trash / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temp_dirs(out_dir: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID-*` directories next to `out_dir` left by a writer that was killed
    (SIGKILL, power loss): those whose PID is no longer a running process. A live writer's
    directory is left alone. Returns what was removed."""
    removed = []
    for d in Path(out_dir).parent.glob(f".{Path(out_dir).name}.tmp-*"):
        pid = d.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if d.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _default_permissions(root: Path) -> None:
    """mkdtemp and safetensors create private files; give the output the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for f in root.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def side_files(source_dir: Path) -> list[Path]:
    """The side files (tokenizer, generation config, chat template) a model directory has."""
    return [Path(source_dir) / n for n in SIDE_FILES if (Path(source_dir) / n).is_file()]


def copy_side_files(source_dir: Path, out_dir: Path, replace: bool = True) -> list[Path]:
    """Copy the source's side files into `out_dir` (metadata kept); with replace=False a file already
    there (one save_pretrained wrote) is kept. Returns what was copied."""
    files = [f for f in side_files(source_dir) if replace or not (Path(out_dir) / f.name).exists()]
    for f in files:
        shutil.copy2(f, Path(out_dir) / f.name)
    return files
