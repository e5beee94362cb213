"""Caches in object storage, against a real S3-compatible server on 127.0.0.1 (moto's server mode).

The server is started by the test on a free port; the endpoint and credentials reach kdcli the standard way only
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``). The caches are
real kdcli caches (a classifier teacher, a tiny Llama teacher) uploaded with boto3, independently of the code under
test; every remote read is compared array for array with the same cache read from local disk. Each test runs the
remote path twice where it matters: small shards fetched whole, and (``WHOLE_SHARD_BYTES = 0``) every shard read
by exact byte ranges.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import remote_helpers
from remote_helpers import BUCKET, aws_env, free_port, upload
from typer.testing import CliRunner

from kdcli.cache import reader as reader_module
from kdcli.cache import storage
from kdcli.cache.fused import FusedReader
from kdcli.cache.manifest import read_manifest
from kdcli.cache.reader import CacheLoader, CacheReader
from kdcli.cache.tokens import TokenCacheReader
from kdcli.cache.verify import verify_cache
from kdcli.cli import app
from kdcli.config import CacheConfig, EvalConfig, TrainConfig, resolve
from kdcli.infra.errors import CacheError, UsageError
from kdcli.stages.cache import cache_teacher
from kdcli.stages.evaluate import evaluate
from kdcli.stages.train import train_student

pytestmark = pytest.mark.usefixtures("one_thread")
s3 = remote_helpers.s3  # the moto server fixture (module scope)


@pytest.fixture(scope="module")
def caches(s3, tmp_path_factory):
    """Local caches and their uploaded copies: classification full / topk / priority, token full / topk (gzip)."""
    d = tmp_path_factory.mktemp("remote")
    remote_helpers.blob_teacher(d)
    out = {"dir": d}
    for name, kw in {"full": {}, "topk": {"top_k": 2}, "priority": {"mode": "priority", "samples": 3}}.items():
        cache_teacher(
            CacheConfig(teacher=str(d / "teacher"), data=str(d / "blobs.npz"), out=str(d / name), shard_size=128, **kw)
        )
        out[name] = (d / name, upload(s3, d / name, f"caches/{name}"))
    from lm_helpers import make_llama, make_tokenizer, text_rows, write_jsonl

    tok = make_tokenizer(d / "tok")
    llama = make_llama(d / "llama", tok)
    text = write_jsonl(d / "text.jsonl", text_rows(24))
    out["text"] = text
    for name, kw in {"lm-full": {"mode": "full"}, "lm-topk": {"top_k": 8}}.items():
        cache_teacher(
            resolve(
                CacheConfig,
                None,
                dict(teacher=str(llama), data=str(text), out=str(d / name), max_length=32, shard_size=8, **kw),
            )
        )
        out[name] = (d / name, upload(s3, d / name, f"caches/{name}"))
    return out


def read_by(kind: str, monkeypatch) -> str:
    """How a remote shard is read: whole (the default for these tiny shards), by byte ranges with its small datasets
    (row ids, ...) whole, or every dataset by the exact byte ranges of the blocks read."""
    if kind != "whole":
        monkeypatch.setattr(storage, "WHOLE_SHARD_BYTES", 0)
        monkeypatch.setattr(storage, "MERGE_GAP", 0)  # these shards are smaller than the gap
    if kind == "ranges":
        monkeypatch.setattr(storage, "SMALL_DATASET_BYTES", 0)
        monkeypatch.setattr(reader_module, "READ_AHEAD_BYTES", 1)  # one group ahead: these groups are tiny
    return kind


@pytest.fixture(params=["whole", "datasets", "ranges"])
def every_path(request, monkeypatch):
    return read_by(request.param, monkeypatch)


@pytest.fixture(params=["whole", "ranges"])
def path_kind(request, monkeypatch):
    return read_by(request.param, monkeypatch)


def equal_arrays(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def batches(reader, batch_size: int = 50, **kw) -> list[dict]:
    return list(reader.iter_batches(batch_size=batch_size, seed=3, epoch=1, **kw))


# -- reads ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["full", "topk", "priority", "lm-full", "lm-topk"])
def test_remote_cache_reads_equal_local(caches, name, every_path):
    local, url = caches[name]
    cls = TokenCacheReader if name.startswith("lm") else CacheReader
    lr, rr = cls(local), cls(url)
    assert rr.manifest == lr.manifest == read_manifest(url) and str(rr.dir) == url
    equal_arrays(rr.read_rows(0, rr.num_rows), lr.read_rows(0, lr.num_rows))
    mid = rr.num_rows // 3
    equal_arrays(rr.read_rows(mid, mid + 7), lr.read_rows(mid, mid + 7))  # inside a shard, across a boundary
    rr.close()
    # a training epoch: the same batches in the same order (small blocks: many groups, each prefetched ahead)
    rr = cls(url)
    opts = dict(block_rows=2, batch_size=3) if name.startswith("lm") else dict(block_rows=32)
    got, want = batches(rr, shuffle_blocks=3, **opts), batches(lr, shuffle_blocks=3, **opts)
    assert len(got) == len(want) > 2
    for g, w in zip(got, want, strict=True):
        equal_arrays(g, w)
    st = rr.fetch_stats
    assert st.direct == 0  # every byte HDF5 read for a block was fetched ahead or is metadata
    assert st.held == 0  # every group's bytes were dropped once read
    if every_path == "ranges" and not name.startswith("lm"):  # (a token shard here is one HDF5 chunk)
        # two groups of 3 x 32 rows held at most (the one read, the one ahead): never the whole cache
        assert st.ahead > 0 and st.peak_held < sum(s["bytes"] for s in rr.shards) / 2
    assert lr.fetch_stats.requests == 0
    rr.close()


def test_ddp_ranks_read_disjoint_shares_equal_to_local(caches, path_kind):
    local, url = caches["topk"]
    lr, rr = CacheReader(local), CacheReader(url)
    keep = np.ones(600, bool)
    keep[::7] = False  # validation rows held out: pieces are parts of blocks
    seen = []
    for rank in range(2):
        kw = dict(block_rows=32, shuffle_blocks=4, rank=rank, world=2, keep=keep)
        assert rr.epoch_groups(seed=3, epoch=2, **{k: v for k, v in kw.items()}) == lr.epoch_groups(
            seed=3, epoch=2, **kw
        )
        got, want = batches(rr, **kw), batches(lr, **kw)
        for g, w in zip(got, want, strict=True):
            equal_arrays(g, w)
        seen.append(np.concatenate([g["row_index"] for g in got]))
    assert not set(seen[0]) & set(seen[1])  # disjoint
    assert len(seen[0]) == len(seen[1]) == keep.sum() // 2  # equal shares of the kept rows


def test_fused_teacher_reads_remote_caches_in_lock_step(caches, path_kind):
    """A fused teacher whose second cache is in the bucket: its rows are prefetched with the first cache's groups."""
    local, url = caches["full"]
    mixed = FusedReader([CacheReader(local), CacheReader(url)], (0.5, 0.5))
    plain = FusedReader([CacheReader(local), CacheReader(local)], (0.5, 0.5))
    kw = dict(block_rows=32, shuffle_blocks=3)
    for g, w in zip(batches(mixed, **kw), batches(plain, **kw), strict=True):
        equal_arrays(g, w)
    st = mixed.readers[1].fetch_stats
    assert st.ahead > 0 and st.direct == 0 and st.held == 0


