"""Experts and the MoE block against a naive per-token reference, on every backend."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from upcycle.moe.block import MoEBlock, RouterConfig, aux_losses
from upcycle.moe.experts import Experts

E, D, FF = 4, 16, 24


def make_block(router=RouterConfig(), gated=True, bias=False, seed=0, shared=None, backend="loop"):
    torch.manual_seed(seed)
    ex = Experts(E, D, FF, F.silu if gated else F.gelu, gated=gated, bias=bias)
    for p in ex.parameters():
        nn.init.normal_(p, std=0.3)
    block = MoEBlock(ex, router, shared_expert=shared)
    nn.init.normal_(block.router.weight, std=0.5)
    ex.backend = backend
    return block


def reference(block: MoEBlock, x: torch.Tensor, mask_AF: torch.Tensor | None = None) -> torch.Tensor:
    """Token by token: y_t = sum over t's assignments of w * expert_e(x_t), straight from the routing.
    mask_AF: a dropout mask on the hidden units, one row per assignment in the routing's order."""
    ex = block.experts
    x_TD = x.reshape(-1, D)
    block(x)  # routing of this input
    r = block.last_routing
    out = torch.zeros_like(x_TD)
    expert_A, token_A, _, weight_A = r.kept()
    rows = torch.arange(r.token_A.numel()) if r.keep_A is None else torch.arange(r.token_A.numel())[r.keep_A]
    for a, t, e, w in zip(rows.tolist(), token_A.tolist(), expert_A.tolist(), weight_A):
        xt = x_TD[t]
        up = ex.up_proj[e] @ xt + (ex.up_bias[e] if ex.up_bias is not None else 0)
        if ex.gated:
            g = ex.gate_proj[e] @ xt + (ex.gate_bias[e] if ex.gate_bias is not None else 0)
            h = ex.act_fn(g) * up
        else:
            h = ex.act_fn(up)
        if mask_AF is not None:
            h = h * mask_AF[a]
        out[t] += w * (ex.down_proj[e] @ h + (ex.down_bias[e] if ex.down_bias is not None else 0))
    return out.view_as(x)


ROUTERS = [
    RouterConfig("topk", 2, True),
    RouterConfig("topk", 1, False),
    RouterConfig("topk", 2, False, 0.5),
    RouterConfig("expert_choice", 2, True, 1.0),
    RouterConfig("expert_choice", 2, False, 2.0, "batch"),
    RouterConfig("soft"),
]


