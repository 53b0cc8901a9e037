"""The three objectives and the momentum machinery against direct float64 evaluations of their
formulas (REFERENCE §2), plus gradient checks and the degenerate cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from albef_fast.models.queue import FeatureQueues, check_queue_size
from albef_kernels import ema_update_, itc_loss, mlm_loss, sample_hard_negatives


def unit(*shape, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


def itc_direct(q, q_m, k_m, queue, temp, alpha):
    """Row by row, element by element: -sum_j t_ij log p_ij with t = alpha softmax(s_m) + (1-alpha) 1[j=i]."""
    keys = torch.cat([k_m, queue])
    B, N = q.shape[0], keys.shape[0]
    total = 0.0
    for i in range(B):
        s = [float(q[i] @ keys[j]) / temp for j in range(N)]
        sm = [float(q_m[i] @ keys[j]) / temp for j in range(N)]
        lse, lse_m = math.log(sum(math.exp(x) for x in s)), math.log(sum(math.exp(x) for x in sm))
        for j in range(N):
            t = alpha * math.exp(sm[j] - lse_m) + (1 - alpha) * (j == i)
            total -= t * (s[j] - lse)
    return total / B


@pytest.mark.parametrize("B, Q, D, alpha", [(4, 8, 16, 0.4), (3, 6, 5, 0.0), (1, 5, 7, 1.0), (5, 0, 8, 0.3)])
def test_itc_loss_matches_direct_formula(B, Q, D, alpha):
    q, q_m, k_m, queue = unit(B, D), unit(B, D), unit(B, D), unit(Q, D)
    temp = torch.tensor(0.07, dtype=torch.float64)
    loss, sim = itc_loss(q, q_m, k_m, queue, temp, alpha)
    assert loss.item() == pytest.approx(itc_direct(q, q_m, k_m, queue, 0.07, alpha), rel=1e-10)
    torch.testing.assert_close(sim, q @ k_m.t() / 0.07)


def test_itc_alpha_zero_is_cross_entropy_on_the_positive():
    q, q_m, k_m, queue = unit(6, 16), unit(6, 16), unit(6, 16), unit(12, 16)
    temp = torch.tensor(0.1, dtype=torch.float64)
    loss, _ = itc_loss(q, q_m, k_m, queue, temp, 0.0)
    logits = q @ torch.cat([k_m, queue]).t() / temp
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.arange(6)))


def test_itc_loss_gradcheck():
    """Gradient to the online features (the targets do not depend on them)."""
    q = unit(3, 6).requires_grad_()
    q_m, k_m, queue = unit(3, 6), unit(3, 6), unit(9, 6)
    temp = torch.tensor(0.2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q: itc_loss(q, q_m, k_m, queue, temp, 0.4)[0], (q,))


def test_itc_temperature_gradient_treats_targets_as_constants():
    """ALBEF builds the soft targets under no_grad, so d loss / d temp flows through the online
    logits only: compare with a central difference of the formula with the targets frozen at temp."""
    q, q_m, k_m, queue = unit(4, 8), unit(4, 8), unit(4, 8), unit(8, 8)
    t0 = 0.15
    temp = torch.tensor(t0, dtype=torch.float64, requires_grad=True)
    itc_loss(q, q_m, k_m, queue, temp, 0.4)[0].backward()
    keys = torch.cat([k_m, queue])
    targets = 0.4 * F.softmax(q_m @ keys.t() / t0, 1) + 0.6 * F.pad(torch.eye(4, dtype=torch.float64), (0, 8))
    frozen = lambda t: -(F.log_softmax(q @ keys.t() / t, 1) * targets).sum(1).mean().item()  # noqa: E731
    h = 1e-6
    numeric = (frozen(t0 + h) - frozen(t0 - h)) / (2 * h)
    assert temp.grad.item() == pytest.approx(numeric, rel=1e-7)


def test_itc_validates_shapes():
    with pytest.raises(ValueError, match="queue"):
        itc_loss(unit(2, 4), unit(2, 4), unit(2, 4), unit(3, 5), torch.tensor(0.1), 0.4)


# --- hard negatives ------------------------------------------------------------------------------


def test_hard_negatives_never_pick_the_positive():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        B = int(torch.randint(2, 9, (1,), generator=g))
        sim = torch.randn(B, B, generator=g) * 5
        sim.diagonal().add_(20)  # a dominant positive, the case that crashes the reference
        idx, valid = sample_hard_negatives(sim, generator=g)
        assert valid.all()
        assert (idx != torch.arange(B)).all()


def test_hard_negatives_follow_the_softmax_distribution():
    """Chi-square goodness of fit of 20,000 draws per row against softmax over j != b (fixed seed)."""
    g = torch.Generator().manual_seed(1234)
    sim = torch.tensor([[3.0, 1.0, 0.0, -1.0, 2.0], [0.5, 9.0, 0.5, 1.5, -2.0], [0.0, 0.0, 0.0, 0.0, 0.0],
                        [1.0, -3.0, 2.0, 7.0, 0.2], [-1.0, 0.0, 1.0, 2.0, 4.0]])
    n, B = 20_000, 5
    counts = torch.zeros(B, B)
    for _ in range(n):
        idx, valid = sample_hard_negatives(sim, generator=g)
        counts[torch.arange(B), idx] += 1
    expected = F.softmax(sim.masked_fill(torch.eye(B, dtype=torch.bool), float("-inf")), dim=1) * n
    assert (counts.diagonal() == 0).all()
    for b in range(B):
        off = torch.arange(B) != b
        chi2 = ((counts[b, off] - expected[b, off]) ** 2 / expected[b, off]).sum().item()
        assert chi2 < 18.47, f"row {b}: chi2={chi2:.2f} over 3 degrees of freedom (p=0.0004 threshold)"
    # and the test can fail: the unrenormalised softmax (diagonal mass left in) is rejected
    wrong = F.softmax(sim, dim=1) * n
    assert any(((counts[b] - wrong[b]) ** 2 / wrong[b]).sum() > 18.47 for b in range(B))


def test_hard_negatives_degenerate_rows():
    idx, valid = sample_hard_negatives(torch.randn(1, 1))  # B = 1: no negative exists
    assert idx.tolist() == [0] and valid.tolist() == [False]
    idx, valid = sample_hard_negatives(torch.zeros(4, 4) + 3.0)  # identical rows
    assert valid.all() and (idx != torch.arange(4)).all()
    sim = torch.full((3, 3), -1e4)
    sim.diagonal().fill_(1e4)  # every off-diagonal softmax weight underflows to exactly 0 in fp32
    assert (F.softmax(sim, 1) * (1 - torch.eye(3))).sum() == 0
    idx, valid = sample_hard_negatives(sim)
    assert valid.all() and (idx != torch.arange(3)).all()


# --- queues and EMA -------------------------------------------------------------------------------


def test_queue_wraps_at_capacity():
    q = FeatureQueues(size=8, dim=3)
    batches = [torch.randn(4, 3) for _ in range(3)]
    for b in batches:
        q.enqueue(b, -b)
    assert q.ptr.item() == 4  # 3 x 4 = 12 = 8 + 4
    torch.testing.assert_close(q.image[:4], batches[2])
    torch.testing.assert_close(q.image[4:], batches[1][:4])
    torch.testing.assert_close(q.text[:4], -batches[2])


def test_queue_size_must_divide_by_global_batch():
    check_queue_size(65536, 512)
    with pytest.raises(ValueError, match=r"queue_size=65376 or 65664.*\(256 or 512\)"):
        check_queue_size(65536, 288)


def test_ema_update_matches_formula():
    m = [torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    p = [torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    expected = [mi * 0.995 + pi * 0.005 for mi, pi in zip(m, p)]
    ema_update_(m, p, 0.995)
    for a, b in zip(m, expected):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)
    with pytest.raises(ValueError, match="shape"):
        ema_update_([torch.zeros(2)], [torch.zeros(3)], 0.9)


# --- MLM ------------------------------------------------------------------------------------------


def mlm_direct(h, W, b, labels, h_m, W_m, b_m, alpha):
    total_ce = total_kd = 0.0
    M, V = h.shape[0], W.shape[0]
    for i in range(M):
        z = [float(h[i] @ W[v] + b[v]) for v in range(V)]
        zm = [float(h_m[i] @ W_m[v] + b_m[v]) for v in range(V)]
        lse, lse_m = math.log(sum(math.exp(x) for x in z)), math.log(sum(math.exp(x) for x in zm))
        total_ce -= z[labels[i]] - lse
        total_kd -= sum(math.exp(zm[v] - lse_m) * (z[v] - lse) for v in range(V))
    return (1 - alpha) * total_ce / M + alpha * total_kd / M


def _mlm_inputs(M=5, D=6, V=11):
    t = lambda *s: torch.randn(*s, dtype=torch.float64)  # noqa: E731
    return t(M, D), t(V, D), t(V), torch.randint(V, (M,)), t(M, D), t(V, D), t(V)


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_mlm_loss_matches_direct_formula(alpha):
    args = _mlm_inputs()
    assert mlm_loss(*args, alpha).item() == pytest.approx(mlm_direct(*args, alpha), rel=1e-10)


def test_mlm_on_masked_positions_equals_full_sequence_loss():
    """ALBEF projects every position and ignores unmasked ones (-100); we project masked rows only."""
    B, L, D, V = 3, 7, 6, 13
    hidden, hidden_m = torch.randn(B, L, D, dtype=torch.float64), torch.randn(B, L, D, dtype=torch.float64)
    W, b, W_m, b_m = (torch.randn(V, D, dtype=torch.float64), torch.randn(V, dtype=torch.float64),
                      torch.randn(V, D, dtype=torch.float64), torch.randn(V, dtype=torch.float64))
    ids = torch.randint(V, (B, L))
    selected = torch.rand(B, L) < 0.3
    selected[0, 1] = True
    labels_full = ids.masked_fill(~selected, -100)
    logits, logits_m = hidden @ W.t() + b, hidden_m @ W_m.t() + b_m
    ce = F.cross_entropy(logits.view(-1, V), labels_full.view(-1))
    kd = -(F.softmax(logits_m, -1) * F.log_softmax(logits, -1)).sum(-1)
    kd = kd[labels_full != -100].mean()
    reference = 0.6 * ce + 0.4 * kd
    pos = selected.flatten().nonzero().squeeze(1)
    ours = mlm_loss(hidden.flatten(0, 1)[pos], W, b, ids.flatten()[pos], hidden_m.flatten(0, 1)[pos], W_m, b_m, 0.4)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


def test_mlm_loss_gradcheck():
    h, W, b, labels, h_m, W_m, b_m = _mlm_inputs(M=3, D=4, V=7)
    for x in (h, W, b):
        x.requires_grad_()
    assert torch.autograd.gradcheck(lambda h, W, b: mlm_loss(h, W, b, labels, h_m, W_m, b_m, 0.4), (h, W, b))


def test_mlm_loss_with_no_masked_token_is_zero():
    h, W, b, labels, h_m, W_m, b_m = _mlm_inputs(M=0)
    h.requires_grad_()
    loss = mlm_loss(h, W, b, labels, h_m, W_m, b_m, 0.4)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.shape == (0, 6)
