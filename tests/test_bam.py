"""BAM and BTX: mixing N dense models (tiny random Llama = sequential block, tiny Cohere = parallel block)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_diff, tiny_model
from upcycle.errors import PlanError, UpcycleError
from upcycle.formats import native
from upcycle.formats.load import load
from upcycle.methods.bam import BamPlan, check_compatible, mix, mix_state_dicts
from upcycle.methods.registry import plan_from_dict
from upcycle.moe.attention import MoAttention, moa_modules
from upcycle.moe.block import MoEBlock, aux_losses, moe_blocks
from upcycle.train.flops import flops_per_token

FAMILIES = [("llama", {}), ("cohere", {}), ("cohere", {"use_qk_norm": True})]
FAMILY_IDS = ["llama", "cohere", "cohere-qknorm"]


def _models(model_type, n, **kw):
    return [tiny_model(model_type, seed=s, **kw) for s in range(n)]


@pytest.mark.parametrize("model_type,kw", FAMILIES, ids=FAMILY_IDS)
@pytest.mark.parametrize("kv", ["experts", "shared"])
def test_identical_copies_give_the_model(model_type, kw, kv, ids):
    """N identical models: soft attention over identical experts is the attention, and top-1 FFN routing
    renormalised (weight 1) is the FFN, so the logits are the model's. (BAM's default top-1 without
    renormalisation scales the FFN by p_top < 1: not function preserving by design, pinned below.)"""
    m = tiny_model(model_type, **kw)
    ref = m(ids).logits
    plan = BamPlan.for_method("bam", 3, kv=kv, normalize=True)
    mixed = mix([m, m, m], plan)
    assert len(moa_modules(mixed)) == 4 and len(moe_blocks(mixed)) == 4
    assert rel_diff(mixed(ids).logits, ref) < 1e-5


@pytest.mark.parametrize("model_type,kw", FAMILIES[:2], ids=FAMILY_IDS[:2])
def test_btx_identical_copies_and_bam_unnormalised_scales_ffn(model_type, kw, ids):
    m = tiny_model(model_type, **kw)
    ref = m(ids).logits
    assert rel_diff(mix([m, m], BamPlan.for_method("btx", 2))(ids).logits, ref) < 1e-5
    bam = mix([m, m], BamPlan.for_method("bam", 2))  # top-1, w = p_top (not 1)
    assert rel_diff(bam(ids).logits, ref) > 1e-3
    # With the FFN router at zero, p_top = 1/N exactly: every layer's FFN output is halved.
    for _, b in moe_blocks(bam):
        b.router.weight.data.zero_()
    layer = bam.model.layers[0]
    h = torch.randn(2, 5, m.config.hidden_size)
    assert rel_diff(layer.mlp(h), 0.5 * m.model.layers[0].mlp(h)) < 1e-5


@pytest.mark.parametrize("model_type,kw", FAMILIES, ids=FAMILY_IDS)
@pytest.mark.parametrize("kv", ["experts", "shared"])
def test_each_attention_expert_alone_is_its_model(model_type, kw, kv):
    """N different models, router forced one-hot on expert j: the mixture's attention output is model j's
    (kv experts); with kv shared, it is model j's Wq/Wo over the averaged Wk/Wv."""
    models = _models(model_type, 3, **kw)
    mixed = mix(models, BamPlan.for_method("bam", 3, kv=kv))
    T = 7
    h = torch.randn(2, T, models[0].config.hidden_size)
    pos = torch.arange(T).unsqueeze(0).expand(2, T)
    pe = models[0].model.rotary_emb(h, pos)
    for i in (0, 3):
        moa = mixed.model.layers[i].self_attn
        assert isinstance(moa, MoAttention)
        for j, m in enumerate(models):
            moa.router_probs = lambda x, j=j: F.one_hot(torch.full(x.shape[:-1], j), 3).float()
            got = moa(h, pe, None)[0]
            attn = m.model.layers[i].self_attn
            if kv == "shared":
                import copy

                attn = copy.deepcopy(attn)
                for name in ("k_proj", "v_proj"):
                    getattr(attn, name).weight.data = torch.stack(
                        [getattr(x.model.layers[i].self_attn, name).weight for x in models]
                    ).mean(0)
                if getattr(attn, "k_norm", None) is not None:
                    attn.k_norm.weight.data = torch.stack(
                        [x.model.layers[i].self_attn.k_norm.weight for x in models]
                    ).mean(0)
            want = attn(h, pe, None)[0]
            assert rel_diff(got, want) < 1e-5, (i, j)


