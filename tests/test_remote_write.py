"""cache-teacher --out s3://...: each shard put whole (one PUT: an object is whole or absent), the manifest after
every shard and last, one writer at a time (a conditional-create ``.lock`` object); the same cache as a local run,
byte for byte. Against a moto S3 server on 127.0.0.1 (tests/remote_helpers.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import remote_helpers
from remote_helpers import BUCKET, objects

from kdcli.cache.reader import CacheReader
from kdcli.cache.verify import verify_cache
from kdcli.config import CacheConfig
from kdcli.infra.errors import CacheError
from kdcli.stages.cache import cache_teacher

pytestmark = pytest.mark.usefixtures("one_thread")
s3 = remote_helpers.s3  # the moto server fixture (module scope)


@pytest.fixture(scope="module")
def setup(s3, tmp_path_factory):
    d = tmp_path_factory.mktemp("write")
    remote_helpers.blob_teacher(d)
    local = d / "local"
    cache_teacher(
        CacheConfig(
            teacher=str(d / "teacher"),
            data=str(d / "blobs.npz"),
            out=str(local),
            shard_size=128,
            mode="sample",
            samples=6,
            seed=2,
        )
    )
    return d, local


def config(d, out: str, **kw) -> CacheConfig:
    return CacheConfig(
        teacher=str(d / "teacher"),
        data=str(d / "blobs.npz"),
        out=out,
        shard_size=128,
        mode="sample",
        samples=6,
        seed=2,
        **kw,
    )


def shard_digests(files: dict[str, bytes]) -> dict[str, bytes]:
    return {n: b for n, b in files.items() if n.startswith("shard-")}


def test_remote_cache_is_the_local_cache_byte_for_byte(setup, s3):
    d, local = setup
    url = f"s3://{BUCKET}/written"
    s = cache_teacher(config(d, url))
    assert s.status == "written" and s.num_shards == 5
    got = objects(s3, "written")
    assert sorted(got) == sorted(p.name for p in local.iterdir())  # shards + manifest; the .lock object is gone
    assert shard_digests(got) == {p.name: p.read_bytes() for p in local.glob("shard-*.h5")}
    assert verify_cache(url).ok
    assert cache_teacher(config(d, url)).status == "up-to-date"  # the same command again: nothing to do
    r = CacheReader(url)
    np.testing.assert_array_equal(r.read_rows(0, 600)["sample_ids"], CacheReader(local).read_rows(0, 600)["sample_ids"])


def run_cache_teacher(d, out: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "kdcli",
            "cache-teacher",
            "--teacher",
            str(d / "teacher"),
            "--data",
            str(d / "blobs.npz"),
            "--out",
            out,
            "--shard-size",
            "128",
            "--mode",
            "sample",
            "--samples",
            "6",
            "--seed",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )


@pytest.mark.parametrize("point", ["shard-partial:3", "shard-renamed:3"])
def test_killed_writer_leaves_whole_shards_and_resumes(setup, s3, point):
    """SIGKILL before the third shard's PUT completes / after it, before the manifest lists it: the bucket holds
    only whole shards and a manifest listing whole shards; the stale lock names itself; the re-run resumes."""
    d, local = setup
    prefix = f"killed-{point.split(':')[0]}"
    url = f"s3://{BUCKET}/{prefix}"
    p = run_cache_teacher(d, url, {"KDCLI_TEST_KILL_AT": point})
    assert p.returncode == -9, p.stderr
    left = objects(s3, prefix)
    want = {p.name: p.read_bytes() for p in local.glob("shard-*.h5")}
    for name, body in shard_digests(left).items():
        assert body == want[name]  # every shard at its final name is whole
    m = json.loads(left["manifest.json"])
    assert m["complete"] is False and [s["name"] for s in m["shards"]] == ["shard-00000.h5", "shard-00001.h5"]
    assert ".lock" in left  # nothing releases a remote lock when its writer is killed
    with pytest.raises(
        CacheError,
        match=rf"is being written by \S+:\d+ since .*; if no cache-teacher is writing "
        rf"it, delete s3://{BUCKET}/{prefix}/.lock and re-run",
    ):
        cache_teacher(config(d, url))
    s3.delete_object(Bucket=BUCKET, Key=f"{prefix}/.lock")
    s = cache_teacher(config(d, url))
    assert s.status == "resumed"
    assert shard_digests(objects(s3, prefix)) == want and verify_cache(url).ok


def test_a_different_remote_cache_is_refused_never_deleted(setup, s3):
    """--overwrite builds a local replacement beside the old cache and swaps it in with one rename; a prefix is many
    objects, so in object storage a different cache is refused (exit 3) and left as it is."""
    d, _ = setup
    url = f"s3://{BUCKET}/other"
    cache_teacher(config(d, url))
    before = objects(s3, "other")
    for overwrite in (False, True):
        with pytest.raises(CacheError, match="holds a different cache .*delete its objects first"):
            cache_teacher(
                CacheConfig(
                    teacher=str(d / "teacher"), data=str(d / "blobs.npz"), out=url, shard_size=256, overwrite=overwrite
                )
            )
    assert objects(s3, "other") == before and verify_cache(url).ok  # untouched, lock released
