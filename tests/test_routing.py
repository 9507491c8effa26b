"""Routers against small cases computed by hand."""

import math

import pytest
import torch

from upcycle.moe import routing as R


def logits_of(probs):
    return torch.tensor(probs, dtype=torch.float32).log()


def assignments(r: R.Routing):
    """{(token, expert): weight} of a routing."""
    expert_A, token_A, _, weight_A = r.kept()
    return {(int(t), int(e)): round(float(w), 6) for t, e, w in zip(token_A, expert_A, weight_A)}


def test_topk_weights_with_and_without_renormalisation():
    z = logits_of([[0.1, 0.4, 0.2, 0.3]])
    r = R.topk_route(z, 2, normalize=False)
    assert assignments(r) == {(0, 1): 0.4, (0, 3): 0.3}
    r = R.topk_route(z, 2, normalize=True)
    assert assignments(r) == {(0, 1): round(4 / 7, 6), (0, 3): round(3 / 7, 6)}
    assert r.counts_E.tolist() == [0, 1, 0, 1]  # empty experts are fine


def test_topk_ties_go_to_the_lower_expert():
    r = R.topk_route(torch.zeros(1, 4), 2)
    assert sorted(e for _, e in assignments(r)) == [0, 1]
    r = R.topk_route(torch.tensor([[1.0, 2.0, 2.0, 2.0]]), 2)
    assert sorted(e for _, e in assignments(r)) == [1, 2]


def test_assignments_are_sorted_by_expert_with_slots():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 6, generator=g)
    r = R.topk_route(z, 2)
    assert torch.all(r.expert_A[1:] >= r.expert_A[:-1])
    assert r.counts_E.sum() == 100 and sorted(r.slot_A.tolist()) == list(range(100))
    # slot t*K + k belongs to token t
    assert torch.equal(r.slot_A // 2, r.token_A)


def test_capacity_overflow_drops_later_tokens():
    # 4 tokens all prefer expert 0; C=1, K=1, E=2: capacity = ceil(1 * 4 * 1 / 2) = 2.
    z = torch.tensor([[1.0, 0.0]] * 4)
    r = R.topk_route(z, 1, normalize=False, capacity_factor=1.0)
    assert sorted(assignments(r)) == [(0, 0), (1, 0)]
    assert r.counts_E.tolist() == [2, 0]
    assert int(r.dropped_assignments) == 2 and int(r.dropped_tokens) == 2


def test_capacity_serves_first_choices_before_second_choices():
    # token 0 prefers expert 1 then 0; token 1 prefers 0 then 1; capacity ceil(0.5*2*2/2) = 1.
    # K-major priority keeps both first choices; token-major would give token 0 both experts.
    z = logits_of([[0.3, 0.7], [0.6, 0.4]])
    r = R.topk_route(z, 2, normalize=True, capacity_factor=0.5)
    assert assignments(r) == {(0, 1): 0.7, (1, 0): 0.6}
    assert int(r.dropped_assignments) == 2 and int(r.dropped_tokens) == 0


def test_expert_choice_hand_case():
    # E=3, N=3, C=1: each expert takes ceil(1*3/3) = 1 token.
    # expert 0 -> t0 (0.5), expert 1 -> t1 (0.6), expert 2 -> t0 (0.4); t2 is left behind.
    probs = [[0.5, 0.1, 0.4], [0.1, 0.6, 0.3], [0.3, 0.35, 0.35]]
    z = logits_of([probs])
    r = R.expert_choice_route(z, capacity_factor=1.0, normalize=False)
    assert assignments(r) == {(0, 0): 0.5, (1, 1): 0.6, (0, 2): 0.4}
    assert int(r.dropped_tokens) == 1
    r = R.expert_choice_route(z, capacity_factor=1.0, normalize=True)
    assert assignments(r) == {(0, 0): round(0.5 / 0.9, 6), (1, 1): 1.0, (0, 2): round(0.4 / 0.9, 6)}
    # slots are token * E + expert
    assert sorted(r.slot_A.tolist()) == [0, 2, 4]


def test_expert_choice_never_picks_padding():
    probs = [[0.5, 0.1, 0.4], [0.1, 0.6, 0.3], [0.3, 0.35, 0.35]]
    mask = torch.tensor([[False, True, True]])
    r = R.expert_choice_route(logits_of([probs]), capacity_factor=1.0, normalize=False, mask_GN=mask)
    assert assignments(r) == {(2, 0): 0.3, (1, 1): 0.6, (2, 2): 0.35}
    assert int(r.dropped_tokens) == 0  # the padded token does not count as left behind


def test_topk_padding_takes_no_assignment_and_no_capacity():
    # 6 tokens, the first three padding, all preferring expert 0; E=3, k=1, C=1.
    probs = [[0.8, 0.1, 0.1]] * 3 + [[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]]
    mask = torch.tensor([False, False, False, True, True, True])
    r = R.topk_route(logits_of(probs), 1, normalize=False, capacity_factor=1.0, mask_T=mask)
    # capacity from the 3 real tokens: ceil(1 * 3 * 1 / 3) = 1 (6 tokens would give 2), and padding that sorts
    # first takes none of it: expert 0 keeps token 3, drops token 4
    assert assignments(r) == {(3, 0): 0.7, (5, 2): 0.7}
    assert int(r.dropped_assignments) == 1 and int(r.dropped_tokens) == 1 and int(r.real_tokens) == 3
    # without capacity: every real token keeps its k experts, padding has none
    r = R.topk_route(logits_of(probs), 2, mask_T=mask)
    assert sorted({t for t, _ in assignments(r)}) == [3, 4, 5] and r.counts_E.sum() == 6
    assert int(r.dropped_assignments) == 0 and int(r.dropped_tokens) == 0
    r = R.soft_route(logits_of(probs), mask_T=mask)
    assert sorted({t for t, _ in assignments(r)}) == [3, 4, 5] and r.counts_E.tolist() == [3, 3, 3]


def test_padding_stays_out_of_the_aux_losses_and_entropy():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(10, 4, generator=g)
    mask = torch.tensor([True] * 6 + [False] * 4)
    r = R.topk_route(z, 2, mask_T=mask)
    alone = R.topk_route(z[:6], 2)
    torch.testing.assert_close(
        R.load_balancing_loss(r.probs_TE, r.topk_idx_TK, r.mask_T),
        R.load_balancing_loss(alone.probs_TE, alone.topk_idx_TK),
    )
    torch.testing.assert_close(R.z_loss(r.logits_TE, r.mask_T), R.z_loss(alone.logits_TE))
    torch.testing.assert_close(r.entropy(), alone.entropy())
    # and the unmasked losses do differ: the test can fail
    assert (
        abs(
            float(R.load_balancing_loss(r.probs_TE, r.topk_idx_TK))
            - float(R.load_balancing_loss(alone.probs_TE, alone.topk_idx_TK))
        )
        > 1e-4
    )


def test_expert_choice_capacity_and_groups():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 10, 4, generator=g)  # 3 groups of 10 tokens
    r = R.expert_choice_route(z, capacity_factor=2.0)
    assert r.counts_E.tolist() == [3 * math.ceil(2 * 10 / 4)] * 4
    # every assignment stays inside its group: expert e of group g picks tokens g*10 .. g*10+9
    for e in range(4):
        toks = r.token_A[r.expert_A == e]
        assert sorted((toks // 10).tolist()) == [0] * 5 + [1] * 5 + [2] * 5
    # C >= E: every expert takes every token, and normalised weights sum to 1 per token
    r = R.expert_choice_route(z, capacity_factor=4.0, normalize=True)
    assert r.counts_E.tolist() == [30] * 4 and int(r.dropped_tokens) == 0
    total = torch.zeros(30).index_add(0, r.token_A, r.weight_A)
    torch.testing.assert_close(total, torch.ones(30))


def test_soft_routing_uses_every_expert_with_softmax_weights():
    z = torch.tensor([[0.0, 1.0, 2.0]])
    r = R.soft_route(z)
    p = torch.softmax(z, -1)[0]
    assert assignments(r) == {(0, e): round(float(p[e]), 6) for e in range(3)}


def test_load_balancing_loss_values():
    # all tokens on expert 0 with mean prob 0.75: L = E * f0 * P0 = 2 * 1 * 0.75
    probs = torch.tensor([[0.75, 0.25], [0.75, 0.25]])
    assert R.load_balancing_loss(probs, torch.tensor([[0], [0]])).item() == pytest.approx(1.5)
    # perfect balance gives K
    probs = torch.full((4, 4), 0.25)
    idx = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])
    assert R.load_balancing_loss(probs, idx).item() == pytest.approx(2.0)