def test_soft_router_weights_the_experts():
    """Unforced: the output is sum_j g_j * MHA_j with g = softmax(W_r h) per token."""
    models = _models("llama", 2)
    mixed = mix(models, BamPlan.for_method("bam", 2))
    moa = mixed.model.layers[1].self_attn
    h = torch.randn(1, 6, 64)
    pe = models[0].model.rotary_emb(h, torch.arange(6)[None])
    g = torch.softmax(h @ moa.router.weight.T, -1)
    want = sum(g[..., j : j + 1] * models[j].model.layers[1].self_attn(h, pe, None)[0] for j in range(2))
    assert rel_diff(moa(h, pe, None)[0], want) < 1e-5


def test_averaging_and_expert_placement():
    models = _models("cohere", 3, use_qk_norm=True)
    states = [m.state_dict() for m in models]
    mean = lambda k: torch.stack([s[k] for s in states]).mean(0)  # noqa: E731
    for kv in ("experts", "shared"):
        sd = mix_state_dicts(states, models[0].config, BamPlan.for_method("bam", 3, kv=kv))
        for k in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.2.input_layernorm.weight"):
            assert torch.allclose(sd[k], mean(k), atol=1e-7)
        for j in range(3):
            assert torch.equal(
                sd["model.layers.2.mlp.experts.down_proj"][j], states[j]["model.layers.2.mlp.down_proj.weight"]
            )
            assert torch.equal(
                sd["model.layers.2.self_attn.q_proj"][j], states[j]["model.layers.2.self_attn.q_proj.weight"]
            )
            assert torch.equal(
                sd["model.layers.2.self_attn.q_norms.%d.weight" % j],
                states[j]["model.layers.2.self_attn.q_norm.weight"],
            )
        k = sd["model.layers.2.self_attn.k_proj"]
        if kv == "shared":
            assert k.shape == states[0]["model.layers.2.self_attn.k_proj.weight"].shape
            assert torch.allclose(k, mean("model.layers.2.self_attn.k_proj.weight"), atol=1e-7)
            assert torch.allclose(
                sd["model.layers.2.self_attn.k_norms.0.weight"],
                mean("model.layers.2.self_attn.k_norm.weight"),
                atol=1e-7,
            )
        else:
            assert torch.equal(k[1], states[1]["model.layers.2.self_attn.k_proj.weight"])
        r = sd["model.layers.2.self_attn.router.weight"]
        assert r.shape == (3, 64) and 0.01 < r.std() < 0.03
    sd = mix_state_dicts(states, models[0].config, BamPlan.for_method("btx", 3))
    assert torch.allclose(
        sd["model.layers.1.self_attn.v_proj.weight"], mean("model.layers.1.self_attn.v_proj.weight"), atol=1e-7
    )
    assert "model.layers.1.self_attn.router.weight" not in sd


@pytest.mark.parametrize("model_type", ["llama", "cohere"])
@pytest.mark.parametrize("kv", ["experts", "shared"])
def test_generate_with_kv_cache_equals_no_cache(model_type, kv, ids):
    mixed = mix(_models(model_type, 3), BamPlan.for_method("bam", 3, kv=kv))
    prompt = ids[:, :10]
    kw = dict(
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        return_dict_in_generate=True,
        output_logits=True,
    )
    cached = mixed.generate(prompt, use_cache=True, **kw)
    plain = mixed.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    for a, b in zip(cached.logits, plain.logits):
        assert rel_diff(a, b) < 1e-5
    full = mixed(cached.sequences).logits[:, 9:-1]
    assert rel_diff(torch.stack(cached.logits, 1), full) < 1e-5
    layer0 = cached.past_key_values.layers[0].keys
    heads = 3 * mixed.config.num_key_value_heads if kv == "experts" else mixed.config.num_key_value_heads
    assert layer0.shape[1] == heads  # experts: the N experts' K/V heads in one cache entry


