"""The upcycling initialisers of init.py: each test pins what its initialiser preserves."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import rel_diff, save_tiny_tokenizer, tiny_model
from test_export import _logits, _stock
from test_stream import assert_same_output, in_memory
from upcycle import PlanError, UpcyclePlan, load, save, upcycle
from upcycle.cli import main
from upcycle.formats.native import stream_upcycle
from upcycle.formats.stock import export
from upcycle.formats.targets import why_not
from upcycle.methods.init import _balanced_kmeans, granular_scale, init_layer, partition_sets, plan_structure
from upcycle.methods.routers import data_router_rows, read_prompts
from upcycle.moe.block import moe_blocks

TOL = 1e-5


def _dense(F=96, D=64, seed=0, mean=0.0, std=0.2, bias=False):
    g = torch.Generator().manual_seed(seed)
    d = {
        "gate": torch.randn(F, D, generator=g) * std + mean,
        "up": torch.randn(F, D, generator=g) * std + mean,
        "down": torch.randn(D, F, generator=g) * std + mean,
    }
    if bias:
        d |= {
            "gate_bias": torch.randn(F, generator=g),
            "up_bias": torch.randn(F, generator=g),
            "down_bias": torch.randn(D, generator=g),
        }
    return d


def _upcycled(plan, act="silu", **model_kw):
    dense = tiny_model("llama", hidden_act=act, **model_kw)
    return dense, upcycle(dense, plan)


# ----------------------------------------------------------------------------------------------- copy
def test_copy_renormalised_is_exact_and_unchanged_by_this_module(ids):
    dense, moe = _upcycled(UpcyclePlan(layers="all"))
    assert rel_diff(_logits(moe, ids), _logits(dense, ids)) <= TOL
    d = _dense()
    out = init_layer(UpcyclePlan(num_experts=3), 0, d, "silu")
    assert all(torch.equal(out["experts.gate_proj"][e], d["gate"]) for e in range(3))
    assert set(out) == {"experts.gate_proj", "experts.up_proj", "experts.down_proj", "router.weight"}


# ------------------------------------------------------------------------------------------- granular
@pytest.mark.parametrize("act,G", [("relu2", 2), ("relu2", 4), ("relu", 4)])
def test_granular_with_top_G_renormalised_reproduces_homogeneous_mlps_exactly(ids, act, G):
    plan = UpcyclePlan(layers="all", expert_init="granular", num_experts=8, granularity=G, top_k=G)
    dense, moe = _upcycled(plan, act)
    assert rel_diff(_logits(moe, ids), _logits(dense, ids)) <= TOL
    b = moe_blocks(moe)[0][1]
    assert b.experts.intermediate_size == 96 // G
    w = b.router.weight
    for i in range(8):  # expert i holds shard i mod G; G consecutive experts share one router row
        assert torch.equal(w[i], w[i - i % G])
        assert not torch.equal(w[i], w[(i - i % G + G) % 8])


@pytest.mark.parametrize("act,G", [("relu2", 2), ("relu2", 4), ("relu", 4)])
def test_granular_unnormalised_scale_restores_the_dense_mlp(ids, act, G):
    """Not renormalised, each active expert carries p = 1/E (a zero router: uniform, ties to the first virtual
    group), and the E*G/K scale gives that back: homogeneous activations reproduce the dense model exactly."""
    plan = UpcyclePlan(
        layers="all",
        expert_init="granular",
        num_experts=8,
        granularity=G,
        top_k=G,
        normalize=False,
        router_init="zeros",
    )
    dense, moe = _upcycled(plan, act)
    assert rel_diff(_logits(moe, ids), _logits(dense, ids)) <= TOL
    # the same experts without the scale compute each MLP / E: the scale is what makes it exact
    c = granular_scale(plan, act, True)  # llama's MLP is gated: act(gate) * up, then down
    assert c == pytest.approx((8 * G / G) ** (1 / (2 + (2 if act == "relu2" else 1))))
    for _, b in moe_blocks(moe):
        for w in (b.experts.gate_proj, b.experts.up_proj, b.experts.down_proj):
            w.data /= c
    assert rel_diff(_logits(moe, ids), _logits(dense, ids)) > 0.05


def test_granular_swiglu_is_approximate_as_the_paper_says(ids):
    """SwiGLU is not homogeneous: the s^(1/3) scale is the paper's empirical choice. Pinned figures (relative
    logit difference on the tiny model, weights N(0, 0.2)): 0.138 for E8G2T2, 0.260 for E8G4T4; without the
    scale the difference is larger."""
    got = {}
    for G in (2, 4):
        plan = UpcyclePlan(layers="all", expert_init="granular", num_experts=8, granularity=G, top_k=G)
        dense, moe = _upcycled(plan, "silu")
        got[G] = rel_diff(_logits(moe, ids), _logits(dense, ids))
        for _, b in moe_blocks(moe):  # undo the scale: dense/G per layer
            c = granular_scale(plan, "silu", True)
            for p in (b.experts.gate_proj, b.experts.up_proj, b.experts.down_proj):
                p.data /= c
        assert rel_diff(_logits(moe, ids), _logits(dense, ids)) > got[G]
    assert got[2] == pytest.approx(0.138, abs=0.01)
    assert got[4] == pytest.approx(0.260, abs=0.02)


def test_granular_scale_follows_megatron():
    pre = UpcyclePlan(expert_init="granular", num_experts=64, granularity=8, top_k=8, normalize=False)
    assert granular_scale(pre, "silu", True) == pytest.approx(4.0)  # E8G8T8: (E G^2 / T)^(1/3) = 4
    post = pre.replace(normalize=True)
    assert granular_scale(post, "silu", True) == pytest.approx(8 ** (1 / 3))  # s = G
    assert granular_scale(post, "gelu", False) == pytest.approx(8 ** (1 / 2))  # GeLU: s^(1/2)
    assert granular_scale(post, "relu2", False) == pytest.approx(8 ** (1 / 3))  # ReLU^2: s^(1/3)
    assert granular_scale(post, "relu2", True) == pytest.approx(8 ** (1 / 4))  # gated ReLU^2: degree 4
    with pytest.raises(PlanError, match="multiple of granularity"):
        UpcyclePlan(expert_init="granular", num_experts=6, granularity=4)
    with pytest.raises(PlanError, match="not a multiple of granularity"):
        plan_structure(UpcyclePlan(expert_init="granular", num_experts=8, granularity=8), 100)


# ------------------------------------------------------------------------------------------ partition
@pytest.mark.parametrize("method", ["random", "kmeans"])
def test_partition_all_experts_active_equals_dense(ids, method):
    plan = UpcyclePlan(
        layers="all", expert_init="partition", partition_method=method, num_experts=4, top_k=4, router_init="zeros"
    )
    dense, moe = _upcycled(plan)
    assert rel_diff(_logits(moe, ids), _logits(dense, ids)) <= TOL
    b = moe_blocks(moe)[0][1]
    assert b.experts.intermediate_size == 24
    d = dict(
        gate=dense.model.layers[0].mlp.gate_proj.weight,
        up=dense.model.layers[0].mlp.up_proj.weight,
        down=dense.model.layers[0].mlp.down_proj.weight,
    )
    sets = partition_sets(plan, 0, d)
    assert sorted(torch.cat(sets).tolist()) == list(range(96))  # disjoint, covering, F/E each
    for e, s in enumerate(sets):
        assert torch.equal(b.experts.gate_proj[e], d["gate"][s])
        assert torch.equal(b.experts.down_proj[e], d["down"][:, s] * 4)  # scale E folded into down


def test_partition_with_biases_and_top_k_scale():
    d = _dense(bias=True)
    plan = UpcyclePlan(num_experts=4, top_k=2, expert_init="partition")
    out = init_layer(plan, 0, d, "silu")
    assert torch.equal(out["experts.down_bias"][2], d["down_bias"])  # weights sum to 1: the bias stays whole
    # unnormalised top-k: each active expert gets E/K on average over weights ~1/E: E^2/K
    out2 = init_layer(plan.replace(normalize=False), 0, d, "silu")
    assert torch.allclose(out2["experts.down_proj"], out["experts.down_proj"] * 2)
    with pytest.raises(PlanError, match="equal parts"):
        init_layer(UpcyclePlan(num_experts=5, expert_init="partition"), 0, d, "silu")


def test_balanced_kmeans_is_balanced_and_finds_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 5
    x = torch.cat([centres[c] + 0.1 * torch.randn(10, 16, generator=g) for c in range(4)])
    labels = _balanced_kmeans(x, 4, torch.Generator().manual_seed(1))
    assert torch.bincount(labels).tolist() == [10, 10, 10, 10]
    for c in range(4):  # each planted cluster is one label
        assert labels[c * 10 : (c + 1) * 10].unique().numel() == 1


# ---------------------------------------------------------------------------------------- shared expert
@pytest.mark.parametrize("kind", ["gated", "ungated"])
def test_shared_expert_is_function_preserving_at_init(ids, kind):
    dense, moe = _upcycled(UpcyclePlan(layers="all", shared_mlp=kind))
    assert rel_diff(_logits(moe, ids), _logits(dense, ids)) <= TOL
    b = moe_blocks(moe)[0][1]
    assert b.shared_expert.intermediate_size == 96 and (b.shared_expert.gate is not None) == (kind == "gated")
    m = dense.model.layers[0].mlp
    assert torch.equal(b.experts.down_proj[0], m.down_proj.weight * 0.5)  # routed half, shared half
    # shared_split 0: routed branch starts at zero, exact whatever the routed initialiser
    dense, moe = _upcycled(UpcyclePlan(layers="all", shared_mlp=kind, shared_split=0.0, expert_init="drop"))
    assert rel_diff(_logits(moe, ids), _logits(dense, ids)) <= TOL
    assert moe_blocks(moe)[0][1].experts.down_proj.abs().max() == 0


def test_shared_expert_and_granular_export_to_stock_classes_exactly(tmp_path, ids):
    dense = tiny_model("llama")
    for name, plan, target in (
        ("shared", UpcyclePlan(layers="every_k:2:1", num_experts=4, shared_mlp="gated", router_std=0.5), "qwen2_moe"),
        ("ungated", UpcyclePlan(layers="every_k:2:1", num_experts=4, shared_mlp="ungated"), "qwen2_moe"),
        (
            "granular",
            UpcyclePlan(layers="all", num_experts=8, granularity=4, top_k=4, expert_init="granular"),
            "mixtral",
        ),
    ):
        moe = upcycle(dense, plan)
        assert not why_not(
            target,
            moe.config,
            plan,
            moe.config.upcycle["moe_layers"],
            {"shared_expert": {"intermediate_size": 96, "gated": True}} if name != "granular" else {},
        )
        export(moe, target, tmp_path / name)
        stock = _stock(tmp_path / name)
        assert rel_diff(_logits(stock, ids), _logits(moe, ids)) <= TOL, name
    cfg = json.loads((tmp_path / "granular" / "config.json").read_text())
    assert cfg["intermediate_size"] == 24 and cfg["num_local_experts"] == 8
    reasons = why_not(
        "mixtral",
        dense.config,
        UpcyclePlan(layers="all", shared_mlp="gated"),
        list(range(4)),
        plan_structure(UpcyclePlan(shared_mlp="gated"), 96),
    )
    assert any("shared expert" in r for r in reasons)


# --------------------------------------------------------------------------------------- drop-upcycling
def test_drop_upcycling_keeps_exactly_1_minus_r_of_each_expert_and_redraws_from_source_statistics():
    F, D, E, r = 256, 128, 4, 0.5
    d = _dense(F, D, mean=0.3, std=0.05, bias=True)
    out = init_layer(UpcyclePlan(num_experts=E, expert_init="drop", drop_ratio=r), 0, d, "silu")
    gate, up, down = out["experts.gate_proj"], out["experts.up_proj"], out["experts.down_proj"]
    sets = []
    for e in range(E):
        kept_g = (gate[e] == d["gate"]).all(1)
        kept_u = (up[e] == d["up"]).all(1)
        kept_d = (down[e] == d["down"]).all(0)
        assert int(kept_g.sum()) == F - math.floor(r * F)
        assert torch.equal(kept_g, kept_u) and torch.equal(kept_g, kept_d)  # one index set per expert
        assert torch.equal(out["experts.gate_bias"][e][kept_g], d["gate_bias"][kept_g])
        sets.append(~kept_g)
        new = gate[e][~kept_g]
        assert new.mean().item() == pytest.approx(0.3, abs=0.002)
        assert new.std().item() == pytest.approx(d["gate"].std().item(), rel=0.03)
        new_d = down[e][:, ~kept_g]
        assert new_d.mean().item() == pytest.approx(d["down"].mean().item(), abs=0.002)
        assert new_d.std().item() == pytest.approx(d["down"].std().item(), rel=0.03)
    assert not torch.equal(sets[0], sets[1])  # independent sets per expert
    assert torch.equal(out["experts.down_bias"][0], d["down_bias"])
    out0 = init_layer(UpcyclePlan(num_experts=E, expert_init="drop", drop_ratio=0.0), 0, d, "silu")
    assert torch.equal(out0["experts.gate_proj"][3], d["gate"])


# ---------------------------------------------------------------------------------------------- qwen2
def test_qwen2_fine_grained_shapes_and_permutation():
    F, E, G = 96, 8, 4
    d = _dense(F)
    h = F // G
    plan = UpcyclePlan(num_experts=E, expert_init="qwen2", granularity=G, drop_ratio=0.0)
    out = init_layer(plan, 0, d, "silu")
    gate = out["experts.gate_proj"]
    assert gate.shape == (E, h, 64) and out["experts.down_proj"].shape == (E, 64, h)
    rows = {tuple(r.tolist()): j for j, r in enumerate(d["gate"])}
    idx = torch.tensor([[rows[tuple(r.tolist())] for r in gate[e]] for e in range(E)])
    for c in range(E * h // F):  # each copy of the MLP is one permutation of its neurons, cut in G experts
        block = idx[c * G : (c + 1) * G].flatten()
        assert sorted(block.tolist()) == list(range(F)) and block.tolist() != list(range(F))
    for e in range(E):
        assert torch.equal(out["experts.down_proj"][e], d["down"][:, idx[e]])
    assert not torch.equal(idx[:G], idx[G : 2 * G])  # copies permuted independently
    # re-initialise 50% of each expert's neurons; explicit width
    out = init_layer(plan.replace(drop_ratio=0.5, granularity=1, expert_width=40), 0, d, "silu")
    g = out["experts.gate_proj"]
    assert g.shape == (E, 40, 64)  # ceil(8 * 40 / 96) = 4 copies, the rest discarded
    allrows = set(rows)
    for e in range(E):
        assert sum(tuple(r.tolist()) in allrows for r in g[e]) == 20
    # width 40 does not divide 96: slices straddle two copies, yet no expert holds a neuron twice
    out = init_layer(plan.replace(num_experts=6, granularity=1, expert_width=40), 0, d, "silu")
    for e in range(6):
        ids_e = [rows[tuple(r.tolist())] for r in out["experts.gate_proj"][e]]
        assert len(set(ids_e)) == 40
    with pytest.raises(PlanError, match="only expert_init=qwen2"):
        UpcyclePlan(expert_width=40)


# ------------------------------------------------------------------------------------------ data router
def test_router_from_data_is_the_centred_mean_mlp_input(tmp_path, ids):
    dense = tiny_model("llama")
    save_tiny_tokenizer(tmp_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path)
    sets = [["the man said that"], ["of years and time", "we can see"], ["people work here"], ["old world day"]]
    import yaml

    (tmp_path / "prompts.yaml").write_text(yaml.safe_dump(sets))
    plan = UpcyclePlan(num_experts=4, layers="1,3", router_init="data", router_prompts=str(tmp_path / "prompts.yaml"))
    # independent reference: the output of the block's post-attention norm is the MLP input
    means = {1: [], 3: []}
    for prompts in sets:
        acc = {1: [], 3: []}
        hooks = [
            dense.model.layers[i].post_attention_layernorm.register_forward_hook(
                lambda m, a, o, i=i: acc[i].append(o[0])
            )
            for i in (1, 3)
        ]
        with torch.no_grad():
            for p in prompts:
                dense(tok(p, return_tensors="pt").input_ids)
        for h in hooks:
            h.remove()
        for i in (1, 3):
            means[i].append(torch.cat(acc[i]).double().mean(0))
    moe = upcycle(dense, plan, tokenizer=tok)
    for i in (1, 3):
        m = torch.stack(means[i])
        c = m - m.mean(0)
        want = c / c.norm(dim=1, keepdim=True) * 0.02 * 8  # router_std * sqrt(D)
        assert torch.allclose(moe.model.layers[i].mlp.router.weight.double(), want, atol=1e-6)
    assert rel_diff(_logits(moe, ids), _logits(dense, ids)) <= TOL  # copies: routing changes nothing
    # a text file of sets separated by ---, and the errors
    (tmp_path / "p.txt").write_text("a b\n---\nc\n---\nd\n---\ne f\n")
    assert read_prompts(tmp_path / "p.txt", 4) == [["a b"], ["c"], ["d"], ["e f"]]
    with pytest.raises(PlanError, match="4 prompt sets, but the router has 3 rows"):
        read_prompts(tmp_path / "p.txt", 3)
    with pytest.raises(PlanError, match="go together"):
        UpcyclePlan(router_init="data")
    with pytest.raises(PlanError, match="tokenizer"):
        upcycle(dense, plan)
    gplan = plan.replace(expert_init="granular", granularity=2, num_experts=8)
    rows = data_router_rows(dense, tok, gplan, [1], __import__("upcycle.adapters", fromlist=["x"]).LLAMA_LIKE)
    assert rows[1].shape == (4, 64)  # one row per virtual group


# -------------------------------------------------------------------- stream, save/load, CLI, structure
PLANS = {
    "drop": dict(num_experts=4, expert_init="drop", seed=2),
    "partition-kmeans": dict(num_experts=4, expert_init="partition", partition_method="kmeans"),
    "granular": dict(num_experts=8, expert_init="granular", granularity=4, top_k=4, layers="all"),
    "qwen2": dict(num_experts=6, expert_init="qwen2", expert_width=40),
    "shared-noise": dict(num_experts=2, expert_init="noise", noise_std=0.05, shared_mlp="gated"),
    "shared-partition": dict(num_experts=4, expert_init="partition", shared_mlp="ungated", shared_split=0.25),
}


@pytest.mark.parametrize("case", PLANS)
def test_stream_equals_in_memory_and_reloads(tmp_path, ids, case):
    tiny_model("llama", tie_word_embeddings=False).save_pretrained(tmp_path / "dense", max_shard_size="60KB")
    plan = UpcyclePlan(**PLANS[case])
    ref = in_memory(tmp_path / "dense", plan, tmp_path / "ref", max_shard_size=100_000)
    got = stream_upcycle(tmp_path / "dense", plan, tmp_path / "got", max_shard_size=100_000, progress=False)
    assert_same_output(ref, got)
    moe = upcycle(AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32), plan)
    back = load(got)
    assert rel_diff(_logits(back, ids), _logits(moe, ids)) == 0
    assert back.config.upcycle["expert_init"] == plan.expert_init


def test_save_load_round_trip_in_memory(tmp_path, ids):
    plan = UpcyclePlan(num_experts=8, expert_init="granular", granularity=2, shared_mlp="gated", top_k=2)
    moe = upcycle(tiny_model("llama"), plan)
    save(moe, plan, tmp_path / "m")
    back = load(tmp_path / "m")
    assert rel_diff(_logits(back, ids), _logits(moe, ids)) == 0
    meta = json.loads((tmp_path / "m" / "upcycle.json").read_text())
    assert meta["expert_intermediate_size"] == 48 and meta["shared_expert"]["gated"]


def test_default_plan_serialises_as_before():
    d = UpcyclePlan().to_dict()
    assert "drop_ratio" not in d and "shared_mlp" not in d and "granularity" not in d
    assert UpcyclePlan(expert_init="drop", drop_ratio=0.25).to_dict()["drop_ratio"] == 0.25
    assert UpcyclePlan.from_dict(UpcyclePlan(shared_mlp="gated").to_dict()).shared_mlp == "gated"


def test_cli_flags(tmp_path, tiny_dir, ids, capsys):
    assert (
        main(["plan", "--expert-init", "qwen2", "--granularity", "4", "--drop_ratio", "0.25", "--shared-mlp", "gated"])
        == 0
    )
    text = capsys.readouterr().out
    assert "expert_init: qwen2" in text and "granularity: 4" in text and "drop_ratio: 0.25" in text
    assert (
        main(
            [
                "sparse",
                "--model",
                str(tiny_dir),
                "--out",
                str(tmp_path / "o"),
                "--quiet",
                "--expert_init",
                "partition",
                "--num_experts",
                "4",
                "--top_k",
                "4",
                "--router_init",
                "zeros",
            ]
        )
        == 0
    )
    dense = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    assert rel_diff(_logits(load(tmp_path / "o"), ids), _logits(dense, ids)) <= TOL
    capsys.readouterr()
    assert (
        main(
            [
                "sparse",
                "--model",
                str(tiny_dir),
                "--out",
                str(tmp_path / "bad"),
                "--expert_init",
                "granular",
                "--granularity",
                "3",
            ]
        )
        == 2
    )
    assert "num_experts=8 must be a multiple of granularity=3" in capsys.readouterr().err
    assert (
        main(
            [
                "sparse",
                "--model",
                str(tiny_dir),
                "--out",
                str(tmp_path / "bad"),
                "--expert_init",
                "partition",
                "--num_experts",
                "5",
            ]
        )
        == 2
    )
    assert "equal parts" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert (
        main(
            [
                "sparse",
                "--model",
                str(tiny_dir),
                "--out",
                str(tmp_path / "q"),
                "--quiet",
                "--format",
                "qwen2_moe",
                "--shared_mlp",
                "gated",
                "--num_experts",
                "4",
            ]
        )
        == 0
    )
    assert rel_diff(_logits(_stock(tmp_path / "q"), ids), _logits(dense, ids)) <= TOL


# ------------------------------------------------------------------------------------------ experiment
def test_experiment_variant_arms(tmp_path):
    """Recipe `variants`: extra upcycled arms with their own plans; function-preserving ones start at the dense
    checkpoint, drop-upcycling does not; the results name and rank them."""
    import csv

    import yaml

    from test_experiment import RECIPES
    from upcycle.errors import UpcycleError
    from upcycle.experiments.recipe import Recipe

    d = yaml.safe_load((RECIPES / "tiny.yaml").read_text())
    d |= {
        "arms": ["upcycled", "shared", "drop"],
        "extra": [0.1],
        "pretrain_tokens": 25600,
        "variants": {"shared": {"shared_mlp": "ungated"}, "drop": {"expert_init": "drop"}},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    assert main(["experiment", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    info = json.loads((tmp_path / "o" / "results.json").read_text())
    with open(tmp_path / "o" / "results.csv") as fh:
        start = {r["arm"]: float(r["val_loss"]) for r in csv.DictReader(fh) if float(r["target_extra"]) == 0}
    ref = info["dense_val_loss"]
    assert abs(start["shared"] - ref) <= 1e-4 * ref and abs(start["upcycled"] - ref) <= 1e-4 * ref
    assert start["drop"] > ref + 1e-3
    md = (tmp_path / "o" / "results.md").read_text()
    assert "upcycled: drop" in md and "## Ranking at 10% extra compute" in md
    recipe = Recipe.from_yaml(tmp_path / "r.yaml")
    assert recipe.variant_plan("drop").expert_init == "drop" and recipe.variant_plan("drop").num_experts == 8
    for bad, msg in (
        ({"dense": {}}, "a variant's name"),
        ({"x": {"expert_init": "nope"}}, "expert_init"),
        ({"x": 3}, "give {arm name"),
    ):
        with pytest.raises(UpcycleError, match=msg):
            Recipe.from_dict(d | {"variants": bad})
    with pytest.raises(UpcycleError, match="unknown arm 'nope'"):
        Recipe.from_dict(d | {"arms": ["nope"]})
    init_recipe = Recipe.from_yaml(RECIPES / "initialisers.yaml")
    assert init_recipe.variant_plan("granular").granularity == 2


def test_granular_warns_when_top_k_splits_a_virtual_group():
    import warnings

    with pytest.warns(UserWarning, match="not a multiple of granularity"):
        UpcyclePlan(expert_init="granular", num_experts=8, granularity=4, top_k=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UpcyclePlan(expert_init="granular", num_experts=8, granularity=4, top_k=4)
        UpcyclePlan(expert_init="granular", num_experts=8, granularity=2, top_k=4)
