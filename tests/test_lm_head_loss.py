"""The fused output layer + KD loss (kdcli.lm.head_loss) against the autograd path it replaces.

The reference is ``kd_loss(hidden @ W.T, ...)`` differentiated by autograd (itself pinned to
torch.distributions.kl_divergence in test_losses.py): same value, same soft/hard parts, same gradients for the hidden
states and the output weight, for every cache mode, temperature and alpha.
"""

from __future__ import annotations

import pytest
import torch

from kdcli.cache.fused import mixture_targets
from kdcli.cache.modes import targets_from_arrays
from kdcli.cache.modes.topk import fuse_topk
from kdcli.cache.reduce import reduce_logits
from kdcli.lm.head_loss import head_kd_loss
from kdcli.losses import kd_loss

N, D, V = 37, 16, 300  # 37 tokens: chunks of 8 leave a ragged last chunk


TEMPS = (1.0, 2.0, 2.5, 3.0)  # the temperatures the test caches store


def _targets(mode: str, teacher_logits: torch.Tensor, seed: int = 0, temperatures=TEMPS, **extra):
    if mode == "fused-topk":  # two fused topk teachers: the union of their ids, the shared ones used
        other = teacher_logits.roll(1, dims=1) * 0.7 + teacher_logits * 0.5
        a, b = (_targets("topk", t, seed, temperatures) for t in (teacher_logits, other))
        ids, lps, tail = fuse_topk(
            [a.ids.numpy(), b.ids.numpy()],
            [a.id_logprobs.numpy(), b.id_logprobs.numpy()],
            [a.tail_logmass.numpy(), b.tail_logmass.numpy()],
            [0.6, 0.4],
        )
        t = targets_from_arrays(
            {"topk_ids": ids, "topk_logprobs": lps, "tail_logmass": tail}, "topk", teacher_logits.shape[1]
        )
        t.padded = True
        return t
    if mode == "mixture":  # two fused teachers: a sampled one and a priority-sampled other (test_fusion_sparse.py)
        other = teacher_logits.roll(1, dims=1) * 0.7
        return mixture_targets(
            [
                _targets("sample", teacher_logits, seed, temperatures),
                _targets("priority", other, seed + 1, temperatures),
            ],
            (0.6, 0.4),
        )
    kw = {"top_k": 12} if mode == "topk" else {"samples": 9} if mode in ("sample", "priority") else {}
    red = reduce_logits(
        teacher_logits, mode, generator=torch.Generator().manual_seed(seed), temperatures=temperatures, **kw, **extra
    )
    return targets_from_arrays(
        {k: v.numpy() for k, v in red.items()}, mode, teacher_logits.shape[1], temperatures=temperatures, **extra
    )


def _both(h0, w0, targets, y, T, alpha, chunk=8, approximate=False):
    h1, w1 = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    ref = kd_loss(h1 @ w1.T, targets, y, temperature=T, alpha=alpha, approximate=approximate)
    ref.total.backward()
    h2, w2 = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    got, correct = head_kd_loss(h2, w2, targets, y, temperature=T, alpha=alpha, chunk=chunk, approximate=approximate)
    (got.total * 3.0).backward()  # a non-unit upstream gradient must scale both gradients
    assert correct == int(((h0 @ w0.T).argmax(1) == y).sum())
    return ref, got, (h1.grad, w1.grad), (h2.grad / 3.0, w2.grad / 3.0)


@pytest.mark.parametrize("mode", ["full", "topk", "sample", "priority", "mixture", "fused-topk"])
@pytest.mark.parametrize("T,stored", [(1.0, True), (2.5, True), (2.5, False)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_fused_matches_autograd(mode, T, stored, alpha):
    """At a stored T (sample and priority: unnormalised weights) and, for T = 2.5 on a cache storing T = 1 only,
    with the approximation (self-normalised weights, uniform top-k tail)."""
    if mode == "fused-topk" and T != 1.0 and stored:
        pytest.skip("fused topk targets are exact at T = 1 only (elsewhere: the approximation, the case below)")
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g) * 0.5
    teacher = torch.randn(N, V, generator=g) * 2.0
    y = torch.randint(0, V, (N,), generator=g)
    targets = _targets(mode, teacher, seed=11, temperatures=TEMPS if stored else (1.0,))
    ref, got, (gh_ref, gw_ref), (gh, gw) = _both(h, w, targets, y, T, alpha, approximate=not stored)
    assert got.total.item() == pytest.approx(ref.total.item(), rel=1e-5, abs=1e-6)
    assert got.soft.item() == pytest.approx(ref.soft.item(), rel=1e-5, abs=1e-6)
    assert got.hard.item() == pytest.approx(ref.hard.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-6)


def test_no_targets_is_plain_cross_entropy():
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    ref, got, (gh_ref, gw_ref), (gh, gw) = _both(h, w, None, y, 1.0, 0.0)
    assert got.total.item() == pytest.approx(torch.nn.functional.cross_entropy(h @ w.T, y).item(), rel=1e-5)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["topk", "fused-topk"])
