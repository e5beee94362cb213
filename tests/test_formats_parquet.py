"""kdcli's own Parquet layout, through the CLI: ``cache export --format parquet`` then ``cache import`` gives
array-identical (and, with the same h5py, byte-identical) shards for every mode of token and classification caches;
the files are readable without kdcli; an export with the cache's DATA is pre-tokenized DATA itself, and the imported
cache trains to the very same loss; bad input is refused with one line and nothing is written at the destination."""

import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_blobs
from format_helpers import kdcli, run_dir_metrics
from lm_helpers import make_llama, make_tokenizer, text_rows, write_jsonl

from kdcli.config import CacheConfig, TrainConfig, resolve
from kdcli.stages.cache import cache_teacher
from kdcli.stages.train import train_student

MODES = ("full", "topk", "sample", "priority")
SIZES = {"full": {}, "topk": {"top_k": 8}, "sample": {"samples": 12}, "priority": {"samples": 12}}


@pytest.fixture(scope="module")
def caches(tmp_path_factory, one_thread):
    """One token cache per mode (several shards, stored temperatures 1, 2, 4 for the sparse ones) and one
    classification cache per mode."""
    root = tmp_path_factory.mktemp("fmt")
    tok = make_tokenizer(root / "tok")
    teacher = make_llama(root / "teacher", tok)
    text = write_jsonl(root / "text.jsonl", text_rows(24))
    for mode in MODES:
        temps = {"temperatures": "2,4"} if mode != "full" else {}
        args = dict(
            teacher=str(teacher), data=str(text), out=str(root / f"lm-{mode}"), max_length=32, shard_size=8,
            mode=mode, **SIZES[mode], **temps,
        )  # fmt: skip
        cache_teacher(resolve(CacheConfig, None, args))
    x, y = make_blobs()
    np.savez(root / "blobs.npz", x=x, y=y)
    train_student(
        TrainConfig(student="mlp", student_args={"hidden": [32]}, data=str(root / "blobs.npz"), out=str(root / "mlp"),
                    epochs=1, lr=3e-3, seed=0)
    )  # fmt: skip
    for mode in MODES:
        size = {"topk": {"top_k": 2}, "priority": {"samples": 3}}.get(mode, SIZES[mode])
        args = dict(
            teacher=str(root / "mlp"), data=str(root / "blobs.npz"), out=str(root / f"cls-{mode}"), shard_size=256,
            mode=mode, **size,
        )  # fmt: skip
        cache_teacher(resolve(CacheConfig, None, args))
    return {"root": root, "teacher": teacher, "text": text, "tok": tok}


def shards(d: Path) -> list[dict]:
    out = []
    for s in json.loads((d / "manifest.json").read_text())["shards"]:
        with h5py.File(d / s["name"]) as f:
            arrays = {k: f[k][()] for k in f}
            out.append({"name": s["name"], "attrs": dict(f.attrs), "arrays": arrays, "sha256": s["sha256"],
                        "dtypes": {k: f[k].dtype for k in f}})  # fmt: skip
    return out


def assert_same_cache(a: Path, b: Path) -> None:
    sa, sb = shards(a), shards(b)
    assert [s["name"] for s in sa] == [s["name"] for s in sb]
    for x, y in zip(sa, sb):
        assert set(x["arrays"]) == set(y["arrays"]) and x["dtypes"] == y["dtypes"]
        for k in x["arrays"]:
            np.testing.assert_array_equal(x["arrays"][k], y["arrays"][k], err_msg=f"{x['name']}/{k}")
        assert x["attrs"] == y["attrs"]
        assert x["sha256"] == y["sha256"]  # same h5py here: the very same bytes
    ma = json.loads((a / "manifest.json").read_text())
    mb = json.loads((b / "manifest.json").read_text())
    assert mb.pop("imported")["format"] == "parquet"
    assert ma == mb


@pytest.mark.parametrize("kind", ["lm", "cls"])
@pytest.mark.parametrize("mode", MODES)
def test_round_trip_through_the_cli_is_array_identical(caches, tmp_path, kind, mode):
    src = caches["root"] / f"{kind}-{mode}"
    r = kdcli("cache", "export", src, "--format", "parquet", "--out", tmp_path / "x", "--json")
    s = json.loads(r.stdout)
    m = json.loads((src / "manifest.json").read_text())
    assert s["lost"] == [] and s["rows"] == m["num_rows"] and s["files"] == len(m["shards"]) > 1
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == [f"part-{i:05d}.parquet" for i in range(s["files"])]
    assert "export --format" not in r.stderr  # nothing lost: no warning
    r = kdcli("cache", "import", tmp_path / "x", "--format", "parquet", "--out", tmp_path / "back", "--json")
    i = json.loads(r.stdout)
    assert i["mode"] == mode and "byte-identical" in i["notes"][0] and i["data"] is None
    assert_same_cache(src, tmp_path / "back")
    kdcli("cache", "verify", tmp_path / "back")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "x"]  # no leftovers


