"""Output directories: atomic writes (a temporary sibling renamed into place), disk-space checks,
source hashes, and the side files (tokenizer, generation config) copied next to the weights.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager, suppress
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

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
    """Bytes of a shard size such as 5GB, 500MB or 4096 (an int); at least one byte."""
    n = None
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    elif isinstance(size, str):
        s = size.strip().upper()
        for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
            if s.endswith(unit):
                try:
                    x = float(s[: -len(unit)]) * mult
                except ValueError:
                    break
                n = int(x) if math.isfinite(x) else None
                break
    if n is None or n < 1:
        raise UpcycleError(f"max_shard_size: cannot use {size!r}; give a positive size like 5GB or 500MB")
    return n


def sha256_files(files: list[Path]) -> dict[str, str]:
    out = {}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
        out[f.name] = "sha256:" + h.hexdigest()
    return out


def read_json_object(f: Path, advice: str) -> dict:
    """A JSON file that must hold an object (config.json, upcycle.json): one clear error otherwise."""
    try:
        data = json.loads(Path(f).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise UpcycleError(f"{f}: not valid JSON ({e}); {advice}") from None
    if not isinstance(data, dict):
        raise UpcycleError(f"{f}: not a JSON object; {advice}")
    return data


def refuse_existing(out_dir: Path, overwrite: bool = False) -> None:
    """The one output-exists rule: an existing output directory is replaced only with overwrite."""
    if Path(out_dir).exists() and not overwrite:
        raise UpcycleError(f"output directory already exists: {out_dir} (choose another --out or pass --overwrite)")


def refuse_out_over_inputs(out: str | Path, inputs: Iterable[str | Path], flag: str = "--out") -> None:
    """The output may not be an input, hold one (it would be replaced with the output), or be the working
    directory or above it. Paths are compared resolved (symlinks followed)."""
    o = Path(os.path.abspath(out)).resolve()
    cwd = Path.cwd().resolve()
    if o == cwd or o in cwd.parents:
        raise UpcycleError(
            f"{flag} {out} is the current directory or above it, which already exists and holds your work; "
            "give a new directory for the output"
        )
    for i in inputs:
        p = Path(os.path.abspath(i)).resolve()
        if p == o or o in p.parents:
            what = "is" if p == o else "holds"
            raise UpcycleError(
                f"{flag} {out} {what} the input {i}: writing there would replace it; give another {flag}"
            )


@contextmanager
def atomic_dir(out_dir: Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yield a temporary directory next to `out_dir`; on success rename it to `out_dir`.

    The temporary directory is `.NAME.tmp-PID-XXXX`: an exception (KeyboardInterrupt included)
    removes it; one left by a killed process is removed by the next writer of the same `out_dir`.
    A live writer's temporary directory is a lock: a second writer to the same `out_dir` is refused.
    The final rename never replaces what this writer did not check: without overwrite, a directory that
    appeared at `out_dir` meanwhile is left as it is and the run fails; with overwrite, only the very
    directory that was there at the start is replaced. The working directory (or one above it) is refused,
    and so is a directory that is, or holds, one of `inputs` (what is being read to write it), overwrite or not."""
    out_dir = Path(os.path.abspath(out_dir))
    refuse_out_over_inputs(out_dir, [i for i in inputs if i is not None])
    refuse_existing(out_dir, overwrite)
    before = _identity(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out_dir)
    _refuse_other_writer(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        yield tmp
        _default_permissions(tmp)
        now = _identity(out_dir)
        if now is not None and now != before:
            raise UpcycleError(
                f"{out_dir} appeared while this run was writing it (another process?); it was left as it is and "
                "this run's output was discarded: choose another --out, or remove it and run again"
            )
        if now is not None:  # overwrite: the directory checked at the start, moved aside, then removed
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-{os.getpid()}-", dir=out_dir.parent))
            rename_noreplace(out_dir, trash / out_dir.name)
            try:
                rename_noreplace(tmp, out_dir)
            except BaseException:
                with suppress(OSError):
                    rename_noreplace(trash / out_dir.name, out_dir)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            rename_noreplace(tmp, out_dir)
    except FileExistsError:
        remove_tree(tmp)
        raise UpcycleError(
            f"{out_dir} appeared while this run was writing it (another process?); it was left as it is and "
            "this run's output was discarded: choose another --out, or remove it and run again"
        ) from None
    except Exception as e:
        full = not isinstance(e, (OSError, UpcycleError)) and disk_full(e, tmp)
        remove_tree(tmp)
        if full:  # torch.save and safetensors report a full disk as their own exception types
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out_dir)) from e
        raise
    except BaseException:
        remove_tree(tmp)
        raise


def remove_tree(path: Path, wait: float = 10.0) -> None:
    """Remove a temporary directory for good: a writer thread still finishing a file in it (a signal
    arrives in the main thread only) can recreate an entry after one pass, so pass again until it is gone."""
    import time

    t0 = time.monotonic()
    while True:
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path) or time.monotonic() - t0 > wait:
            return
        time.sleep(0.05)


def remove_for_overwrite(out_dir: str | Path, inputs: Iterable[str | Path] = ()) -> None:
    """--overwrite of a run directory that is filled in place (training runs, studies): remove it, unless
    it is an input, holds one, or is the working directory or above it."""
    refuse_out_over_inputs(out_dir, inputs)
    if Path(out_dir).is_dir() and not Path(out_dir).is_symlink():
        shutil.rmtree(out_dir)
    elif os.path.lexists(out_dir):
        os.unlink(out_dir)


def disk_full(e: BaseException, where: Path) -> bool:
    """Whether a writer's exception (of any type) came from a full disk: its message says so, or the disk
    holding `where` has (almost) no space left."""
    text = str(e)
    if "No space left" in text or "StorageFull" in text or "os error 28" in text:
        return True
    try:
        return shutil.disk_usage(where).free < (1 << 20)
    except OSError:
        return False


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _refuse_other_writer(out_dir: Path) -> None:
    for d in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        pid = d.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if d.is_dir() and pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            raise UpcycleError(
                f"another upcycle process (pid {pid}) is writing {out_dir}; wait for it to finish or choose "
                "another --out"
            )


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, failing with FileExistsError if `dst` exists: renameat2(RENAME_NOREPLACE)
    where the C library and the file system have it; elsewhere an existence check before os.rename (which
    refuses a non-empty directory or a file in the way by itself)."""
    fn = _renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(src), None, str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(src), None, str(dst))
    os.rename(src, dst)


@lru_cache(maxsize=1)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def remove_stale_temp_dirs(out_dir: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID-*` directories next to `out_dir` left by a writer that was killed
    (SIGKILL, power loss): those whose PID is no longer a running process. A live writer's
    directory is left alone. Returns what was removed."""
    removed = []
    name = Path(out_dir).name
    for d in [*Path(out_dir).parent.glob(f".{name}.tmp-*"), *Path(out_dir).parent.glob(f".{name}.old-*")]:
        pid = d.name[len(name) + 6 :].split("-", 1)[0]
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
