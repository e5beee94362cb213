"""Cache round trip, shard boundaries, atomic publish, resume, views, reuse/refusal."""

import json

import h5py
import numpy as np
import pytest
import torch

from kdcli.cache.manifest import read_manifest
from kdcli.cache.reader import CacheReader
from kdcli.config import CacheConfig
from kdcli.data import load_data
from kdcli.infra.errors import CacheError, UsageError
from kdcli.models.classifiers import load_run_model
from kdcli.models.weights import sha256_file
from kdcli.stages.cache import cache_teacher


def teacher_logprobs(run_dir, x):
    model, _ = load_run_model(run_dir)
    model.eval()
    with torch.no_grad():
        return torch.log_softmax(model(x).float(), -1)


def make_cache(teacher_run, blobs_npz, out, **kw):
    cfg = CacheConfig(teacher=str(teacher_run), data=str(blobs_npz), out=str(out), **{"shard_size": 128, **kw})
    return cache_teacher(cfg)


def test_full_round_trip_across_shards(tmp_path, teacher_run, blobs_npz):
    s = make_cache(teacher_run, blobs_npz, tmp_path / "c", batch_size=50)  # batches straddle shard edges
    assert s.status == "written" and s.num_rows == 600 and s.num_shards == 5
    r = CacheReader(tmp_path / "c")
    data = load_data(str(blobs_npz))
    rows = r.read_rows(0, 600)
    expected = teacher_logprobs(teacher_run, data.x).numpy()
    assert rows["logprobs"].dtype == np.float16
    np.testing.assert_allclose(rows["logprobs"].astype(np.float32), expected, atol=1e-2, rtol=1e-3)
    np.testing.assert_array_equal(rows["row_index"], np.arange(600))
    np.testing.assert_array_equal(rows["sample_index"], np.arange(600))
    np.testing.assert_array_equal(rows["row_hash"], data.row_hash)
    # a read that spans a shard boundary returns the same rows as the whole read
    part = r.read_rows(100, 300)
    np.testing.assert_array_equal(part["logprobs"], rows["logprobs"][100:300])
    # each shard records its global row range and the manifest its checksum
    m = read_manifest(tmp_path / "c")
    assert [(sh["row_start"], sh["row_stop"]) for sh in m["shards"]] == [
        (0, 128),
        (128, 256),
        (256, 384),
        (384, 512),
        (512, 600),
    ]
    for sh in m["shards"]:
        assert sha256_file(tmp_path / "c" / sh["name"]) == sh["sha256"]
        with h5py.File(tmp_path / "c" / sh["name"]) as f:
            np.testing.assert_array_equal(f["row_index"][()], np.arange(sh["row_start"], sh["row_stop"]))
    assert not list((tmp_path / "c").glob("*.partial")) and not (tmp_path / "c" / ".lock").exists()
    assert m["complete"] is True and list(m)[-1] == "complete"
    assert m["teacher"]["weights_sha256"] == sha256_file(teacher_run / "model.safetensors")
    assert m["data"]["fingerprint"] == data.fingerprint


def test_topk_round_trip(tmp_path, teacher_run, blobs_npz):
    make_cache(teacher_run, blobs_npz, tmp_path / "c", top_k=2)
    rows = CacheReader(tmp_path / "c").read_rows(0, 600)
    lp = teacher_logprobs(teacher_run, load_data(str(blobs_npz)).x)
    vals, ids = torch.topk(lp, 2, dim=-1)
    assert rows["topk_ids"].dtype == np.uint16
    np.testing.assert_array_equal(rows["topk_ids"], ids.numpy())
    np.testing.assert_allclose(rows["topk_logprobs"].astype(np.float32), vals.numpy(), atol=1e-2)
    tail = torch.log1p(-vals.exp().sum(-1).clamp(max=1 - 1e-7))
    np.testing.assert_allclose(rows["tail_logmass"], tail.numpy(), atol=1e-3)


