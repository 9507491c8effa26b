"""MoE layer speed on CPU, as a ratio to a dense SwiGLU MLP with the same active FLOPs, measured in the same run.

    python benchmarks/moe_layer.py                                  # T=4096, our "loop" backend, HF eager + grouped_mm
    python benchmarks/moe_layer.py --tokens 4096 512 64 --backend loop grouped --out results/moe_layer_cpu.md
    python benchmarks/moe_layer.py --device cuda --dtype bfloat16 --backend grouped --tokens 16384 \
        --out results/moe_layer_cuda.md                            # GPU: CUDA events, bf16
    # the other two GPU shapes of the anchors (research/performance.md):
    python benchmarks/moe_layer.py --device cuda --backend grouped --d 4096 --d-ff 14336 --tokens 8192
    python benchmarks/moe_layer.py --device cuda --backend grouped --d 2048 --d-ff 1024 --experts 64 --top-k 8 \
        --tokens 16384

Shape (defaults): d=576, d_ff=1536, E=8, top-2, fp32 on CPU -- SmolLM2-135M upcycled to 8 experts. On a GPU
(--device cuda) times come from CUDA events around the timed calls (the device synchronised before and after),
and the default dtype is bf16. The reference is a
dense SwiGLU with d_ff = K * 1536 = 3072, i.e. the same multiply-adds per token as the MoE's two active experts.

Variants, all fed the same input tokens:
- dense SwiGLU (K*d_ff)              the reference (ratio 1.00)
- upcycle MoEBlock (<backend>)       ours: router + sort + experts + deterministic combine
- HF MixtralSparseMoeBlock (<impl>)  transformers 5.x stock block with `experts_implementation` <impl>
                                     (selected through MixtralConfig(experts_implementation=...))

Measurements:
- fwd      forward under torch.no_grad() (inference)
- fwd+bwd  forward with autograd, then backward of a fixed random output gradient, with input and all parameter
           gradients computed (a training step minus the optimizer); gradients are reset to None before each step
Each repetition times every variant once (fwd, then fwd+bwd), in an order rotated per repetition, so the drift of
this shared VM hits all variants alike. After warm-up, every sample is the mean over `inner` calls (chosen so that
one sample lasts >= --min-sample-ms). A variant's ms is the median over repetitions; its ratio is the median over
repetitions of (variant sample / dense sample of the same repetition); the last column gives min / min as well.
Other work on the machine is watched through /proc/stat: a sample during which other processes (or hypervisor
steal) used more than --max-other-load cores is taken again, and the notes line says how many stayed disturbed.

Our block and the HF blocks hold the same weights (HF's gate_up_proj = cat(gate, up)); the script checks that they
compute the same output before timing.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from _report import command, write_report  # benchmarks/ is the script's directory: on sys.path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402

from upcycle.moe.block import MoEBlock, RouterConfig  # noqa: E402
from upcycle.moe.experts import Experts  # noqa: E402
from upcycle.moe.routing import ec_tokens_per_expert  # noqa: E402


class DenseSwiGLU(nn.Module):
    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, d_ff, bias=False)
        self.up_proj = nn.Linear(d, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def build_ours(d, d_ff, E, K, backend, std, seed, router="topk", capacity=None, device="cpu", dtype=torch.float32):
    """Weights drawn in fp32 on the CPU (the same numbers on every device), then moved and cast."""
    g = torch.Generator().manual_seed(seed)
    ex = Experts(E, d, d_ff, ACT2FN["silu"])
    ex.backend = backend
    with torch.no_grad():
        for p in (ex.gate_proj, ex.up_proj, ex.down_proj):
            p.normal_(0.0, std, generator=g)
    block = MoEBlock(ex, RouterConfig(router, K, True, capacity))
    with torch.no_grad():
        block.router.weight.normal_(0.0, std, generator=g)
    return block.to(device=device, dtype=dtype)


def build_hf(ours: MoEBlock, K: int, impl: str):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    ex = ours.experts
    cfg = MixtralConfig(
        hidden_size=ex.hidden_size,
        intermediate_size=ex.intermediate_size,
        num_local_experts=ex.num_experts,
        num_experts_per_tok=K,
        hidden_act="silu",
        router_jitter_noise=0.0,
        experts_implementation=impl,
    )
    if cfg._experts_implementation != impl:  # older/newer transformers: set the internal attribute directly
        cfg._experts_implementation = impl
    hf = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        hf.gate.weight.copy_(ours.router.weight)
        hf.experts.gate_up_proj.copy_(torch.cat([ex.gate_proj, ex.up_proj], dim=1))
        hf.experts.down_proj.copy_(ex.down_proj)
    return hf.to(device=ex.up_proj.device, dtype=ex.up_proj.dtype)


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_counters():
    """(busy CPU seconds of the whole machine incl. hypervisor steal, CPU seconds of this process), or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except OSError:
        return None
    t = os.times()
    return (sum(v) - v[3] - v[4]) / _HZ, t.user + t.system


