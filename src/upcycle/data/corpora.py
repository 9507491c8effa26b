"""Real text that needs no download: the Python standard library's source, the system's manual pages
(roff to text) and PyPI package READMEs.
"""

from __future__ import annotations

import gzip
import re
import sys
import sysconfig
from pathlib import Path
from typing import Sequence

from upcycle.data.documents import Document, _read_text, doc_hash
from upcycle.data.tokens import PackedData, pack_documents
from upcycle.errors import UpcycleError

CORPORA = ("python", "man", "pypi", "python+packages")
# The installed packages whose source joins the standard library in "python+packages": torch (pinned to
# 2.13.0 by the README and CI) and what it installs, plus numpy; tests are left out. Their versions are
# part of the corpus's identity (`corpus_fingerprint`).
CORPUS_PACKAGES = ("torch", "sympy", "mpmath", "networkx", "numpy")
_SKIP_DIRS = {"test", "tests", "testing", "idle_test", "site-packages", "dist-packages", "lib2to3", "__pycache__"}


def python_stdlib_documents(max_files: int | None = None) -> list[Document]:
    """The running Python's standard-library source files (no tests, no site-packages): real code."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    docs = []
    for f in files[:max_files]:
        text = _read_text(f)
        if text and text.strip():
            docs.append(Document(f"stdlib/{f.relative_to(root)}", text))
    return docs


def package_source_documents(packages: Sequence[str] = CORPUS_PACKAGES) -> list[Document]:
    """The .py source of installed packages (their test folders and test_*.py files left out), one
    document per file, with ids `pkg/<package>/<path>`; a package that is not installed is skipped."""
    import importlib.util

    docs = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0])
        files = sorted(
            p
            for p in root.rglob("*.py")
            if not _SKIP_DIRS & set(p.relative_to(root).parts) and not p.name.startswith("test_")
        )
        for f in files:
            text = _read_text(f)
            if text and text.strip():
                docs.append(Document(f"pkg/{name}/{f.relative_to(root)}", text))
    return docs


def corpus_fingerprint(name: str, docs: Sequence[Document]) -> dict:
    """What a corpus was on this machine: its name, size, the versions of the packages it reads and a
    sha256 of its documents (ids and texts), so two machines can tell whether they trained on the same text."""
    import hashlib
    from importlib import metadata

    h = hashlib.sha256()
    for d in docs:
        h.update(d.id.encode() + b"\0" + d.text.encode("utf-8", errors="replace") + b"\0")
    versions = {"python": sys.version.split()[0]}
    if name == "python+packages":
        for pkg in CORPUS_PACKAGES:
            try:
                versions[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                versions[pkg] = None
    return {
        "corpus": name,
        "documents": len(docs),
        "chars": sum(len(d.text) for d in docs),
        "sha256": h.hexdigest(),
        "versions": versions,
    }


_ROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),
    (re.compile(r"\\s[+-]?\d"), ""),
    (re.compile(r"\\\((em|en)"), "-"),
    (re.compile(r"\\\(aq"), "'"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\(bu"), "*"),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\[&|^%c]"), ""),
    (re.compile(r"\\e"), lambda m: "\\"),
    (re.compile(r"\\ "), " "),
    (re.compile(r"\\\*(\(..|\[[^\]]*\]|.)"), ""),
    (re.compile(r"\\n(\(..|\[[^\]]*\]|.)"), ""),
]


_TEXT_MACROS = {
    ".SH",
    ".SS",
    ".B",
    ".I",
    ".BI",
    ".BR",
    ".IR",
    ".RB",
    ".RI",
    ".IB",
    ".TP",
    ".IP",
    ".Nm",
    ".Nd",
    ".Sh",
    ".Ss",
    ".It",
    ".Xr",
    ".Fl",
    ".Ar",
    ".Pa",
    ".Em",
    ".Sy",
}


def roff_to_text(src: str) -> str:
    """Plain text of a manual page source: requests dropped, text-carrying macros kept, escapes removed."""
    out = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\"')):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line.partition(" ")
            if macro in (".SH", ".Sh"):
                out.append("")
            if macro in (".IP", ".TP") and rest:  # tag and indent: keep the tag only
                rest = rest.split('" ')[0] if rest.startswith('"') else rest.split(" ")[0]
            if macro in _TEXT_MACROS and rest:
                line = rest.replace('"', "")
            elif macro in (".PP", ".LP", ".P", ".sp", ".Pp"):
                out.append("")
                continue
            else:
                continue
        for pat, rep in _ROFF_ESCAPES:
            line = pat.sub(rep, line)  # noqa: PLW2901
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def man_page_documents(
    sections: Sequence[str] = ("1", "5", "7", "8"),
    root: str | Path = "/usr/share/man",
    max_chars: int | None = None,
    seed: int = 0,
    min_chars: int = 500,
    skip_prefixes: Sequence[str] = ("gcloud",),
) -> list[Document]:
    """English manual pages installed on this machine (gzipped roff under /usr/share/man/manN), as text.
    Machine-generated families (gcloud's 16k near-identical pages) are skipped. With max_chars, pages
    are read in a seeded order until about that many characters (reading all takes a while)."""
    root = Path(root)
    files = [
        f
        for s in sections
        for f in sorted((root / f"man{s}").glob("*"))
        if f.is_file() and not f.name.startswith(tuple(skip_prefixes))
    ]
    if max_chars is not None:
        files.sort(key=lambda f: doc_hash(f.name, seed))
    docs, total = [], 0
    for f in files:
        if max_chars is not None and total >= max_chars:
            break
        try:
            raw = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
        except (OSError, EOFError):
            continue
        src = raw.decode("utf-8", errors="replace")
        if src.lstrip().startswith(".so "):  # a redirect to another page
            continue
        text = roff_to_text(src)
        if len(text) >= min_chars:
            docs.append(Document(f"man/{f.parent.name}/{f.name}", text))
            total += len(text)
    return sorted(docs, key=lambda d: d.id)


def pypi_readme_documents(min_chars: int = 1000) -> list[Document]:
    """The long descriptions (READMEs) of the Python packages installed in this environment."""
    from importlib import metadata

    docs, seen = [], set()
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        if not name or name in seen or len(body) < min_chars:
            continue
        seen.add(name)
        docs.append(Document(f"pypi/{name}", body))
    return sorted(docs, key=lambda d: d.id)


def corpus_documents(name: str, max_chars: int | None = None, seed: int = 0) -> list[Document]:
    """Documents of an offline corpus ("python", "man", "pypi", "python+packages"); with max_chars, a seeded sample of
    documents adding up to about that many characters (whole documents, so the split stays clean)."""
    if name == "python":
        docs = python_stdlib_documents()
    elif name == "man":
        docs = man_page_documents(max_chars=max_chars, seed=seed)
    elif name == "pypi":
        docs = pypi_readme_documents()
    elif name == "python+packages":
        docs = python_stdlib_documents() + package_source_documents()
    else:
        raise UpcycleError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")
    if not docs:
        raise UpcycleError(f"corpus {name!r} is empty on this machine ({sys.platform}); pass your own text with --data")
    if max_chars is not None:
        docs = sorted(docs, key=lambda d: doc_hash(d.id, seed + 7919))
        out, total = [], 0
        for d in docs:
            if total >= max_chars:
                break
            out.append(d)
            total += len(d.text)
        docs = sorted(out, key=lambda d: d.id)
    return docs


def corpus_tokens(
    name: str,
    tokenizer,
    seq_len: int = 256,
    val_fraction: float = 0.05,
    seed: int = 0,
    max_chars: int | None = 2_000_000,
    cache_dir: str | Path | None = None,
) -> PackedData:
    """Train/validation token tensors of an offline corpus, split by document (see `pack_documents`)."""
    docs = corpus_documents(name, max_chars, seed)
    return pack_documents(docs, tokenizer, seq_len, val_fraction, seed, cache_dir, source=f"corpus:{name}")
