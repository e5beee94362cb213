"""Fused sparse caches (kdcli/cache/fused.py), against references computed here from the teachers' *full* caches:

- ``topk`` (mean): the mixture bucketed on the ids every teacher kept + one tail, exact at T = 1;
- ``sample`` / ``priority`` (mean): the weighted mean of the teachers' own estimates, whose gradient is the
  gradient of the KL to the mixture (exactly when the estimates are exact, in expectation otherwise);
- what cannot be served (T != 1, eval of a mixture, geometric, mixed modes, reverse KL) is refused with exit 2.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence
from typer.testing import CliRunner

from kdcli.cache.fused import FusedReader, mixture_targets
from kdcli.cache.modes import targets_from_arrays
from kdcli.cache.modes.full import FullTargets
from kdcli.cache.modes.topk import fuse_topk
from kdcli.cache.reader import CacheReader
from kdcli.cache.reduce import reduce_logits
from kdcli.cache.tokens import TokenCacheReader
from kdcli.cli import app
from kdcli.config import CacheConfig, EvalConfig, TrainConfig
from kdcli.losses import soft_kl
from kdcli.models.classifiers import load_run_model
from kdcli.stages.cache import cache_teacher
from kdcli.stages.evaluate import evaluate
from kdcli.stages.train import train_student
from tests.conftest import make_blobs
from tests.lm_helpers import TEACHER_PROMPTS, two_prompt_setup

C = 12  # classes: enough for top-k sets that only partly overlap
W = (0.7, 0.3)


def invoke(*argv):
    return CliRunner().invoke(app, [str(a) for a in argv])


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    """Two MLP teachers on 12-class blobs, each cached in full, as top-4 / top-5, with 24 draws, and with priority
    K = 5 (different shard sizes, so the lock-step reads cross shards at different rows); a student."""
    d = tmp_path_factory.mktemp("fusion_sparse")
    x, y = make_blobs(n=240, classes=C, noise=2.5)
    np.savez(d / "blobs.npz", x=x, y=y)
    data = str(d / "blobs.npz")
    for i, hidden in enumerate((32, 12)):
        run = str(d / f"t{i}")
        train_student(
            TrainConfig(student="mlp", student_args={"hidden": [hidden]}, data=data, out=run, epochs=2, lr=3e-3, seed=i)
        )
        shard = 70 if i == 0 else 128
        cache_teacher(CacheConfig(teacher=run, data=data, out=str(d / f"full{i}"), shard_size=shard))
        cache_teacher(CacheConfig(teacher=run, data=data, out=str(d / f"topk{i}"), top_k=4 + i, shard_size=shard))
        cache_teacher(
            CacheConfig(teacher=run, data=data, out=str(d / f"sample{i}"), mode="sample", samples=24, shard_size=shard)
        )
        cache_teacher(
            CacheConfig(teacher=run, data=data, out=str(d / f"prio{i}"), mode="priority", samples=5, shard_size=shard)
        )
        cache_teacher(
            CacheConfig(
                teacher=run, data=data, out=str(d / f"prioall{i}"), mode="priority", samples=C, shard_size=shard
            )
        )  # K = C: every class kept, the estimate is exact
    train_student(
        TrainConfig(
            student="mlp", student_args={"hidden": [8]}, data=data, out=str(d / "student"), epochs=1, seed=3, alpha=0.0
        )
    )
    return d


def _full(d, n=240):
    return [torch.from_numpy(CacheReader(d / f"full{i}").read_rows(0, n)["logprobs"]).double() for i in (0, 1)]


def _reference_buckets(d, n=240):
    """Per row: the ids both teachers kept (from their topk caches) and the mixture of the full caches on them."""
    full = _full(d, n)
    mix = torch.logsumexp(torch.stack([lp + math.log(w) for lp, w in zip(full, W)]), dim=0)  # (n, C)
    ids = [CacheReader(d / f"topk{i}").read_rows(0, n)["topk_ids"] for i in (0, 1)]
    inter = [sorted(set(ids[0][r].tolist()) & set(ids[1][r].tolist())) for r in range(n)]
    return mix, inter


def _bucket(logp_row: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Probabilities of the buckets ids + one tail holding the rest."""
    p = logp_row.exp()
    head = p[ids] if ids else p[:0]
    return torch.cat([head, (1.0 - head.sum()).clamp_min(0.0)[None]])


