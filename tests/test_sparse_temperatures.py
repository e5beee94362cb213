"""Sparse caches at temperatures other than 1: exact (topk) or unbiased (sample, priority) at the stored ones.

References are independent of kdcli's estimators: full-vocabulary float64 softmaxes of the teacher's logits,
torch.distributions.kl_divergence, and hand-computed bucket distributions. Unbiasedness: the mean over R
independent draw sets must be within 5 standard errors (sd / sqrt(R), so the tolerance shrinks as 1/sqrt(R)) of
the reference, plus a small allowance for the fp16 storage of the teacher's log-probs.

Generators: the draws are seeded apart from the teacher's logits (a generator seeded like the one that made the
logits replays their uniforms, which correlates the sample with the teacher: measured as a 3% bias).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from kdcli.cache.manifest import stored_temperatures
from kdcli.cache.modes import check_temperature, get_mode, targets_from_arrays
from kdcli.cache.modes.base import STAT_DTYPES, Targets
from kdcli.cache.reduce import reduce_logits, storage_arrays
from kdcli.cache.verify import _expected_datasets, block_problems
from kdcli.infra.errors import UsageError
from kdcli.lm.head_loss import head_kd_loss
from kdcli.losses import describe, kd_loss, soft_kl
from tests.conftest import divergence_reference as reference

TEMPS = (1.0, 2.0, 4.0)
DIVS = ("forward", "reverse", "jsd")


def teacher_student(rows: int, C: int = 200, seed: int = 0, scale: float = 2.0, peak: float = 6.0):
    """A peaked teacher (one likely class per row on a spread-out rest) and a noisy, shrunk student."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, C, generator=g, dtype=torch.float64) * scale
    t[torch.arange(rows), torch.randint(0, C, (rows,), generator=g)] += peak
    s = t * 0.7 + torch.randn(rows, C, generator=g, dtype=torch.float64) * 1.5
    return t.float(), s.float()


def make(mode: str, t: torch.Tensor, temperatures=TEMPS, seed: int = 12345, sampler=None, **kw) -> Targets:
    red = reduce_logits(
        t,
        mode,
        generator=torch.Generator().manual_seed(seed),
        temperatures=temperatures,
        sampler_temperatures=sampler,
        **kw,
    )
    arrays = storage_arrays({k: v.numpy() for k, v in red.items()}, t.shape[1])
    return targets_from_arrays(
        arrays, mode, t.shape[1], temperatures=temperatures or (1.0,), sampler_temperatures=sampler or (1.0,)
    )


def bucket_reference(t, s, ids, T, divergence="forward"):
    """The (k + 1)-bucket divergence from the full float64 tempered distributions, by hand."""
    p, q = torch.softmax(t.double() / T, -1), torch.softmax(s.double() / T, -1)
    pb = torch.cat([p.gather(1, ids), 1 - p.gather(1, ids).sum(1, keepdim=True)], 1)
    qb = torch.cat([q.gather(1, ids), 1 - q.gather(1, ids).sum(1, keepdim=True)], 1)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(1)  # noqa: E731
    if divergence == "forward":
        return kl(pb, qb)
    if divergence == "reverse":
        return kl(qb, pb)
    m = 0.5 * (pb + qb)
    return 0.5 * kl(pb, m) + 0.5 * kl(qb, m)