def test_files_are_self_describing_and_readable_without_kdcli(caches, tmp_path):
    src = caches["root"] / "lm-topk"
    kdcli("cache", "export", src, "--format", "parquet", "--out", tmp_path / "t", "--data", caches["text"])
    files = sorted((tmp_path / "t").glob("*.parquet"))
    f = pq.ParquetFile(files[0])
    manifest = json.loads(f.schema_arrow.metadata[b"kdcli.manifest"])
    assert manifest == json.loads((src / "manifest.json").read_text())
    assert json.loads(f.schema_arrow.metadata[b"kdcli.part"])["shard"] == "shard-00000.h5"
    t = pa.concat_tables([pq.read_table(p) for p in files])
    assert t.schema.field("topk_ids").type == pa.list_(pa.list_(pa.uint16(), 8))
    assert t.schema.field("topk_logprobs").type == pa.list_(pa.list_(pa.float16(), 8))
    assert t.schema.field("tail_logmass_t").type == pa.list_(pa.list_(pa.float16(), 2))  # T = 2, 4
    assert t.schema.field("row_hash").type == pa.uint64()
    sh = shards(src)  # per-token values are the shards' (flattened in row order)
    flat = t.column("topk_logprobs").combine_chunks().flatten().flatten().to_numpy().reshape(-1, 8)
    np.testing.assert_array_equal(np.concatenate([s["arrays"]["topk_logprobs"] for s in sh]), flat)
    np.testing.assert_array_equal(np.concatenate([s["arrays"]["row_hash"] for s in sh]), t.column("row_hash"))
    # text rows predict every token after the first: labels are the tokens from position 1, one entry each
    for ids, labels, lp in zip(*(t.column(c).to_pylist() for c in ("input_ids", "labels", "target_logprobs"))):
        assert labels == [-100] + ids[1:] and len(lp) == len(ids) - 1
    import datasets

    ds = datasets.load_dataset("parquet", data_dir=str(tmp_path / "t"), split="train")
    assert len(ds) == manifest["num_rows"] and len(ds[0]["topk_ids"][0]) == 8


