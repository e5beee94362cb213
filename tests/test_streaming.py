"""The scale-out machinery in one process: rank shares of an epoch, DataLoader workers, the bounded writer queue,
the deferred host copy, canonical teacher batches, and resuming from the shards of an interrupted torchrun."""

import json
import threading
import time

import numpy as np
import pytest
import torch

from kdcli.cache.manifest import (
    contiguous_runs,
    merge_rank_manifests,
    missing_shards,
    rank_manifest_name,
    read_manifest,
    split_contiguous,
    write_manifest,
)
from kdcli.cache.reader import CacheLoader, CacheReader
from kdcli.cache.reduce import HostCopy, reduce_logits, storage_arrays, to_host
from kdcli.cache.writer import ShardWriter
from kdcli.config import CacheConfig
from kdcli.infra.distributed import Dist, env_world
from kdcli.infra.errors import CacheError, UsageError
from kdcli.stages.cache import batch_ranges, cache_teacher

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread, for every test here


@pytest.fixture
def cache(tmp_path, teacher_run, blobs_npz):
    cache_teacher(
        CacheConfig(
            teacher=str(teacher_run), data=str(blobs_npz), out=str(tmp_path / "c"), shard_size=128, batch_size=50
        )
    )
    return CacheReader(tmp_path / "c")


def rows_of(batches) -> np.ndarray:
    return np.concatenate([b["row_index"] for b in batches])