# -- topk ---------------------------------------------------------------------------------------------------------
def test_topk_rows_are_the_mixture_on_the_shared_ids(sp):
    mix, inter = _reference_buckets(sp)
    got = FusedReader([CacheReader(sp / "topk0"), CacheReader(sp / "topk1")], W).read_rows(0, 240)
    assert got["topk_ids"].shape == (240, 9)  # the union of the teachers' slots
    sizes = [len(i) for i in inter]
    assert min(sizes) == 0 and max(sizes) >= 3, "the fixture should have rows where the top-k sets differ"
    for r in range(240):
        used = np.isfinite(got["topk_logprobs"][r])
        assert sorted(got["topk_ids"][r][used].tolist()) == inter[r]
        want = _bucket(mix[r], got["topk_ids"][r][used].tolist())
        np.testing.assert_allclose(np.exp(got["topk_logprobs"][r][used]), want[:-1].numpy(), atol=2e-3)
        assert math.exp(got["tail_logmass"][r]) == pytest.approx(float(want[-1]), abs=2e-3)
        lp = got["topk_logprobs"][r]
        assert np.all(np.diff(lp[used]) <= 0)  # the shared ids sorted, the most likely first


def test_topk_fusion_by_hand():
    """Two 6-class teachers: the shared ids are {0, 2}; every other id of either teacher is in the tail."""
    ids = [np.array([[0, 1, 2]]), np.array([[2, 3, 0]])]
    p0, p1 = np.array([0.5, 0.2, 0.1]), np.array([0.4, 0.3, 0.2])  # tails 0.2 and 0.1
    lps = [np.log(p0)[None].astype(np.float16), np.log(p1)[None].astype(np.float16)]
    tails = [np.log([0.2]).astype(np.float16), np.log([0.1]).astype(np.float16)]
    fids, flp, ftail = fuse_topk(ids, lps, tails, [0.25, 0.75])
    # mixture: id 2 = .25*.1 + .75*.4 = .325, id 0 = .25*.5 + .75*.2 = .275; known parts of the others: id 3 = .75*.3
    # = .225, id 1 = .25*.2 = .05; the repeats of 2 and 0 last
    assert fids.tolist() == [[2, 0, 3, 1, 2, 0]]
    np.testing.assert_allclose(np.exp(flp[0, :2]), [0.325, 0.275], rtol=2e-3)
    assert np.all(flp[0, 2:] == -np.inf)  # ids 3 and 1: kept by one teacher only -> the tail; repeats unused
    assert math.exp(ftail[0]) == pytest.approx(1 - 0.325 - 0.275, rel=2e-3)
    # the student's buckets: {2}, {0}, and the tail {1, 3, 4, 5}
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.15, 0.15, 0.1]]))
    t = targets_from_arrays({"topk_ids": fids, "topk_logprobs": flp, "tail_logmass": ftail}, "topk", 6)
    t.padded = True
    p, q = torch.tensor([0.325, 0.275, 0.4]), torch.tensor([0.3, 0.1, 0.6])
    want = float((p * (p / q).log()).sum())
    assert float(soft_kl(logits, t, 1.0)[0]) == pytest.approx(want, rel=2e-3)


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_topk_loss_is_the_exact_bucketed_divergence(sp, divergence):
    mix, inter = _reference_buckets(sp, 64)
    reader = FusedReader([CacheReader(sp / "topk0"), CacheReader(sp / "topk1")], W)
    targets = reader.targets(reader.read_rows(0, 64))
    assert targets.padded
    logits = torch.randn(64, C, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).float()
    got = soft_kl(logits, targets, 1.0, divergence)
    s_log = F.log_softmax(logits.double(), dim=1)
    for r in range(64):
        p, q = Categorical(probs=_bucket(mix[r], inter[r])), Categorical(probs=_bucket(s_log[r], inter[r]))
        if divergence == "forward":
            want = kl_divergence(p, q)
        elif divergence == "reverse":
            want = kl_divergence(q, p)
        else:
            m = Categorical(probs=0.5 * p.probs + 0.5 * q.probs)
            want = 0.5 * kl_divergence(p, m) + 0.5 * kl_divergence(q, m)
        assert float(got[r]) == pytest.approx(float(want), abs=2e-3), r
    # a lower bound of the full-vocabulary KL to the mixture (data-processing inequality)
    full_kl = (mix.exp() * (mix - s_log)).sum(1)
    if divergence == "forward":
        assert torch.all(got.double() <= full_kl + 2e-3)