def test_duckdb_and_polars_read_it(caches, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    pl = pytest.importorskip("polars")
    kdcli("cache", "export", caches["root"] / "lm-sample", "--format", "parquet", "--out", tmp_path / "s")
    glob = str(tmp_path / "s" / "*.parquet")
    n = duckdb.sql(f"select count(*) from (select unnest(sample_counts) from '{glob}')").fetchall()[0][0]
    assert n == json.loads((caches["root"] / "lm-sample" / "manifest.json").read_text())["data"]["num_targets"]
    assert pl.read_parquet(glob).explode("sample_logz_t").height == n


def test_imported_cache_trains_on_its_own_token_ids_to_the_same_loss(caches, tmp_path):
    """The export carries the rows' token ids (--data): the import writes them beside the shards as pre-tokenized
    DATA, and train-student / eval with the imported cache and that DATA give the loss of the original cache with
    the original text: the same sequences, the same arrays."""
    src = caches["root"] / "lm-topk"
    kdcli("cache", "export", src, "--format", "parquet", "--out", tmp_path / "x", "--data", caches["text"])
    r = kdcli("cache", "import", tmp_path / "x", "--format", "parquet", "--out", tmp_path / "c", "--json")
    tokens = json.loads(r.stdout)["data"]
    assert tokens == str(tmp_path / "c" / "tokens.parquet")
    common = ["--student", caches["teacher"], "--epochs", 1, "--temperature", 2, "--seed", 0, "--batch-size", 4]
    kdcli("train-student", "--cache", src, "--data", caches["text"], "--out", tmp_path / "a", *common)
    kdcli("train-student", "--cache", tmp_path / "c", "--data", tokens, "--out", tmp_path / "b", *common)
    a, b = run_dir_metrics(tmp_path / "a"), run_dir_metrics(tmp_path / "b")
    assert a[0]["train_loss"] == b[0]["train_loss"] and a[0]["train_soft"] == b[0]["train_soft"]
    r = kdcli("eval", "--model", tmp_path / "b", "--cache", tmp_path / "c", "--data", tokens, "--json")
    e = json.loads(r.stdout)
    assert e["teacher"]["perplexity"] > 1 and e["models"][0]["kl_to_teacher"] is not None


def test_bad_input_is_one_line_and_nothing_is_written(caches, tmp_path):
    src = caches["root"] / "lm-priority"
    kdcli("cache", "export", src, "--format", "hdf6", "--out", tmp_path / "o0", code=2, err="unknown export format")
    kdcli("cache", "export", src, "--format", "distillkit", "--out", tmp_path / "o0", code=2, err="import-only")
    kdcli("cache", "import", src, "--format", "csv", "--out", tmp_path / "o0", code=2, err="unknown import format")
    pq.write_table(pa.table({"a": [1, 2]}), tmp_path / "plain.parquet")  # not a kdcli export
    kdcli("cache", "import", tmp_path / "plain.parquet", "--format", "parquet", "--out", tmp_path / "o1", code=2,
          err="no kdcli manifest")  # fmt: skip
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    kdcli("cache", "import", tmp_path / "junk.parquet", "--format", "parquet", "--out", tmp_path / "o2", code=2,
          err="not a readable Parquet file")  # fmt: skip
    kdcli("cache", "export", src, "--format", "parquet", "--out", tmp_path / "p")
    part = tmp_path / "p" / "part-00000.parquet"
    t = pq.read_table(part)
    meta = pq.ParquetFile(part).schema_arrow.metadata

    def write(name: str, table) -> Path:
        (tmp_path / name).mkdir()
        pq.write_table(table.replace_schema_metadata(meta), tmp_path / name / "part-00000.parquet")
        return tmp_path / name

    kdcli("cache", "import", write("dropped", t.drop_columns(["priority_tau"])), "--format", "parquet", "--out",
          tmp_path / "o3", code=2, err="lacks the column 'priority_tau'")  # fmt: skip
    i = t.schema.get_field_index("priority_logprobs")
    retyped = t.set_column(i, "priority_logprobs", t.column(i).cast(pa.list_(pa.list_(pa.float32(), 12))))
    kdcli("cache", "import", write("retyped", retyped), "--format", "parquet", "--out", tmp_path / "o4", code=2,
          err="has type")  # fmt: skip
    kdcli("cache", "import", tmp_path / "p", "--format", "parquet", "--out", tmp_path / "o5", "--tokenizer",
          caches["tok"], code=2, err="records its cache's tokenizer")  # fmt: skip
    kdcli("cache", "import", tmp_path / "p", "--format", "parquet", "--out", tmp_path / "o5", "--alignment", "next",
          code=2, err="--alignment applies to import --format axolotl")  # fmt: skip
    # damaged content (a row index edited): the checks every read runs stop it, naming the row (exit 3)
    j = t.schema.get_field_index("row_index")
    edited = t.set_column(j, "row_index", pa.array(np.r_[0, 0, np.arange(2, t.num_rows)].astype(np.int64)))
    rows_ok = pq.read_table(tmp_path / "p" / "part-00001.parquet").replace_schema_metadata(
        pq.ParquetFile(tmp_path / "p" / "part-00001.parquet").schema_arrow.metadata
    )
    d = write("edited", edited)
    pq.write_table(rows_ok, d / "part-00001.parquet")
    for k in range(2, len(list((tmp_path / "p").iterdir()))):
        (d / f"part-{k:05d}.parquet").write_bytes((tmp_path / "p" / f"part-{k:05d}.parquet").read_bytes())
    kdcli("cache", "import", d, "--format", "parquet", "--out", tmp_path / "o6", code=3, err="row_index")
    # the destinations: an export dir in the way, a directory that is not kdcli's, an import into a file
    kdcli("cache", "export", src, "--format", "parquet", "--out", tmp_path / "p", code=2, err="--overwrite")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    kdcli("cache", "import", tmp_path / "p", "--format", "parquet", "--out", tmp_path / "mine", "--overwrite", code=2,
          err="not a kdcli cache")  # fmt: skip
    kdcli("cache", "export", src, "--format", "parquet", "--out", tmp_path / "mine", "--overwrite", code=2,
          err="is not a directory kdcli cache export wrote")  # fmt: skip
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("o", ".o", ".p", ".mine"))]  # nothing anywhere
    assert (tmp_path / "mine" / "keep.txt").read_text() == "mine"
    # --overwrite replaces an earlier output of the same command, whole
    kdcli("cache", "import", tmp_path / "p", "--format", "parquet", "--out", tmp_path / "again")
    kdcli("cache", "import", tmp_path / "p", "--format", "parquet", "--out", tmp_path / "again", "--overwrite")
    kdcli("cache", "export", src, "--format", "parquet", "--out", tmp_path / "p", "--overwrite")
    kdcli("cache", "verify", tmp_path / "again")


def test_a_failing_export_leaves_nothing(caches, tmp_path, monkeypatch):
    import kdcli.cache.formats.parquet as parquet

    calls = {"n": 0}
    real = parquet.row_column

    def failing(pa_, a):
        calls["n"] += 1
        if calls["n"] > 10:
            raise OSError(28, "No space left on device")
        return real(pa_, a)

    monkeypatch.setattr(parquet, "row_column", failing)
    kdcli("cache", "export", caches["root"] / "lm-topk", "--format", "parquet", "--out", tmp_path / "x", code=2,
          err="no space left")  # fmt: skip
    assert list(tmp_path.iterdir()) == []
