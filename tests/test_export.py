"""Export to stock transformers MoE classes and import back: logits equal, refusals precise."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import TINY, rel_diff, tiny_model
from upcycle import UpcycleError, UpcyclePlan, load, save, upcycle
from upcycle.cli import main
from upcycle.formats.stock import export
from upcycle.formats.targets import why_not
from upcycle.methods.registry import plan_from_meta

TOL = 1e-5
# (source family, target, layers): every exact pairing, interleaved where the target allows it.
PAIRS = [
    ("llama", "mixtral", "all"),
    ("mistral", "mixtral", "all"),
    ("llama", "qwen2_moe", "every_k:2:1"),
    ("qwen2", "qwen2_moe", "every_k:2:1"),
    ("qwen3", "qwen3_moe", "1,2"),
    ("olmo2", "flex_olmo", "all"),
]


def _stock(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # nothing left at random init
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("layout", ["legacy", "fused"])
@pytest.mark.parametrize("family,target,layers", PAIRS)
def test_export_reloads_with_stock_class_and_same_logits(tmp_path, ids, family, target, layers, layout):
    # Noisy experts and a sharp router: the experts differ, so a wrong expert or weight order shows.
    normalize = target != "qwen2_moe" or family == "qwen2"  # the llama->qwen2_moe case exercises norm_topk_prob off
    plan = UpcyclePlan(
        num_experts=4, layers=layers, normalize=normalize, router_std=0.5, expert_init="noise", noise_std=0.05
    )
    dense = tiny_model(family)
    moe = upcycle(dense, plan).eval()
    save(moe, plan, tmp_path / "native")
    export(tmp_path / "native", target, tmp_path / "stock", layout=layout)
    stock = _stock(tmp_path / "stock")
    assert (
        type(stock).__name__
        == {
            "mixtral": "MixtralForCausalLM",
            "qwen2_moe": "Qwen2MoeForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM",
            "flex_olmo": "FlexOlmoForCausalLM",
        }[target]
    )
    ours = _logits(moe, ids)
    assert rel_diff(_logits(stock, ids), ours) <= TOL
    assert rel_diff(_logits(dense, ids), ours) > 1e-3  # the test would notice experts collapsed to the dense MLP
    keys = json.loads((tmp_path / "stock" / "model.safetensors.index.json").read_text())["weight_map"]
    if layout == "legacy":
        assert any(".experts.3." in k for k in keys) and not any("gate_up_proj" in k for k in keys)
    else:
        assert any(k.endswith("experts.gate_up_proj") for k in keys) and not any(".experts.3." in k for k in keys)


def test_export_of_function_preserving_upcycle_equals_dense(tmp_path, ids):
    plan = UpcyclePlan(num_experts=4)  # every other layer, copies, top-2 renormalised
    dense = tiny_model("llama")
    save(upcycle(dense, plan), plan, tmp_path / "native")
    export(tmp_path / "native", "qwen2_moe", tmp_path / "stock")
    assert rel_diff(_logits(_stock(tmp_path / "stock"), ids), _logits(dense, ids)) <= TOL


def test_in_memory_export_matches_directory_export(tmp_path, ids):
    plan = UpcyclePlan(num_experts=4, layers="all", router_std=0.5, expert_init="noise", noise_std=0.05)
    moe = upcycle(tiny_model("llama"), plan).eval()
    export(moe, "mixtral", tmp_path / "stock")
    assert rel_diff(_logits(_stock(tmp_path / "stock"), ids), _logits(moe, ids)) <= TOL
    # Both write provenance: the plan and layers, what the export was; from a directory, its source hashes too
    save(moe, plan, tmp_path / "native", source_hashes={"model.safetensors": "ab" * 32})
    export(tmp_path / "native", "mixtral", tmp_path / "stock2", layout="fused")
    mem, disk = (json.loads((tmp_path / d / "upcycle.json").read_text()) for d in ("stock", "stock2"))
    for m in (mem, disk):
        # the plan as it ran: the decoder's default router named
        assert UpcyclePlan.from_dict(m["plan"]) == plan.replace(router="topk") and m["moe_layers"] == [0, 1, 2, 3]
        assert m["exported"]["to"] == "mixtral" and "torch" in m["versions"]
    assert mem["exported"]["from"] is None and disk["exported"]["layout"] == "fused"
    assert disk["source"]["weights"] == {"model.safetensors": "ab" * 32}
    assert rel_diff(_logits(_stock(tmp_path / "stock2"), ids), _logits(moe, ids)) <= TOL


@pytest.mark.parametrize(
    "model_type,kw",
    [
        ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
        # fine-grained experts and a live sigmoid-gated shared expert, interleaved, top-k not renormalised
        (
            "qwen2_moe",
            dict(
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=48,
                mlp_only_layers=[0, 2],
                norm_topk_prob=False,
            ),
        ),
        ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=2)),
        ("flex_olmo", dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, pad_token_id=0)),
    ],
)
def test_import_stock_checkpoint_then_save_and_reexport(tmp_path, ids, model_type, kw):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **{k: v for k, v in TINY.items()}, **kw)
    stock = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in stock.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    stock.eval().save_pretrained(tmp_path / "stock")
    ref = _logits(stock, ids)

    ours = load(tmp_path / "stock")
    assert rel_diff(_logits(ours, ids), ref) <= TOL
    save(ours, plan_from_meta(ours.config.upcycle), tmp_path / "native")
    assert rel_diff(_logits(load(tmp_path / "native"), ids), ref) <= TOL
    export(tmp_path / "native", model_type, tmp_path / "again", layout="fused")
    assert rel_diff(_logits(_stock(tmp_path / "again"), ids), ref) <= TOL


def test_refusals_name_every_reason():
    cfg = tiny_model("llama").config.to_dict()
    r = why_not("mixtral", cfg, UpcyclePlan(normalize=False, capacity_factor=1.0), [1, 3])
    text = " ".join(r)
    assert len(r) == 3 and "renormalises" in text and "layers 0, 2 are dense" in text and "never drop" in text
    assert any("expert_choice" in x for x in why_not("qwen2_moe", cfg, UpcyclePlan(router="expert_choice"), [1, 3]))
    assert any(
        "Qwen3 attention" in x
        for x in why_not("mixtral", dict(cfg, model_type="qwen3"), UpcyclePlan(layers="all"), [0, 1, 2, 3])
    )
    assert any("qwen3" in x for x in why_not("qwen3_moe", cfg, UpcyclePlan(), [1, 3]))
    assert any("no dense transformers class" in x for x in why_not("olmoe", cfg, UpcyclePlan(), [1, 3]))
    assert why_not("qwen2_moe", cfg, UpcyclePlan(), [1, 3]) == []


def test_cli_export_refuses_cleanly_and_writes_nothing(tmp_path, capsys):
    plan = UpcyclePlan(num_experts=4)
    save(upcycle(tiny_model("llama"), plan), plan, tmp_path / "native")
    assert main(["export", str(tmp_path / "native"), "--to", "mixtral", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MixtralForCausalLM" in err and "every layer MoE" in err
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))
    assert main(["export", str(tmp_path / "native"), "--explain"]) == 0
    out = capsys.readouterr().out
    assert "qwen2_moe" in out and "exact" in out and "mixtral" in out
    assert main(["export", str(tmp_path / "native"), "--to", "qwen2_moe", "--out", str(tmp_path / "q"), "--quiet"]) == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["mlp_only_layers"] == [0, 2]


def test_import_refuses_non_moe_directory(tiny_dir):
    with pytest.raises(UpcycleError, match="upcycle.json"):
        load(tiny_dir)


@pytest.mark.parametrize("layout", ["legacy", "fused"])
def test_sparse_format_writes_stock_directly_streaming_equals_in_memory(tmp_path, tiny_dir, ids, layout):
    from safetensors.torch import load_file

    common = [
        "sparse",
        "--model",
        str(tiny_dir),
        "--num-experts",
        "4",
        "--format",
        "qwen2_moe",
        "--layout",
        layout,
        "--quiet",
        "--router-std",
        "0.5",
        "--expert-init",
        "noise",
        "--noise-std",
        "0.05",
    ]
    assert main(common + ["--out", str(tmp_path / "s")]) == 0
    assert main(common + ["--out", str(tmp_path / "m"), "--stream", "false"]) == 0
    a, b = (
        load_file(tmp_path / "s" / "model-00001-of-00001.safetensors"),
        load_file(tmp_path / "m" / "model-00001-of-00001.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    stock = _stock(tmp_path / "s")
    plan = UpcyclePlan(num_experts=4, router_std=0.5, expert_init="noise", noise_std=0.05)
    moe = upcycle(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), plan).eval()
    assert rel_diff(_logits(stock, ids), _logits(moe, ids)) <= TOL
    assert rel_diff(_logits(load(tmp_path / "s"), ids), _logits(moe, ids)) <= TOL


def test_sparse_format_refused_before_any_work(tmp_path, tiny_dir, capsys):
    assert main(["sparse", "--model", str(tiny_dir), "--format", "mixtral", "--out", str(tmp_path / "x")]) == 2
    assert "every layer MoE" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_eval_imports_stock_directories(tmp_path, text_file, capsys):
    from conftest import save_tiny_tokenizer

    export(upcycle(tiny_model("llama"), UpcyclePlan(num_experts=4)), "qwen2_moe", tmp_path / "q")
    save_tiny_tokenizer(tmp_path / "q")
    assert main(["eval", str(tmp_path / "q"), "--text", str(text_file), "--tokens", "200", "--context", "64"]) == 0
    out = capsys.readouterr().out
    assert "2 MoE layers x 4 experts" in out and "| 1     |" in out and "| 3     |" in out


def test_train_continues_a_stock_checkpoint(tmp_path, text_file):
    """Models users already have: a stock Qwen2-MoE directory trains as our MoE (aux losses, native output)."""
    from conftest import save_tiny_tokenizer

    export(upcycle(tiny_model("llama"), UpcyclePlan(num_experts=4)), "qwen2_moe", tmp_path / "q")
    save_tiny_tokenizer(tmp_path / "q")
    assert (
        main(
            [
                "train",
                "--model",
                str(tmp_path / "q"),
                "--data",
                str(text_file),
                "--out",
                str(tmp_path / "run"),
                "--steps",
                "2",
                "--seq-len",
                "16",
                "--batch-size",
                "2",
                "--val-fraction",
                "0.2",
            ]
        )
        == 0
    )
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    lb = [float(r.split(",")[header.index("load_balancing")]) for r in rows[1:]]
    assert len(lb) == 2 and all(v > 0 for v in lb)  # the imported MoE layers report their balancing loss
    assert (tmp_path / "run" / "model" / "upcycle.json").is_file()
