"""Documents: text and JSONL files read into `Document`s (chunked), hashed and split train/val by
document, deterministically.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from upcycle.errors import UpcycleError

TEXT_SUFFIXES = {
    ".txt",
    ".md",
    ".rst",
    ".py",
    ".text",
    ".tex",
    ".html",
    ".c",
    ".h",
    ".js",
    ".ts",
    ".java",
    ".go",
    ".rs",
    ".cpp",
    ".json",
    ".yaml",
    ".yml",
    ".toml",
    ".csv",
    ".xml",
    ".sh",
    ".org",
    "",
}


JSONL_SUFFIXES = {".jsonl", ".ndjson"}


@dataclass(frozen=True)
class Document:
    id: str
    text: str


def _chunks(text: str, chunk_chars: int) -> list[str]:
    """Cut text at blank lines into pieces of at least chunk_chars characters (the last may be shorter)."""
    if chunk_chars <= 0 or len(text) <= chunk_chars:
        return [text] if text.strip() else []
    parts, cur, size = [], [], 0
    for para in re.split(r"(\n\s*\n)", text):
        cur.append(para)
        size += len(para)
        if size >= chunk_chars:
            parts.append("".join(cur))
            cur, size = [], 0
    if cur and "".join(cur).strip():
        parts.append("".join(cur))
    return [p for p in parts if p.strip()]


def read_text_file(path: str | Path) -> str:
    """A text file given as --text: refused when missing or binary (NUL bytes), decoded as UTF-8 with
    undecodable bytes replaced."""
    path = Path(path)
    if not path.is_file():
        raise UpcycleError(f"text file not found: {path}")
    text = _read_text(path)
    if text is None:
        raise UpcycleError(f"{path}: looks binary (it has NUL bytes); give a text file")
    return text


def _read_text(path: Path) -> str | None:
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        return None  # binary
    return raw.decode("utf-8", errors="replace")


def _jsonl_documents(path: Path, text_field: str, rel: str) -> list[Document]:
    docs = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UpcycleError(
                    f"{path}:{n}: not valid JSON ({e.msg}); every line of a .jsonl file must be one JSON object"
                ) from None
            if not isinstance(row, dict) or text_field not in row:
                raise UpcycleError(
                    f"{path}:{n}: no {text_field!r} field; pass --text-field NAME for the field that holds the text"
                )
            text = row[text_field]
            if not isinstance(text, str):
                raise UpcycleError(f"{path}:{n}: field {text_field!r} is {type(text).__name__}, not a string")
            doc_id = f"{rel}:{row['id']}" if "id" in row else f"{rel}:{n}"
            if text.strip():
                docs.append(Document(doc_id, text))
    return docs


def read_documents(path: str | Path, text_field: str = "text", chunk_chars: int = 8192) -> list[Document]:
    """Documents of a text file, a .jsonl file or a folder of them (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise UpcycleError(f"data path not found: {path}")
    if isinstance(chunk_chars, bool) or not isinstance(chunk_chars, int) or chunk_chars < 1:
        raise UpcycleError(f"--chunk-chars must be a positive number of characters, got {chunk_chars!r}")
    if path.is_file():
        files, root = [path], path.parent
    else:
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
            and (p.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES)
        )
        root = path
    docs: list[Document] = []
    for f in files:
        rel = str(f.relative_to(root))
        if f.suffix.lower() in JSONL_SUFFIXES:
            docs += _jsonl_documents(f, text_field, rel)
            continue
        text = _read_text(f)
        if text is None:
            if f == path:
                raise UpcycleError(f"{path}: looks binary (it has NUL bytes); give a text, .jsonl or folder path")
            continue
        docs += [Document(f"{rel}#{k}", t) for k, t in enumerate(_chunks(text, chunk_chars))]
    if not docs:
        raise UpcycleError(
            f"no text found in {path} (text files: {', '.join(sorted(s for s in TEXT_SUFFIXES if s))};"
            f" JSON lines: .jsonl)"
        )
    return docs


def doc_hash(doc_id: str, seed: int) -> float:
    """A document's position in [0, 1): sha256 of the seed and the id."""
    h = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_documents(
    docs: Sequence[Document], val_fraction: float, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """(train, validation) by document hash. With val_fraction > 0 and at least two documents, the
    validation side is never empty (the document of lowest hash goes there) and train never either;
    a single document is all train."""
    if not 0 <= val_fraction < 1:
        raise UpcycleError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if len({d.id for d in docs}) != len(docs):
        raise UpcycleError("document ids are not unique; the split needs one id per document")
    if len(docs) == 1:  # nothing to hold out without losing all the training data
        return list(docs), []
    keys = {d.id: doc_hash(d.id, seed) for d in docs}
    val = [d for d in docs if keys[d.id] < val_fraction]
    train = [d for d in docs if keys[d.id] >= val_fraction]
    if val_fraction > 0 and len(docs) >= 2:
        if not val:
            first = min(train, key=lambda d: keys[d.id])
            train, val = [d for d in train if d is not first], [first]
        if not train:
            last = max(val, key=lambda d: keys[d.id])
            val, train = [d for d in val if d is not last], [last]
    return train, val
