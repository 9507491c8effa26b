"""Fault injection (issue 18): bad inputs and faults, each held to the README's promise.

The promise: a bad input or a fault ends with one line on stderr starting `upcycle: error:` that names the
file or key and what to do, exit code 2, no traceback (unless --debug), nothing half-written on disk and the
inputs untouched. Kinds, as the issue numbers them:

1. data loss: an --out at or above an input; a directory that appears at --out during a run, or a second
   writer to the same --out (a paused process), must not be replaced by the final rename;
2. silently wrong output: inputs checked against their config before anything is written;
3. tracebacks: OSError while writing (read-only and full filesystems through a small tmpfs), damaged files,
   a plan that is not UTF-8, empty text, NaN weights, negative sizes, a tokenizer larger than the model's
   vocabulary, a damaged token cache;
4. resume of a damaged run;
5. acceptable but not right.

Only the public surface is used: `upcycle.cli.main` in-process (an exception escaping it is what the console
script shows as a traceback), `python -m upcycle` in a subprocess where a process must be paused or killed,
and `upcycle.load`. A case that does not hold is a strict xfail whose reason says what happens instead (none
today). tmpfs cases need root and `mount`; they skip with the reason elsewhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import upcycle
from conftest import WORDS, save_tiny_tokenizer, tiny_model
from upcycle.cli import main
from upcycle.errors import UpcycleError

ROOT = Path(__file__).resolve().parents[1]
SHARD = "model-00001-of-00001.safetensors"
INDEX = "model.safetensors.index.json"
TRAIN = [
    "--batch-size",
    "2",
    "--seq-len",
    "16",
    "--chunk-chars",
    "1000",
    "--eval-every",
    "0",
    "--eval-batches",
    "1",
    "--warmup",
    "1",
    "--lr",
    "1e-3",
    "--quiet",
]


TMP_PATHS = re.compile(r"\S*pytest-of-[^/\s]+/pytest-\d+/[^/\s'\"]+")


# ------------------------------------------------------------------------------------------- helpers
@dataclass
class Result:
    code: int
    out: str
    err: str
    tb: str | None  # the traceback of an exception that escaped main()


def cli(*argv) -> Result:
    """`upcycle ARGV` in-process; an exception escaping main() is recorded as the traceback a user would see."""
    out, err, tb = io.StringIO(), io.StringIO(), None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 2
        except Exception:  # noqa: BLE001 - exactly what the promise forbids
            tb, code = traceback.format_exc(), 1
    return Result(code, out.getvalue(), err.getvalue(), tb)


def error_line(r: Result) -> str:
    assert r.tb is None, f"a traceback instead of one error line:\n{r.tb[-3000:]}"
    assert "Traceback (most recent call last)" not in r.err, r.err[-3000:]
    lines = [ln for ln in r.err.splitlines() if ln.startswith("upcycle: error:")]
    assert r.code == 2 and len(lines) == 1, f"exit {r.code}, stderr:\n{r.err[-3000:]}\nstdout:\n{r.out[-1000:]}"
    return lines[0]


def refused(r: Result, *patterns: str) -> str:
    """The promise for a refusal: one `upcycle: error:` line matching every pattern (regex, any case), exit 2."""
    line = error_line(r)
    bare = TMP_PATHS.sub("<tmp>", line)  # the tests' own directory names must not satisfy a pattern
    for p in patterns:
        assert re.search(p, bare, re.IGNORECASE), f"{p!r} not in: {bare}"
    return line


def ok(r: Result) -> Result:
    assert r.tb is None, f"traceback:\n{r.tb[-3000:]}"
    assert r.code == 0, f"exit {r.code}, stderr:\n{r.err[-3000:]}"
    return r


def tree_hash(p: Path) -> str:
    """Hash of a file or of a directory tree (names and contents); '-' where nothing exists."""
    p = Path(p)
    if not p.exists():
        return "-"
    h = hashlib.sha256()
    items = [p] if p.is_file() else sorted(p.rglob("*"))
    for f in items:
        h.update(str(f.relative_to(p) if f != p else "").encode() + b"\0")
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def leftovers(parent: Path) -> list[str]:
    """Hidden temporary or trash directories a writer left next to its --out."""
    return sorted(f.name for f in Path(parent).iterdir() if re.match(r"\..*\.(tmp|old)-", f.name))


def nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was written: {sorted(x.name for x in out.iterdir())}"
    if out.parent.is_dir():
        assert leftovers(out.parent) == [], leftovers(out.parent)


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def corpus_text(n_docs: int = 30, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = WORDS[:40]
    docs = []
    for _ in range(n_docs):
        out = []
        for _ in range(100):
            w = rng.randrange(len(words))
            out += [words[w], words[(w * 7 + 3) % len(words)]]
        docs.append(" ".join(out))
    return "\n\n".join(docs)


def rewrite_tensors(directory: Path, fn) -> None:
    """Apply fn to the state dict in each safetensors file of `directory` (in place)."""
    for f in sorted(directory.glob("*.safetensors")):
        sd = load_file(str(f))
        fn(sd)
        save_file(sd, str(f), metadata={"format": "pt"})


def truncate(f: Path, keep: float = 0.5) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])


def spawn(*argv, cwd: Path | None = None) -> subprocess.Popen:
    """`python -m upcycle ARGV` in a subprocess (the console script's code path)."""
    return subprocess.Popen(
        [sys.executable, "-m", "upcycle", *map(str, argv)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def pause_at(proc: subprocess.Popen, ready, timeout: float = 120.0) -> bool:
    """SIGSTOP `proc` as soon as `ready()` is true; False if it ended first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if ready():
            os.kill(proc.pid, signal.SIGSTOP)
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    raise AssertionError("the process never reached the point to pause at")


def finish(proc: subprocess.Popen, timeout: float = 120.0) -> Result:
    try:
        os.kill(proc.pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
    out, err = proc.communicate(timeout=timeout)
    tb = err if "Traceback (most recent call last)" in err else None
    return Result(proc.returncode, out, err, tb)


@contextlib.contextmanager
def reaped(proc: subprocess.Popen):
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()  # our own child, by its handle
            proc.communicate()


def paused_in_write(argv: list, out: Path, cwd: Path | None = None, tries: int = 3) -> subprocess.Popen:
    """A conversion paused while its hidden temporary directory next to `out` exists (its final rename still
    ahead). A try that renamed before the pause landed is undone and repeated."""
    for _ in range(tries):
        proc = spawn(*argv, cwd=cwd)
        pattern = f".{out.name}.tmp-{proc.pid}-*"

        def writing(pattern=pattern) -> bool:
            return any(out.parent.glob(pattern))

        if pause_at(proc, writing) and not out.exists() and writing():
            return proc
        finish(proc)
        shutil.rmtree(out, ignore_errors=True)
    raise AssertionError(f"could not pause {argv[0]} inside its write in {tries} tries")


# ---------------------------------------------------------------------------------- tmpfs mounts
def _mount(path: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs (read-only and full filesystems)")
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=False, capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, readonly=False) -> a fresh tmpfs directory, unmounted at teardown."""
    mounted = []

    def mount(size: str = "2m", readonly: bool = False) -> Path:
        d = tmp_path / f"mnt{len(mounted)}"
        _mount(d, size)
        mounted.append(d)
        if readonly:
            r = subprocess.run(["mount", "-o", "remount,ro", str(d)], check=False, capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"cannot remount a tmpfs read-only here: {r.stderr.strip() or r.returncode}")
        return d

    yield mount
    for d in reversed(mounted):
        subprocess.run(["umount", str(d)], check=False, capture_output=True)
        if os.path.ismount(d):
            subprocess.run(["umount", "-l", str(d)], check=False, capture_output=True)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Pristine inputs, built once: a tiny dense Llama with a tokenizer, its MoE (4 experts, layers 1 and 3),
    a second dense model of the same shapes, a corpus, and a training run stopped at step 4 of 6 with
    checkpoints at steps 2 and 4. Tests copy what they damage."""
    root = tmp_path_factory.mktemp("faults")
    old_cache = os.environ.get("UPCYCLE_CACHE")
    os.environ["UPCYCLE_CACHE"] = str(root / "cache")
    try:
        dense = root / "dense"
        tiny_model("llama").save_pretrained(dense)
        save_tiny_tokenizer(dense)
        other = root / "other"
        tiny_model("llama", seed=1).save_pretrained(other)
        save_tiny_tokenizer(other)
        (root / "data.txt").write_text(corpus_text())
        ok(cli("sparse", "--model", dense, "--out", root / "moe", "--num_experts", 4, "--quiet"))
        ok(
            cli(
                "train",
                "--model",
                root / "moe",
                "--data",
                root / "data.txt",
                "--out",
                root / "run",
                "--steps",
                6,
                "--checkpoint-every",
                2,
                "--keep-checkpoints",
                5,
                "--stop-at",
                4,
                *TRAIN,
            )
        )
        assert sorted(p.name for p in (root / "run" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
        yield root
    finally:
        if old_cache is None:
            os.environ.pop("UPCYCLE_CACHE", None)
        else:
            os.environ["UPCYCLE_CACHE"] = old_cache


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A dense model whose conversion (8 experts, every layer, ~25 MB) is slow enough to pause inside."""
    d = tmp_path_factory.mktemp("wide") / "dense"
    tiny_model("llama", hidden_size=128, intermediate_size=512).save_pretrained(d)
    return d


@pytest.fixture(autouse=True)
def _cache(base, monkeypatch):
    monkeypatch.setenv("UPCYCLE_CACHE", str(base / "cache"))


def src(base: Path, tmp_path: Path, name: str) -> Path:
    return copy(base / name, tmp_path / name)


# ============================================================================ 1. data loss
# An --out at or above an input, with --overwrite: refused, the input intact.
AT_OR_ABOVE = {
    "sparse --out MODEL": (
        ["sparse", "--model", "{dense}", "--out", "{dense}", "--num_experts", "2", "--quiet"],
        "dense",
    ),
    "sparse --out PARENT": (
        ["sparse", "--model", "{dense}", "--out", "{tmp}", "--num_experts", "2", "--quiet"],
        "dense",
    ),
    "sparse --stream false --out MODEL": (
        ["sparse", "--model", "{dense}", "--out", "{dense}", "--stream", "false", "--num_experts", "2", "--quiet"],
        "dense",
    ),
    "sparse --format mixtral --out MODEL": (
        [
            "sparse",
            "--model",
            "{dense}",
            "--out",
            "{dense}",
            "--layers",
            "all",
            "--format",
            "mixtral",
            "--num_experts",
            "2",
            "--quiet",
        ],
        "dense",
    ),
    "export --out MODEL": (["export", "{moe}", "--to", "qwen2_moe", "--out", "{moe}", "--quiet"], "moe"),
    "export --out PARENT": (["export", "{moe}", "--to", "qwen2_moe", "--out", "{tmp}", "--quiet"], "moe"),
    "tile --out MODEL": (["tile", "--model", "{dense}", "--factor", "2", "--out", "{dense}"], "dense"),
    "tile --out PARENT": (["tile", "--model", "{dense}", "--factor", "2", "--out", "{tmp}"], "dense"),
    "bam --out SEED": (["bam", "--seed", "{dense}", "--experts", "{other}", "--out", "{dense}"], "dense"),
    "btx --out PARENT of an expert": (["btx", "--seed", "{dense}", "--experts", "{other}", "--out", "{tmp}"], "other"),
    "train --out MODEL": (
        ["train", "--model", "{moe}", "--data", "{data}", "--out", "{moe}", "--steps", "1", *TRAIN],
        "moe",
    ),
    "train --out PARENT": (
        ["train", "--model", "{moe}", "--data", "{data}", "--out", "{tmp}", "--steps", "1", *TRAIN],
        "moe",
    ),
    "branch --out PARENT of the seed": (
        [
            "branch",
            "--seed",
            "{dense}",
            "--domains",
            "dense={data}",
            "--out",
            "{tmp}",
            "--steps",
            "1",
            "--batch_size",
            "2",
            "--seq_len",
            "16",
            "--eval_every",
            "0",
            "--quiet",
        ],
        "dense",
    ),
}


@pytest.mark.parametrize("case", list(AT_OR_ABOVE))
def test_out_at_or_above_an_input_is_refused(base, tmp_path, case):
    argv, guarded = AT_OR_ABOVE[case]
    for name in ("dense", "other", "moe"):
        src(base, tmp_path, name)
    shutil.copy(base / "data.txt", tmp_path / "data.txt")
    paths = {
        "tmp": tmp_path,
        "dense": tmp_path / "dense",
        "other": tmp_path / "other",
        "moe": tmp_path / "moe",
        "data": tmp_path / "data.txt",
    }
    before = tree_hash(paths[guarded])
    r = cli(*[a.format(**paths) for a in argv], "--overwrite")
    assert tree_hash(paths[guarded]) == before, f"the input {guarded} was changed or deleted"
    refused(r, r"--out|output|input|source")
    assert leftovers(tmp_path) == [] and leftovers(tmp_path.parent) == []


def test_out_at_an_input_without_overwrite_is_refused(base, tmp_path):
    dense = src(base, tmp_path, "dense")
    before = tree_hash(dense)
    refused(cli("sparse", "--model", dense, "--out", dense, "--quiet"), "already exists|--out")
    assert tree_hash(dense) == before


def test_experiment_out_above_its_recipe_is_refused(tmp_path):
    d = tmp_path / "study"
    d.mkdir()
    recipe = d / "recipe.yaml"
    # a recipe that fails at its data, after the --out handling: nothing long runs whatever the code does
    recipe.write_text((ROOT / "recipes" / "tiny.yaml").read_text().replace("corpus: python", "corpus: nosuch"))
    before = tree_hash(recipe)
    r = cli("experiment", recipe, "--out", d, "--overwrite", "--quiet")
    assert tree_hash(recipe) == before, "the recipe was deleted"
    refused(r, r"--out|recipe|input")


@pytest.mark.parametrize(
    "command, recipe",
    [
        ("experiment", "paper-small.yaml"),
        ("experiment", "upcycling-regime.yaml"),
        ("bam-experiment", "bam-small.yaml"),
        ("vit-experiment", "vit-small.yaml"),
    ],
)
def test_a_study_default_out_holding_its_recipe_is_refused(tmp_path, monkeypatch, command, recipe):
    """The default OUT (runs/<recipe name>-tiny) is checked like a given one: vit-experiment used to run and then
    replace the directory, recipe and all."""
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "runs" / "r-tiny" / "r.yaml"
    mine.parent.mkdir(parents=True)
    mine.write_text((ROOT / "recipes" / recipe).read_text())
    before = tree_hash(mine.parent)
    refused(cli(command, "runs/r-tiny/r.yaml", "--tiny", "--quiet"), r"holds the input")
    assert tree_hash(mine.parent) == before


def test_plot_out_onto_its_input_is_refused(base, tmp_path):
    curves = tmp_path / "curves.png"  # a metrics.csv under a .png name
    shutil.copy(base / "run" / "metrics.csv", curves)
    before = tree_hash(curves)
    r = cli("plot", curves, "--out", curves)
    assert tree_hash(curves) == before, "the input metrics were overwritten"
    refused(r, r"--out|input")


def test_two_conversions_to_one_out(base, wide, tmp_path):
    out = tmp_path / "moe"
    first = ["sparse", "--model", wide, "--out", out, "--layers", "all", "--num_experts", 8, "--quiet"]
    with reaped(paused_in_write(first, out)) as proc:
        second = cli("sparse", "--model", base / "dense", "--out", out, "--num_experts", 2, "--quiet")
        after_second = tree_hash(out)
        r1 = finish(proc)
    results = {"first": r1, "second": second}
    winners = [k for k, r in results.items() if r.code == 0]
    assert len(winners) == 1, {k: (r.code, r.err[-500:]) for k, r in results.items()}
    loser = results["second" if winners == ["first"] else "first"]
    refused(loser, r"--out|exists|appeared|another")
    experts = json.loads((out / "upcycle.json").read_text())["plan"]["num_experts"]
    assert experts == (8 if winners == ["first"] else 2)
    if winners == ["second"]:
        assert tree_hash(out) == after_second, "the second conversion's output was replaced"
    assert leftovers(tmp_path) == []


def test_the_final_rename_never_replaces(tmp_path):
    """The primitive under every output: an existing file or directory (empty or not) at the target stays."""
    from upcycle.io.dirs import rename_noreplace

    for kind in ("empty dir", "dir", "file"):
        src_dir, dst = tmp_path / f"src-{len(kind)}", tmp_path / f"dst-{len(kind)}"
        src_dir.mkdir()
        (src_dir / "new.txt").write_text("new\n")
        if kind == "file":
            dst.write_text("mine\n")
        else:
            dst.mkdir()
            if kind == "dir":
                (dst / "mine.txt").write_text("mine\n")
        before = tree_hash(dst)
        with pytest.raises(FileExistsError):
            rename_noreplace(src_dir, dst)
        assert tree_hash(dst) == before and (src_dir / "new.txt").is_file()
    rename_noreplace(src_dir, tmp_path / "fresh")
    assert (tmp_path / "fresh" / "new.txt").read_text() == "new\n"


def test_publish_onto_the_study_is_refused(tmp_path):
    d = tmp_path / "study"
    d.mkdir()
    (d / "recipe.json").write_text("{}\n")
    recipe = ROOT / "recipes" / "upcycling-regime.yaml"
    before = tree_hash(d)
    r = cli("experiment", recipe, "--out", d, "--publish", d)
    refused(r, r"--publish")
    assert tree_hash(d) == before


DIR_APPEARS = {
    "sparse": ["sparse", "--model", "{wide}", "--out", "{out}", "--layers", "all", "--num_experts", "8", "--quiet"],
    "sparse --stream false": [
        "sparse",
        "--model",
        "{wide}",
        "--out",
        "{out}",
        "--layers",
        "all",
        "--num_experts",
        "8",
        "--stream",
        "false",
        "--quiet",
    ],
    "tile": ["tile", "--model", "{wide}", "--factor", "8", "--out", "{out}"],
}


@pytest.mark.parametrize("case", list(DIR_APPEARS))
def test_directory_appearing_at_out_during_a_run_survives(wide, tmp_path, case):
    out = tmp_path / "out"
    argv = [a.format(wide=wide, out=out) for a in DIR_APPEARS[case]]
    with reaped(paused_in_write(argv, out)) as proc:
        out.mkdir()
        (out / "precious.txt").write_text("made while the conversion ran\n")
        before = tree_hash(out)
        r = finish(proc)
    assert tree_hash(out) == before, "the directory made during the run was replaced"
    refused(r, r"--out|exists|appeared")
    assert leftovers(tmp_path) == []


# ============================================================================ 2. silently wrong output
def drop_experts(d: Path) -> None:
    def fn(sd):
        key = next(k for k in sd if k.endswith("mlp.experts.gate_proj"))
        sd[key] = sd[key][:-1].clone()  # one expert fewer than config.json and upcycle.json say

    rewrite_tensors(d, fn)


def drop_tensor(d: Path, key: str = "model.layers.1.mlp.up_proj.weight") -> None:
    rewrite_tensors(d, lambda sd: sd.pop(key))


def test_tile_refuses_an_upcycled_model(base, tmp_path):
    out = tmp_path / "deep"
    refused(cli("tile", "--model", base / "moe", "--factor", 2, "--out", out), r"upcycle|MoE|expert|native")
    nothing_written(out)


def test_export_refuses_an_expert_tensor_lacking_experts(base, tmp_path):
    moe = src(base, tmp_path, "moe")
    drop_experts(moe)
    before = tree_hash(moe)
    out = tmp_path / "stock"
    refused(cli("export", moe, "--to", "qwen2_moe", "--out", out, "--quiet"), r"gate_proj|expert")
    nothing_written(out)
    assert tree_hash(moe) == before


MISSING_TENSOR = {
    "tile": (
        ["tile", "--model", "{d}", "--factor", "2", "--out", "{out}"],
        "the missing MLP weight is initialised at random, exit 0",
    ),
    "bam": (
        ["bam", "--seed", "{seed}", "--experts", "{d}", "--out", "{out}"],
        "the missing MLP weight is initialised at random and mixed in, exit 0",
    ),
    "btx": (
        ["btx", "--seed", "{seed}", "--experts", "{d}", "--out", "{out}"],
        "the missing MLP weight is initialised at random and mixed in, exit 0",
    ),
    "train": (
        ["train", "--model", "{d}", "--data", "{data}", "--out", "{out}", "--steps", "1", *TRAIN],
        "the missing MLP weight is initialised at random and trained, exit 0",
    ),
    "eval": (
        ["eval", "{d}", "--text", "{data}", "--tokens", "64", "--context", "32", "--out", "{out}"],
        "a perplexity of a model with a random MLP is reported, exit 0",
    ),
}


@pytest.mark.parametrize("cmd", list(MISSING_TENSOR))
def test_a_dense_input_missing_a_tensor_is_refused(base, tmp_path, cmd):
    d = src(base, tmp_path, "dense")
    drop_tensor(d)
    before = tree_hash(d)
    out = tmp_path / "out"
    argv = [a.format(d=d, seed=base / "other", data=base / "data.txt", out=out) for a in MISSING_TENSOR[cmd][0]]
    refused(cli(*argv), r"up_proj|missing|tensor")
    nothing_written(out)
    assert tree_hash(d) == before


def test_sparse_refuses_a_dense_input_missing_a_tensor(base, tmp_path):
    """What every command should do, as `sparse` already does."""
    d = src(base, tmp_path, "dense")
    drop_tensor(d)
    out = tmp_path / "out"
    refused(cli("sparse", "--model", d, "--out", out, "--quiet"), r"up_proj")
    nothing_written(out)


# ============================================================================ 3. tracebacks
# --- OSError while writing: a read-only filesystem
READ_ONLY = {
    "sparse": ["sparse", "--model", "{dense}", "--out", "{out}", "--num_experts", "2", "--quiet"],
    "sparse --stream false": [
        "sparse",
        "--model",
        "{dense}",
        "--out",
        "{out}",
        "--num_experts",
        "2",
        "--stream",
        "false",
        "--quiet",
    ],
    "export": ["export", "{moe}", "--to", "qwen2_moe", "--out", "{out}", "--quiet"],
    "tile": ["tile", "--model", "{dense}", "--factor", "2", "--out", "{out}"],
    "btx": ["btx", "--seed", "{dense}", "--experts", "{other}", "--out", "{out}"],
    "train": ["train", "--model", "{moe}", "--data", "{data}", "--out", "{out}", "--steps", "2", *TRAIN],
    "eval --out": ["eval", "{moe}", "--text", "{data}", "--tokens", "64", "--context", "32", "--out", "{out}"],
    "plot": ["plot", "{run}", "--out", "{out}.png"],
}


@pytest.mark.parametrize("cmd", list(READ_ONLY))
def test_read_only_filesystem(base, tmpfs, cmd):
    ro = tmpfs("256m", readonly=True)  # large: the free-space check must not be what refuses
    out = ro / "out"
    argv = [
        a.format(
            dense=base / "dense",
            other=base / "other",
            moe=base / "moe",
            run=base / "run",
            data=base / "data.txt",
            out=out,
        )
        for a in READ_ONLY[cmd]
    ]
    inputs = [base / n for n in ("dense", "other", "moe", "run", "data.txt")]
    before = [tree_hash(p) for p in inputs]
    refused(cli(*argv), r"read-only|writ|permission")
    assert list(ro.iterdir()) == []
    assert [tree_hash(p) for p in inputs] == before


# --- OSError while writing: a full filesystem
def test_sparse_when_the_disk_fills_during_the_write(wide, tmpfs):
    disk = tmpfs("100m")  # passes the free-space check (~25 MB + the margin); then another writer fills it
    out = disk / "moe"
    argv = ["sparse", "--model", wide, "--out", out, "--layers", "all", "--num_experts", 8, "--quiet"]
    with reaped(paused_in_write(argv, out)) as proc:
        free = shutil.disk_usage(disk).free
        with open(disk / "filler", "wb") as f:
            f.write(b"\0" * (free - (1 << 20)))
        r = finish(proc)
    refused(r, r"space|full")
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


@pytest.mark.parametrize("sig", ["SIGKILL"])
def test_killed_conversion_is_cleaned_up_by_the_next_run(base, wide, tmp_path, sig):
    """kill -9 inside the write leaves a hidden temporary directory; the next run to that --out removes it."""
    out = tmp_path / "moe"
    argv = ["sparse", "--model", wide, "--out", out, "--layers", "all", "--num_experts", 8, "--quiet"]
    with reaped(paused_in_write(argv, out)) as proc:
        os.kill(proc.pid, getattr(signal, sig))
        proc.communicate()
    assert not out.exists()
    ok(cli("sparse", "--model", base / "dense", "--out", out, "--num_experts", 2, "--quiet"))
    assert leftovers(tmp_path) == []
    assert (out / "upcycle.json").is_file()


def test_sparse_to_a_full_filesystem_is_refused_before_writing(base, tmpfs):
    full = tmpfs("2m")
    out = full / "moe"
    refused(cli("sparse", "--model", base / "dense", "--out", out, "--num_experts", 2, "--quiet"), r"space")
    assert list(full.iterdir()) == []


def test_tile_to_a_full_filesystem(base, tmpfs):
    full = tmpfs("512k")  # the tiled model is ~1 MB
    out = full / "deep"
    refused(cli("tile", "--model", base / "dense", "--factor", 2, "--out", out), r"space|full")
    assert list(full.iterdir()) == []


def test_train_checkpoint_to_a_full_filesystem(base, tmpfs):
    full = tmpfs("1m")  # metrics fit; a checkpoint (~2.7 MB of weights and AdamW moments) does not
    out = full / "run"
    r = cli(
        "train",
        "--model",
        base / "moe",
        "--data",
        base / "data.txt",
        "--out",
        out,
        "--steps",
        2,
        "--checkpoint-every",
        1,
        *TRAIN,
    )
    refused(r, r"space|full")
    if (out / "checkpoints").is_dir():  # the run's logs may stay, a half-written checkpoint may not
        assert leftovers(out / "checkpoints") == [] and not list((out / "checkpoints").glob("step-*"))


# --- names and places the hidden temporary directory cannot take
@pytest.mark.parametrize("cmd", ["sparse", "tile"])
def test_out_name_too_long_once_the_temporary_prefix_is_added(base, tmp_path, cmd):
    out = tmp_path / ("n" * 250)  # a legal name; ".NAME.tmp-PID-XXXXXXXX" is not
    argv = {
        "sparse": ["sparse", "--model", base / "dense", "--out", out, "--num_experts", 2, "--quiet"],
        "tile": ["tile", "--model", base / "dense", "--factor", 2, "--out", out],
    }[cmd]
    refused(cli(*argv), r"name|long|--out")
    nothing_written(out)


def test_out_dot_with_overwrite(base, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine\n")
    before = tree_hash(work)
    monkeypatch.chdir(work)
    r = cli("sparse", "--model", base / "dense", "--out", ".", "--overwrite", "--num_experts", 2, "--quiet")
    assert tree_hash(work) == before, "the working directory was changed"
    refused(r, r"--out|\.")
    assert leftovers(tmp_path) == []


def test_out_dot_without_overwrite_is_refused(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(cli("sparse", "--model", base / "dense", "--out", ".", "--quiet"), r"exists")
    assert leftovers(tmp_path) == []


# --- damaged native directories, given to every reader
def _truncated(d):
    truncate(d / SHARD)


def _bad_meta(d):
    (d / "upcycle.json").write_text('{"format": "upcycle-native", "format_version": 1, "plan": ')


def _bad_index(d):
    (d / INDEX).write_text('{"metadata": {}, "weight_map": ')


def _wrong_shape(d):
    def fn(sd):
        k = "model.layers.0.self_attn.q_proj.weight"
        sd[k] = torch.zeros(sd[k].shape[0] + 4, sd[k].shape[1])

    rewrite_tensors(d, fn)


NATIVE_DAMAGE = {
    "truncated shard": (_truncated, SHARD),
    "invalid upcycle.json": (_bad_meta, "upcycle.json"),
    "invalid index": (_bad_index, INDEX),
    "wrong shape": (_wrong_shape, "q_proj|shape"),
}
NATIVE_READERS = {
    "check": ["check", "{d}", "--against", "{dense}", "--text", "{data}", "--tokens", "64", "--context", "32"],
    "eval": ["eval", "{d}", "--text", "{data}", "--tokens", "64", "--context", "32"],
    "train": ["train", "--model", "{d}", "--data", "{data}", "--out", "{out}", "--steps", "1", *TRAIN],
    "export": ["export", "{d}", "--to", "qwen2_moe", "--out", "{out}", "--quiet"],
}


def _native_cases():
    for dmg in NATIVE_DAMAGE:
        for reader in [*NATIVE_READERS, "upcycle.load"]:
            yield pytest.param(dmg, reader, id=f"{dmg}-{reader}")


@pytest.mark.parametrize("damage, reader", list(_native_cases()))
def test_damaged_native_directory(base, tmp_path, damage, reader):
    d = src(base, tmp_path, "moe")
    fn, names = NATIVE_DAMAGE[damage]
    fn(d)
    before = tree_hash(d)
    out = tmp_path / "out"
    if reader == "upcycle.load":
        with pytest.raises(UpcycleError, match=re.compile(names, re.IGNORECASE)):
            upcycle.load(d)
    else:
        argv = [a.format(d=d, dense=base / "dense", data=base / "data.txt", out=out) for a in NATIVE_READERS[reader]]
        refused(cli(*argv), names)
        nothing_written(out)
    assert tree_hash(d) == before


# --- damaged dense directories
DENSE_DAMAGE = {
    "truncated model.safetensors": (lambda d: truncate(d / "model.safetensors"), "model.safetensors"),
    "invalid index": (lambda d: (d / INDEX).write_text("{not json"), INDEX),
}
DENSE_READERS = {
    "sparse": ["sparse", "--model", "{d}", "--out", "{out}", "--quiet"],
    "tile": ["tile", "--model", "{d}", "--factor", "2", "--out", "{out}"],
    "bam": ["bam", "--seed", "{seed}", "--experts", "{d}", "--out", "{out}"],
    "eval": ["eval", "{d}", "--text", "{data}", "--tokens", "64", "--context", "32"],
}


def _dense_cases():
    for dmg in DENSE_DAMAGE:
        for reader in DENSE_READERS:
            yield pytest.param(dmg, reader, id=f"{dmg}-{reader}")


@pytest.mark.parametrize("damage, reader", list(_dense_cases()))
def test_damaged_dense_directory(base, tmp_path, damage, reader):
    d = src(base, tmp_path, "dense")
    fn, names = DENSE_DAMAGE[damage]
    fn(d)
    before = tree_hash(d)
    out = tmp_path / "out"
    argv = [a.format(d=d, seed=base / "other", data=base / "data.txt", out=out) for a in DENSE_READERS[reader]]
    refused(cli(*argv), re.escape(names))
    nothing_written(out)
    assert tree_hash(d) == before


def test_check_with_no_tokenizer_anywhere(base, tmp_path):
    moe, dense = src(base, tmp_path, "moe"), src(base, tmp_path, "dense")
    for d in (moe, dense):
        for f in d.glob("*token*"):
            f.unlink()
    refused(cli("check", moe, "--against", dense, "--text", base / "data.txt", "--context", 32), r"tokeni[sz]er")


@pytest.mark.parametrize("cmd", ["eval", "train"])
def test_no_tokenizer_files(base, tmp_path, cmd):
    moe = src(base, tmp_path, "moe")
    for f in moe.glob("*token*"):
        f.unlink()
    out = tmp_path / "out"
    argv = {
        "eval": ["eval", moe, "--text", base / "data.txt", "--context", 32],
        "train": ["train", "--model", moe, "--data", base / "data.txt", "--out", out, "--steps", 1, *TRAIN],
    }[cmd]
    refused(cli(*argv), r"tokeni[sz]er")
    nothing_written(out)


# --- plan and config files
@pytest.mark.parametrize("cmd", ["plan", "sparse", "tile", "train --config"])
def test_file_that_is_not_utf8(base, tmp_path, cmd):
    f = tmp_path / "plan.yaml"
    f.write_bytes(b"num_experts: 4\n# caf\xe9 \xff\xfe\n")
    out = tmp_path / "out"
    argv = {
        "plan": ["plan", "--plan", f],
        "sparse": ["sparse", "--model", base / "dense", "--plan", f, "--out", out, "--quiet"],
        "tile": ["tile", "--model", base / "dense", "--plan", f, "--out", out],
        "train --config": [
            "train",
            "--model",
            base / "moe",
            "--data",
            base / "data.txt",
            "--config",
            f,
            "--out",
            out,
            "--quiet",
        ],
    }[cmd]
    refused(cli(*argv), re.escape(f.name))
    nothing_written(out)


# --- check: empty text, NaN weights
def test_check_empty_text(base, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    refused(cli("check", base / "moe", "--against", base / "dense", "--text", empty), r"empty\.txt|token")


def test_eval_empty_text(base, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    refused(cli("eval", base / "moe", "--text", empty), r"empty\.txt")


def test_check_nan_weights(base, tmp_path):
    dense = src(base, tmp_path, "dense")

    def fn(sd):
        for k in sd:
            if k.endswith("norm.weight"):
                sd[k] = torch.full_like(sd[k], float("nan"))

    rewrite_tensors(dense, fn)
    moe = tmp_path / "moe"
    cli("sparse", "--model", dense, "--out", moe, "--num_experts", 2, "--quiet")  # warns or refuses (kind 5)
    if not moe.is_dir():
        moe = base / "moe"
    r = cli("check", moe, "--against", dense, "--text", base / "data.txt", "--tokens", 64, "--context", 32)
    refused(r, r"nan|finite")


# --- config.json with a negative size
@pytest.mark.parametrize(
    "cmd",
    [
        "sparse",
        "tile",
        "eval",
    ],
)
def test_negative_size_in_config(base, tmp_path, cmd):
    d = src(base, tmp_path, "dense")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = -96
    (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    argv = {
        "sparse": ["sparse", "--model", d, "--out", out, "--quiet"],
        "tile": ["tile", "--model", d, "--factor", 2, "--out", out],
        "eval": ["eval", d, "--text", base / "data.txt", "--context", 32],
    }[cmd]
    refused(cli(*argv), r"intermediate_size|config\.json")
    nothing_written(out)


# --- a tokenizer larger than the model's vocabulary
def big_tokenizer(d: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(300)}, **{w: 301 + i for i, w in enumerate(WORDS[:40])}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(d)
    return d


@pytest.mark.parametrize(
    "cmd",
    [
        "train",
        "eval",
    ],
)
def test_tokenizer_larger_than_the_vocabulary(base, tmp_path, cmd):
    tok = big_tokenizer(tmp_path / "tok")
    out = tmp_path / "out"
    argv = {
        "train": [
            "train",
            "--model",
            base / "moe",
            "--tokenizer",
            tok,
            "--data",
            base / "data.txt",
            "--out",
            out,
            "--steps",
            1,
            *TRAIN,
        ],
        "eval": ["eval", base / "moe", "--tokenizer", tok, "--text", base / "data.txt", "--context", 32],
    }[cmd]
    refused(cli(*argv), r"vocab")
    nothing_written(out)


def test_damaged_token_cache_is_rebuilt(base, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("UPCYCLE_CACHE", str(cache))
    data = tmp_path / "d.txt"
    data.write_text(corpus_text(seed=3))
    ok(cli("train", "--model", base / "moe", "--data", data, "--out", tmp_path / "a", "--steps", 1, *TRAIN))
    files = list((cache / "tokens").glob("*.pt"))
    assert len(files) == 1
    truncate(files[0], 0.3)
    r = ok(cli("train", "--model", base / "moe", "--data", data, "--out", tmp_path / "b", "--steps", 1, *TRAIN))
    assert (tmp_path / "b" / "summary.json").is_file(), r.err


# --- the traceback behind --debug
def test_debug_shows_the_traceback(base, tmp_path):
    moe = src(base, tmp_path, "moe")
    _truncated(moe)
    shown = []
    for argv in (["--debug", "eval", moe], ["eval", moe, "--debug"]):
        r = cli(*argv, "--text", base / "data.txt", "--context", 32)
        shown.append(r.tb is not None or "Traceback (most recent call last)" in r.err)
    assert any(shown)


def test_console_script_error_has_no_traceback(tmp_path):
    """The same promise through the console script's code path: one line, exit 2."""
    p = subprocess.run(
        [sys.executable, "-m", "upcycle", "sparse", "--model", tmp_path / "missing", "--out", tmp_path / "out"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("upcycle: error: model directory not found")
    nothing_written(tmp_path / "out")


# ============================================================================ 4. resume of a damaged run
def resume(base, run, *extra) -> Result:
    return cli(
        "train",
        "--model",
        base / "moe",
        "--data",
        base / "data.txt",
        "--out",
        run,
        "--resume",
        "--chunk-chars",
        "1000",
        "--quiet",
        *extra,
    )


RESUME_DAMAGE = {
    "truncated optimizer.pt": (lambda c: truncate(c / "optimizer.pt"), "optimizer.pt"),
    "truncated model.safetensors": (lambda c: truncate(c / "model.safetensors"), "model.safetensors"),
    "invalid state.json": (lambda c: (c / "state.json").write_text('{"step": 4, "hist'), "state.json"),
    "truncated rng.pt": (lambda c: truncate(c / "rng.pt"), "rng.pt"),
}


@pytest.mark.parametrize("damage", list(RESUME_DAMAGE))
def test_resume_skips_a_damaged_newest_checkpoint(base, tmp_path, damage):
    run = src(base, tmp_path, "run")
    fn, name = RESUME_DAMAGE[damage]
    fn(run / "checkpoints" / "step-000004")
    r = ok(resume(base, run))
    assert re.search(re.escape(name), r.err), f"the damaged file is not named:\n{r.err}"
    assert re.search(r"step[- ]0*2\b", r.err + r.out), f"the checkpoint resumed from is not named:\n{r.err}"
    assert "trained 6 steps" in r.out


def test_resume_refuses_when_no_checkpoint_is_intact(base, tmp_path):
    run = src(base, tmp_path, "run")
    for c in (run / "checkpoints").iterdir():
        truncate(c / "optimizer.pt")
    before = tree_hash(run)
    refused(resume(base, run), r"optimizer\.pt|checkpoint")
    assert tree_hash(run) == before


def test_resume_ignores_a_stray_copy(base, tmp_path):
    run = src(base, tmp_path, "run")
    shutil.copytree(run / "checkpoints" / "step-000002", run / "checkpoints" / "step-000030.bak")
    r = ok(resume(base, run))
    assert "trained 6 steps" in r.out


def test_resume_after_a_kill_during_a_checkpoint_write(base, tmp_path):
    """A checkpoint write killed half-way leaves only a hidden temporary directory: resume uses the newest
    complete checkpoint."""
    run = src(base, tmp_path, "run")
    stale = run / "checkpoints" / ".step-000006.tmp-999999999-abcd"
    shutil.copytree(run / "checkpoints" / "step-000004", stale)
    truncate(stale / "optimizer.pt")
    r = ok(resume(base, run))
    assert "trained 6 steps" in r.out


CHANGES = {"lr": (["--lr", "5e-3"], r"\blr\b"), "batch size": (["--batch-size", "4"], r"batch.size")}


@pytest.mark.parametrize("change", list(CHANGES))
def test_resume_with_changed_hyperparameters_is_refused(base, tmp_path, change):
    run = src(base, tmp_path, "run")
    before = tree_hash(run)
    recorded = (run / "train_config.yaml").read_text()
    flags, named = CHANGES[change]
    r = resume(base, run, *flags)
    assert (run / "train_config.yaml").read_text() == recorded, "the run's recorded config was rewritten"
    refused(r, named)
    assert tree_hash(run) == before


def test_resume_with_changed_hyperparameters_accepted_keeps_the_old_config(base, tmp_path):
    run = src(base, tmp_path, "run")
    recorded = (run / "train_config.yaml").read_text()
    r = ok(resume(base, run, "--lr", "5e-3", "--accept-changes"))
    assert "trained 6 steps" in r.out
    assert (run / "train_config.step-000004.yaml").read_text() == recorded
    assert "lr: 0.005" in (run / "train_config.yaml").read_text()


def test_resume_with_the_same_hyperparameters_given_again(base, tmp_path):
    run = src(base, tmp_path, "run")
    r = ok(resume(base, run, "--lr", "1e-3", "--batch-size", "2"))
    assert "trained 6 steps" in r.out


def killed_before_first_checkpoint(base, run: Path, argv: list, tries: int = 3) -> None:
    for _ in range(tries):
        shutil.rmtree(run, ignore_errors=True)
        proc = spawn(*argv)
        with reaped(proc):
            started = pause_at(proc, lambda: (run / "train_config.yaml").is_file())
            if started:
                proc.kill()  # SIGKILL while stopped
                proc.communicate()
        if started and not (run / "checkpoints").exists() and not (run / "summary.json").exists():
            return
    raise AssertionError("could not kill the run before its first checkpoint")


@pytest.fixture
def killed_run(base, tmp_path):
    run = tmp_path / "run"
    argv = [
        "train",
        "--model",
        base / "moe",
        "--data",
        base / "data.txt",
        "--out",
        run,
        "--steps",
        4,
        "--checkpoint-every",
        2,
        *TRAIN,
    ]
    killed_before_first_checkpoint(base, run, argv)
    return run, argv


def test_a_run_killed_before_its_first_checkpoint_starts_again(killed_run):
    run, argv = killed_run
    ok(cli(*argv))
    assert (run / "summary.json").is_file()


def test_resume_of_a_run_killed_before_its_first_checkpoint_is_clean(killed_run):
    _, argv = killed_run
    r = cli(*argv, "--resume")
    if r.code != 0:
        refused(r, r"checkpoint|resume")


# ============================================================================ 5. acceptable but not right
def index_outside(base, tmp_path) -> Path:
    d = src(base, tmp_path, "dense")
    shutil.move(d / "model.safetensors", tmp_path / "elsewhere.safetensors")
    keys = list(load_file(str(tmp_path / "elsewhere.safetensors")))
    (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {k: "../elsewhere.safetensors" for k in keys}}))
    return d


@pytest.mark.parametrize("cmd", ["sparse", "eval"])
def test_index_naming_a_shard_outside_the_directory(base, tmp_path, cmd):
    d = index_outside(base, tmp_path)
    out = tmp_path / "out"
    argv = {
        "sparse": ["sparse", "--model", d, "--out", out, "--quiet"],
        "eval": ["eval", d, "--text", base / "data.txt", "--context", 32],
    }[cmd]
    refused(cli(*argv), re.escape(INDEX) + "|outside|elsewhere")
    nothing_written(out)


def _nan(sd):
    sd["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")


def _inf(sd):
    sd["model.layers.1.mlp.down_proj.weight"][0, 0] = float("inf")


def _int(sd):
    sd["model.layers.1.mlp.down_proj.weight"] = (sd["model.layers.1.mlp.down_proj.weight"] * 100).to(torch.int32)


@pytest.mark.parametrize(
    "damage, stream",
    [
        (_nan, "true"),
        (_inf, "true"),
        (_nan, "false"),
        (_int, "true"),
    ],
    ids=["nan", "inf", "nan-in-memory", "int32"],
)
def test_non_finite_or_integer_weights_are_flagged(base, tmp_path, damage, stream):
    d = src(base, tmp_path, "dense")
    rewrite_tensors(d, damage)
    out = tmp_path / "out"
    r = cli("sparse", "--model", d, "--out", out, "--stream", stream, "--quiet")
    assert r.tb is None, r.tb
    assert r.code in (0, 2), r.err
    assert "down_proj" in r.err and re.search(r"nan|inf|finite|int", r.err, re.IGNORECASE), (
        f"no word about the weight (exit {r.code}):\n{r.err}"
    )
    if r.code == 2:
        refused(r, "down_proj")
        nothing_written(out)


@pytest.mark.parametrize("where", ["flag", "plan file"])
def test_duplicate_layer_indices_are_refused_for_the_right_reason(tmp_path, where):
    if where == "flag":
        r = cli("plan", "--layers", "1,3,1")
    else:
        f = tmp_path / "plan.yaml"
        f.write_text('layers: "1,3,1"\n')
        r = cli("plan", "--plan", f)
    refused(r, r"repeat(s|ed)? (an )?index|duplicated? (index|indices|layer)|twice|more than once")


def test_duplicate_layer_indices_in_a_yaml_list(tmp_path):
    f = tmp_path / "plan.yaml"
    f.write_text("layers: [1, 3, 1]\n")
    refused(cli("plan", "--plan", f), r"repeat|duplicate|twice")


@pytest.mark.parametrize("cmd", ["plan", "train --config"])
def test_a_key_given_twice_in_a_file(base, tmp_path, cmd):
    f = tmp_path / "file.yaml"
    f.write_text("num_experts: 2\nnum_experts: 4\n" if cmd == "plan" else "steps: 1\nlr: 1e-3\nsteps: 2\n")
    out = tmp_path / "out"
    argv = (
        ["plan", "--plan", f]
        if cmd == "plan"
        else ["train", "--model", base / "moe", "--data", base / "data.txt", "--config", f, "--out", out, *TRAIN]
    )
    refused(cli(*argv), r"num_experts|steps")
    nothing_written(out)


def test_free_space_message_does_not_contradict_itself(base, tmpfs):
    full = tmpfs("8m")  # more than the output, less than output + margin
    line = refused(
        cli("sparse", "--model", base / "dense", "--out", full / "moe", "--num_experts", 2, "--quiet"), r"space"
    )
    m = re.search(r"need ([0-9.]+) ([KMG]?B).*?([0-9.]+) ([KMG]?B) free", line)
    if m:
        unit = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}
        need, free = float(m.group(1)) * unit[m.group(2)], float(m.group(3)) * unit[m.group(4)]
        assert need > free or re.search(r"margin|reserve", line, re.IGNORECASE), line


@pytest.mark.parametrize("cmd", ["sparse", "tile"])
def test_sigterm_removes_the_temporary_directory(wide, tmp_path, cmd):
    out = tmp_path / "out"
    argv = [a.format(wide=wide, out=out) for a in DIR_APPEARS[cmd]]
    with reaped(paused_in_write(argv, out)) as proc:
        os.kill(proc.pid, signal.SIGTERM)
        r = finish(proc)
    assert r.code != 0
    assert r.tb is None, r.err[-2000:]
    nothing_written(out)


def test_seq_len_above_max_position_embeddings_is_flagged(base, tmp_path):
    out = tmp_path / "run"
    argv = [a for a in TRAIN if a not in ("--seq-len", "16")]
    r = cli(
        "train",
        "--model",
        base / "moe",
        "--data",
        base / "data.txt",
        "--out",
        out,
        "--steps",
        1,
        "--seq-len",
        256,
        *argv,
    )  # the tiny models have max_position_embeddings 128
    assert r.tb is None, r.tb
    assert "max_position_embeddings" in r.err, f"exit {r.code}, stderr:\n{r.err}"
    if r.code != 0:
        refused(r, "max_position_embeddings")
        nothing_written(out)


def test_stop_at_zero_is_not_silent(base, tmp_path):
    out = tmp_path / "run"
    r = cli(
        "train",
        "--model",
        base / "moe",
        "--data",
        base / "data.txt",
        "--out",
        out,
        "--steps",
        2,
        "--stop-at",
        0,
        *TRAIN,
    )
    assert r.tb is None, r.tb
    if r.code == 2:
        refused(r, "stop")
    else:
        assert r.code == 0 and re.search(r"stop", r.out + r.err, re.IGNORECASE), f"exit {r.code}: {r.out!r} {r.err!r}"
        assert (out / "checkpoints").is_dir(), "stopped without a checkpoint to resume from"


def test_check_against_a_model_that_is_not_the_source(base):
    r = cli(
        "check", base / "moe", "--against", base / "other", "--text", base / "data.txt", "--tokens", 64, "--context", 32
    )
    assert r.tb is None, r.tb
    assert re.search(r"hash|sha256|source|upcycle\.json", r.err, re.IGNORECASE), f"no warning:\n{r.err}"


def test_check_against_its_source_does_not_warn(base):
    r = ok(
        cli(
            "check",
            base / "moe",
            "--against",
            base / "dense",
            "--text",
            base / "data.txt",
            "--tokens",
            64,
            "--context",
            32,
        )
    )
    assert not re.search(r"warn|differ", r.err, re.IGNORECASE), r.err


def test_eval_refuses_a_binary_file(base, tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 16)
    refused(cli("eval", base / "moe", "--text", blob, "--context", 32), r"blob\.bin")


def test_train_refuses_a_binary_file(base, tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 16)
    out = tmp_path / "run"
    refused(cli("train", "--model", base / "moe", "--data", blob, "--out", out, "--steps", 1, *TRAIN), r"binary")
    nothing_written(out)


def _limit_memory():  # runs in the child: a tile that sizes nothing first hits this, not the machine
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def test_tile_huge_factor_is_sized_first(base, tmpfs):
    small = tmpfs("64m")
    out = small / "deep"
    try:
        p = subprocess.run(
            [sys.executable, "-m", "upcycle", "tile", "--model", base / "dense", "--factor", "100000", "--out", out],
            check=False,
            capture_output=True,
            text=True,
            timeout=90,
            preexec_fn=_limit_memory,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("tile --factor 100000 ran for 90 s instead of refusing at once")
    r = Result(p.returncode, p.stdout, p.stderr, p.stderr if "Traceback" in p.stderr else None)
    refused(r, r"space|memory|size|GB")
    assert list(small.iterdir()) == []


# ============================================================ 6. found by a second sweep (303 cases)
def _bert(tmp_path: Path) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    d = tmp_path / "bert"
    c = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    BertForMaskedLM(c).save_pretrained(d)
    return d


def test_families_a_command_does_not_take_are_refused_before_anything_is_written(base, tmp_path):
    bert = _bert(tmp_path)
    out = tmp_path / "out"
    refused(cli("tile", "--model", bert, "--out", out, "--factor", 2), "depth tiling deepens decoder LMs")
    r = cli("train", "--model", bert, "--data", base / "data.txt", "--out", out, "--steps", 1, "--quiet")
    refused(r, "continues decoder LMs", "bert is not one")
    assert not out.exists() and leftovers(tmp_path) == []  # train used to leave train_config.yaml, metrics.csv


def test_check_against_a_model_it_cannot_have_come_from_is_refused(base, tmp_path):
    other = tmp_path / "wider"
    tiny_model("llama", vocab_size=300).save_pretrained(other)  # was an IndexError; a BERT gave figures, exit 0
    refused(cli("check", base / "moe", "--against", other), "vocab_size", "cannot have come from")
    refused(cli("check", base / "moe", "--against", _bert(tmp_path)), "model_type", "cannot have come from")


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["check", "{moe}", "--against", "{dense}", "--max-rel", "nan"], "--max-rel must be a positive number"),
        (["check", "{moe}", "--against", "{dense}", "--max-rel", "-1"], "--max-rel must be a positive number"),
        (["sparse", "--model", "{dense}", "--out", "{out}", "--max-shard-size=-5GB"], "max_shard_size"),
        (["sparse", "--model", "{dense}", "--out", "{out}", "--seed", "99999999999999999999999"], "seed"),
        (["sparse", "--model", "{dense}", "--out", "{out}", "--seed", "-1"], "seed"),
        (["plot", "{run}", "--out", "{out}.png", "--budget", "inf"], "--budget must be a positive"),
        (["bam", "--seed", "{dense}", "--experts", "{other}", "--router-std", "nan", "--out", "{out}"], "router_std"),
        (["btx", "--seed", "{dense}", "--experts", "{other}", "--z-loss-coef", "nan", "--out", "{out}"], "z_loss"),
        (["train", "--data", "", "--out", "{out}"], "an empty argument after --data"),
        (["eval", "{moe}", "--device", "nonsense"], "not a torch device"),
        (["sparse", "--num-experts", "nan", "--out", "{out}"], "sparse: argument --num_experts"),
        (["sparse", "--model", "{dense}", "--out", "{out}", "--layers", "0,2,,3"], "not a comma-separated list"),
        (["train", "--model", "{moe}", "--data", "{data}", "--out", "{out}", "--eps", "0"], "eps: must be positive"),
        (["train", "--model", "{moe}", "--data", "{data}", "--out", "{out}", "--chunk-chars", "0"], "--chunk-chars"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_flag_values_that_cannot_work_are_refused_in_one_line(base, tmp_path, argv, pattern):
    """NaN passed `< 0` checks (BAM routers all NaN, exit 0), a negative shard size wrote one tensor per shard,
    a huge seed overflowed, an empty --data trained on the working directory, argparse printed its usage."""
    names = {"moe": base / "moe", "dense": base / "dense", "other": base / "other", "run": base / "run"}
    names["data"] = base / "data.txt"
    names["out"] = tmp_path / "out"
    refused(cli(*[a.format(**names) for a in argv]), re.escape(pattern))
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_the_python_api_refuses_what_would_lose_or_misread_data(base, tmp_path):
    from transformers import AutoModelForCausalLM

    import upcycle

    dense_dir = src(base, tmp_path, "dense")
    before = tree_hash(dense_dir)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    plan = upcycle.UpcyclePlan(num_experts=2)
    moe = upcycle.upcycle(dense, plan)
    with pytest.raises(UpcycleError, match="is the input"):  # was: the dense source replaced by the MoE
        upcycle.save(moe, plan, dense_dir, source_dir=dense_dir, overwrite=True)
    assert tree_hash(dense_dir) == before
    with pytest.raises(UpcycleError, match="upcycled already"):  # was an AttributeError deep in surgery
        upcycle.upcycle(moe, plan)
    with pytest.raises(UpcycleError, match="plan must be an UpcyclePlan"):
        upcycle.upcycle(dense, {"num_experts": 2})


@pytest.mark.parametrize(
    "change, pattern",
    [
        ({"model": {"hidden_size": 33, "intermediate_size": 64, "num_layers": 2, "num_heads": 2}}, "multiple of"),
        ({"depth_factor": 0}, "depth_factor: must be above 1"),
        ({"plan": {"num_experts": [1, 2]}}, "num_experts: expected an integer"),
    ],
    ids=["heads", "depth0", "plan"],
)
def test_an_experiment_recipe_is_checked_whole_before_its_out_is_written(tmp_path, change, pattern):
    """These used to fail after writing recipe.json and the tokenizer, or after three arms had trained."""
    from upcycle.io.yamlio import dump, read_mapping

    recipe = read_mapping(ROOT / "recipes" / "tiny.yaml", "recipe") | change
    (tmp_path / "r.yaml").write_text(dump(recipe))
    refused(cli("experiment", tmp_path / "r.yaml", "--out", tmp_path / "out", "--quiet"), re.escape(pattern))
    assert not (tmp_path / "out").exists()


def test_eval_context_above_max_position_embeddings_is_flagged(base):
    r = ok(cli("eval", base / "moe", "--context", 200, "--tokens", 256))  # the tiny model has 128 positions
    assert re.search(r"upcycle: warning: --context 200 is above the model's max_position_embeddings 128", r.err)


def test_sparse_on_an_upcycled_model_says_so(base, tmp_path):
    refused(cli("sparse", "--model", base / "moe", "--out", tmp_path / "again"), "upcycled already")