def test_dataloader_workers_open_their_own_connections(caches):
    """Forked DataLoader workers read the remote cache (each its own HDF5 handles, fetch thread and S3 client)."""
    local, url = caches["full"]
    rr, lr = CacheReader(url), CacheReader(local)
    rr.read_rows(0, 10)  # the parent has used its connection before the workers fork
    remote = CacheLoader(rr, batch_size=64, seed=5, num_workers=2, block_rows=32, shuffle_blocks=2)
    plain = CacheLoader(lr, batch_size=64, seed=5, num_workers=0, block_rows=32, shuffle_blocks=2)
    for epoch in (0, 1):
        for g, w in zip(remote.epoch(epoch), plain.epoch(epoch), strict=True):
            equal_arrays(g, w)
    remote.close()


def test_train_student_and_eval_from_s3_match_local(caches):
    """train-student and eval read the bucket: the same batches, losses and metrics as from the local copy."""
    d = caches["dir"]

    def no_speed(row: dict) -> dict:
        return {k: v for k, v in row.items() if "second" not in k and "latency" not in k}

    metrics, reports = {}, {}
    for where, cache in (("local", str(caches["topk"][0])), ("s3", caches["topk"][1])):
        train_student(
            TrainConfig(
                student="mlp",
                student_args={"hidden": [8]},
                data=str(d / "blobs.npz"),
                cache=cache,
                out=str(d / f"run-{where}"),
                epochs=2,
                lr=3e-3,
                seed=1,
                batch_size=64,
                val_fraction=0.1,
            )
        )
        lines = (d / f"run-{where}" / "metrics.jsonl").read_text().splitlines()
        metrics[where] = [no_speed(json.loads(line)) for line in lines]
        rep = evaluate(
            EvalConfig(model=[str(d / f"run-{where}")], data=str(d / "blobs.npz"), cache=[cache], latency_repeats=0)
        )
        reports[where] = [no_speed(dataclasses.asdict(m)) for m in rep.models]
    assert metrics["s3"] == metrics["local"] and len(metrics["s3"]) == 2
    for m in (*reports["s3"], *reports["local"]):
        m.pop("model")
    assert reports["s3"] == reports["local"] and reports["s3"][0]["kl_to_teacher"] is not None