# -- topk: the stored tempered tail makes the bucketed divergence exact ------------------------------------------
def test_tail_logmass_t_is_the_true_tempered_tail_mass():
    t, _ = teacher_student(64)
    red = reduce_logits(t, "topk", top_k=16, temperatures=(4.0, 2.0, 0.5, 1.0))
    assert red["tail_logmass_t"].dtype == STAT_DTYPES["tail_logmass_t"]
    assert red["tail_logmass_t"].shape == (64, 3)  # columns: T = 0.5, 2, 4 (1 needs none)
    ids = red["topk_ids"].long()
    for j, T in enumerate((0.5, 2.0, 4.0)):
        q = torch.softmax(t.double() / T, -1)
        want = torch.log1p(-q.gather(1, ids).sum(1))
        torch.testing.assert_close(red["tail_logmass_t"][:, j].double(), want, rtol=2**-10, atol=1e-4)
    # tempering above 1 never moves mass into the top k, below 1 never out of it
    tail1 = red["tail_logmass"].double()
    assert (red["tail_logmass_t"][:, 1:].double() >= tail1[:, None] - 1e-3).all()
    assert (red["tail_logmass_t"][:, 0].double() <= tail1 + 1e-3).all()


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("T", [2.0, 4.0])
def test_topk_bucketed_divergence_is_exact_at_a_stored_temperature(T, divergence):
    t, s = teacher_student(500)
    tg = make("topk", t, top_k=16)
    got = soft_kl(s, tg, T, divergence).double()
    ref = bucket_reference(t, s, tg.ids, T, divergence)
    # per row to the fp16 storage of the log-probs (measured: 3e-4 relative on average, 2e-3 at most)
    torch.testing.assert_close(got, ref, rtol=5e-3, atol=2e-4)
    assert abs(got.mean() / ref.mean() - 1) < 1e-3  # the issue's target: within 1% of the exact bucketed KL
    # ... and a lower bound on the full divergence (data-processing inequality)
    assert (got <= reference(t, s, T, divergence) + 1e-3).all()


def test_the_old_uniform_tail_approximation_is_far_off_at_T2():
    """What a cache that stores T = 1 only gives at T = 2 with approximate=True: measured 0.73x the exact bucketed
    KL on this teacher (the issue's 0.448 vs 0.630 through the CLI)."""
    t, s = teacher_student(2000)
    old = soft_kl(s, make("topk", t, temperatures=None, top_k=16), 2.0, approximate=True).double().mean()
    new = soft_kl(s, make("topk", t, top_k=16), 2.0).double().mean()
    ref = bucket_reference(t, s, make("topk", t, top_k=16).ids, 2.0).mean()
    assert abs(new / ref - 1) < 1e-3
    assert old / ref < 0.85


# -- sample and priority: unbiased at every stored T --------------------------------------------------------------
def repeated(mode, t_row, R, seed, **kw):
    """R independent reductions of one teacher row (one generator, R rows of uniforms)."""
    return make(mode, t_row.expand(R, t_row.shape[1]).contiguous(), seed=seed, **kw)


@pytest.mark.parametrize(
    "mode,kw",
    [("sample", {"samples": 24}), ("priority", {"samples": 8}), ("priority", {"samples": 8, "sampler": TEMPS})],
)
@pytest.mark.parametrize("T", [2.0, 4.0])
@pytest.mark.parametrize("divergence", DIVS)
def test_sample_and_priority_are_unbiased_at_stored_temperatures(mode, kw, T, divergence):
    R, C = 4000, 40
    t, s = teacher_student(3, C=C, seed=7)
    for row in range(3):
        est = soft_kl(
            s[row : row + 1].expand(R, C), repeated(mode, t[row : row + 1], R, 100 + row, **kw), T, divergence
        ).double()
        ref = reference(t[row : row + 1], s[row : row + 1], T, divergence).item()
        se = est.std().item() / math.sqrt(R)
        assert abs(est.mean().item() - ref) < 5 * se + 2e-3 * abs(ref), (row, est.mean().item(), ref, se)


@pytest.mark.parametrize("mode,k", [("sample", 24), ("priority", 8)])
def test_gradient_is_unbiased_at_a_stored_temperature(mode, k):
    """The gradient of T^2 * KL (what trains) averaged over R draw sets matches autograd on the full KL. A flat
    teacher: every class is drawn often enough in R sets for the standard error to see it (a class drawn once in
    R / 100 sets would leave the error estimate blind to its rare, large contribution)."""
    R, C, T = 4000, 30, 2.0
    t, s0 = teacher_student(1, C=C, seed=9, scale=1.0, peak=1.0)
    s = s0.repeat(R, 1).requires_grad_(True)  # one copy per draw set: R independent gradient estimates
    kd_loss(s, repeated(mode, t, R, 5, samples=k), None, temperature=T, alpha=1.0).total.backward()
    grads = s.grad.double() * R  # kd_loss averages over the R rows
    s_ref = s0.double().clone().requires_grad_(True)
    (T * T * reference(t, s_ref, T)).sum().backward()
    se = grads.std(dim=0) / math.sqrt(R)
    assert ((grads.mean(dim=0) - s_ref.grad[0]).abs() <= 5 * se + 1e-3).all()


