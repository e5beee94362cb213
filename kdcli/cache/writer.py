"""Shard writer: buffers reduced rows into fixed-size shards and publishes each one atomically.

Shard ``i`` always covers global rows ``[i * shard_size, min((i + 1) * shard_size, num_rows))``, so a resumed run
knows from the manifest alone which rows are done. Shards are written by a background thread fed through a
bounded queue: the teacher never waits on the disk, and memory stays flat (at most ``queue_shards`` shards in
flight). After each shard the manifest is rewritten (``complete: false``) listing the whole shards.

Every shard holds, per row: ``row_index`` (global row id, int64), ``sample_index`` (dataset row, int64),
``row_hash`` (uint64 content hash of the dataset row), ``aug_params`` (float32, only with augmented views) and
the mode's arrays (see :mod:`kdcli.cache.reduce`). Token-level caches add ``offsets`` (rows + 1, int64) and store
token arrays flattened, never padded.

Compression (``--compression``) is lossless and per dataset: arrays of at least ``MIN_COMPRESS_BYTES`` are chunked
along the first axis (~``CHUNK_BYTES`` a chunk) through HDF5's byte shuffle + gzip (level 4) or lzf, which a stock
h5py decodes on read. The manifest's ``compression`` entry says what the shards hold; it is not part of the cache's
identity, and the writer always follows the manifest it extends, so a resumed cache is stored alike throughout.
"""

from __future__ import annotations

import hashlib
import itertools
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from kdcli.cache.manifest import MANIFEST, shard_name, write_manifest
from kdcli.cache.modes import get_mode
from kdcli.cache.storage import Location, locate
from kdcli.cache.verify import block_problems
from kdcli.infra import crashpoints
from kdcli.infra.atomic import PARTIAL, is_disk_full, replace_atomically
from kdcli.infra.errors import CacheError, KdError, UsageError

_STOP = object()


_images = itertools.count()

GZIP_LEVEL = 4
CHUNK_BYTES = 128 << 10
"""Target bytes per HDF5 chunk. Measured on a top-64 SmolLM2 shard (12,030 tokens): 32-256 KiB chunks all give
182-185 B/token with gzip; reading the whole shard is fastest at 128-256 KiB (15 ms; 18 ms at 32-64 KiB, 17 ms at
1 MiB), and a read pays for the partial chunks at its two ends, so larger chunks make small row blocks slower
(8-row blocks: 57 ms at 128 KiB, 82 ms at 256 KiB, 223 ms at 1 MiB)."""
MIN_COMPRESS_BYTES = 16 << 10  # smaller datasets (per-row ids, offsets of a short shard) stay contiguous
FILTERS = ("gzip", "lzf")


def resolve_compression(requested: str, *, token: bool, mode: str) -> dict | None:
    """The manifest's ``compression`` entry for ``--compression requested`` (None: uncompressed). ``auto`` is gzip
    for token-level (LM) caches of the sparse modes and none otherwise: full-vocabulary log-probs
    shrink ~33% with gzip but decompress ~14x slower than an uncompressed read (measured), and classification rows
    are small."""
    name = requested
    if requested == "auto":
        name = "gzip" if token and get_mode(mode).sparse else "none"
    if name == "none":
        return None
    if name not in FILTERS:
        raise UsageError(f"--compression {requested!r}: expected one of auto, gzip, lzf, none")
    spec: dict = {"filter": name}
    if name == "gzip":
        spec["level"] = GZIP_LEVEL
    spec.update(shuffle=True, chunk_bytes=CHUNK_BYTES, min_bytes=MIN_COMPRESS_BYTES)
    return spec


def compression_label(spec: dict | None) -> str:
    """``gzip-4+shuffle``, ``lzf+shuffle`` or ``none``, for messages and summaries."""
    if not spec:
        return "none"
    level = f"-{spec['level']}" if spec.get("level") is not None else ""
    return f"{spec['filter']}{level}" + ("+shuffle" if spec.get("shuffle") else "")