@pytest.mark.parametrize("method,kv", [("bam", "experts"), ("bam", "shared"), ("btx", "averaged")])
def test_save_load_round_trip(tmp_path, ids, method, kv):
    models = _models("cohere", 2)
    plan = BamPlan.for_method(method, 2, kv=kv)
    mixed = mix(models, plan)
    native.save(mixed, plan, tmp_path / "m")
    meta = native.read_meta(tmp_path / "m")
    assert meta["plan"]["method"] == method and meta["plan"]["kv"] == kv and meta["plan"]["num_experts"] == 2
    assert meta["moe_layers"] == [0, 1, 2, 3]
    back = load(tmp_path / "m")
    a, b = mixed.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(mixed(ids).logits, back(ids).logits)
    assert isinstance(plan_from_dict(back.config.upcycle), BamPlan)


def test_aux_losses_cover_ffn_routers_only(ids):
    mixed = mix(_models("cohere", 3), BamPlan.for_method("bam", 3))
    mixed.train()
    out = mixed(ids, labels=ids)
    aux = aux_losses(mixed, 0.01, 0.001)
    assert aux["load_balancing"] > 0 and aux["z_loss"] > 0
    (out.loss + aux["load_balancing"] + aux["z_loss"]).backward()
    moa = mixed.model.layers[3].self_attn
    # The attention router has no aux loss: the last layer's (parallel block: no FFN router reads its
    # output) gets gradient from the LM loss only; the FFN routers from both.
    assert moa.router.weight.grad.abs().sum() > 0
    mixed.zero_grad()
    mixed(ids, labels=ids)
    aux = aux_losses(mixed, 0.01, 0.001)
    (aux["load_balancing"] + aux["z_loss"]).backward()
    assert moa.router.weight.grad is None or moa.router.weight.grad.abs().sum() == 0
    assert all(b.router.weight.grad.abs().sum() > 0 for _, b in moe_blocks(mixed))


def test_flops_count_attention_experts_and_routers():
    models = _models("llama", 3)
    T = 32
    bam = mix(models, BamPlan.for_method("bam", 3))
    btx = mix(models, BamPlan.for_method("btx", 3, top_k=1))
    shared = mix(models, BamPlan.for_method("bam", 3, kv="shared"))
    c = models[0].config
    L, D, H, Hkv, hd = 4, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    attn = 2 * H * hd * D + 2 * Hkv * hd * D  # q, o + k, v of one model's layer
    router = 3 * D
    extra = L * (2 * attn + router)  # two more attention experts and the attention router per layer
    assert flops_per_token(bam, T) - flops_per_token(btx, T) == 6 * extra + 12 * H * hd * T * L * 2
    extra_shared = L * (2 * (2 * H * hd * D) + router)  # two more Wq, Wo; K/V shared
    assert flops_per_token(shared, T) - flops_per_token(btx, T) == 6 * extra_shared + 12 * H * hd * T * L * 2
    # dense=True: what each dense source model had
    assert flops_per_token(bam, T, dense=True) == flops_per_token(models[0], T)
    assert flops_per_token(shared, T, dense=True) == flops_per_token(models[0], T)


