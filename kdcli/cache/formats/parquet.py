"""kdcli's own Parquet layout (``--format parquet``): a directory of Parquet files, self-describing, readable without
kdcli (docs/formats.md lists the columns).

**One Parquet row per cache row** (a sequence, for token caches), not one per token. Why:
- a cache row is the unit of identity (``row_index``, ``sample_index``, ``row_hash`` cover a whole sequence) and of
  training (a sequence is one example); a row per token would repeat the 24 bytes of identity per token or drop it;
- Arrow stores a list column as one offsets array per row plus the flattened values, so the per-token arrays cost
  what the HDF5 shards' flattened arrays cost (the shards' ``offsets`` become the list offsets), and the K-wide
  arrays are ``fixed_size_list`` (no inner offsets at all);
- every reader flattens it in one call when a per-token view is wanted: DuckDB ``unnest``, Polars ``explode``,
  pyarrow ``ListArray.flatten``; a sequence per row is what Hugging Face datasets of tokenized text look like.

**One file per shard** (``part-NNNNN.parquet``, shard ``NNNNN``'s rows, one row group per block read): files of the
shards' size, written and read one at a time (memory flat in the cache size), a directory ``datasets.load_dataset``
and DuckDB/Polars globs read as one table.

Columns: ``row_index`` int64, ``sample_index`` int64, ``row_hash`` uint64, ``aug_params`` (views only), then every array
the cache stores, in the shards' dtypes (float16 stays float16: Parquet's FLOAT16 logical type), per row
(classification: ``fixed_size_list<T>[w]`` or a scalar) or per predicted token (token caches: ``list<...>``), the
per-temperature statistics included, ``target_logprobs`` and, for a cache that records them, the token spans
(``span_segment``, ``span_start``, ``span_end``; their ``teacher_vocab.json`` in the first part's metadata); what the
mode stores is asked of the mode (:meth:`Mode.keys`, :meth:`Mode.expected`), never listed here. With the cache's DATA
(token caches), two more columns make the file pre-tokenized DATA by itself (:mod:`kdcli.lm.pretokenized`):
``input_ids`` (list<int32>) and ``labels`` (list<int32>, the token where it is predicted, -100 elsewhere): entry ``j``
of a row's per-token arrays is the teacher's distribution over the ``j``-th predicted token, computed from the tokens
before it.

File key-value metadata: ``kdcli.manifest`` (the cache's whole manifest.json, shards and checksums included),
``kdcli.parquet_format`` (``1``), ``kdcli.layout`` (which columns are per row, per token, data), ``kdcli.part``
(this file's shard and rows) and, in the first file of a cache with token spans, ``kdcli.teacher_vocab``.

Import checks the metadata and every column's type against the manifest, then writes the rows through kdcli's shard
writer with the cache's own shard size and compression: the shards are array-identical to the exported cache's
(byte-identical too with the same h5py/HDF5: the import compares each shard's sha256 with the recorded one).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from kdcli.cache.formats.base import Format
from kdcli.cache.formats.common import (
    TOKENS_FILE,
    Imported,
    TokenRowsWriter,
    arrow_error,
    cache_blocks,
    entry_width,
    is_token,
    labels_of,
    pyarrow_modules,
    row_keys,
    stored_keys,
    write_cache,
)
from kdcli.cache.manifest import FORMAT, FORMAT_VERSION, TEACHER_VOCAB
from kdcli.cache.verify import expected_datasets
from kdcli.infra.errors import CacheError, UsageError

PARQUET_FORMAT_VERSION = 1
META_MANIFEST = b"kdcli.manifest"
META_VERSION = b"kdcli.parquet_format"
META_LAYOUT = b"kdcli.layout"
META_PART = b"kdcli.part"
META_TEACHER_VOCAB = b"kdcli.teacher_vocab"  # the first part of a cache with token spans: its teacher_vocab.json
COMPRESSION = "zstd"
"""Parquet codec of the export. zstd: read by pyarrow, datasets, DuckDB and Polars; measured smaller than snappy on
fp16 log-probs (benchmarks/bench_formats.py prints both)."""
DATA_COLUMNS = ("input_ids", "labels")


def part_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def parquet_files(src: Path) -> list[Path]:
    """A .parquet file, or the .parquet files of a directory in name order (UsageError if there are none)."""
    if not src.exists():
        raise UsageError(f"{src} does not exist")
    files = sorted(p for p in src.iterdir() if p.suffix == ".parquet" and p.is_file()) if src.is_dir() else [src]
    if not files:
        raise UsageError(f"{src} holds no .parquet file")
    return files


# -- arrays <-> Arrow -----------------------------------------------------------------------------------------------
def row_column(pa, a: np.ndarray):
    """(rows,) -> a scalar column; (rows, w) -> fixed_size_list<T>[w]."""
    a = np.ascontiguousarray(a)
    if a.ndim == 1:
        return pa.array(a)
    w = int(np.prod(a.shape[1:]))
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), w)


def token_column(pa, a: np.ndarray, offsets: np.ndarray):
    """(tokens,) or (tokens, w) flattened over rows -> list<T> or list<fixed_size_list<T>[w]> with ``offsets``."""
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), row_column(pa, a))


def writable(a: np.ndarray) -> np.ndarray:
    """Arrow hands out read-only views; the shard writer and the checks take ordinary arrays."""
    return a if a.flags.writeable else a.copy()


def column_values(pa, col, name: str) -> np.ndarray:
    """A fixed_size_list or scalar column -> numpy ((rows, w) or (rows,)); no nulls allowed."""
    if col.null_count:
        raise CacheError(f"column {name!r} has null entries; a kdcli export has none")
    if pa.types.is_fixed_size_list(col.type):
        w = col.type.list_size
        vals = col.flatten()
        if vals.null_count:
            raise CacheError(f"column {name!r} has null entries; a kdcli export has none")
        return writable(vals.to_numpy(zero_copy_only=False).reshape(-1, w))
    return writable(col.to_numpy(zero_copy_only=False))


def expected_types(pa, manifest: dict) -> dict:
    """Column name -> the Arrow type the export of ``manifest``'s cache has (None: the dtype is not fixed by the
    manifest, only the nesting): what ``cache verify`` expects of a shard (:func:`expected_datasets`), nested per
    token for token caches."""
    per_token = set(stored_keys(manifest)) if is_token(manifest) else set()
    out = {}
    for name, (dt, trail) in expected_datasets(manifest).items():
        if name == "offsets":
            continue
        if dt is None:
            out[name] = None
            continue
        t = pa.from_numpy_dtype(dt)
        if trail:
            t = pa.list_(t, int(np.prod(trail)))
        if name in per_token:
            t = pa.list_(t)
        out[name] = t
    return out


def predicted_positions(data, rows: np.ndarray) -> list[np.ndarray]:
    """Index in each sequence of its predicted tokens (the order of a token cache's entries), as
    :func:`kdcli.lm.text.loss_positions` numbers them."""
    out = []
    for i in rows:
        s = data.ids[i]
        if data.target_mask is not None:
            t = np.flatnonzero(data.target_mask[i][: len(s)])
            out.append(t[t >= 1])
        else:
            out.append(np.arange(max(int(data.first_target[i]), 1), len(s)))
    return out


def data_columns(pa, data, first: int, lengths: np.ndarray) -> dict:
    """``input_ids`` and ``labels`` of cache rows ``first..first + len(lengths) - 1`` from their DATA."""
    idx = np.arange(first, first + len(lengths))
    seqs = [np.asarray(data.ids[i], dtype=np.int32) for i in idx]
    pos = predicted_positions(data, idx)
    if not np.array_equal([len(p) for p in pos], lengths):
        raise CacheError(f"the data's predicted tokens do not line up with cache rows {first}..{idx[-1]}")
    masks = []
    for s, p in zip(seqs, pos):
        m = np.zeros(len(s), dtype=bool)
        m[p] = True
        masks.append(m)
    off = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
    return {
        "input_ids": token_column(pa, np.concatenate(seqs), off),
        "labels": token_column(pa, np.concatenate([labels_of(s, m) for s, m in zip(seqs, masks)]), off),
    }


class ParquetFormat(Format):
    name = "parquet"
    exports = imports = True
    export_data = "optional"
    summary = "kdcli's own columns, every kind and mode, array-identical round trip"

    # -- export ------------------------------------------------------------------------------------------------
    def plan_export(self, manifest, opts):
        return []  # everything crosses (but a --generate cache's per-row answers: kdcli.stages.convert says so)

    def export(self, reader, out, *, data, opts, progress):
        pa, pq = pyarrow_modules()
        # a --generate cache crosses as the token cache over its answers.jsonl (its per-row answers stay behind)
        m = {k: v for k, v in reader.manifest.items() if k != "extra_row_keys"}
        token = is_token(m)
        if data is not None and not token:
            raise UsageError("--data adds token ids to an export of a token (LM) cache; this is a classification cache")
        layout = {
            "version": PARQUET_FORMAT_VERSION,
            "row_columns": list(row_keys(m)),
            ("token_columns" if token else "mode_columns"): list(stored_keys(m)),
            "data_columns": list(DATA_COLUMNS) if data is not None else [],
        }
        meta = {
            META_MANIFEST: json.dumps(m).encode(),
            META_VERSION: str(PARQUET_FORMAT_VERSION).encode(),
            META_LAYOUT: json.dumps(layout).encode(),
        }
        rows = tokens = 0
        writer, shard = None, None
        vocab = None
        if token and m.get("xtok"):  # token spans and the teacher's vocabulary cross too (--cross-tokenizer)
            reader.read_spans = True
            vocab = reader.location.read_bytes(TEACHER_VOCAB)
        try:
            for i, first, arrays in cache_blocks(reader, opts.block_values):
                n = len(arrays["row_index"])
                cols = {k: row_column(pa, arrays[k]) for k in row_keys(m)}
                if token:
                    lengths = arrays["lengths"]
                    offsets = np.concatenate([[0], np.cumsum(lengths)])
                    cols.update({k: token_column(pa, arrays[k], offsets) for k in stored_keys(m)})
                    if data is not None:
                        cols.update(data_columns(pa, data, first, lengths))
                    tokens += int(lengths.sum())
                else:
                    cols.update({k: row_column(pa, arrays[k]) for k in stored_keys(m)})
                batch = pa.RecordBatch.from_pydict(cols)
                if i != shard:
                    if writer is not None:
                        writer.close()
                    s = reader.shards[i]
                    part = {"shard": s["name"], "row_start": s["row_start"], "row_stop": s["row_stop"]}
                    extra = {META_TEACHER_VOCAB: vocab} if vocab is not None and i == 0 else {}
                    schema = batch.schema.with_metadata({**meta, **extra, META_PART: json.dumps(part).encode()})
                    writer, shard = pq.ParquetWriter(str(out / part_name(i)), schema, compression=COMPRESSION), i
                writer.write_batch(batch, row_group_size=n)
                rows += n
                progress.advance(n)
        finally:
            if writer is not None:
                writer.close()
        return rows, (tokens if token else None), len(reader.shards)

    # -- import ------------------------------------------------------------------------------------------------
    def read_metadata(self, src: Path) -> tuple[list, dict]:
        """(ParquetFiles in order, the manifest) of a kdcli Parquet export; UsageError for anything else."""
        pa, pq = pyarrow_modules()
        files, manifest = [], None
        for path in parquet_files(src):
            try:
                pf = pq.ParquetFile(str(path))
            except arrow_error(pa) as e:
                raise UsageError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0][:120]})") from None
            meta = pf.schema_arrow.metadata or {}
            if META_MANIFEST not in meta:
                raise UsageError(
                    f"{path} has no kdcli manifest in its metadata: not a kdcli Parquet export (for an axolotl "
                    "dataset use --format axolotl, for a DistillKit capture --format distillkit)"
                )
            try:
                m = json.loads(meta[META_MANIFEST])
                version = int(meta.get(META_VERSION, b"0"))
            except (ValueError, UnicodeDecodeError):
                raise UsageError(f"{path}: the kdcli metadata is not valid JSON; the file is damaged") from None
            if version != PARQUET_FORMAT_VERSION:
                raise UsageError(
                    f"{path} is kdcli Parquet format {version}; this kdcli reads format {PARQUET_FORMAT_VERSION}"
                )
            if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
                got = m.get("format_version") if isinstance(m, dict) else "?"
                raise UsageError(
                    f"{path} holds a manifest of cache format {got}; this kdcli reads format {FORMAT_VERSION}"
                )
            if manifest is None:
                manifest, first = m, path
            elif m != manifest:
                raise UsageError(
                    f"{path} was exported from another cache than {first.name}; give one export's directory"
                )
            files.append(pf)
        if manifest.get("complete") is not True:
            raise CacheError(f"{src} was exported from an incomplete cache")
        return files, manifest

    def check_columns(self, pa, files: list, manifest: dict, src: Path) -> None:
        """Every column the manifest's cache stores is in every file with the type the export gives it."""
        want = expected_types(pa, manifest)
        for pf in files:
            schema = pf.schema_arrow
            for name, t in want.items():
                if name not in schema.names:
                    raise UsageError(
                        f"{src} lacks the column {name!r} that a {manifest['mode']} cache needs; it is not a whole "
                        "kdcli export (was it rewritten without it?)"
                    )
                got = schema.field(name).type
                if t is not None and not got.equals(t):
                    raise UsageError(
                        f"{src}: column {name!r} has type {got}, expected {t}; re-export the cache (a rewrite "
                        "changed the column's type)"
                    )
        rows = sum(pf.metadata.num_rows for pf in files)
        if rows != int(manifest["num_rows"]):
            raise CacheError(f"{src} holds {rows} rows, its manifest says {manifest['num_rows']}")

    def source_rows(self, src, opts):
        files, m = self.read_metadata(src)
        self.check_columns(pyarrow_modules()[0], files, m, src)
        return int(m["num_rows"])

    def batch_arrays(self, pa, batch, manifest: dict) -> dict[str, np.ndarray]:
        """A record batch of the export -> the arrays the shard writer takes (``lengths`` for token caches)."""
        token = is_token(manifest)
        out = {name: column_values(pa, batch.column(name), name) for name in row_keys(manifest)}
        lengths = None
        for name in stored_keys(manifest):
            col = batch.column(name)
            if token:
                if col.null_count:
                    raise CacheError(f"column {name!r} has null rows; a kdcli export has none")
                ln = col.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
                if lengths is None:
                    lengths = ln
                elif not np.array_equal(lengths, ln):
                    raise CacheError(
                        f"column {name!r} has other per-row token counts than {stored_keys(manifest)[0]!r}"
                    )
                col = col.flatten()
            out[name] = column_values(pa, col, name)
        if token:
            out["lengths"] = lengths
        return out

    def import_into(self, src, work, *, final, tokenizer, opts, progress):
        pa, _ = pyarrow_modules()
        files, m = self.read_metadata(src)
        self.check_columns(pa, files, m, src)
        if tokenizer is not None:
            raise UsageError("--tokenizer: a kdcli Parquet export records its cache's tokenizer; drop the option")
        token = is_token(m)
        source_shards = {s["name"]: s.get("sha256") for s in m.get("shards", [])}
        plan = {k: v for k, v in m.items() if k not in ("shards", "complete")}
        plan["imported"] = {"format": self.name, "source": str(src), "unrecorded": [], "approximate": []}
        width = entry_width(m)
        longest = int((m.get("text") or {}).get("max_length") or 1) if token else 1
        batch_rows = max(1, opts.block_values // max(1, width * longest))
        columns = list(row_keys(m)) + list(stored_keys(m))
        with_ids = token and all(all(c in pf.schema_arrow.names for c in DATA_COLUMNS) for pf in files)
        tok_writer = TokenRowsWriter(work / TOKENS_FILE) if with_ids else None

        def batches() -> Iterator[dict[str, np.ndarray]]:
            for pf in files:
                for batch in pf.iter_batches(batch_size=batch_rows, columns=columns + (list(DATA_COLUMNS) * with_ids)):
                    arrays = self.batch_arrays(pa, batch, m)
                    if tok_writer is not None:
                        ids = batch.column("input_ids").to_pylist()
                        labels = batch.column("labels").to_pylist()
                        seqs = [np.asarray(s, dtype=np.int32) for s in ids]
                        tok_writer.add(seqs, [np.asarray(lb) != -100 for lb in labels])
                    progress.advance(batch.num_rows)
                    yield arrays

        if token and m.get("xtok"):  # the teacher's vocabulary, from the first part (verified with the cache)
            vocab = (files[0].schema_arrow.metadata or {}).get(META_TEACHER_VOCAB)
            if vocab is None:
                raise CacheError(
                    f"{src}: the first part lacks the teacher's vocabulary its cache records (kdcli.teacher_vocab); "
                    "export the cache again"
                )
            (work / TEACHER_VOCAB).write_bytes(vocab)
        try:
            final_m = write_cache(work, plan, batches())
        finally:
            if tok_writer is not None:
                tok_writer.close()
        same = [s["name"] for s in final_m["shards"] if source_shards.get(s["name"]) == s["sha256"]]
        if len(same) == len(final_m["shards"]):
            notes = ["every shard is byte-identical to the exported cache's (same sha256)"]
        else:
            notes = [
                f"{len(final_m['shards']) - len(same)} shard(s) differ in bytes from the exported cache's (another "
                "h5py/HDF5 build lays files out differently); their arrays were checked on import"
            ]
        tokens = (int(m["data"].get("num_targets") or 0) or None) if token else None
        return Imported(manifest=final_m, tokens=tokens, tokens_file=with_ids, notes=notes)


FORMAT_OBJECT = ParquetFormat()
