"""A layer's experts as stacked 3-D parameters, run over tokens already sorted by expert.

    gate_proj (E, F, D)   up_proj (E, F, D)   down_proj (E, D, F)    [+ optional biases (E, F) / (E, D)]

y = down(act(gate(x)) * up(x)) for gated MLPs (SwiGLU, GeGLU), y = down(act(up(x))) otherwise. With
`dropout` > 0 (T5 keeps a dropout between the activation and its down projection), training drops hidden units
with one (rows, d_ff) mask per call, drawn the same way by both backends.

Two backends compute the same thing:
- "loop": split the sorted rows by expert once and run plain matmuls per expert, as one autograd node
  (_ExpertLoop) that writes every expert's output and weight gradients straight into one buffer. This is
  the CPU path (fp32). Autograd through a 3-D parameter indexed per expert inside the loop would build a
  full-size zero gradient per expert (the backward of indexing fills a zero tensor of the whole
  parameter); autograd through `unbind(0)` avoids that but still stacks the gradients in an extra
  full-size copy per parameter.
- "grouped": one grouped matmul per projection (torch.nn.functional.grouped_mm) with int32 offsets;
  no host synchronisation, the GPU path (bf16 weights, or fp32 weights under bf16 autocast, cast per call
  as autocast casts a linear). On CPU "auto" takes it for small batches (at most
  GROUPED_CPU_MAX_ROWS routed rows), where the loop's per-expert Python overhead shows.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

BACKENDS = ("auto", "loop", "grouped")
# "auto" on CPU: grouped up to this many routed rows (token-expert assignments; T=512 at top-2), loop above.
GROUPED_CPU_MAX_ROWS = 1024
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class Experts(nn.Module):
    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        gated: bool = True,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        E, D, Fd = num_experts, hidden_size, intermediate_size
        self.num_experts, self.hidden_size, self.intermediate_size = E, D, Fd
        self.act_fn, self.gated = act_fn, gated
        self.dropout = float(dropout)  # on the hidden units, in training only (T5's DenseReluDense dropout)
        self.backend = "auto"
        kw = dict(dtype=dtype, device=device)
        # Uninitialised on purpose: experts are always filled from a dense MLP or a checkpoint.
        self.gate_proj = nn.Parameter(torch.empty(E, Fd, D, **kw)) if gated else None
        self.up_proj = nn.Parameter(torch.empty(E, Fd, D, **kw))
        self.down_proj = nn.Parameter(torch.empty(E, D, Fd, **kw))
        self.gate_bias = nn.Parameter(torch.empty(E, Fd, **kw)) if gated and bias else None
        self.up_bias = nn.Parameter(torch.empty(E, Fd, **kw)) if bias else None
        self.down_bias = nn.Parameter(torch.empty(E, D, **kw)) if bias else None

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, gated={self.gated}, "
            f"bias={self.up_bias is not None}, backend={self.backend}"
            + (f", dropout={self.dropout:g}" if self.dropout else "")
        )

    def _use_grouped(self, x: torch.Tensor) -> bool:
        if self.backend != "auto":
            return self.backend == "grouped"
        if _grouped_mm is None:
            return False
        if x.is_cuda:  # bf16 weights, or fp32 master weights under bf16 autocast (`upcycle train` on a GPU)
            return self._compute_dtype(x) == torch.bfloat16
        # CPU: grouped_mm is a C++ loop of mm, free of the Python loop's per-expert overhead, which is what
        # small batches pay for (fwd+bwd at T=64: 1.94x dense vs the loop's 2.12x; at T=4096 the loop wins,
        # 0.92x vs 1.03x; results/moe_layer_cpu.md)
        return (
            x.device.type == "cpu" and x.shape[0] <= GROUPED_CPU_MAX_ROWS and not torch.is_autocast_enabled("cpu")
        )  # autocast casts the loop's linears

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The matmuls' dtype: autocast's where it is on for this device, else the weights'."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self.up_proj.dtype

    def forward(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_AD: rows sorted by expert, counts_E rows per expert. Returns y_AD in the weights' dtype (the
        grouped path under autocast: autocast's). Rows past sum(counts_E) belong to no expert: their output
        (and input gradient) is left unwritten, for the caller to mask."""
        x_AD = x_AD.to(self.up_proj.dtype)
        mask_AF = None
        if self.training and self.dropout > 0:  # inverted dropout: kept units scaled by 1 / (1 - p)
            mask_AF = F.dropout(x_AD.new_ones(x_AD.shape[0], self.intermediate_size), self.dropout, True)
        if self._use_grouped(x_AD):
            return self._grouped(x_AD, counts_E, mask_AF)
        return self._loop(x_AD, counts_E, mask_AF)

    def _loop(self, x_AD: torch.Tensor, counts_E: torch.Tensor, mask_AF: torch.Tensor | None = None) -> torch.Tensor:
        sizes = counts_E.tolist()  # the one host sync of this backend
        params = (self.gate_proj, self.up_proj, self.down_proj, self.gate_bias, self.up_bias, self.down_bias)
        if mask_AF is not None or torch.is_autocast_enabled(x_AD.device.type):
            # autocast casts every linear, as it always did; dropout needs its mask in the graph
            return _loop_autograd(x_AD, sizes, self.act_fn, *params, mask_AF=mask_AF)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x_AD,) + params):
            return _ExpertLoop.apply(x_AD.contiguous(), sizes, self.act_fn, *params)
        return _loop_forward(x_AD, sizes, self.act_fn, *params)[0]

    def _grouped(self, x_AD: torch.Tensor, counts_E: torch.Tensor, mask_AF: torch.Tensor | None = None) -> torch.Tensor:
        offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
        dt = self._compute_dtype(x_AD)  # under autocast: cast like autocast casts a linear (differentiably)
        x_AD = x_AD.to(dt)
        mask_AF = None if mask_AF is None else mask_AF.to(dt)
        bias_row = None
        if self.up_bias is not None:
            # Expert of each row, without a host sync (output_size is known); rows of no expert read a zero
            # bias row E, so the garbage gradients of those rows reach no bias
            A, E = x_AD.shape[0], self.num_experts
            rest = (A - counts_E.sum()).reshape(1).to(counts_E.dtype)
            bias_row = torch.repeat_interleave(
                torch.arange(E + 1, device=x_AD.device), torch.cat([counts_E, rest]), output_size=A
            )

        def proj(x, w_EOI, b_EO):
            y = _grouped_mm(x, w_EOI.to(dt).transpose(1, 2), offs=offs)
            if b_EO is None:
                return y
            return y + torch.cat([b_EO.to(dt), b_EO.new_zeros(1, b_EO.shape[1], dtype=dt)])[bias_row]

        h = proj(x_AD, self.up_proj, self.up_bias)
        h = self.act_fn(proj(x_AD, self.gate_proj, self.gate_bias)) * h if self.gated else self.act_fn(h)
        if mask_AF is not None:
            h = h * mask_AF
        return proj(h, self.down_proj, self.down_bias)