def test_bad_inputs():
    a = tiny_model("llama")
    with pytest.raises(UpcycleError, match="intermediate_size"):
        mix([a, tiny_model("llama", intermediate_size=128)], BamPlan.for_method("bam", 2), names=["seed", "code"])
    with pytest.raises(UpcycleError, match="code/config.json: vocab_size"):
        mix([a, tiny_model("llama", vocab_size=130)], BamPlan.for_method("bam", 2), names=["seed", "code"])
    sd = {k: v for k, v in a.state_dict().items() if "layers.3.mlp.up_proj" not in k}
    with pytest.raises(UpcycleError, match="code: lacks 'model.layers.3.mlp.up_proj.weight'"):
        check_compatible([a.config, a.config], [a.state_dict(), sd], ["seed", "code"])
    with pytest.raises(UpcycleError, match="code/config.json: rms_norm_eps"):
        mix([a, tiny_model("llama", rms_norm_eps=1e-5)], BamPlan.for_method("bam", 2), names=["seed", "code"])
    with pytest.raises(UpcycleError, match="code/config.json: rope_parameters"):
        mix(
            [a, tiny_model("llama", rope_parameters={"rope_type": "default", "rope_theta": 500000.0})],
            BamPlan.for_method("bam", 2),
            names=["seed", "code"],
        )
    with pytest.raises(UpcycleError, match="tokenizer differs"):
        check_compatible([a.config] * 2, [a.state_dict()] * 2, ["seed", "code"], ["abc", "abd"])
    with pytest.raises(UpcycleError, match="3 models but 2"):
        mix_state_dicts([a.state_dict()] * 2, a.config, BamPlan.for_method("bam", 3))
    with pytest.raises(PlanError, match="kv"):
        BamPlan.for_method("bam", 2, kv="averaged")
    with pytest.raises(PlanError, match="kv"):
        BamPlan.for_method("btx", 2, kv="experts")
    with pytest.raises(PlanError, match="top_k"):
        BamPlan.for_method("bam", 2, top_k=3)
    with pytest.raises(PlanError, match="at least 2"):
        BamPlan(num_experts=1)
    with pytest.raises(PlanError, match="unknown"):
        BamPlan.from_dict({"method": "bam", "num_experts": 2, "colour": 1})
    with pytest.raises(UpcycleError, match="kv must be"):
        MoAttention(a.model.layers[0].self_attn, 2, kv="nope")


@pytest.mark.parametrize("method", ["bam", "btx"])
def test_an_encoder_is_refused_by_family_not_by_a_missing_key(method):
    """BERT seeds used to fail on 'no encoder.layer.0.intermediate.dense.weight: is this checkpoint a BERT
    encoder?' (it is); the refusal now says which families BAM and BTX mix."""
    from transformers import BertConfig, BertForMaskedLM

    c = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    seeds = [BertForMaskedLM(c).eval() for _ in range(2)]
    with pytest.raises(UpcycleError, match=rf"^{method} mixes decoder LMs \(llama, .*cohere\); bert is a BERT encoder"):
        mix(seeds, BamPlan.for_method(method, 2))


def test_sparse_upcycling_works_on_cohere(ids, tmp_path):
    """The llama-like adapter covers Cohere (parallel block): copy experts + top-2 renormalised is the model,
    in memory and through `upcycle sparse` (the streaming converter)."""
    from upcycle.cli import main
    from upcycle.methods.plan import UpcyclePlan
    from upcycle.methods.surgery import upcycle

    m = tiny_model("cohere")
    moe = upcycle(m, UpcyclePlan(num_experts=4, top_k=2, layers="all"))
    assert all(isinstance(layer.mlp, MoEBlock) for layer in moe.model.layers)
    assert rel_diff(moe(ids).logits, m(ids).logits) < 1e-5
    m.save_pretrained(tmp_path / "c")
    assert (
        main(
            [
                "sparse",
                "--model",
                str(tmp_path / "c"),
                "--out",
                str(tmp_path / "s"),
                "--num_experts",
                "4",
                "--layers",
                "all",
                "--quiet",
            ]
        )
        == 0
    )
    assert rel_diff(load(tmp_path / "s")(ids).logits, m(ids).logits) < 1e-5


def _domain_file(path, words, seed):
    import random

    rng = random.Random(seed)
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(40)))
    return path


