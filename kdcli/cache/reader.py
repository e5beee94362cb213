"""Lazy, streaming cache reads.

HDF5 files are opened on first use in the process that reads them (h5py handles cannot be pickled and HDF5 is
not fork-safe), so a reader can be handed to DataLoader workers. Training reads contiguous blocks (one HDF5 read
each), shuffles a few blocks' rows in memory and yields batches: memory is bounded by
``block_rows * shuffle_blocks`` rows whatever the cache size, and every read is sequential. By default a block is
about ``BLOCK_BYTES`` (64 to 8192 rows) and ``SHUFFLE_BLOCKS`` random blocks are shuffled together: a window of
about 8 MiB of rows from 16 places in the cache (more only for rows over 8 KiB, which still get 64 rows a block).
Peak memory is a few windows, flat in the cache size.

Under DDP each rank reads a disjoint, equal share of every epoch (:meth:`CacheReader.epoch_groups`);
:class:`CacheLoader` reads the groups in persistent DataLoader workers when ``num_workers > 0``.

A cache may live in object storage (``s3://bucket/prefix``, any fsspec URL; :mod:`kdcli.cache.storage`): the
shards are then read through :class:`~kdcli.cache.storage.ShardFiles`, which fetches the exact byte ranges of a
group's blocks (:meth:`CacheReader.block_spans`) in the background while the previous group is trained on
(:meth:`CacheReader.prefetch`, called by :func:`read_groups`). For a local cache those calls do nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kdcli.cache.manifest import check_matches_data, read_manifest, stored_temperatures
from kdcli.cache.modes import get_mode
from kdcli.cache.storage import FetchStats, ShardFiles, Span, locate, open_shard
from kdcli.cache.verify import block_problems
from kdcli.infra.errors import CacheError

ROW_KEYS = ("row_index", "sample_index", "row_hash")
BLOCK_BYTES = 1 << 19  # one contiguous read
SHUFFLE_BLOCKS = 16  # blocks whose rows are shuffled together
READ_AHEAD_BYTES = 16 << 20
"""Bytes of a remote cache fetched ahead of the group being read (:func:`read_groups`): two groups of the default
~8 MiB, one group of larger blocks. Measured (benchmarks/bench_remote.py): without read-ahead every group waits for
its requests (epoch 2.2x local instead of 1.5x on moto); more only adds memory."""


def temperature_kwargs(manifest: dict) -> dict:
    """``temperatures`` and ``sampler_temperatures`` for :meth:`Mode.targets`, from a manifest (normalised)."""
    from kdcli.cache.modes.base import normalize_temperatures

    st = stored_temperatures(manifest)
    return {
        "temperatures": normalize_temperatures(st["temperatures"]),
        "sampler_temperatures": tuple(st["sampler_temperatures"]),
    }


@dataclass(frozen=True)
class Block:
    shard: int
    start: int  # local row offsets inside the shard
    stop: int


class CacheReader:
    def __init__(self, cache_dir: str | Path):
        self.location = locate(cache_dir)
        self.dir = self.location  # str(): the directory or URL as given (messages); os.fspath() for local caches
        self.manifest = read_manifest(self.location)
        self.mode: str = self.manifest["mode"]
        self.num_rows: int = int(self.manifest["num_rows"])
        self.num_classes: int = int(self.manifest["num_classes"])
        self.shards: list[dict] = self.manifest["shards"]
        self._shards = ShardFiles(self.location, self.shards)  # opened lazily, in the process that reads
        self._kept: dict[tuple, np.ndarray] = {}  # memoised kept_rows()
        self._check_cheap()

    # -- checks ------------------------------------------------------------------------------------------------
    def _check_cheap(self) -> None:
        """Manifest coverage and shard sizes: cheap enough to run before every training run (one directory listing,
        one LIST request for a cache in object storage)."""
        expect = 0
        sizes = self.location.listing()
        for s in self.shards:
            if s["row_start"] != expect:
                raise CacheError(f"cache {self.dir}: shards do not cover rows contiguously (gap at row {expect})")
            if s["name"] not in sizes:
                raise CacheError(
                    f"cache {self.dir}: shard {s['name']} is missing; re-run the same cache-teacher "
                    "command to recompute it"
                )
            size = sizes[s["name"]]
            if size != s["bytes"]:
                raise CacheError(
                    f"cache {self.dir}: shard {s['name']} has {size} bytes, the manifest says "
                    f"{s['bytes']} (truncated or replaced); run `kdcli cache verify {self.dir}`"
                )
            expect = s["row_stop"]
        if expect != self.num_rows:
            raise CacheError(f"cache {self.dir}: shards cover {expect} rows, the manifest says {self.num_rows}")

    def check_data(self, data_identity: dict) -> None:
        check_matches_data(self.manifest, data_identity, self.dir)
        if data_identity["num_classes"] > self.num_classes:
            raise CacheError(
                f"cache {self.dir} has {self.num_classes} classes but the data has labels up to "
                f"{data_identity['num_classes'] - 1}"
            )

    def targets(self, arrays: dict[str, np.ndarray]):
        """The teacher targets of a batch read from this cache (:meth:`Mode.targets`, at the stored temperatures)."""
        return get_mode(self.mode).targets(arrays, self.num_classes, **temperature_kwargs(self.manifest))

    def check_divergence(self, divergence: str) -> None:
        """UsageError (exit 2) for a divergence this cache cannot train with (a single cache serves every one)."""

    @property
    def loss_note(self) -> str:
        """What the soft term is at a stored temperature (the loss line)."""
        return get_mode(self.mode).loss_note

    @property
    def approximation(self) -> str:
        """What --approximate-temperature does at another temperature."""
        return get_mode(self.mode).approximation

    # -- file access -------------------------------------------------------------------------------------------
    def _file(self, i: int) -> h5py.File:
        """Shard ``i`` opened in this process (a forked worker never uses the parent's HDF5 handles: ShardFiles
        opens its own, and pickles without any)."""
        return self._shards.file(i)

    @property
    def _files(self) -> dict[int, h5py.File]:
        """The HDF5 handles open in this process (tests check that none crosses into a worker)."""
        return self._shards.handles

    def close(self) -> None:
        self._shards.close()

    @property
    def fetch_stats(self) -> FetchStats:
        """Requests and bytes this process fetched from a remote cache (all zero for a local one)."""
        return self._shards.stats

    # -- remote reads: what to fetch ahead (no-ops for a local cache) ------------------------------------------
    def block_spans(self, b: Block) -> Iterator[Span]:
        """The dataset rows :meth:`read_block` reads for ``b``: ``(shard, dataset, first, stop)`` along axis 0."""
        return ((b.shard, k, b.start, b.stop) for k in self.keys)

    def row_spans(self, start: int, stop: int) -> Iterator[Span]:
        """The spans of global rows ``[start, stop)`` (:meth:`read_rows`)."""
        for i, s in enumerate(self.shards):
            a, b = max(start, s["row_start"]), min(stop, s["row_stop"])
            if a < b:
                yield from self.block_spans(Block(i, a - s["row_start"], b - s["row_start"]))

    def prefetch(self, group: list[Piece]) -> None:
        """Start fetching a group's bytes in the background (a remote cache); :meth:`read_group` waits for them
        and drops them. Called ahead by :func:`read_groups`."""
        self._shards.fetch(tuple(group), (sp for p in group for sp in self.block_spans(p.block)))

    def prefetch_rows(self, key: object, ranges: list[tuple[int, int]]) -> None:
        """:meth:`prefetch` for global row ranges, kept under ``key`` (a fused teacher's other caches)."""
        self._shards.fetch(key, (sp for a, b in ranges for sp in self.row_spans(a, b)))

    def wait(self, key: object) -> None:
        self._shards.wait(key)

    def release(self, key: object) -> None:
        self._shards.release(key)

    def unreadable(self, shard: int, e: BaseException) -> CacheError:
        """The error for a failed HDF5 read of ``shard``: the storage failure behind it when there is one (exit 2
        for credentials / endpoint), else a damaged shard (exit 3)."""
        self._shards.raise_transport_error()
        return CacheError(
            f"shard {self.shards[shard]['name']} is unreadable or lacks a dataset ({e}); run "
            f"`kdcli cache verify {self.dir}`"
        )

    @property
    def keys(self) -> tuple[str, ...]:
        extra = ("aug_params",) if self.manifest.get("aug_param_names") else ()
        return ROW_KEYS + extra + get_mode(self.mode).keys(self.manifest.get("temperatures"))

    def read_block(self, b: Block) -> dict[str, np.ndarray]:
        f = self._file(b.shard)
        try:
            with self._shards.hold(self.block_spans(b)):  # remote: one concurrent fetch unless fetched ahead
                arrays = {k: f[k][b.start : b.stop] for k in self.keys}
        except (KeyError, OSError) as e:
            raise self.unreadable(b.shard, e) from None
        # Cheap content checks on every read (row ids, finiteness, normalisation; see kdcli/cache/verify.py):
        # a damaged block stops the run (exit 3) instead of being trained on.
        problems = block_problems(self.manifest, arrays, self.shards[b.shard]["row_start"] + b.start)
        if problems:
            raise CacheError(
                f"cache {self.dir}: shard {self.shards[b.shard]['name']} is damaged: {problems[0]}; "
                f"run `kdcli cache verify {self.dir}`"
            )
        return arrays

    def read_rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Global rows [start, stop) as one dict of arrays (may span shards)."""
        parts = []
        with self._shards.hold(self.row_spans(start, stop)):  # remote: every shard's ranges in one fetch
            for i, s in enumerate(self.shards):
                a, b = max(start, s["row_start"]), min(stop, s["row_stop"])
                if a < b:
                    parts.append(self.read_block(Block(i, a - s["row_start"], b - s["row_start"])))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}  # row and (LM) token arrays alike

    def blocks(self, block_rows: int) -> list[Block]:
        out = []
        for i, s in enumerate(self.shards):
            n = s["row_stop"] - s["row_start"]
            out += [Block(i, a, min(a + block_rows, n)) for a in range(0, n, block_rows)]
        return out

    # -- training order ----------------------------------------------------------------------------------------
    def row_bytes(self) -> int:
        """Bytes one row occupies in the shards (all of its arrays)."""
        f = self._file(0)
        return sum(f[k].dtype.itemsize * int(np.prod(f[k].shape[1:])) for k in self.keys)

    def default_block_rows(self) -> int:
        return int(np.clip(BLOCK_BYTES // max(self.row_bytes(), 1), 64, 8192))

    def kept_rows(self, block_rows: int, keep: np.ndarray | None) -> np.ndarray:
        """Rows per block (``self.blocks(block_rows)``) whose sample is kept. With ``keep`` this reads only the
        ``sample_index`` column, once per (block size, mask): memoised, and computed before workers start."""
        blocks = self.blocks(block_rows)
        if keep is None:
            return np.array([b.stop - b.start for b in blocks], dtype=np.int64)
        key = (block_rows, hashlib.blake2b(np.packbits(keep).tobytes(), digest_size=16).hexdigest())
        if key not in self._kept:
            counts = []
            for i in range(len(self.shards)):  # remote: one fetch of a shard's sample_index, not one per block
                mine = [b for b in blocks if b.shard == i]
                with self._shards.hold((i, "sample_index", b.start, b.stop) for b in mine):
                    counts += [int(keep[self._file(i)["sample_index"][b.start : b.stop]].sum()) for b in mine]
            self._kept[key] = np.array(counts, dtype=np.int64)
        return self._kept[key]

    def epoch_groups(
        self,
        *,
        seed: int,
        epoch: int,
        block_rows: int,
        shuffle_blocks: int = SHUFFLE_BLOCKS,
        keep: np.ndarray | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> list[list[Piece]]:
        """This rank's reads for one epoch: groups of ``shuffle_blocks`` pieces whose rows are shuffled together.

        Every rank permutes the same blocks with the (seed, epoch) RNG and cuts the permuted stream of kept rows
        into ``world`` contiguous parts of ``total // world`` rows: disjoint, and equal so that every rank takes the
        same number of steps (DDP needs that); at most ``world - 1`` rows sit out an epoch, different ones each
        epoch. A piece is a block, or its part on one side of a cut."""
        blocks = self.blocks(block_rows)
        order = np.random.default_rng([seed, epoch]).permutation(len(blocks))
        if world == 1:
            pieces = [Piece(blocks[j], 0, None) for j in order]
        else:
            kept = self.kept_rows(block_rows, keep)[order]
            ends = np.cumsum(kept)
            part = int(ends[-1]) // world if len(ends) else 0
            lo, hi = rank * part, (rank + 1) * part
            pieces = []
            for j, e, c in zip(order, ends.tolist(), kept.tolist()):
                a, b = max(lo, e - c), min(hi, e)
                if a >= b:
                    continue
                a, b = a - (e - c), b - (e - c)  # kept-row offsets inside the block
                blk = blocks[j]
                if keep is None:  # kept rows are the block's rows: read exactly this rank's part
                    pieces.append(Piece(Block(blk.shard, blk.start + a, blk.start + b), 0, None))
                else:
                    pieces.append(Piece(blk, a, b))
        return [pieces[g : g + shuffle_blocks] for g in range(0, len(pieces), shuffle_blocks)]

    def read_group(
        self,
        group: list[Piece],
        *,
        keep: np.ndarray | None,
        seed: int,
        epoch: int,
        rank: int = 0,
        world: int = 1,
        index: int = 0,
    ) -> dict[str, np.ndarray]:
        """Read a group's pieces (one contiguous read each), drop held-out rows, shuffle the rows in memory. The
        shuffle is seeded by the group's place in the epoch, so it does not matter which process reads it. The
        bytes :meth:`prefetch` fetched for the group (remote caches) are dropped once it is read."""
        parts = []
        try:
            self.wait(tuple(group))  # a failed background fetch raises its one-line error here, not inside HDF5
            for piece in group:
                arrays = self.read_block(piece.block)
                if keep is not None:
                    arrays = self.take(arrays, np.flatnonzero(keep[arrays["sample_index"]])[piece.lo : piece.hi])
                parts.append(arrays)
        finally:
            self.release(tuple(group))
        # one array at a time, each source freed once copied: about one group in memory, not three
        buf = {k: np.concatenate([p.pop(k) for p in parts]) for k in self.keys}
        perm = np.random.default_rng([seed, epoch, rank, world, index]).permutation(len(buf["row_index"]))
        return self.take(buf, perm)

    # -- rows of a read buffer (token caches override these: their token arrays are ragged) --------------------
    @staticmethod
    def take(buf: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``rows`` (any order) of a buffer, as new arrays."""
        return {k: v[rows] for k, v in buf.items()}

    @staticmethod
    def slice_rows(buf: dict[str, np.ndarray], a: int, b: int) -> dict[str, np.ndarray]:
        """Rows ``[a, b)`` of a buffer, copied (a batch the trainer holds must not pin a whole group)."""
        return {k: v[a:b].copy() for k, v in buf.items()}

    def iter_batches(
        self,
        *,
        batch_size: int,
        seed: int,
        epoch: int,
        block_rows: int | None = None,
        shuffle_blocks: int = SHUFFLE_BLOCKS,
        keep: np.ndarray | None = None,
        rank: int = 0,
        world: int = 1,
        skip_batches: int = 0,
    ) -> Iterator[dict[str, np.ndarray]]:
        """One epoch of shuffled batches, read in this process. The order is a pure function of (seed, epoch,
        rank, world), so a resumed run can skip the batches it already trained on. ``keep`` (bool per sample)
        drops rows whose sample is held out (validation)."""
        opts = dict(seed=seed, epoch=epoch, keep=keep, rank=rank, world=world)
        block_rows = block_rows or self.default_block_rows()
        groups = self.epoch_groups(block_rows=block_rows, shuffle_blocks=shuffle_blocks, **opts)
        bufs = read_groups(self, groups, range(len(groups)), **opts)
        yield from batches_of(bufs, batch_size, skip_batches, slice_rows=self.slice_rows)


def mean_unique_ids(cache_dir: str | Path, manifest: dict) -> float | None:
    """Distinct teacher ids stored per entry (row, or predicted token of a token cache), averaged over the cache, for
    the sampled modes (a sample cache keeps each drawn id once with its count, so this is what an entry carries,
    not ``--samples``); None for the others. The writer records each shard's count in its manifest entry
    (``distinct_ids``), so nothing is read; a shard without it (an older cache) is counted from its arrays."""
    mode = get_mode(manifest["mode"])
    if not mode.sampled:
        return None
    used = entries = 0
    for s in manifest["shards"]:
        with open_shard(cache_dir, s["name"], s.get("bytes")) as f:
            n = f[mode.keys_[0]].shape[0]
            if "distinct_ids" in s:
                used += int(s["distinct_ids"])
            else:
                for a in range(0, n, 65536):
                    used += mode.distinct_ids({k: f[k][a : a + 65536] for k in mode.keys_})
            entries += n
    return used / entries if entries else 0.0


def read_groups(
    reader: CacheReader, groups: list[list[Piece]], indices: Iterable[int], *, ahead: int | None = None, **opts
) -> Iterator[dict[str, np.ndarray]]:
    """``reader.read_group`` of ``groups[i]`` for each ``i`` of ``indices`` in turn, the next ``ahead`` groups
    prefetched while the consumer works on the current one (a remote cache: their bytes arrive in the background;
    locally a no-op). By default as many groups as fit in :data:`READ_AHEAD_BYTES`, at least one; at most
    ``ahead + 1`` groups' bytes are held."""
    order = list(indices)
    if ahead is None:
        rows = sum(p.block.stop - p.block.start for p in groups[order[0]]) if order else 1
        ahead = max(1, READ_AHEAD_BYTES // max(rows * reader.row_bytes(), 1))
    for j in range(min(ahead, len(order))):
        reader.prefetch(groups[order[j]])
    for j, i in enumerate(order):
        if j + ahead < len(order):
            reader.prefetch(groups[order[j + ahead]])
        yield reader.read_group(groups[i], index=i, **opts)


@dataclass(frozen=True)
class Piece:
    """A block, and which of its kept rows this rank reads (``lo:hi``; ``None``: to the end)."""

    block: Block
    lo: int
    hi: int | None


def batches_of(
    bufs: Iterable[dict[str, np.ndarray]], batch_size: int, skip_batches: int = 0, *, slice_rows=CacheReader.slice_rows
) -> Iterator[dict[str, np.ndarray]]:
    """Shuffled buffers -> batches of ``batch_size`` rows (the last one shorter); rows left over from one buffer
    lead the next batch. The first ``skip_batches`` batches are dropped (a resumed epoch). ``slice_rows(buf, a, b)``
    copies rows ``[a, b)`` out of a buffer (the reader's: token caches slice their ragged arrays by row)."""
    carry: dict[str, np.ndarray] | None = None  # fewer than batch_size rows, copied out of their buffer
    produced = 0
    bufs = iter(bufs)
    while (buf := next(bufs, None)) is not None:
        n, a = len(buf["row_index"]), 0
        if carry is not None:  # complete the carried rows with the head of this buffer
            a = min(batch_size - len(carry["row_index"]), n)
            head = slice_rows(buf, 0, a)
            carry = {k: np.concatenate([carry[k], head[k]]) for k in buf}
            if len(carry["row_index"]) < batch_size:
                continue  # the whole buffer went into the carry
            if produced >= skip_batches:
                yield carry
            produced, carry = produced + 1, None
        while n - a >= batch_size:
            if produced >= skip_batches:  # a copy: no batch the trainer still holds pins a whole group
                yield slice_rows(buf, a, a + batch_size)
            produced, a = produced + 1, a + batch_size
        if a < n:
            carry = slice_rows(buf, a, n)
        del buf  # the next group is read without this one still in memory
    if carry is not None and len(carry["row_index"]) and produced >= skip_batches:
        yield carry


class GroupStream(IterableDataset):
    """One rank's epoch as shuffled groups, for a DataLoader: worker ``w`` of ``W`` reads groups ``w, w+W, ...``
    (opening the shards lazily in its own process) and the DataLoader returns them in order, so the batches are
    the same for any number of workers. ``epoch`` lives in shared memory: persistent workers read it afresh at
    the start of every epoch."""

    def __init__(
        self,
        reader: CacheReader,
        *,
        seed: int,
        keep: np.ndarray | None,
        rank: int,
        world: int,
        block_rows: int,
        shuffle_blocks: int,
    ):
        self.reader, self.seed, self.keep, self.rank, self.world = reader, seed, keep, rank, world
        self.block_rows, self.shuffle_blocks = block_rows, shuffle_blocks
        self.epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        opts = dict(seed=self.seed, epoch=int(self.epoch[0]), keep=self.keep, rank=self.rank, world=self.world)
        groups = self.reader.epoch_groups(block_rows=self.block_rows, shuffle_blocks=self.shuffle_blocks, **opts)
        yield from read_groups(self.reader, groups, range(worker, len(groups), workers), **opts)


class CacheLoader:
    """Epoch after epoch of one rank's batches. ``num_workers > 0`` reads and shuffles the blocks in persistent
    DataLoader workers (each opens the shards itself); ``0`` reads in this process. Same batches either way."""

    def __init__(
        self,
        reader: CacheReader,
        *,
        batch_size: int,
        seed: int,
        keep: np.ndarray | None = None,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
        block_rows: int | None = None,
        shuffle_blocks: int = SHUFFLE_BLOCKS,
    ):
        self.batch_size = batch_size
        block_rows = block_rows or reader.default_block_rows()
        self.stream = GroupStream(
            reader, seed=seed, keep=keep, rank=rank, world=world, block_rows=block_rows, shuffle_blocks=shuffle_blocks
        )
        self._loader = None
        if world > 1:
            reader.kept_rows(block_rows, keep)  # read once here, not once per worker
        if num_workers:
            reader.close()  # no HDF5 handle crosses into a worker (HDF5 is not fork-safe)
            # A remote cache's process runs threads (fsspec's event loop, the read-ahead fetcher, the S3 client's):
            # a fork copies whatever lock one of them holds at that instant, and the worker can hang on it (seen once
            # in the suite: a worker's new S3 client never finished). Those workers start from a fresh interpreter.
            context = "forkserver" if reader.location.remote else None
            self._loader = DataLoader(
                self.stream,
                batch_size=None,
                num_workers=num_workers,
                persistent_workers=True,
                prefetch_factor=2,
                multiprocessing_context=context,
            )

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
        self.stream.epoch[0] = epoch
        if self._loader is None:
            bufs: Iterable[dict] = iter(self.stream)
        else:  # the DataLoader hands numpy arrays over as tensors in shared memory: back to numpy, no copy
            bufs = ({k: v.numpy() for k, v in g.items()} for g in self._loader)
        yield from batches_of(bufs, self.batch_size, skip_batches, slice_rows=self.stream.reader.slice_rows)

    def close(self) -> None:
        self._loader = None  # shuts the persistent workers down
