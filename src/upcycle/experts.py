"""A layer's experts as stacked 3-D parameters, run over tokens already sorted by expert.

    gate_proj (E, F, D)   up_proj (E, F, D)   down_proj (E, D, F)    [+ optional biases (E, F) / (E, D)]

y = down(act(gate(x)) * up(x)) for gated MLPs (SwiGLU, GeGLU), y = down(act(up(x))) otherwise.

Two backends compute the same thing:
- "loop": split the sorted rows by expert once and run plain matmuls per expert, with the weights
  unbound once per call. This is the CPU path (fp32): indexing a 3-D parameter per expert inside the
  loop would make autograd build a full-size zero gradient per expert (research/performance.md §3.3).
- "grouped": one grouped matmul per projection (torch.nn.functional.grouped_mm) with int32 offsets;
  no host synchronisation, the GPU path (bf16). It also runs on CPU, which is how the tests check it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKENDS = ("auto", "loop", "grouped")
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 act_fn: Callable[[torch.Tensor], torch.Tensor], gated: bool = True, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        E, D, Fd = num_experts, hidden_size, intermediate_size
        self.num_experts, self.hidden_size, self.intermediate_size = E, D, Fd
        self.act_fn, self.gated = act_fn, gated
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
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, gated={self.gated}, "
                f"bias={self.up_bias is not None}, backend={self.backend}")

    def _use_grouped(self, x: torch.Tensor) -> bool:
        if self.backend != "auto":
            return self.backend == "grouped"
        return x.is_cuda and self.up_proj.dtype == torch.bfloat16 and _grouped_mm is not None

    def forward(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_AD: rows sorted by expert, counts_E rows per expert. Returns y_AD in the weights' dtype."""
        x_AD = x_AD.to(self.up_proj.dtype)
        if self._use_grouped(x_AD):
            return self._grouped(x_AD, counts_E)
        return self._loop(x_AD, counts_E)

    def _loop(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        E = self.num_experts
        none = [None] * E
        up = self.up_proj.unbind(0)
        down = self.down_proj.unbind(0)
        gate = self.gate_proj.unbind(0) if self.gated else none
        gb = self.gate_bias.unbind(0) if self.gate_bias is not None else none
        ub = self.up_bias.unbind(0) if self.up_bias is not None else none
        db = self.down_bias.unbind(0) if self.down_bias is not None else none
        outs = []
        for e, x in enumerate(x_AD.split(counts_E.tolist())):
            if x.shape[0] == 0:
                continue
            h = F.linear(x, up[e], ub[e])
            h = self.act_fn(F.linear(x, gate[e], gb[e])) * h if self.gated else self.act_fn(h)
            outs.append(F.linear(h, down[e], db[e]))
        if not outs:
            return x_AD.new_zeros(0, self.hidden_size)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _grouped(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
        bias_row = None
        if self.up_bias is not None:
            # Expert of each row, without a host sync (output_size is known).
            bias_row = torch.repeat_interleave(torch.arange(self.num_experts, device=x_AD.device), counts_E,
                                               output_size=x_AD.shape[0])

        def proj(x, w_EOI, b_EO):
            y = _grouped_mm(x, w_EOI.transpose(1, 2), offs=offs)
            return y if b_EO is None else y + b_EO[bias_row]

        h = proj(x_AD, self.up_proj, self.up_bias)
        h = self.act_fn(proj(x_AD, self.gate_proj, self.gate_bias)) * h if self.gated else self.act_fn(h)
        return proj(h, self.down_proj, self.down_bias)
