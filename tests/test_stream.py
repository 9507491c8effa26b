"""Streaming conversion: byte-identical to the in-memory path, bounded memory, safe to interrupt."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import upcycle.io.dirs as dirs
from conftest import tiny_config, tiny_model
from upcycle import UpcycleError, UpcyclePlan, save, upcycle
from upcycle.cli import main
from upcycle.formats.native import stream_upcycle
from upcycle.io.dirs import sha256_files
from upcycle.io.models import meta_model
from upcycle.io.safetensors import SafetensorsSource, weight_files
from upcycle.io.writer import Item, SequentialWriter, safetensors_header, write_items

ROOT = Path(__file__).resolve().parents[1]


def in_memory(dense_dir: Path, plan: UpcyclePlan, out: Path, dtype="auto", **kw) -> Path:
    """What `upcycle sparse --stream false` does: transformers load, surgery, native.save."""
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=dtype, use_safetensors=True)
    return save(
        upcycle(dense, plan, inplace=True),
        plan,
        out,
        source_dir=dense_dir,
        source_hashes=sha256_files(weight_files(dense_dir)),
        **kw,
    )


def assert_same_output(a: Path, b: Path) -> None:
    """Every file byte-identical, except upcycle.json whose creation time may differ."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        if n == "upcycle.json":
            ma, mb = (json.loads((d / n).read_text()) for d in (a, b))
            ma.pop("created"), mb.pop("created")
            assert ma == mb
        else:
            assert (a / n).read_bytes() == (b / n).read_bytes(), n


CASES = {
    "single-file-tied": (dict(), {}, dict(num_experts=4)),
    "sharded-untied": (dict(tie_word_embeddings=False), dict(max_shard_size="40KB"), dict(num_experts=3, layers="all")),
    "bf16": (dict(), dict(dtype=torch.bfloat16), dict(num_experts=2)),
    "noise-init": (dict(), {}, dict(num_experts=4, expert_init="noise", noise_std=0.05, seed=3)),
    "qwen3": (dict(model_type="qwen3"), {}, dict(num_experts=2, router_init="uniform")),
}


@pytest.mark.parametrize("case", CASES)
def test_identical_to_in_memory_save(tmp_path, case):
    model_kw, save_kw, plan_kw = CASES[case]
    model = tiny_model(**model_kw)
    if "dtype" in save_kw:
        model = model.to(save_kw.pop("dtype"))
    model.save_pretrained(tmp_path / "dense", **save_kw)
    plan = UpcyclePlan(**plan_kw)
    ref = in_memory(tmp_path / "dense", plan, tmp_path / "ref", max_shard_size=150_000)
    got = stream_upcycle(tmp_path / "dense", plan, tmp_path / "got", max_shard_size=150_000, progress=False)
    assert_same_output(ref, got)
    if case == "sharded-untied":
        assert len(weight_files(tmp_path / "dense")) > 1 and len(weight_files(got)) > 1


def test_output_dtype_conversion_matches(tmp_path, tiny_dir):
    plan = UpcyclePlan(num_experts=2)
    ref = in_memory(tiny_dir, plan, tmp_path / "ref", dtype=torch.bfloat16)
    got = stream_upcycle(tiny_dir, plan, tmp_path / "got", dtype=torch.bfloat16, progress=False)
    assert_same_output(ref, got)
    assert {t.dtype for t in load_file(weight_files(got)[0]).values()} == {torch.bfloat16}


def test_cli_streams_by_default_and_matches_stream_false(tmp_path, tiny_dir_tok, capsys):
    args = ["sparse", "--model", str(tiny_dir_tok), "--num_experts", "4", "--quiet", "--max_shard_size", "100KB"]
    assert main(args + ["--out", str(tmp_path / "a"), "--stream", "false"]) == 0
    out_mem = capsys.readouterr().out.splitlines()
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    out_stream = capsys.readouterr().out.splitlines()
    assert_same_output(tmp_path / "a", tmp_path / "b")
    assert out_mem[0] == out_stream[0]  # same layer summary
    assert out_mem[1].split("; wrote")[0] == out_stream[1].split("; wrote")[0]  # same parameter counts


