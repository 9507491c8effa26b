"""The training loop on the tiny Llama: it learns, resumes bit-exactly, counts FLOPs as by hand, carries
a dense optimizer state over, runs the same under DDP and FSDP2, and its CLI fails cleanly."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, WORDS, save_tiny_tokenizer, tiny_model, with_router
from upcycle import UpcyclePlan, upcycle
from upcycle.cli import main
from upcycle.data.documents import Document
from upcycle.data.tokens import pack_documents
from upcycle.errors import UpcycleError
from upcycle.moe.block import moe_blocks
from upcycle.train.config import TrainConfig
from upcycle.train.flops import active_params, flops_per_token, model_on_meta
from upcycle.train.loop import train
from upcycle.train.optim import (
    build_optimizer,
    carry_over_optimizer_state,
    load_named_optimizer_state,
    named_optimizer_state,
)
from upcycle.train.step import optimizer_step

PLAN = UpcyclePlan(num_experts=4, top_k=2)  # layers 1 and 3 of 4
SEQ = 32


def corpus(n_docs: int = 40, seed: int = 0) -> list[Document]:
    """Documents over a 40-word vocabulary with a repeated bigram structure: learnable in a few steps."""
    rng = random.Random(seed)
    words = WORDS[:40]
    docs = []
    for i in range(n_docs):
        out = []
        for _ in range(100):
            w = rng.randrange(len(words))
            out += [words[w], words[(w * 7 + 3) % len(words)]]
        docs.append(Document(f"doc{i}", " ".join(out)))
    return docs


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)


@pytest.fixture(scope="module")
def data(tok):
    return pack_documents(corpus(), tok, SEQ, val_fraction=0.1, seed=0)


def cfg(**kw) -> TrainConfig:
    base = dict(lr=3e-3, min_lr=3e-4, warmup=2, steps=6, batch_size=4, seq_len=SEQ, eval_every=0, eval_batches=2)
    return TrainConfig(**(base | kw))


def moe_model():
    return upcycle(tiny_model(), PLAN)


def test_loss_goes_down_and_outputs(tmp_path, data, tok):
    h = train(moe_model(), data, cfg(steps=16, eval_every=8, warmup=3), tmp_path / "run", tokenizer=tok, progress=False)
    first = sum(r["lm_loss"] for r in h[:3]) / 3
    last = sum(r["lm_loss"] for r in h[-3:]) / 3
    assert math.log(TINY["vocab_size"]) - 1 < first  # starts near chance (ln 128 = 4.85, word ids <= 40)
    assert last < first - 0.7, (first, last)
    vals = [r["val_loss"] for r in h if r["val_loss"] is not None]
    assert len(vals) == 2 and vals[1] < vals[0]
    assert all(r["load_balancing"] > 0 and r["z_loss"] == 0 for r in h)  # plan: alpha 0.01, beta 0
    assert all(abs(r["loss"] - r["lm_loss"] - r["load_balancing"]) < 1e-5 for r in h)
    assert all(r["expert_load_max_over_mean"] >= 1.0 for r in h)
    assert [r["step"] for r in h] == list(range(1, 17)) and h[-1]["tokens"] == 16 * 4 * SEQ
    run = tmp_path / "run"
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,tokens,flops,loss,lm_loss,load_balancing,z_loss,val_loss") and len(rows) == 17
    summary = json.loads((run / "summary.json").read_text())
    assert summary["flops"] == 16 * 4 * SEQ * summary["flops_per_token"]
    # the final model reloads in the native format and predicts as the trained one did
    import upcycle as U

    back = U.load(run / "model")
    assert len(moe_blocks(back)) == 2 and (run / "model" / "tokenizer.json").is_file()
    events = next((run / "tb").glob("events.out.tfevents.*"))
    ev = read_events(events)
    assert {"loss", "lm_loss", "load_balancing", "val_loss", "tokens_per_s"} <= set(ev)
    assert [s for s, _ in ev["loss"]] == list(range(1, 17))
    assert ev["loss"][-1][1] == pytest.approx(h[-1]["loss"], rel=1e-6)  # float32 in the file
    assert [s for s, _ in ev["val_loss"]] == [8, 16]


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message: varints, 64/32-bit and length-delimited."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 1:
            v, i = buf[i : i + 8], i + 8
        elif wt == 5:
            v, i = buf[i : i + 4], i + 4
        else:
            n, i = _varint(buf, i)
            v, i = buf[i : i + n], i + n
        yield num, wt, v


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return v, i


def read_events(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Parse the TFRecord framing (length, masked CRCs) and the Event/Summary/Value protos by hand: a
    check of the bytes on disk that does not trust the writer's own reader."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as _masked_crc32c

    raw, pos, out = path.read_bytes(), 0, {}
    while pos < len(raw):
        (n,) = struct.unpack_from("<Q", raw, pos)
        assert struct.unpack_from("<I", raw, pos + 8)[0] == _masked_crc32c(raw[pos : pos + 8])
        event = raw[pos + 12 : pos + 12 + n]
        assert struct.unpack_from("<I", raw, pos + 12 + n)[0] == _masked_crc32c(event)
        pos += 16 + n
        fields = list(_fields(event))
        step = next((v for num, _, v in fields if num == 2), 0)
        for num, _, summary in fields:
            if num != 5:
                continue
            for _, _, value in _fields(summary):
                f = {k: v for k, _, v in _fields(value)}
                out.setdefault(f[1].decode(), []).append((step, struct.unpack("<f", f[2])[0]))
    return out


def test_masked_crc32c_known_value():
    # the CRC the framing check above relies on (the event writer is tensorboard's own)
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as _masked_crc32c

    # CRC-32C("123456789") = 0xE3069283 (RFC 3720 check value), then TFRecord's mask
    crc = 0xE3069283
    assert _masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_resume_is_bit_exact(tmp_path, data):
    N = 2
    c = cfg(steps=2 * N, checkpoint_every=N, eval_every=N)
    a = moe_model()
    ha = train(a, data, c, tmp_path / "a", progress=False, save_model=False)
    b = moe_model()
    hb1 = train(b, data, c, tmp_path / "b", progress=False, stop_at=N)
    assert len(hb1) == N and not (tmp_path / "b" / "model").exists()
    b2 = moe_model()  # a fresh process would start from the initial model again
    hb = train(b2, data, c, tmp_path / "b", resume=True, progress=False, save_model=False)
    keys = ("loss", "lm_loss", "load_balancing", "val_loss", "lr", "grad_norm", "tokens", "flops")
    assert [[r[k] for k in keys] for r in ha] == [[r[k] for k in keys] for r in hb]
    sa, sb = a.state_dict(), b2.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # and the loss did not simply stand still
    assert ha[-1]["loss"] < ha[0]["loss"]


def test_out_dir_rules(tmp_path, data):
    out = tmp_path / "run"
    train(moe_model(), data, cfg(steps=1), out, progress=False, save_model=False)
    with pytest.raises(UpcycleError, match="already exists"):
        train(moe_model(), data, cfg(steps=1), out, progress=False)
    with pytest.raises(UpcycleError, match="nothing to resume"):
        train(moe_model(), data, cfg(steps=1), out, progress=False, resume=True)
    with pytest.raises(UpcycleError, match="seq_len"):
        train(moe_model(), data, cfg(seq_len=16), tmp_path / "x", progress=False)


def test_flops_by_hand():
    D, F, L, V, H, KV, hd = 64, 96, 4, 128, 4, 2, 16
    attn = D * H * hd + 2 * D * KV * hd + H * hd * D  # q, k, v, o
    mlp = 3 * D * F
    per_layer = attn + mlp + 2 * D  # two RMSNorms
    dense_n = L * per_layer + D + V * D  # final norm, tied output projection (embedding lookup excluded)
    assert dense_n == 131648
    dense = tiny_model()
    assert active_params(dense) == dense_n
    attn_term = 12 * L * (H * hd) * 256
    assert flops_per_token(dense, 256) == 6 * dense_n + attn_term
    moe = upcycle(dense, PLAN)
    E, K = 4, 2
    moe_n = dense_n + 2 * (E * D + (K - 1) * mlp)  # two MoE layers: router + K experts instead of one MLP
    assert active_params(moe) == moe_n
    assert flops_per_token(moe, 256) == 6 * moe_n + attn_term
    assert flops_per_token(moe, 256, dense=True) == flops_per_token(dense, 256)
    # expert choice counts C experts per token, soft all E; from a config on the meta device
    ec = with_router(model_on_meta(dense.config, PLAN), "expert_choice", capacity_factor=1.5)
    assert active_params(ec) == dense_n + 2 * (E * D + 0.5 * mlp)
    soft = model_on_meta(dense.config, PLAN.replace(router="soft"))
    assert active_params(soft) == dense_n + 2 * (E * D + (E - 1) * mlp)


def test_optimizer_step_averages_micro_batches_and_clears_stale_gradients():
    """The step both loops take: micro-batches average to the whole batch; the caller's gradients are not
    added in; the returned terms are (loss, task loss, load balancing, z-loss)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
    ref = torch.nn.Linear(4, 1)
    torch.nn.functional.mse_loss(ref(x), y).backward()
    want = ref.weight.detach() - 0.5 * ref.weight.grad
    for micro in ([(x, y)], [(x[:4], y[:4]), (x[4:], y[4:])]):
        m = torch.nn.Linear(4, 1)
        m.load_state_dict(ref.state_dict())
        m.weight.grad = torch.ones_like(m.weight)  # stale: must not count
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        sums, gn = optimizer_step(
            m, opt, 0.5, micro, lambda b, m=m: torch.nn.functional.mse_loss(m(b[0]), b[1]), (0.01, 0.0), 0.0
        )
        assert opt.param_groups[0]["lr"] == 0.5 and gn is None and all(p.grad is None for p in m.parameters())
        assert sums.tolist()[2:] == [0.0, 0.0] and sums[0] == sums[1]  # no MoE block: no aux terms
        torch.testing.assert_close(m.weight.detach(), want)