# -- checks --------------------------------------------------------------------------------------------------------
def test_verify_finds_and_names_a_corrupted_remote_shard(caches, s3, path_kind):
    local, _ = caches["full"]
    url = upload(s3, local, f"verify-{path_kind}")
    report = verify_cache(url)
    assert report.ok and report.rows_verified == 600 and report.cache_dir == url
    key = f"verify-{path_kind}/shard-00001.h5"
    body = bytearray(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[len(body) - 100] ^= 0x01  # one low bit of the last row's log-probs: same size, content checks pass
    s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    report = verify_cache(url)
    assert not report.ok
    assert [s.name for s in report.shards if not s.ok] == ["shard-00001.h5"]
    assert report.problems[0].startswith("shard-00001.h5: sha256 differs")
    # the CLI: the table on stdout, one error line naming the shard, exit 3
    res = CliRunner().invoke(app, ["cache", "verify", url])
    assert res.exit_code == 3, res.output
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "shard-00001.h5" in err[0] and "sha256 differs" in err[0]


def test_truncated_or_missing_remote_shard_is_refused_before_training(caches, s3):
    local, _ = caches["full"]
    url = upload(s3, local, "truncated")
    body = s3.get_object(Bucket=BUCKET, Key="truncated/shard-00002.h5")["Body"].read()
    s3.put_object(Bucket=BUCKET, Key="truncated/shard-00002.h5", Body=body[:-10])
    with pytest.raises(CacheError, match=r"shard shard-00002.h5 has \d+ bytes, the manifest says"):
        CacheReader(url)
    s3.delete_object(Bucket=BUCKET, Key="truncated/shard-00002.h5")
    with pytest.raises(CacheError, match="shard shard-00002.h5 is missing"):
        CacheReader(url)


def test_missing_bucket_or_prefix_is_cache_directory_not_found(caches):
    for url in (f"s3://no-such-bucket-{os.getpid()}/c", f"s3://{BUCKET}/no/such/prefix"):
        with pytest.raises(CacheError, match=f"^cache directory not found: {url}$"):
            CacheReader(url)
        with pytest.raises(CacheError, match="cache directory not found"):
            verify_cache(url)


def test_file_urls_read_like_local_paths(caches):
    local, _ = caches["lm-topk"]
    url = "file://" + str(local)
    r = TokenCacheReader(url)
    assert not r.location.remote and str(r.dir) == url
    equal_arrays(r.read_rows(0, r.num_rows), TokenCacheReader(local).read_rows(0, r.num_rows))
    assert verify_cache(url).ok
    with pytest.raises(CacheError, match="^cache directory not found: file:///no/such/dir$"):
        CacheReader("file:///no/such/dir")


# -- failures of the store itself: one line, exit 2, bounded time ---------------------------------------------------
def run_kdcli(*args, env: dict) -> tuple[subprocess.CompletedProcess, float]:
    """kdcli in a real subprocess (as a user runs it: nothing may hang at exit), with only ``env``'s AWS_*."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "kdcli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, "OMP_NUM_THREADS": "1", **env},
    )
    return p, time.perf_counter() - t0


def one_error_line(p: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_unreachable_endpoint_fails_fast_with_one_line(caches):
    env = aws_env(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    p, seconds = run_kdcli("cache", "verify", f"s3://{BUCKET}/caches/full", env=env)
    line = one_error_line(p)
    assert p.returncode == 2 and line.startswith("error: cannot reach the storage endpoint at http://127.0.0.1:")
    assert seconds < 20  # measured ~4 s on 2 busy cores, interpreter start-up included


def test_missing_credentials_fail_with_one_line(caches, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    storage.forget_filesystems()
    try:
        res = CliRunner().invoke(app, ["cache", "verify", f"s3://{BUCKET}/caches/full"])
        with pytest.raises(UsageError, match="^no credentials for"):
            TokenCacheReader(caches["lm-topk"][1])
    finally:
        storage.forget_filesystems()
    assert res.exit_code == 2 and res.stderr.strip().splitlines() == [
        f"error: no credentials for s3://{BUCKET}/caches/full: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
        "AWS_PROFILE) for s3://, or the store's credentials in fsspec's configuration (FSSPEC_<PROTOCOL>_<OPTION>, "
        "~/.config/fsspec)"
    ]


def test_hung_endpoint_is_given_up_after_the_probe_bound(monkeypatch):
    """A server that accepts connections and never answers: botocore would wait read_timeout x retries."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{srv.getsockname()[1]}")
        monkeypatch.setattr(storage, "PROBE_SECONDS", 1.5)
        storage.forget_filesystems()
        t0 = time.perf_counter()
        with pytest.raises(
            UsageError,
            match=r"^no answer from the storage endpoint at http://127.0.0.1:\d+ for "
            r"s3://kd-test/x within 1.5 s",
        ):
            CacheReader(f"s3://{BUCKET}/x")
        assert time.perf_counter() - t0 < 5
    storage.forget_filesystems()