def test_topk_when_the_students_tail_underflows_float32(mode):
    """A student certain of the teacher's top k (the rest ~200 nats lower): its tail mass underflows in float32,
    and the loss and gradient must still match the log-space autograd path (no inf/NaN)."""
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(N, V, generator=g)
    targets = _targets(mode, teacher)
    w = torch.randn(V, D, generator=g) * 0.01
    w[:, 0] = -20.0
    r = int(torch.nonzero((targets.id_logprobs > float("-inf")).any(1))[0])  # a row with a head (fused: shared ids)
    w[targets.ids[r][targets.id_logprobs[r] > float("-inf")], 0] = 20.0  # its head ids: logit +200, the rest -200
    h = torch.randn(N, D, generator=g) * 0.1
    h[r, 0] = 10.0
    y = torch.randint(0, V, (N,), generator=g)
    for T in (1.0, 3.0):  # fused topk targets: T = 3 with the approximation (exact at T = 1 only)
        ref, got, (gh_ref, gw_ref), (gh, gw) = _both(h, w, targets, y, T, 0.7, approximate=mode == "fused-topk")
        assert torch.isfinite(got.total) and torch.isfinite(gh).all() and torch.isfinite(gw).all()
        assert got.total.item() == pytest.approx(ref.total.item(), rel=1e-5)
        torch.testing.assert_close(gh, gh_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-5)


def test_student_loss_uses_the_fused_path_for_the_builtin_transformer():
    from kdcli.lm.hf import TinyTransformer
    from kdcli.tasks.lm import student_loss

    torch.manual_seed(0)
    model = TinyTransformer(V, d_model=16, n_layers=1, n_heads=2, max_length=32)
    ids = torch.randint(0, V, (3, 10))
    idx = torch.tensor([0, 1, 2, 5, 11, 12, 25, 28])
    teacher = torch.randn(len(idx), V)
    y = torch.randint(0, V, (len(idx),))
    grads = []
    for fused in (True, False):
        model.zero_grad()
        parts, correct = student_loss(
            model, ids, None, idx, _targets("topk", teacher), y, temperature=2.0, alpha=0.6, fused=fused
        )
        parts.total.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if fused:
            fused_parts, fused_correct = parts, correct
    assert fused_parts.total.item() == pytest.approx(parts.total.item(), rel=1e-5)
    assert fused_correct == correct
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("boost", [4.0, 8.0, 12.0])
def test_topk_when_the_student_already_holds_most_of_the_mass(boost):
    """Students that give the teacher's top k 90% .. 1 - 1e-9 of their mass: the tail is then summed directly (not
    as 1 - sum of the top k, which cancels), and must match the autograd path."""
    g = torch.Generator().manual_seed(4)
    teacher = torch.randn(N, V, generator=g)
    targets = _targets("topk", teacher)
    w = torch.randn(V, D, generator=g) * 0.1
    h = torch.randn(N, D, generator=g) * 0.1
    w[:, 0] = 0.0
    h[:, 0] = 1.0
    logits_boost = torch.zeros(N, V).scatter_(1, targets.ids, boost)
    h = torch.cat([h, torch.eye(N)], dim=1)  # one extra feature per row carries that row's boost
    w = torch.cat([w, logits_boost.T], dim=1)
    y = torch.randint(0, V, (N,), generator=g)
    ref, got, (gh_ref, gw_ref), (gh, gw) = _both(h, w, targets, y, 1.0, 0.8)
    assert got.total.item() == pytest.approx(ref.total.item(), rel=1e-5)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-6)


def test_fold_applies_the_row_factor_itself_where_it_cannot_be_deferred():
    from kdcli.cache.modes.topk import _fold

    g0 = torch.rand(4, 10)
    ids = torch.tensor([[1, 2], [0, 9], [3, 4], [5, 6]])
    vals = torch.randn(4, 2)
    want = g0 * torch.tensor([2.0, 0.0, -1.0, 3.0])[:, None]
    want.scatter_(1, ids, vals)
    for f in (torch.tensor([2.0, 0.0, -1.0, 3.0]), torch.tensor([2.0, 1e-300, -1.0, 3.0], dtype=torch.float64)):
        g, scale = _fold(g0.clone().to(f.dtype), f, ids, vals.to(f.dtype))
        assert scale is None  # a zero factor cannot be divided out
        torch.testing.assert_close(g.float(), want)
    g, scale = _fold(g0.clone(), torch.tensor([2.0, 0.5, -1.0, 3.0]), ids, vals)
    want = g0 * torch.tensor([2.0, 0.5, -1.0, 3.0])[:, None]
    torch.testing.assert_close(scale[:, None] * g, want.scatter_(1, ids, vals))


@pytest.mark.parametrize("mode", ["topk", "sample", "full", "priority"])
def test_bf16_products_stay_close_to_the_float32_loss(mode):
    """--precision bf16: the same loss and gradients to bfloat16's ~3 significant digits (not bit-exact)."""
    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g) * 0.5
    targets = _targets(mode, torch.randn(N, V, generator=g) * 2.0)
    y = torch.randint(0, V, (N,), generator=g)
    out = []
    for precision in ("fp32", "bf16"):
        h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
        parts, _ = head_kd_loss(h1, w1, targets, y, temperature=2.0, alpha=0.7, chunk=8, precision=precision)
        parts.total.backward()
        assert h1.grad.dtype == torch.float32 and w1.grad.dtype == torch.float32
        out.append((parts.total.item(), h1.grad, w1.grad))
    (l32, gh32, gw32), (l16, gh16, gw16) = out
    assert l16 == pytest.approx(l32, rel=2e-2)
    assert l16 != l32  # the products really ran in bfloat16
    for a, b in ((gh16, gh32), (gw16, gw32)):
        assert float((a - b).norm() / b.norm()) < 3e-2
