"""Reading token-level caches (layout kind ``token``): per-row arrays + ``offsets`` + flattened token arrays.

Shard rows ``[a, b)`` cover tokens ``[offsets[a], offsets[b])`` of every token array. Reads are contiguous row
blocks (one HDF5 read per array), shuffled in memory a few blocks at a time, so memory is bounded by
``block_rows * shuffle_blocks`` rows whatever the cache size. Files are opened lazily in the reading process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from kdcli.cache.reader import ROW_KEYS, CacheReader
from kdcli.cache.verify import block_problems
from kdcli.errors import CacheError

BLOCK_BYTES = 32 << 20
TOKEN_KEYS = {"full": ("logprobs", "target_logprobs"),
              "topk": ("topk_ids", "topk_logprobs", "tail_logmass", "target_logprobs"),
              "sample": ("sample_ids", "sample_counts", "sample_logprobs", "target_logprobs")}


class TokenCacheReader(CacheReader):
    """A :class:`CacheReader` for ``kind: token`` caches; batches are dicts with ``lengths`` + token arrays."""

    def __init__(self, cache_dir: str | Path):
        super().__init__(cache_dir)
        if self.manifest.get("kind") != "token":
            raise CacheError(f"cache {self.dir} is a {self.manifest.get('kind')} cache, not a token-level (LM) "
                             "cache; build one from .jsonl DATA")
        self.vocab_size = self.num_classes
        self.bytes_per_row = sum(s["bytes"] for s in self.shards) / max(self.num_rows, 1)

    @property
    def token_keys(self) -> tuple[str, ...]:
        return TOKEN_KEYS[self.mode]

    def read_block(self, b) -> dict[str, np.ndarray]:
        f = self._file(b.shard)
        try:
            out = {k: f[k][b.start:b.stop] for k in ROW_KEYS}
            off = f["offsets"][b.start:b.stop + 1]
            out["lengths"] = np.diff(off).astype(np.int64)
            for k in self.token_keys:
                out[k] = f[k][off[0]:off[-1]]
        except (KeyError, OSError, ValueError) as e:
            raise CacheError(f"shard {self.shards[b.shard]['name']} is unreadable or lacks a dataset ({e}); "
                             f"run `kdcli cache verify {self.dir}`") from None
        # the same cheap content checks as classification reads (row ids, finiteness, normalisation per token)
        row0 = self.shards[b.shard]["row_start"] + b.start
        token_rows = np.repeat(np.arange(row0, row0 + len(out["lengths"])), out["lengths"])
        problems = block_problems(self.manifest, {k: v for k, v in out.items() if k != "lengths"}, row0,
                                  token_rows=token_rows)
        if problems:
            raise CacheError(f"cache {self.dir}: shard {self.shards[b.shard]['name']} is damaged: {problems[0]}; "
                             f"run `kdcli cache verify {self.dir}`")
        return out

    def iter_batches(self, *, batch_size: int, seed: int, epoch: int, block_rows: int | None = None,
                     shuffle_blocks: int = 8, keep: np.ndarray | None = None, rank: int = 0, world: int = 1,
                     skip_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """One epoch of shuffled row batches; the order is a pure function of (seed, epoch, rank, world).

        By default a block is ~32 MB of cache (at least one batch), so the shuffle buffer stays ~256 MB whether
        a row holds 64 tokens of top-8 or 512 tokens of full log-probs."""
        if block_rows is None:
            block_rows = max(batch_size, int(BLOCK_BYTES // max(self.bytes_per_row, 1)))
        rng = np.random.default_rng([seed, epoch])
        blocks = self.blocks(block_rows)
        order = rng.permutation(len(blocks))[rank::world]
        carry: dict[str, np.ndarray] | None = None
        produced = 0
        for g in range(0, len(order), shuffle_blocks):
            buf = concat([self.read_block(blocks[j]) for j in order[g:g + shuffle_blocks]])
            if keep is not None:
                buf = take_rows(buf, np.flatnonzero(keep[buf["sample_index"]]))
            buf = take_rows(buf, rng.permutation(len(buf["row_index"])))
            if carry is not None:
                buf = concat([carry, buf])
            n = len(buf["row_index"])
            full = n - n % batch_size
            for a in range(0, full, batch_size):
                if produced >= skip_batches:
                    yield take_rows(buf, np.arange(a, a + batch_size))
                produced += 1
            carry = take_rows(buf, np.arange(full, n))
        if carry is not None and len(carry["row_index"]):
            if produced >= skip_batches:
                yield carry


def concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def take_rows(buf: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Select rows (any order) of a ragged batch: row arrays by index, token arrays by each row's token range."""
    lengths = buf["lengths"]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    sel_len = lengths[rows]
    # token index of every selected token: starts[row] + 0..len-1, vectorised
    tok = np.repeat(starts[rows] - np.concatenate([[0], np.cumsum(sel_len)[:-1]]), sel_len) + np.arange(sel_len.sum())
    return {k: (v[rows] if k in ROW_KEYS + ("lengths",) else v[tok]) for k, v in buf.items()}

