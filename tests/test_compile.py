"""The MoE block under torch.compile(fullgraph=True), and the GPU path at bf16 tolerance.

fullgraph=True fails on any graph break, so these tests prove the grouped path has no `.item()` / `.tolist()` /
Python branch on tensor values inside the layer. They use the "aot_eager" backend: it traces forward and backward
through AOTAutograd like inductor does but runs the ops eagerly, so it needs no C++ compiler and stays fast.
torch's fake-tensor rule for grouped_mm accepts bf16 only, so the compiled CPU checks run the grouped path in bf16
(tiny shapes, so CPU bf16 speed does not matter) and compare with the same path uncompiled.

Not proven here (needs a GPU): that no host synchronisation happens on CUDA. `routing._sorted_by_expert` counts
with `torch.bincount`, whose output size depends on the data (dynamo traces it as an unbacked size), and CUDA's
bincount reads max(input) on the host. The GPU test below checks the experts alone under
torch.cuda.set_sync_debug_mode("error").
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from upcycle.moe.block import MoEBlock, RouterConfig
from upcycle.moe.experts import Experts

E, D, FF = 4, 16, 24
ROUTERS = [
    RouterConfig("topk", 2, True),
    RouterConfig("topk", 2, False),
    RouterConfig("expert_choice", 2, True, 2.0),
    RouterConfig("soft"),
    RouterConfig("topk", 2, True, 0.5),
]  # the last drops assignments: fixed shapes
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_block(router, backend, dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    ex = Experts(E, D, FF, F.silu)
    for p in ex.parameters():
        nn.init.normal_(p, std=0.3)
    block = MoEBlock(ex, router)
    nn.init.normal_(block.router.weight, std=0.5)
    ex.backend = backend
    return block.to(dtype=dtype, device=device)


def run(block, x, gy):
    xi = x.clone().requires_grad_(True)
    y = block(xi)
    y.backward(gy)
    return y.detach(), [xi.grad] + [p.grad for p in block.parameters()]


@pytest.mark.parametrize("router", ROUTERS, ids=lambda r: f"{r.kind}-n{r.normalize}-c{r.capacity_factor}")
def test_grouped_compiles_fullgraph_and_equals_eager(router):
    torch._dynamo.reset()
    block = make_block(router, "grouped", torch.bfloat16)
    x = torch.randn(2, 8, D, dtype=torch.bfloat16)
    gy = torch.randn(2, 8, D, dtype=torch.bfloat16)
    y_ref, g_ref = run(block, x, gy)
    block.zero_grad(set_to_none=True)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    y, g = run(compiled, x, gy)
    torch.testing.assert_close(y, y_ref)  # bf16 defaults; same ops, so equal in practice
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_loop_backend_breaks_the_graph():
    """The CPU loop splits rows by expert on the host (counts_E.tolist()): not fullgraph-compilable, by design."""
    torch._dynamo.reset()
    block = make_block(RouterConfig("topk", 2, True), "loop")
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="data-dependent"):
        compiled(torch.randn(8, D))


@cuda
@pytest.mark.parametrize("router", ROUTERS, ids=lambda r: f"{r.kind}-n{r.normalize}-c{r.capacity_factor}")
def test_cuda_bf16_grouped_matches_fp32_reference(router):
    gpu = make_block(router, "auto", torch.bfloat16, "cuda")
    assert gpu.experts._use_grouped(torch.empty(0, device="cuda"))
    # The fp32 CPU reference holds the same (bf16-representable) weights and input, so both routers, which
    # compute in fp32, pick the same experts; only the experts' bf16 arithmetic differs.
    ref = make_block(router, "loop")
    ref.load_state_dict({k: v.float().cpu() for k, v in gpu.state_dict().items()})
    x = torch.randn(2, 32, D).to(torch.bfloat16)
    gy = torch.randn(2, 32, D).to(torch.bfloat16)
    y, g = run(gpu, x.cuda(), gy.cuda())
    y_ref, g_ref = run(ref, x.float(), gy.float())
    torch.testing.assert_close(y.float().cpu(), y_ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.float().cpu(), b, rtol=5e-2, atol=5e-2)


@cuda
def test_cuda_compiled_grouped_matches_eager():
    torch._dynamo.reset()
    block = make_block(RouterConfig("topk", 2, True), "auto", torch.bfloat16, "cuda")
    x = torch.randn(4, 64, D, dtype=torch.bfloat16, device="cuda")
    gy = torch.randn_like(x)
    y_ref, g_ref = run(block, x, gy)
    block.zero_grad(set_to_none=True)
    y, g = run(torch.compile(block, fullgraph=True), x, gy)
    # inductor may fuse act(gate) * up in fp32 and reorder sums, where eager rounds each op to bf16
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@cuda
def test_cuda_grouped_experts_do_not_synchronise():
    ex = make_block(RouterConfig(), "grouped", torch.bfloat16, "cuda").experts
    counts = torch.tensor([5, 0, 7, 4], device="cuda")
    x = torch.randn(16, D, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    # a real output gradient: grouped_mm's backward refuses the stride-0 one that .sum() would hand it
    gy = torch.randn(16, D, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ex(x, counts).backward(gy)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
@pytest.mark.parametrize("capacity", [None, 0.5], ids=["dropless", "capacity"])
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-weights", "fp32-weights-bf16-autocast"])
def test_cuda_moe_block_does_not_synchronise(autocast, capacity):
    """Router, sort, grouped experts and combine, forward and backward, with no device-to-host read: in bf16,
    and with fp32 master weights under bf16 autocast (how `upcycle train` runs on a GPU), with and without
    token dropping."""
    block = make_block(
        RouterConfig("topk", 2, True, capacity), "auto", torch.float32 if autocast else torch.bfloat16, "cuda"
    )
    x = torch.randn(2, 32, D, device="cuda", dtype=torch.float32 if autocast else torch.bfloat16, requires_grad=True)
    gy = torch.randn(2, 32, D, device="cuda", dtype=x.dtype)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = block(x)
        y.backward(gy.to(y.dtype))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(p.grad is not None for p in block.parameters())
