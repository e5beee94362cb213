"""Lossless shard compression (--compression auto|gzip|lzf|none): same arrays bit for bit, smaller token caches,
what auto picks, what the manifest records, and re-runs / resumes that ask for a different setting."""

import json

import h5py
import numpy as np
import pytest
from conftest import make_blobs
from lm_helpers import make_llama, make_tokenizer, text_rows, write_jsonl
from typer.testing import CliRunner

from kdcli.cache.reader import CacheReader
from kdcli.cache.tokens import TokenCacheReader
from kdcli.cache.verify import verify_cache
from kdcli.cache.writer import CHUNK_BYTES, MIN_COMPRESS_BYTES, resolve_compression, shard_image
from kdcli.cli import app
from kdcli.config import CacheConfig, resolve
from kdcli.models.weights import sha256_file
from kdcli.stages.cache import cache_teacher

runner = CliRunner()


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bytes of an array, so -inf, -0.0 and NaN payloads compare exactly."""
    return np.ascontiguousarray(a).view(np.uint8)


def assert_same_arrays(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(bits(a[k]), bits(b[k]), err_msg=k)


def shard_datasets(path) -> dict:
    with h5py.File(path) as f:
        return {k: (f[k].compression, f[k].shuffle, f[k].chunks) for k in f}


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    teacher = make_llama(root / "teacher", make_tokenizer(root / "tok"))
    return {"teacher": teacher, "text": write_jsonl(root / "text.jsonl", text_rows(24))}


def lm_cache(lm, out, **kw):
    # top-64 over a 300-token vocabulary, 12 sequences a shard: the token arrays pass MIN_COMPRESS_BYTES
    args = dict(teacher=str(lm["teacher"]), data=str(lm["text"]), out=str(out), max_length=32, shard_size=12, **kw)
    return cache_teacher(resolve(CacheConfig, None, args))


def test_shard_image_round_trips_bit_for_bit_with_bounded_chunks(tmp_path):
    rng = np.random.default_rng(0)
    lp = np.log(rng.dirichlet(np.ones(64), size=3000)).astype(np.float16)
    lp[0, :3] = [-np.inf, -0.0, np.float16(-6e-8)]  # -inf, a signed zero, a subnormal
    arrays = {
        "row_index": np.arange(40, dtype=np.int64),  # 320 B: below MIN_COMPRESS_BYTES
        "topk_ids": rng.integers(0, 49152, size=(3000, 64)).astype(np.uint16),
        "topk_logprobs": lp,
        "tail_logmass": lp[:, -1].copy(),
        "wide": rng.normal(size=(4, 40000)).astype(np.float32),  # a row bigger than a chunk
        "empty": np.zeros((0, 8), np.float16),
    }
    plain = shard_image(arrays, {"row_start": 0})
    for name in ("gzip", "lzf"):
        spec = resolve_compression(name, token=False, mode="full")
        image = shard_image(arrays, {"row_start": 0}, spec)
        (tmp_path / f"{name}.h5").write_bytes(image)
        with h5py.File(tmp_path / f"{name}.h5") as f:
            assert_same_arrays(arrays, {k: f[k][()] for k in f})
            np.testing.assert_array_equal(bits(f["topk_logprobs"][1000:1234]), bits(lp[1000:1234]))
            assert f.attrs["row_start"] == 0
            for k, a in arrays.items():
                d = f[k]
                if a.nbytes < MIN_COMPRESS_BYTES:
                    assert d.compression is None and d.chunks is None, k
                    continue
                assert d.compression == name and d.shuffle and d.chunks[1:] == a.shape[1:], k
                chunk = d.chunks[0] * a[:1].nbytes
                assert d.chunks[0] == 1 if a[:1].nbytes > CHUNK_BYTES else CHUNK_BYTES // 2 < chunk <= CHUNK_BYTES, k
            if name == "gzip":
                assert f["topk_ids"].compression_opts == 4
        assert len(image) < len(plain)  # the float16 log-probs and the row-sorted ids shrink


def test_auto_is_gzip_for_token_topk_and_sample_only():
    for mode in ("topk", "sample"):
        assert resolve_compression("auto", token=True, mode=mode)["filter"] == "gzip"
    assert resolve_compression("auto", token=True, mode="full") is None
    for mode in ("full", "topk", "sample"):
        assert resolve_compression("auto", token=False, mode=mode) is None
        assert resolve_compression("none", token=True, mode=mode) is None
        assert resolve_compression("lzf", token=False, mode=mode)["filter"] == "lzf"  # explicit: any cache
    assert resolve_compression("gzip", token=False, mode="full") == {
        "filter": "gzip",
        "level": 4,
        "shuffle": True,
        "chunk_bytes": CHUNK_BYTES,
        "min_bytes": MIN_COMPRESS_BYTES,
    }


@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_lm_cache_auto_gzip_is_smaller_identical_and_verifies(lm, tmp_path, mode):
    kw = {"top_k": 64} if mode == "topk" else {"mode": "sample", "samples": 32}
    auto = lm_cache(lm, tmp_path / "auto", **kw)
    plain = lm_cache(lm, tmp_path / "plain", compression="none", **kw)
    lzf = lm_cache(lm, tmp_path / "lzf", compression="lzf", **kw)
    assert (auto.compression, plain.compression, lzf.compression) == ("gzip-4+shuffle", "none", "lzf+shuffle")
    assert auto.bytes < lzf.bytes < plain.bytes
    ma, mp = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("auto", "plain"))
    assert ma["compression"] == resolve_compression("gzip", token=True, mode=mode) and mp["compression"] is None
    # the compression is recorded beside the layout and nowhere in the cache's identity
    for key in ("teacher", "data", "tokenizer", "settings", "num_rows", "shard_size"):
        assert ma[key] == mp[key], key
    token_array = "topk_ids" if mode == "topk" else "sample_ids"
    datasets = shard_datasets(tmp_path / "auto" / ma["shards"][0]["name"])
    assert datasets[token_array][:2] == ("gzip", True) and datasets["row_index"] == (None, False, None)
    assert shard_datasets(tmp_path / "plain" / mp["shards"][0]["name"])[token_array] == (None, False, None)
    n = auto.num_rows
    ref = TokenCacheReader(tmp_path / "plain").read_rows(0, n)
    for d in ("auto", "lzf"):
        r = TokenCacheReader(tmp_path / d)
        assert_same_arrays(ref, r.read_rows(0, n))
        assert_same_arrays(TokenCacheReader(tmp_path / "plain").read_rows(5, 17), r.read_rows(5, 17))
        batches = list(r.iter_batches(batch_size=5, seed=3, epoch=1))
        expect = list(TokenCacheReader(tmp_path / "plain").iter_batches(batch_size=5, seed=3, epoch=1))
        for got, want in zip(batches, expect, strict=True):
            assert_same_arrays(want, got)
        report = verify_cache(tmp_path / d)  # re-hashes every shard, re-reads every array
        assert report.ok and report.rows_verified == n, report.problems


def test_classification_default_is_uncompressed_and_explicit_gzip_applies(tmp_path, teacher_run):
    x, y = make_blobs(n=3000)  # 3000 rows x 4 classes fp16 = 24 KB of log-probs: over MIN_COMPRESS_BYTES
    np.savez(tmp_path / "big.npz", x=x, y=y)
    common = dict(teacher=str(teacher_run), data=str(tmp_path / "big.npz"))
    plain = cache_teacher(CacheConfig(**common, out=str(tmp_path / "plain")))
    gz = cache_teacher(CacheConfig(**common, out=str(tmp_path / "gz"), compression="gzip"))
    assert plain.compression == "none" and gz.compression == "gzip-4+shuffle" and gz.bytes < plain.bytes
    assert json.loads((tmp_path / "plain" / "manifest.json").read_text())["compression"] is None
    assert shard_datasets(tmp_path / "plain" / "shard-00000.h5")["logprobs"] == (None, False, None)
    assert shard_datasets(tmp_path / "gz" / "shard-00000.h5")["logprobs"][:2] == ("gzip", True)
    assert_same_arrays(
        CacheReader(tmp_path / "plain").read_rows(0, 3000), CacheReader(tmp_path / "gz").read_rows(0, 3000)
    )
    assert verify_cache(tmp_path / "gz", str(tmp_path / "big.npz")).ok


def test_a_different_compression_reuses_resumes_or_with_overwrite_rewrites(lm, tmp_path, capsys):
    d = tmp_path / "c"
    first = lm_cache(lm, d, top_k=64)
    m = json.loads((d / "manifest.json").read_text())
    assert len(m["shards"]) >= 2 and first.compression == "gzip-4+shuffle"
    digests = {s["name"]: sha256_file(d / s["name"]) for s in m["shards"]}
    before = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    capsys.readouterr()
    # a complete identical cache: still a no-op, stored as it was, and it says so
    again = lm_cache(lm, d, top_k=64, compression="none")
    assert again.status == "up-to-date" and again.compression == "gzip-4+shuffle"
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == before
    assert "stored with compression gzip-4+shuffle" in capsys.readouterr().err
    # an interrupted cache resumes with the compression it was started with: every shard alike, same bytes
    last = m["shards"].pop()
    (d / last["name"]).unlink()
    m["complete"] = False
    (d / "manifest.json").write_text(json.dumps(m))
    resumed = lm_cache(lm, d, top_k=64, compression="lzf")
    assert resumed.status == "resumed" and resumed.bytes == first.bytes
    assert shard_datasets(d / last["name"])["topk_ids"][0] == "gzip"
    assert sha256_file(d / last["name"]) == digests[last["name"]]
    assert json.loads((d / "manifest.json").read_text())["compression"]["filter"] == "gzip"
    assert verify_cache(d).ok
    # --overwrite re-writes it with the requested setting; the arrays are the same
    ref = TokenCacheReader(d).read_rows(0, first.num_rows)
    redone = lm_cache(lm, d, top_k=64, compression="none", overwrite=True)
    assert redone.status == "written" and redone.compression == "none" and redone.bytes > first.bytes
    assert json.loads((d / "manifest.json").read_text())["compression"] is None
    assert sorted(p.name for p in d.glob("shard-*")) == sorted(digests)
    assert_same_arrays(ref, TokenCacheReader(d).read_rows(0, first.num_rows))
    assert lm_cache(lm, d, top_k=64, compression="none").status == "up-to-date"


def test_compression_is_a_flag_and_a_yaml_key(tmp_path):
    r = runner.invoke(app, ["cache-teacher", "--help"], terminal_width=200)
    assert r.exit_code == 0 and "--compression" in r.output and "lzf" in r.output
    (tmp_path / "c.yaml").write_text("compression: lzf\n")
    cfg = resolve(CacheConfig, tmp_path / "c.yaml", {"teacher": "t", "data": "d", "out": "o"})
    assert cfg.compression == "lzf"
    assert (
        resolve(
            CacheConfig, tmp_path / "c.yaml", {"teacher": "t", "data": "d", "out": "o", "compression": "gzip"}
        ).compression
        == "gzip"
    )
    assert resolve(CacheConfig, None, {"teacher": "t", "data": "d", "out": "o"}).compression == "auto"
    r = runner.invoke(
        app, ["cache-teacher", "--teacher", "t", "--data", "d", "--out", str(tmp_path / "o"), "--compression", "zip"]
    )
    assert r.exit_code == 2 and "compression" in r.stderr and not (tmp_path / "o").exists()
