"""Whole-model training speed: dense SmolLM2 vs our upcycled SmolLM2 vs the same MoE exported to stock transformers.

    python benchmarks/train_speed.py --out results/train_speed_cpu.md

One training step = forward + backward of the causal-LM loss + AdamW step, on a fixed random batch (batch 4,
seq 256 by default), fp32. Each variant runs in its own process (so peak RSS is its own), after --warmup
untimed steps; the figure is the median of --steps timed steps. Variants:

- dense              SmolLM2-135M-Instruct as transformers loads it (the reference, ratio 1.00)
- ours (<layers>)    upcycle(dense, UpcyclePlan(layers=...)): 8 experts, top-2, our MoEBlock (CPU "loop" backend)
- qwen2_moe          the default-plan model exported with upcycle.export and loaded by AutoModelForCausalLM
                     (stock Qwen2MoeForCausalLM; it carries a zero-width shared expert and zero q/k/v biases)
- ours (all)         every layer upcycled
- mixtral            the all-layers model exported to stock MixtralForCausalLM

Only the LM loss is trained (no load-balancing term in any variant), so all variants do the same work.
Training FLOPs per token come from upcycle.train.flops_per_token (6 N_active + attention) of our model; the stock
exports compute the same active FLOPs. Other load on the machine is read from /proc/stat and reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import command, write_report  # benchmarks/ is the script's directory: on sys.path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = ("dense", "ours", "qwen2_moe", "ours_all", "mixtral")


def _plan(layers):
    from upcycle.plan import UpcyclePlan

    return UpcyclePlan() if layers is None else UpcyclePlan(layers=layers)


def _dense():
    from transformers import AutoModelForCausalLM

    from upcycle.default_model import default_model_dir

    return AutoModelForCausalLM.from_pretrained(default_model_dir(log=lambda *a: None), dtype="float32")


def prepare(work: Path) -> None:
    """Export the default-plan model to Qwen2-MoE and the all-layers model to Mixtral (a child process)."""
    import torch

    from upcycle.export import export
    from upcycle.surgery import upcycle

    torch.manual_seed(0)
    dense = _dense()
    for target, layers in (("qwen2_moe", None), ("mixtral", "all")):
        if (work / target / "config.json").exists():
            continue
        model = upcycle(dense, _plan(layers))
        export(model, target, work / target, overwrite=True)
        del model


def build(variant: str, work: Path):
    from transformers import AutoModelForCausalLM

    from upcycle.surgery import upcycle

    dense = _dense()
    if variant == "dense":
        return dense, dense
    ours = upcycle(dense, _plan("all" if variant in ("ours_all", "mixtral") else None), inplace=True)
    if variant in ("ours", "ours_all"):
        return ours, ours
    stock = AutoModelForCausalLM.from_pretrained(work / variant, dtype="float32")
    return stock, ours  # FLOPs counted on ours: the same active computation


def _busy():
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:9]]
    except OSError:
        return None
    t = os.times()
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(v) - v[3] - v[4]) / hz, t.user + t.system


def child(variant: str, work: Path, args) -> dict:
    import torch

    from upcycle.train import active_params, flops_per_token

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, counted = build(variant, work)
    fpt = flops_per_token(counted, args.seq)
    n_active = active_params(counted)
    n_total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    del counted
    model.train()
    model.config.use_cache = False
    # fused (default): one kernel per tensor, no temporaries. foreach allocates fresh full-size temporaries each
    # step (exp_avg_sq.sqrt()), whose first-touch page faults cost ~3 s of a 10 s MoE step on this VM.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, **{args.adamw: True})
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
    times, others = [], []
    for step in range(args.warmup + args.steps):
        c0, t0 = _busy(), time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        c1 = _busy()
        if step >= args.warmup:
            times.append(dt)
            if c0 and c1:
                others.append(max(0.0, ((c1[0] - c0[0]) - (c1[1] - c0[1])) / dt))
        print(f"  {variant} step {step + 1}: {dt:.2f} s loss {out.loss.item():.3f}", file=sys.stderr, flush=True)
    return {"variant": variant, "class": type(model).__name__, "step_s": times, "other_cores": others,
            "flops_per_token": fpt, "active_params": n_active, "total_params": n_total,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run_child(variant, work, args) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--work", str(work), "--seq", str(args.seq),
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--adamw", args.adamw]
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


LABEL = {"dense": "dense SmolLM2-135M", "ours": "ours, default plan (every_k:2:1, E=8, top-2)",
         "qwen2_moe": "stock Qwen2MoeForCausalLM (export of the default plan)",
         "ours_all": "ours, --layers all (E=8, top-2)", "mixtral": "stock MixtralForCausalLM (export of --layers all)"}
REF = {"dense": "dense", "ours": "dense", "qwen2_moe": "ours", "ours_all": "dense", "mixtral": "ours_all"}


def table(results, args) -> str:
    tok = args.batch * args.seq
    r = {x["variant"]: x for x in results}
    med = {v: statistics.median(x["step_s"]) for v, x in r.items()}
    out = ["| variant | class | active params (M) | total params (M) | step s (median) | tokens/s | "
           "vs dense | vs ours | model GFLOP/s | peak RSS GB |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in [v for v in VARIANTS if v in r]:
        x = r[v]
        tps = tok / med[v]
        vs_dense = f"{med['dense'] / med[v]:.2f}" if "dense" in med else "–"
        ref = REF[v]
        vs_ours = f"{med[ref] / med[v]:.2f} (of {ref})" if v in ("qwen2_moe", "mixtral") and ref in med else "–"
        out.append(f"| {LABEL[v]} | {x['class']} | {x['active_params'] / 1e6:.1f} | {x['total_params'] / 1e6:.1f} | "
                   f"{med[v]:.2f} | {tps:.0f} | {vs_dense} | {vs_ours} | {x['flops_per_token'] * tps / 1e9:.0f} | "
                   f"{x['peak_rss_gb']:.2f} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed steps (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--adamw", choices=["fused", "foreach"], default="fused", help="AdamW implementation")
    p.add_argument("--work", type=Path, help="directory for the stock exports (default: a temporary one)")
    p.add_argument("--out", type=Path)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.prepare:
        prepare(args.work)
        return
    if args.child:
        print(json.dumps(child(args.child, args.work, args)))
        return
    from moe_layer import machine  # noqa: E402  (same machine line as the layer benchmark)

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        t0 = time.perf_counter()
        if {"qwen2_moe", "mixtral"} & set(args.variants):
            subprocess.run([sys.executable, __file__, "--prepare", "--work", str(work)], check=True)
        results = []
        for v in args.variants:
            results.append(run_child(v, work, args))
            print(f"{v}: median {statistics.median(results[-1]['step_s']):.2f} s/step", file=sys.stderr, flush=True)
        wall = time.perf_counter() - t0
    md = table(results, args)
    others = max((max(x["other_cores"], default=0.0) for x in results), default=0.0)
    head = (f"Training step (forward + backward + AdamW), batch {args.batch} x seq {args.seq} = "
            f"{args.batch * args.seq} tokens, fp32, median of {args.steps} timed steps after {args.warmup} warm-up "
            f"steps, each variant in its own process, AdamW {args.adamw}")
    note = (f"vs dense / vs ours: step-time ratio (higher = faster). Most other load seen during a timed step: "
            f"{others:.2f} cores. Wall {wall:.0f} s. Model GFLOP/s = training FLOPs per token "
            f"(upcycle.train.flops_per_token, 6 N_active + attention) x tokens/s.")
    print(head)
    print(machine())
    print(md)
    print(note)
    if args.out:
        write_report(args.out, "Whole-model training speed, CPU", head, machine(), command("train_speed.py", argv),
                     f"{md}\n\n{note}")


if __name__ == "__main__":
    main()
