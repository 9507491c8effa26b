"""BAM's soft mixture of attention experts (MoA) against its natural dense reference, measured in the same run.

    python benchmarks/moa_layer.py                                 # CPU fp32, N=4 experts, T = 4 x 512
    python benchmarks/moa_layer.py --out results/moa_layer_cpu.md
    python benchmarks/moa_layer.py --device cuda --out results/moa_layer_cuda.md   # bf16, CUDA events

Soft routing sends every token to all N attention experts, so the layer does N attentions' work by design;
the question is how close it gets to that floor. The reference is one dense attention with the same FLOPs:
a Llama attention with N*H query heads and N*Hkv key/value heads (kv=experts) or Hkv (kv=shared), the same
head size, output projection from all N*H heads. Variants, same input, same causal mask, same kernel (sdpa):
- dense (N*H heads)        the reference (ratio 1.00)
- ours, kv=experts         `upcycle.moe.attention.MoAttention`: the N experts' heads stacked into one attention
                           call, the router weights applied before one stacked output projection
- ours, kv=shared          the same with one shared set of keys and values (the reference then has Hkv kv heads)
- loop over N experts      the direct reading of the paper: N stock attention modules, each output weighted
                           by its router column and summed (what the stacked layout replaces)
- one expert (H heads)     a single dense attention of one model, for scale (ratio ~1/N)

Timing, warm-up, repetition and the disturbance check are moe_layer.py's (same functions).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from _report import command, write_report

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding  # noqa: E402

import moe_layer as ML  # noqa: E402
from upcycle.moe.attention import MoAttention  # noqa: E402


def llama_attention(d, heads, kv_heads, head_dim, impl):
    cfg = LlamaConfig(
        hidden_size=d,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=4 * d,
        num_hidden_layers=1,
        attention_bias=False,
    )
    cfg._attn_implementation = impl
    return LlamaAttention(cfg, layer_idx=0), cfg


class Call(nn.Module):
    """module(x) -> attention output, with the rotary embedding and mask every variant gets."""

    def __init__(self, attn, pos):
        super().__init__()
        self.attn, self.pos = attn, pos

    def forward(self, x):
        return self.attn(x, position_embeddings=self.pos, attention_mask=None)[0]


class Loop(nn.Module):
    """N separate attention modules, outputs weighted per token by a softmax router and summed."""

    def __init__(self, experts, router, pos):
        super().__init__()
        self.experts, self.router, self.pos = nn.ModuleList(experts), router, pos

    def forward(self, x):
        p = torch.softmax(F.linear(x.float(), self.router.weight.float()), dim=-1).to(x.dtype)  # fp32, as ours
        out = 0
        for j, a in enumerate(self.experts):
            out = out + a(x, position_embeddings=self.pos, attention_mask=None)[0] * p[..., j : j + 1]
        return out


def build(args, kv):
    torch.manual_seed(args.seed)
    d, H, Hkv, hd, N = args.d, args.heads, args.kv_heads, args.d // args.heads, args.experts
    experts = []
    for _ in range(N):
        a, cfg = llama_attention(d, H, Hkv, hd, args.impl)
        for p in a.parameters():
            nn.init.normal_(p, std=args.std)
        experts.append(a)
    moa = MoAttention(experts[0], N, kv)
    with torch.no_grad():
        moa.router.weight.normal_(0.0, args.std)
        moa.q_proj.copy_(torch.stack([a.q_proj.weight for a in experts]))
        moa.o_proj.copy_(torch.stack([a.o_proj.weight for a in experts]))
        if kv == "experts":
            moa.k_proj.copy_(torch.stack([a.k_proj.weight for a in experts]))
            moa.v_proj.copy_(torch.stack([a.v_proj.weight for a in experts]))
        else:
            moa.k_proj.copy_(torch.stack([a.k_proj.weight for a in experts]).mean(0))
            moa.v_proj.copy_(torch.stack([a.v_proj.weight for a in experts]).mean(0))
    router = nn.Linear(d, N, bias=False)
    with torch.no_grad():
        router.weight.copy_(moa.router.weight)
    return experts, moa, router, cfg


def bench(T, args, log):
    dev, dt = args.device, args.dtype
    B, S = T // args.seq, args.seq
    x0 = torch.randn(B, S, args.d).to(dev, dt)
    gy = torch.randn(B, S, args.d).to(dev, dt)
    experts, moa, router, cfg = build(args, "experts")
    _, moa_shared, _, _ = build(args, "shared")
    rope = LlamaRotaryEmbedding(cfg)
    pos = tuple(t.to(dev, dt) for t in rope(x0.float().cpu(), torch.arange(S).unsqueeze(0).expand(B, S)))
    N, H, Hkv, hd = args.experts, args.heads, args.kv_heads, args.d // args.heads
    dense, _ = llama_attention(args.d, N * H, N * Hkv, hd, args.impl)
    dense_shared, _ = llama_attention(args.d, N * H, Hkv, hd, args.impl)
    for m in (dense, dense_shared):
        for p in m.parameters():
            nn.init.normal_(p, std=args.std)
    ref, ref_shared = (
        f"dense attention ({N * H} heads, {N * Hkv} kv heads)",
        f"dense attention ({N * H} heads, {Hkv} kv heads)",
    )
    loop = f"loop over {N} attention experts + router"
    variants = {
        ref: Call(dense, pos),
        "ours MoA, kv=experts": Call(moa, pos),
        loop: Loop(experts, router, pos),
        f"one expert ({H} heads)": Call(experts[0], pos),
        ref_shared: Call(dense_shared, pos),
        "ours MoA, kv=shared": Call(moa_shared, pos),
    }
    variants = {k: v.to(dev, dt) for k, v in variants.items()}
    ref_of = {k: ref_shared if k in (ref_shared, "ours MoA, kv=shared") else ref for k in variants}
    with torch.no_grad():  # the stacked layout computes what the loop computes
        a, b = variants["ours MoA, kv=experts"](x0).float(), variants[loop](x0).float()
        tol = 1e-4 if dt == torch.float32 else 3e-2
        if (a - b).abs().max() > tol * b.abs().max() + 1e-6:
            raise SystemExit(f"MoA and the loop over experts disagree: max |diff| {(a - b).abs().max():.3g}")
    x = x0.clone().requires_grad_(True)
    names = list(variants)
    inner_f, inner_b = {}, {}
    for n in names:
        m = variants[n]
        for _ in range(args.warmup):
            ML._fwd(m, x0, gy, 1)
            ML._fwd_bwd(m, x, gy, 1)
        tf = min(ML._fwd(m, x0, gy, 1) for _ in range(2)) * 1e3
        tb = min(ML._fwd_bwd(m, x, gy, 1) for _ in range(2)) * 1e3
        inner_f[n] = max(1, int(args.min_sample_ms / max(tf, 1e-3)) + 1)
        inner_b[n] = max(1, int(args.min_sample_ms / max(tb, 1e-3)) + 1)
    fwd = {n: [] for n in names}
    fb = {n: [] for n in names}
    disturbed = 0
    for rep in range(args.reps):
        for n in names[rep % len(names) :] + names[: rep % len(names)]:
            for store, fn, inner in ((fwd, ML._fwd, inner_f), (fb, ML._fwd_bwd, inner_b)):
                ms, other = ML.sample(fn, variants[n], x if fn is ML._fwd_bwd else x0, gy, inner[n], args)
                store[n].append(ms)
                disturbed += other > args.max_other_load
        log(f"  T={T} rep {rep + 1}/{args.reps}")
    rows = []
    for n in names:
        r = ref_of[n]
        rows.append(
            (
                n,
                statistics.median(fwd[n]),
                statistics.median(a / b for a, b in zip(fwd[n], fwd[r])),
                statistics.median(fb[n]),
                statistics.median(a / b for a, b in zip(fb[n], fb[r])),
                r,
            )
        )
    return rows, disturbed, 2 * args.reps * len(names)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048], help="tokens per call (batch x --seq)")
    p.add_argument("--seq", type=int, default=512, help="sequence length (default 512)")
    p.add_argument("--d", type=int, default=576, help="hidden size (default 576, SmolLM2-135M)")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--experts", type=int, default=4, help="attention experts N (BAM: seed + 3 specialists)")
    p.add_argument("--impl", default="sdpa", help="transformers attention implementation (default sdpa)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-sample-ms", type=float, default=100.0)
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--max-other-load", type=float, default=0.25)
    p.add_argument("--retry-wait", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--std", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--out", type=Path)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32"))
    for T in args.tokens:
        if T % args.seq:
            raise SystemExit(f"--tokens {T} is not a multiple of --seq {args.seq}")
    ML.CLOCK = ML.Clock(args.device)
    torch.set_num_threads(args.threads)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    results = [(T, bench(T, args, log)) for T in args.tokens]
    lines = [
        "| T | variant | fwd ms | fwd ratio | fwd+bwd ms | fwd+bwd ratio | reference |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for T, (rows, _, _) in results:
        for n, f, rf, b, rb, r in rows:
            lines.append(f"| {T} | {n} | {ML.fmt_ms(f)} | {rf:.2f} | {ML.fmt_ms(b)} | {rb:.2f} | {r} |")
    dist = ", ".join(f"T={T}: {d} of {n}" for T, (_, d, n) in results)
    note = (
        f"ms: median of {args.reps} round-robin repetitions; ratio: median over repetitions of variant / its "
        f"reference in the same repetition. Samples still disturbed by other load: {dist}."
    )
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[args.dtype]
    header = (
        f"BAM soft mixture of attention, d={args.d}, {args.heads} heads / {args.kv_heads} kv heads per "
        f"expert, N={args.experts} experts, sequences of {args.seq}, causal, {args.impl}, {dtype_name} on "
        f"{args.device}; ratios to a dense attention with N times the heads (equal FLOPs), same run"
    )
    md = "\n".join(lines)
    print(header)
    print(ML.machine(args.device))
    print()
    print(md)
    print()
    print(note)
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    if args.out:
        write_report(
            args.out,
            f"Mixture of attention layer, {args.device.type.upper()}",
            header,
            ML.machine(args.device),
            command("moa_layer.py", argv),
            f"{md}\n\n{note}",
            notes=("fwd: forward under no_grad; fwd+bwd: forward + backward of a fixed output gradient",),
        )


if __name__ == "__main__":
    main()