@pytest.mark.parametrize("router", ROUTERS, ids=lambda r: f"{r.kind}-k{r.top_k}-n{r.normalize}-c{r.capacity_factor}")
@pytest.mark.parametrize("gated,bias", [(True, False), (False, True), (True, True)])
def test_block_matches_reference(router, gated, bias):
    block = make_block(router, gated, bias)
    x = torch.randn(3, 10, D)
    torch.testing.assert_close(block(x), reference(block, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router", ROUTERS[:4], ids=lambda r: r.kind)
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_backend_equals_loop_with_gradients(router, bias):
    x = torch.randn(2, 12, D)
    outs, grads = [], []
    for backend in ("loop", "grouped"):
        block = make_block(router, bias=bias, backend=backend)
        xi = x.clone().requires_grad_(True)
        y = block(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in block.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_empty_experts_and_zero_tokens():
    block = make_block(RouterConfig("topk", 1, True))
    with torch.no_grad():
        block.router.weight.zero_()
        block.router.weight[2, 0] = 100.0  # every token with x[0] > 0 goes to expert 2
    x = torch.randn(20, D).abs()
    y = block(x)
    assert block.last_routing.counts_E.tolist() == [0, 0, 20, 0]
    torch.testing.assert_close(y, reference(block, x))
    assert block(torch.zeros(0, D)).shape == (0, D)


def test_router_gets_gradients_without_renormalisation():
    x = torch.randn(16, D)
    block = make_block(RouterConfig("topk", 2, False))
    block(x).pow(2).sum().backward()
    g = block.router.weight.grad.abs().max().item()
    assert g > 1e-3
    # top-1 renormalised gives every token weight p/p = 1: the router's gradient vanishes up to rounding
    # (why K=1 must not renormalise)
    block = make_block(RouterConfig("topk", 1, True))
    block(x).pow(2).sum().backward()
    assert block.router.weight.grad.abs().max().item() < 1e-3 * g


def test_aux_losses_reach_the_router():
    model = nn.Sequential(make_block(RouterConfig("topk", 2, True)), make_block(seed=1))
    model(torch.randn(32, D))
    losses = aux_losses(model, aux_loss_coef=0.01, z_loss_coef=0.001)
    assert set(losses) == {"load_balancing", "z_loss"}
    assert 0.01 * 2 * 0.5 < losses["load_balancing"].item() < 0.01 * 2 * 4  # two layers, each ~K
    (losses["load_balancing"] + losses["z_loss"]).backward()
    assert model[0].router.weight.grad.abs().max() > 0


def test_shared_expert_is_added():
    shared = nn.Linear(D, D, bias=False)
    block = make_block(RouterConfig("topk", 2, True), shared=shared)
    x = torch.randn(5, D)
    torch.testing.assert_close(block(x), reference(block, x) + shared(x))


def test_router_stats():
    block = make_block(RouterConfig("topk", 2, True, 0.5))
    block(torch.randn(2, 20, D))
    s = block.router_stats()
    assert s["tokens"] == 40 and sum(s["tokens_per_expert"]) + s["dropped_assignments"] == 80
    assert max(s["tokens_per_expert"]) <= 10  # capacity ceil(0.5 * 40 * 2 / 4)
    assert 0 < s["entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6


def test_combine_is_deterministic():
    block = make_block(RouterConfig("expert_choice", 2, True, 2.0))
    x = torch.randn(4, 32, D)
    assert torch.equal(block(x), block(x))


def test_experts_per_token_for_active_parameter_counts():
    assert RouterConfig("topk", top_k=2).experts_per_token(8) == 2
    assert RouterConfig("soft").experts_per_token(8) == 8
    assert RouterConfig("expert_choice").experts_per_token(8) == 2.0  # the paper's C = 2 by default
    assert RouterConfig("expert_choice", capacity_factor=16.0).experts_per_token(8) == 8  # at most every expert


def test_auto_backend_on_cpu_takes_grouped_for_small_batches_and_loop_for_large():
    from upcycle.moe import experts as X

    ex = make_block(backend="auto").experts
    small = torch.empty(X.GROUPED_CPU_MAX_ROWS, D)
    large = torch.empty(X.GROUPED_CPU_MAX_ROWS + 1, D)
    assert ex._use_grouped(small) and not ex._use_grouped(large)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ex._use_grouped(small)  # autocast keeps the loop, whose linears it casts
    # the same numbers either way, gradients included
    x = torch.randn(2, 8, D)
    outs = []
    for backend in ("auto", "loop"):
        block = make_block(backend=backend)
        xi = x.clone().requires_grad_(True)
        y = block(xi)
        y.square().sum().backward()
        outs.append((y.detach(), xi.grad, block.experts.down_proj.grad))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gated", [True, False])
def test_dropout_inside_the_experts(gated):
    """T5 keeps a dropout between the activation and the down projection: in training each backend drops the
    hidden units with the same (rows, d_ff) mask (one draw per call), gradients included; in eval mode, or
    with p = 0, nothing changes."""
    x = torch.randn(2, 12, D)
    runs = {}
    for backend in ("loop", "grouped"):
        block = make_block(RouterConfig("topk", 2, True), gated=gated, backend=backend)
        block.experts.dropout = 0.5
        y_eval = block.eval()(x)
        block.train()
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        y = block(xi)
        y.sum().backward()
        runs[backend] = (y.detach(), [xi.grad] + [p.grad for p in block.parameters()])
        # the reference: the dropout-free experts with that mask applied to their hidden units by hand
        torch.manual_seed(7)
        mask = F.dropout(torch.ones(block.last_routing.token_A.numel(), FF), 0.5, True)
        torch.testing.assert_close(y.detach(), reference(block, x, mask), rtol=1e-5, atol=1e-6)
        assert (y.detach() - y_eval.detach()).abs().max() > 1e-3  # the mask did something
        block.experts.dropout = 0.0
        torch.testing.assert_close(block(x), y_eval)  # p = 0 in training = eval
    torch.testing.assert_close(runs["loop"][0], runs["grouped"][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(runs["loop"][1], runs["grouped"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_router_stays_fp32_under_autocast():
    """autocast would run the router's matmul in bf16 and round the logits; the block computes them in fp32."""
    block = make_block(RouterConfig("topk", 2, True))
    x = torch.randn(3, 10, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        block(x)
    logits = block.last_routing.logits_TE
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, F.linear(x.reshape(-1, D), block.router.weight), rtol=0, atol=0)


def test_grouped_path_under_bf16_autocast_trains_fp32_weights():
    """`upcycle train` on a GPU keeps fp32 weights under bf16 autocast: the grouped path casts them for its
    matmuls (as autocast casts a linear), matches the fp32 block to bf16 rounding, and the fp32 weights get
    their gradients."""
    x = torch.randn(2, 12, D)
    ref_block = make_block(RouterConfig("topk", 2, True), backend="grouped")
    block = make_block(RouterConfig("topk", 2, True), backend="grouped")
    y_ref = ref_block(x)
    y_ref.sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    assert block.experts._compute_dtype(x) == torch.float32  # outside autocast: the weights' dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):  # inside: the matmuls run in bf16
        assert block.experts(x.reshape(-1, D)[:8], torch.tensor([2, 2, 2, 2])).dtype == torch.bfloat16
    y.float().sum().backward()
    torch.testing.assert_close(y.float(), y_ref, rtol=3e-2, atol=3e-2)
    for p, q in zip(block.experts.parameters(), ref_block.experts.parameters()):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, rtol=5e-2, atol=5e-2)