def test_the_old_self_normalised_estimator_is_biased_at_T2_and_the_new_one_is_not():
    """24 draws at T = 2 on a 200-class teacher: self-normalised weights (a cache storing T = 1 only, with
    approximate=True) overshoot the exact KL by ~30% (the issue measured 1.25x through the CLI); the weights with
    the stored log Z_T do not. Both from the same draws."""
    R, C, T = 8000, 200, 2.0
    t, s = teacher_student(4, C=C, seed=3)
    z_old, z_new = [], []
    for row in range(4):
        tg = repeated("sample", t[row : row + 1], R, 40 + row, samples=24)
        old_tg = dataclasses.replace(tg, temperatures=(1.0,), stats=None)  # the same draws, no log Z_T
        ss = s[row : row + 1].expand(R, C)
        ref = reference(t[row : row + 1], s[row : row + 1], T).item()
        new, old = soft_kl(ss, tg, T).double(), soft_kl(ss, old_tg, T, approximate=True).double()
        z_new.append((new.mean().item() - ref) / (new.std().item() / math.sqrt(R)))
        z_old.append((old.mean().item() - ref) / (old.std().item() / math.sqrt(R)))
        assert old.mean().item() / ref > 1.1  # biased upwards by more than 10% on every row
    assert max(abs(z) for z in z_new) < 5, z_new
    assert min(z_old) > 10, z_old


@pytest.mark.parametrize("T", [2.0, 4.0])
def test_priority_and_sample_weights_estimate_any_sum_over_q_T(T):
    """sum_j w_j f(id_j) estimates sum_i q_T(i) f(i) for an arbitrary f, not only for the KL's log terms."""
    R, C = 6000, 50
    t, _ = teacher_student(1, C=C, seed=21)
    f = torch.randn(C, generator=torch.Generator().manual_seed(22), dtype=torch.float64) * 3
    want = (torch.softmax(t[0].double() / T, -1) * f).sum().item()
    for mode, k in (("sample", 16), ("priority", 6)):
        tg = repeated(mode, t, R, 23, samples=k)
        w, _, used, W = tg.id_weights(T)
        est = (w.double() * f[tg.ids]).sum(1)
        assert W is not None  # unnormalised at a stored T ...
        assert abs(W.double().mean().item() - 1) < 5 * W.double().std().item() / math.sqrt(R) + 2e-3  # ... E[W] = 1
        se = est.std().item() / math.sqrt(R)
        assert abs(est.mean().item() - want) < 5 * se + 2e-3, (mode, est.mean().item(), want, se)


def test_priority_sampling_at_T1_is_duffield_lund_thorup():
    """An independent re-implementation from the same uniforms: keep the K largest p/u, tau = the (K+1)-th; the
    weights at T = 1 are max(p_i, tau)."""
    C, K, rows = 30, 5, 6
    t, _ = teacher_student(rows, C=C, seed=31)
    red = reduce_logits(t, "priority", samples=K, generator=torch.Generator().manual_seed(77))
    u = 1.0 - torch.rand((rows, C), generator=torch.Generator().manual_seed(77)).double()  # the same stream
    p = torch.softmax(t.double(), -1).numpy()
    tg = targets_from_arrays({k: v.numpy() for k, v in red.items()}, "priority", C)
    w, _, _, _ = tg.id_weights(1.0)
    for r in range(rows):
        prio = p[r] / u[r].numpy()
        order = np.argsort(-prio)
        assert set(red["priority_ids"][r].tolist()) == set(order[:K].tolist())
        assert red["priority_tau"][r].item() == pytest.approx(math.log(prio[order[K]]), rel=1e-5)
        want = {int(i): max(p[r, i], prio[order[K]]) for i in order[:K]}
        for slot, i in enumerate(tg.ids[r].tolist()):
            assert w[r, slot].item() == pytest.approx(want[i], rel=2e-3)  # fp16 log-probs
    # kept ids are sorted by log-prob, largest first, so the first is the teacher's top-1 when it is kept
    assert (np.diff(red["priority_logprobs"].float().numpy(), axis=1) <= 0).all()


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_priority_with_every_class_kept_is_the_exact_divergence(T):
    t, s = teacher_student(50, C=40)
    tg = make("priority", t, samples=40)
    assert torch.isinf(tg.log_tau).all() and (tg.log_tau < 0).all()
    for div in DIVS:
        torch.testing.assert_close(soft_kl(s, tg, T, div).double(), reference(t, s, T, div), rtol=5e-3, atol=1e-3)


