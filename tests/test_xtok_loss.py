"""Cross-tokenizer losses (kdcli.lm.xtok_loss) against independent references: kdcli's same-tokenizer kd_loss (the
identity property, per cache mode), torch.distributions.kl_divergence on hand-coarsened distributions, explicit
sorted-L1 formulas for ULD written with numpy, Monte-Carlo means for the sampled caches' gradients, and
torch.autograd.gradcheck in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from kdcli.cache.modes import get_mode, targets_from_arrays
from kdcli.cache.modes.base import Targets
from kdcli.cache.modes.full import FullTargets
from kdcli.cache.modes.priority import PriorityTargets
from kdcli.cache.modes.sample import SampleTargets
from kdcli.cache.modes.topk import TopkTargets
from kdcli.infra.errors import UsageError
from kdcli.lm.align import VocabMap, VocabStrings, align_keys, text_segment, vocab_map, vocab_strings
from kdcli.lm.xtok_loss import (
    Buckets,
    XtokLoss,
    aligned_divergence,
    describe_method,
    group_logsumexp,
    soft_rows,
    sorted_l1,
    top1_agreement,
    uld_distance,
    xtok_kd_loss,
)
from kdcli.losses import kd_loss, soft_kl

TEMPS = (1.0, 2.0)
SPARSE = {"topk": {"top_k": 8}, "sample": {"samples": 16}, "priority": {"samples": 12}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def logits(rows: int, V: int, seed: int, dtype=torch.float32, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, V, generator=g, dtype=torch.float64) * scale
    x[torch.arange(rows), torch.randint(0, V, (rows,), generator=g)] += 3.0
    return x.to(dtype)


def cached(mode: str, t: torch.Tensor, temperatures=TEMPS, seed: int = 7, **kw) -> Targets:
    """Targets as the cache stores them (fp16 log-probs, per-T statistics)."""
    kw = {**SPARSE.get(mode, {}), **kw}
    m = get_mode(mode)
    k = kw.get(m.size_option) if m.size_option else None
    V = t.shape[1]
    temps = temperatures if m.sparse else None
    red = m.reduce(torch.log_softmax(t.float(), -1), k, torch.Generator().manual_seed(seed), temps)
    arrays = m.storage({key: v.numpy() for key, v in red.items()}, m.layout(k, V, token=False))
    return targets_from_arrays(arrays, mode, V, temperatures=temps or (1.0,))


def loss(z, targets, rows, labels, buckets, *, method="aligned", **kw):
    """xtok_kd_loss on logits: the loss parts."""
    return xtok_kd_loss(z, targets, rows, labels, XtokLoss(method, buckets, **kw))[0]


def exact_full(t: torch.Tensor) -> Targets:
    return FullTargets(t.shape[1], logprobs=torch.log_softmax(t.double(), -1))


def exact_topk(t: torch.Tensor, k: int, T: float) -> Targets:
    """topk targets computed exactly in float64 (no fp16 storage), with the tail at T stored."""
    lp = torch.log_softmax(t.double(), -1)
    vals, ids = lp.topk(k, dim=1)
    rest = lp.scatter(1, ids, float("-inf"))
    tail = torch.logsumexp(rest, 1)
    temps = (1.0,) if T == 1.0 else tuple(sorted((1.0, T)))
    stats = None
    if T != 1.0:
        stats = (torch.logsumexp(rest / T, 1) - torch.logsumexp(lp / T, 1))[:, None]
    return TopkTargets(t.shape[1], temps, stats, ids=ids, id_logprobs=vals, tail_logmass=tail)


def surfaces(n: int, shared: int, seed: int, dup: bool = True) -> tuple[VocabStrings, VocabStrings]:
    """Teacher (n ids) and student (n - 3 ids) vocabularies with ``shared`` common strings in shuffled positions and,
    with ``dup``, one teacher string spelled by two ids and one student string by two ids (merged buckets)."""
    rng = np.random.default_rng(seed)
    common = [f"w{i}".encode() for i in range(shared)]
    t = common + [f"t{i}".encode() for i in range(n - shared)]
    s = common + [f"s{i}".encode() for i in range(n - 3 - shared)]
    if dup:
        t[-1] = common[0]
        s[-1] = common[1]
    t = [t[i] for i in rng.permutation(len(t))]
    s = [s[i] for i in rng.permutation(len(s))]
    return VocabStrings(tuple(t), None, "literal"), VocabStrings(tuple(s), None, "literal")


def coarse(p: torch.Tensor, bucket: np.ndarray, G: int) -> torch.Tensor:
    return torch.zeros(p.shape[0], G, dtype=p.dtype).index_add_(1, torch.as_tensor(bucket), p)


def kl_ref(P: torch.Tensor, Q: torch.Tensor, divergence: str = "forward") -> torch.Tensor:
    p, q = Categorical(probs=P), Categorical(probs=Q)
    if divergence == "forward":
        return kl_divergence(p, q)
    if divergence == "reverse":
        return kl_divergence(q, p)
    m = Categorical(probs=0.5 * (P + Q))
    return 0.5 * kl_divergence(p, m) + 0.5 * kl_divergence(q, m)


def uld_ref(p: np.ndarray, q: np.ndarray) -> float:
    """Boizard et al. 2024: both probability vectors sorted descending, the shorter padded with zeros, L1."""
    W = max(len(p), len(q))
    a = np.pad(np.sort(p)[::-1], (0, W - len(p)))
    b = np.pad(np.sort(q)[::-1], (0, W - len(q)))
    return float(np.abs(a - b).sum())


# -- identity: the same tokenizer through the cross-tokenizer loss is kdcli's loss --------------------------------


@pytest.mark.parametrize("mode", ["full", "topk", "sample", "priority"])
@pytest.mark.parametrize("T", TEMPS)
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_identity_is_kd_loss(mode, T, divergence):
    V, n = 48, 10
    t, s = logits(n, V, 1), logits(n, V, 2)
    targets = cached(mode, t)
    labels = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(3))
    buckets = Buckets.of(VocabMap.identity(V))
    z_ref, z = s.clone().requires_grad_(), s.clone().requires_grad_()
    kw = {"temperature": T, "alpha": 0.7, "divergence": divergence}
    if mode in ("sample", "priority") and divergence != "forward":
        with pytest.raises(UsageError, match="forward KL only"):
            loss(z, targets, torch.arange(n), labels, buckets, **kw)
        return
    ref = kd_loss(z_ref, targets, labels, **kw)
    got = loss(z, targets, torch.arange(n), labels, buckets, **kw)
    for a, b in ((ref.total, got.total), (ref.soft, got.soft), (ref.hard, got.hard)):
        torch.testing.assert_close(b, a, rtol=2e-6, atol=2e-6)
    ref.total.backward()
    got.total.backward()
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-5, atol=1e-7)
    rows = aligned_divergence(s, targets, buckets, T, divergence)
    torch.testing.assert_close(rows, soft_kl(s, targets, T, divergence), rtol=2e-6, atol=2e-6)


def test_identity_through_real_tokenizer_spans():
    """One real tokenizer on both sides, end to end: spans -> alignment (every position) -> string map (the
    identity) -> gathered cached rows -> the same loss and gradient as kd_loss."""
    from tests.xtok_helpers import TEXT, byte_level_bpe

    tok = byte_level_bpe()
    v = vocab_strings(tok)
    ids, sp = text_segment(tok, v, TEXT, 0, tok.eos_token_id)
    keys = sp.keys()[1:]  # every token but the first is predicted
    si, ti = align_keys(keys, keys)
    vmap = vocab_map(v, v)
    assert len(si) == len(keys) and vmap.sha256 == VocabMap.identity(len(v)).sha256
    n, V = len(keys), len(v)
    t, s = logits(n, V, 4), logits(n, V, 5)
    labels = torch.as_tensor(ids[1:])
    for mode in ("full", "topk", "sample", "priority"):
        targets = cached(mode, t)
        z_ref, z = s.clone().requires_grad_(), s.clone().requires_grad_()
        ref = kd_loss(z_ref, targets, labels, temperature=2.0, alpha=0.5)
        got = loss(
            z,
            targets.take(torch.as_tensor(ti)),
            torch.as_tensor(si),
            labels,
            Buckets.of(vmap),
            temperature=2.0,
            alpha=0.5,
        )
        torch.testing.assert_close(got.total, ref.total, rtol=2e-6, atol=2e-6)
        ref.total.backward()
        got.total.backward()
        torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-5, atol=1e-7)


# -- hand-computed tiny example ----------------------------------------------------------------------------------

TINY_T = VocabStrings((b"a", b"b", b"c", "<eos>"), None, "literal")
TINY_S = VocabStrings((b"b", b"a", b"d"), None, "literal")


def test_tiny_vocab_map():
    m = vocab_map(TINY_T, TINY_S)
    assert m.num_matched == 2 and list(m.teacher_bucket) == [0, 1, 2, 2] and list(m.student_bucket) == [1, 0, 2]


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_aligned_tiny_by_hand(T, divergence):
    """P = [p_a, p_b, p_c + p_eos], Q = [q_a, q_b, q_d] (the student's ids are b, a, d)."""
    t = torch.tensor([[0.3, 1.9, -0.4, 0.8]], dtype=torch.float64)
    s = torch.tensor([[1.1, -0.2, 0.5]], dtype=torch.float64)
    p, q = torch.softmax(t / T, -1)[0], torch.softmax(s / T, -1)[0]
    P = torch.stack([p[0], p[1], p[2] + p[3]])[None]
    Q = torch.stack([q[1], q[0], q[2]])[None]
    got = aligned_divergence(s, exact_full(t), Buckets.of(vocab_map(TINY_T, TINY_S)), T, divergence)
    torch.testing.assert_close(got, kl_ref(P, Q, divergence), rtol=1e-12, atol=1e-12)


def test_uld_and_hybrid_tiny_by_hand():
    t = torch.tensor([[0.3, 1.9, -0.4, 0.8]], dtype=torch.float64)
    s = torch.tensor([[1.1, -0.2, 0.5]], dtype=torch.float64)
    p, q = torch.softmax(t, -1)[0].numpy(), torch.softmax(s, -1)[0].numpy()
    b = Buckets.of(vocab_map(TINY_T, TINY_S))
    assert uld_distance(s, exact_full(t), 1.0).item() == pytest.approx(uld_ref(p, q), abs=1e-12)
    # inside the rest bucket: teacher {c, eos} vs student {d}; sorted and padded
    rest = uld_distance(s, exact_full(t), 1.0, buckets=b).item()
    assert rest == pytest.approx(uld_ref(p[[2, 3]], q[[2]]), abs=1e-12)
    hyb = soft_rows("hybrid", s, exact_full(t), b, 1.0, uld_weight=0.5)
    torch.testing.assert_close(hyb, aligned_divergence(s, exact_full(t), b, 1.0) + 0.5 * rest)


def test_topk_tiny_by_hand():
    """top-2 of the teacher = b (matched, known) and c (unmatched): buckets {b} + rest, both sides; ULD: exact on
    the two stored ranks, the tail against the student's sorted mass beyond rank 2; hybrid's rest: c (certain)
    and the tail (a, eos) against the student's a and d."""
    t = torch.tensor([[0.3, 1.9, 1.2, 0.1]], dtype=torch.float64)
    s = torch.tensor([[1.1, -0.2, 0.5]], dtype=torch.float64)
    p, q = torch.softmax(t, -1)[0], torch.softmax(s, -1)[0]
    tk = exact_topk(t, 2, 1.0)
    assert tk.ids.tolist() == [[1, 2]]
    b = Buckets.of(vocab_map(TINY_T, TINY_S))
    P = torch.stack([p[1], 1 - p[1]])[None]
    Q = torch.stack([q[0], 1 - q[0]])[None]
    torch.testing.assert_close(aligned_divergence(s, tk, b, 1.0), kl_ref(P, Q))
    pn, qs = p.numpy(), np.sort(q.numpy())[::-1]
    want = abs(pn[1] - qs[0]) + abs(pn[2] - qs[1]) + abs(pn[0] + pn[3] - qs[2])
    assert uld_distance(s, tk, 1.0).item() == pytest.approx(want, abs=1e-12)
    assert want <= uld_ref(pn, q.numpy()) + 1e-15
    rest_s = np.sort(q.numpy()[[1, 2]])[::-1]  # student a, d
    want_rest = abs(pn[2] - rest_s[0]) + abs(pn[0] + pn[3] - rest_s[1])
    assert uld_distance(s, tk, 1.0, buckets=b).item() == pytest.approx(want_rest, abs=1e-12)


def test_priority_and_sample_uld_certain_prefix_by_hand():
    """Teacher p = [.5, .3, .1, .06, .04]. Priority kept {0, 1} with tau = .2: both have p >= tau, so both are the
    top ranks. Sample drew {0, 2}: R = 1 - .6 = .4 bounds every undrawn class, so only id 0 (.5 >= R) is certain."""
    p = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]], dtype=torch.float64)
    lp = p.log()
    s = torch.tensor([[0.2, 1.0, -0.3, 0.4, 0.0, 0.7]], dtype=torch.float64)
    qs = np.sort(torch.softmax(s, -1)[0].numpy())[::-1]
    pr = PriorityTargets(5, ids=torch.tensor([[0, 1]]), id_logprobs=lp[:, :2], log_tau=torch.tensor([0.2]).log())
    want = abs(0.5 - qs[0]) + abs(0.3 - qs[1]) + abs(0.2 - qs[2:].sum())
    assert uld_distance(s, pr, 1.0).item() == pytest.approx(want, abs=1e-12)
    sa = SampleTargets(5, ids=torch.tensor([[0, 2]]), id_logprobs=lp[:, [0, 2]], counts=torch.tensor([[5.0, 1.0]]))
    want = abs(0.5 - qs[0]) + abs(0.5 - qs[1:].sum())
    assert uld_distance(s, sa, 1.0).item() == pytest.approx(want, abs=1e-7)  # log Z from float32 counts


