"""Conversion speed and memory: `upcycle sparse` (streaming) against a same-run disk write of the same bytes,
against the in-memory path, and against mergekit-moe 0.1.5.

    python benchmarks/convert.py                                   # ~2 GB fp32 synthetic checkpoint
    python benchmarks/convert.py --out results/convert_cpu.md      # also write the results file
    python benchmarks/convert.py --size-gb 8 --no-mergekit         # ~8 GB: mergekit would need ~40 GB of RAM

What it does, in a work directory (default /tmp/upcycle-bench, reused between runs):
1. Builds a synthetic sharded Llama checkpoint (1 GB shards + model.safetensors.index.json) of about --size-gb
   GB: random fp32 weights with SmolLM2-1.7B's shapes (d=2048, d_ff=8192, 32 heads, vocab 49152, tied
   embeddings), the number of layers scaled to the size; SmolLM2's tokenizer beside it (mergekit wants one).
   It is kept and reused while its spec is unchanged.
2. Times each converter as a subprocess, from launch to exit (interpreter start and imports included), and its
   peak RSS (ru_maxrss of the child from wait4). Our converter fsyncs every file it writes and the directories;
   mergekit does not, so its output is fsynced right after it exits and that time is added (column "+fsync").
3. Right after each conversion, writes the same number of bytes with `dd if=/dev/zero bs=16M conv=fsync` to the
   same disk: the same-run speed-of-light reference. ratio = conversion seconds / dd seconds (target <= 1.25).
   The page cache is warm (the source was just written or read); the disk is a shared VM's, so only same-run
   ratios are comparable.

Variants: `upcycle sparse` with the default plan (8 experts, every other layer), with `--layers all` (what
mergekit-moe does: every layer becomes MoE; the like-for-like comparison), and mergekit-moe 0.1.5 with
`gate_mode: random`, 8 experts that are all the source model, installed from PyPI into its own venv
(--mergekit-venv; torch==2.13.0 first, so pip takes the local CPU wheel). With --real (default on) it also runs
the real default model, SmolLM2-135M-Instruct, through `upcycle sparse --stream true` and `--stream false`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from _report import command, write_report  # benchmarks/ is the script's directory: on sys.path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

# SmolLM2-1.7B's shapes (Llama architecture); only the number of layers changes with --size-gb.
SHAPE = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=49152,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=130000.0,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
)
MERGEKIT = "mergekit==0.1.5"
TORCH = "torch==2.13.0"


def log(msg: str) -> None:
    print(f"[convert] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- the checkpoint
def layer_count(size_gb: float) -> int:
    d, f, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    per_layer = 4 * (4 * d * d + 3 * d * f + 2 * d)
    return max(1, round((size_gb * 1e9 - 4 * (v * d + d)) / per_layer))


def build_checkpoint(path: Path, size_gb: float, seed: int = 0) -> Path:
    """A sharded fp32 Llama checkpoint of ~size_gb GB with random weights, written tensor by tensor."""
    import torch
    from transformers import LlamaConfig

    from upcycle.hub import default_model_dir
    from upcycle.io.dirs import atomic_dir
    from upcycle.io.models import meta_model
    from upcycle.io.safetensors import INDEX
    from upcycle.io.writer import Item, write_items

    spec = dict(SHAPE, num_hidden_layers=layer_count(size_gb), seed=seed, dtype="float32")
    if (path / "spec.json").is_file() and json.loads((path / "spec.json").read_text()) == spec:
        return path
    log(f"building a {spec['num_hidden_layers']}-layer synthetic Llama checkpoint in {path}")
    config = LlamaConfig(**{k: v for k, v in spec.items() if k != "seed"})
    model = meta_model(config)
    gen = torch.Generator().manual_seed(seed)

    def rand(shape, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std if len(shape) > 1 else torch.ones(shape)

    seen, items = set(), []
    for name, p in model.state_dict(keep_vars=True).items():
        if id(p) not in seen:
            seen.add(id(p))
            items.append(Item(name, tuple(p.shape), torch.float32, lambda s=tuple(p.shape): rand(s, 0.02)))
    with atomic_dir(path, overwrite=True) as tmp:
        config.save_pretrained(tmp)
        index = write_items(items, tmp, max_shard_size=10**9, fsync=False)
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        tok = default_model_dir(log=log)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(tok / f, tmp / f)
        (tmp / "spec.json").write_text(json.dumps(spec))
    return path


# ---------------------------------------------------------------------------------------------- timing
def run_measured(cmd: list[str], **kw) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout+stderr) of a subprocess.

    The RSS comes from GNU time run in between: a child's ru_maxrss counts the memory of the process
    that forked it up to exec, so reading it straight from this (large) process would inflate it."""
    time_exe = shutil.which("time") or "/usr/bin/time"
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        wrapped = [time_exe, "-f", "%M", "-o", rss_file.name, *cmd] if Path(time_exe).is_file() else cmd
        t = time.perf_counter()
        p = subprocess.run(wrapped, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
        wall = time.perf_counter() - t
        if p.returncode != 0:
            raise RuntimeError(
                f"{Path(cmd[0]).name} {' '.join(cmd[1:4])}... exited with {p.returncode}\n{p.stdout[-3000:]}"
            )
        text = rss_file.read().strip().splitlines()
        rss = int(text[-1]) * 1024 if text and text[-1].isdigit() else -1
    return wall, rss, p.stdout


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def fsync_tree(path: Path) -> float:
    t = time.perf_counter()
    for f in [*path.rglob("*"), path]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t


def dd_seconds(work: Path, nbytes: int, direct: bool = False) -> float:
    """Seconds for `dd` to write nbytes of zeros to the work directory's disk: through the page cache
    then fsync (conv=fsync), or bypassing it (oflag=direct)."""
    target = work / "dd.bin"
    subprocess.run(["sync"], check=True)
    t = time.perf_counter()
    subprocess.run(
        [
            "dd",
            "if=/dev/zero",
            f"of={target}",
            "bs=16M",
            f"count={nbytes}",
            "iflag=count_bytes",
            "oflag=direct" if direct else "conv=fsync",
            "status=none",
        ],
        check=True,
    )
    dt = time.perf_counter() - t
    target.unlink()
    return dt


def ours(source: Path, out: Path, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    cmd = [
        sys.executable,
        "-m",
        "upcycle",
        "sparse",
        "--model",
        str(source),
        "--out",
        str(out),
        "--quiet",
        "--num_experts",
        "8",
        *extra,
    ]
    wall, rss, text = run_measured(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    m = re.search(r"wrote .* in ([0-9.]+) s", text)
    return {
        "seconds": wall,
        "fsync": 0.0,
        "rss": rss,
        "bytes": dir_bytes(out),
        "inner": float(m.group(1)) if m else None,
    }


def mergekit_venv(venv: Path) -> Path | None:
    """The mergekit-moe executable, installing mergekit 0.1.5 into its own venv on first use."""
    exe = venv / "bin" / "mergekit-moe"
    if exe.is_file():
        return exe
    log(f"installing {MERGEKIT} into {venv} (one time)")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, TORCH], check=True)
        subprocess.run([*pip, MERGEKIT], check=True)
    except subprocess.CalledProcessError as e:
        log(f"could not install {MERGEKIT}: {e}")
        return None
    return exe if exe.is_file() else None


def mergekit(exe: Path, source: Path, out: Path, experts: int, work: Path) -> dict:
    cfg = work / "mergekit-moe.yaml"
    cfg.write_text(
        f"base_model: {source}\ngate_mode: random\ndtype: float32\nexperts:\n"
        + f"  - source_model: {source}\n" * experts
    )
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    wall, rss, _ = run_measured(
        [
            str(exe),
            str(cfg),
            str(out),
            "--quiet",
            "--no-copy-tokenizer",
            "--i-understand-this-is-not-useful-without-training",
        ]
    )
    return {"seconds": wall, "fsync": fsync_tree(out), "rss": rss, "bytes": dir_bytes(out), "inner": None}


# --------------------------------------------------------------------------------------------- report
def machine(work: Path) -> str:
    info = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        k, _, v = line.partition(":")
        info.setdefault(k.strip(), v.strip())
    mem = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
    df = subprocess.run(["df", "-hT", str(work)], capture_output=True, text=True).stdout.splitlines()[-1].split()
    return (
        f"{os.cpu_count()}-core {info.get('model name', platform.machine())}, {mem / 2**20:.0f} GiB RAM, "
        f"disk {df[0]} ({df[1]}, {df[2]}, {df[4]} free), Linux {platform.release()}, Python "
        f"{platform.python_version()}"
    )


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def summarise(runs: list[dict]) -> dict:
    """Medians over repetitions; ratios are medians of the per-repetition ratios (each to its own dd)."""
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    return {
        "bytes": runs[0]["bytes"],
        "n": len(runs),
        "seconds": med([r["seconds"] for r in runs]),
        "fsync": med([r["fsync"] for r in runs]),
        "dd": med([r["dd"] for r in runs]),
        "dd_direct": med([r["dd_direct"] for r in runs]),
        "ratio": med([(r["seconds"] + r["fsync"]) / r["dd"] for r in runs]),
        "inner_ratio": med([r["inner"] / r["dd"] for r in runs if r["inner"]]),
        "inner_direct": med([r["inner"] / r["dd_direct"] for r in runs if r["inner"]]),
        "inner": med([r["inner"] for r in runs if r["inner"]]),
        "rss": max(r["rss"] for r in runs),
    }


def table(rows: dict[str, list[dict]]) -> str:
    out = [
        "| converter | GB written | seconds (+fsync) | of which after start-up | dd same bytes, s | ratio "
        "| ratio after start-up | dd oflag=direct, s | after start-up / dd direct | peak RSS GB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in rows.items():
        r = summarise(runs)
        secs = f"{r['seconds']:.1f}" + (f" (+{r['fsync']:.1f})" if r["fsync"] else "")
        inner = f"{r['inner']:.1f}" if r["inner"] else "-"
        inner_ratio = f"{r['inner_ratio']:.2f}" if r["inner_ratio"] else "-"
        inner_direct = f"{r['inner_direct']:.2f}" if r["inner_direct"] else "-"
        out.append(
            f"| {name} | {gb(r['bytes'])} | {secs} | {inner} | {r['dd']:.1f} | {r['ratio']:.2f} | "
            f"{inner_ratio} | {r['dd_direct']:.1f} | {inner_direct} | {gb(r['rss'])} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size-gb", type=float, default=2.0, help="synthetic checkpoint size in GB (default 2; try 8)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/upcycle-bench"), help="work directory (reused)")
    p.add_argument(
        "--layers-all",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run our converter with --layers all (like mergekit; default on)",
    )
    p.add_argument(
        "--mergekit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run mergekit-moe 0.1.5 (default on; it holds the whole output in RAM)",
    )
    p.add_argument("--mergekit-venv", type=Path, help="venv for mergekit (default WORKDIR/mergekit-venv)")
    p.add_argument(
        "--real",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also convert SmolLM2-135M-Instruct, streaming and in memory (default on)",
    )
    p.add_argument("--repeat", type=int, default=3, help="repetitions per variant, round robin (default 3)")
    p.add_argument("--out", type=Path, help="also write the results (with machine and date) to this markdown file")
    args = p.parse_args(argv)

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    # source + the largest output (experts add 7 x the MLPs' 75% of the layers, on every or every other layer);
    # dd's file comes after the output is removed
    out_gb = args.size_gb + 7 * 0.75 * max(args.size_gb - 0.4, 0) * (1.0 if args.layers_all or args.mergekit else 0.5)
    need = (args.size_gb + out_gb + 1) * 1e9
    free = shutil.disk_usage(work).free
    if free < need:
        sys.exit(f"convert.py: {work} has {free / 1e9:.0f} GB free; --size-gb {args.size_gb:g} needs ~{need / 1e9:.0f}")
    t_start = time.perf_counter()
    source = build_checkpoint(work / f"llama-{args.size_gb:g}gb", args.size_gb)
    src_bytes = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    layers = json.loads((source / "spec.json").read_text())["num_hidden_layers"]

    variants = {"upcycle sparse (default plan: every other layer)": lambda: ours(source, work / "out", [])}
    if args.layers_all:
        variants["upcycle sparse --layers all"] = lambda: ours(source, work / "out", ["--layers", "all"])
    mk_note = "not run (--no-mergekit)"
    if args.mergekit:
        exe = mergekit_venv(args.mergekit_venv or work / "mergekit-venv")
        if exe is None:
            mk_note = f"could not be installed ({MERGEKIT} from PyPI); not measured"
        else:
            variants["mergekit-moe 0.1.5 (every layer)"] = lambda: mergekit(exe, source, work / "out", 8, work)
            mk_note = "measured"
    real: dict[str, Callable[[], dict]] = {}
    if args.real:
        from upcycle.hub import default_model_dir

        smol = default_model_dir(log=log)
        for stream in ("true", "false"):
            real[f"SmolLM2-135M, default plan, --stream {stream}"] = lambda stream=stream: ours(
                smol, work / "out", ["--stream", stream]
            )

    rows: dict[str, list[dict]] = {name: [] for name in [*variants, *real]}
    failures: dict[str, str] = {}
    for rep in range(args.repeat):  # round robin, so slow phases of the shared machine hit every variant
        for name, fn in {**variants, **real}.items():
            log(f"[{rep + 1}/{args.repeat}] {name}")
            try:
                r = fn()
            except RuntimeError as e:  # e.g. mergekit killed for memory on a large --size-gb
                log(f"  failed: {str(e).splitlines()[0]}")
                failures[name] = str(e).splitlines()[0]
                continue
            shutil.rmtree(work / "out", ignore_errors=True)
            r["dd"] = dd_seconds(work, r["bytes"])
            r["dd_direct"] = dd_seconds(work, r["bytes"], direct=True)
            rows[name].append(r)
            log(
                f"  {r['seconds']:.1f}+{r['fsync']:.1f} s, {gb(r['bytes'])} GB, dd {r['dd']:.1f} s "
                f"(direct {r['dd_direct']:.1f} s), "
                f"RSS {gb(r['rss'])} GB"
            )
    real_rows = {k: rows.pop(k) for k in real if rows[k]}
    rows = {k: v for k, v in rows.items() if v}
    fail_note = (
        (" Failed runs (left out of the medians): " + "; ".join(f"{k}: {v}" for k, v in failures.items()) + ".")
        if failures
        else ""
    )

    header = (
        f"Synthetic Llama checkpoint: {gb(src_bytes)} GB fp32 in 1 GB shards, {layers} layers of SmolLM2-1.7B "
        f"shape (d=2048, d_ff=8192, vocab 49152, tied embeddings); 8 experts, fp32 output"
    )
    notes = (
        f"Median of {args.repeat} round-robin repetitions (ratios: median of per-repetition ratios; RSS: max). "
        "seconds: launch to exit of the converter process (interpreter start-up and imports included); "
        "ours fsyncs every file and directory before it exits, mergekit does not, so its output is fsynced "
        "after it exits and that time is shown as +fsync and counted in its ratio. dd: `dd if=/dev/zero "
        "bs=16M conv=fsync` of the same byte count, right after each conversion (the issue's reference); "
        "dd oflag=direct: the same bytes bypassing the page cache, as our writer does (shown, not used in "
        "the ratios). after start-up: the "
        "time `upcycle sparse` reports itself (from after its imports to the end) and its ratio to dd. "
        "Peak RSS: max resident memory of the converter process (GNU time's %M). "
        f"mergekit-moe: {mk_note}; it writes Mixtral layout, every layer MoE, so compare it with --layers all."
        + fail_note
    )
    md = table(rows)
    real_md = table(real_rows) if real_rows else ""
    print(header)
    print(machine(work))
    print()
    print(md)
    if real_md:
        print("\nReal model (SmolLM2-135M-Instruct, fp32, 8 experts, default plan):\n")
        print(real_md)
    print()
    print(notes)
    print(f"\n({time.perf_counter() - t_start:.0f} s)")
    if args.out:
        cmd = command("convert.py", argv)
        real = (
            f"Real model, SmolLM2-135M-Instruct (fp32, 8 experts, default plan), streaming against the "
            f"in-memory path (`--stream false`):\n\n{real_md}\n\n"
            if real_md
            else ""
        )
        write_report(args.out, "Checkpoint conversion, CPU", header, machine(work), cmd, f"{md}\n\n{real}{notes}")
        raw = {"command": cmd.strip(), "machine": machine(work), "runs": {**rows, **real_rows}, "failures": failures}
        args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")


if __name__ == "__main__":
    main()