def test_priority_reduce_on_wide_rows():
    """(n, V) with V = 49,152 on the device the logits live on: shapes, dtypes, distinct ids, the K largest
    priorities (re-derived from the same uniforms), and a finite threshold below every kept priority."""
    n, V, K = 32, 49152, 15
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, V, generator=g) * 3
    red = reduce_logits(logits, "priority", samples=K, generator=torch.Generator().manual_seed(5), temperatures=TEMPS)
    assert red["priority_ids"].shape == (n, K) and red["priority_ids"].dtype == torch.int32
    assert red["priority_logprobs"].dtype == torch.float16 and red["priority_tau"].dtype == torch.float32
    assert red["priority_logz_t"].shape == (n, 2) and red["priority_logz_t"].dtype == torch.float32
    logp = torch.log_softmax(logits, -1)
    key = logp - torch.log1p(-torch.rand((n, V), generator=torch.Generator().manual_seed(5)))
    want = torch.topk(key, K + 1, dim=1)
    assert (torch.sort(red["priority_ids"].long(), 1).values == torch.sort(want.indices[:, :K], 1).values).all()
    torch.testing.assert_close(red["priority_tau"], want.values[:, K])
    kept = key.gather(1, red["priority_ids"].long())
    assert (kept >= red["priority_tau"][:, None]).all()
    torch.testing.assert_close(red["priority_logz_t"], torch.stack([torch.logsumexp(logp / T, -1) for T in (2, 4)], 1))


def test_a_class_of_probability_zero_gets_no_weight():
    """Fewer classes with p > 0 than K: the p = 0 ones fill the slots with log-prob -inf, tau is -inf, and the
    estimate is the exact sum over the others."""
    t = torch.full((2, 10), float("-inf"))
    t[:, :3] = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.4, 0.3]])
    s = torch.randn(2, 10, generator=torch.Generator().manual_seed(1))
    tg = make("priority", t, samples=5)
    assert torch.isinf(tg.log_tau).all()
    for T in TEMPS:
        got = soft_kl(s, tg, T).double()
        q = torch.softmax(t[:, :3].double() / T, -1)  # the teacher lives on its 3 classes
        want = (q * (q.log() - torch.log_softmax(s.double() / T, -1)[:, :3])).sum(1)
        torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-3)


def test_the_mixture_sampler_cuts_the_variance_at_T4():
    """pi = the mean of q_T over T = 1, 2, 4 keeps the classes that matter at T = 4: unbiased, and measured here
    ~2.5x less spread than pi = p here (on a 49k-vocabulary zipf teacher with K = 24: 2.4x less at T = 4,
    but 1.7x more at T = 1, where pi = p is best)."""
    R, C, T = 3000, 200, 4.0
    t, s = teacher_student(1, C=C, seed=51)
    ref = reference(t, s, T).item()
    sd = {}
    for name, sampler in (("p", None), ("mix", TEMPS)):
        est = soft_kl(s.expand(R, C), repeated("priority", t, R, 52, samples=24, sampler=sampler), T).double()
        se = est.std().item() / math.sqrt(R)
        assert abs(est.mean().item() - ref) < 5 * se + 2e-3 * ref
        sd[name] = est.std().item()
    assert sd["mix"] < 0.7 * sd["p"], sd


def test_issue_targets_at_T2_on_a_small_teacher():
    """The issue's targets at T = 2 on a 200-class teacher, 8,000 rows, 3 seeds: sample-24 and priority-24 within
    2% of the exact KL (their standard error here: ~0.5% and ~0.3%), topk-16 within 1% of the exact bucketed KL."""
    t, s = teacher_student(8000)
    T = 2.0
    exact = reference(t, s, T).mean().item()
    for mode in ("sample", "priority"):
        est = np.mean([soft_kl(s, make(mode, t, seed=900 + i, samples=24), T).double().mean().item() for i in range(3)])
        assert abs(est / exact - 1) < 0.02, (mode, est, exact)
    tg = make("topk", t, top_k=16)
    assert abs(soft_kl(s, tg, T).double().mean().item() / bucket_reference(t, s, tg.ids, T).mean().item() - 1) < 0.01