@pytest.mark.parametrize("with_val", [False, True])
def test_rank_shares_are_disjoint_equal_and_cover_the_epoch(cache, with_val):
    keep = None
    if with_val:
        keep = np.ones(600, dtype=bool)
        keep[np.random.default_rng(0).permutation(600)[:61]] = False  # 539 kept rows: not divisible by 2 or 3
    total = 600 if keep is None else int(keep.sum())
    whole = rows_of(cache.iter_batches(batch_size=32, seed=5, epoch=2, keep=keep, block_rows=40))
    assert len(whole) == total and len(set(whole)) == total  # one process: every kept row exactly once
    for world in (2, 3):
        shares = [
            rows_of(cache.iter_batches(batch_size=32, seed=5, epoch=2, keep=keep, block_rows=40, rank=r, world=world))
            for r in range(world)
        ]
        union = np.concatenate(shares)
        assert {len(s) for s in shares} == {total // world}  # equal: every rank takes the same number of steps
        assert len(set(union)) == len(union) and total - len(union) < world  # disjoint; < world rows sit out
        if keep is not None:
            assert keep[union % 600].all()  # held-out samples never appear
        again = rows_of(
            cache.iter_batches(batch_size=32, seed=5, epoch=2, keep=keep, block_rows=40, rank=1, world=world)
        )
        np.testing.assert_array_equal(again, shares[1])  # a pure function of (seed, epoch, rank, world)
    other = rows_of(cache.iter_batches(batch_size=32, seed=5, epoch=3, keep=keep, block_rows=40))
    assert not np.array_equal(other, whole)  # each epoch its own order


def test_block_rows_gives_caches_of_every_mode_the_same_batches(tmp_path, teacher_run, blobs_npz, monkeypatch):
    """train-student --block-rows N: the read blocks (so the batches) are the same for every cache mode; without it
    the block size follows each mode's bytes per row. benchmarks/bench_lm.py relies on this to compare modes."""
    import kdcli.stages.train
    from kdcli.config import TrainConfig
    from kdcli.stages.train import train_student

    readers = {}
    for mode, extra in (("full", {}), ("sample", {"mode": "sample", "samples": 600})):
        cache_teacher(
            CacheConfig(
                teacher=str(teacher_run), data=str(blobs_npz), out=str(tmp_path / mode), shard_size=256, **extra
            )
        )
        readers[mode] = CacheReader(tmp_path / mode)
    # 600 draws: ~3.6 KiB a row (~145 rows a block) against ~40 B (a whole 256-row shard): the automatic blocks differ
    assert readers["full"].default_block_rows() != readers["sample"].default_block_rows()

    def order(reader, block_rows):
        loader = CacheLoader(reader, batch_size=32, seed=4, block_rows=block_rows)
        return [b["sample_index"] for b in loader.epoch(1)]

    fixed = {m: order(r, 40) for m, r in readers.items()}
    assert all(np.array_equal(a, b) for a, b in zip(fixed["full"], fixed["sample"], strict=True))
    auto = {m: np.concatenate(order(r, None)) for m, r in readers.items()}
    assert not np.array_equal(auto["full"], auto["sample"])

    seen = []  # train-student hands --block-rows to the loader (0: auto)
    real = kdcli.stages.train.CacheLoader
    monkeypatch.setattr(
        kdcli.stages.train, "CacheLoader", lambda *a, **kw: seen.append(kw["block_rows"]) or real(*a, **kw)
    )
    for n in (40, 0):
        train_student(
            TrainConfig(
                student="mlp",
                student_args={"hidden": [8]},
                data=str(blobs_npz),
                cache=str(tmp_path / "sample"),
                out=str(tmp_path / f"run{n}"),
                epochs=1,
                block_rows=n,
            )
        )
    assert seen == [40, None]


def test_loader_workers_give_the_same_batches_every_epoch(cache):
    keep = np.ones(600, dtype=bool)
    keep[::7] = False
    opts = dict(batch_size=32, seed=1, keep=keep, rank=1, world=2, block_rows=40, shuffle_blocks=2)
    plain = CacheLoader(cache, num_workers=0, **opts)
    workers = CacheLoader(cache, num_workers=2, **opts)  # persistent workers: the epoch reaches them via shm
    assert not cache._files  # the parent holds no HDF5 handle when workers start
    for epoch in (0, 1, 2):
        a, b = list(plain.epoch(epoch)), list(workers.epoch(epoch))
        assert len(a) == len(b) == -(-int(keep.sum()) // 2 // 32)
        for x, y in zip(a, b):
            assert set(x) == set(y)
            for k in x:
                assert x[k].dtype == y[k].dtype
                np.testing.assert_array_equal(x[k], y[k])
    # resuming mid-epoch skips exactly the batches already trained on
    skipped = list(workers.epoch(1, skip_batches=3))
    np.testing.assert_array_equal(rows_of(skipped), rows_of(list(plain.epoch(1))[3:]))
    workers.close()


def test_writer_queue_is_bounded_and_the_producer_waits(tmp_path):
    """A slow disk: the teacher blocks once ``queue_shards`` shards wait, so memory holds a bounded number."""
    manifest = {"num_rows": 10 * 64, "shards": [], "complete": False}
    gate = threading.Event()
    written: list[int] = []
    w = ShardWriter(tmp_path, manifest, shard_size=64, threaded=True, queue_shards=2, check_values=False)
    real = w._write

    def slow_write(index, arrays):
        gate.wait()
        written.append(index)
        real(index, arrays)

    w._write = slow_write
    added = []

    def produce():
        for i in range(10):
            rows = np.arange(i * 64, (i + 1) * 64)
            w.add({"row_index": rows, "values": rows.astype(np.float32)})
            added.append(i)

    t = threading.Thread(target=produce)
    t.start()
    time.sleep(0.5)
    # shard 0 is being written (held at the gate), 2 wait in the queue, the producer blocks handing over the 4th
    assert len(added) == 3 and w._queue.qsize() == 2 and not written
    gate.set()
    t.join(10)
    w.close()
    assert added == list(range(10)) and written == list(range(10))
    assert [s["row_start"] for s in json.loads((tmp_path / "manifest.json").read_text())["shards"]] == list(
        range(0, 640, 64)
    )


def test_host_copy_on_cpu_is_the_same_path_and_result():
    logits = torch.randn(7, 30)
    for mode in ("full", "topk", "sample"):
        g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        direct = to_host(reduce_logits(logits, mode, top_k=3, samples=5, generator=g1), 30)
        copy = HostCopy(reduce_logits(logits, mode, top_k=3, samples=5, generator=g2))
        assert copy.ready()
        deferred = storage_arrays(copy.wait(), 30)
        assert set(direct) == set(deferred)
        for k in direct:
            assert direct[k].dtype == deferred[k].dtype
            np.testing.assert_array_equal(direct[k], deferred[k])


def test_sample_mode_survives_nan_rows_until_they_are_refused():
    logits = torch.randn(4, 10)
    logits[2, 3] = float("nan")
    out = reduce_logits(logits, "sample", samples=6, generator=torch.Generator().manual_seed(0))
    assert out["sample_counts"].sum(dim=1).tolist() == [6] * 4  # no multinomial failure (a CUDA device assert)


@pytest.mark.parametrize("bad_row", [60, 599])  # a middle batch, and the last batch (flushed after the loop)
def test_nan_logits_found_after_the_deferred_copy_write_nothing_for_that_shard(tmp_path, blobs_npz, bad_row):
    src = tmp_path / "nan_teacher.py"
    src.write_text(f"""
import torch
from torch import nn

class T(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.lin = nn.Linear(8, num_classes)

    def forward(self, x):
        out = self.lin(x)
        hit = (x[:, 0] == {float(np.load(blobs_npz)["x"][bad_row, 0])!r})
        return torch.where(hit[:, None], torch.full_like(out, float("nan")), out)

def make(num_classes):
    return T(num_classes)
""")
    torch.save({"lin.weight": torch.randn(4, 8), "lin.bias": torch.zeros(4)}, tmp_path / "w.pt")
    with pytest.raises(UsageError, match=f"NaN/inf logits at row {bad_row} "):
        cache_teacher(
            CacheConfig(
                teacher=f"{src}:make",
                teacher_weights=str(tmp_path / "w.pt"),
                data=str(blobs_npz),
                out=str(tmp_path / "c"),
                shard_size=128,
                batch_size=50,
            )
        )
    c = tmp_path / "c"
    assert all(int(f.name[6:11]) < bad_row // 128 for f in c.glob("shard-*"))  # only whole shards before it
    if (c / "manifest.json").exists():
        assert read_manifest(c, require_complete=False)["complete"] is False


def test_teacher_batches_never_cross_shards_and_cover_the_range():
    got = list(batch_ranges(256, 600, 50, 128))
    assert got[0] == (256, 306) and got[2] == (356, 384) and got[3] == (384, 434)  # restart at each shard
    assert all(a // 128 == (b - 1) // 128 and b - a <= 50 for a, b in got)
    assert [a for a, _ in got[1:]] == [b for _, b in got[:-1]] and got[-1][1] == 600


def test_resumed_sample_cache_is_identical_to_an_uninterrupted_one(tmp_path, teacher_run, blobs_npz):
    """Sample mode seeds draws per batch: a run resumed at a shard boundary must batch rows as a fresh run did."""
    opts = dict(teacher=str(teacher_run), data=str(blobs_npz), mode="sample", samples=8, shard_size=128, batch_size=50)
    cache_teacher(CacheConfig(out=str(tmp_path / "ref"), **opts))
    cache_teacher(CacheConfig(out=str(tmp_path / "c"), **opts))
    m = read_manifest(tmp_path / "c")
    for s in m["shards"][2:]:
        (tmp_path / "c" / s["name"]).unlink()
    m["shards"], m["complete"] = m["shards"][:2], False
    write_manifest(tmp_path / "c", m)
    assert cache_teacher(CacheConfig(out=str(tmp_path / "c"), **opts)).rows_skipped == 256
    a, b = CacheReader(tmp_path / "ref").read_rows(0, 600), CacheReader(tmp_path / "c").read_rows(0, 600)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_resume_collects_rank_manifests_and_fills_the_gaps(tmp_path, teacher_run, blobs_npz):
    """The state a killed 2-process run leaves: manifest.json with the plan only, each rank's shards listed in its
    own manifest, gaps where a rank stopped. One process resumes: it keeps every whole shard, computes the gaps."""
    opts = dict(teacher=str(teacher_run), data=str(blobs_npz), shard_size=128, batch_size=50)
    cache_teacher(CacheConfig(out=str(tmp_path / "ref"), **opts))
    c = tmp_path / "c"
    cache_teacher(CacheConfig(out=str(c), **opts))
    m = read_manifest(c)
    shards = {s["name"]: s for s in m["shards"]}
    (c / "shard-00001.h5").unlink()  # rank 0 (shards 0-1) stopped after shard 0
    (c / "shard-00004.h5").unlink()  # rank 1 (shards 2-4) stopped after shard 3
    write_manifest(c, {**m, "shards": [], "complete": False})
    write_manifest(c, {**m, "shards": [shards["shard-00000.h5"]], "complete": False}, rank_manifest_name(0))
    write_manifest(
        c,
        {**m, "shards": [shards["shard-00002.h5"], shards["shard-00003.h5"]], "complete": False},
        rank_manifest_name(1),
    )
    with pytest.raises(CacheError, match="incomplete"):
        CacheReader(c)
    stamp = {n: (c / n).stat().st_mtime_ns for n in ("shard-00000.h5", "shard-00002.h5", "shard-00003.h5")}
    s = cache_teacher(CacheConfig(out=str(c), **opts))
    assert s.status == "resumed" and s.rows_skipped == 128 * 3 and s.rows_computed == 128 + 88
    assert {n: (c / n).stat().st_mtime_ns for n in stamp} == stamp  # whole shards were kept, not recomputed
    assert sorted(p.name for p in c.iterdir()) == ["manifest.json"] + [f"shard-{i:05d}.h5" for i in range(5)]
    a, b = CacheReader(tmp_path / "ref").read_rows(0, 600), CacheReader(c).read_rows(0, 600)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_shard_plan_helpers():
    m = {"shard_size": 10, "num_rows": 45, "shards": [{"row_start": 0}, {"row_start": 20}]}
    assert missing_shards(m) == [1, 3, 4]
    todo = list(range(7))
    parts = [split_contiguous(todo, r, 3) for r in range(3)]
    assert parts == [[0, 1], [2, 3], [4, 5, 6]] and split_contiguous([1], 1, 2) == [1]
    assert contiguous_runs([1, 3, 4, 5, 9]) == [(1, 2), (3, 6), (9, 10)] and contiguous_runs([]) == []


def test_merge_ignores_rank_manifests_of_another_cache(tmp_path):
    base = {
        "format": "kdcli-cache",
        "format_version": 1,
        "teacher": {"weights_sha256": "a"},
        "data": {"num_samples": 5, "fingerprint": "f"},
        "tokenizer": None,
        "settings": {"top_k": None},
        "mode": "full",
        "num_classes": 3,
        "num_rows": 5,
        "shards": [],
        "complete": False,
    }
    write_manifest(tmp_path, base)
    foreign = {**base, "settings": {"top_k": 2}, "shards": [{"name": "shard-00000.h5", "row_start": 0}]}
    write_manifest(tmp_path, foreign, rank_manifest_name(1))
    assert merge_rank_manifests(tmp_path) == 0
    assert read_manifest(tmp_path, require_complete=False)["shards"] == []
    assert not list(tmp_path.glob("manifest.rank-*"))


def test_one_process_without_torchrun(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert env_world() == (0, 1, 0)
    d = Dist()
    assert not d.enabled and d.is_main and d.all_reduce([1, 2.5]) == [1.0, 2.5] and d.broadcast({"a": 1}) == {"a": 1}
    assert d.on_main(lambda: 7) == 7 and d.agree(lambda: 8) == 8
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(UsageError, match="torchrun"):
        env_world()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert env_world() == (1, 2, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cache_matches_cpu_cache(tmp_path, teacher_run, blobs_npz):
    """On a GPU the reduction runs on the device and only reduced tensors come back (pinned, non-blocking)."""
    opts = dict(teacher=str(teacher_run), data=str(blobs_npz), top_k=2, shard_size=128, batch_size=50)
    cache_teacher(CacheConfig(out=str(tmp_path / "cpu"), device="cpu", **opts))
    cache_teacher(CacheConfig(out=str(tmp_path / "gpu"), device="cuda", **opts))
    a, b = CacheReader(tmp_path / "cpu").read_rows(0, 600), CacheReader(tmp_path / "gpu").read_rows(0, 600)
    np.testing.assert_array_equal(a["row_index"], b["row_index"])
    assert (a["topk_ids"] == b["topk_ids"]).mean() > 0.99
    np.testing.assert_allclose(a["topk_logprobs"].astype(np.float32), b["topk_logprobs"].astype(np.float32), atol=2e-2)


def test_batches_of_equals_slicing_the_concatenated_stream():
    from kdcli.cache.reader import batches_of

    rng = np.random.default_rng(0)
    sizes = [0, 5, 37, 1, 64, 3, 100, 0, 31]
    bufs, start = [], 0
    for n in sizes:
        bufs.append({"row_index": np.arange(start, start + n), "x": rng.random((n, 3))})
        start += n
    whole = {k: np.concatenate([b[k] for b in bufs]) for k in ("row_index", "x")}
    for bs in (1, 7, 32, 500):
        for skip in (0, 2):
            got = list(batches_of(iter(bufs), bs, skip))
            want = [{k: v[a : a + bs] for k, v in whole.items()} for a in range(0, start, bs)][skip:]
            assert len(got) == len(want)
            for g, w in zip(got, want):
                for k in w:
                    np.testing.assert_array_equal(g[k], w[k])


def test_train_student_with_dataloader_workers_ends_with_the_same_weights(cache, tmp_path, blobs_npz):
    from safetensors.torch import load_file

    from kdcli.config import TrainConfig
    from kdcli.stages.train import train_student

    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        train_student(
            TrainConfig(
                student="mlp",
                student_args={"hidden": [16]},
                data=str(blobs_npz),
                cache=str(cache.dir),
                out=str(out),
                epochs=2,
                batch_size=64,
                val_fraction=0.1,
                num_workers=workers,
            )
        )
        runs[workers] = load_file(out / "model.safetensors")
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[2][k]), k