# -- exactness and bounds on bigger vocabularies -----------------------------------------------------------------


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_topk_is_exact_on_known_buckets(T):
    """Per row: known = matched buckets all of whose teacher ids are in the top k; the rest is one bucket on each
    side. Reference from the full float64 distributions, by hand. A lower bound on the full-cache value; equal to
    it when every teacher id is stored."""
    tv, sv = surfaces(40, 20, seed=0)
    vmap = vocab_map(tv, sv)
    b = Buckets.of(vmap)
    n, k = 12, 9
    t, s = logits(n, 40, 10, torch.float64), logits(n, 37, 11, torch.float64)
    tk = exact_topk(t, k, T)
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    G = vmap.num_buckets
    Pb, Qb = coarse(p, vmap.teacher_bucket, G), coarse(q, vmap.student_bucket, G)
    counts = vmap.teacher_counts()
    want = []
    for r in range(n):
        stored = set(tk.ids[r].tolist())
        known = [g for g in range(vmap.rest) if all(i in stored for i in np.flatnonzero(vmap.teacher_bucket == g))]
        assert all(counts[g] >= 1 for g in known)
        P = torch.cat([Pb[r, known], (1 - Pb[r, known].sum())[None]])
        Q = torch.cat([Qb[r, known], (1 - Qb[r, known].sum())[None]])
        want.append(kl_ref(P[None], Q[None])[0])
    got = aligned_divergence(s, tk, b, T)
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-9, atol=1e-12)
    full = aligned_divergence(s, exact_full(t), b, T)
    assert (got <= full + 1e-12).all() and (got < full).any()
    everything = exact_topk(t, 40, T)
    torch.testing.assert_close(aligned_divergence(s, everything, b, T), full, rtol=1e-9, atol=1e-12)