def test_rerun_same_is_noop_and_different_is_refused(tmp_path, teacher_run, blobs_npz):
    make_cache(teacher_run, blobs_npz, tmp_path / "c")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").iterdir()}
    again = make_cache(teacher_run, blobs_npz, tmp_path / "c")
    assert again.status == "up-to-date" and again.rows_computed == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").iterdir()} == before
    with pytest.raises(CacheError, match="top_k differs"):
        make_cache(teacher_run, blobs_npz, tmp_path / "c", top_k=2)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").iterdir()} == before
    replaced = make_cache(teacher_run, blobs_npz, tmp_path / "c", top_k=2, overwrite=True)
    assert replaced.status == "written" and replaced.mode == "topk"


def test_resume_from_whole_shards_matches_uninterrupted(tmp_path, teacher_run, blobs_npz):
    make_cache(teacher_run, blobs_npz, tmp_path / "ref")
    make_cache(teacher_run, blobs_npz, tmp_path / "c")
    # simulate a run killed after two shards: manifest lists two, a partial file is left behind
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    for sh in m["shards"][2:]:
        (tmp_path / "c" / sh["name"]).unlink()
    m["shards"], m["complete"] = m["shards"][:2], False
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(m))
    (tmp_path / "c" / "shard-00002.h5.partial").write_bytes(b"half a shard")
    with pytest.raises(CacheError, match="incomplete"):
        CacheReader(tmp_path / "c")
    s = make_cache(teacher_run, blobs_npz, tmp_path / "c")
    assert s.status == "resumed" and s.rows_skipped == 256 and s.rows_computed == 344
    assert not list((tmp_path / "c").glob("*.partial"))
    a, b = CacheReader(tmp_path / "ref").read_rows(0, 600), CacheReader(tmp_path / "c").read_rows(0, 600)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_augmented_views_store_params_and_match_teacher(tmp_path, teacher_run):
    # 4x4 "images" so a pixel shift is meaningful; teacher = run dir trained on them
    from kdcli.augment import Shift
    from kdcli.config import TrainConfig
    from kdcli.stages.train import train_student

    rng = np.random.default_rng(0)
    x = rng.random((64, 1, 4, 4)).astype(np.float32)
    y = (x.reshape(64, -1)[:, :8].sum(1) > 4).astype(np.int64)
    np.savez(tmp_path / "img.npz", x=x, y=y)
    train_student(TrainConfig(student="mlp", data=str(tmp_path / "img.npz"), out=str(tmp_path / "t"), epochs=1))
    cache_teacher(
        CacheConfig(
            teacher=str(tmp_path / "t"),
            data=str(tmp_path / "img.npz"),
            out=str(tmp_path / "c"),
            views=3,
            augment="shift:1",
            shard_size=50,
        )
    )
    r = CacheReader(tmp_path / "c")
    assert r.num_rows == 192 and r.manifest["aug_param_names"] == ["dy", "dx"]
    rows = r.read_rows(0, 192)
    np.testing.assert_array_equal(rows["sample_index"], np.tile(np.arange(64), 3))
    assert not rows["aug_params"][:64].any() and np.abs(rows["aug_params"][64:]).max() == 1
    xs = Shift(1).apply(torch.from_numpy(x[rows["sample_index"]]), torch.from_numpy(rows["aug_params"]))
    expected = teacher_logprobs(tmp_path / "t", xs).numpy()
    np.testing.assert_allclose(rows["logprobs"].astype(np.float32), expected, atol=1e-2)


def test_shift_moves_pixels():
    from kdcli.augment import Shift

    x = torch.arange(9.0).view(1, 1, 3, 3)
    out = Shift(1).apply(x, torch.tensor([[1.0, -1.0]]))  # down one row, left one column
    assert out[0, 0].tolist() == [[0, 0, 0], [1, 2, 0], [4, 5, 0]]


