"""Exports that the serving engines read as transformers 5 does: no zero-width tensors (vLLM), both rope
forms in config.json (transformers 4.x), a tokenizer class 4.x knows (4.x, llama.cpp's converter), and
`export --explain` per engine. The engines themselves run in the `engines` lane (tests/engines/)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import TINY, rel_diff, save_tiny_tokenizer, tiny_model
from upcycle import UpcyclePlan, save, upcycle
from upcycle.cli import main
from upcycle.formats.stock import NULL_SHARED_EXPERT_WIDTH, export
from upcycle.formats.stock_import import import_stock
from upcycle.io.compat import portable_config

TOL = 1e-5
NOISY = dict(router_std=0.5, expert_init="noise", noise_std=0.05)


def _shapes(d):
    out = {}
    for f in d.glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            out |= {k: tuple(s.get_slice(k).get_shape()) for k in s.keys()}
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("size", [None, 8])
def test_qwen2_moe_null_shared_expert_has_width_and_adds_exactly_zero(tmp_path, ids, size):
    plan = UpcyclePlan(num_experts=4, layers="every_k:2:1", **NOISY)
    moe = upcycle(tiny_model("llama"), plan).eval()
    save(moe, plan, tmp_path / "native")
    export(tmp_path / "native", "qwen2_moe", tmp_path / "q", shared_expert_size=size)
    shapes = _shapes(tmp_path / "q")
    assert not [k for k, s in shapes.items() if 0 in s]  # vLLM refuses (0, D) tensors
    S = size or NULL_SHARED_EXPERT_WIDTH
    assert json.loads((tmp_path / "q" / "config.json").read_text())["shared_expert_intermediate_size"] == S
    D = TINY["hidden_size"]
    assert shapes["model.layers.1.mlp.shared_expert.down_proj.weight"] == (D, S)
    assert "model.layers.0.mlp.shared_expert.down_proj.weight" not in shapes  # dense layers have none
    stock, info = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    gate = stock.model.layers[1].mlp.shared_expert_gate.weight
    assert torch.all(gate != 0)  # sigmoid as silu(g)/g (llama.cpp) is 0/0 at g = 0
    assert rel_diff(_logits(stock.eval(), ids), _logits(moe, ids)) <= TOL
    back = import_stock(tmp_path / "q")  # the null shared expert is recognised and dropped again
    assert "shared_expert" not in back.config.upcycle.get("structure", {})
    assert not any("shared_expert" in k for k in back.state_dict())
    assert rel_diff(_logits(back.eval(), ids), _logits(moe, ids)) <= TOL


def test_sparse_format_takes_shared_expert_size_streaming_and_in_memory(tmp_path, tiny_dir, ids):
    args = ["sparse", "--model", str(tiny_dir), "--num-experts", "4", "--format", "qwen2_moe", "--quiet"]
    args += ["--shared-expert-size", "16", "--router-std", "0.5", "--expert-init", "noise", "--noise-std", "0.05"]
    assert main(args + ["--out", str(tmp_path / "s")]) == 0
    assert main(args + ["--out", str(tmp_path / "m"), "--stream", "false"]) == 0
    for d in ("s", "m"):
        shapes = _shapes(tmp_path / d)
        assert shapes["model.layers.3.mlp.shared_expert.gate_proj.weight"] == (16, TINY["hidden_size"])
        assert json.loads((tmp_path / d / "config.json").read_text())["shared_expert_intermediate_size"] == 16
    plan = UpcyclePlan(num_experts=4, **NOISY)
    moe = upcycle(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), plan).eval()
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype=torch.float32).eval()
    assert rel_diff(_logits(stock, ids), _logits(moe, ids)) <= TOL


@pytest.mark.parametrize("cmd", ["sparse", "export"])
def test_zero_width_shared_expert_refused_before_any_work(tmp_path, tiny_dir, cmd, capsys):
    if cmd == "sparse":
        args = ["sparse", "--model", str(tiny_dir), "--format", "qwen2_moe"]
    else:
        assert main(["sparse", "--model", str(tiny_dir), "--quiet", "--out", str(tmp_path / "n")]) == 0
        args = ["export", str(tmp_path / "n"), "--to", "qwen2_moe"]
    assert main(args + ["--shared-expert-size", "0", "--out", str(tmp_path / "x")]) == 2
    assert "at least 1" in capsys.readouterr().err and not (tmp_path / "x").exists()


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize("rope", [None, LLAMA3_ROPE])
@pytest.mark.parametrize("fmt", ["native", "mixtral", "qwen2_moe"])
def test_configs_carry_transformers_4_rope_fields_beside_rope_parameters(tmp_path, ids, fmt, rope):
    kw = {"rope_parameters": dict(rope)} if rope else {"rope_parameters": {"rope_type": "default", "rope_theta": 1e5}}
    dense = tiny_model("llama", **kw)
    dense.save_pretrained(tmp_path / "dense")
    layers = "all" if fmt == "mixtral" else "every_k:2:1"
    args = ["sparse", "--model", str(tmp_path / "dense"), "--num-experts", "4", "--layers", layers, "--quiet"]
    assert main(args + ["--format", fmt, "--out", str(tmp_path / "o")]) == 0
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    theta = cfg["rope_parameters"]["rope_theta"]
    assert theta == (rope or {"rope_theta": 1e5})["rope_theta"] and cfg["rope_theta"] == theta
    if rope:
        assert cfg["rope_scaling"] == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    else:
        assert cfg.get("rope_scaling") is None
    # transformers 5 reads the file with both forms as it read the source
    assert AutoConfig.from_pretrained(tmp_path / "o").rope_parameters == dense.config.rope_parameters
    if fmt != "native":
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype=torch.float32).eval()
        moe = upcycle(dense, UpcyclePlan(num_experts=4, layers=layers)).eval()
        assert rel_diff(_logits(stock, ids), _logits(moe, ids)) <= TOL


def test_portable_config_keeps_given_values_and_leaves_layer_type_ropes():
    both = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "rope_theta": 1e4}
    assert portable_config(both) == both
    partial = portable_config(
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}
    )
    assert partial["rope_theta"] == 1e4 and partial["partial_rotary_factor"] == 0.5 and "rope_scaling" not in partial
    per_type = {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}}
    assert portable_config(per_type) == per_type  # no transformers 4.x form: left alone


@pytest.mark.parametrize("fmt", ["native", "qwen2_moe"])
def test_tokenizer_config_names_a_class_transformers_4_knows(tmp_path, tiny_dir, fmt):
    save_tiny_tokenizer(tiny_dir)
    src = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert src["tokenizer_class"] == "TokenizersBackend"  # what transformers 5 writes (4.x cannot read it)
    args = ["sparse", "--model", str(tiny_dir), "--num-experts", "4", "--quiet", "--format", fmt]
    assert main(args + ["--out", str(tmp_path / "o")]) == 0
    cfg = json.loads((tmp_path / "o" / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert {k: v for k, v in cfg.items() if k != "tokenizer_class"} == {
        k: v for k, v in src.items() if k != "tokenizer_class"
    }
    text = "the state of the world is good and the old man came back"
    a, b = AutoTokenizer.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tmp_path / "o")
    assert a(text).input_ids == b(text).input_ids and len(a(text).input_ids) == 13


def _engine_lines(out: str, target: str) -> dict[str, str]:
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(target + " "))
    rows = {}
    for line in lines[i + 1 :]:
        if not line.startswith("    "):
            break
        engine, _, verdict = line.strip().partition("  ")
        rows[engine] = verdict.strip()
    return rows


def test_explain_says_per_engine_whether_the_export_is_exact(tmp_path, tiny_dir, capsys):
    assert (
        main(["sparse", "--model", str(tiny_dir), "--num-experts", "4", "--quiet", "--out", str(tmp_path / "n")]) == 0
    )
    capsys.readouterr()
    assert main(["export", str(tmp_path / "n"), "--explain"]) == 0
    out = capsys.readouterr().out
    rows = _engine_lines(out, "qwen2_moe")
    assert list(rows) == ["transformers 5", "transformers 4.57", "vLLM", "llama.cpp", "lm-eval"]
    assert all(rows[e] == "exact" for e in ("transformers 5", "transformers 4.57", "vLLM", "lm-eval"))
    cpp = rows["llama.cpp"]
    assert cpp.startswith("not exact") and "refuses dense layers (2 here" in cpp
    assert "never renormalises" in cpp and "output head of its own" in cpp
    assert not _engine_lines(out, "mixtral") and "mixtral    MixtralForCausalLM     no: " in out  # refused: no engines
    # every layer MoE, no renormalisation, an untied head: exact in llama.cpp's Qwen2-MoE too
    d = tmp_path / "untied"
    tiny_model("llama", tie_word_embeddings=False).save_pretrained(d)
    args = ["sparse", "--model", str(d), "--num-experts", "4", "--layers", "all", "--normalize", "false"]
    assert main(args + ["--quiet", "--out", str(tmp_path / "u")]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "u"), "--explain", "--layout", "fused"]) == 0
    rows = _engine_lines(capsys.readouterr().out, "qwen2_moe")
    assert rows["transformers 5"] == "exact" and "--layout legacy" in rows["transformers 4.57"]
    assert rows["llama.cpp"] == "not exact: only --layout legacy is proven"
