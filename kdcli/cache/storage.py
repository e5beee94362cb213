"""Where a cache lives: a local directory or any fsspec URL (``s3://``, ``gs://``, ``az://``, ``file://``, ...).

:func:`locate` turns what the user wrote into a :class:`Location` (picklable: a DataLoader worker or a DDP rank
rebuilds its own connection from it). A local path or a ``file://`` URL stays on the plain filesystem, read by
h5py natively; anything else goes through fsspec, with the endpoint and credentials the standard way: for S3 the
``AWS_*`` environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ``AWS_DEFAULT_REGION``, ...) and ``~/.aws``, which botocore reads itself, and fsspec's own
configuration (``FSSPEC_<PROTOCOL>_<KWARG>`` environment variables, ``~/.config/fsspec/*.json``). kdcli adds only
defaults the user has not set: bounded connect/read timeouts and retries for S3 (:data:`S3_CONFIG_DEFAULTS`), so a
dead endpoint fails in seconds, and a wall-clock bound on the first request to a store (:data:`PROBE_SECONDS`).

:class:`ShardFiles` opens the shards of one cache in the process that reads them (HDF5 handles are not picklable and
HDF5 is not fork-safe; a forked process opens its own). A remote shard is never downloaded whole unless it is small
(:data:`WHOLE_SHARD_BYTES`): h5py reads it through a Python file object (:class:`ShardFile`, h5py's ``fileobj``
driver) whose bytes come from

1. the exact byte ranges of the rows a reader is about to read (:meth:`ShardFiles.fetch`): the reader names the
   dataset rows of a block (``(shard, dataset, first, stop)`` spans), the byte ranges come from HDF5's own layout
   (``H5Dget_offset`` for contiguous datasets, ``H5Dchunk_iter`` for chunked ones), neighbours closer than
   :data:`MERGE_GAP` are merged, and every range of a group of blocks is fetched with one concurrent
   ``fs.cat_ranges`` call on a background thread while the previous group is trained on (fsspec reads Parquet
   footers and row groups the same way: ``fsspec/parquet.py`` ``open_parquet_file`` with the ``parts`` cache,
   ``fsspec/caching.py`` ``KnownPartsOfAFile``);
2. a small process-wide LRU (:data:`LRU_BYTES`) of aligned :data:`META_BLOCK` blocks for everything else HDF5 reads
   (superblock, object headers, chunk B-trees: a few KiB, scattered) and of whole small shards;
3. a direct range read for anything larger that was not fetched ahead (counted in :attr:`ShardFiles.stats`).

Memory is therefore flat in the cache size: at most the ranges of the groups fetched and not yet released (the
reader keeps two: the one it reads and the next) plus the LRU. Measured choices (``benchmarks/bench_remote.py``,
docs/remote.md): fsspec's own file caches (``readahead``, ``bytes``, ``blockcache``, ``background``) read
one random block at a time, one request per dataset per block, in the reading thread.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import itertools
import json
import os
import queue
import re
import socket
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from kdcli.infra.atomic import atomic_write_bytes
from kdcli.infra.errors import CacheError, KdError, UsageError

REMOTE_EXTRA = "pip install 'kdcli[remote]'"

META_BLOCK = 64 << 10
"""Granularity of the reads that were not fetched ahead (HDF5 metadata: superblock, object headers, B-tree nodes
of a few hundred bytes each, and the small per-row datasets of an unexpected read): one request per aligned 64 KiB
block, kept in the LRU. A request costs ~10-30 ms of latency on S3, about the time 64 KiB-2 MiB take to transfer."""

WHOLE_SHARD_BYTES = 1 << 20
"""Shards up to this size are fetched whole (one request) and kept in the LRU. A block of the reader is ~512 KiB
(``kdcli.cache.reader.BLOCK_BYTES``) and needs one request per dataset (4-8), so a shard of up to two blocks costs
fewer requests whole, and 1 MiB transfers in about one request's latency (~10 ms at >= 100 MB/s)."""

SMALL_DATASET_BYTES = 256 << 10
"""A dataset of a shard stored in at most this many bytes (the per-row ``row_index``, ``sample_index``,
``row_hash``: 24 bytes a row; ``tail_logmass``, ``offsets``, ...) is fetched whole the first time a block needs it
and kept in the LRU: a block then costs one request per large dataset instead of one more for its row ids
(measured on moto, 25 shards of 2,048 rows: 380 -> 22x requests per epoch; docs/remote.md)."""

LRU_BYTES = 32 << 20
"""Process-wide cap of the LRU of metadata blocks, small datasets and whole small shards."""

MERGE_GAP = 64 << 10
"""Byte ranges of one shard closer than this are fetched as one request (the gap is read and dropped). 64 KiB is
fsspec's own default for Parquet (``fsspec.parquet.open_parquet_file(max_gap=64_000)``)."""

HASH_CHUNK = 4 << 20
HASH_WINDOW = 4
"""``cache verify`` hashes a remote shard in sequential 4 MiB reads, 4 fetched concurrently, the next 4 while the
current ones are hashed: 32 MiB in memory at most, whatever the shard size."""

PROBE_SECONDS = 20.0
"""Wall-clock bound on a metadata request (listing, manifest, size) to a store: a hung endpoint (accepts the
connection, never answers) fails in this time however many retries the client library would make."""