def test_uld_sparse_bounds_full():
    """ULD from topk/priority/sample caches: a lower bound on the full-cache ULD; equal when every class is kept."""
    V = 60
    t, s = logits(16, V, 20), logits(16, 45, 21)
    full = uld_distance(s, exact_full(t), 2.0)
    for mode, kw in (("topk", {"top_k": 10}), ("priority", {"samples": 10}), ("sample", {"samples": 24})):
        got = uld_distance(s, cached(mode, t, **kw), 2.0)
        assert (got <= full + 2e-3).all(), mode  # fp16 storage of the sparse log-probs
        assert (got < full - 1e-4).any(), mode
    every = uld_distance(s, cached("priority", t, samples=V), 2.0)
    torch.testing.assert_close(every, full, rtol=3e-3, atol=3e-3)


def test_hybrid_full_is_aligned_plus_rest_uld():
    tv, sv = surfaces(30, 12, seed=1)
    vmap = vocab_map(tv, sv)
    b = Buckets.of(vmap)
    t, s = logits(5, 30, 30, torch.float64), logits(5, 27, 31, torch.float64)
    p, q = torch.softmax(t, -1).numpy(), torch.softmax(s, -1).numpy()
    tr, sr = vmap.teacher_bucket == vmap.rest, vmap.student_bucket == vmap.rest
    want = [uld_ref(p[r, tr], q[r, sr]) for r in range(5)]
    got = uld_distance(s, exact_full(t), 1.0, buckets=b)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