def test_cli_branch_bam_btx_train_eval(tmp_path, tiny_dir_tok, capsys):
    import json

    from conftest import WORDS
    from upcycle.cli import main

    a = _domain_file(tmp_path / "a.txt", WORDS[:40], 0)
    b = _domain_file(tmp_path / "b.txt", WORDS[60:127], 1)
    small = [
        "--batch_size",
        "2",
        "--seq_len",
        "16",
        "--eval_batches",
        "2",
        "--warmup",
        "1",
        "--lr",
        "0.01",
        "--val-fraction",
        "0.2",
        "--chunk-chars",
        "300",
        "--quiet",
    ]
    assert (
        main(
            [
                "branch",
                "--seed",
                str(tiny_dir_tok),
                "--domains",
                f"a={a}",
                f"b={b}",
                "--out",
                str(tmp_path / "br"),
                "--steps",
                "3",
                "--general-share",
                "0.25",
                *small,
            ]
        )
        == 0
    )
    runs = json.loads((tmp_path / "br" / "branches.json").read_text())["branches"]
    assert sorted(runs) == ["a", "b"]
    sa = json.loads((tmp_path / "br" / "a" / "summary.json").read_text())
    assert sa["steps"] == 3 and sa["data"]["general_share"] == 0.25 and sa["data"]["general_sequences"] > 0
    experts = [str(tmp_path / "br" / "a"), str(tmp_path / "br" / "b")]
    assert main(["bam", "--seed", str(tiny_dir_tok), "--experts", *experts, "--out", str(tmp_path / "bam")]) == 0
    assert (
        main(
            [
                "bam",
                "--seed",
                str(tiny_dir_tok),
                "--experts",
                *experts,
                "--kv",
                "shared",
                "--out",
                str(tmp_path / "bams"),
            ]
        )
        == 0
    )
    assert main(["btx", "--seed", str(tiny_dir_tok), "--experts", *experts, "--out", str(tmp_path / "btx")]) == 0
    out = capsys.readouterr().out
    assert "BAM of 3 models, attention experts (kv experts), FFN top-1 not renormalised" in out
    assert "BTX of 3 models, averaged attention, FFN top-2 renormalised" in out
    m = load(tmp_path / "bams")
    assert len(moa_modules(m)) == 4 and moa_modules(m)[0][1].kv == "shared"
    assert len(moa_modules(load(tmp_path / "btx"))) == 0
    # The mixed model trains (FFN aux losses included) and is saved back in the native format.
    assert (
        main(
            [
                "train",
                "--model",
                str(tmp_path / "bam"),
                "--data",
                str(a),
                "--out",
                str(tmp_path / "t"),
                "--steps",
                "10",
                *small,
            ]
        )
        == 0
    )
    rows = list(__import__("csv").DictReader(open(tmp_path / "t" / "metrics.csv")))
    assert float(rows[0]["load_balancing"]) > 0 and float(rows[0]["z_loss"]) > 0
    back = load(tmp_path / "t" / "model")
    assert back.config.upcycle["method"] == "bam" and len(moa_modules(back)) == 4
    ppl = []
    for name in ("bam", "t/model"):
        assert (
            main(
                [
                    "eval",
                    str(tmp_path / name),
                    "--text",
                    str(a),
                    "--context",
                    "16",
                    "--tokens",
                    "256",
                    "--out",
                    str(tmp_path / "ev" / name),
                ]
            )
            == 0
        )
        ppl.append(json.loads((tmp_path / "ev" / name / "eval.json").read_text())["texts"][0]["perplexity"])
    assert ppl[1] < 0.9 * ppl[0]  # training on a lowered the mixed model's perplexity on a
    # Bad input: a model of another shape, with the file named.
    capsys.readouterr()
    other = tmp_path / "other"
    tiny_model("llama", intermediate_size=128).save_pretrained(other)
    assert main(["bam", "--seed", str(tiny_dir_tok), "--experts", str(other), "--out", str(tmp_path / "x")]) == 2
    assert f"{other}/config.json: intermediate_size is 128" in capsys.readouterr().err
    assert main(["branch", "--seed", str(tiny_dir_tok), "--domains", "nodata", "--out", str(tmp_path / "y")]) == 2
    assert "expected NAME=DATA" in capsys.readouterr().err