def test_untrained_builtin_teacher_is_refused(tmp_path, blobs_npz):
    with pytest.raises(UsageError, match="no weights"):
        cache_teacher(CacheConfig(teacher="mlp", data=str(blobs_npz), out=str(tmp_path / "c")))
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_summary_reports_distinct_ids_per_row_for_sample_and_priority(tmp_path, teacher_run, blobs_npz):
    """cache-teacher's summary: ``unique_ids`` = distinct ids stored per row (sample: counted from the stored counts;
    priority: K), None for full/topk; the table shows it beside B/row."""
    from rich.console import Console

    from kdcli.cache.reader import mean_unique_ids
    from kdcli.report import render

    def make(name, **kw):
        return cache_teacher(
            CacheConfig(teacher=str(teacher_run), data=str(blobs_npz), out=str(tmp_path / name), shard_size=256, **kw)
        )

    s = make("s", mode="sample", samples=40)
    counts = []
    for f in sorted((tmp_path / "s").glob("*.h5")):
        with h5py.File(f, "r") as h:
            counts.append((h["sample_counts"][()] > 0).sum(1))
    distinct = np.concatenate(counts)
    assert len(distinct) == s.num_rows and s.unique_ids == pytest.approx(distinct.mean()) and 1 <= s.unique_ids < 40
    # the writer's per-shard count in the manifest and, for a cache without it, counting the column agree
    m = read_manifest(tmp_path / "s")
    assert sum(e["distinct_ids"] for e in m["shards"]) == distinct.sum()
    older = {**m, "shards": [{k: v for k, v in e.items() if k != "distinct_ids"} for e in m["shards"]]}
    assert mean_unique_ids(tmp_path / "s", older) == pytest.approx(distinct.mean())
    p = make("p", mode="priority", samples=3)
    assert p.unique_ids == 3.0
    assert make("f").unique_ids is None and make("t", top_k=2).unique_ids is None
    con = Console(record=True, width=200)
    con.print(render(s.table()))
    assert f"{s.bytes_per_row:.1f} B/row, {s.unique_ids:.1f} distinct ids/row" in con.export_text()


def test_a_shard_with_impossible_values_is_never_published(tmp_path):
    """The writer runs the reader's checks on every shard before it is published: counts that overflowed their
    dtype no longer add up to the draws and stop the cache pass (exit 2); nothing is written."""
    from kdcli.cache.manifest import new_manifest, write_manifest
    from kdcli.cache.writer import ShardWriter

    m = new_manifest(
        teacher={},
        data={"num_samples": 4},
        settings={},
        num_rows=4,
        layout={"kind": "classification", "mode": "sample", "num_classes": 3, "samples": 300, "shard_size": 4},
    )
    write_manifest(tmp_path, m)
    counts = np.array([[300, 0], [200, 100], [255, 45], [1, 299]])
    good = {
        "row_index": np.arange(4),
        "sample_index": np.arange(4),
        "row_hash": np.arange(4, dtype=np.uint64),
        "sample_ids": np.array([[0, 0], [0, 1], [1, 2], [0, 2]], np.uint16),
        "sample_logprobs": np.log(np.full((4, 2), 0.3, np.float32)).astype(np.float16),
    }
    w = ShardWriter(tmp_path, m, shard_size=4, threaded=False)
    with pytest.raises(
        UsageError,
        match=r"the teacher's output for shard-00000\.h5 is not a valid cache \(sample_counts "
        r"of row 0 add up to 44, not the 300 draws",
    ):
        w.add({**good, "sample_counts": counts.astype(np.uint8)})  # 300 wrapped to 44 in uint8
    assert not list(tmp_path.glob("shard-*"))
    w = ShardWriter(tmp_path, m, shard_size=4, threaded=False)
    w.add({**good, "sample_counts": counts.astype(np.uint16)})
    w.close()
    assert [p.name for p in tmp_path.glob("shard-*")] == ["shard-00000.h5"]