# -- sampled caches: the gradient is unbiased ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sample", "priority"])
@pytest.mark.parametrize("T", TEMPS)
def test_sampled_gradient_is_unbiased(mode, T):
    """R independent draw sets of one teacher row (one row each): the mean gradient of ``aligned`` w.r.t. the
    student logits matches the exact (full-cache) gradient within 5 standard errors, with merged buckets and a rest
    bucket; plus a small allowance for the fp16 storage of the teacher's log-probs. (At T = 2 the weights of rare
    ids grow as p^(-1/2): a heavy tail whose standard error a few thousand rows underestimate; 20,000 suffice.)"""
    tv, sv = surfaces(30, 14, seed=2)
    b = Buckets.of(vocab_map(tv, sv))
    R = 20000
    t = logits(1, 30, 40).repeat(R, 1)
    s = logits(1, 27, 41, torch.float64)
    targets = cached(mode, t, seed=99, samples=6)
    z = s.repeat(R, 1).requires_grad_()
    aligned_divergence(z, targets, b, T).sum().backward()
    g = z.grad  # (R, V_student): one independent estimate per row
    z_full = s.clone().requires_grad_()
    aligned_divergence(z_full, cached("full", t[:1]), b, T).sum().backward()
    mean, se = g.mean(0), g.std(0) / math.sqrt(R)
    assert ((mean - z_full.grad[0]).abs() <= 5 * se + 2e-3 * z_full.grad.abs().max()).all()