def test_compute_share(tmp_path, data):
    c = cfg(steps=2, pretrain_tokens=1e6)
    train(moe_model(), data, c, tmp_path / "r", progress=False, save_model=False)
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["pretrain_flops"] == 1e6 * s["dense_flops_per_token"]
    assert s["compute_share"] == pytest.approx(2 * 4 * SEQ * s["flops_per_token"] / s["pretrain_flops"])
    assert s["flops_per_token"] > s["dense_flops_per_token"]


def test_lr_schedule():
    c = cfg(lr=1.0, min_lr=0.1, warmup=4, steps=14)
    lrs = [c.lr_at(s, 14) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.9)))
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def test_config_yaml_round_trip(tmp_path):
    c = cfg(lr=1e-4, min_lr=0.0, tokens=10_000, parallel="fsdp")
    p = tmp_path / "t.yaml"
    c.to_yaml(p)
    assert TrainConfig.from_yaml(p) == c
    p.write_text("lr: 3e-4\nsteps: 5\n")  # YAML 1.1 reads 3e-4 as a string; accepted for float fields
    assert TrainConfig.from_yaml(p).lr == 3e-4
    p.write_text("learning_rate: 1\n")
    with pytest.raises(UpcycleError, match="unknown key 'learning_rate'"):
        TrainConfig.from_yaml(p)
    with pytest.raises(UpcycleError, match="min_lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    assert cfg(tokens=1000, batch_size=2, grad_accum=2).total_steps(world_size=2) == math.ceil(1000 / (8 * SEQ))


def dense_run_state(data, steps: int = 3):
    """A dense model trained a few steps, and its name-keyed AdamW state."""
    dense = tiny_model()
    c = cfg(steps=steps, batch_size=2)
    opt = build_optimizer(dense, c)
    for s in range(steps):
        x = data.train[2 * s : 2 * s + 2]
        dense(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return dense, opt


def test_carry_over_round_trip(data):
    dense, opt = dense_run_state(data)
    dense_state = named_optimizer_state(opt)
    moe = upcycle(dense, PLAN)
    mapped = carry_over_optimizer_state(dense_state, dense, moe)
    s = mapped["state"]
    for i in (1, 3):
        for moe_name, dense_name in (
            ("gate_proj", "gate_proj.weight"),
            ("up_proj", "up_proj.weight"),
            ("down_proj", "down_proj.weight"),
        ):
            src = dense_state["state"][f"model.layers.{i}.mlp.{dense_name}"]
            got = s[f"model.layers.{i}.mlp.experts.{moe_name}"]
            assert got["exp_avg"].shape == (4, *src["exp_avg"].shape)
            for e in range(4):
                assert torch.equal(got["exp_avg"][e], src["exp_avg"]) and torch.equal(
                    got["exp_avg_sq"][e], src["exp_avg_sq"]
                )
            assert torch.equal(got["step"], src["step"]) and float(got["step"]) == 3
        r = s[f"model.layers.{i}.mlp.router.weight"]
        assert not r["exp_avg"].any() and not r["exp_avg_sq"].any() and float(r["step"]) == 0
    untouched = [n for n in dense_state["state"] if ".mlp." not in n or ".layers.0." in n or ".layers.2." in n]
    assert len(untouched) == len(dense_state["state"]) - 6
    for n in untouched:
        assert all(torch.equal(s[n][k], dense_state["state"][n][k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert set(s) == {n for n, _ in moe.named_parameters()}
    # torch's index-keyed form maps the same
    idx = carry_over_optimizer_state(opt.state_dict(), dense, moe)
    assert all(torch.equal(idx["state"][n]["exp_avg"], s[n]["exp_avg"]) for n in s)


def test_carry_over_with_drop_upcycling_zeroes_the_redrawn_neurons(data):
    """Drop-Upcycling: each expert keeps the dense moments on the neurons it keeps; the neurons it re-draws
    start at zero, as new parameters do. Initialisers that slice or rescale the MLP are refused."""
    from upcycle.methods.init import drop_sets

    dense, opt = dense_run_state(data)
    dense_state = named_optimizer_state(opt)
    plan = PLAN.replace(expert_init="drop", drop_ratio=0.5)
    moe = upcycle(dense, plan)
    s = carry_over_optimizer_state(dense_state, dense, moe)["state"]
    F = TINY["intermediate_size"]
    for i in (1, 3):
        sets = drop_sets(plan, i, 4, F)
        for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            src = dense_state["state"][f"model.layers.{i}.mlp.{name}.weight"]["exp_avg_sq"]
            got = s[f"model.layers.{i}.mlp.experts.{name}"]["exp_avg_sq"]
            for e, S in enumerate(sets):
                keep = torch.ones(F, dtype=torch.bool)
                keep[S] = False
                assert len(S) == F // 2
                assert not got[e].index_select(dim, S).any()
                assert torch.equal(
                    got[e].index_select(dim, keep.nonzero()[:, 0]), src.index_select(dim, keep.nonzero()[:, 0])
                )
    for kw in (dict(expert_init="partition"), dict(expert_init="granular", granularity=2), dict(shared_mlp="gated")):
        p = PLAN.replace(**kw)
        with pytest.raises(UpcycleError, match="fresh optimizer"):
            carry_over_optimizer_state(dense_state, dense, upcycle(dense, p), plan=p)


def test_carried_state_takes_the_dense_step(data):
    """What carry-over preserves: at the upcycled start (copied experts, renormalised top-k, alpha = 0)
    the MoE model computes the dense function, so every parameter outside the MoE layers gets the
    dense gradient; with the carried moments its AdamW step is then the dense run's next step. And the
    experts' gradients add up to the dense MLP's (each token's combine weights sum to 1)."""
    dense, opt = dense_run_state(data)
    moe = upcycle(dense, PLAN)
    c = cfg(batch_size=2, aux_loss_coef=0.0)
    mopt = build_optimizer(moe, c)
    load_named_optimizer_state(mopt, carry_over_optimizer_state(named_optimizer_state(opt), dense, moe), c)
    x = data.train[10:12]
    for g in opt.param_groups + mopt.param_groups:
        g["lr"] = 1e-2
    dense(input_ids=x, labels=x).loss.backward()
    moe(input_ids=x, labels=x).loss.backward()
    dg = dict(dense.named_parameters())
    mg = dict(moe.named_parameters())
    for i in (1, 3):
        total = mg[f"model.layers.{i}.mlp.experts.up_proj"].grad.sum(0)
        ref = dg[f"model.layers.{i}.mlp.up_proj.weight"].grad
        assert torch.allclose(total, ref, atol=1e-5 * ref.abs().max().item())
    opt.step()
    mopt.step()
    shared = [n for n in mg if n in dg]
    assert len(shared) == len(dg) - 6
    for n in shared:
        ref = dg[n].detach()
        assert torch.allclose(mg[n].detach(), ref, atol=1e-6, rtol=0), n
    # fresh moments would not: the same step from a fresh AdamW moves the weights differently
    fresh = upcycle(tiny_model(), PLAN)
    fopt = build_optimizer(fresh, c)
    for g in fopt.param_groups:
        g["lr"] = 1e-2
    fresh(input_ids=x, labels=x).loss.backward()
    fopt.step()
    moved_fresh = (
        (
            dict(fresh.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
            - tiny_model().model.layers[0].self_attn.q_proj.weight
        )
        .abs()
        .max()
    )
    moved_carry = (
        (mg["model.layers.0.self_attn.q_proj.weight"] - tiny_model().model.layers[0].self_attn.q_proj.weight)
        .abs()
        .max()
    )
    assert not torch.isclose(moved_fresh, moved_carry, rtol=1e-3)


def test_carry_over_in_train(tmp_path, data):
    """The carried state reaches the loop: the first step's update uses the dense moments."""
    dense, opt = dense_run_state(data)
    moe = upcycle(dense, PLAN)
    init = carry_over_optimizer_state(named_optimizer_state(opt), dense, moe)
    before = {n: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for n, s in init["state"].items()}
    h = train(moe, data, cfg(steps=2), tmp_path / "r", init_optimizer_state=init, progress=False, save_model=False)
    assert len(h) == 2 and all(math.isfinite(r["loss"]) for r in h)
    # training must not write into the caller's state (an experiment reuses it for several arms)
    assert all(torch.equal(v, init["state"][n][k]) for n, s in before.items() for k, v in s.items())
    with pytest.raises(UpcycleError, match="lacks"):
        carry_over_optimizer_state({"state": {"nope.weight": {}}, "param_groups": []}, dense, moe)


WORKER = r"""
import json, os, random, sys, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_model
from test_train import corpus, dense_run_state, PLAN, SEQ, cfg
from upcycle import upcycle
from upcycle.train.optim import carry_over_optimizer_state, named_optimizer_state
from upcycle.data.tokens import pack_documents
from upcycle.train.loop import train
from transformers import AutoTokenizer
torch.set_num_threads(1)
tok = AutoTokenizer.from_pretrained(sys.argv[1])
data = pack_documents(corpus(), tok, SEQ, val_fraction=0.1, seed=0)
out = {{}}
for mode in ("ddp", "fsdp"):
    c = cfg(batch_size=2, grad_accum=1, eval_every=2, parallel=mode)
    d = os.path.join(sys.argv[2], mode)
    train(upcycle(tiny_model(), PLAN), data, c, d, progress=False, stop_at=3)  # interrupted at step 3 ...
    out[mode] = train(upcycle(tiny_model(), PLAN), data, c, d, progress=False, resume=True)  # ... and resumed
# FSDP with 2 micro-batches of 1 per rank (gradients reduce-scattered once per step)
c = cfg(batch_size=1, grad_accum=2, eval_every=0, parallel="fsdp")
out["fsdp_accum"] = train(upcycle(tiny_model(), PLAN), data, c, os.path.join(sys.argv[2], "accum"),
                          progress=False, save_model=False)
# FSDP starting from a dense run's AdamW state carried onto the experts
dense, opt = dense_run_state(data)
moe = upcycle(dense, PLAN)
init = carry_over_optimizer_state(named_optimizer_state(opt), dense, moe)
c = cfg(batch_size=2, grad_accum=1, eval_every=0, parallel="fsdp")
out["fsdp_carry"] = train(moe, data, c, os.path.join(sys.argv[2], "carry"), progress=False, save_model=False,
                          init_optimizer_state=init)
if int(os.environ["RANK"]) == 0:
    json.dump(out, open(os.path.join(sys.argv[2], "histories.json"), "w"))
"""


def test_ddp_and_fsdp_match_single_process(tmp_path, data, tok):
    """Two gloo processes with micro-batches of 2 against one process with 2 micro-batches of 2: the same
    global batch, cut into the same micro-batches (so the same aux losses). The distributed runs are
    interrupted at step 3 and resumed. FSDP also with gradient accumulation (micro-batches of 1, synced
    once per step) and starting from a carried-over dense AdamW state, each against one process. The losses agree to fp32 reduction-order rounding (~1e-7
    relative per step; DDP is bit-equal here); 1e-5 leaves room for 6 steps of drift."""
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(tok_dir),
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    single = train(
        moe_model(),
        data,
        cfg(batch_size=2, grad_accum=2, eval_every=2),
        tmp_path / "single",
        progress=False,
        save_model=False,
    )
    runs = json.loads((tmp_path / "histories.json").read_text())
    # Same global batches as the distributed runs: 4 micro-batches of 1; carried dense AdamW state
    accum = train(
        moe_model(), data, cfg(batch_size=1, grad_accum=4), tmp_path / "single_accum", progress=False, save_model=False
    )
    dense, opt = dense_run_state(data)
    moe = upcycle(dense, PLAN)
    carry = train(
        moe,
        data,
        cfg(batch_size=2, grad_accum=2),
        tmp_path / "single_carry",
        progress=False,
        save_model=False,
        init_optimizer_state=carry_over_optimizer_state(named_optimizer_state(opt), dense, moe),
    )
    fresh = [
        r["loss"]
        for r in train(
            moe_model(), data, cfg(batch_size=2, grad_accum=2), tmp_path / "f", progress=False, save_model=False
        )
    ]
    assert [r["loss"] for r in carry] != pytest.approx(fresh, rel=1e-3)  # the carried state changes the run
    for mode, single in (("ddp", single), ("fsdp", single), ("fsdp_accum", accum), ("fsdp_carry", carry)):
        h = runs[mode]
        assert [r["step"] for r in h] == [r["step"] for r in single]
        for a, b in zip(single, h):
            for k in ("loss", "lm_loss", "load_balancing", "grad_norm"):
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (mode, a["step"], k)
            if a["val_loss"] is not None:
                assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        assert h[-1]["tokens"] == single[-1]["tokens"] == 6 * 4 * SEQ
    assert [r["loss"] for r in accum] != pytest.approx([r["loss"] for r in runs["fsdp"]], rel=1e-4)  # other batches
    import upcycle as U

    fsdp_model = U.load(tmp_path / "fsdp" / "model")  # gathered from the shards on rank 0
    assert len(moe_blocks(fsdp_model)) == 2


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_train_resume_and_carry_over(tmp_path, tiny_dir_tok, capsys):
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(d.text for d in corpus(30)))
    moe_dir = tmp_path / "moe"
    assert run_cli(capsys, "sparse", "--model", tiny_dir_tok, "--out", moe_dir, "--num_experts", 4, "--quiet")[0] == 0
    dense_run = tmp_path / "dense-run"
    code, out, err = run_cli(
        capsys,
        "train",
        "--model",
        tiny_dir_tok,
        "--data",
        text,
        "--out",
        dense_run,
        "--steps",
        3,
        "--batch-size",
        2,
        "--seq-len",
        SEQ,
        "--chunk-chars",
        1000,
        "--checkpoint-every",
        3,
        "--pretrain-tokens",
        "1e6",
        "--quiet",
    )
    assert code == 0, err
    assert "trained 3 steps" in out and "% of the dense pretraining compute" in out
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(dense_run / "model", use_safetensors=True)  # a plain HF directory
    ckpt = dense_run / "checkpoints" / "step-000003"
    run = tmp_path / "moe-run"
    code, out, err = run_cli(
        capsys,
        "train",
        "--model",
        moe_dir,
        "--data",
        text,
        "--out",
        run,
        "--steps",
        4,
        "--batch_size",
        2,
        "--seq_len",
        SEQ,
        "--chunk-chars",
        1000,
        "--stop-at",
        2,
        "--dense-optimizer-state",
        ckpt,
        "--quiet",
    )
    assert code == 0, err
    assert "stopped at step 2; continue with --resume" in out
    code, out, err = run_cli(
        capsys,
        "train",
        "--model",
        moe_dir,
        "--data",
        text,
        "--out",
        run,
        "--steps",
        4,
        "--batch_size",
        2,
        "--seq_len",
        SEQ,
        "--chunk-chars",
        1000,
        "--resume",
        "--quiet",
    )
    assert code == 0, err
    assert "trained 4 steps" in out and (run / "model" / "upcycle.json").is_file()
    code, out, _ = run_cli(capsys, "check", run / "model", "--against", tiny_dir_tok, "--context", 16)
    assert code == 0 and "top-1 agreement" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{tmp}/missing.txt"], "data path not found"),
        (["--data", "{text}", "--lr", "-1"], "lr"),
        (["--data", "{text}", "--model", "{tmp}/nomodel"], "model directory not found"),
        (["--data", "{text}", "--dense-optimizer-state", "{tmp}/nostate"], "dense optimizer state not found"),
        (["--data", "{text}", "--config", "{tmp}/none.yaml"], "training config file not found"),
        (["--data", "{text}", "--resume"], "nothing to resume"),
        (["--data", "{text}", "--seq-len", "100000"], "fewer than one sequence"),
    ],
)
def test_cli_errors_write_nothing(tmp_path, tiny_dir_tok, text_file, capsys, args, message):
    out = tmp_path / "run"
    argv = [a.format(tmp=tmp_path, text=text_file) for a in args]
    if "--model" not in argv:
        argv += ["--model", str(tiny_dir_tok)]
    code, _, err = run_cli(capsys, "train", *argv, "--out", out, "--steps", 2, "--quiet")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_router_summary_on_the_device_equals_the_host_statistics():
    """The per-step expert-load and entropy figures, computed on the device for one read per step, are the
    mean over layers of what router_stats() reports."""
    from upcycle.train.metrics import _router_summary

    moe = upcycle(tiny_model("llama"), UpcyclePlan(num_experts=4, layers="all", router_std=1.0))
    assert _router_summary(moe) is None  # no forward yet
    moe(input_ids=torch.randint(0, 64, (2, 16)))
    ratios, ents = [], []
    for _, b in moe_blocks(moe):
        s = b.router_stats()
        c = s["tokens_per_expert"]
        ratios.append(max(c) / (sum(c) / len(c)))
        ents.append(s["entropy"])
    got = _router_summary(moe).tolist()
    assert got == pytest.approx([sum(ratios) / len(ratios), sum(ents) / len(ents)], rel=1e-6)
    assert got[0] > 1.0  # a sharp router loads the experts unevenly: the figure is not trivially 1