def _loop_autograd(x_AD, sizes, act_fn, gate, up, down, gate_b, up_b, down_b, mask_AF=None):
    """The loop through plain autograd (weights unbound once, never indexed per expert): the autocast path,
    and training with dropout (mask_AF: the (rows, d_ff) dropout mask, already scaled)."""
    E = len(sizes)
    none = [None] * E
    up_e, down_e = up.unbind(0), down.unbind(0)
    gate_e = gate.unbind(0) if gate is not None else none
    gb, ub, db = (b.unbind(0) if b is not None else none for b in (gate_b, up_b, down_b))
    n = sum(sizes)  # rows past n belong to no expert (dropped assignments): zeros here, masked by the caller
    masks = mask_AF[:n].split(sizes) if mask_AF is not None else none
    outs = []
    for e, x in enumerate(x_AD[:n].split(sizes)):
        if x.shape[0] == 0:
            continue
        h = F.linear(x, up_e[e], ub[e])
        h = act_fn(F.linear(x, gate_e[e], gb[e])) * h if gate is not None else act_fn(h)
        if masks[e] is not None:
            h = h * masks[e]
        outs.append(F.linear(h, down_e[e], db[e]))
    if n < x_AD.shape[0]:
        outs.append(x_AD.new_zeros(x_AD.shape[0] - n, down.shape[1]))
    if not outs:
        return x_AD.new_zeros(0, down.shape[1])
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _linear_into(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """out = F.linear(x, w, b), written in place (the same mm/addmm call F.linear makes for 2-D input)."""
    if b is None:
        return torch.mm(x, w.t(), out=out)
    return torch.addmm(b, x, w.t(), out=out)


def _loop_forward(x_AD, sizes, act_fn, gate, up, down, gate_b, up_b, down_b, keep: bool = False):
    """Per-expert matmuls over contiguous row blocks, each expert's output written straight into one (A, D)
    tensor (no cat). keep=True also returns each non-empty expert's pre-activations (gate or None, up) for the
    backward, kept per expert: the allocator recycles blocks of that size, while a fresh (A, F) buffer per call
    is a new mapping whose first touch page-faults inside the matmuls (seen in the profile on the 2-core CPU)."""
    x_AD = x_AD.contiguous()
    out_AD = x_AD.new_empty(x_AD.shape[0], down.shape[1])
    saved = []
    start = 0
    for e, n in enumerate(sizes):
        if n == 0:
            continue
        rows = slice(start, start + n)
        start += n
        x = x_AD[rows]
        u = F.linear(x, up[e], None if up_b is None else up_b[e])
        if gate is not None:
            g = F.linear(x, gate[e], None if gate_b is None else gate_b[e])
            h = act_fn(g) * u
        else:
            g, h = None, act_fn(u)
        _linear_into(out_AD[rows], h, down[e], None if down_b is None else down_b[e])
        if keep:
            saved.append((g, u))
    return out_AD, saved


class _ExpertLoop(torch.autograd.Function):
    """The "loop" backend as one autograd node.

    Autograd through `param.unbind(0)` + per-expert F.linear + cat is correct but stacks the per-expert weight
    gradients into the (E, ...) gradient in a separate full-size copy per parameter, and keeps four (A, F)
    activations alive. This node writes each expert's weight gradients straight into one (E, ...) buffer, keeps
    only the two pre-activations (the activation and its product are recomputed per expert, cache-hot, in the
    backward) and skips the gradients nobody asked for (frozen experts, an input that needs none).
    Same matmuls, so the same results to fp32 rounding; the activation's derivative comes from autograd itself,
    so any act_fn works.
    """

    @staticmethod
    def forward(ctx, x_AD, sizes, act_fn, gate, up, down, gate_b, up_b, down_b):
        out_AD, saved = _loop_forward(x_AD, sizes, act_fn, gate, up, down, gate_b, up_b, down_b, keep=True)
        ctx.sizes, ctx.act_fn = sizes, act_fn
        ctx.has = tuple(t is not None for t in (gate, gate_b, up_b, down_b))
        pre = [t for g, u in saved for t in ((g, u) if gate is not None else (u,))]
        ctx.save_for_backward(x_AD, gate, up, down, *pre)
        return out_AD

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_AD):
        x_AD, gate, up, down, *pre = ctx.saved_tensors
        has_gate, has_gb, has_ub, has_db = ctx.has
        n_x, _, _, n_gate, n_up, n_down, n_gb, n_ub, n_db = ctx.needs_input_grad
        E, D, F_ = down.shape[0], down.shape[1], up.shape[1]
        dy_AD = dy_AD.contiguous()
        dx = torch.empty_like(x_AD) if n_x else None
        dgate = torch.empty_like(gate) if n_gate else None
        dup = torch.empty_like(up) if n_up else None
        ddown = torch.empty_like(down) if n_down else None
        dgb = x_AD.new_empty(E, F_) if n_gb else None
        dub = x_AD.new_empty(E, F_) if n_ub else None
        ddb = x_AD.new_empty(E, D) if n_db else None
        upstream = n_x or n_gate or n_up or n_gb or n_ub
        pre = iter(pre)
        start = 0
        for e, n in enumerate(ctx.sizes):
            if n == 0:  # an expert without tokens gets a zero gradient
                for grad in (dgate, dup, ddown, dgb, dub, ddb):
                    if grad is not None:
                        grad[e].zero_()
                continue
            rows = slice(start, start + n)
            start += n
            g = next(pre) if has_gate else None
            u = next(pre)
            x, dy = x_AD[rows], dy_AD[rows]
            with torch.enable_grad():
                z = (g if has_gate else u).detach().requires_grad_(True)
                act = ctx.act_fn(z)
            h = act.detach() * u if has_gate else act.detach()
            if n_down:
                torch.mm(dy.t(), h, out=ddown[e])
            if n_db:
                torch.sum(dy, 0, out=ddb[e])
            if not upstream:
                continue
            dh = torch.mm(dy, down[e])
            if has_gate:
                du = dh * act.detach()
                dg = torch.autograd.grad(act, z, dh * u)[0]
            else:
                du, dg = torch.autograd.grad(act, z, dh)[0], None
            if n_up:
                torch.mm(du.t(), x, out=dup[e])
            if n_ub:
                torch.sum(du, 0, out=dub[e])
            if n_gate:
                torch.mm(dg.t(), x, out=dgate[e])
            if n_gb:
                torch.sum(dg, 0, out=dgb[e])
            if n_x:
                dx_rows = torch.mm(du, up[e], out=dx[rows])
                if dg is not None:
                    dx_rows.addmm_(dg, gate[e])
        return dx, None, None, dgate, dup, ddown, dgb, dub, ddb
