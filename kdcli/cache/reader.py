"""Lazy, streaming cache reads.

HDF5 files are opened on first use in the process that reads them (h5py handles cannot be pickled and HDF5 is
not fork-safe), so a reader can be handed to DataLoader workers. Training reads contiguous blocks (one HDF5 read
each), shuffles a few blocks' rows in memory and yields batches: memory is bounded by
``block_rows * shuffle_blocks`` rows whatever the cache size, and every read is sequential.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from kdcli.cache.manifest import check_matches_data, read_manifest
from kdcli.errors import CacheError

ROW_KEYS = ("row_index", "sample_index", "row_hash")
MODE_KEYS = {"full": ("logprobs",), "topk": ("topk_ids", "topk_logprobs", "tail_logmass"),
             "sample": ("sample_ids", "sample_counts", "sample_logprobs")}


@dataclass(frozen=True)
class Block:
    shard: int
    start: int  # local row offsets inside the shard
    stop: int


class CacheReader:
    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir)
        self.manifest = read_manifest(self.dir)
        self.mode: str = self.manifest["mode"]
        self.num_rows: int = int(self.manifest["num_rows"])
        self.num_classes: int = int(self.manifest["num_classes"])
        self.shards: list[dict] = self.manifest["shards"]
        self._files: dict[int, h5py.File] = {}
        self._check_cheap()

    # -- checks ------------------------------------------------------------------------------------------------
    def _check_cheap(self) -> None:
        """Manifest coverage and shard sizes: cheap enough to run before every training run."""
        expect = 0
        for s in self.shards:
            p = self.dir / s["name"]
            if s["row_start"] != expect:
                raise CacheError(f"cache {self.dir}: shards do not cover rows contiguously (gap at row {expect})")
            if not p.is_file():
                raise CacheError(f"cache {self.dir}: shard {s['name']} is missing; rebuild it by re-running "
                                 "cache-teacher with --overwrite")
            size = p.stat().st_size
            if size != s["bytes"]:
                raise CacheError(f"cache {self.dir}: shard {s['name']} has {size} bytes, the manifest says "
                                 f"{s['bytes']} (truncated or replaced); run `kdcli cache verify {self.dir}`")
            expect = s["row_stop"]
        if expect != self.num_rows:
            raise CacheError(f"cache {self.dir}: shards cover {expect} rows, the manifest says {self.num_rows}")

    def check_data(self, data_identity: dict) -> None:
        check_matches_data(self.manifest, data_identity, self.dir)
        if data_identity["num_classes"] > self.num_classes:
            raise CacheError(f"cache {self.dir} has {self.num_classes} classes but the data has labels up to "
                             f"{data_identity['num_classes'] - 1}")

    # -- file access -------------------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = {}  # reopened lazily in the worker
        return state

    def _file(self, i: int) -> h5py.File:
        f = self._files.get(i)
        if f is None:
            path = self.dir / self.shards[i]["name"]
            try:
                f = h5py.File(path, "r")
            except OSError as e:
                raise CacheError(f"cannot open shard {path}: {e}; run `kdcli cache verify {self.dir}`") from None
            self._files[i] = f
        return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    @property
    def keys(self) -> tuple[str, ...]:
        extra = ("aug_params",) if self.manifest.get("aug_param_names") else ()
        return ROW_KEYS + extra + MODE_KEYS[self.mode]

    def read_block(self, b: Block) -> dict[str, np.ndarray]:
        f = self._file(b.shard)
        try:
            return {k: f[k][b.start:b.stop] for k in self.keys}
        except (KeyError, OSError) as e:
            raise CacheError(f"shard {self.shards[b.shard]['name']} is unreadable or lacks a dataset "
                             f"({e}); run `kdcli cache verify {self.dir}`") from None

    def read_rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Global rows [start, stop) as one dict of arrays (may span shards)."""
        parts = []
        for i, s in enumerate(self.shards):
            a, b = max(start, s["row_start"]), min(stop, s["row_stop"])
            if a < b:
                parts.append(self.read_block(Block(i, a - s["row_start"], b - s["row_start"])))
        return {k: np.concatenate([p[k] for p in parts]) for k in self.keys}

    def blocks(self, block_rows: int) -> list[Block]:
        out = []
        for i, s in enumerate(self.shards):
            n = s["row_stop"] - s["row_start"]
            out += [Block(i, a, min(a + block_rows, n)) for a in range(0, n, block_rows)]
        return out

    # -- training order ----------------------------------------------------------------------------------------
    def iter_batches(self, *, batch_size: int, seed: int, epoch: int, block_rows: int = 8192,
                     shuffle_blocks: int = 4, keep: np.ndarray | None = None, rank: int = 0, world: int = 1,
                     skip_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """One epoch of shuffled batches. The order is a pure function of (seed, epoch, rank, world), so a
        resumed run can skip the batches it already trained on. ``keep`` (bool per sample) drops rows whose
        sample is held out (validation)."""
        rng = np.random.default_rng([seed, epoch])
        blocks = self.blocks(block_rows)
        order = rng.permutation(len(blocks))[rank::world]
        carry: dict[str, np.ndarray] | None = None
        produced = 0
        for g in range(0, len(order), shuffle_blocks):
            group = [self.read_block(blocks[j]) for j in order[g:g + shuffle_blocks]]
            buf = {k: np.concatenate([b[k] for b in group]) for k in self.keys}
            if keep is not None:
                mask = keep[buf["sample_index"]]
                buf = {k: v[mask] for k, v in buf.items()}
            perm = rng.permutation(len(buf["row_index"]))
            buf = {k: v[perm] for k, v in buf.items()}
            if carry is not None:
                buf = {k: np.concatenate([carry[k], buf[k]]) for k in self.keys}
            n = len(buf["row_index"])
            full = n - n % batch_size
            for a in range(0, full, batch_size):
                if produced >= skip_batches:
                    yield {k: v[a:a + batch_size] for k, v in buf.items()}
                produced += 1
            carry = {k: v[full:] for k, v in buf.items()}
        if carry is not None and len(carry["row_index"]):
            if produced >= skip_batches:
                yield carry