def test_z_loss_value():
    assert R.z_loss(torch.zeros(3, 2)).item() == pytest.approx(math.log(2) ** 2)
    assert R.z_loss(torch.tensor([[1.0, 1.0]])).item() == pytest.approx((1 + math.log(2)) ** 2)


def test_router_math_is_fp32():
    z = torch.randn(5, 4, dtype=torch.bfloat16)
    r = R.topk_route(z, 2)
    assert r.weight_A.dtype == torch.float32 and r.probs_TE.dtype == torch.float32


def test_fixed_size_expert_counts_equal_bincount():
    from upcycle.moe.routing import _counts_sorted

    g = torch.Generator().manual_seed(0)
    for n, E in ((0, 4), (1, 4), (37, 8), (500, 64)):
        ids = torch.randint(0, max(1, E // 2), (n,), generator=g).sort().values  # the upper experts get none
        c = _counts_sorted(ids, E)
        assert c.shape == (E,) and torch.equal(c, torch.bincount(ids, minlength=E))


def test_capacity_is_the_exact_ceiling():
    """ceil(C * N / E) of the real numbers, not of their float product (1.1 * 100 / 2 = 55.000000000000007)."""
    from upcycle.moe.routing import ceil_capacity, ec_tokens_per_expert

    assert ceil_capacity(1.1, 100, 2) == 55 and ceil_capacity(1.1, 101, 2) == 56
    assert ceil_capacity(2.0, 17, 8) == 5 and ec_tokens_per_expert(2.0, 17, 8) == 5
    assert ec_tokens_per_expert(8.0, 6, 2) == 6  # never more than the group
    logits = torch.randn(1, 100, 2)
    r = R.expert_choice_route(logits, 1.1, mask_GN=None)
    assert r.counts_E.tolist() == [55, 55]
    r = R.expert_choice_route(logits, 1.1, mask_GN=torch.ones(1, 100, dtype=torch.bool))
    assert r.counts_E.tolist() == [55, 55]
