"""Reading token-level caches (layout kind ``token``): per-row arrays + ``offsets`` + flattened token arrays.

Shard rows ``[a, b)`` cover tokens ``[offsets[a], offsets[b])`` of every token array. Training order, the split
over DDP ranks and DataLoader workers are :class:`~kdcli.cache.reader.CacheReader`'s (contiguous row blocks,
shuffled in memory a few blocks at a time, memory flat in the cache size); this reader only reads a block's
ragged arrays and selects rows of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from kdcli.cache.modes import get_mode
from kdcli.cache.reader import ROW_KEYS, Block, CacheReader
from kdcli.cache.storage import Span
from kdcli.cache.verify import block_problems
from kdcli.infra.errors import CacheError

SPAN_KEYS = ("span_segment", "span_start", "span_end")
"""Per cached position, where the predicted teacher token sits in the text (int32; kdcli.lm.align): recorded when
the manifest has an ``xtok`` object, read only by a reader asked for them (``read_spans``)."""


def token_keys(mode: str, temperatures=None, spans: bool = False) -> tuple[str, ...]:
    """The arrays a token cache stores per predicted token: the mode's (for its stored temperatures), the
    teacher's log-prob of the token that follows and, with ``spans``, the token spans."""
    return get_mode(mode).keys(temperatures) + ("target_logprobs",) + (SPAN_KEYS if spans else ())


class TokenCacheReader(CacheReader):
    """A :class:`CacheReader` for ``kind: token`` caches; batches are dicts with ``lengths`` + token arrays."""

    def __init__(self, cache_dir: str | Path):
        super().__init__(cache_dir)
        if self.manifest.get("kind") != "token":
            raise CacheError(
                f"cache {self.dir} is a {self.manifest.get('kind')} cache, not a token-level (LM) "
                "cache; build one from .jsonl DATA"
            )
        self.vocab_size = self.num_classes
        self.bytes_per_row = sum(s["bytes"] for s in self.shards) / max(self.num_rows, 1)
        self._offsets: dict[int, np.ndarray] = {}  # per shard, read once: 8 bytes a row
        self.read_spans = False  # also read the token spans (a cache that records them: manifest "xtok")

    def shard_offsets(self, shard: int) -> np.ndarray:
        """The ``offsets`` array of a shard (rows + 1 token positions), memoised: a remote read of a block's
        token arrays needs their positions before it can fetch them."""
        off = self._offsets.get(shard)
        if off is None:
            try:
                off = self._offsets[shard] = self._file(shard)["offsets"][()]
            except (KeyError, OSError) as e:
                raise self.unreadable(shard, e) from None
        return off

    def block_spans(self, b: Block) -> Iterator[Span]:
        """Row arrays by row, ``offsets`` by row + 1, token arrays by the block's token range (lazy: a local
        cache never asks)."""
        yield from ((b.shard, k, b.start, b.stop) for k in ROW_KEYS)
        yield b.shard, "offsets", b.start, b.stop + 1
        off = self.shard_offsets(b.shard)
        t0, t1 = int(off[b.start]), int(off[b.stop])
        yield from ((b.shard, k, t0, t1) for k in self.token_keys)

    @property
    def has_spans(self) -> bool:
        return bool(self.manifest.get("xtok"))

    @property
    def token_keys(self) -> tuple[str, ...]:
        return token_keys(self.mode, self.manifest.get("temperatures"), self.read_spans and self.has_spans)

    def token_column(self, key: str):
        """Yield ``(first row, offsets, values)`` of one per-token array, shard by shard: an index over the whole
        cache reads one small column, not the targets."""
        for i, s in enumerate(self.shards):
            try:
                off = self.shard_offsets(i)
                with self._shards.hold([(i, key, 0, int(off[-1]))]):
                    values = self._file(i)[key][()]
            except (KeyError, OSError, ValueError) as e:
                raise self.unreadable(i, e) from None
            yield s["row_start"], off, values

    def read_block(self, b) -> dict[str, np.ndarray]:
        f = self._file(b.shard)
        try:
            with self._shards.hold(self.block_spans(b)):  # remote: one concurrent fetch unless fetched ahead
                out = {k: f[k][b.start : b.stop] for k in ROW_KEYS}
                off = f["offsets"][b.start : b.stop + 1]
                out["lengths"] = np.diff(off).astype(np.int64)
                for k in self.token_keys:
                    out[k] = f[k][off[0] : off[-1]]
        except (KeyError, OSError, ValueError) as e:
            raise self.unreadable(b.shard, e) from None
        # the same cheap content checks as classification reads (row ids, finiteness, normalisation per token)
        row0 = self.shards[b.shard]["row_start"] + b.start
        token_rows = np.repeat(np.arange(row0, row0 + len(out["lengths"])), out["lengths"])
        problems = block_problems(
            self.manifest, {k: v for k, v in out.items() if k != "lengths"}, row0, token_rows=token_rows
        )
        if problems:
            raise CacheError(
                f"cache {self.dir}: shard {self.shards[b.shard]['name']} is damaged: {problems[0]}; "
                f"run `kdcli cache verify {self.dir}`"
            )
        return out

    @property
    def keys(self) -> tuple[str, ...]:
        return ROW_KEYS + ("lengths",) + self.token_keys

    def row_bytes(self) -> int:
        """Mean bytes per row (sequence) in the shards: rows are ragged."""
        return max(1, int(self.bytes_per_row))

    @staticmethod
    def take(buf: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
        return take_rows(buf, rows)

    @staticmethod
    def slice_rows(buf: dict[str, np.ndarray], a: int, b: int) -> dict[str, np.ndarray]:
        lengths = buf["lengths"]
        t0, t1 = int(lengths[:a].sum()), int(lengths[:b].sum())
        return {k: (v[a:b] if k in ROW_KEYS + ("lengths",) else v[t0:t1]).copy() for k, v in buf.items()}


def take_rows(buf: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Select rows (any order) of a ragged batch: row arrays by index, token arrays by each row's token range."""
    lengths = buf["lengths"]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    sel_len = lengths[rows]
    # token index of every selected token: starts[row] + 0..len-1, vectorised
    tok = np.repeat(starts[rows] - np.concatenate([[0], np.cumsum(sel_len)[:-1]]), sel_len) + np.arange(sel_len.sum())
    return {k: (v[rows] if k in ROW_KEYS + ("lengths",) else v[tok]) for k, v in buf.items()}
