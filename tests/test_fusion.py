"""Fused teachers (kdcli/cache/fused.py): several full caches over the same data read in lock-step and combined
into one teacher (``--cache A --cache B --cache-weights .. --combine mean|geometric``), for classification and
token-level (LM) caches. References are computed here, in torch, from each cache read alone."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from kdcli.cache.fused import FusedReader, first_difference, parse_cache_weights
from kdcli.cache.reader import CacheReader
from kdcli.cache.tokens import TokenCacheReader
from kdcli.cli import app
from kdcli.config import CacheConfig, EvalConfig, TrainConfig
from kdcli.infra.errors import UsageError
from kdcli.models.classifiers import load_run_model
from kdcli.stages.cache import cache_teacher
from kdcli.stages.evaluate import evaluate
from kdcli.stages.train import train_student
from tests.conftest import make_blobs
from tests.lm_helpers import TEACHER_PROMPTS, two_prompt_setup


def mixture(lps: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    """log sum_k w_k p_k, renormalised (the hand-computed reference for --combine mean)."""
    m = torch.logsumexp(torch.stack([lp.double() + math.log(wk) for lp, wk in zip(lps, w)]), dim=0)
    return m - torch.logsumexp(m, dim=-1, keepdim=True)


def geometric(lps: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    g = sum(wk * lp.double() for lp, wk in zip(lps, w))
    return g - torch.logsumexp(g, dim=-1, keepdim=True)


def invoke(*argv: str):
    return CliRunner().invoke(app, [str(a) for a in argv])


# -- classification ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cls(tmp_path_factory):
    """Two MLP teachers (different seeds and widths) on the blobs, each cached in full with different shard sizes
    (so the lock-step reads cross shard boundaries at different rows), plus a cache over other data and a topk one."""
    d = tmp_path_factory.mktemp("fusion_cls")
    x, y = make_blobs(n=300)
    np.savez(d / "blobs.npz", x=x, y=y)
    x2, y2 = make_blobs(n=300, seed=5)
    np.savez(d / "other.npz", x=x2, y=y2)
    data = str(d / "blobs.npz")
    runs = []
    for i, hidden in enumerate((32, 16)):
        train_student(
            TrainConfig(
                student="mlp",
                student_args={"hidden": [hidden]},
                data=data,
                out=str(d / f"t{i}"),
                epochs=2,
                lr=3e-3,
                seed=i,
            )
        )
        runs.append(d / f"t{i}")
    cache_teacher(CacheConfig(teacher=str(runs[0]), data=data, out=str(d / "c0"), shard_size=70))
    cache_teacher(CacheConfig(teacher=str(runs[1]), data=data, out=str(d / "c1"), shard_size=128))
    cache_teacher(CacheConfig(teacher=str(runs[1]), data=str(d / "other.npz"), out=str(d / "c_other")))
    cache_teacher(CacheConfig(teacher=str(runs[1]), data=data, out=str(d / "c_topk"), top_k=2))
    train_student(
        TrainConfig(
            student="mlp", student_args={"hidden": [8]}, data=data, out=str(d / "student"), epochs=1, seed=3, alpha=0.0
        )
    )
    return d


def _fused(d: Path, w=(0.7, 0.3), combine="mean") -> FusedReader:
    return FusedReader([CacheReader(d / "c0"), CacheReader(d / "c1")], w, combine)


@pytest.mark.parametrize("combine", ["mean", "geometric"])
def test_fused_rows_are_the_hand_computed_combination(cls, combine):
    a, b = CacheReader(cls / "c0").read_rows(0, 300), CacheReader(cls / "c1").read_rows(0, 300)
    lps = [torch.from_numpy(a["logprobs"]).float(), torch.from_numpy(b["logprobs"]).float()]
    ref = (mixture if combine == "mean" else geometric)(lps, [0.7, 0.3])
    got = _fused(cls, combine=combine).read_rows(0, 300)
    assert got["logprobs"].dtype == np.float32
    assert torch.allclose(torch.from_numpy(got["logprobs"]).double(), ref, atol=1e-5)
    # the mixture really is p = 0.7 p_a + 0.3 p_b (not a mixture of log-probs), and the two combinations differ
    p = 0.7 * lps[0].double().exp() + 0.3 * lps[1].double().exp()
    if combine == "mean":
        assert torch.allclose(torch.from_numpy(got["logprobs"]).double().exp(), p / p.sum(1, keepdim=True), atol=1e-6)
    else:
        assert (torch.from_numpy(got["logprobs"]).double().exp() - p).abs().max() > 1e-3
    np.testing.assert_array_equal(got["row_hash"], a["row_hash"])


def test_the_same_cache_twice_is_that_teacher(cls):
    one = CacheReader(cls / "c0").read_rows(0, 300)["logprobs"].astype(np.float64)
    for combine in ("mean", "geometric"):
        two = FusedReader([CacheReader(cls / "c0"), CacheReader(cls / "c0")], (0.5, 0.5), combine).read_rows(0, 300)
        ref = one - np.log(np.exp(one).sum(1, keepdims=True))
        np.testing.assert_allclose(two["logprobs"], ref, atol=1e-6)


def test_weights_parse_normalise_and_refuse():
    assert parse_cache_weights(None, 3) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert parse_cache_weights("2,1,1", 3) == pytest.approx((0.5, 0.25, 0.25))
    assert parse_cache_weights("1e308,1e308", 2) == (0.5, 0.5)  # scaled before summing: no overflow to inf
    assert parse_cache_weights("0,1", 2) == (0.0, 1.0)
    for bad, n in (("1,2", 3), ("a,b", 2), ("0,0", 2), ("-1,2", 2), ("nan,1", 2)):
        with pytest.raises(UsageError):
            parse_cache_weights(bad, n)


def test_a_zero_weight_teacher_takes_no_part(cls):
    got = _fused(cls, w=(0.0, 1.0), combine="geometric").read_rows(0, 300)["logprobs"]
    only = CacheReader(cls / "c1").read_rows(0, 300)["logprobs"].astype(np.float64)
    np.testing.assert_allclose(got, only - np.log(np.exp(only).sum(1, keepdims=True)), atol=1e-6)


def test_lockstep_streaming_batches_are_fused_rows(cls, monkeypatch):
    """Training batches from the fused reader (shuffled, a held-out mask, caches with different shard sizes) are
    the fused rows of the same row ids; every read is one block of rows (memory flat), the same range in every
    cache."""
    fused = _fused(cls)
    whole = fused.read_rows(0, 300)
    reads = []
    orig = CacheReader.read_rows

    def spy(self, start, stop):
        reads.append((str(self.dir), start, stop))
        return orig(self, start, stop)

    monkeypatch.setattr(CacheReader, "read_rows", spy)
    keep = np.ones(300, bool)
    keep[::7] = False
    seen = []
    for batch in fused.iter_batches(batch_size=32, seed=4, epoch=1, block_rows=50, shuffle_blocks=2, keep=keep):
        r = batch["row_index"]
        np.testing.assert_array_equal(batch["logprobs"], whole["logprobs"][r])
        np.testing.assert_array_equal(batch["sample_index"], whole["sample_index"][r])
        seen.append(r)
    seen = np.concatenate(seen)
    assert sorted(seen.tolist()) == np.flatnonzero(keep).tolist()
    assert reads and all(stop - start <= 50 for _, start, stop in reads)  # block-sized reads of the other cache
    assert {d for d, _, _ in reads} == {str(cls / "c1")}  # the first cache reads its own blocks directly


def test_train_from_the_same_cache_twice_matches_one_cache(cls):
    """The fused path through the training loop: a teacher fused from one cache with a copy of itself is that
    teacher, so the student is the same (up to float rounding of the fp16 -> fp32 widening). (The same path given
    twice is refused: tests/test_bad_inputs.py.)"""
    common = dict(
        student="mlp", student_args={"hidden": [8]}, data=str(cls / "blobs.npz"), epochs=2, seed=1, batch_size=64
    )
    if not (cls / "c0copy").exists():
        shutil.copytree(cls / "c0", cls / "c0copy")
    train_student(TrainConfig(**common, cache=[str(cls / "c0")], out=str(cls / "s_one")))
    train_student(
        TrainConfig(**common, cache=[str(cls / "c0"), str(cls / "c0copy")], combine="geometric", out=str(cls / "s_two"))
    )
    m1, _ = load_run_model(cls / "s_one")
    m2, _ = load_run_model(cls / "s_two")
    for p1, p2 in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.allclose(p1, p2, atol=1e-5)


def test_eval_measures_against_the_fused_teacher(cls):
    rep = evaluate(
        EvalConfig(
            model=[str(cls / "student")],
            data=str(cls / "blobs.npz"),
            cache=[str(cls / "c0"), str(cls / "c1")],
            cache_weights="0.7,0.3",
            temperature=2.0,
        )
    )
    model, _ = load_run_model(cls / "student")
    x, _ = make_blobs(n=300)
    with torch.no_grad():
        s = F.log_softmax(model(torch.from_numpy(x)).double() / 2.0, dim=1)
    a, b = (torch.from_numpy(CacheReader(cls / c).read_rows(0, 300)["logprobs"]).float() for c in ("c0", "c1"))
    p = mixture([a, b], [0.7, 0.3])
    q = F.log_softmax(p / 2.0, dim=1)
    kl = (q.exp() * (q - s)).sum(1).mean().item()
    agree = (s.argmax(1) == p.argmax(1)).double().mean().item()
    m = rep.models[0]
    assert m.kl_to_teacher == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert m.agreement == pytest.approx(agree)
    assert rep.cache == [str(cls / "c0"), str(cls / "c1")]
    # and it is not the agreement/KL to either teacher alone
    single = evaluate(
        EvalConfig(model=[str(cls / "student")], data=str(cls / "blobs.npz"), cache=[str(cls / "c0")], temperature=2.0)
    ).models[0]
    assert single.kl_to_teacher != pytest.approx(m.kl_to_teacher, rel=1e-3)


def test_cli_train_and_eval_with_two_caches(cls):
    out = cls / "s_cli"
    r = invoke(
        "train-student",
        "--student",
        "mlp",
        "--data",
        cls / "blobs.npz",
        "--out",
        out,
        "--epochs",
        "1",
        "--cache",
        cls / "c0",
        "--cache",
        cls / "c1",
        "--cache-weights",
        "3,1",
        "--combine",
        "mean",
    )
    assert r.exit_code == 0, r.output
    assert "mean of 2 teachers (0.75 x" in r.output
    r = invoke(
        "eval", "--model", out, "--data", cls / "blobs.npz", "--cache", cls / "c0", "--cache", cls / "c1", "--json"
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["cache"] == [str(cls / "c0"), str(cls / "c1")] and doc["models"][0]["agreement"] is not None


@pytest.mark.parametrize(
    "argv,code,needle",
    [
        (["--cache", "c0", "--cache", "c_other"], 3, "data fingerprint differ"),
        (["--cache", "c0", "--cache", "c_topk"], 2, "cannot fuse full + topk caches"),
        (["--cache", "c0", "--cache", "c1", "--cache-weights", "1,2,3"], 2, "--cache-weights has 3 value(s) but 2"),
        (["--cache", "c0", "--cache", "c1", "--cache-weights", "0,0"], 2, "sum to more than 0"),
        (["--cache", "c0", "--cache", "c1", "--combine", "median"], 2, "median"),
        (["--cache-weights", "1,1"], 2, "--cache-weights weights several --cache values; none was given"),
    ],
)
def test_bad_fusions_are_refused_before_anything_is_written(cls, argv, code, needle):
    argv = [str(cls / a) if a.startswith("c") and (cls / a).exists() else a for a in argv]
    out = cls / f"s_bad_{abs(hash(tuple(argv)))}"
    extra = ["--alpha", "0"] if "--cache" not in argv else []
    r = invoke("train-student", "--student", "mlp", "--data", cls / "blobs.npz", "--out", out, *argv, *extra)
    assert r.exit_code == code, r.output
    assert needle in r.output and r.output.count("error:") == 1
    assert not out.exists()
    if "--cache" in argv:  # eval refuses the same way
        r = invoke("eval", "--model", cls / "student", "--data", cls / "blobs.npz", *argv)
        assert r.exit_code == code and needle in r.output


def test_first_difference_names_the_property():
    base = {
        "kind": "token",
        "data": {"num_samples": 4, "fingerprint": "f"},
        "num_rows": 4,
        "num_classes": 9,
        "tokenizer": {"sha256": "t"},
        "text": {"max_length": 8, "teacher_prompt": "a"},
        "views": 1,
        "settings": {},
    }
    assert first_difference(base, {**base, "text": {"max_length": 8, "teacher_prompt": "b"}}) is None
    assert first_difference(base, {**base, "tokenizer": {"sha256": "u"}}).startswith("tokenizer differ")
    assert first_difference(base, {**base, "num_classes": 10}).startswith("classes / vocabulary size differ")
    assert first_difference(base, {**base, "text": {"max_length": 9}}).startswith("text settings")
    assert first_difference(base, {**base, "kind": "classification"}).startswith("kind differ")


# -- language models: one teacher under two teacher prompts, fused per token --------------------------------------
@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    lm = two_prompt_setup(tmp_path_factory.mktemp("fusion_lm"))
    d, teacher, data = lm["dir"], str(lm["teacher"]), str(lm["data"])
    for i, prompt in enumerate(TEACHER_PROMPTS):
        cache_teacher(
            CacheConfig(
                teacher=teacher,
                data=data,
                out=str(d / f"c{i}"),
                teacher_prompt=prompt,
                max_length=48,
                shard_size=5 + 2 * i,
            )
        )
    cache_teacher(CacheConfig(teacher=teacher, data=data, out=str(d / "c_len"), max_length=40))
    return lm


@pytest.mark.parametrize("combine", ["mean", "geometric"])
def test_token_caches_fuse_per_token(lm, combine):
    d = lm["dir"]
    a, b = TokenCacheReader(d / "c0"), TokenCacheReader(d / "c1")
    ra, rb = a.read_rows(0, 12), b.read_rows(0, 12)
    assert not np.array_equal(ra["logprobs"], rb["logprobs"])  # the prompts change the teacher
    fused = FusedReader([a, b], (0.25, 0.75), combine)
    got = fused.read_rows(0, 12)
    lps = [torch.from_numpy(ra["logprobs"]).float(), torch.from_numpy(rb["logprobs"]).float()]
    ref = (mixture if combine == "mean" else geometric)(lps, [0.25, 0.75])
    assert torch.allclose(torch.from_numpy(got["logprobs"]).double(), ref, atol=1e-5)
    # the fused teacher's log-prob of each next token is read off the fused distribution
    hit = (ra["target_logprobs"][:, None] == ra["logprobs"]) & (rb["target_logprobs"][:, None] == rb["logprobs"])
    assert hit.sum(1).min() >= 1
    ids = np.argmax(hit, axis=1)  # the next token's id (where both caches' stored target log-prob sits)
    np.testing.assert_allclose(got["target_logprobs"], got["logprobs"][np.arange(len(ids)), ids], atol=1e-3)
    np.testing.assert_array_equal(got["lengths"], ra["lengths"])
    # lock-step batches over caches with different shard sizes: every batch's tokens are the fused tokens
    off = np.concatenate([[0], np.cumsum(got["lengths"])])
    for batch in fused.iter_batches(batch_size=5, seed=0, epoch=0, block_rows=4, shuffle_blocks=2):
        want = np.concatenate([got["logprobs"][off[r] : off[r + 1]] for r in batch["row_index"]])
        np.testing.assert_array_equal(batch["logprobs"], want)


def test_lm_train_and_eval_against_the_fused_teacher(lm):
    d = lm["dir"]
    caches = [str(d / "c0"), str(d / "c1")]
    train_student(
        TrainConfig(
            student=str(lm["student"]),
            data=str(lm["data"]),
            out=str(d / "s"),
            cache=caches,
            epochs=1,
            batch_size=4,
            lr=1e-3,
        )
    )
    rep = evaluate(EvalConfig(model=[str(d / "s")], data=str(lm["data"]), cache=caches))
    ra, rb = TokenCacheReader(d / "c0").read_rows(0, 12), TokenCacheReader(d / "c1").read_rows(0, 12)
    fused_t = np.logaddexp(
        ra["target_logprobs"].astype(np.float64) + math.log(0.5),
        rb["target_logprobs"].astype(np.float64) + math.log(0.5),
    )
    assert rep.teacher["perplexity"] == pytest.approx(math.exp(-fused_t.mean()), rel=1e-3)
    assert rep.teacher["spec"].startswith("mean of 2 teachers")
    # an independent reference: a copy of cache c0 whose stored log-probs are replaced by the mixture computed here
    ref_dir = d / "c_handmix"
    shutil.copytree(d / "c0", ref_dir)
    mix = mixture(
        [torch.from_numpy(ra["logprobs"]).float(), torch.from_numpy(rb["logprobs"]).float()], [0.5, 0.5]
    ).numpy()
    tok_off = np.concatenate([[0], np.cumsum(ra["lengths"])])
    for shard in json.loads((ref_dir / "manifest.json").read_text())["shards"]:
        with h5py.File(ref_dir / shard["name"], "r+") as f:
            a, b = tok_off[shard["row_start"]], tok_off[shard["row_stop"]]
            f["logprobs"][:] = mix[a:b].astype(np.float16)
            f["target_logprobs"][:] = fused_t[a:b].astype(np.float16)
    hand = evaluate(EvalConfig(model=[str(d / "s")], data=str(lm["data"]), cache=[str(ref_dir)]))
    assert rep.models[0].kl_to_teacher == pytest.approx(hand.models[0].kl_to_teacher, rel=2e-3)
    assert rep.models[0].agreement == pytest.approx(hand.models[0].agreement, abs=0.01)
    assert rep.teacher["perplexity"] == pytest.approx(hand.teacher["perplexity"], rel=1e-3)


def test_lm_caches_with_other_text_settings_are_refused(lm):
    d = lm["dir"]
    r = invoke("eval", "--model", lm["student"], "--data", lm["data"], "--cache", d / "c0", "--cache", d / "c_len")
    assert r.exit_code == 3, r.output
    assert "data fingerprint differ" in r.output or "text settings" in r.output


def test_yaml_cache_is_a_string_or_a_list(tmp_path):
    from kdcli.config import resolve

    (tmp_path / "one.yaml").write_text("cache: c/a\n")
    (tmp_path / "two.yaml").write_text("cache: [c/a, c/b]\ncache_weights: '2,1'\ncombine: geometric\n")
    (tmp_path / "none.yaml").write_text("cache: null\n")
    base = {"student": "mlp", "data": "x.npz", "out": "o"}
    assert resolve(TrainConfig, tmp_path / "one.yaml", base).cache == ["c/a"]
    two = resolve(TrainConfig, tmp_path / "two.yaml", base)
    assert (two.cache, two.cache_weights, two.combine) == (["c/a", "c/b"], "2,1", "geometric")
    assert resolve(TrainConfig, tmp_path / "none.yaml", base).cache == []
    assert TrainConfig(student="mlp", data="x", out="o", cache="c/a").cache == ["c/a"]  # the Python API
    assert resolve(EvalConfig, tmp_path / "two.yaml", {"model": ["m"], "data": "x"}).cache == ["c/a", "c/b"]


def test_dataloader_workers_read_the_same_fused_batches(cls):
    from kdcli.cache.reader import CacheLoader

    def batches(workers):
        loader = CacheLoader(_fused(cls), batch_size=40, seed=2, num_workers=workers, block_rows=64)
        try:
            return [(b["row_index"].copy(), b["logprobs"].copy()) for b in loader.epoch(0)]
        finally:
            loader.close()

    here, there = batches(0), batches(1)
    assert len(here) == len(there) == math.ceil(300 / 40)
    for (ra, la), (rb, lb) in zip(here, there):
        np.testing.assert_array_equal(ra, rb)
        np.testing.assert_array_equal(la, lb)
