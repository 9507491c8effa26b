"""Reading safetensors checkpoints lazily, with every header checked against its file.

`SafetensorsSource` parses the headers of a checkpoint's shards; `read(name)` returns one tensor as a
view of the memory-mapped file (no copy), and the pages of the previous tensors leave resident memory
at the next read. Knows nothing of MoE.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from upcycle.errors import UpcycleError

# safetensors dtype names <-> torch dtypes. RANK is safetensors' own dtype order: within a file,
# tensors are laid out by descending rank, then by name (what `safetensors.torch.save_file` does).
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
}


NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


RANK = (
    "BOOL",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "C64",
    "F64",
    "I64",
    "U64",
)


HEADER_LIMIT = 100 << 20  # safetensors refuses larger headers too


@dataclass(frozen=True)
class TensorInfo:
    """Where one source tensor lives: file, absolute byte range, dtype, shape."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensors ({name: TensorInfo}, in file order) and `__metadata__` of one safetensors file,
    checked against the file size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(HEADER_LIMIT, size - 8):
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise UpcycleError(f"{path}: not a readable safetensors file ({e}); re-download or re-save it") from None
    meta = header.pop("__metadata__", None) or {}
    base, out = 8 + n, {}
    for name, h in sorted(header.items(), key=lambda kv: kv[1].get("data_offsets", [0])[0]):
        try:
            dtype = DTYPES[h["dtype"]]
            shape = tuple(int(d) for d in h["shape"])
            a, b = (int(x) for x in h["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UpcycleError(f"{path}: tensor {name!r} has an unsupported or malformed header entry {h!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        if b - a != numel * dtype.itemsize or base + b > size:
            raise UpcycleError(
                f"{path}: tensor {name!r} ({h['dtype']} {list(shape)}) has byte range [{a}, {b}) "
                f"that does not match its shape or the file size; the file is truncated or corrupt"
            )
        out[name] = TensorInfo(path, dtype, shape, base + a, base + b)
    return out, meta


class SafetensorsSource:
    """A safetensors checkpoint directory (model.safetensors, or shards with an index) read lazily:
    names, shapes and dtypes come from the headers; `read(name)` gives one tensor at a time, a view
    of the memory-mapped file whose pages leave resident memory again at the next read."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        try:
            self.files = weight_files(self.dir)
            index = json.loads((self.dir / INDEX).read_text()) if (self.dir / INDEX).is_file() else {}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UpcycleError(
                f"{self.dir / INDEX}: not a valid safetensors index ({e}); re-download or re-save the checkpoint"
            ) from None
        if not self.files:
            raise UpcycleError(
                f"{self.dir}: no safetensors weights (model.safetensors or {INDEX}); convert the "
                "checkpoint to safetensors first"
            )
        self.tensors: dict[str, TensorInfo] = {}
        self.index_metadata: dict[str, Any] = index.get("metadata") or {}
        for f in self.files:
            if not f.is_file():
                raise UpcycleError(f"{self.dir / INDEX} names {f.name}, which is missing; re-download the checkpoint")
            infos, _ = read_header(f)
            for k, v in infos.items():
                if k in self.tensors:
                    raise UpcycleError(f"{f}: tensor {k!r} is also in {self.tensors[k].file.name}")
                self.tensors[k] = v
        self._maps: dict[Path, mmap.mmap | None] = {}
        self._recent: list[tuple[mmap.mmap, int, int]] = []

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def first_float_dtype(self) -> torch.dtype | None:
        """dtype of the first floating-point tensor of the first file (transformers' "auto" fallback)."""
        first = self.files[0]
        return next((t.dtype for t in self.tensors.values() if t.file == first and t.dtype.is_floating_point), None)

    def read(self, name: str) -> torch.Tensor:
        """The tensor, as a view of the file's memory map: no copy, no anonymous memory. Treat it as
        read-only. The pages of tensors read before are dropped from this process's resident memory
        at each call (they stay in the page cache; an older view still reads correctly, the kernel
        maps its pages again), so resident memory stays at about one tensor. Where the file cannot
        be mapped or the data is misaligned for its dtype, the tensor is read into a fresh buffer."""
        t = self.tensors[name]
        self._release()
        mm = self._map(t.file)
        if mm is None or t.start % t.dtype.itemsize or t.end == t.start:
            return self.read_copy(name)
        page = t.start - t.start % mmap.PAGESIZE
        mm.madvise(mmap.MADV_WILLNEED, page, t.end - page)  # one big readahead, not a fault per 128 KB
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flat = torch.frombuffer(mm, dtype=t.dtype, count=(t.end - t.start) // t.dtype.itemsize, offset=t.start)
        self._recent.append((mm, t.start, t.end))
        return flat.view(t.shape)

    def read_copy(self, name: str) -> torch.Tensor:
        """The tensor read into a fresh CPU tensor of its own size (plain reads, no memory map)."""
        t = self.tensors[name]
        out = torch.empty(t.shape, dtype=t.dtype)
        buf = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        with open(t.file, "rb", buffering=0) as f:
            done = 0
            while done < len(buf):
                n = os.preadv(f.fileno(), [buf[done:]], t.start + done)
                if n <= 0:
                    raise UpcycleError(
                        f"{t.file}: unexpected end of file reading {name!r}; the file changed or is truncated"
                    )
                done += n
        return out

    def has_nonfinite(self, name: str, chunk: int = 1 << 16) -> bool:
        """Whether a floating tensor holds NaN or Inf, read with plain reads into one small buffer (no memory
        map, so the scan leaves nothing resident)."""
        from upcycle.errors import any_nonfinite_bits

        t = self.tensors[name]
        kind = NAMES.get(t.dtype)
        item = t.dtype.itemsize
        buf = bytearray(chunk - chunk % item)
        view = memoryview(buf)
        with open(t.file, "rb", buffering=0) as f:
            pos = t.start
            while pos < t.end:
                n = os.preadv(f.fileno(), [view[: min(len(buf), t.end - pos)]], pos)
                if n <= 0:
                    raise UpcycleError(f"{t.file}: unexpected end of file reading {name!r}; the file is truncated")
                n -= n % item
                if any_nonfinite_bits(view[:n], kind):
                    return True
                pos += n
        return False

    def _map(self, file: Path) -> mmap.mmap | None:
        if file not in self._maps:
            try:
                with open(file, "rb") as f:  # private and writable, so torch gets a writable buffer
                    self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError):
                self._maps[file] = None
        return self._maps[file]

    def _release(self) -> None:
        for mm, a, b in self._recent:
            a -= a % mmap.PAGESIZE
            mm.madvise(mmap.MADV_DONTNEED, a, b - a)
        self._recent.clear()

    def close(self) -> None:
        self._release()
        for mm in self._maps.values():
            try:
                if mm is not None:
                    mm.close()
            except BufferError:  # a tensor still views it; it is unmapped when that tensor goes
                pass
        self._maps.clear()

    def __enter__(self) -> "SafetensorsSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


INDEX = "model.safetensors.index.json"


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory: the shards its index names (each a plain file name
    inside the directory), or model.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UpcycleError(
                f"{index}: not a valid safetensors index ({type(e).__name__}: {e}); re-download or re-save the "
                "checkpoint"
            ) from None
        for n in names:
            if not isinstance(n, str) or not n or Path(n).name != n or n in (".", ".."):
                raise UpcycleError(
                    f"{index} names the shard {n!r}, which is not a file inside {model_dir}; the index is corrupt "
                    "or unsafe: re-download the checkpoint"
                )
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    return [single] if single.is_file() else []