# -- gradients ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,mode",
    [
        ("aligned", "full"),
        ("aligned", "topk"),
        ("aligned", "sample"),
        ("aligned", "priority"),
        ("uld", "full"),
        ("uld", "topk"),
        ("uld", "priority"),
        ("uld", "sample"),
        ("hybrid", "full"),
        ("hybrid", "topk"),
        ("hybrid", "priority"),
    ],
)
def test_gradcheck(method, mode):
    tv, sv = surfaces(9, 5, seed=3)
    b = Buckets.of(vocab_map(tv, sv))
    t = logits(3, 9, 50)
    targets = cached(mode, t, top_k=4, samples=5) if mode != "full" else cached("full", t)
    z = logits(3, 6, 51, torch.float64).requires_grad_()
    T = 2.0
    assert torch.autograd.gradcheck(
        lambda x: soft_rows(method, x, targets, b, T, uld_weight=0.7), (z,), eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("divergence", ["reverse", "jsd"])
def test_gradcheck_topk_other_divergences(divergence):
    tv, sv = surfaces(9, 5, seed=4)
    b = Buckets.of(vocab_map(tv, sv))
    targets = cached("topk", logits(3, 9, 52), top_k=5)
    z = logits(3, 6, 53, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: aligned_divergence(x, targets, b, 2.0, divergence), (z,), eps=1e-6, atol=1e-6
    )


def test_underflowing_teacher_classes_stay_finite():
    """fp16 log-probs of -inf (classes the teacher never predicts) and placeholder buckets: finite values and
    gradients (reverse KL from a full cache is infinite where the teacher gives a bucket no mass and the student
    some, as kdcli's same-tokenizer loss is: not checked)."""
    tv, sv = surfaces(12, 6, seed=5)
    b = Buckets.of(vocab_map(tv, sv))
    t = logits(4, 12, 60)
    t[:, :5] = -1e6
    full = cached("full", t)
    assert torch.isinf(full.logprobs).any()
    for targets in (full, cached("topk", t, top_k=6)):
        for div in ("forward", "jsd") if targets.mode == "full" else ("forward", "reverse", "jsd"):
            z = logits(4, 9, 61).requires_grad_()
            v = aligned_divergence(z, targets, b, 1.0, div)
            v.sum().backward()
            assert torch.isfinite(v).all() and torch.isfinite(z.grad).all(), (targets.mode, div)


def test_group_logsumexp():
    x = torch.tensor([[0.0, -1.0, float("-inf"), 2.0]], dtype=torch.float64)
    out = group_logsumexp(x, torch.tensor([1, 1, 0, 2]), 4)
    want = [float("-inf"), math.log(1 + math.exp(-1)), 2.0, float("-inf")]
    assert out[0].tolist() == pytest.approx(want)


# -- the training loss and helpers -------------------------------------------------------------------------------


def test_loss_averages_over_all_student_positions():
    """Aligned rows contribute T^2 D, the others nothing; both terms divide by the N student positions."""
    tv, sv = surfaces(20, 10, seed=6)
    b = Buckets.of(vocab_map(tv, sv))
    N, V = 7, 17
    s = logits(N, V, 70)
    rows = torch.tensor([1, 4, 5])
    targets = cached("topk", logits(3, 20, 71))
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0))
    parts = loss(s, targets, rows, labels, b, temperature=2.0, alpha=0.25)
    soft = 4.0 * aligned_divergence(s[rows], targets, b, 2.0).sum() / N
    hard = torch.nn.functional.cross_entropy(s, labels)
    torch.testing.assert_close(parts.soft, soft)
    torch.testing.assert_close(parts.hard, hard)
    torch.testing.assert_close(parts.total, 0.25 * soft + 0.75 * hard)
    none = loss(s, targets, rows[:0], labels, b, temperature=2.0, alpha=0.25)
    assert none.soft.item() == 0.0
    labels_only = loss(s, None, None, labels, None, temperature=1.0, alpha=0.0)
    torch.testing.assert_close(labels_only.total, hard)


