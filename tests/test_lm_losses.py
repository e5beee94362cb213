"""Forward / reverse / JSD divergences for full, top-k and sampled targets against a full-vocabulary reference.

Reference: torch.distributions.kl_divergence on Categorical distributions built from the full logits.
Sampled targets (RS-KD) are drawn with kdcli.cache.reduce (the cache's own sampler). Unbiasedness tolerance: the
mean over R independent draw sets must be within 5 standard errors (of that mean) of the full value.
"""

import math

import pytest
import torch

from kdcli.cache.modes import targets_from_arrays
from kdcli.cache.modes.full import FullTargets
from kdcli.cache.reduce import reduce_logits
from kdcli.losses import kd_loss, soft_kl
from tests.conftest import divergence_reference as reference

DIVS = ("forward", "reverse", "jsd")


def logits(rows=6, C=40, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, C, generator=g, dtype=torch.float64).float() * scale


def targets(mode, t_logits, temperatures=None, **kw):
    red = reduce_logits(t_logits, mode, temperatures=temperatures, **kw)
    arrays = {k: v.numpy() for k, v in red.items()}
    return targets_from_arrays(arrays, mode, t_logits.shape[1], temperatures=temperatures or (1.0,))


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_full_mode_matches_reference(divergence, T):
    t, s = logits(seed=1), logits(seed=2)
    got = soft_kl(s, targets("full", t), T, divergence, beta=0.3 if divergence == "jsd" else 0.5)
    ref = reference(t, s, T, divergence, beta=0.3 if divergence == "jsd" else 0.5)
    # the cache stores fp16 log-probs: allow that rounding
    assert torch.allclose(got, ref.float(), atol=3e-3, rtol=3e-3)


def test_jsd_hand_value():
    # p = (0.5, 0.5), q = (0.9, 0.1), beta = 0.5: m = (0.7, 0.3)
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    expect = 0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)) + 0.5 * (
        0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3)
    )
    tg = FullTargets(2, logprobs=p.log())
    assert soft_kl(q.log(), tg, 1.0, "jsd", 0.5).item() == pytest.approx(expect, rel=1e-5)


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("T", [1.0, 3.0])
@pytest.mark.parametrize("stored", [True, False])
def test_topk_with_one_class_outside_is_exact(divergence, T, stored):
    # k = C - 1: the tail bucket is a single class, so the bucketed divergence is the full one at every T, from the
    # stored tempered tail mass and (a uniform spread over one class being exact) from the approximation alike
    t, s = logits(C=12, seed=3), logits(C=12, seed=4)
    tg = targets("topk", t, top_k=11, temperatures=(T,) if stored else None)
    got = soft_kl(s, tg, T, divergence, approximate=not stored)
    assert torch.allclose(got, reference(t, s, T, divergence).float(), atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize("divergence", DIVS)
def test_topk_is_a_lower_bound_that_tightens_with_k(divergence):
    t, s = logits(C=50, seed=5), logits(C=50, seed=6)
    full = reference(t, s, 1.0, divergence).float()
    prev = torch.zeros_like(full)
    for k in (2, 8, 32, 49):
        got = soft_kl(s, targets("topk", t, top_k=k), 1.0, divergence)
        assert (got <= full + 2e-3).all()  # data-processing inequality
        assert (got >= prev - 2e-3).all()  # a finer bucketing never loses divergence
        prev = got
    assert torch.allclose(prev, full, atol=3e-3)


@pytest.mark.parametrize("divergence", DIVS)
def test_sample_mode_is_unbiased_at_T1(divergence):
    # one teacher/student pair, R independent draw sets of S = 8 draws each
    R, S, C = 4000, 8, 30
    t = logits(rows=1, C=C, seed=7, scale=2.0)
    s = logits(rows=1, C=C, seed=8, scale=2.0)
    g = torch.Generator().manual_seed(0)
    tg = targets("sample", t.expand(R, C), samples=S, generator=g)
    est = soft_kl(s.expand(R, C), tg, 1.0, divergence).double()
    full = reference(t, s, 1.0, divergence).item()
    se = est.std().item() / math.sqrt(R)
    assert abs(est.mean().item() - full) < 5 * se + 2e-3, (est.mean().item(), full, se)


@pytest.mark.parametrize("divergence", DIVS)
def test_sample_mode_gradient_is_unbiased_at_T1(divergence):
    R, S, C = 4000, 8, 20
    t = logits(rows=1, C=C, seed=9, scale=2.0)
    s0 = logits(rows=1, C=C, seed=10, scale=2.0)
    g = torch.Generator().manual_seed(1)
    tg = targets("sample", t.expand(R, C), samples=S, generator=g)
    s = s0.repeat(R, 1).requires_grad_(True)  # one copy per draw set: per-set gradients
    soft_kl(s, tg, 1.0, divergence).sum().backward()
    grads = s.grad.double()  # (R, C): R independent gradient estimates
    s_ref = s0.double().clone().requires_grad_(True)
    reference(t.double(), s_ref, 1.0, divergence).sum().backward()
    se = grads.std(dim=0) / math.sqrt(R)
    assert ((grads.mean(dim=0) - s_ref.grad[0]).abs() <= 5 * se + 1e-3).all(), (grads.mean(0), s_ref.grad, se)


@pytest.mark.parametrize("divergence", DIVS)
def test_sample_mode_is_consistent_at_T_not_1(divergence):
    # The approximation at a T the cache does not store (approximate=True) reweights the draws by p^(1/T - 1),
    # self-normalised: biased by O(1/S), consistent. R sets of S = 2000 draws: the mean must be within 5 standard
    # errors (+ 0.01 for the O(1/S) bias) of the full value. (Stored T: tests/test_sparse_temperatures.py.)
    R, S, C = 200, 2000, 25
    t = logits(rows=1, C=C, seed=11, scale=1.5)
    s = logits(rows=1, C=C, seed=12, scale=1.5)
    g = torch.Generator().manual_seed(2)
    est = soft_kl(
        s.expand(R, C), targets("sample", t.expand(R, C), samples=S, generator=g), 2.0, divergence, approximate=True
    ).double()
    full = reference(t, s, 2.0, divergence).item()
    se = est.std().item() / math.sqrt(R)
    assert abs(est.mean().item() - full) < 5 * se + 0.01, (est.mean().item(), full, se)


def test_kd_loss_divergence_scaling_and_masking():
    t, s = logits(rows=5, seed=13), logits(rows=5, seed=14)
    tg = targets("full", t)
    labels = torch.zeros(5, dtype=torch.long)
    for div in DIVS:
        parts = kd_loss(s, tg, labels, temperature=2.0, alpha=1.0, divergence=div)
        assert parts.soft.item() == pytest.approx(4.0 * soft_kl(s, tg, 2.0, div).mean().item(), rel=1e-5)
        none = kd_loss(s, tg, labels, temperature=2.0, alpha=0.5, divergence=div, weight=torch.zeros(5))
        assert none.total.item() == 0.0
    # the default is forward KL: classification behaviour unchanged
    assert kd_loss(s, tg, labels, temperature=2.0, alpha=0.7).total.item() == pytest.approx(
        kd_loss(s, tg, labels, temperature=2.0, alpha=0.7, divergence="forward").total.item()
    )


def test_unknown_divergence_and_bad_beta():
    t, s = logits(), logits(seed=1)
    with pytest.raises(ValueError, match="divergence"):
        soft_kl(s, targets("full", t), 1.0, "hellinger")
    with pytest.raises(ValueError, match="beta"):
        soft_kl(s, targets("full", t), 1.0, "jsd", beta=1.0)
