"""The one sharded safetensors writer: every shard and header computed from shapes alone, then each
tensor written as it is produced.

    items (name, shape, dtype, producer) --> shards `model-0000i-of-0000n.safetensors` + index

`write_items` is what both the in-memory save and the streaming converter write through, so their
outputs are byte-identical by construction. `SequentialWriter` writes through O_DIRECT via two
aligned staging buffers and a writer thread, where the filesystem allows. Knows nothing of MoE.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from upcycle.errors import UpcycleError
from upcycle.io.safetensors import INDEX, NAMES, RANK


@dataclass(frozen=True)
class Item:
    """One output tensor: name, shape and dtype known up front; `produce()` builds the values.

    A producer may return a non-contiguous tensor (an expanded view, say): the writer walks it along
    its first dimension and copies nothing that is already contiguous."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def safetensors_header(items: list[Item], metadata: dict[str, str] | None = None) -> tuple[bytes, list[Item]]:
    """The header bytes (length prefix included) `safetensors.torch.save_file` writes for these
    tensors, and the items in the order their data follows it."""
    order = sorted(items, key=lambda it: (-RANK.index(NAMES[it.dtype]), it.name))
    head: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for it in order:
        head[it.name] = {
            "dtype": NAMES[it.dtype],
            "shape": list(it.shape),
            "data_offsets": [offset, offset + it.nbytes],
        }
        offset += it.nbytes
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def shard_plan(items: list[Item], max_shard_size: int) -> list[list[Item]]:
    """Split items, in order, into shards of at most `max_shard_size` bytes (a larger tensor gets a
    shard of its own): the one rule every native and stock shard follows."""
    shards: list[list[Item]] = [[]]
    size = 0
    for it in items:
        if shards[-1] and size + it.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += it.nbytes
    return shards


def shard_name(j: int, n: int) -> str:
    return f"model-{j:05d}-of-{n:05d}.safetensors"


def output_bytes(items: list[Item], max_shard_size: int) -> int:
    """Bytes the shards will take on disk, headers included."""
    shards = shard_plan(items, max_shard_size)
    return sum(len(safetensors_header(s, {"format": "pt"})[0]) + sum(i.nbytes for i in s) for s in shards)


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        data = data[os.write(fd, data) :]


class SequentialWriter:
    """Writes one file front to back. Where the filesystem allows it, the bytes bypass the page cache
    (O_DIRECT): they are copied into one of two page-aligned staging buffers of `block` bytes, and a
    background thread writes a full buffer while the next one fills. On this project's VMs that is
    ~5x faster than buffered writes plus fsync under CPU load, and it leaves no dirty page cache
    behind. The unaligned tail is written without O_DIRECT. Elsewhere (tmpfs, ...) it writes plainly."""

    ALIGN = 4096

    def __init__(self, path: Path, block: int = 16 << 20, direct: bool = True):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.fd = -1
        if self.direct:
            try:  # some filesystems accept O_DIRECT at open and refuse the writes: probe one block
                self.fd = os.open(path, flags | os.O_DIRECT, 0o644)
                probe = mmap.mmap(-1, self.ALIGN)
                os.pwrite(self.fd, probe, 0)
                probe.close()
                os.ftruncate(self.fd, 0)
            except OSError:
                if self.fd >= 0:
                    os.close(self.fd)
                self.direct = False
        if not self.direct:
            self.fd = os.open(path, flags, 0o644)
        self.bufs = [memoryview(mmap.mmap(-1, block)) for _ in range(2)] if self.direct else []
        self.block, self.fill, self.cur = block, 0, 0
        self.pool = ThreadPoolExecutor(1) if self.direct else None
        self.pending: list[Future] = [None, None]  # type: ignore[list-item]

    def write(self, data: memoryview) -> None:
        if not self.direct:
            return _write_all(self.fd, data)
        data = data.cast("B")
        while len(data):
            k = min(len(data), self.block - self.fill)
            self.bufs[self.cur][self.fill : self.fill + k] = data[:k]
            self.fill += k
            data = data[k:]
            if self.fill == self.block:
                self._submit(self.block)

    def _submit(self, n: int) -> None:
        """Hand the current buffer's first n bytes (a multiple of ALIGN) to the writer thread."""
        self.pending[self.cur] = self.pool.submit(_write_all, self.fd, self.bufs[self.cur][:n])
        self.cur, self.fill = 1 - self.cur, 0
        if self.pending[self.cur] is not None:
            self.pending[self.cur].result()  # the other buffer is free again (and its write succeeded)
            self.pending[self.cur] = None

    def close(self, fsync: bool = True) -> None:
        try:
            if self.direct:
                tail = self.bufs[self.cur][: self.fill]
                aligned = self.fill - self.fill % self.ALIGN
                if aligned:
                    self._submit(aligned)
                for f in self.pending:
                    if f is not None:
                        f.result()
                if len(tail) > aligned:
                    fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                    _write_all(self.fd, tail[aligned:])
            if fsync:
                os.fsync(self.fd)
        finally:
            self.abort()

    def abort(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _write_tensor(f: SequentialWriter, t: torch.Tensor) -> None:
    """Write a tensor's bytes in C order; non-contiguous tensors are walked along dimension 0."""
    if t.numel() == 0:
        return
    if t.is_contiguous():
        f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif t.dim() <= 1:
        _write_tensor(f, t.contiguous())
    else:
        for sub in t.unbind(0):
            _write_tensor(f, sub)


def write_items(
    items: Iterable[Item], out: Path, max_shard_size: int, progress: Any = None, fsync: bool = True, direct: bool = True
) -> dict:
    """Write items as `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`
    into `out`, producing and writing one tensor at a time (see `SequentialWriter` for `direct`).
    Returns the index."""
    items = list(items)
    names = [it.name for it in items]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UpcycleError(f"two output tensors are named {dup!r}; a transform must give unique names")
    shards = shard_plan(items, max_shard_size)
    weight_map, total = {}, 0
    for j, shard in enumerate(shards, 1):
        name = shard_name(j, len(shards))
        header, order = safetensors_header(shard, {"format": "pt"})
        f = SequentialWriter(out / name, direct=direct)
        try:
            f.write(memoryview(header))
            for it in order:
                t = it.produce()
                if tuple(t.shape) != it.shape or t.dtype != it.dtype:
                    raise UpcycleError(
                        f"{it.name}: produced {t.dtype} {list(t.shape)}, announced {it.dtype} "
                        f"{list(it.shape)} (a bug in the item's producer)"
                    )
                _write_tensor(f, t)
                del t
                if progress is not None:
                    progress.update(it.nbytes)
            f.close(fsync)
        finally:
            f.abort()
        for it in shard:
            weight_map[it.name] = name
            total += it.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


def tensor_items(tensors: dict[str, torch.Tensor]) -> list[Item]:
    return [Item(k, tuple(v.shape), v.dtype, lambda v=v: v.detach().cpu()) for k, v in tensors.items()]
