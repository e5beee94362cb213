"""axolotl's KD dataset layout (``--format axolotl``): export a top-k token cache to it, import one into kdcli.

Read from axolotl-ai-cloud/axolotl at commit 067b021 (2026-07-24; ``src/axolotl/integrations/kd/`` and
``src/axolotl/utils/data/``; the lines are quoted in docs/formats.md). What axolotl's KD plugin consumes, per row of
an already tokenized dataset:

- ``input_ids``, ``attention_mask``, ``labels`` (axolotl skips its own preprocessing when all three are there:
  ``_is_dataset_already_tokenized`` in ``src/axolotl/utils/data/wrappers.py``); ``labels`` are the token ids with
  -100 where no loss is taken (Hugging Face convention: not shifted);
- ``target_token_ids`` (L, K), ``target_logprobs`` (L, K), ``target_mask`` (L, K): ``DataCollatorForKD`` pops the
  three and pads them (``collator.py``); the loss (``kernels/liger.py``) gathers the student's log-probs at the K ids
  and computes ``sum teacher_p * (teacher_logp - student_logp)`` over the masked-in entries, with the teacher's
  values taken as "already temp-scaled and normalized logprobs" (log-probs, not logits, renormalised over the K ids
  at the KD temperature). There is no tail bucket: the mass outside the K ids has no column and no term.

**Alignment.** axolotl is not consistent with itself here. Its dataset preparation (``chat_template.py``) puts at
index ``p`` the teacher's distribution *of token p* (vLLM's prompt-logprob convention; index 0 is padding) and sets
``target_mask[p]`` from ``labels[p]``, as the trainer before PR #2700 (June 2025) expected (it shifted the targets
by one: ``target_logprobs[..., 1:, :]``); the current loss pairs the student's hidden state ``t`` with
``target_*[t]`` directly while shifting the CE labels (``true_labels[:, 1:]``). ``alignment="next"`` (default)
writes what the current loss needs: row ``t`` holds the teacher's prediction made at position ``t``, i.e. of token
``t + 1``, with ``target_mask[t] = 1`` iff token ``t + 1`` is predicted. ``alignment="token"`` writes the
dataset-side convention (row ``p`` = distribution of token ``p``, row 0 padding). Import takes the same option.

Export refuses (one line) what would silently change the loss: classification caches; modes whose ids are draws
(:attr:`Mode.sampled`: sample, priority; axolotl would weight them by the teacher's probability, another loss); a
mode that keeps every class (full) over more than ``MAX_FULL_CLASSES`` classes (exported as K = V ids, a file
hundreds of times the cache). What a top-k export cannot carry (the tail mass and the per-temperature statistics,
i.e. every stored array but the ids and their log-probs, ``target_logprobs``, the row identity) is said on stderr.

Import writes a kdcli ``topk`` token cache: the K entries sorted by log-prob; the tail mass is ``1 - sum`` of the K
probabilities when the source's sum is below 1 (raw log-probs), and empty when they sum to 1 (renormalised: the
source discarded the tail); a ``temperature`` other than 1 is undone up to the normalisation
(``log_softmax(T * values)``). Beside the shards it writes the rows' token ids as pre-tokenized DATA
(``tokens.parquet``). The manifest's ``imported`` entry says what the source did not record and what is
approximate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from kdcli.cache.formats.base import Format
from kdcli.cache.formats.common import (
    TOKENS_FILE,
    UNRECORDED,
    Imported,
    TokenRowsWriter,
    arrow_error,
    cache_blocks,
    imported_token_plan,
    is_token,
    pyarrow_modules,
    token_data_identity,
    unrecorded_teacher,
    write_cache,
)
from kdcli.cache.formats.parquet import part_name, predicted_positions, token_column
from kdcli.cache.manifest import write_manifest
from kdcli.cache.modes import get_mode
from kdcli.cache.modes.base import numpy_id_dtype
from kdcli.infra.errors import CacheError, UsageError

ALIGNMENTS = ("next", "token")
COLUMNS = ("input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs", "target_mask")
TARGET_COLUMNS = ("target_token_ids", "target_logprobs", "target_mask")
META_EXPORT = b"kdcli.axolotl"


def import_mode(k: int, vocab: int) -> str:
    """What an axolotl dataset becomes: a ``topk`` cache (K ids with their log-probs per position), or a ``full``
    cache where every position lists every class (K = V: what the export of a full cache writes), exact at every
    temperature as the original was."""
    return "full" if k == vocab else "topk"


MAX_FULL_CLASSES = 4096
"""A cache that keeps every class is exported as K = V ids per position: 9 bytes per class per token (int32 id,
float32 log-prob, int8 mask), 9 x 4096 = 36 KiB per token at the limit; larger vocabularies are refused."""
SUM_TOL = 1e-3
"""|sum of the K probabilities - 1| under which an imported position counts as renormalised (no tail recorded):
float32 log-probs renormalised over K <= 1,000 ids sum to 1 within ~1e-4; fp16 values within ~K * 2^-11 * p."""
IGNORE = -100


def check_alignment(alignment: str) -> str:
    if alignment not in ALIGNMENTS:
        raise UsageError(
            f"--alignment {alignment}: use 'next' (axolotl's current loss: row t predicts token t+1) or 'token' "
            "(axolotl's dataset preparation: row t is the distribution of token t)"
        )
    return alignment


def check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise UsageError(f"--temperature {temperature!r}: a positive, finite temperature is needed")
    return t


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (-inf entries allowed)."""
    x = x.astype(np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", under="ignore"):
        return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def exported_arrays(manifest: dict) -> tuple[str | None, str]:
    """(ids key or None for a mode keeping every class, log-probs key) of the arrays an axolotl export carries."""
    mode = get_mode(manifest["mode"])
    if not mode.sparse:
        return None, mode.keys_[0]
    ids = mode.keys_[0]
    return ids, ids.replace("_ids", "_logprobs")


# -- export ---------------------------------------------------------------------------------------------------------
def axolotl_batch(pa, arrays: dict, data, first: int, *, K: int, T: float, alignment: str, keys: tuple):
    """One block of cache rows (global rows ``first..``) -> a record batch of axolotl's six columns."""
    ids_key, lp_key = keys
    lengths = arrays["lengths"]
    if ids_key is None:
        ids_tok = np.broadcast_to(np.arange(K, dtype=np.int32), (int(lengths.sum()), K))
    else:
        ids_tok = arrays[ids_key].astype(np.int32)  # (tokens, K)
    lp_tok = log_softmax(arrays[lp_key].astype(np.float32) / T)  # (tokens, K): renormalised over the K ids at T
    idx = np.arange(first, first + len(lengths))
    seqs = [np.asarray(data.ids[i], dtype=np.int32) for i in idx]
    positions = predicted_positions(data, idx)
    if not np.array_equal([len(p) for p in positions], lengths):
        raise CacheError(f"the data's predicted tokens do not line up with cache rows {idx[0]}..{idx[-1]}")
    L = np.array([len(s) for s in seqs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(L)])
    total = int(L.sum())
    tgt_ids = np.tile(np.arange(K, dtype=np.int32), (total, 1))  # padding rows: ids 0..K-1, as axolotl pads
    tgt_lp = np.full((total, K), -np.inf, dtype=np.float32)
    tgt_mask = np.zeros((total, K), dtype=np.int8)
    labels = np.full(total, IGNORE, dtype=np.int32)
    flat_seq = np.concatenate(seqs)
    pos = np.concatenate([starts[i] + p for i, p in enumerate(positions)])
    rows_at = pos - 1 if alignment == "next" else pos  # the row that holds each predicted token's target
    labels[pos] = flat_seq[pos]
    tgt_ids[rows_at] = ids_tok
    tgt_lp[rows_at] = lp_tok.astype(np.float32)
    tgt_mask[rows_at] = 1
    cols = {
        "input_ids": token_column(pa, flat_seq, starts),
        "attention_mask": token_column(pa, np.ones(total, dtype=np.int8), starts),
        "labels": token_column(pa, labels, starts),
        "target_token_ids": token_column(pa, tgt_ids, starts),
        "target_logprobs": token_column(pa, tgt_lp, starts),
        "target_mask": token_column(pa, tgt_mask, starts),
    }
    return pa.RecordBatch.from_pydict(cols)


# -- import ---------------------------------------------------------------------------------------------------------
def is_saved_dataset(src: Path) -> bool:
    """A ``datasets`` ``save_to_disk`` directory (one split)."""
    return src.is_dir() and ((src / "dataset_info.json").is_file() or (src / "state.json").is_file())


def source_files(src: Path) -> list[Path]:
    if not src.exists():
        raise UsageError(
            f"{src} does not exist; give an axolotl dataset (a .parquet file, a directory of them, or a "
            "datasets save_to_disk directory)"
        )
    files = sorted(p for p in src.iterdir() if p.suffix == ".parquet" and p.is_file()) if src.is_dir() else [src]
    if not files:
        raise UsageError(f"{src} holds no .parquet file and is not a datasets save_to_disk directory")
    return files


def source_table(src: Path):
    """The Arrow table of a ``save_to_disk`` directory (memory-mapped by ``datasets``)."""
    import datasets

    ds = datasets.load_from_disk(str(src))
    if not hasattr(ds, "data"):
        raise UsageError(f"{src} is a DatasetDict; give the directory of one split (e.g. {src}/train)")
    return ds.data.table


def source_batches(src: Path, columns: list[str], batch_rows: int) -> Iterator:
    """Record batches of an axolotl dataset: a .parquet file, a directory of them, or a ``save_to_disk``
    directory."""
    _, pq = pyarrow_modules()
    if is_saved_dataset(src):
        yield from source_table(src).select(columns).to_batches(max_chunksize=batch_rows)
        return
    for f in source_files(src):
        yield from pq.ParquetFile(str(f)).iter_batches(batch_size=batch_rows, columns=columns)


def source_schema(src: Path):
    """(Arrow schema, file metadata or None, rows) of an axolotl dataset (UsageError if it is none of the accepted
    forms)."""
    pa, pq = pyarrow_modules()
    try:
        if is_saved_dataset(src):
            t = source_table(src)
            return t.schema, None, t.num_rows
        files = source_files(src)
        pfs = [pq.ParquetFile(str(f)) for f in files]
        return pfs[0].schema_arrow, pfs[0].schema_arrow.metadata or {}, sum(p.metadata.num_rows for p in pfs)
    except arrow_error(pa) as e:
        raise UsageError(
            f"{src} is not a readable Parquet file or saved dataset ({str(e).splitlines()[0][:120]})"
        ) from None


def check_source_columns(schema, src: Path) -> None:
    names = set(schema.names)
    if "logprobs" in names and "target_token_ids" not in names:
        raise UsageError(
            f"{src} is a raw axolotl KD dataset (messages + logprobs): tokenize it first (axolotl preprocess), then "
            "import the prepared dataset"
        )
    missing = [c for c in ("input_ids", *TARGET_COLUMNS) if c not in names]
    if missing:
        raise UsageError(
            f"{src} lacks the column {missing[0]!r}: not an axolotl KD dataset (its collator pops target_token_ids, "
            "target_logprobs and target_mask from each tokenized row)"
        )


def ragged(pa, col, name: str, depth: int) -> tuple:
    """A list<...> column -> (values, row lengths[, inner width]); depth 2 for list<list<T>> (the inner lists must
    all have one length K: returned as (values (tokens, K), row lengths, K))."""
    if col.null_count:
        raise CacheError(f"column {name!r} has null rows")
    lengths = col.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    inner = col.flatten()
    if depth == 1:
        return inner.to_numpy(zero_copy_only=False), lengths
    if pa.types.is_fixed_size_list(inner.type):
        k = inner.type.list_size
    else:
        il = inner.value_lengths().to_numpy(zero_copy_only=False)
        k = int(il[0]) if len(il) else 0
        if len(il) and (il != k).any():
            raise CacheError(
                f"column {name!r} has positions with different numbers of entries ({int(il.min())} to "
                f"{int(il.max())}); kdcli top-k caches hold the same k per token"
            )
    vals = inner.flatten().to_numpy(zero_copy_only=False)
    return (vals.reshape(-1, k) if k else vals.reshape(len(inner), 0)), lengths, k


def predicted_rows(mask_row: np.ndarray, L: int, alignment: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(target rows, predicted token positions, dropped) of one sequence from its (L, K) target_mask: a row takes
    part where any entry is set; 'next' rows predict token t + 1 (the last row has none: dropped), 'token' rows
    token t (row 0 has no context: dropped)."""
    on = np.flatnonzero(mask_row.any(axis=1)) if mask_row.size else np.zeros(0, np.int64)
    pos = on + 1 if alignment == "next" else on
    keep = (pos < L) & (pos >= 1)
    return on[keep], pos[keep], int((~keep).sum())


def target_batch(
    pa,
    batch,
    row0: int,
    keep: np.ndarray,
    row_hash: np.ndarray,
    *,
    V: int,
    K: int,
    T: float,
    alignment: str,
    stats: dict,
    src: Path,
    id_dtype: np.dtype,
) -> dict[str, np.ndarray]:
    """One record batch of an axolotl dataset -> the arrays of a kdcli topk token cache (``keep``: which of the
    batch's rows become cache rows; ``row0``: the cache row of the first kept one)."""
    ids, lens = ragged(pa, batch.column("input_ids"), "input_ids", 1)
    tid, _, _ = ragged(pa, batch.column("target_token_ids"), "target_token_ids", 2)
    tlp, _, _ = ragged(pa, batch.column("target_logprobs"), "target_logprobs", 2)
    mask, _, _ = ragged(pa, batch.column("target_mask"), "target_mask", 2)
    starts = np.concatenate([[0], np.cumsum(lens)])
    sel_rows, sel_tok, lengths = [], [], []
    for r in np.flatnonzero(keep):
        a, b = int(starts[r]), int(starts[r + 1])
        rows_at, pos, _ = predicted_rows(mask[a:b], b - a, alignment)
        if rows_at.size and not mask[a:b][rows_at].all():
            t = int(rows_at[np.flatnonzero(~mask[a:b][rows_at].all(axis=1))[0]])
            raise CacheError(
                f"{src}: row {r} of a batch, position {t}, masks some of its {K} entries; kdcli top-k caches hold "
                "all k per token"
            )
        sel_rows.append(a + rows_at)
        sel_tok.append(a + pos)
        lengths.append(len(pos))
    n = len(lengths)
    sel = np.concatenate(sel_rows).astype(np.int64) if n else np.zeros(0, np.int64)
    nxt = ids[np.concatenate(sel_tok).astype(np.int64)] if n else np.zeros(0, np.int64)
    t_ids = tid[sel].astype(np.int64)  # (tokens, K)
    lp = tlp[sel].astype(np.float64)
    cum = np.cumsum(lengths)

    def where(i: int) -> str:
        return f"cache row {row0 + int(np.searchsorted(cum, i, side='right'))}"

    if t_ids.size and (t_ids.min() < 0 or t_ids.max() >= V):
        i = int(np.flatnonzero(((t_ids < 0) | (t_ids >= V)).any(axis=1))[0])
        raise CacheError(
            f"{src}: {where(i)} has a target id {int(t_ids[i].max())} outside the vocabulary of {V} (pass "
            "--vocab-size with the teacher's)"
        )
    if np.isnan(lp).any() or (lp > 1e-6).any():
        i = int(np.flatnonzero((np.isnan(lp) | (lp > 1e-6)).any(axis=1))[0])
        raise CacheError(f"{src}: {where(i)} has NaN or positive target_logprobs; axolotl's layout holds log-probs")
    if T != 1.0:
        lp = log_softmax(T * lp)
    with np.errstate(under="ignore"):
        mass = np.exp(lp).sum(axis=1)  # (tokens,)
    if (mass > 1 + SUM_TOL).any():
        i = int(np.flatnonzero(mass > 1 + SUM_TOL)[0])
        raise CacheError(
            f"{src}: {where(i)} has target probabilities summing to {mass[i]:.4f} > 1: these are not log-probs "
            "(logits?); axolotl's loss takes normalised log-probs"
        )
    norm = mass >= 1 - SUM_TOL
    lp = np.where(norm[:, None], lp - np.log(mass)[:, None], lp)  # renormalised exactly where it was meant to be
    with np.errstate(divide="ignore"):
        tail = np.where(norm, -np.inf, np.log1p(-np.minimum(mass, 1.0)))
    stats["renormalized"] += int(norm.sum())
    stats["raw"] += int((~norm).sum())
    order = np.argsort(-lp, axis=1, kind="stable")
    lp = np.take_along_axis(lp, order, axis=1)
    t_ids = np.take_along_axis(t_ids, order, axis=1)
    if K > 1:
        s = np.sort(t_ids, axis=1)
        dup = (s[:, 1:] == s[:, :-1]).any(axis=1)
        if dup.any():
            raise CacheError(f"{src}: {where(int(np.flatnonzero(dup)[0]))} lists a target id twice")
    hit = t_ids == nxt[:, None]
    found = hit.any(axis=1)
    target = np.where(found, np.where(hit, lp, 0.0).sum(axis=1), lp[:, -1])
    stats["target_exact"] += int(found.sum())
    stats["target_bound"] += int((~found).sum())
    out = {
        "row_index": np.arange(row0, row0 + n, dtype=np.int64),
        "sample_index": np.arange(row0, row0 + n, dtype=np.int64),
        "row_hash": row_hash[row0 : row0 + n],
        "lengths": np.asarray(lengths, dtype=np.int64),
        "target_logprobs": target.astype(np.float16),
    }
    if import_mode(K, V) == "full":  # every class listed (distinct ids, all < V): the full distribution, by class
        if (~norm).any():
            i = int(np.flatnonzero(~norm)[0])
            raise CacheError(
                f"{src}: {where(i)} lists all {V} classes but their probabilities sum to {mass[i]:.4f}, not 1"
            )
        full = np.empty_like(lp)  # (tokens, V)
        np.put_along_axis(full, t_ids, lp, axis=1)
        return {**out, "logprobs": full.astype(np.float16)}
    return {**out, "topk_ids": t_ids.astype(id_dtype), "topk_logprobs": lp.astype(np.float16),
            "tail_logmass": tail.astype(np.float16)}  # fmt: skip


class AxolotlFormat(Format):
    name = "axolotl"
    exports = imports = True
    export_options = ("temperature", "alignment")
    import_options = ("temperature", "alignment", "vocab_size")
    export_data = "required"
    import_tokenizer = True
    import_passes = 2
    summary = "the pre-tokenized dataset axolotl's KD plugin trains from (top-k ids + renormalised log-probs)"

    # -- export ------------------------------------------------------------------------------------------------
    def plan_export(self, manifest, opts):
        check_alignment(opts.alignment or "next")
        T = check_temperature(1.0 if opts.temperature is None else opts.temperature)
        if not is_token(manifest):
            raise UsageError(
                "axolotl's KD plugin trains language models from token-level targets; this is a classification "
                "cache: export it with --format parquet"
            )
        mode = get_mode(manifest["mode"])
        if mode.sampled:
            raise UsageError(
                f"a {mode.name} cache cannot be exported to axolotl: its ids are random draws weighted by the "
                f"{mode.name} estimator, and axolotl's loss weights the listed ids by the teacher's probability, "
                "which would silently train on another loss; export a topk cache (cache-teacher --top-k K) or use "
                "--format parquet"
            )
        V = int(manifest["num_classes"])
        if not mode.sparse and V > MAX_FULL_CLASSES:
            raise UsageError(
                f"a {mode.name} cache over {V:,} classes would be exported as {V:,} ids per token (~{9 * V:,} bytes a "
                f"token); the limit is {MAX_FULL_CLASSES:,}: build a topk cache (cache-teacher --top-k 64) for axolotl"
            )
        ids_key, lp_key = exported_arrays(manifest)
        dropped = [k for k in mode.keys(manifest.get("temperatures")) if k not in (ids_key, lp_key)]
        ts = ", ".join(f"{t:g}" for t in manifest.get("stat_temperatures") or ())
        lost = []
        if dropped:
            lost.append(
                f"{', '.join(dropped)}: axolotl's rows hold the k teacher log-probs renormalised to sum to 1 and its "
                "loss has no term for the mass outside them (kdcli's is the exact KL on k + 1 buckets)"
            )
        if ts or T != 1.0 or not mode.sparse:
            what = f" (the cache stores statistics for T = {ts})" if ts else ""
            lost.append(
                f"every temperature but T = {T:g}{what}: the rows hold the teacher at T = {T:g}; set "
                f"kd_temperature: {T:g} in the axolotl config"
            )
        lost.append(
            "target_logprobs (the teacher's log-prob of each actual next token) and the row identity (row_index, "
            "row_hash): rows are written in cache order"
        )
        return lost

    def export(self, reader, out, *, data, opts, progress):
        pa, pq = pyarrow_modules()
        m = reader.manifest
        T = 1.0 if opts.temperature is None else float(opts.temperature)
        alignment = opts.alignment or "next"
        keys = exported_arrays(m)
        K = int(m["num_classes"]) if keys[0] is None else int(m[get_mode(m["mode"]).size_key])
        meta = {
            "kdcli_version": m.get("kdcli_version"),
            "teacher": m["teacher"],
            "tokenizer": m.get("tokenizer"),
            "data": m["data"],
            "mode": m["mode"],
            "k": K,
            "temperature": T,
            "alignment": alignment,
            "renormalized": True,
        }
        rows = tokens = 0
        writer, shard = None, None
        try:
            for i, first, arrays in cache_blocks(reader, opts.block_values):
                n = len(arrays["row_index"])
                batch = axolotl_batch(pa, arrays, data, first, K=K, T=T, alignment=alignment, keys=keys)
                if i != shard:
                    if writer is not None:
                        writer.close()
                    schema = batch.schema.with_metadata({META_EXPORT: json.dumps(meta).encode()})
                    writer, shard = pq.ParquetWriter(str(out / part_name(i)), schema, compression="zstd"), i
                writer.write_batch(batch, row_group_size=n)
                rows += n
                tokens += int(arrays["lengths"].sum())
                progress.advance(n)
        finally:
            if writer is not None:
                writer.close()
        return rows, tokens, len(reader.shards)

    # -- import ------------------------------------------------------------------------------------------------
    def source_rows(self, src, opts):
        schema, _, rows = source_schema(src)
        check_source_columns(schema, src)
        return rows

    def import_into(self, src, work, *, final, tokenizer, opts, progress):
        alignment = check_alignment(opts.alignment or "next")
        T = check_temperature(1.0 if opts.temperature is None else opts.temperature)
        schema, meta, _ = source_schema(src)
        check_source_columns(schema, src)
        V = int(opts.vocab_size or tokenizer.size)
        if V < tokenizer.size:
            raise UsageError(f"--vocab-size {V} is smaller than the tokenizer's {tokenizer.size} tokens")
        pa, _ = pyarrow_modules()
        block_rows = 256

        # pass 1: row identity (token ids + predicted positions), sizes; the pre-tokenized rows beside the cache
        hashes, keeps, n_tokens, n_targets, K, longest, dropped, skipped = [], [], 0, 0, None, 1, 0, 0
        from kdcli.lm.text import token_row_hashes

        tok_writer = TokenRowsWriter(work / TOKENS_FILE)
        try:
            for batch in source_batches(src, ["input_ids", "target_mask"], block_rows):
                ids, lens = ragged(pa, batch.column("input_ids"), "input_ids", 1)
                mask, mlens, k = ragged(pa, batch.column("target_mask"), "target_mask", 2)
                if not np.array_equal(lens, mlens):
                    raise CacheError(
                        f"{src}: target_mask has other row lengths than input_ids (a row's targets must cover its "
                        "tokens, as axolotl's collator pads them together)"
                    )
                K = k if K is None else K
                if k != K:
                    raise CacheError(
                        f"{src}: rows hold {K} and {k} entries per position; kdcli top-k caches hold one k"
                    )
                starts = np.concatenate([[0], np.cumsum(lens)])
                keep = np.zeros(len(lens), dtype=bool)
                seqs, masks = [], []
                for r in range(len(lens)):
                    s = ids[starts[r] : starts[r + 1]].astype(np.int32)
                    _, pos, d = predicted_rows(mask[starts[r] : starts[r + 1]], len(s), alignment)
                    dropped += d
                    if not len(pos):
                        skipped += 1
                        continue
                    m = np.zeros(len(s), dtype=bool)
                    m[pos] = True
                    keep[r] = True
                    hashes.append(token_row_hashes([s], np.array([int(pos[0])]), [m])[0])
                    seqs.append(s)
                    masks.append(m)
                    n_tokens += len(s)
                    n_targets += len(pos)
                    longest = max(longest, len(s))
                keeps.append(keep)
                tok_writer.add(seqs, masks)
                progress.advance(len(lens))
        finally:
            tok_writer.close()
        if not hashes:
            raise UsageError(f"{src} holds no row with a masked-in target (target_mask is 0 everywhere)")
        if K < 1:
            raise CacheError(f"{src}: target_token_ids hold no entries")
        row_hash = np.array(hashes, dtype=np.uint64)
        export_meta = json.loads(meta.get(META_EXPORT, b"null")) if meta else None
        teacher = unrecorded_teacher(self.name, str(src))
        unrecorded = list(UNRECORDED)
        if export_meta and isinstance(export_meta.get("teacher"), dict):
            teacher = {**export_meta["teacher"], "recorded": "kdcli export metadata (kdcli.axolotl) of the source"}
            unrecorded[0] = "the teacher is taken from the kdcli export metadata in the file (axolotl records none)"
        approximate = []
        if T != 1.0:
            approximate.append(
                f"the source's log-probs were taken as the teacher at T = {T:g} and un-tempered over the K ids "
                "(log_softmax(T * values)); the tail mass, if any, is not recoverable"
            )
        plan = imported_token_plan(
            fmt=self.name,
            source=str(src),
            mode_name=import_mode(K, V),
            k=None if import_mode(K, V) == "full" else K,
            vocab=V,
            tokenizer=tokenizer,
            teacher=teacher,
            data=token_data_identity(self.name, str(src), str(final / TOKENS_FILE), n_tokens, row_hash, n_targets, V),
            num_rows=len(row_hash),
            longest=longest,
            notes={"alignment": alignment, "temperature": T, "dropped_targets": dropped, "tokens": TOKENS_FILE},
            unrecorded=unrecorded,
            approximate=approximate,
        )
        id_dtype = numpy_id_dtype(V)
        stats = {"renormalized": 0, "raw": 0, "target_bound": 0, "target_exact": 0}

        def batches() -> Iterator[dict[str, np.ndarray]]:  # pass 2: the targets
            row0 = 0
            for keep, batch in zip(keeps, source_batches(src, ["input_ids", *TARGET_COLUMNS], block_rows)):
                yield target_batch(
                    pa,
                    batch,
                    row0,
                    keep,
                    row_hash,
                    V=V,
                    K=K,
                    T=T,
                    alignment=alignment,
                    stats=stats,
                    src=src,
                    id_dtype=id_dtype,
                )
                row0 += int(keep.sum())
                progress.advance(batch.num_rows)

        final_m = write_cache(work, plan, batches())
        if stats["renormalized"] and K < V:
            unrecorded.append(
                f"the tail mass outside the top {K} at {stats['renormalized']:,} of {n_targets:,} positions (their "
                f"{K} probabilities sum to 1: stored as an empty tail)"
            )
        if stats["target_bound"]:
            approximate.append(
                f"target_logprobs at {stats['target_bound']:,} of {n_targets:,} positions whose next token is not "
                f"among the {K} ids: the smallest of the {K} log-probs (an upper bound)"
            )
        final_m["imported"].update(unrecorded=unrecorded, approximate=approximate, positions=dict(stats))
        write_manifest(work, final_m)
        notes = []
        if dropped:
            notes.append(
                f"{dropped:,} masked-in target rows had no token to predict ({alignment} alignment) and were dropped"
            )
        if skipped:
            notes.append(f"{skipped:,} source rows predict no token (target_mask 0 everywhere) and were skipped")
        return Imported(
            manifest=final_m,
            tokens=n_targets,
            tokens_file=True,
            unrecorded=unrecorded,
            approximate=approximate,
            notes=notes,
        )


FORMAT_OBJECT = AxolotlFormat()