def test_take_matches_slices():
    t = logits(6, 30, 80)
    for targets in (cached("topk", t), cached("full", t), cached("sample", t, seed=1), cached("priority", t, seed=2)):
        a = targets.take(torch.arange(2, 5))
        ref = targets.rows(slice(2, 5))
        assert type(a) is type(ref)
        for name in ("logprobs", "ids", "id_logprobs", "tail_logmass", "counts", "log_tau", "stats"):
            x, y = getattr(a, name, None), getattr(ref, name, None)
            assert (x is None and y is None) or torch.equal(x, y)


def test_errors():
    b = Buckets.of(VocabMap.identity(30))
    t, s = logits(4, 30, 90), logits(4, 30, 91)
    with pytest.raises(UsageError, match="unknown --cross-tokenizer method 'dskd'"):
        soft_rows("dskd", s, cached("full", t), b, 1.0)
    sa = cached("sample", t, seed=1)
    torch.testing.assert_close(aligned_divergence(s, sa, b, 1.0), soft_kl(s, sa, 1.0))
    with pytest.raises(ValueError, match="vocabulary map"):
        aligned_divergence(s[:, :20], cached("full", t), b, 1.0)
    assert "top k" in describe_method("aligned", "topk") and "rest bucket" in describe_method("hybrid", "full")


def test_top1_agreement():
    tv, sv = surfaces(20, 10, seed=7, dup=False)
    vmap = vocab_map(tv, sv)
    b = Buckets.of(vmap)
    t = logits(50, 20, 100)
    targets = cached("topk", t)
    s_same = torch.full((50, 17), -5.0)
    for r, i in enumerate(targets.top1().tolist()):  # the student puts its argmax on the teacher's string
        g = vmap.teacher_bucket[i]
        if g < vmap.rest:
            s_same[r, int(np.flatnonzero(vmap.student_bucket == g)[0])] = 5.0
    agree = top1_agreement(s_same, targets, b)
    matched = torch.as_tensor(vmap.teacher_bucket[targets.top1().numpy()] < vmap.rest)
    assert torch.equal(agree, matched) and matched.any() and not matched.all()
    ident = Buckets.of(VocabMap.identity(20))
    s = logits(50, 20, 101)
    assert torch.equal(top1_agreement(s, targets, ident), s.argmax(-1) == targets.top1())