def dataset_options(a: np.ndarray, compression: dict | None) -> dict:
    """``create_dataset`` keywords storing ``a`` as ``compression`` says ({}: contiguous, uncompressed)."""
    if not compression or a.ndim == 0 or a.nbytes < int(compression.get("min_bytes", MIN_COMPRESS_BYTES)):
        return {}
    name = compression.get("filter")
    if name not in FILTERS:
        raise CacheError(
            f"the cache manifest asks for shard compression {compression!r}, which this kdcli cannot "
            "write; finish the cache with the kdcli that started it, or rebuild it with --overwrite"
        )
    row = a.itemsize * int(np.prod(a.shape[1:], dtype=np.int64))
    rows = max(1, min(len(a), int(compression.get("chunk_bytes", CHUNK_BYTES)) // max(row, 1)))
    opts = {"chunks": (rows, *a.shape[1:]), "compression": name, "shuffle": bool(compression.get("shuffle"))}
    if name == "gzip":
        opts["compression_opts"] = int(compression.get("level", GZIP_LEVEL))
    return opts


def shard_image(arrays: dict[str, np.ndarray], attrs: dict, compression: dict | None = None) -> bytes:
    """One shard as the bytes of an HDF5 file, built in memory: contiguous datasets, or with ``compression`` (a
    manifest ``compression`` entry) chunked and filtered as :func:`dataset_options` says.

    HDF5 never touches the disk: a failing write (full disk, quota, file-size limit) is then a plain ``OSError``
    from :func:`write_shard_file`, never an HDF5 library error in the middle of a file (measured: h5py writing
    straight to a file at RLIMIT_FSIZE printed "Exception ignored" tracebacks and the process segfaulted)."""
    with h5py.File(f"kdcli-shard-image-{next(_images)}", "w", driver="core", backing_store=False) as f:
        for name, a in arrays.items():
            f.create_dataset(name, data=a, **dataset_options(a, compression))
        for k, v in attrs.items():
            f.attrs[k] = v
        f.flush()
        return f.id.get_file_image()


def write_shard_file(
    path: Path, arrays: dict[str, np.ndarray], attrs: dict, compression: dict | None = None
) -> tuple[int, str]:
    """Write one shard to ``path + .partial``, fsync, rename into place; returns (bytes, sha256)."""
    image = shard_image(arrays, attrs, compression)
    tmp = path.with_name(path.name + PARTIAL)
    try:
        with open(tmp, "wb") as f:
            half = len(image) // 2
            f.write(image[:half])
            f.flush()
            crashpoints.reached("shard-partial")  # test-only: a crash with half a shard on disk
            f.write(image[half:])
        replace_atomically(tmp, path)
        crashpoints.reached("shard-renamed")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(image), hashlib.sha256(image).hexdigest()


def publish_shard(
    location: Location, name: str, arrays: dict[str, np.ndarray], attrs: dict, compression: dict | None = None
) -> tuple[int, str]:
    """Publish shard ``name`` whole (returns its bytes and sha256): locally :func:`write_shard_file`; in object
    storage the in-memory image as one PUT, which S3 makes visible only once complete (an interrupted upload leaves
    no object, so every shard at its final name is whole, as on a local disk)."""
    if not location.remote:
        return write_shard_file(location.local / name, arrays, attrs, compression)
    image = shard_image(arrays, attrs, compression)
    crashpoints.reached("shard-partial")  # test-only: a crash before the PUT completes leaves no object
    location.put_bytes(name, image)
    crashpoints.reached("shard-renamed")  # test-only: the shard is at its final name, not yet in the manifest
    return len(image), hashlib.sha256(image).hexdigest()


class ShardWriter:
    """Accumulate row batches (dicts of equal-length arrays) and publish whole shards in the background."""

    def __init__(
        self,
        cache_dir: str | Path | Location,
        manifest: dict,
        *,
        shard_size: int,
        first_shard: int = 0,
        token_keys: frozenset[str] = frozenset(),
        threaded: bool = True,
        queue_shards: int = 2,
        on_shard: Callable[[dict], None] | None = None,
        manifest_name: str = MANIFEST,
        check_values: bool = True,
    ):
        self.dir = locate(cache_dir)  # a local directory or an object-store prefix (publish_shard)
        self.manifest = manifest
        self.manifest_name = manifest_name  # a rank's own manifest.rank-N.json under torchrun
        self.shard_size = shard_size
        self.next_shard = first_shard
        self.token_keys = token_keys
        self.on_shard = on_shard
        self.check_values = check_values  # the reader's checks on every shard before it is published (_check)
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_rows = 0
        self._error: BaseException | None = None
        self._queue: queue.Queue | None = queue.Queue(maxsize=queue_shards) if threaded else None
        self._thread = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="kdcli-shard-writer", daemon=True)
            self._thread.start()

    # -- producer side ---------------------------------------------------------------------------------------
    def add(self, batch: dict[str, np.ndarray]) -> None:
        self._raise_if_failed()
        n = len(batch["row_index"])
        self._pending.append(batch)
        self._pending_rows += n
        while self._pending_rows >= self._rows_in(self.next_shard) > 0:
            self._emit(self._rows_in(self.next_shard))

    def seek(self, shard: int) -> None:
        """Continue at shard ``shard`` (a rank, or a resumed run, computes runs of shards with gaps between)."""
        if self._pending_rows:
            raise RuntimeError(
                f"seek to shard {shard} with {self._pending_rows} rows of shard {self.next_shard} still pending"
            )
        self.next_shard = shard

    def close(self) -> None:
        """Flush the last (short) shard and wait until every shard is published."""
        if self._pending_rows:
            self._emit(self._pending_rows)
        if self._queue is not None:
            self._queue.put(_STOP)
            self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        if self._queue is not None and self._thread.is_alive():
            self._error = self._error or KeyboardInterrupt()
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._queue.put(_STOP)
            self._thread.join(timeout=60)

    def _rows_in(self, shard: int) -> int:
        total = self.manifest["num_rows"]
        return max(0, min((shard + 1) * self.shard_size, total) - shard * self.shard_size)

    def _emit(self, rows: int) -> None:
        arrays = self._take(rows)
        job = (self.next_shard, arrays)
        self.next_shard += 1
        if self._queue is None:
            self._write(*job)
        else:
            while True:  # bounded: block while the disk catches up, but notice a dead writer
                self._raise_if_failed()
                try:
                    self._queue.put(job, timeout=0.5)
                    break
                except queue.Full:
                    continue

    def _take(self, rows: int) -> dict[str, np.ndarray]:
        """Pop exactly ``rows`` rows (and their tokens) from the pending batches."""
        out: dict[str, list[np.ndarray]] = {}
        need = rows
        keep: list[dict[str, np.ndarray]] = []
        for i, b in enumerate(self._pending):
            n = len(b["row_index"])
            if need == 0:
                keep = self._pending[i:]
                break
            if n <= need:
                part, rest = b, None
            else:
                part, rest = self._split(b, need)
            for k, v in part.items():
                out.setdefault(k, []).append(v)
            need -= len(part["row_index"])
            if rest is not None:
                keep = [rest] + self._pending[i + 1 :]
                break
        self._pending = keep
        self._pending_rows -= rows
        arrays = {k: np.concatenate(v) for k, v in out.items()}
        if "lengths" in arrays:
            lengths = arrays.pop("lengths")
            arrays["offsets"] = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        return arrays

    def _split(self, b: dict[str, np.ndarray], n: int) -> tuple[dict, dict]:
        if self.token_keys:
            t = int(np.sum(b["lengths"][:n]))
        a, r = {}, {}
        for k, v in b.items():
            cut = t if k in self.token_keys else n
            a[k], r[k] = v[:cut], v[cut:]
        return a, r

    # -- writer thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            if self._error is not None:
                continue
            try:
                self._write(*job)
            except BaseException as e:  # handed to the producer on its next call
                self._error = e

    def _write(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        name = shard_name(index)
        start = index * self.shard_size
        n = len(arrays["row_index"])
        path = f"{str(self.dir).rstrip('/')}/{name}"
        if self.check_values:
            self._check(name, arrays, start)
        try:
            nbytes, digest = publish_shard(
                self.dir, name, arrays, {"row_start": start, "row_stop": start + n}, self.manifest.get("compression")
            )
            entry = {"name": name, "row_start": start, "row_stop": start + n, "bytes": nbytes, "sha256": digest}
            distinct = get_mode(self.manifest["mode"]).distinct_ids(arrays) if "mode" in self.manifest else None
            if distinct is not None:  # distinct ids stored in this shard, for the summary (reader.mean_unique_ids)
                entry["distinct_ids"] = distinct
            self.manifest["shards"].append(entry)
            self.manifest["shards"].sort(key=lambda s: s["row_start"])
            path = f"{str(self.dir).rstrip('/')}/{self.manifest_name}"
            write_manifest(self.dir, self.manifest, self.manifest_name)
        except (OSError, RuntimeError) as e:
            if is_disk_full(e):  # `path`: the shard, or the manifest when the shard is already whole
                raise UsageError(
                    f"no space left on device while writing {path} ({e.__class__.__name__}); free "
                    "some space and re-run the same command: the whole shards already written are "
                    "kept"
                ) from None
            raise
        crashpoints.reached("shard-published")
        if self.on_shard:
            self.on_shard(entry)

    def _check(self, name: str, arrays: dict[str, np.ndarray], start: int) -> None:
        """Every value of a shard is checked before it is published (the reader's checks: finite, possible,
        normalised, counts that add up and fit their dtype): a cache marked complete never holds NaN."""
        token_rows = None
        if "offsets" in arrays:
            off = arrays["offsets"]
            token_rows = start + np.repeat(np.arange(len(off) - 1), np.diff(off))
        found = block_problems(self.manifest, {k: v for k, v in arrays.items() if k != "offsets"}, start, token_rows)
        if found:
            raise UsageError(
                f"the teacher's output for {name} is not a valid cache ({found[0]}); nothing was written "
                "for that shard: check the teacher weights, --dtype and --temperatures"
            )

    def _raise_if_failed(self) -> None:
        if self._error is not None and not isinstance(self._error, KeyboardInterrupt):
            err = self._error
            if isinstance(err, KdError):
                raise err
            raise RuntimeError(f"shard writer failed: {err.__class__.__name__}: {err}") from err