def test_eval_against_fused_topk_caches(sp):
    """``kdcli eval --cache topk0 --cache topk1``: KL is the mean exact bucketed KL, agreement is against the most
    likely shared id -- both recomputed here from the full caches and the student's own logits."""
    rep = evaluate(
        EvalConfig(
            model=[str(sp / "student")],
            data=str(sp / "blobs.npz"),
            cache=[str(sp / "topk0"), str(sp / "topk1")],
            cache_weights="7,3",
        )
    )
    mix, inter = _reference_buckets(sp)
    model, _ = load_run_model(sp / "student")
    x = torch.from_numpy(np.load(sp / "blobs.npz")["x"])
    with torch.no_grad():
        s_log = F.log_softmax(model(x).double(), dim=1)
    kls = [
        float(
            kl_divergence(Categorical(probs=_bucket(mix[r], inter[r])), Categorical(probs=_bucket(s_log[r], inter[r])))
        )
        for r in range(240)
    ]
    full = [lp.exp() for lp in _full(sp)]
    ids = [CacheReader(sp / f"topk{i}").read_rows(0, 240)["topk_ids"] for i in (0, 1)]
    known = lambda r, i: sum(w * float(p[r, i]) for w, p, k in zip(W, full, ids) if i in k[r])  # noqa: E731
    top = [max(set(ids[0][r]) | set(ids[1][r]), key=lambda i: known(r, i)) for r in range(240)]
    agree = float(np.mean([int(s_log[r].argmax()) == top[r] for r in range(240)]))
    m = rep.models[0]
    assert m.kl_to_teacher == pytest.approx(float(np.mean(kls)), abs=2e-3)
    assert m.agreement == pytest.approx(agree, abs=1e-9)


def test_train_from_fused_topk_caches_logs_what_it_fused(sp):
    r = invoke(
        "train-student",
        "--student",
        "mlp",
        "--data",
        sp / "blobs.npz",
        "--out",
        sp / "s_topk",
        "--epochs",
        "1",
        "--temperature",
        "1",
        "--cache",
        sp / "topk0",
        "--cache",
        sp / "topk1",
    )
    assert r.exit_code == 0, r.output
    assert "exact over the buckets of the ids every teacher kept" in r.output


# -- sample / priority: a mixture of the teachers' own estimates --------------------------------------------------
def _student_grad(logits: torch.Tensor, loss_fn) -> tuple[float, torch.Tensor]:
    z = logits.clone().requires_grad_(True)
    v = loss_fn(z).sum()
    v.backward()
    return float(v), z.grad


def test_mixture_has_the_gradient_of_the_kl_to_the_mixture(sp):
    """With exact per-teacher estimates (priority, K = C: every class kept) the fused loss is the weighted mean of
    the teachers' KLs: its gradient is that of the KL to the fused full teacher, its value that plus the teachers'
    generalised Jensen-Shannon divergence H(mixture) - sum_k w_k H(p_k)."""
    n = 64
    mixr = FusedReader([CacheReader(sp / "prioall0"), CacheReader(sp / "prioall1")], W)
    assert mixr.mode == "mixture"
    targets = mixr.targets(mixr.read_rows(0, n))
    fullr = FusedReader([CacheReader(sp / "full0"), CacheReader(sp / "full1")], W)
    full_t = fullr.targets(fullr.read_rows(0, n))
    logits = torch.randn(n, C, generator=torch.Generator().manual_seed(1))
    v_mix, g_mix = _student_grad(logits, lambda z: soft_kl(z, targets, 1.0))
    v_full, g_full = _student_grad(logits, lambda z: soft_kl(z, full_t, 1.0))
    torch.testing.assert_close(g_mix, g_full, atol=2e-3, rtol=0)
    full = _full(sp, n)
    mix = torch.logsumexp(torch.stack([lp + math.log(w) for lp, w in zip(full, W)]), dim=0)
    ent = lambda lp: -(lp.exp() * lp).sum(1)  # noqa: E731
    js = float((ent(mix) - sum(w * ent(lp) for lp, w in zip(full, W))).sum())
    assert js > 0.1
    assert v_mix == pytest.approx(v_full + js, abs=0.05)