S3_CONFIG_DEFAULTS = {"connect_timeout": 5, "read_timeout": 30}
"""botocore ``Config`` defaults for s3://, used where the user's fsspec configuration does not set them
(``config_kwargs`` of ``FSSPEC_S3_CONFIG_KWARGS`` / ``~/.config/fsspec``). botocore's own defaults are 60 s each."""

S3_RETRY_DEFAULTS = {"mode": "standard", "max_attempts": 3}
"""botocore retries when neither fsspec's configuration nor ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE`` (or their
``~/.aws/config`` keys) say otherwise: 3 attempts with exponential backoff (botocore's standard mode) instead of
the legacy mode's 5."""

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*(::|://)")
_LOCAL_PROTOCOLS = ("file", "local")


def is_url(where: str | os.PathLike) -> bool:
    """``s3://b/p``, ``file:///x``, ``simplecache::s3://b/p``: True; a path (``c``, ``/x``, ``C:\\x``): False."""
    return isinstance(where, str) and bool(_URL.match(where))


def protocol_of(url: str) -> str:
    """The protocol that stores the bytes: ``s3`` for ``s3://b/p`` and for ``simplecache::s3://b/p``."""
    last = url.split("::")[-1]
    return last.split("://", 1)[0].lower() if "://" in last else "file"


# -- filesystems: one per process and protocol, with kdcli's defaults under the user's configuration ---------------
_FILESYSTEMS: dict[tuple[int, str], tuple[object, str]] = {}
_FS_LOCK = threading.Lock()


def storage_options(protocol: str) -> dict:
    """Keyword arguments kdcli passes to fsspec for ``protocol``: only defaults the user's fsspec configuration
    (``fsspec.config.conf``, filled from ``FSSPEC_*`` and ``~/.config/fsspec``) leaves unset; fsspec applies that
    configuration itself, explicit keywords win over it, so kdcli merges instead of overriding."""
    import fsspec.config

    if protocol not in ("s3", "s3a"):
        return {}
    user = dict(fsspec.config.conf.get(protocol, {}))
    cfg = dict(S3_CONFIG_DEFAULTS)
    if not _aws_retries_configured():
        cfg["retries"] = dict(S3_RETRY_DEFAULTS)
    cfg.update(user.get("config_kwargs") or {})
    out = {"config_kwargs": cfg}
    if not _botocore_reads_endpoint_env() and "endpoint_url" not in user and "client_kwargs" not in user:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:  # botocore < 1.31 ignores AWS_ENDPOINT_URL: hand it over the way fsspec's config would
            out["endpoint_url"] = endpoint
    return out


def _aws_retries_configured() -> bool:
    """Whether the user chose botocore's retries: ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE`` or the profile's
    ``max_attempts`` / ``retry_mode`` in ``~/.aws/config`` (botocore's own default, ``legacy``, is not a choice)."""
    if os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE"):
        return True
    try:
        import botocore.session

        scoped = botocore.session.Session().get_scoped_config()
    except Exception:  # no botocore, or a profile that does not exist: botocore will say so
        return False
    return "max_attempts" in scoped or "retry_mode" in scoped


def _botocore_reads_endpoint_env() -> bool:
    """botocore >= 1.31 resolves ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` (and ``endpoint_url`` in
    ``~/.aws/config``) by itself."""
    try:
        import botocore
    except ImportError:
        return True
    major, minor = (int(x) for x in botocore.__version__.split(".")[:2])
    return (major, minor) >= (1, 31)


def filesystem(url: str) -> tuple[object, str]:
    """(fsspec filesystem, path inside it) for ``url``, created once per process (a forked DataLoader worker or a
    new DDP rank makes its own: fsspec's async event loop and HTTP sessions do not survive a fork)."""
    key = (os.getpid(), url)
    with _FS_LOCK:
        hit = _FILESYSTEMS.get(key)
    if hit is not None:
        return hit
    protocol = protocol_of(url)
    try:
        import fsspec.core
    except ImportError:
        raise UsageError(f"{url}: reading a cache from a URL needs fsspec ({REMOTE_EXTRA})") from None
    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options(protocol))
    except ImportError as e:  # fsspec knows the protocol, its package is not installed (s3fs, gcsfs, adlfs)
        raise UsageError(f"{url}: {str(e).splitlines()[0]} ({REMOTE_EXTRA} installs s3fs)") from None
    except ValueError as e:
        raise UsageError(
            f"{url}: {str(e).splitlines()[0]}; use a local directory or an fsspec URL such as s3://bucket/prefix/cache"
        ) from None
    with _FS_LOCK:
        _FILESYSTEMS[key] = (fs, path.rstrip("/"))
    return _FILESYSTEMS[key]


def forget_filesystems() -> None:
    """Drop this process's filesystems and fsspec's cached instances of them, so the next use reads the environment
    (``AWS_*``) and fsspec's configuration afresh (a process whose environment changes: tests)."""
    with _FS_LOCK:
        for fs, _ in _FILESYSTEMS.values():
            type(fs).clear_instance_cache()
        _FILESYSTEMS.clear()


# -- errors: one line, the exit code of what the user can fix -----------------------------------------------------
_NO_CREDENTIALS = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "CredentialRetrievalError",
    "NoAuthTokenError",
    "DefaultCredentialsError",
    "ClientAuthenticationError",
}
_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ProxyConnectionError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
    "FSTimeoutError",
    "ConnectionError",
    "TimeoutError",
    "ClientOSError",
    "SSLError",
}


