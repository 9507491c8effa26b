"""Evaluation: expert-load statistics that add up, `upcycle eval` and `upcycle plot` on tiny models, and
figures that come out as real PNGs."""

import json
import math

import pytest
import torch

from conftest import TINY, tiny_model, with_router
from upcycle import UpcycleError, UpcyclePlan, upcycle
from upcycle.cli import main
from upcycle.eval.perplexity import ExpertLoad, expert_load, perplexity, perplexity_and_load
from upcycle.eval.plots import metrics_curves, plot_expert_load, plot_loss_vs_flops, read_metrics
from upcycle.moe.block import moe_blocks

T = 60  # tokens
CTX = 24  # windows of 24, 24, 12 tokens


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, TINY["vocab_size"], (T,), generator=torch.Generator().manual_seed(0))


def moe(**plan):
    return upcycle(tiny_model("llama"), UpcyclePlan(**plan))


def png_size(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def test_topk_counts_add_up(tokens):
    model = moe(num_experts=4, top_k=2)
    load = expert_load(model, tokens, CTX)
    assert load.layers == [1, 3] and load.num_experts == 4 and load.tokens == T
    assert load.counts.sum(1).tolist() == [2 * T, 2 * T]  # K assignments per token, nothing dropped
    assert torch.equal(load.counts, load.demand)
    assert load.dropped_assignments.tolist() == [0, 0] and load.dropped_tokens.tolist() == [0, 0]
    assert torch.allclose(load.share.sum(1), torch.ones(2, dtype=torch.float64))
    # the same numbers as the routers' own per-call statistics, added up over the windows
    by_hand = torch.zeros(2, 4, dtype=torch.long)
    with torch.no_grad():
        for s in range(0, T, CTX):
            model(tokens[s : s + CTX].unsqueeze(0))
            for i, (_, b) in enumerate(sorted(moe_blocks(model))):
                by_hand[i] += torch.tensor(b.router_stats()["tokens_per_expert"])
    assert torch.equal(load.counts, by_hand)
    ppl, load2 = perplexity_and_load(model, tokens, CTX)
    assert ppl == pytest.approx(perplexity(model, tokens, CTX), rel=1e-6) and torch.equal(load2.counts, load.counts)


def test_uniform_router_entropy_and_capacity_drops(tokens):
    # A zero router gives every expert probability 1/E: entropy log E, and ties go to experts 0 and 1.
    E, C = 4, 0.5
    load = expert_load(moe(num_experts=E, top_k=2, router_init="zeros"), tokens, CTX)
    assert torch.allclose(load.router_entropy, torch.full((2,), math.log(E), dtype=torch.float64))
    assert torch.allclose(load.router_entropy_norm, torch.ones(2, dtype=torch.float64))
    assert load.counts[:, :2].tolist() == [[T, T]] * 2 and load.counts[:, 2:].sum() == 0
    assert torch.allclose(load.load_entropy, torch.full((2,), 0.5, dtype=torch.float64))  # log 2 / log 4

    load = expert_load(moe(num_experts=E, top_k=2, router_init="zeros", capacity_factor=C), tokens, CTX)
    # Per window of n tokens: capacity ceil(C n K / E) per expert; expert 0 serves the first `cap` first
    # choices, expert 1 the first `cap` second choices; the other tokens lose both.
    caps = [math.ceil(C * n * 2 / E) for n in (24, 24, 12)]  # 6, 6, 3
    kept = sum(caps)
    assert load.counts[:, :2].tolist() == [[kept, kept]] * 2
    assert load.demand[:, :2].tolist() == [[T, T]] * 2
    assert load.dropped_tokens.tolist() == [T - kept] * 2
    assert load.dropped_assignments.tolist() == [2 * (T - kept)] * 2
    assert load.dropped_token_share.tolist() == pytest.approx([(T - kept) / T] * 2)
    assert load.dropped_assignment_share.tolist() == pytest.approx([(T - kept) / T] * 2)


def test_expert_choice_each_expert_takes_its_capacity(tokens):
    E = 4
    load = expert_load(with_router(moe(num_experts=E), "expert_choice"), tokens, CTX)  # C = 2
    caps = [min(math.ceil(2 * n / E), n) for n in (24, 24, 12)]  # 12, 12, 6
    assert load.counts.tolist() == [[sum(caps)] * E] * 2
    # zero router: every expert takes the same first tokens of each window, the rest are left behind
    load = expert_load(with_router(moe(num_experts=E, router_init="zeros"), "expert_choice"), tokens, CTX)
    assert load.dropped_tokens.tolist() == [T - sum(caps)] * 2
    assert load.routers == ["expert_choice C=2"] * 2


def test_total_and_dict(tokens):
    model = moe(num_experts=4)
    a = expert_load(model, tokens[:30], CTX)
    b = expert_load(model, tokens[30:], CTX)
    t = ExpertLoad.total([a, b])
    assert t.tokens == 60 and torch.equal(t.counts, a.counts + b.counts)
    expect = (a.router_entropy * a.tokens + b.router_entropy * b.tokens) / 60
    assert torch.allclose(t.router_entropy, expect)
    d = json.loads(json.dumps(t.to_dict()))
    assert d["tokens_per_expert"] == t.counts.tolist() and len(d["load_entropy_over_log_e"]) == 2
    back = ExpertLoad.from_dict(d)
    assert torch.equal(back.demand, t.demand) and torch.allclose(back.load_entropy, t.load_entropy)
    with pytest.raises(ValueError, match="no MoE layers"):
        expert_load(tiny_model("llama"), tokens, CTX)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_cli_dense_and_upcycled(tmp_path, tiny_dir_tok, text_file, capsys):
    code, out, _ = run(capsys, "eval", tiny_dir_tok, "--text", text_file, "--context", 64, "--out", tmp_path / "d")
    assert code == 0, out
    assert "| text" in out and "no MoE layers" in out
    d = json.loads((tmp_path / "d" / "eval.json").read_text())
    assert d["expert_load"] is None and d["texts"][0]["tokens"] == 300 and d["texts"][0]["perplexity"] > 1
    assert not (tmp_path / "d" / "expert-load.png").exists()

    up = tmp_path / "moe"
    assert (
        main(
            [
                "sparse",
                "--model",
                str(tiny_dir_tok),
                "--out",
                str(up),
                "--num_experts",
                "4",
                "--quiet",
                "--capacity_factor",
                "1.0",
            ]
        )
        == 0
    )
    capsys.readouterr()
    code, out, err = run(
        capsys,
        "eval",
        up,
        "--text",
        text_file,
        "--text",
        text_file,
        "--context",
        64,
        "--tokens",
        200,
        "--out",
        tmp_path / "e",
    )
    assert code == 0, err
    assert "expert load: 2 MoE layers x 4 experts, router topk k=2 C=1" in out
    rows = [line for line in out.splitlines() if line.startswith("| 1 ") or line.startswith("| 3 ")]
    assert len(rows) == 2
    d = json.loads((tmp_path / "e" / "eval.json").read_text())
    ppl = [t["perplexity"] for t in d["texts"]]
    assert len(ppl) == 2 and ppl[0] == ppl[1]
    el = d["expert_load"]
    assert el["layers"] == [1, 3] and el["tokens"] == 400
    kept = [sum(row) for row in el["tokens_per_expert"]]
    assert [k + dr for k, dr in zip(kept, el["dropped_assignments"])] == [800, 800]
    png = tmp_path / "e" / "expert-load.png"
    w, h = png_size(png)
    assert w > 600 and h > 300 and png.stat().st_size > 20_000


def test_eval_cli_bad_input(tmp_path, tiny_dir_tok, capsys):
    code, _, err = run(capsys, "eval", tmp_path / "nope")
    assert code == 2 and "model directory not found" in err
    bare = tmp_path / "bare"
    tiny_model("llama").save_pretrained(bare)
    capsys.readouterr()
    code, _, err = run(capsys, "eval", bare)  # no tokenizer
    assert code == 2 and "--tokenizer" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "eval", tiny_dir_tok, "--text", tmp_path / "missing.txt")
    assert code == 2 and "text file not found" in err
    code, _, err = run(capsys, "eval", tiny_dir_tok, "--context", 1)
    assert code == 2 and "at least 2" in err
    (tmp_path / "notmodel").mkdir()
    (tmp_path / "notmodel" / "tokenizer.json").write_text("{}")
    code, _, err = run(capsys, "eval", tmp_path / "notmodel")
    assert code == 2 and "no config.json" in err
    code, _, err = run(capsys, "eval", tmp_path / "notmodel", "--tokenizer", tmp_path / "notmodel")
    assert code == 2
    (tmp_path / "notmodel" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, _, err = run(capsys, "eval", tmp_path / "notmodel")
    assert code == 2 and "cannot load the tokenizer" in err


def test_plots_are_real_pngs(tmp_path):
    runs = {
        "dense": [(1e12 * 2**i, 3.0 - 0.1 * i) for i in range(8)],
        "upcycled": [(1e12 * 2**i, 2.9 - 0.14 * i) for i in range(8)],
    }
    train = {k: [(x * 1.01, y + 0.05) for x, y in v] for k, v in runs.items()}
    p = plot_loss_vs_flops(runs, tmp_path / "loss.png", train=train, budget=1e14, reference={"dense start": 3.05})
    w, h = png_size(p)
    assert 1000 < w < 1600 and 600 < h < 1000 and p.stat().st_size > 30_000
    m = torch.tensor([[10, 10, 10, 10], [40, 0, 0, 0], [20, 10, 5, 5]])
    p = plot_expert_load(m, tmp_path / "load.png", [1, 3, 5], dropped=[0, 0.5, 0.1], entropy=[1, 0, 0.88])
    w, h = png_size(p)
    assert w > 700 and h > 400
    with pytest.raises(UpcycleError):
        plot_expert_load(torch.zeros(0), tmp_path / "x.png")
    with pytest.raises(UpcycleError, match="nothing to plot"):
        plot_loss_vs_flops({"a": []}, tmp_path / "x.png")


def test_plot_cli_reads_metrics_tolerantly(tmp_path, capsys):
    a, b = tmp_path / "upcycled", tmp_path / "dense"
    a.mkdir(), b.mkdir()
    (a / "metrics.csv").write_text(
        "step,tokens,flops,loss,val_loss,lr\n"
        + "".join(
            f"{s},{s * 512},{s * 1e12},{3 - s / 100},{'' if s % 5 else 2.9 - s / 90},1e-4\n" for s in range(1, 41)
        )
    )
    (b / "metrics.csv").write_text("step,flops,loss,val_loss\n1,2e12,3.1,\n5,1e13,3.0,3.05\n10,2e13,nan,2.98\n")
    cols = read_metrics(a)
    assert cols["lr"][0] == 1e-4
    xc, train, val = metrics_curves(cols)
    assert xc == "flops" and len(train) == 40 and len(val) == 8 and val[0] == (5e12, pytest.approx(2.9 - 5 / 90))
    xc, train, val = metrics_curves(read_metrics(b / "metrics.csv"))
    assert len(train) == 2 and len(val) == 2  # the nan loss and the empty val_loss are skipped

    out = tmp_path / "fig" / "loss.png"
    code, stdout, err = run(capsys, "plot", a, b / "metrics.csv", "--out", out, "--budget", 1e15)
    assert code == 0, err
    assert "2 runs, x = flops" in stdout and png_size(out)[0] > 1000
    code, stdout, _ = run(capsys, "plot", a, "--x", "tokens", "--out", tmp_path / "t.png", "--label", "mine")
    assert code == 0 and "x = tokens" in stdout

    code, _, err = run(capsys, "plot", b, "--x", "tokens", "--out", tmp_path / "t.png")
    assert code == 2 and "no tokens column" in err
    code, _, err = run(capsys, "plot", tmp_path / "none", "--out", tmp_path / "t.png")
    assert code == 2 and "metrics file not found" in err
    code, _, err = run(capsys, "plot", a, b, "--label", "one", "--out", tmp_path / "t.png")
    assert code == 2 and "one per run" in err
    code, _, err = run(capsys, "plot", a, "--out", tmp_path / "t.svg")
    assert code == 2 and "PNG" in err