def test_kdcli_defaults_sit_under_the_users_fsspec_configuration(monkeypatch):
    import fsspec.config

    opts = storage.storage_options("s3")["config_kwargs"]
    assert opts["connect_timeout"] == 5 and opts["read_timeout"] == 30
    monkeypatch.setitem(fsspec.config.conf, "s3", {"config_kwargs": {"read_timeout": 120}})
    opts = storage.storage_options("s3")["config_kwargs"]
    assert opts["read_timeout"] == 120 and opts["connect_timeout"] == 5  # the user's value wins, ours fill in
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")
    assert "retries" not in storage.storage_options("s3")["config_kwargs"]  # botocore reads AWS_MAX_ATTEMPTS itself
    assert storage.storage_options("gs") == {}


@pytest.mark.slow  # two torchrun launches (~10 s each on 2 busy cores)
def test_two_process_ddp_run_from_s3_matches_the_local_cache(caches):
    """torchrun, 2 processes (gloo): every rank reads its own share of the bucket; the run is the same as from the
    local copy of the cache (same batches on every rank, same reduced metrics)."""
    d = caches["dir"]
    runs = {}
    for where, cache in (("local", str(caches["topk"][0])), ("s3", caches["topk"][1])):
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                "-m",
                "kdcli",
                "train-student",
                "--data",
                str(d / "blobs.npz"),
                "--cache",
                cache,
                "--out",
                str(d / f"ddp-{where}"),
                "--student",
                "mlp",
                "--student-arg",
                "hidden=[8]",
                "--epochs",
                "2",
                "--batch-size",
                "32",
                "--seed",
                "1",
                "--val-fraction",
                "0.1",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert p.returncode == 0, p.stderr[-3000:]
        runs[where] = [
            {k: v for k, v in json.loads(line).items() if "second" not in k}
            for line in (d / f"ddp-{where}" / "metrics.jsonl").read_text().splitlines()
        ]
    assert runs["s3"] == runs["local"] and [m["rows"] for m in runs["s3"]] == [540, 540]