def _endpoint_hint(url: str) -> str:
    if protocol_of(url) in ("s3", "s3a"):
        ep = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return f" at {ep}" if ep else ""
    return ""


def translate_error(e: BaseException, url: str) -> KdError | None:
    """The one-line kdcli error for a storage failure on ``url`` (None: not a storage failure we can name).

    Missing credentials, a denied request and an unreachable endpoint are configuration (exit 2); a missing object
    is decided by the caller (a missing cache is exit 3, as for a local directory)."""
    if isinstance(e, KdError):
        return e
    names = {c.__name__ for c in type(e).__mro__}
    first = (str(e).splitlines() or [""])[0][:200]
    if names & _NO_CREDENTIALS:
        return UsageError(
            f"no credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            "AWS_PROFILE) for s3://, or the store's credentials in fsspec's configuration "
            "(FSSPEC_<PROTOCOL>_<OPTION>, ~/.config/fsspec)"
        )
    if isinstance(e, PermissionError) or "AccessDenied" in first or "InvalidAccessKeyId" in first:
        return UsageError(
            f"access to {url} denied ({first}); check the credentials (AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and the bucket's permissions"
        )
    if names & _UNREACHABLE:
        return UsageError(
            f"cannot reach the storage endpoint{_endpoint_hint(url)} for {url} ({type(e).__name__}: "
            f"{first}); check AWS_ENDPOINT_URL / the store's address and the network"
        )
    return None


@contextlib.contextmanager
def storage_errors(url: str, missing: Callable[[], KdError] | None = None) -> Iterator[None]:
    """Turn storage failures inside the block into one-line kdcli errors (``missing``: for FileNotFoundError)."""
    try:
        yield
    except FileNotFoundError:
        if missing is None:
            raise
        raise missing() from None
    except Exception as e:
        kd = translate_error(e, url)
        if kd is None or kd is e:
            raise
        raise kd from None


def reraise(e: BaseException, url: str) -> None:
    """Raise ``e`` as its one-line kdcli error where it has one, else as it is."""
    kd = translate_error(e, url)
    if kd is None or kd is e:
        raise e
    raise kd from None


def bounded(fn: Callable[[], object], seconds: float, url: str) -> object:
    """``fn()`` in a daemon thread, given up after ``seconds`` (UsageError, exit 2). Client libraries bound each
    attempt, not the total: botocore and s3fs retry a hung endpoint for minutes."""
    box: dict = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, name="kdcli-storage-probe", daemon=True).start()
    if not done.wait(seconds):
        raise UsageError(
            f"no answer from the storage endpoint{_endpoint_hint(url)} for {url} within {seconds:g} s; "
            "check AWS_ENDPOINT_URL / the store's address and the network"
        )
    if "error" in box:
        raise box["error"]
    return box["value"]