@pytest.mark.parametrize("mode,k", [("sample", 6), ("priority", 4)])
def test_mixture_gradient_is_unbiased_over_draws(mode, k):
    """Draws from two 10-class teachers, 3000 times: the mean gradient of the fused loss is the gradient of the KL
    to their mixture (full-vocabulary reference), within the Monte-Carlo error."""
    g = torch.Generator().manual_seed(5)
    teachers = [torch.randn(4, 10, generator=g) * 2.0 for _ in range(2)]
    w = (0.6, 0.4)
    logits = torch.randn(4, 10, generator=g)
    mix = torch.logsumexp(torch.stack([F.log_softmax(t, 1) + math.log(wk) for t, wk in zip(teachers, w)]), 0)
    _, want = _student_grad(logits, lambda z: soft_kl(z, FullTargets(10, logprobs=mix.float()), 1.0))
    reps, total = 3000, torch.zeros(4, 10)
    draws = torch.Generator().manual_seed(6)
    for _ in range(reps):
        parts = []
        for t in teachers:
            red = reduce_logits(t, mode, top_k=None, samples=k, generator=draws, temperatures=(1.0,))
            parts.append(targets_from_arrays({key: v.numpy() for key, v in red.items()}, mode, 10))
        mixt = mixture_targets(parts, w)
        total += _student_grad(logits, lambda z, mixt=mixt: soft_kl(z, mixt, 1.0))[1]
    assert torch.allclose(total / reps, want, atol=0.01), (total / reps - want).abs().max()


def test_train_from_a_sample_and_a_priority_cache(sp):
    out = sp / "s_mix"
    r = invoke(
        "train-student",
        "--student",
        "mlp",
        "--data",
        sp / "blobs.npz",
        "--out",
        out,
        "--epochs",
        "2",
        "--temperature",
        "1",
        "--cache",
        sp / "sample0",
        "--cache",
        sp / "prio1",
        "--cache-weights",
        "7,3",
    )
    assert r.exit_code == 0, r.output
    assert "unbiased gradient of the KL to the mixture" in r.output
    # the student learned the fused teacher: measured against the full caches' fusion
    rep = evaluate(
        EvalConfig(
            model=[str(out)],
            data=str(sp / "blobs.npz"),
            cache=[str(sp / "full0"), str(sp / "full1")],
            cache_weights="7,3",
        )
    )
    base = evaluate(
        EvalConfig(
            model=[str(sp / "student")],
            data=str(sp / "blobs.npz"),
            cache=[str(sp / "full0"), str(sp / "full1")],
            cache_weights="7,3",
        )
    )
    assert rep.models[0].kl_to_teacher < base.models[0].kl_to_teacher


@pytest.mark.parametrize(
    "caches,extra,needle",
    [
        (("sample0", "prio1"), ["--temperature", "2"], "exact only at T = 1"),
        (("topk0", "topk1"), ["--temperature", "4"], "exact only at T = 1"),
        (("topk0", "topk1"), ["--combine", "geometric"], "--combine geometric needs full caches"),
        (("topk0", "sample1"), [], "cannot fuse sample + topk caches"),
        (("full0", "topk1"), [], "cannot fuse full + topk caches"),
        (("sample0", "prio1"), ["--divergence", "reverse"], "forward KL only"),
    ],
)
def test_what_sparse_fusion_cannot_serve_is_refused(sp, caches, extra, needle):
    out = sp / f"s_bad_{abs(hash((caches, tuple(extra))))}"
    cs = [a for c in caches for a in ("--cache", sp / c)]
    extra = extra if "--temperature" in extra else ["--temperature", "1", *extra]
    r = invoke("train-student", "--student", "mlp", "--data", sp / "blobs.npz", "--out", out, *cs, *extra)
    assert r.exit_code == 2, r.output
    assert needle in r.output and r.output.count("error:") == 1 and "Traceback" not in r.output
    assert not out.exists()