def test_sorted_l1_is_padded_l1():
    p = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    got = sorted_l1(p, torch.tensor([3]), torch.zeros(1, dtype=torch.float64), q)
    assert got.item() == pytest.approx(uld_ref(p[0].numpy(), q[0].numpy()))


def test_student_without_rest_compares_given_matched():
    """A student vocabulary inside the teacher's: no student id is in the rest, so the teacher's rest mass has no
    counterpart; the loss compares P(.|matched) with Q (finite), by hand; sampled caches stay finite too."""
    tv = VocabStrings((b"a", b"b", b"c", b"d"), None, "literal")
    sv = VocabStrings((b"b", b"a"), None, "literal")
    b = Buckets.of(vocab_map(tv, sv))
    assert b.condition
    t = torch.tensor([[0.3, 1.9, -0.4, 0.8], [2.0, 0.1, 0.5, -1.0]], dtype=torch.float64)
    s = torch.tensor([[1.1, -0.2], [0.0, 0.7]], dtype=torch.float64)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    P = p[:, :2] / p[:, :2].sum(1, keepdim=True)
    Q = q[:, [1, 0]]
    for div in ("forward", "reverse", "jsd"):
        torch.testing.assert_close(aligned_divergence(s, exact_full(t), b, 1.0, div), kl_ref(P, Q, div))
    for mode in ("sample", "priority"):
        z = s.clone().requires_grad_()
        v = aligned_divergence(z, cached(mode, t.float(), samples=3), b, 2.0)
        v.sum().backward()
        assert torch.isfinite(v).all() and torch.isfinite(z.grad).all()
    strict = Buckets.of(vocab_map(tv, VocabStrings((b"b", b"a", b"z"), None, "literal")))
    assert not strict.condition  # a student rest id: the plain coarsened KL


def test_teacher_without_rest_compares_given_matched():
    """The other way round (every teacher string is the student's): Q(.|matched); the teacher's weights are not
    renormalised (P(matched) = 1), so the sampled gradient stays unbiased."""
    tv = VocabStrings((b"b", b"a"), None, "literal")
    sv = VocabStrings((b"a", b"b", b"c", b"d"), None, "literal")
    b = Buckets.of(vocab_map(tv, sv))
    assert b.condition and not b.teacher_rest
    t = torch.tensor([[0.3, 1.9], [2.0, 0.1]], dtype=torch.float64)
    s = torch.tensor([[1.1, -0.2, 0.5, 0.0], [0.0, 0.7, -1.0, 2.0]], dtype=torch.float64)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    Q = q[:, [1, 0]] / q[:, :2].sum(1, keepdim=True)
    for div in ("forward", "reverse", "jsd"):
        torch.testing.assert_close(aligned_divergence(s, exact_full(t), b, 1.0, div), kl_ref(p, Q, div))
    R = 4000  # sampled: the mean gradient is the full one (unbiased), within 5 standard errors
    z = s[:1].repeat(R, 1).requires_grad_()
    aligned_divergence(z, cached("sample", t[:1].float().repeat(R, 1), samples=2), b, 2.0).sum().backward()
    zf = s[:1].clone().requires_grad_()
    aligned_divergence(zf, cached("full", t[:1].float()), b, 2.0).sum().backward()
    mean, se = z.grad.mean(0), z.grad.std(0) / math.sqrt(R)
    assert ((mean - zf.grad[0]).abs() <= 5 * se + 1e-3).all()


def test_projected_map_keeps_the_rest_small():
    """With project=True, unshared strings join their longest shared prefix's bucket on both sides."""
    from tests.xtok_helpers import byte_level_bpe, metaspace_bpe

    vb, vm = vocab_strings(byte_level_bpe()), vocab_strings(metaspace_bpe())
    strict, proj = vocab_map(vb, vm), vocab_map(vb, vm, project=True)
    assert proj.num_matched == strict.num_matched and proj.projected and not strict.projected
    assert (proj.teacher_bucket == proj.rest).sum() < (strict.teacher_bucket == strict.rest).sum()
    for ids, v, m in ((range(len(vb)), vb, proj.teacher_bucket), (range(len(vm)), vm, proj.student_bucket)):
        for i in ids:
            if m[i] != proj.rest and isinstance(v.surfaces[i], bytes):
                # the bucket's shared string is a prefix of the token's
                g = int(m[i])
                shared = vb.surfaces[int(np.flatnonzero(strict.teacher_bucket == g)[0])]
                assert v.surfaces[i].startswith(shared)