# -- locations -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Location:
    """A cache directory: ``text`` as the user wrote it (for messages), ``local`` its path when it is on this
    machine's filesystem (a plain path or a ``file://`` URL), else ``url`` an fsspec URL."""

    text: str
    local: Path | None
    url: str | None

    def __str__(self) -> str:
        return self.text

    def __fspath__(self) -> str:  # os.fspath / Path(location) work for local caches only
        if self.local is None:
            raise TypeError(f"{self.text} is a remote cache location, not a local path")
        return str(self.local)

    @property
    def remote(self) -> bool:
        return self.local is None

    def fs(self) -> tuple[object, str]:
        assert self.url is not None
        return filesystem(self.url)

    def path(self, name: str) -> str:
        """The full path of file ``name`` in this directory: a local path, or the path inside the filesystem."""
        if self.local is not None:
            return str(self.local / name)
        return f"{self.fs()[1]}/{name}"

    def _missing_dir(self) -> KdError:
        return CacheError(f"cache directory not found: {self.text}")

    # metadata (bounded in time on remote stores)
    def listing(self, *, missing_ok: bool = False) -> dict[str, int]:
        """Name -> size in bytes of every file directly in this directory (one LIST request on object stores).
        CacheError ``cache directory not found: URL`` when there is no such directory (bucket or prefix), or ``{}``
        with ``missing_ok`` (a writer's new directory: an object store has no empty prefixes)."""
        if self.local is not None:
            if not self.local.is_dir():
                if missing_ok:
                    return {}
                raise self._missing_dir()
            return {p.name: p.stat().st_size for p in self.local.iterdir() if p.is_file()}
        fs, root = self.fs()

        def ls() -> dict[str, int]:
            fs.invalidate_cache(root)  # s3fs caches listings: a re-run must see objects written since
            entries = fs.ls(root, detail=True)
            return {
                e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
                for e in entries
                if e.get("type") == "file"
            }

        try:
            with storage_errors(self.text, self._missing_dir):
                found = bounded(ls, PROBE_SECONDS, self.text)
        except CacheError:
            if missing_ok:
                return {}
            raise
        if not found and not missing_ok:  # an object store has no empty directories: no objects, no prefix
            raise self._missing_dir()
        return found

    def has(self, name: str) -> bool:
        """Whether file ``name`` is in this directory; CacheError when the directory itself is not found."""
        if self.local is not None:
            if not self.local.is_dir():
                raise self._missing_dir()
            return (self.local / name).is_file()
        return name in self.listing()

    def is_dir(self) -> bool:
        try:
            self.listing()
        except CacheError:
            return False
        return True

    def read_bytes(self, name: str) -> bytes:
        if self.local is not None:
            return (self.local / name).read_bytes()
        fs, _ = self.fs()
        path = self.path(name)
        with storage_errors(self.text):
            return bounded(lambda: fs.cat_file(path), PROBE_SECONDS, self.text)

    def put_bytes(self, name: str, data: bytes) -> None:
        """Publish ``data`` as file ``name``, whole or not at all: locally ``*.partial`` + fsync + rename
        (:func:`kdcli.infra.atomic.atomic_write_bytes`); on an object store one PUT (S3 makes an object visible
        only once its PUT or multipart upload completes, never partly), then its size is checked."""
        if self.local is not None:
            atomic_write_bytes(self.local / name, data)
            return
        fs, _ = self.fs()
        path = self.path(name)
        with storage_errors(self.text):
            fs.pipe_file(path, bytes(data))
            got = fs.info(path)["size"]
        if int(got) != len(data):
            raise CacheError(f"{self.text}: {name} has {got} bytes after upload, expected {len(data)}; re-run")

    def remove(self, name: str) -> None:
        if self.local is not None:
            (self.local / name).unlink(missing_ok=True)
            return
        fs, _ = self.fs()
        with storage_errors(self.text), contextlib.suppress(FileNotFoundError):
            fs.rm_file(self.path(name))

    def sha256(self, name: str, size: int | None = None) -> str:
        """SHA-256 of file ``name``, streamed: sequential reads, memory flat in the file size."""
        h = hashlib.sha256()
        if self.local is not None:
            with open(self.local / name, "rb") as f:
                while block := f.read(HASH_CHUNK):
                    h.update(block)
            return h.hexdigest()
        fs, _ = self.fs()
        path = self.path(name)
        with storage_errors(self.text):
            if size is None:
                size = int(fs.info(path)["size"])
            starts = list(range(0, size, HASH_CHUNK))
            windows = [starts[i : i + HASH_WINDOW] for i in range(0, len(starts), HASH_WINDOW)]
            fetcher = Fetcher(fs)
            try:

                def submit(w: list[int]) -> Future:
                    return fetcher.submit([path] * len(w), w, [min(s + HASH_CHUNK, size) for s in w])

                pending = submit(windows[0]) if windows else None
                for i in range(len(windows)):
                    parts = pending.result()
                    pending = submit(windows[i + 1]) if i + 1 < len(windows) else None  # fetched while hashing
                    for p in parts:
                        h.update(p)
            finally:
                fetcher.stop()
        return h.hexdigest()


class StoreLock:
    """One writer per cache in object storage: a ``.lock`` object (host, pid, start time) created only if absent,
    with a conditional PUT (S3 ``If-None-Match: *``: AWS S3 since 2024-08, MinIO, moto; fsspec ``pipe_file(...,
    mode="create")``), deleted when the writer finishes. Unlike a local ``flock`` (:class:`kdcli.infra.lock.DirLock`)
    nothing releases it when the writer is killed: the refusal names the object to delete by hand."""

    NAME = ".lock"

    def __init__(self, location: Location):
        self.location = location
        self.held = False

    def __enter__(self) -> StoreLock:
        fs, _ = self.location.fs()
        path = self.location.path(self.NAME)
        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode()
        try:
            with storage_errors(str(self.location)):
                fs.pipe_file(path, body, mode="create")
        except FileExistsError:
            try:
                owner = json.loads(self.location.read_bytes(self.NAME))
                who = f"{owner.get('host')}:{owner.get('pid')} since " + time.strftime(
                    "%Y-%m-%d %H:%M:%S", time.localtime(float(owner.get("since", 0)))
                )
            except Exception:  # an unreadable or vanished lock object: say what we know
                who = "another cache-teacher"
            raise CacheError(
                f"cache {self.location} is being written by {who} (its {self.NAME} object); if no "
                f"cache-teacher is writing it, delete {str(self.location).rstrip('/')}/{self.NAME} "
                "and re-run"
            ) from None
        except TypeError:  # a filesystem whose pipe_file has no exclusive create
            raise UsageError(
                f"--out {self.location}: this store offers no exclusive create (fsspec pipe_file "
                "mode='create'), so two writers could not be kept apart; write the cache to a local "
                "directory or to s3://"
            ) from None
        self.held = True
        return self

    def __exit__(self, *exc) -> None:
        if self.held:
            self.location.remove(self.NAME)
            self.held = False


def locate(where: str | os.PathLike | Location) -> Location:
    """What the user wrote for a cache directory -> a :class:`Location` (nothing is contacted yet)."""
    if isinstance(where, Location):
        return where
    text = os.fspath(where)
    if not is_url(text):
        return Location(text=text, local=Path(text), url=None)
    if protocol_of(text) in _LOCAL_PROTOCOLS and "::" not in text:
        import fsspec.core

        _, path = fsspec.core.url_to_fs(text)
        return Location(text=text, local=Path(path), url=None)
    return Location(text=text, local=None, url=text.rstrip("/"))