def test_eval_refuses_a_mixture_and_approximates_only_when_asked(sp):
    r = invoke(
        "eval",
        "--model",
        sp / "student",
        "--data",
        sp / "blobs.npz",
        "--cache",
        sp / "sample0",
        "--cache",
        sp / "prio1",
        "--temperature",
        "1",
    )
    assert r.exit_code == 2 and "eval cannot measure KL or agreement against fused sample/priority" in r.output
    r = invoke(
        "eval",
        "--model",
        sp / "student",
        "--data",
        sp / "blobs.npz",
        "--cache",
        sp / "topk0",
        "--cache",
        sp / "topk1",
        "--temperature",
        "2",
        "--approximate-temperature",
        "--json",
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["models"][0]["kl_to_teacher"] > 0
    out = sp / "s_approx"
    r = invoke(
        "train-student",
        "--student",
        "mlp",
        "--data",
        sp / "blobs.npz",
        "--out",
        out,
        "--epochs",
        "1",
        "--cache",
        sp / "sample0",
        "--cache",
        sp / "prio1",
        "--temperature",
        "2",
        "--approximate-temperature",
    )
    assert r.exit_code == 0, r.output
    assert "APPROXIMATE at T = 2 (the mean of the tempered teachers)" in r.output


@pytest.mark.parametrize("kind", ["topk", "sample"])
def test_dataloader_workers_read_the_same_fused_sparse_batches(sp, kind):
    from kdcli.cache.reader import CacheLoader

    second = "prio1" if kind == "sample" else "topk1"

    def batches(workers):
        reader = FusedReader([CacheReader(sp / f"{kind}0"), CacheReader(sp / second)], W)
        loader = CacheLoader(reader, batch_size=40, seed=2, num_workers=workers, block_rows=64)
        try:
            return [{k: v.copy() for k, v in b.items()} for b in loader.epoch(0)]
        finally:
            loader.close()

    here, there = batches(0), batches(1)
    assert len(here) == len(there) == 6
    for a, b in zip(here, there):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


# -- language models ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """One tiny llama teacher under two teacher prompts, cached in full, as top-8 and with 16 draws per token."""
    lm = two_prompt_setup(tmp_path_factory.mktemp("fusion_sparse_lm"))
    d = lm["dir"]
    for i, prompt in enumerate(TEACHER_PROMPTS):
        common = dict(
            teacher=str(lm["teacher"]), data=str(lm["data"]), teacher_prompt=prompt, max_length=48, shard_size=5 + 2 * i
        )
        cache_teacher(CacheConfig(**common, out=str(d / f"full{i}")))
        cache_teacher(CacheConfig(**common, out=str(d / f"topk{i}"), top_k=8))
        cache_teacher(CacheConfig(**common, out=str(d / f"sample{i}"), mode="sample", samples=16))
    return lm


def test_lm_fused_topk_is_a_lower_bound_of_the_fused_full_kl(lm):
    d = lm["dir"]
    ra, rb = TokenCacheReader(d / "topk0").read_rows(0, 12), TokenCacheReader(d / "topk1").read_rows(0, 12)
    got = FusedReader([TokenCacheReader(d / "topk0"), TokenCacheReader(d / "topk1")], (0.5, 0.5)).read_rows(0, 12)
    np.testing.assert_array_equal(got["lengths"], ra["lengths"])
    # the fused log-prob of the next token is the mixture of the teachers' (each stores its own)
    want_t = np.logaddexp(
        ra["target_logprobs"].astype(np.float64), rb["target_logprobs"].astype(np.float64)
    ) - math.log(2)
    np.testing.assert_allclose(got["target_logprobs"], want_t, atol=1e-4)
    run = d / "s"
    train_student(
        TrainConfig(
            student=str(lm["student"]),
            data=str(lm["data"]),
            out=str(run),
            epochs=1,
            batch_size=4,
            lr=1e-3,
            temperature=1.0,
            cache=[str(d / "topk0"), str(d / "topk1")],
        )
    )
    train_student(
        TrainConfig(
            student=str(lm["student"]),
            data=str(lm["data"]),
            out=str(d / "s_mix"),
            epochs=1,
            batch_size=4,
            lr=1e-3,
            temperature=1.0,
            cache=[str(d / "sample0"), str(d / "sample1")],
        )
    )
    sparse = evaluate(
        EvalConfig(model=[str(run)], data=str(lm["data"]), temperature=1.0, cache=[str(d / "topk0"), str(d / "topk1")])
    )
    full = evaluate(
        EvalConfig(model=[str(run)], data=str(lm["data"]), temperature=1.0, cache=[str(d / "full0"), str(d / "full1")])
    )
    assert 0 < sparse.models[0].kl_to_teacher <= full.models[0].kl_to_teacher + 1e-3
    assert sparse.teacher["perplexity"] == pytest.approx(full.teacher["perplexity"], rel=2e-3)