def _others(c0, c1, wall_s):
    """Cores' worth of CPU that something else (another process, the hypervisor) used during a sample."""
    if c0 is None or c1 is None or wall_s <= 0:
        return 0.0
    return max(0.0, ((c1[0] - c0[0]) - (c1[1] - c0[1])) / wall_s)


class Clock:
    """Seconds of the work between start() and stop(): wall clock on the CPU; on CUDA, events recorded on the
    stream with the device synchronised first (nothing earlier leaks in) and waited for at the end."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if not self.cuda:
            return time.perf_counter()
        torch.cuda.synchronize()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def stop(self, t0) -> float:
        if not self.cuda:
            return time.perf_counter() - t0
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        e.synchronize()
        return t0.elapsed_time(e) / 1e3


CLOCK = Clock(torch.device("cpu"))


def _fwd(module, x, gy, inner):
    with torch.no_grad():
        t0 = CLOCK.start()
        for _ in range(inner):
            module(x)
        return CLOCK.stop(t0)


def _fwd_bwd(module, x, gy, inner):
    total = 0.0
    for _ in range(inner):
        module.zero_grad(set_to_none=True)
        x.grad = None
        t0 = CLOCK.start()
        module(x).backward(gy)
        total += CLOCK.stop(t0)
    return total


def sample(fn, module, x, gy, inner, args):
    """ms per call, and the other load seen. A sample during which other work held more than
    --max-other-load cores is taken again (up to --retries times; the least disturbed one is kept)."""
    best = None
    for attempt in range(args.retries + 1):
        c0, w0 = _cpu_counters(), time.perf_counter()
        t = fn(module, x, gy, inner)
        other = _others(c0, _cpu_counters(), time.perf_counter() - w0)
        if best is None or other < best[1]:
            best = (t * 1e3 / inner, other)
        if other <= args.max_other_load:
            break
        time.sleep(args.retry_wait)
    return best


def machine(device: torch.device | None = None) -> str:
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (
            f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}"
        )
    cpu, extra = platform.processor() or platform.machine(), []
    try:
        info = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            info.setdefault(k.strip(), v.strip())
        cpu = info.get("model name", cpu)
        if "cpu family" in info:
            extra.append(f"family {info['cpu family']}")
        flags = set(info.get("flags", "").split())
        extra += [
            isa
            for isa, flag in (
                ("AVX2", "avx2"),
                ("AVX-512", "avx512f"),
                ("AVX512-BF16", "avx512_bf16"),
                ("AMX", "amx_tile"),
            )
            if flag in flags
        ]
    except OSError:
        pass
    cpu = f"{cpu} ({', '.join(extra)})" if extra else cpu
    return (
        f"{os.cpu_count()}-core {cpu} CPU, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}, {torch.get_num_threads()} torch threads"
    )


def bench_tokens(T, args, log):
    d, d_ff, E, K = args.d, args.d_ff, args.experts, args.top_k
    ec = args.router == "expert_choice"
    k_act = active_experts(args)  # dense reference width: experts each token uses on average
    dev, dt = args.device, args.dtype
    torch.manual_seed(args.seed)
    x0 = torch.randn(1, T, d).to(dev, dt)  # (batch, seq, d): the HF block wants 3-D input
    gy = torch.randn(1, T, d).to(dev, dt)

    variants = {}
    dense = DenseSwiGLU(d, k_act * d_ff)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0.0, args.std)
    variants[f"dense SwiGLU (d_ff={k_act * d_ff})"] = dense.to(dev, dt)
    ours = {
        b: build_ours(d, d_ff, E, K, b, args.std, args.seed, args.router, args.capacity, dev, dt) for b in args.backend
    }
    tag = f"EC C={args.capacity:g}, " if ec else ""
    for b, m in ours.items():
        variants[f"upcycle MoEBlock ({tag}{b})"] = m
    ref = next(iter(ours.values()))
    for impl in [] if ec else args.hf:  # transformers has no expert-choice block
        variants[f"HF MixtralSparseMoeBlock ({impl})"] = build_hf(ref, K, impl)
    if args.compile:  # the dense reference and our no-host-sync backends, each under torch.compile(fullgraph=True)
        comp = lambda m: torch.compile(m, fullgraph=True, backend=args.compile_backend)  # noqa: E731
        variants[f"dense SwiGLU (d_ff={k_act * d_ff}), compiled"] = comp(dense)
        for b, m in ours.items():
            # fullgraph needs the grouped path (the loop reads the expert sizes on the host), and torch's
            # grouped_mm traces in bf16 only; the experts' own rule says which path this many routed rows take
            rows = E * ec_tokens_per_expert(args.capacity, T, E) if ec else T * K
            if m.experts._use_grouped(x0.new_empty(rows, d)) and dt == torch.bfloat16:
                variants[f"upcycle MoEBlock ({tag}{b}), compiled"] = comp(m)
            else:
                print(f"  T={T} {b}: no compiled row (fullgraph needs the grouped path in bf16)", file=sys.stderr)

    # Same computation check: every MoE variant must give the first one's output (bf16: to bf16 rounding).
    # In bf16, transformers' router runs in bf16 and ours in fp32, so tokens whose k-th and (k+1)-th router
    # scores nearly tie can pick different experts (0.2-2% of tokens at these shapes): for the HF rows, up to
    # 5% of the tokens may differ. Compiled rows may round the fp32 router softmax differently in its last
    # bits, which can move a near-tie (a top-k pick, an expert-choice capacity boundary): up to 1%. Our eager
    # backends route identically and must agree on every token.
    tol = 1e-4 if dt == torch.float32 else 3e-2
    with torch.no_grad():
        y_ref = ref(x0).float().reshape(T, d)
        scale = y_ref.abs().max().item()
        for name, m in variants.items():
            if name.startswith("dense"):
                continue
            err_T = (m(x0).float().reshape(T, d) - y_ref).abs().amax(-1)
            off = (err_T > tol * scale + 1e-6).float().mean().item()
            allowed = (
                0.05 if (dt != torch.float32 and name.startswith("HF")) else 0.01 if name.endswith("compiled") else 0.0
            )
            if off > allowed:
                raise SystemExit(
                    f"{name} disagrees with our {args.backend[0]!r} block on {off:.1%} of the tokens: "
                    f"max |diff| {err_T.max().item():.3g} (max |y| {scale:.3g})"
                )
            if off:
                print(
                    f"  T={T} {name}: {off:.1%} of the tokens routed differently (bf16 router scores near a tie)",
                    file=sys.stderr,
                )

    x = x0.clone().requires_grad_(True)
    names = list(variants)
    # Warm-up (allocator, oneDNN primitive caches) and calibration of the inner loop counts.
    inner_f, inner_b = {}, {}
    for name in names:
        m = variants[name]
        for _ in range(args.warmup):
            _fwd(m, x0, gy, 1)
            _fwd_bwd(m, x, gy, 1)
        tf = min(_fwd(m, x0, gy, 1) for _ in range(2)) * 1e3
        tb = min(_fwd_bwd(m, x, gy, 1) for _ in range(2)) * 1e3
        inner_f[name] = max(1, math.ceil(args.min_sample_ms / max(tf, 1e-3)))
        inner_b[name] = max(1, math.ceil(args.min_sample_ms / max(tb, 1e-3)))
    fwd = {n: [] for n in names}
    fb = {n: [] for n in names}
    disturbed = 0
    for rep in range(args.reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            m = variants[name]
            gc.collect()
            for store, fn, inner in ((fwd, _fwd, inner_f), (fb, _fwd_bwd, inner_b)):
                ms, other = sample(fn, m, x if fn is _fwd_bwd else x0, gy, inner[name], args)
                store[name].append(ms)
                disturbed += other > args.max_other_load
        log(f"  T={T} rep {rep + 1}/{args.reps} fwd+bwd ms: " + ", ".join(f"{fb[n][-1]:.1f}" for n in names))

    dn = names[0]
    rows = []
    for name in names:
        rf = statistics.median(a / b for a, b in zip(fwd[name], fwd[dn]))
        rb = statistics.median(a / b for a, b in zip(fb[name], fb[dn]))
        rows.append(
            (
                name,
                statistics.median(fwd[name]),
                rf,
                statistics.median(fb[name]),
                rb,
                min(fwd[name]) / min(fwd[dn]),
                min(fb[name]) / min(fb[dn]),
            )
        )
    return rows, disturbed, 2 * args.reps * len(names)


def active_experts(args) -> int:
    """Experts a token uses on average: K for top-k, C for expert choice (each expert takes C*T/E tokens)."""
    if args.router == "expert_choice":
        if args.capacity != int(args.capacity):
            raise SystemExit("--capacity must be a whole number for the dense reference width")
        return int(args.capacity)
    return args.top_k


def fmt_ms(v):
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def table(results) -> str:
    out = [
        "| T | variant | fwd ms | fwd ratio | fwd+bwd ms | fwd+bwd ratio | best-of ratios fwd / fwd+bwd |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for T, (rows, _, _) in results:
        for name, f, rf, b, rb, mf, mb in rows:
            out.append(f"| {T} | {name} | {fmt_ms(f)} | {rf:.2f} | {fmt_ms(b)} | {rb:.2f} | {mf:.2f} / {mb:.2f} |")
    return "\n".join(out)


def notes(results, args) -> str:
    dist = ", ".join(f"T={T}: {d} of {n}" for T, (_, d, n) in results)
    return (
        f"ms: median over {args.reps} repetitions; ratio: median over repetitions of (variant / dense of the same "
        f"repetition); best-of: min variant / min dense. Samples still disturbed by other load "
        f"(> {args.max_other_load} cores busy outside this process after {args.retries} retries): {dist}."
    )


def compiled_note(results) -> str:
    """Compiled ours / compiled dense (fwd+bwd, ratio of the medians), where --compile added those rows."""
    parts = []
    for T, (rows, _, _) in results:
        med = {name: b for name, _, _, b, _, _, _ in rows}
        dense = next((b for n, b in med.items() if n.startswith("dense") and n.endswith("compiled")), None)
        if dense:
            parts += [
                f"T={T} {n[n.index('(') + 1 : n.rindex(')')]}: {b / dense:.2f}"
                for n, b in med.items()
                if n.startswith("upcycle") and n.endswith("compiled")
            ]
    return f" Compiled vs compiled dense, fwd+bwd medians: {'; '.join(parts)}." if parts else ""


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, nargs="+", default=[4096], help="token counts T (default 4096)")
    p.add_argument(
        "--backend",
        nargs="+",
        choices=["loop", "grouped", "auto"],
        default=["loop"],
        help="our Experts backends to time (default loop; the first is the correctness reference)",
    )
    p.add_argument(
        "--hf",
        nargs="*",
        default=["grouped_mm", "eager"],
        help="transformers experts_implementation values to time (default grouped_mm eager; `--hf` alone: none)",
    )
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--d-ff", type=int, default=1536)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument(
        "--router",
        choices=["topk", "expert_choice"],
        default="topk",
        help="our router (default topk); expert_choice times ours only, against a dense SwiGLU with "
        "C*d_ff (each token gets C experts on average)",
    )
    p.add_argument(
        "--capacity",
        type=float,
        default=None,
        help="expert_choice capacity factor C (default 2) / topk capacity factor (default none)",
    )
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per variant (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed fwd + fwd+bwd calls per variant (default 2)")
    p.add_argument(
        "--min-sample-ms",
        type=float,
        default=100.0,
        help="repeat a call inside one sample until it lasts this long (small T)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=3,
        help="retake a sample disturbed by other load up to this many times (default 3)",
    )
    p.add_argument(
        "--max-other-load",
        type=float,
        default=0.25,
        help="CPU cores' worth of other work (other processes, hypervisor steal) that marks a sample "
        "disturbed (default 0.25; read from /proc/stat)",
    )
    p.add_argument("--retry-wait", type=float, default=0.5, help="seconds to wait before retaking a sample")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="parameter and activation dtype (default: float32 on CPU, bfloat16 on CUDA)",
    )
    p.add_argument("--std", type=float, default=0.02, help="init std of all weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the table (with machine and date) to this markdown file")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time the dense reference and our grouped/auto blocks under torch.compile(fullgraph=True) "
        "(ratios stay against the eager dense row; compiled ours / compiled dense is printed too)",
    )
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--quiet", action="store_true", help="no per-repetition progress lines")
    args = p.parse_args(argv)
    if args.router == "expert_choice" and args.capacity is None:
        args.capacity = 2.0
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32"))
    global CLOCK
    CLOCK = Clock(args.device)

    torch.set_num_threads(args.threads)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    results = [(T, bench_tokens(T, args, log)) for T in args.tokens]
    wall = time.perf_counter() - t_start

    routing = (
        f"expert choice C={args.capacity:g}"
        if args.router == "expert_choice"
        else f"top-{args.top_k}" + (f" capacity {args.capacity:g}" if args.capacity else "")
    )
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[args.dtype]
    header = (
        f"MoE layer d={args.d}, d_ff={args.d_ff}, E={args.experts}, {routing}, {dtype_name} on {args.device}; "
        f"ratios to a dense SwiGLU with d_ff={active_experts(args) * args.d_ff} (equal active FLOPs), same run; "
        f"median of {args.reps} round-robin repetitions"
    )
    md = table(results)
    note = notes(results, args) + compiled_note(results)
    print(header)
    print(machine(args.device))
    print()
    print(md)
    print()
    print(note)
    print(f"\n({wall:.0f} s)")
    if args.out:
        write_report(
            args.out,
            f"MoE layer, {args.device.type.upper()}",
            header,
            machine(args.device),
            command("moe_layer.py", argv),
            f"{md}\n\n{note}",
            notes=(
                "fwd: forward under no_grad; fwd+bwd: forward + backward of a fixed output gradient "
                "(input and parameter gradients)",
            ),
        )


if __name__ == "__main__":
    main()