def test_issue_targets_at_T2_through_cache_teacher_and_eval(tmp_path):
    """The same targets end to end: a 200-class teacher (a Linear layer whose logits are the teacher above) cached
    by ``kdcli cache-teacher`` in each mode, the student measured by ``kdcli eval --temperature 2 --json``:
    sample-24 and priority-24 (mean of 3 cache seeds) within 2% of the full cache's exact KL, topk-16 within 1% of
    the exact bucketed KL computed here in float64."""
    import json

    from typer.testing import CliRunner

    from kdcli.cli import app
    from kdcli.models.classifiers import build_model, save_run_model

    C, rows, T = 200, 8000, 2.0
    t, s = teacher_student(rows)
    e = (s - 0.7 * t) / 1.5  # the student's noise: its logits are 0.7 t + 1.5 e
    np.savez(tmp_path / "d.npz", x=torch.cat([t, e], 1).numpy(), y=t.argmax(1).numpy())

    def linear(out, weight):
        model, info = build_model("mlp", {"hidden": []}, num_classes=C, input_shape=(2 * C,))
        with torch.no_grad():
            model.net[-1].weight.copy_(weight)
            model.net[-1].bias.zero_()
        out.mkdir()
        save_run_model(out, model, info)

    eye = torch.eye(C)
    linear(tmp_path / "teacher", torch.cat([eye, torch.zeros(C, C)], 1))
    linear(tmp_path / "student", torch.cat([0.7 * eye, 1.5 * eye], 1))

    def cli(*args):
        r = CliRunner().invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return r.stdout

    def kl(name, *flags, seed=0):
        cli(
            "cache-teacher",
            "--teacher",
            tmp_path / "teacher",
            "--data",
            tmp_path / "d.npz",
            "--out",
            tmp_path / name,
            "--seed",
            seed,
            "--batch-size",
            2000,
            *flags,
        )
        rep = json.loads(
            cli(
                "eval",
                "--model",
                tmp_path / "student",
                "--data",
                tmp_path / "d.npz",
                "--cache",
                tmp_path / name,
                "--temperature",
                T,
                "--json",
            )
        )
        return rep["models"][0]["kl_to_teacher"]

    exact = kl("full", "--mode", "full")
    assert exact == pytest.approx(reference(t, s, T).mean().item(), rel=2e-3)
    for mode in ("sample", "priority"):
        est = np.mean([kl(f"{mode}{i}", "--mode", mode, "--samples", 24, seed=i) for i in range(3)])
        assert abs(est / exact - 1) < 0.02, (mode, est, exact)
    ids = torch.topk(t, 16, dim=1).indices
    assert kl("topk", "--top-k", 16) == pytest.approx(bucket_reference(t, s, ids, T).mean().item(), rel=0.01)


# -- a temperature the cache does not store ----------------------------------------------------------------------
@pytest.mark.parametrize("mode,kw", [("topk", {"top_k": 4}), ("sample", {"samples": 6}), ("priority", {"samples": 6})])
def test_an_unstored_temperature_raises_unless_approximate(mode, kw):
    t, s = teacher_student(8, C=20)
    tg = make(mode, t, **kw)
    y = torch.zeros(8, dtype=torch.long)
    for call in (
        lambda a: soft_kl(s, tg, 3.0, approximate=a),
        lambda a: kd_loss(s, tg, y, temperature=3.0, alpha=0.5, approximate=a).total,
        lambda a: (
            head_kd_loss(s[:, :4].clone(), torch.randn(20, 4), tg, y, temperature=3.0, alpha=0.5, approximate=a)[
                0
            ].total
        ),
    ):
        with pytest.raises(UsageError, match=r"T = 1, 2, 4\b.*not at T = 3.*--approximate-temperature"):
            call(False)
        assert torch.isfinite(call(True)).all()
    assert check_temperature(mode, TEMPS, 2.0) is True
    assert check_temperature(mode, TEMPS, 2.0 * (1 + 1e-9)) is True  # float noise from YAML or a flag
    assert check_temperature(mode, TEMPS, 3.0, approximate=True) is False
    assert check_temperature("full", (1.0,), 3.0) is True  # full caches are exact at every T
    assert "APPROXIMATE" in describe(0.9, 3.0, True, mode=mode, temperatures=TEMPS, approximate=True, approximation="x")
    assert "APPROXIMATE" not in describe(0.9, 2.0, True, mode=mode, temperatures=TEMPS)