def test_bam_experiment_tiny(tmp_path):
    """The recipe's smoke size end to end: seed, three corpus specialists, BTX / BAM / BAM shared at
    matched data and compute; then run again on the same OUT: every run is reused, same table."""
    import csv
    import json
    from pathlib import Path

    from upcycle.experiments.bam import BamExperiment
    from upcycle.experiments.bam_recipe import BamRecipe

    recipe = BamRecipe.from_yaml(Path(__file__).parents[1] / "recipes" / "bam-small.yaml", tiny=True)
    res = BamExperiment(recipe, tmp_path / "x", progress=False, log=lambda m: None).run()
    rows = {r["model"]: r for r in res["rows"]}
    assert list(rows) == [
        "seed",
        "python expert",
        "man expert",
        "pypi expert",
        "BTX",
        "BAM, KV experts (DM)",
        "BAM, KV experts (CM)",
        "BAM, KV shared (DM)",
        "BAM, KV shared (CM)",
    ]
    btx, bam_dm, bam_cm = rows["BTX"], rows["BAM, KV experts (DM)"], rows["BAM, KV experts (CM)"]
    assert btx["steps"] == bam_dm["steps"] == 8 and bam_dm["tokens"] == btx["tokens"]
    assert (
        bam_cm["steps"] < 8 and abs(bam_cm["train_flops"] - btx["train_flops"]) <= bam_dm["flops_per_token"] * 128 / 2
    )
    assert bam_dm["flops_per_token"] > rows["BAM, KV shared (DM)"]["flops_per_token"] > btx["flops_per_token"]
    assert rows["seed"]["steps"] == 30 and rows["python expert"]["steps"] == 6
    for r in rows.values():
        assert all(1 < r[f"ppl_{d}"] < 384 for d in ("python", "man", "pypi"))
        assert r["ms_per_token_generate"] > 0 and r["ms_per_forward"] > 0
    # Training the mixtures lowered their perplexity below the seed's (8 steps on the equal mix).
    assert btx["ppl_avg"] < rows["seed"]["ppl_avg"] and bam_dm["ppl_avg"] < rows["seed"]["ppl_avg"]
    out = tmp_path / "x"
    assert (out / "bam.png").stat().st_size > 20_000
    assert "| BAM, KV shared (CM) |" in (out / "results.md").read_text()
    assert len(list(csv.DictReader(open(out / "results.csv")))) == 9
    again = BamExperiment(recipe, out, progress=False, log=lambda m: None).run()
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("ms_")} for r in rs]  # noqa: E731
    assert strip(again["rows"]) == strip(res["rows"])
    assert json.loads((out / "runs" / "bam" / "summary.json").read_text())["steps"] == 8


def test_btx_exports_to_mixtral_bam_is_refused(tmp_path, ids, capsys):
    """BTX of Llama models is a Mixtral exactly (averaged attention, top-2 renormalised FFN experts);
    BAM's attention experts have no stock class and export says so."""
    from transformers import AutoModelForCausalLM

    from upcycle.cli import main

    models = _models("llama", 3)
    for method in ("btx", "bam"):
        plan = BamPlan.for_method(method, 3)
        native.save(mix(models, plan), plan, tmp_path / method)
    assert main(["export", str(tmp_path / "btx"), "--to", "mixtral", "--out", str(tmp_path / "mx"), "--quiet"]) == 0
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "mx", dtype=torch.float32).eval()
    assert type(stock).__name__ == "MixtralForCausalLM"
    assert rel_diff(stock(ids).logits, load(tmp_path / "btx")(ids).logits) < 1e-5
    capsys.readouterr()
    assert main(["export", str(tmp_path / "bam"), "--to", "qwen2_moe", "--out", str(tmp_path / "q")]) == 2
    assert "BAM's attention experts" in capsys.readouterr().err and not (tmp_path / "q").exists()