# -- background fetches ----------------------------------------------------------------------------------------------
class Fetcher:
    """One daemon thread running ``fs.cat_ranges`` jobs in order (s3fs, gcsfs and adlfs run each job's ranges
    concurrently on fsspec's event loop). A daemon thread, not a ThreadPoolExecutor: the interpreter joins
    executor threads at exit, and a hung request must not hold the exit."""

    def __init__(self, fs):
        self.fs = fs
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="kdcli-fetch", daemon=True)
        self._thread.start()

    def submit(self, paths: list[str], starts: list[int], ends: list[int]) -> Future:
        fut: Future = Future()
        self._jobs.put((fut, paths, starts, ends))
        return fut

    def stop(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fut, paths, starts, ends = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fetch_ranges(self.fs, paths, starts, ends))
            except BaseException as e:
                fut.set_exception(e)


def fetch_ranges(fs, paths: list[str], starts: list[int], ends: list[int]) -> list[bytes]:
    """``fs.cat_ranges`` that raises on any failure and on a short answer (an object replaced since listed)."""
    if not paths:
        return []
    out = fs.cat_ranges(paths, starts, ends, on_error="raise")
    for p, a, b, data in zip(paths, starts, ends, out):
        if isinstance(data, BaseException):
            raise data
        if len(data) != b - a:
            raise OSError(f"{p}: asked for bytes {a}..{b}, got {len(data)} (the object changed while read?)")
    return out


class ByteLRU:
    """A byte-capped LRU of immutable byte strings (process-wide: metadata blocks and whole small shards)."""

    def __init__(self, cap: int):
        self.cap, self.size = cap, 0
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key) -> bytes | None:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key, value: bytes) -> None:
        with self._lock:
            old = self._d.pop(key, None)
            self.size -= len(old) if old is not None else 0
            self._d[key] = value
            self.size += len(value)
            while self.size > self.cap and len(self._d) > 1:
                _, v = self._d.popitem(last=False)
                self.size -= len(v)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.size = 0

    def drop(self, owner: int) -> None:
        """Forget the entries of one owner (keys ``(owner, ...)``)."""
        with self._lock:
            for key in [k for k in self._d if k[0] == owner]:
                self.size -= len(self._d.pop(key))


_LRU = ByteLRU(LRU_BYTES)
_LRU_PID = [os.getpid()]
_OWNERS = itertools.count()


def process_lru() -> ByteLRU:
    if _LRU_PID[0] != os.getpid():  # a forked child starts with the parent's copy: fine to read, but bounded anew
        _LRU.clear()
        _LRU_PID[0] = os.getpid()
    return _LRU


# -- HDF5 byte layout ----------------------------------------------------------------------------------------------
@dataclass
class Layout:
    """Where the rows of one dataset sit in its file. Contiguous: ``offset`` + ``row_bytes`` per row (axis 0).
    Chunked (along axis 0 only, as kdcli's writer chunks): ``chunk_rows`` and, per stored chunk in row order, its
    first row, byte offset and stored (filtered) size. Neither (empty, compact): no ranges; reads go by the LRU."""

    row_bytes: int
    rows: int = 0
    offset: int | None = None
    chunk_rows: int = 0
    rows0: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def ranges(self, a: int, b: int) -> list[tuple[int, int]]:
        """Byte ranges [start, end) HDF5 reads for rows ``[a, b)`` of the dataset."""
        if b <= a:
            return []
        if self.offset is not None:
            return [(self.offset + a * self.row_bytes, self.offset + b * self.row_bytes)]
        if not self.chunk_rows:
            return []
        lo = int(np.searchsorted(self.rows0, a - self.chunk_rows, side="right"))
        hi = int(np.searchsorted(self.rows0, b, side="left"))
        return [(int(o), int(o + s)) for o, s in zip(self.offsets[lo:hi], self.sizes[lo:hi])]

    @property
    def nbytes(self) -> int:
        """Bytes the dataset occupies in the file (0: nothing to fetch)."""
        if self.offset is not None:
            return self.rows * self.row_bytes
        return int(self.sizes.sum())


def dataset_layout(ds: h5py.Dataset) -> Layout:
    """The :class:`Layout` of ``ds`` from HDF5's public API (H5Dget_offset; H5Dchunk_iter or H5Dget_chunk_info)."""
    row = ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64)) if ds.shape else ds.dtype.itemsize
    rows = int(ds.shape[0]) if ds.shape else 1
    if ds.chunks is None:
        off = ds.id.get_offset()
        return Layout(row_bytes=row, rows=rows, offset=None if off is None else int(off))
    if len(ds.chunks) > 1 and tuple(ds.chunks[1:]) != tuple(ds.shape[1:]):
        return Layout(row_bytes=row, rows=rows)  # chunked across other axes too: not kdcli's; LRU reads only
    info: list[tuple[int, int, int]] = []
    if hasattr(ds.id, "chunk_iter"):
        ds.id.chunk_iter(lambda s: info.append((s.chunk_offset[0], s.byte_offset, s.size)))
    else:  # pragma: no cover - HDF5 < 1.14
        for i in range(ds.id.get_num_chunks()):
            s = ds.id.get_chunk_info(i)
            info.append((s.chunk_offset[0], s.byte_offset, s.size))
    info.sort()
    arr = np.array(info, dtype=np.int64).reshape(-1, 3)
    return Layout(
        row_bytes=row, rows=rows, chunk_rows=int(ds.chunks[0]), rows0=arr[:, 0], offsets=arr[:, 1], sizes=arr[:, 2]
    )