def test_full_targets_need_no_stored_temperature():
    t, s = teacher_student(8, C=20)
    tg = make("full", t, temperatures=None)
    torch.testing.assert_close(soft_kl(s, tg, 3.0).double(), reference(t, s, 3.0), rtol=3e-3, atol=1e-3)


def test_targets_refuse_a_statistics_array_that_does_not_match_the_temperatures():
    t, _ = teacher_student(4, C=20)
    arrays = {k: v.numpy() for k, v in reduce_logits(t, "topk", top_k=4, temperatures=(2.0,)).items()}
    with pytest.raises(ValueError, match="tail_logmass_t"):
        targets_from_arrays(arrays, "topk", 20, temperatures=TEMPS)  # 1 column stored, 2 declared
    arrays = {k: v.numpy() for k, v in reduce_logits(t, "priority", samples=4, temperatures=(2.0,)).items()}
    with pytest.raises(ValueError, match="sampler"):
        targets_from_arrays(arrays, "priority", 20, temperatures=(2.0,), sampler_temperatures=(4.0,))


# -- the fused LM head with priority weights ---------------------------------------------------------------------
@pytest.mark.parametrize("sampler", [None, TEMPS])
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_fused_head_matches_autograd_for_priority_weights(sampler, T):
    N, D, V = 29, 12, 250
    g = torch.Generator().manual_seed(61)
    h, w = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g) * 0.5
    tg = make("priority", torch.randn(N, V, generator=g) * 2.0, samples=10, sampler=sampler)
    y = torch.randint(0, V, (N,), generator=g)
    for alpha in (0.5, 1.0):
        h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
        ref = kd_loss(h1 @ w1.T, tg, y, temperature=T, alpha=alpha)
        ref.total.backward()
        h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
        got, _ = head_kd_loss(h2, w2, tg, y, temperature=T, alpha=alpha, chunk=8)
        got.total.backward()
        assert got.total.item() == pytest.approx(ref.total.item(), rel=1e-5, abs=1e-6)
        assert got.soft.item() == pytest.approx(ref.soft.item(), rel=1e-5, abs=1e-6)
        torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-4, atol=1e-6)


# -- cache layout and per-block checks ---------------------------------------------------------------------------
def _manifest(mode, **layout):
    m = {
        "mode": mode,
        "num_classes": 200,
        "data": {"num_samples": 16},
        "top_k": 16,
        "samples": 24,
        "id_dtype": "uint16",
        **get_mode(mode).temperature_layout(TEMPS, layout.pop("sampler", None)),
        **layout,
    }
    return m


def _block(mode, **kw):
    t, _ = teacher_student(16)
    red = reduce_logits(t, mode, generator=torch.Generator().manual_seed(3), temperatures=TEMPS, **kw)
    arrays = storage_arrays({k: v.numpy() for k, v in red.items()}, 200)
    arrays.update(row_index=np.arange(16), sample_index=np.arange(16), row_hash=np.zeros(16, np.uint64))
    return arrays