@pytest.mark.parametrize("method,mode", [("aligned", "topk"), ("uld", "sample"), ("hybrid", "full")])
def test_chunked_output_layer_is_the_logits_path(method, mode):
    """hidden @ W.T a few rows at a time under activation checkpointing (no (N, V) logits kept): the same loss,
    correct count and gradients w.r.t. the hidden states and the weight as the loss on the whole logits."""
    tv, sv = surfaces(40, 20, seed=8)
    b = Buckets.of(vocab_map(tv, sv))
    N, d, V = 23, 12, 37
    g = torch.Generator().manual_seed(9)
    h = torch.randn(N, d, generator=g, dtype=torch.float64)
    W = torch.randn(V, d, generator=g, dtype=torch.float64)
    rows = torch.tensor([0, 3, 4, 9, 10, 11, 17, 22])
    targets = cached(mode, logits(len(rows), 40, 10))
    labels = torch.randint(0, V, (N,), generator=g)
    spec = XtokLoss(method, b, 2.0, 0.7, uld_weight=0.5)
    h1, W1 = h.clone().requires_grad_(), W.clone().requires_grad_()
    ref, c_ref = xtok_kd_loss(h1 @ W1.T, targets, rows, labels, spec)
    ref.total.backward()
    h2, W2 = h.clone().requires_grad_(), W.clone().requires_grad_()
    got, c_got = xtok_kd_loss(None, targets, rows, labels, spec, hidden=h2, weight=W2, chunk=5)
    got.total.backward()
    for a, c in ((ref.total, got.total), (ref.soft, got.soft), (ref.hard, got.hard)):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)
    assert int(c_ref) == int(c_got)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(W2.grad, W1.grad, rtol=1e-10, atol=1e-12)


def test_group_plan_copies_one_id_groups():
    """GroupPlan.logsumexp (one-id groups copied, the others summed) is group_logsumexp, value and gradient."""
    from kdcli.lm.xtok_loss import GroupPlan

    group = np.array([3, 0, 3, 1, 4, 4, 4, 5])  # group 2 empty, 3 and 4 shared, 0, 1, 5 alone
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = group_logsumexp(a, torch.as_tensor(group), 6)
    got = GroupPlan.of(group, 6, "cpu").logsumexp(b)
    torch.testing.assert_close(got, ref)
    w = torch.randn(5, 6, dtype=torch.float64).masked_fill(torch.isinf(ref), 0.0)
    (torch.where(torch.isinf(ref), 0.0, ref) * w).sum().backward()
    (torch.where(torch.isinf(got), 0.0, got) * w).sum().backward()
    torch.testing.assert_close(b.grad, a.grad)


@pytest.mark.parametrize("mode", ["topk", "sample", "priority"])
def test_one_teacher_id_per_bucket_shortcut(mode):
    """Every matched bucket holding one teacher id skips the slot-by-slot bucket comparisons; the general path
    gives the same values and gradients."""
    import dataclasses

    tv, sv = surfaces(40, 20, seed=11, dup=False)
    fast = Buckets.of(vocab_map(tv, sv))
    assert fast.teacher_single
    slow = dataclasses.replace(fast, teacher_single=False, teacher_plan=None, student_plan=None)
    t = cached(mode, logits(9, 40, 12))
    for div in ("forward",) if mode != "topk" else ("forward", "reverse", "jsd"):
        za, zb = logits(9, 37, 13).requires_grad_(), logits(9, 37, 13).requires_grad_()
        va, vb = aligned_divergence(za, t, fast, 2.0, div), aligned_divergence(zb, t, slow, 2.0, div)
        torch.testing.assert_close(va, vb)
        va.sum().backward()
        vb.sum().backward()
        torch.testing.assert_close(za.grad, zb.grad)
