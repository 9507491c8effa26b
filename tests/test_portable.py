"""Exports that the serving engines read as transformers 5 does: no zero-width tensors (vLLM). The
engines themselves run in the `engines` lane."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import TINY, rel_diff, tiny_model
from upcycle import UpcyclePlan, save, upcycle
from upcycle.cli import main
from upcycle.formats.stock import NULL_SHARED_EXPERT_WIDTH, export
from upcycle.formats.stock_import import import_stock

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