def test_layout_and_manifest_helpers():
    assert get_mode("topk").temperature_layout((4, 2)) == {
        "temperatures": [1.0, 2.0, 4.0],
        "stat_temperatures": [2.0, 4.0],
        "stat_dtype": "float16",
        "sampler_temperatures": None,
    }
    assert get_mode("priority").temperature_layout(TEMPS)["sampler_temperatures"] == [1.0]
    assert get_mode("full").temperature_layout(TEMPS)["temperatures"] is None
    with pytest.raises(ValueError, match="sampler"):
        get_mode("priority").temperature_layout((2.0,), (4.0,))
    assert get_mode("priority").keys(TEMPS) == ("priority_ids", "priority_logprobs", "priority_tau", "priority_logz_t")
    assert get_mode("sample").keys((1.0,)) == ("sample_ids", "sample_counts", "sample_logprobs")
    assert stored_temperatures({}) == {"temperatures": (1.0,), "sampler_temperatures": (1.0,)}  # an older cache
    m = _manifest("priority")
    assert stored_temperatures(m) == {"temperatures": TEMPS, "sampler_temperatures": (1.0,)}
    for mode, kw in (("topk", {"top_k": 16}), ("sample", {"samples": 24}), ("priority", {"samples": 24})):
        want = _expected_datasets(_manifest(mode))  # what `cache verify` expects is what reduce_logits writes
        block = _block(mode, **kw)
        for key in get_mode(mode).keys(TEMPS):
            dt, trail = want[key]
            assert block[key].dtype == dt and block[key].shape[1:] == trail, key


@pytest.mark.parametrize(
    "mode,kw", [("topk", {"top_k": 16}), ("sample", {"samples": 24}), ("priority", {"samples": 24})]
)
def test_block_checks_pass_a_sound_block_and_name_damage(mode, kw):
    m = _manifest(mode)
    block = _block(mode, **kw)
    assert block_problems(m, block, 0) == []
    key = {"topk": "tail_logmass_t", "sample": "sample_logz_t", "priority": "priority_logz_t"}[mode]
    for bad, what in ((np.nan, "NaN"), (50.0, "possible")):
        damaged = {**block, key: block[key].copy()}
        damaged[key][5, 1] = bad
        found = block_problems(m, damaged, 0)
        assert found and key in found[0] and what in found[0] and "row 5" in found[0], found
    if mode == "topk":  # a tempered tail below the T = 1 tail (mass moved into the top k by tempering up)
        damaged = {**block, key: block[key].copy()}
        damaged[key][3, 0] = block["tail_logmass"][3] - 1.0
        assert "row 3" in block_problems(m, damaged, 0)[0]
    if mode == "priority":
        damaged = {**block, "priority_ids": block["priority_ids"].copy()}
        damaged["priority_ids"][2, 1] = damaged["priority_ids"][2, 0]
        assert "repeats" in block_problems(m, damaged, 0)[0]
        damaged = {**block, "priority_tau": block["priority_tau"].copy()}
        damaged["priority_tau"][4] = np.nan
        assert "priority_tau" in block_problems(m, damaged, 0)[0]


def test_parse_temperatures_for_the_config():
    from kdcli.config import parse_temperatures

    assert parse_temperatures("4, 2") == (1.0, 2.0, 4.0)
    assert parse_temperatures([1, 2.5]) == (1.0, 2.5)
    assert parse_temperatures(3) == (1.0, 3.0)
    for bad in ("1,x", "0", "-2", [True], "inf", "nan"):
        with pytest.raises(UsageError, match="temperatures"):
            parse_temperatures(bad)


def test_the_approximation_help_says_what_the_code_does():
    """--approximate-temperature's help used to say top-k "assumes the tail spread like the student's"; the code
    spreads the teacher's T = 1 tail mass evenly over the other classes. Both commands say so now, and the code's
    tempered tail bucket equals the uniform formula computed here."""
    import dataclasses as dc

    from kdcli.cache.modes.topk import topk_bucket_logprobs
    from kdcli.config import EvalConfig, TrainConfig

    for cls in (TrainConfig, EvalConfig):
        text = {f.name: f.metadata["help"] for f in dc.fields(cls)}["approximate_temperature"]
        assert "evenly over the other classes" in text and "like the student's" not in text
    C, k, T = 50, 5, 2.0
    t, _ = teacher_student(3, C=C)
    p = torch.softmax(t.double(), -1)
    top = p.topk(k, dim=1)
    m = 1 - top.values.sum(1)  # the T = 1 tail mass
    got = topk_bucket_logprobs(top.values.log().float(), m.log().float(), C, T).double().exp()
    uniform = torch.cat([top.values ** (1 / T), ((C - k) * (m / (C - k)) ** (1 / T))[:, None]], 1)
    torch.testing.assert_close(got, uniform / uniform.sum(1, keepdim=True), rtol=1e-5, atol=1e-6)
