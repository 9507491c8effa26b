"""The `upcycle` command: happy paths on a tiny model, and every bad input a one-line error, exit 2,
nothing written."""

import json
import re
import subprocess
import sys

import pytest

from upcycle.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_sparse_then_check(tmp_path, tiny_dir_tok, text_file, capsys):
    out = tmp_path / "moe"
    code, stdout, _ = run(capsys, "sparse", "--model", tiny_dir_tok, "--out", out, "--num_experts", 4, "--quiet")
    assert code == 0, stdout
    assert "2/4 layers -> MoE (4 experts, router topk, top_k 2)" in stdout
    meta = json.loads((out / "upcycle.json").read_text())
    assert meta["moe_layers"] == [1, 3] and meta["plan"]["num_experts"] == 4
    assert meta["source"]["weights"]["model.safetensors"].startswith("sha256:")
    assert (out / "tokenizer.json").exists()

    code, stdout, _ = run(capsys, "check", out, "--against", tiny_dir_tok, "--text", text_file, "--context", 64)
    assert code == 0
    rel = float(re.search(r"max \|logit diff\| / max \|logit\| \| ([0-9.e+-]+)", stdout).group(1))
    assert rel <= 1e-5
    ppl = re.findall(r"perplexity \((?:dense|upcycled)\)\s*\| ([0-9.]+)", stdout)
    assert len(ppl) == 2 and ppl[0] == ppl[1]
    assert "100.00%" in stdout


def test_plan_file_and_flags(tmp_path, tiny_dir_tok, text_file, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text("num_experts: 2\nlayers: all\nnormalize: true\n")
    out = tmp_path / "moe"
    code, stdout, _ = run(
        capsys,
        "sparse",
        "--model",
        tiny_dir_tok,
        "--plan",
        plan,
        "--top-k",
        1,
        "--normalize",
        "false",
        "--out",
        out,
        "--quiet",
    )
    assert code == 0
    p = json.loads((out / "upcycle.json").read_text())["plan"]
    assert (p["num_experts"], p["layers"], p["top_k"], p["normalize"]) == (2, "all", 1, False)
    # without renormalisation top-1 scales every MLP by p < 1: check notices, and --max_rel makes it fail
    code, stdout, err = run(capsys, "check", out, "--against", tiny_dir_tok, "--text", text_file, "--max_rel", "1e-5")
    assert code == 1 and "exceeds --max_rel" in err


def test_plan_command_prints_yaml(capsys):
    code, stdout, _ = run(capsys, "plan", "--num-experts", 16, "--layers", "last_n:4")
    assert code == 0 and "num_experts: 16" in stdout and "layers: last_n:4" in stdout
    assert "router: null  # the family's" in stdout  # no router named: the model's family decides
    code, stdout, _ = run(capsys, "plan", "--router", "topk")
    assert code == 0 and "\nrouter: topk\n" in stdout


def gpt2_dir(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(d)
    return d


BAD = [
    (["--model", "{tmp}/missing"], "model directory not found"),
    (["--model", "{gpt2}"], "model_type 'gpt2' is not supported yet"),
    (["--model", "{dense}", "--layers", "99"], "index 99 is out of range: the model has 4 layers"),
    (["--model", "{dense}", "--num_experts", "0"], "num_experts: must be at least 1"),
    (["--model", "{dense}", "--top_k", "9"], "top_k: must be between 1 and num_experts=8"),
    (["--model", "{dense}", "--capacity_factor", "0"], "capacity_factor: must be a positive number"),
    (["--model", "{dense}", "--capacity_factor", "-2", "--router", "expert_choice"], "capacity_factor"),
    (["--model", "{dense}", "--plan", "{tmp}/nope.yaml"], "plan file not found"),
    (["--model", "{tmp}"], "has no config.json"),
    (["--model", "{dense}", "--plan", "{badplan}"], "bad.yaml: unknown key 'experts_per_token'"),
]


@pytest.mark.parametrize("args,msg", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, tiny_dir, capsys, args, msg):
    work = tmp_path / "work"
    work.mkdir()
    badplan = tmp_path / "bad.yaml"
    badplan.write_text("num_experts: 4\nexperts_per_token: 2\n")
    subs = {"tmp": str(work), "dense": str(tiny_dir), "gpt2": str(gpt2_dir(tmp_path)), "badplan": str(badplan)}
    out = work / "out"
    capsys.readouterr()  # drop what building the fixtures printed
    code, stdout, err = run(capsys, "sparse", *[a.format(**subs) for a in args], "--out", out, "--quiet")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("upcycle: error: ") and msg in lines[0], err
    assert not out.exists() and [p.name for p in work.iterdir()] == []


def test_existing_output_is_refused(tmp_path, tiny_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run(capsys, "sparse", "--model", tiny_dir, "--out", out, "--quiet")
    assert code == 2 and "already exists" in err


def test_check_errors(tmp_path, tiny_dir, capsys):
    code, _, err = run(capsys, "check", tmp_path / "x", "--against", tiny_dir)
    assert code == 2 and "model directory not found" in err
    code, _, err = run(capsys, "check", tiny_dir, "--against", tiny_dir)
    assert code == 2 and "no upcycle.json" in err


def test_entry_point_runs_as_a_program():
    r = subprocess.run([sys.executable, "-m", "upcycle", "plan", "--top_k", "99"], capture_output=True, text=True)
    assert (
        r.returncode == 2 and r.stderr.strip() == "upcycle: error: --top_k: must be between 1 and num_experts=8, got 99"
    )
    r = subprocess.run([sys.executable, "-m", "upcycle", "sparse"], capture_output=True, text=True)
    assert r.returncode == 2 and "--out" in r.stderr  # argparse usage errors exit 2 as well