def test_header_matches_safetensors_for_mixed_dtypes(tmp_path):
    tensors = {
        "b": torch.ones(3, dtype=torch.bfloat16),
        "a": torch.ones(2, 3),
        "c": torch.tensor(7),
        "d": torch.zeros(1, dtype=torch.bool),
        "e": torch.zeros(0, 4),
        "f": torch.ones(5, dtype=torch.float16),
    }
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    items = [Item(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in tensors.items()]
    write_items(items, tmp_path, max_shard_size=10**9, fsync=False)
    assert (tmp_path / "model-00001-of-00001.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    header, order = safetensors_header(items, {"format": "pt"})
    assert len(header) % 8 == 0 and [i.name for i in order] == ["c", "a", "e", "b", "f", "d"]


@pytest.mark.parametrize("direct", [True, False])
def test_sequential_writer_keeps_every_byte(tmp_path, direct):
    """Buffers fill, swap and flush across block boundaries; the unaligned tail is written plainly."""
    data = os.urandom(5 * 8192 + 123)
    for n, parts in enumerate([[data], [data[:1], data[1:8192], data[8192:9000], data[9000:]], [b"", data[:100]]]):
        w = SequentialWriter(tmp_path / f"f{n}", block=8192, direct=direct)
        for part in parts:
            w.write(memoryview(part))
        w.close()
        assert (tmp_path / f"f{n}").read_bytes() == b"".join(parts)


def test_transform_and_config_hook(tmp_path, tiny_dir):
    """The hook another output format plugs into: rename tensors, drop some, write its own config."""

    def transform(items):
        for it in items:
            if not it.name.endswith("router.weight"):
                yield Item(it.name.replace("experts.", "moe_experts."), it.shape, it.dtype, it.produce)

    def write_config(config, d):
        (d / "config.json").write_text(json.dumps({"model_type": "custom", "moe": config.upcycle["num_experts"]}))

    out = stream_upcycle(
        tiny_dir,
        UpcyclePlan(num_experts=2),
        tmp_path / "x",
        transform=transform,
        write_config=write_config,
        progress=False,
    )
    keys = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.moe_experts.up_proj" in keys and not any("router" in k for k in keys)
    assert json.loads((out / "config.json").read_text()) == {"model_type": "custom", "moe": 2}
    dense = load_file(tiny_dir / "model.safetensors")["model.layers.1.mlp.up_proj.weight"]
    got = load_file(weight_files(out)[0])["model.layers.1.mlp.moe_experts.up_proj"]
    assert got.shape == (2, *dense.shape) and torch.equal(got[1], dense)


def test_not_enough_disk_space(tmp_path, tiny_dir, monkeypatch):
    class Usage:
        total, used, free = 10**12, 10**12, 1000

    monkeypatch.setattr(dirs.shutil, "disk_usage", lambda p: Usage)
    with pytest.raises(
        UpcycleError,
        match=r"not enough disk space for .*out: need \d+\.\d MB plus a 67\.1 MB reserve, .* has 0\.0 MB free",
    ):
        stream_upcycle(tiny_dir, UpcyclePlan(), tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


def test_bad_sources_are_clear_errors(tmp_path, tiny_dir):
    f = tiny_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])  # truncated
    with pytest.raises(UpcycleError, match="model.safetensors: tensor .* truncated or corrupt"):
        SafetensorsSource(tiny_dir)
    f.write_bytes(b"\x00" * 4)
    with pytest.raises(UpcycleError, match="not a readable safetensors file"):
        SafetensorsSource(tiny_dir)
    (tiny_dir / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(UpcycleError, match="model.safetensors.index.json: not a valid safetensors index"):
        SafetensorsSource(tiny_dir)
    tiny_model(num_hidden_layers=2).save_pretrained(tmp_path / "two")  # weights of 2 layers, config says 4
    (tmp_path / "two" / "config.json").write_text(tiny_config().to_json_string())
    with pytest.raises(UpcycleError, match="checkpoint has no tensor 'model.layers.2"):
        stream_upcycle(tmp_path / "two", UpcyclePlan(), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ a checkpoint bigger than the bound
BIG = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=8192,
    tie_word_embeddings=False,
)
BIG_LARGEST = 8192 * 1024 * 4  # embed_tokens / lm_head, fp32: 32 MiB; the checkpoint is 10x that


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory):
    """A 320 MiB fp32 Llama checkpoint in 3 shards, written tensor by tensor (its values are zeros)."""
    d = tmp_path_factory.mktemp("big") / "dense"
    d.mkdir()
    config = tiny_config(**BIG)
    config.save_pretrained(d)
    model = meta_model(config)
    items = [
        Item(k, tuple(v.shape), v.dtype, lambda v=v: torch.zeros(v.shape, dtype=v.dtype))
        for k, v in model.state_dict().items()
    ]
    index = write_items(items, d, max_shard_size=130 << 20, fsync=False)
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    yield d
    shutil.rmtree(d.parent)  # 320 MiB: not left for the rest of the run (CI's disk is not ours to fill)


MEASURE = """
import json, sys, torch
from upcycle import UpcyclePlan
from upcycle.formats.native import stream_upcycle
from upcycle.io.models import meta_model
from transformers import AutoConfig
meta_model(AutoConfig.from_pretrained(sys.argv[1]))  # imports the model class: part of the baseline
status = lambda k: int(next(l for l in open("/proc/self/status") if l.startswith(k)).split()[1]) << 10
base = status("VmRSS:")
stream_upcycle(sys.argv[1], UpcyclePlan(num_experts=8), sys.argv[2], progress=False, fsync=False)
print(json.dumps({"base": base, "peak": status("VmHWM:")}))
"""


def test_peak_memory_is_bounded_by_the_largest_tensor(big_dir, tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", MEASURE, str(big_dir), str(tmp_path / "out")], capture_output=True, text=True, check=True
    )
    m = json.loads(r.stdout)
    out_bytes = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert out_bytes > 30 * BIG_LARGEST  # ~1 GB written
    # The bound, all of the process counted (Python, torch and transformers are ~0.35 GB of it) ...
    assert m["peak"] <= BIG_LARGEST * (8 + 1) + (200 << 20), m
    # ... and the stronger property: above the import baseline, about one tensor plus its buffers.
    assert m["peak"] - m["base"] <= 2 * BIG_LARGEST + (64 << 20), m


def _interrupt_both(big_dir: Path, outs: dict[int, Path]) -> dict[int, tuple[int, str, int]]:
    """Start `upcycle sparse` on big_dir once per {signal: out dir}, all at once, and send each its
    signal once 100 MB of its 1.7 GB output are on disk; {signal: (exit code, stderr, pid)}."""
    procs = {
        sig: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "upcycle",
                "sparse",
                "--model",
                str(big_dir),
                "--out",
                str(out),
                "--quiet",
                "--max_shard_size",
                "100MB",
                "--layers",
                "all",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for sig, out in outs.items()
    }
    waiting, deadline = set(procs), time.time() + 90
    while waiting and time.time() < deadline:
        for sig in list(waiting):
            out = outs[sig]
            assert procs[sig].poll() is None, "the conversion ended before it could be interrupted"
            tmp = out.parent.glob(f".{out.name}.tmp-*")
            if sum(f.stat().st_size for d in tmp for f in d.glob("*.safetensors")) > 100 << 20:
                procs[sig].send_signal(sig)
                waiting.discard(sig)
        time.sleep(0.02)
    assert not waiting, "the conversions did not start writing within 90 s"
    errs = {sig: p.communicate(timeout=60)[1] for sig, p in procs.items()}
    return {sig: (p.returncode, errs[sig], p.pid) for sig, p in procs.items()}


def test_interrupted_conversion_leaves_no_output_and_the_next_run_succeeds(big_dir, tmp_path):
    """Ctrl-C removes the temporary directory at once; a SIGKILL leaves it (nothing can run), and
    the next conversion to the same --out removes it and succeeds."""
    outs = {signal.SIGINT: tmp_path / "a" / "moe", signal.SIGKILL: tmp_path / "b" / "moe"}
    for out in outs.values():
        out.parent.mkdir()
    done = _interrupt_both(big_dir, outs)
    code, stderr, _ = done[signal.SIGINT]
    assert code == 130 and "interrupted; nothing was written" in stderr, stderr
    assert list((tmp_path / "a").iterdir()) == []

    code, _, pid = done[signal.SIGKILL]
    assert code == -signal.SIGKILL
    left = [p.name for p in (tmp_path / "b").iterdir()]
    assert left and all(n.startswith(f".moe.tmp-{pid}-") for n in left)  # only the killed writer's temp dir

    out = outs[signal.SIGKILL]  # the next run (a smaller plan, to keep the test short) cleans up and succeeds
    assert main(["sparse", "--model", str(big_dir), "--out", str(out), "--quiet", "--num_experts", "2"]) == 0
    assert [p.name for p in out.parent.iterdir()] == ["moe"]
    assert (out / "upcycle.json").is_file()