def merge_ranges(ranges: Iterable[tuple[int, int]], gap: int | None = None) -> list[tuple[int, int]]:
    """Sorted, non-overlapping ranges; neighbours closer than ``gap`` (default :data:`MERGE_GAP`) joined."""
    gap = MERGE_GAP if gap is None else gap
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


# -- shards of one cache, opened in the process that reads them ------------------------------------------------------
@dataclass
class FetchStats:
    requests: int = 0  # ranges asked of the store (after merging)
    bytes: int = 0  # bytes fetched
    ahead: int = 0  # ranges fetched ahead (fetch/hold)
    meta: int = 0  # metadata blocks / small shards fetched on demand
    direct: int = 0  # large reads nobody fetched ahead (0 when the reader's spans cover what HDF5 reads)
    held: int = 0  # bytes of fetched ranges held now
    peak_held: int = 0


@dataclass(eq=False)  # identity: two fetches of the same bytes are two entries
class Fetched:
    shard: int
    start: int
    end: int
    future: Future
    index: int
    keep: bool = False  # a whole small dataset: moves to the LRU when released

    def data(self) -> bytes:
        return self.future.result()[self.index]


Span = tuple[int, str, int, int]  # (shard, dataset, first row/element, stop) along axis 0


class ShardFiles:
    """The shards of one cache (manifest entries: ``name``, ``bytes``), each opened on first use in the process
    that reads it. Local: ``h5py.File(path)``. Remote: h5py over a :class:`ShardFile` (module docstring).

    :meth:`fetch` (background) and :meth:`hold` (now) fetch the byte ranges of dataset spans; :meth:`release`
    drops them. Picklable: a worker gets no handle, thread or connection, only what to open."""

    def __init__(self, location: Location, shards: list[dict]):
        self.location = locate(location)
        self.names = [str(s["name"]) for s in shards]
        self.sizes = [int(s.get("bytes") or 0) for s in shards]
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._owner = next(_OWNERS)  # this instance's keys in the process-wide LRU: never another's (stale) bytes
        self._files: dict[int, h5py.File] = {}
        self._raw: dict[int, ShardFile] = {}
        self._layouts: dict[tuple[int, str], Layout] = {}
        self._live: dict[object, list[Fetched]] = {}
        self._by_shard: dict[int, list[Fetched]] = {}
        self._resident: dict[int, list[tuple[int, int]]] = {}  # small datasets kept in the LRU: (start, end)
        self._fetcher: Fetcher | None = None
        self._lock = threading.Lock()
        self.error: BaseException | None = None  # the last transport failure (raised inside HDF5's callbacks)
        self.stats = FetchStats()

    def __getstate__(self) -> dict:
        return {"location": self.location, "names": self.names, "sizes": self.sizes}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def _here(self) -> None:
        if self._pid != os.getpid():  # a forked process never uses the parent's handles, threads or sessions
            self._reset()

    # -- opening ---------------------------------------------------------------------------------------------
    @property
    def handles(self) -> dict[int, h5py.File]:
        """The shards open in this process (none in a process that has not read yet)."""
        return self._files if self._pid == os.getpid() else {}

    def file(self, i: int) -> h5py.File:
        self._here()
        f = self._files.get(i)
        if f is not None:
            return f
        loc = self.location
        if not loc.remote:
            try:
                f = h5py.File(loc.local / self.names[i], "r")
            except OSError as e:
                raise CacheError(
                    f"cannot open shard {loc.local / self.names[i]}: {e}; run `kdcli cache verify {loc}`"
                ) from None
        else:
            raw = ShardFile(self, i)
            try:
                f = h5py.File(raw, "r")
            except OSError as e:
                self.raise_transport_error()
                raise CacheError(
                    f"cannot open shard {self.names[i]} of {loc}: {str(e).splitlines()[0]}; run "
                    f"`kdcli cache verify {loc}`"
                ) from None
            self._raw[i] = raw
            _OPEN.add(self)
        self._files[i] = f
        return f

    def close(self) -> None:
        """Close every HDF5 handle (before its file object: h5py's fileobj driver must not outlive it), stop the
        fetch thread and drop every fetched range. The counters in :attr:`stats` are kept."""
        if self._pid == os.getpid():
            for f in self._files.values():
                with contextlib.suppress(Exception):
                    f.close()
            if self._fetcher is not None:
                self._fetcher.stop()
        process_lru().drop(self._owner)
        stats = self.stats
        self._reset()
        self.stats = stats

    def raise_transport_error(self) -> None:
        """Raise the last storage failure as its one-line kdcli error (HDF5 reports a failed read of its file
        object as a generic OSError; the reason is kept here)."""
        if self.error is not None:
            e, self.error = self.error, None
            raise translate_error(e, str(self.location)) or CacheError(
                f"reading {self.location} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            ) from None

    # -- byte ranges -------------------------------------------------------------------------------------------
    def layout(self, shard: int, key: str) -> Layout:
        lay = self._layouts.get((shard, key))
        if lay is None:
            lay = self._layouts[(shard, key)] = dataset_layout(self.file(shard)[key])
        return lay

    def ranges(self, spans: Iterable[Span]) -> dict[int, list[tuple[int, int, bool]]]:
        """Shard -> merged byte ranges ``(start, end, keep)`` covering what HDF5 reads for ``spans``: a small shard
        whole; a small dataset whole (``keep``: for the LRU); else the spans' own ranges."""
        out: dict[int, list[tuple[int, int]]] = {}
        keep: dict[int, list[tuple[int, int]]] = {}
        for shard, key, a, b in spans:
            if self.sizes[shard] <= WHOLE_SHARD_BYTES:
                out[shard] = [(0, self.sizes[shard])]
                continue
            lay = self.layout(shard, key)
            if 0 < lay.nbytes <= SMALL_DATASET_BYTES:
                keep.setdefault(shard, []).extend(lay.ranges(0, lay.rows))
            else:
                out.setdefault(shard, []).extend(lay.ranges(a, b))
        merged: dict[int, list[tuple[int, int, bool]]] = {}
        for shard in set(out) | set(keep):
            if self.sizes[shard] <= WHOLE_SHARD_BYTES:
                merged[shard] = [(0, self.sizes[shard], False)]
                continue
            merged[shard] = [(x, y, False) for x, y in merge_ranges(out.get(shard, []))] + [
                (x, y, True) for x, y in merge_ranges(keep.get(shard, []))
            ]
        return merged

    def _resident_data(self, shard: int, a: int, b: int) -> tuple[int, bytes] | None:
        """(start, bytes) of a small dataset kept in the LRU covering ``[a, b)``; None if not (or evicted)."""
        for x, y in self._resident.get(shard, ()):
            if x <= a and b <= y:
                data = process_lru().get((self._owner, shard, "dataset", x))
                if data is not None:
                    return x, data
                self._resident[shard].remove((x, y))
                return None
        return None

    def _covered(self, shard: int, a: int, b: int) -> Fetched | None:
        for e in self._by_shard.get(shard, ()):
            if e.start <= a and b <= e.end:
                return e
        return None

    def fetch(self, key: object, spans: Iterable[Span], *, wait: bool = False) -> None:
        """Start fetching what ``spans`` need (in the background; ``wait``: in this thread) and keep it under
        ``key`` until :meth:`release`. Ranges already held (or a small shard in the LRU) are not fetched again.
        No-op for a local cache."""
        if not self.location.remote:
            return
        self._here()
        if key in self._live:
            return
        paths, starts, ends, where, keeps = [], [], [], [], []
        lru = process_lru()
        for shard, rs in self.ranges(spans).items():
            small = self.sizes[shard] <= WHOLE_SHARD_BYTES
            if small and lru.get((self._owner, shard)) is not None:
                continue
            for a, b, keep in rs:
                if self._covered(shard, a, b) is None and self._resident_data(shard, a, b) is None:
                    paths.append(self.location.path(self.names[shard]))
                    starts.append(a)
                    ends.append(b)
                    where.append(shard)
                    keeps.append(keep)
        if not paths:
            self._live[key] = []
            return
        fs, _ = self.location.fs()
        if wait:
            fut: Future = Future()
            try:
                fut.set_result(fetch_ranges(fs, paths, starts, ends))
            except Exception as e:
                reraise(e, str(self.location))
        else:
            if self._fetcher is None:
                self._fetcher = Fetcher(fs)
            fut = self._fetcher.submit(paths, starts, ends)
        entries = [Fetched(s, a, b, fut, i, k) for i, (s, a, b, k) in enumerate(zip(where, starts, ends, keeps))]
        with self._lock:
            self._live[key] = entries
            for e in entries:
                self._by_shard.setdefault(e.shard, []).append(e)
        n = sum(b - a for a, b in zip(starts, ends))
        st = self.stats
        st.requests += len(paths)
        st.ahead += len(paths)
        st.bytes += n
        st.held += n
        st.peak_held = max(st.peak_held, st.held)

    def wait(self, key: object) -> None:
        """Block until ``key``'s ranges are here; a failed fetch raises its one-line error (not inside HDF5)."""
        for e in self._live.get(key, ()):
            try:
                e.future.result()
            except Exception as exc:
                self.release(key)
                reraise(exc, str(self.location))

    def release(self, key: object) -> None:
        """Drop ``key``'s ranges; a small shard fetched whole moves to the LRU (its next blocks need no request)."""
        lru = process_lru()
        with self._lock:
            entries = self._live.pop(key, [])
            for e in entries:
                lst = self._by_shard.get(e.shard, [])
                if e in lst:
                    lst.remove(e)
                    self.stats.held -= e.end - e.start
                if not (e.future.done() and e.future.exception() is None):
                    continue
                if e.start == 0 and e.end == self.sizes[e.shard] <= WHOLE_SHARD_BYTES:
                    lru.put((self._owner, e.shard), e.data())
                elif e.keep and self._resident_data(e.shard, e.start, e.end) is None:
                    lru.put((self._owner, e.shard, "dataset", e.start), e.data())
                    self._resident.setdefault(e.shard, []).append((e.start, e.end))

    @contextlib.contextmanager
    def hold(self, spans: Iterable[Span]) -> Iterator[None]:
        """The ranges of ``spans`` fetched now (concurrently, one ``cat_ranges``) unless already held, kept for the
        ``with`` block. No-op for a local cache."""
        if not self.location.remote:
            yield
            return
        key = object()
        self.fetch(key, list(spans), wait=True)
        try:
            yield
        finally:
            self.release(key)

    # -- what ShardFile reads --------------------------------------------------------------------------------------
    def read(self, shard: int, pos: int, n: int) -> bytes | memoryview:
        """Bytes ``[pos, pos + n)`` of shard ``shard``, exactly ``n`` of them, from wherever they are."""
        size = self.sizes[shard]
        if pos < 0 or pos + n > size:
            raise OSError(f"read of bytes {pos}..{pos + n} past the end ({size}) of {self.names[shard]}")
        e = self._covered(shard, pos, pos + n)
        if e is not None:
            return memoryview(e.data())[pos - e.start : pos - e.start + n]  # no copy until HDF5's buffer
        kept = self._resident_data(shard, pos, pos + n)
        if kept is not None:
            return memoryview(kept[1])[pos - kept[0] : pos - kept[0] + n]
        lru = process_lru()
        fs, _ = self.location.fs()
        path = self.location.path(self.names[shard])
        if size <= WHOLE_SHARD_BYTES:
            key = (self._owner, shard)
            whole = lru.get(key)
            if whole is None:
                whole = fetch_ranges(fs, [path], [0], [size])[0]
                lru.put(key, whole)
                self._count(1, size, meta=True)
            return memoryview(whole)[pos : pos + n]
        if n > 2 * META_BLOCK:  # a large read nobody fetched ahead: exactly what was asked
            self._count(1, n, direct=True)
            return fetch_ranges(fs, [path], [pos], [pos + n])[0]
        first, last = pos // META_BLOCK, (pos + n - 1) // META_BLOCK
        blocks = {}
        missing = []
        for k in range(first, last + 1):
            got = lru.get((self._owner, shard, k))
            if got is None:
                missing.append(k)
            else:
                blocks[k] = got
        if missing:
            starts = [k * META_BLOCK for k in missing]
            ends = [min((k + 1) * META_BLOCK, size) for k in missing]
            for k, data in zip(missing, fetch_ranges(fs, [path] * len(missing), starts, ends)):
                lru.put((self._owner, shard, k), data)
                blocks[k] = data
            self._count(len(missing), sum(e - s for s, e in zip(starts, ends)), meta=True)
        joined = b"".join(blocks[k] for k in range(first, last + 1))
        off = pos - first * META_BLOCK
        return joined[off : off + n]

    def _count(self, requests: int, nbytes: int, *, meta: bool = False, direct: bool = False) -> None:
        st = self.stats
        st.requests += requests
        st.bytes += nbytes
        st.meta += requests if meta else 0
        st.direct += requests if direct else 0

    def warm(self, shard: int) -> None:
        """Fetch a large shard's first and last metadata blocks in one concurrent request before HDF5 opens it
        (the superblock and root objects sit at the start, kdcli's chunk indexes often at the end)."""
        size = self.sizes[shard]
        if size <= WHOLE_SHARD_BYTES:
            return
        lru = process_lru()
        ks = sorted({0, (size - 1) // META_BLOCK})
        ks = [k for k in ks if lru.get((self._owner, shard, k)) is None]
        if not ks:
            return
        fs, _ = self.location.fs()
        path = self.location.path(self.names[shard])
        starts, ends = [k * META_BLOCK for k in ks], [min((k + 1) * META_BLOCK, size) for k in ks]
        for k, data in zip(ks, fetch_ranges(fs, [path] * len(ks), starts, ends)):
            lru.put((self._owner, shard, k), data)
        self._count(len(ks), sum(e - s for s, e in zip(starts, ends)), meta=True)


class ShardFile(io.RawIOBase):
    """A read-only file object over one remote shard for h5py's ``fileobj`` driver. h5py ignores the count
    ``readinto`` returns (``h5py/h5fd.pyx``, ``H5FD_fileobj_read``), so every read is filled completely or raises."""

    def __init__(self, owner: ShardFiles, shard: int):
        super().__init__()
        self._owner, self._shard, self._pos = weakref.proxy(owner), shard, 0
        self._size = owner.sizes[shard]
        try:
            owner.warm(shard)
        except Exception as e:
            reraise(e, str(owner.location))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf) -> int:
        n = len(buf)
        try:
            data = self._owner.read(self._shard, self._pos, n)
        except Exception as e:
            self._owner.error = e  # HDF5 turns this into a generic read error; the reader re-raises the reason
            raise
        memoryview(buf).cast("B")[:n] = data
        self._pos += n
        return n

    def flush(self) -> None:
        pass


_OPEN: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open() -> None:
    """Close remote HDF5 handles before interpreter teardown (an h5py file left open over a Python file object
    can crash at exit, measured: a segfault)."""
    for s in list(_OPEN):
        with contextlib.suppress(Exception):
            s.close()


@contextlib.contextmanager
def open_shard(location: Location | str | os.PathLike, name: str, size: int | None = None) -> Iterator[h5py.File]:
    """One shard of a cache opened read-only (local or remote), closed at the end of the ``with`` block."""
    loc = locate(location)
    if size is None:
        size = loc.listing().get(name, 0) if loc.remote else (loc.local / name).stat().st_size
    files = ShardFiles(loc, [{"name": name, "bytes": size}])
    try:
        yield files.file(0)
    finally:
        files.close()


__all__ = [
    "FetchStats",
    "Fetcher",
    "Layout",
    "Location",
    "ShardFile",
    "ShardFiles",
    "Span",
    "StoreLock",
    "bounded",
    "dataset_layout",
    "fetch_ranges",
    "filesystem",
    "forget_filesystems",
    "is_url",
    "locate",
    "merge_ranges",
    "open_shard",
    "protocol_of",
    "storage_errors",
    "storage_options",
    "translate_error",
]
