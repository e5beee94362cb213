"""What every cache format converter shares: the summaries, block reads of a cache through its reader, the writing of
an imported cache through kdcli's own :class:`~kdcli.cache.writer.ShardWriter`, the manifest of an import whose source
records less than kdcli does, and the pre-tokenized rows (``tokens.parquet``) an import writes beside its shards.

Where the files go is the stage's business (:mod:`kdcli.stages.convert`: ``--out`` checks, ``--overwrite`` built
beside and swapped in whole); a converter writes into the directory it is given.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from kdcli import __version__
from kdcli.cache.manifest import new_manifest
from kdcli.cache.modes import get_mode
from kdcli.cache.reader import ROW_KEYS, CacheReader
from kdcli.cache.tokens import token_keys
from kdcli.cache.verify import block_problems
from kdcli.cache.writer import ShardWriter, resolve_compression
from kdcli.data import fingerprint
from kdcli.infra import log
from kdcli.infra.errors import CacheError, UsageError
from kdcli.infra.fmt import TableData, human_bytes, key_values

BLOCK_VALUES = 1 << 22
"""Values (entries of the widest array) read per block while converting: memory stays flat in the cache size
(~4M values: 8 MB of fp16 log-probs, a few blocks' worth of Arrow buffers at most)."""

SHARD_BYTES = 256 << 20  # an imported token cache's shards hold about this much, as cache-teacher's do
TOKENS_FILE = "tokens.parquet"
"""The pre-tokenized rows (``input_ids``, ``labels``; :mod:`kdcli.lm.pretokenized`) an import writes beside the
shards: the DATA to train and evaluate an imported cache with (``--data CACHE/tokens.parquet``)."""


class Advance(Protocol):
    """What a converter reports progress to (:class:`kdcli.infra.log.Progress`)."""

    def advance(self, n: int = 1) -> None: ...


class NoProgress:
    def advance(self, n: int = 1) -> None:
        pass


@dataclass
class ExportSummary:
    """What ``kdcli cache export`` wrote."""

    format: str
    cache_dir: str
    out: str
    kind: str  # "token" or "classification"
    mode: str
    rows: int
    tokens: int | None  # predicted tokens (token caches)
    files: int  # Parquet files in ``out``
    bytes: int  # size of the output
    cache_bytes: int  # size of the cache's shards
    lost: list[str] = field(default_factory=list)  # what the format cannot carry (each also said on stderr)
    seconds: float = 0.0

    @property
    def bytes_per_unit(self) -> float:
        """Output bytes per predicted token (token caches) or per row."""
        return self.bytes / max(self.tokens if self.tokens is not None else self.rows, 1)

    @property
    def cache_bytes_per_unit(self) -> float:
        return self.cache_bytes / max(self.tokens if self.tokens is not None else self.rows, 1)

    def table(self) -> TableData:
        unit = "token" if self.tokens is not None else "row"
        rows = [
            ("cache", f"{self.cache_dir} ({self.kind}, mode {self.mode})"),
            ("rows", f"{self.rows:,}" + (f" ({self.tokens:,} predicted tokens)" if self.tokens is not None else "")),
            ("files", f"{self.files} Parquet file(s), {human_bytes(self.bytes)}"),
            (f"bytes per {unit}", f"{self.bytes_per_unit:,.1f} (the cache: {self.cache_bytes_per_unit:,.1f})"),
            ("not carried", "; ".join(self.lost) if self.lost else "nothing: every array crosses"),
            ("time", f"{self.seconds:.1f} s"),
        ]
        return key_values(f"cache export --format {self.format} -> {self.out}", rows)


@dataclass
class ImportSummary:
    """What ``kdcli cache import`` wrote: a complete kdcli cache at ``out``."""

    format: str
    source: str
    out: str
    kind: str
    mode: str
    rows: int
    tokens: int | None
    shards: int
    bytes: int
    data: str | None = None  # the pre-tokenized DATA written beside the shards (train-student/eval --data)
    unrecorded: list[str] = field(default_factory=list)  # what the source did not record (the manifest says so)
    approximate: list[str] = field(default_factory=list)  # what is not exact in the imported arrays
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> TableData:
        rows = [
            ("cache", f"{self.out} ({self.kind}, mode {self.mode}, {self.shards} shard(s), {human_bytes(self.bytes)})"),
            ("rows", f"{self.rows:,}" + (f" ({self.tokens:,} predicted tokens)" if self.tokens is not None else "")),
        ]
        if self.data:
            rows.append(("DATA", f"{self.data} (pre-tokenized rows: train-student / eval --data)"))
        if self.unrecorded:
            rows.append(("not recorded by the source", "; ".join(self.unrecorded)))
        if self.approximate:
            rows.append(("approximate", "; ".join(self.approximate)))
        rows += [("notes", "; ".join(self.notes))] if self.notes else []
        rows.append(("time", f"{self.seconds:.1f} s"))
        return key_values(f"cache import --format {self.format} {self.source} -> {self.out}: verified", rows)


@dataclass
class Imported:
    """What a converter's import returns to the stage: the final manifest and its notes."""

    manifest: dict
    tokens: int | None
    tokens_file: bool = False  # a TOKENS_FILE was written
    unrecorded: list[str] = field(default_factory=list)
    approximate: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def say_lost(fmt: str, lost: Iterable[str]) -> list[str]:
    """One stderr line per thing the export cannot carry; returns the list."""
    lost = list(lost)
    for line in lost:
        log.warn(f"export --format {fmt}: {line}")
    return lost


def pyarrow_modules():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(
            "cache export/import needs pyarrow: pip install 'kdcli[data-lm]' (or pip install pyarrow)"
        ) from None
    return pa, pq


def arrow_error(pa) -> tuple[type[BaseException], ...]:
    """The exceptions pyarrow raises for a file that is not what it should be."""
    return (OSError, ValueError, pa.ArrowException)


# -- reading a cache block by block ----------------------------------------------------------------------------------
def entry_width(manifest: dict) -> int:
    """Values per row (classification) or per token (token caches) of the widest stored array: the classes for a
    mode that keeps them all, else the mode's K (``top_k`` / ``samples``)."""
    mode = get_mode(manifest["mode"])
    if not mode.sparse or mode.size_key is None:
        return int(manifest["num_classes"])
    return int(manifest.get(mode.size_key) or 1)


def is_token(manifest: dict) -> bool:
    return manifest.get("kind") == "token"


def cache_blocks(reader: CacheReader, block_values: int = BLOCK_VALUES) -> Iterator[tuple[int, int, dict]]:
    """``(shard index, global first row, arrays)`` for consecutive blocks of every shard, in row order, each read
    by the reader with its checks (a damaged block raises CacheError). Token caches' blocks hold ``lengths`` and the
    token arrays of their rows. Blocks hold about ``block_values`` values of the widest array (token caches: by the
    mean predicted tokens per row), at least one row."""
    m = reader.manifest
    per_row = entry_width(m)
    if is_token(m):
        per_row *= max(1, int(m["data"].get("num_targets") or 0) // max(int(m["num_rows"]), 1))
    for b in reader.blocks(max(1, block_values // max(per_row, 1))):
        yield b.shard, reader.shards[b.shard]["row_start"] + b.start, reader.read_block(b)


# -- writing an imported cache ---------------------------------------------------------------------------------------
def row_keys(manifest: dict) -> tuple[str, ...]:
    return ROW_KEYS + (("aug_params",) if manifest.get("aug_param_names") else ())


def stored_keys(manifest: dict) -> tuple[str, ...]:
    """The mode's arrays a shard holds (token caches: per token, with ``target_logprobs``), in the reader's order."""
    if is_token(manifest):
        return token_keys(manifest["mode"], manifest.get("temperatures"))
    return get_mode(manifest["mode"]).keys(manifest.get("temperatures"))


def write_cache(directory: Path, manifest: dict, batches: Iterable[dict[str, np.ndarray]]) -> dict:
    """Write a whole cache into the empty ``directory`` with kdcli's shard writer and return its final manifest.

    ``manifest`` is a plan (``shards`` empty, ``complete`` false) with ``shard_size`` and ``num_rows``; each batch
    holds the row arrays (:func:`row_keys`, global ``row_index`` in order) and the mode's arrays; for token caches
    also ``lengths`` (tokens per row) with the token arrays flattened. Every batch is checked with
    :func:`~kdcli.cache.verify.block_problems` first (the checks every training read runs), so a damaged source
    stops the import with CacheError naming the row instead of becoming a cache that fails ``cache verify``."""
    from kdcli.cache.manifest import write_manifest

    token = is_token(manifest)
    keys = row_keys(manifest) + (("lengths",) if token else ()) + stored_keys(manifest)
    manifest = {**manifest, "shards": [], "complete": False}
    write_manifest(directory, manifest)  # from its first instant the directory says which cache it is building
    writer = ShardWriter(
        directory,
        manifest,
        shard_size=int(manifest["shard_size"]),
        token_keys=frozenset(stored_keys(manifest)) if token else frozenset(),
        threaded=False,
        check_values=False,  # checked here, batch by batch, with a message naming the imported rows
    )
    seen = 0
    try:
        for batch in batches:
            missing = [k for k in keys if k not in batch]
            if missing:
                raise CacheError(f"the imported rows lack {missing[0]!r}")
            batch = {k: batch[k] for k in keys}  # the writer's order: byte-identical shards for the same arrays
            n = len(batch["row_index"])
            if not n:
                continue
            token_rows = np.repeat(np.arange(seen, seen + n), batch["lengths"]) if token else None
            problems = block_problems(manifest, {k: v for k, v in batch.items() if k != "lengths"}, seen, token_rows)
            if problems:
                raise CacheError(
                    f"imported rows {seen}..{seen + n - 1} are not a valid {manifest['mode']} cache: {problems[0]}"
                )
            writer.add(batch)
            seen += n
        writer.close()
    except BaseException:
        writer.abort()
        raise
    if seen != int(manifest["num_rows"]):
        raise CacheError(f"the source holds {seen} rows, its description says {manifest['num_rows']}")
    manifest["complete"] = True
    write_manifest(directory, manifest)
    return manifest


def token_shard_size(bytes_per_token: int, max_length: int) -> int:
    """Rows per shard for an imported token cache: shards of about :data:`SHARD_BYTES`, as cache-teacher sizes
    them."""
    return max(1, SHARD_BYTES // max(1, bytes_per_token * max_length))


@dataclass
class TokenizerInfo:
    """The tokenizer an import was given (``--tokenizer``): its identity for the manifest and its size."""

    spec: str
    identity: dict
    size: int


def imported_token_plan(
    *,
    fmt: str,
    source: str,
    mode_name: str,
    k: int | None,
    vocab: int,
    tokenizer: TokenizerInfo,
    teacher: dict,
    data: dict,
    num_rows: int,
    longest: int,
    notes: dict,
    unrecorded: list[str],
    approximate: list[str],
) -> dict:
    """The manifest plan of a token cache imported from another tool's capture (stored at T = 1 only, mode
    ``mode_name`` with K = ``k``): the layout the mode itself gives (:meth:`Mode.layout`), the settings a
    ``cache-teacher`` run records, and an ``imported`` entry saying where it came from, what the source did not
    record (``unrecorded``) and what is not exact (``approximate``). The text settings are those of pre-tokenized
    rows (``data_kind: tokens``, ``max_length`` the longest row, not packed)."""
    mode = get_mode(mode_name)
    mode_layout = {"mode": mode_name, **mode.layout(k, vocab, True), **mode.temperature_layout([1.0])}
    n_stats = len(mode_layout.get("stat_temperatures") or ())
    per_token = mode.bytes_per_entry(mode_layout, vocab, n_stats) + 2  # + target_logprobs
    shard_size = token_shard_size(per_token, longest)
    text = {"max_length": longest, "pack": False, "prompt_template": "{prompt}", "prompt_loss": False}
    temps = {"temperatures": [1.0]} if mode.sparse else {}
    settings = {
        "mode": mode_name,
        "top_k": mode_layout["top_k"],
        "samples": mode_layout["samples"],
        "views": 1,
        "augment": None,
        "seed": None,
        "shard_size": shard_size,
        "dtype": None,
        "teacher_prompt": None,
        **text,
        **temps,
        "source": f"{fmt}:{source}",
    }
    layout = {
        "kind": "token",
        "num_classes": vocab,
        "vocab_size": vocab,
        **mode_layout,
        "token_keys": list(token_keys(mode_name, [1.0])),
        "views": 1,
        "augment": None,
        "aug_param_names": [],
        "shard_size": shard_size,
        "compression": resolve_compression("auto", token=True, mode=mode_name),
        "text": {**text, "teacher_prompt": None, "data_kind": "tokens"},
    }
    m = new_manifest(
        teacher=teacher, data=data, settings=settings, layout=layout, num_rows=num_rows, tokenizer=tokenizer.identity
    )
    m["imported"] = {
        "format": fmt,
        "source": source,
        "kdcli_version": __version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "unrecorded": unrecorded,
        "approximate": approximate,
        **notes,
    }
    return m


def unrecorded_teacher(fmt: str, source: str) -> dict:
    """Teacher identity of an import whose source does not record the teacher: every field says so."""
    return {
        "spec": None,
        "args": {},
        "weights_sha256": None,
        "num_parameters": None,
        "recorded": False,
        "note": f"not recorded by the {fmt} source {source}",
    }


UNRECORDED = [
    "the teacher (spec, weights sha256, parameter count)",
    "the text the teacher read and its data fingerprint (the fingerprint is computed from the token ids)",
    "the tokenizer that made the token ids (the given --tokenizer is recorded, not checked against the source)",
]
"""What an axolotl dataset or a DistillKit capture does not record (the imported manifest's ``imported.unrecorded``)."""


def token_data_identity(
    fmt: str, source: str, tokens_path: str, num_tokens: int, row_hash: np.ndarray, num_targets: int, num_classes: int
) -> dict:
    """Data identity of imported token rows: the fingerprint is computed at import over the rows' token hashes
    (:func:`kdcli.lm.text.token_row_hashes`), so the pre-tokenized rows written beside the cache
    (``tokens_path``), and any kdcli DATA that gives the same sequences, match it; the source did not record which
    text the teacher read."""
    return {
        "spec": tokens_path,
        "kind": "tokens",
        "num_samples": len(row_hash),
        "num_tokens": int(num_tokens),
        "num_targets": int(num_targets),
        "num_classes": int(num_classes),
        "fingerprint": fingerprint(row_hash),
        "fingerprint_source": f"computed at import from the token ids in {fmt} source {source} (it records none)",
    }


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


# -- the pre-tokenized rows beside an imported cache ------------------------------------------------------------------
IGNORE_INDEX = -100


def labels_of(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Hugging Face labels of a sequence: the token where it is predicted, -100 elsewhere (unshifted)."""
    return np.where(mask, ids, IGNORE_INDEX).astype(np.int32)


class TokenRowsWriter:
    """Writes pre-tokenized rows (``input_ids`` list<int32>, ``labels`` list<int32>; :mod:`kdcli.lm.pretokenized`)
    to one Parquet file, a record batch at a time."""

    def __init__(self, path: Path, metadata: dict[bytes, bytes] | None = None):
        self.pa, self.pq = pyarrow_modules()
        pa = self.pa
        self.schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))]).with_metadata(
            metadata or {}
        )
        self.writer = self.pq.ParquetWriter(str(path), self.schema, compression="zstd")
        self.rows = 0

    def add(self, seqs: list[np.ndarray], masks: list[np.ndarray]) -> None:
        pa = self.pa
        if not seqs:
            return
        off = pa.array(np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int32))
        ids = pa.ListArray.from_arrays(off, pa.array(np.concatenate(seqs).astype(np.int32)))
        lab = pa.ListArray.from_arrays(off, pa.array(np.concatenate([labels_of(s, m) for s, m in zip(seqs, masks)])))
        self.writer.write_batch(pa.RecordBatch.from_arrays([ids, lab], schema=self.schema))
        self.rows += len(seqs)

    def close(self) -> None:
        self.writer.close()
