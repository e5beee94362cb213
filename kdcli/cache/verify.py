"""Full cache verification (``kdcli cache verify CACHE_DIR``) and the cheap per-block checks every read runs.

:func:`verify_cache` re-reads everything: it re-hashes every shard against the manifest's sha256 and byte size,
checks each shard's datasets (names, dtypes, shapes, row ranges), that rows are covered exactly once and in order
(``row_index`` continuity, ``sample_index`` = row mod samples), that values are finite and log-probabilities
normalise (``full``: logsumexp over the classes ~ 0; ``topk``: logsumexp(top-k log-probs ∪ tail log-mass) ~ 0;
``sample``: counts add up to the draws; ``priority``: the kept mass is at most 1), that the per-temperature
statistics are possible (a tempered tail mass <= 1 and, for T > 1, at least the T = 1 tail mass; log Z_T between
0 and (1 - 1/T) log C), and that the view-0 row hashes reproduce the data fingerprint recorded
in the manifest. With ``data`` it also checks every row hash against that dataset. Problems are collected per
shard, never raised one by one: the report says everything that is wrong.

:func:`block_problems` is the content check without the hashing. :class:`~kdcli.cache.reader.CacheReader` runs it
on every block it reads (train-student, eval), so a damaged value that changes a row's index, hash, sign,
finiteness or normalisation stops training with exit 3 instead of being trained on. A same-size bit flip that
survives those checks (a low mantissa bit of one log-prob, a low bit of a top-k id) is only caught by the sha256
re-hash here: run ``kdcli cache verify`` after copying or moving a cache.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdcli.cache.manifest import RANK_MANIFEST_GLOB, TEACHER_VOCAB, read_manifest, shard_name
from kdcli.cache.modes import get_mode
from kdcli.cache.modes.base import first, logprob_problems
from kdcli.cache.storage import Location, ShardFiles, locate, open_shard
from kdcli.infra import log
from kdcli.infra.atomic import PARTIAL
from kdcli.infra.errors import CacheError
from kdcli.infra.fmt import TableData
from kdcli.infra.lock import LOCK

CHUNK_ELEMENTS = 1 << 22  # values per read while verifying: memory stays flat whatever the shard size

ROW_DTYPES = {"row_index": np.int64, "sample_index": np.int64, "row_hash": np.uint64}


@dataclass
class ShardReport:
    name: str
    row_start: int
    row_stop: int
    bytes: int
    sha256_ok: bool | None  # None: not hashed (file missing)
    ok: bool
    problems: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.row_stop - self.row_start


@dataclass
class VerifyReport:
    cache_dir: str
    kind: str
    mode: str
    num_classes: int
    complete: bool
    num_rows: int
    rows_verified: int
    bytes: int
    ok: bool
    problems: list[str]  # every problem, shard problems prefixed with the shard's name
    notes: list[str]  # not failures: leftovers of interrupted runs, a lock file
    shards: list[ShardReport]
    seconds: float
    fix: str = ""  # what to do about the problems, one sentence

    def table(self) -> TableData:
        """One row per shard, its problems (if any) in the status column."""
        rows = [
            [
                sh.name,
                f"{sh.row_start:,}..{sh.row_stop:,}",
                f"{sh.bytes:,}",
                {True: "ok", False: "MISMATCH", None: "-"}[sh.sha256_ok],
                "ok" if sh.ok else "; ".join(sh.problems),
            ]
            for sh in self.shards
        ] or [["(none)", "", "", "", "the manifest lists no shards"]]
        return TableData(
            title=f"cache verify {self.cache_dir}: {'ok' if self.ok else 'FAILED'} ({self.kind}, mode "
            f"{self.mode}, {self.rows_verified:,}/{self.num_rows:,} rows verified, "
            f"{'complete' if self.complete else 'INCOMPLETE'})",
            header=["shard", "rows", "bytes", "sha256", "status"],
            rows=rows,
            justify=["left", "right", "right", "center", "left"],
        )


# -- content checks ------------------------------------------------------------------------------------------------
def block_problems(
    manifest: dict, arrays: dict[str, np.ndarray], row_start: int, token_rows: np.ndarray | None = None
) -> list[str]:
    """Problems in the rows ``[row_start, row_start + n)`` of a cache (empty list: the block looks right).

    ``arrays`` holds the per-row arrays (``row_index``, ``sample_index``, ``row_hash``, ``aug_params``) and the
    mode's arrays: per row for classification caches, per token for token caches (then ``token_rows`` gives the
    row of each token, for messages)."""
    out: list[str] = []
    mode = manifest["mode"]
    ri = arrays["row_index"]
    n = len(ri)

    def row_at(i: int) -> str:
        return f"row {row_start + i}"

    def tok_at(i: int) -> str:
        return f"row {int(token_rows[i])} (token {i} of the block)" if token_rows is not None else row_at(i)

    expect = np.arange(row_start, row_start + n, dtype=np.int64)
    if not np.array_equal(ri, expect):
        i = int(np.flatnonzero(ri != expect)[0])
        out.append(f"row_index is not continuous: position {row_start + i} holds {int(ri[i])}")
    num_samples = int(manifest["data"]["num_samples"])
    if "sample_index" in arrays and num_samples > 0:
        si = arrays["sample_index"]
        bad = si != (expect % num_samples)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            out.append(f"sample_index of {row_at(i)} is {int(si[i])}, expected {int(expect[i] % num_samples)}")
    if "aug_params" in arrays:
        ap = arrays["aug_params"]
        if not np.isfinite(ap).all():
            out.append(f"aug_params has NaN/inf at {row_at(first(~np.isfinite(ap)))}")
        view0 = expect < num_samples
        if (ap[view0] != 0).any():
            out.append("aug_params of a view-0 row (the plain input) are not zero")
    out += get_mode(mode).problems(manifest, arrays, tok_at)
    if "target_logprobs" in arrays:
        out += logprob_problems("target_logprobs", arrays["target_logprobs"], tok_at)
    if "span_start" in arrays and "span_end" in arrays and "span_segment" in arrays:
        a, b, seg = arrays["span_start"], arrays["span_end"], arrays["span_segment"]
        bad = (a < 0) | (b < a) | (seg < -1)
        if bad.any():
            out.append(f"token spans are impossible (start < 0, end < start or segment < -1) at {tok_at(first(bad))}")
    return out


# -- full verification ---------------------------------------------------------------------------------------------
def _expected_datasets(m: dict) -> dict[str, tuple[np.dtype | None, tuple | None]]:
    """name -> (dtype, trailing shape) of every dataset a shard must hold (None: not fixed by the manifest)."""
    token = m.get("kind") == "token"
    out: dict = {name: (np.dtype(dt), ()) for name, dt in ROW_DTYPES.items()}
    if token:
        out["offsets"] = (np.dtype(np.int64), ())
    if m.get("aug_param_names"):
        out["aug_params"] = (np.dtype(np.float32), (len(m["aug_param_names"]),))
    out.update(get_mode(m["mode"]).expected(m))
    if token:
        out["target_logprobs"] = (np.dtype(np.float16), ())
        if m.get("xtok"):
            out.update({k: (np.dtype(np.int32), ()) for k in m["xtok"].get("span_keys") or ()})
    for key in m.get("extra_row_keys") or ():  # per-row datasets beside the distributions (--generate: answers)
        out[str(key)] = (None, ())
    return out


def expected_datasets(manifest: dict) -> dict[str, tuple[np.dtype | None, tuple | None]]:
    """name -> (dtype, trailing shape) of every array a shard of ``manifest``'s cache holds (dtype None: not fixed
    by the manifest): what ``cache verify`` checks, for converters that must produce or accept the same arrays."""
    return _expected_datasets(manifest)


class _Fingerprint:
    """SHA-256 over the view-0 row hashes in row order: must equal the manifest's data fingerprint."""

    def __init__(self, num_samples: int, views: int):
        self.h = hashlib.sha256()
        self.num_samples = num_samples
        self.seen = 0
        self.view0 = np.zeros(num_samples, np.uint64) if views > 1 else None

    def add(self, row_index: np.ndarray, row_hash: np.ndarray) -> str | None:
        v0 = row_index < self.num_samples
        self.h.update(np.ascontiguousarray(row_hash[v0], dtype="<u8").tobytes())
        self.seen += int(v0.sum())
        if self.view0 is not None:
            self.view0[row_index[v0]] = row_hash[v0]
            later = ~v0
            if later.any():
                samples = row_index[later] % self.num_samples
                bad = row_hash[later] != self.view0[samples]
                if bad.any():
                    r = int(row_index[later][bad][0])
                    return f"row_hash of row {r} differs from its sample's view-0 row {r % self.num_samples}"
        return None


def _chunks(n: int, width: int, offsets: np.ndarray | None) -> list[tuple[int, int]]:
    """Row ranges [a, b) whose values (rows, or tokens for token caches, x width) stay under CHUNK_ELEMENTS."""
    width = max(1, width)
    if offsets is None:
        step = max(1, CHUNK_ELEMENTS // width)
        return [(a, min(a + step, n)) for a in range(0, n, step)]
    out, a = [], 0
    while a < n:
        b = a + 1
        while b < n and (offsets[b + 1] - offsets[a]) * width <= CHUNK_ELEMENTS:
            b += 1
        out.append((a, b))
        a = b
    return out


def _verify_shard(
    loc: Location,
    sizes: dict[str, int],
    m: dict,
    entry: dict,
    index: int,
    expect_start: int,
    fp: _Fingerprint,
    data_hashes: np.ndarray | None,
) -> ShardReport:
    name = str(entry.get("name"))
    start, stop = int(entry.get("row_start", -1)), int(entry.get("row_stop", -1))
    rep = ShardReport(
        name=name, row_start=start, row_stop=stop, bytes=int(entry.get("bytes") or 0), sha256_ok=None, ok=False
    )
    p = rep.problems
    if name != shard_name(index):
        p.append(f"manifest lists it as shard {index}, which should be named {shard_name(index)}")
    if start != expect_start:
        p.append(f"covers rows from {start}, expected {expect_start} (a gap or an overlap)")
    if stop <= start:
        p.append(f"has an empty or negative row range {start}..{stop}")
    if name not in sizes:
        p.append("file is missing")
        return rep
    size = sizes[name]
    if size != rep.bytes:
        p.append(f"has {size} bytes, the manifest says {rep.bytes} (truncated or replaced)")
    rep.sha256_ok = loc.sha256(name, size) == entry.get("sha256")  # streamed: sequential reads, flat memory
    if not rep.sha256_ok:
        p.append("sha256 differs from the manifest (the file changed after it was written)")
    files = ShardFiles(loc, [{"name": name, "bytes": size}])
    try:
        f = files.file(0)
    except CacheError as e:  # a store that fails (credentials, endpoint) raises UsageError: not this shard's fault
        p.append(f"is not a readable HDF5 file ({str(e).splitlines()[0][:120]})")
        return rep
    with contextlib.closing(files):
        n = stop - start
        token = m.get("kind") == "token"
        for key, want in (("row_start", start), ("row_stop", stop)):
            got = f.attrs.get(key)
            if got is None or int(got) != want:
                p.append(f"HDF5 attribute {key} is {got}, the manifest says {want}")
        expected = _expected_datasets(m)
        extra = set(m.get("extra_row_keys") or ())
        not_tokens = {*ROW_DTYPES, "offsets", "aug_params", *extra}
        tok_keys = [k for k in expected if token and k not in not_tokens]
        for key in sorted(set(f.keys()) - set(expected)):
            p.append(f"holds an unexpected dataset {key!r}")
        structure_ok = True
        for key, (dt, trail) in expected.items():
            if key not in f:
                p.append(f"lacks the dataset {key!r}")
                structure_ok = False
                continue
            ds = f[key]
            if dt is not None and ds.dtype != dt:
                p.append(f"dataset {key} has dtype {ds.dtype}, expected {dt}")
                structure_ok = False
            lead = n + 1 if key == "offsets" else None if key in tok_keys else n  # token arrays: see offsets
            if lead is not None and ds.shape[:1] != (lead,):
                p.append(f"dataset {key} has {ds.shape[0] if ds.shape else 0} entries, expected {lead}")
                structure_ok = False
            if None not in trail and tuple(ds.shape[1:]) != tuple(trail):
                p.append(f"dataset {key} has shape {ds.shape}, expected (rows{''.join(', ' + str(t) for t in trail)})")
                structure_ok = False
        offsets = None
        if structure_ok and token:
            offsets = f["offsets"][()]
            if offsets[0] != 0 or (np.diff(offsets) < 0).any():
                p.append("offsets do not start at 0 and never decrease")
                structure_ok = False
            for key in tok_keys:
                if structure_ok and f[key].shape[0] != offsets[-1]:
                    p.append(f"dataset {key} has {f[key].shape[0]} tokens, offsets say {int(offsets[-1])}")
                    structure_ok = False
        if not structure_ok:  # content checks would only repeat it
            return rep
        width = max([int(np.prod(t)) for _, t in expected.values() if t and None not in t] or [1])
        row_keys = [k for k in expected if k != "offsets" and k not in tok_keys and k not in extra]
        for a, b in _chunks(n, width, offsets):
            arrays = {k: f[k][a:b] for k in row_keys}
            token_rows = None
            if token:
                lo, hi = int(offsets[a]), int(offsets[b])
                for k in tok_keys:
                    arrays[k] = f[k][lo:hi]
                token_rows = start + a + np.repeat(np.arange(b - a), np.diff(offsets[a : b + 1]))
            found = block_problems(m, arrays, start + a, token_rows)
            if found:
                p += found[:3]
                break
            msg = fp.add(arrays["row_index"], arrays["row_hash"])
            if msg:
                p.append(msg)
                break
            if data_hashes is not None:
                want = data_hashes[arrays["sample_index"]]
                bad = want != arrays["row_hash"]
                if bad.any():
                    r, i = int(arrays["row_index"][bad][0]), int(arrays["sample_index"][bad][0])
                    p.append(f"row {r} was made from different content than data row {i}")
                    break
    rep.ok = not p
    return rep


def teacher_vocab_problems(d: Location, m: dict, sizes: dict[str, int]) -> list[str]:
    """A cache that records token spans (manifest ``xtok``) holds the teacher's vocabulary as strings in
    :data:`~kdcli.cache.manifest.TEACHER_VOCAB`, checksummed like a shard (``sizes``: the cache's listing)."""
    vocab = (m.get("xtok") or {}).get("vocab")
    if not vocab:
        return []
    if TEACHER_VOCAB not in sizes:
        return [f"{TEACHER_VOCAB} (the teacher's vocabulary as strings) is missing"]
    if hashlib.sha256(d.read_bytes(TEACHER_VOCAB)).hexdigest() != vocab.get("file_sha256"):
        return [f"{TEACHER_VOCAB} differs from the manifest's sha256 (the file changed after it was written)"]
    return []


def verify_cache(cache_dir: str | Path, data: str | None = None) -> VerifyReport:
    """Re-hash and re-check a whole cache. Raises CacheError only when there is no manifest to verify against."""
    t0 = time.perf_counter()
    d = locate(cache_dir)  # a local directory or an fsspec URL (s3://bucket/prefix, ...)
    m = read_manifest(d, require_complete=False)
    sizes = d.listing()  # every file's size in one listing (one LIST request in object storage)
    problems: list[str] = []
    notes: list[str] = []
    if m["complete"] is not True:
        problems.append(
            "manifest says complete: false (cache-teacher was interrupted or is still running; re-run "
            "the same command to finish it)"
        )
    kind = m.get("kind") or "classification"
    data_hashes = None
    if data is not None:
        if kind == "token":
            raise CacheError(
                "cache verify --data checks classification caches; for a token (LM) cache, run "
                "train-student or eval with it, which check the data fingerprint"
            )
        from kdcli.cache.manifest import check_matches_data
        from kdcli.data import load_data

        ds = load_data(data, num_classes=int(m["num_classes"]))
        check_matches_data(m, ds.identity(), d)
        data_hashes = ds.row_hash
    num_samples = int(m["data"].get("num_samples") or 0)
    fp = _Fingerprint(num_samples, int(m.get("views") or 1))
    shards: list[ShardReport] = []
    expect = 0
    with log.Progress(sum(int(e.get("bytes", 0)) for e in m["shards"]), "cache verify", unit="bytes") as progress:
        for i, entry in enumerate(m["shards"]):
            rep = _verify_shard(d, sizes, m, entry, i, expect, fp, data_hashes)
            shards.append(rep)
            problems += [f"{rep.name}: {x}" for x in rep.problems]
            progress.advance(int(entry.get("bytes", 0)))
            expect = max(expect, rep.row_stop)
    covered = expect
    if m["complete"] is True and covered != int(m["num_rows"]):
        problems.append(f"shards cover rows 0..{covered}, the manifest says {int(m['num_rows'])} rows")
    all_ok = all(s.ok for s in shards)
    if m["complete"] is True and all_ok and covered == int(m["num_rows"]):
        want = m["data"].get("fingerprint")
        got = fp.h.hexdigest()
        if fp.seen != num_samples:
            problems.append(f"view-0 rows cover {fp.seen} samples, the data had {num_samples}")
        elif want and got != want:
            problems.append(
                "the row hashes do not reproduce the data fingerprint in the manifest (rows edited, "
                "reordered or from other data)"
            )
    if kind == "token" and m["complete"] is True and all_ok:
        want_tokens = m["data"].get("num_targets")
        if want_tokens is not None:
            got_tokens = 0
            for s in m["shards"]:
                with open_shard(d, s["name"], s.get("bytes")) as f:
                    got_tokens += int(f["offsets"][-1])
            if got_tokens != int(want_tokens):
                problems.append(f"shards hold {got_tokens} tokens, the manifest's data has {int(want_tokens)}")
    problems += teacher_vocab_problems(d, m, sizes)
    listed = {s.get("name") for s in m["shards"]}
    stray = sorted(n for n in fnmatch.filter(sizes, "shard-*.h5") if n not in listed)
    if stray:
        notes.append(
            f"{len(stray)} shard file(s) not listed in the manifest ({stray[0]}...): leftovers of an "
            "interrupted run; they are ignored and replaced when cache-teacher resumes"
        )
    partials = sorted(fnmatch.filter(sizes, "*" + PARTIAL))
    if partials:
        notes.append(
            f"{len(partials)} *{PARTIAL} file(s) ({partials[0]}...): leftovers of an interrupted write, "
            "removed when cache-teacher runs again"
        )
    ranks = sorted(fnmatch.filter(sizes, RANK_MANIFEST_GLOB))
    if ranks:
        notes.append(
            f"{len(ranks)} per-rank manifest(s) ({ranks[0]}...): an interrupted torchrun run; the next "
            "cache-teacher run merges them"
        )
    if LOCK in sizes:
        notes.append(f"{LOCK} present: a cache-teacher may be writing this cache now (or one was killed)")
    rows_verified = sum(s.rows for s in shards if s.ok)
    bad = [s.name for s in shards if not s.ok]
    if bad:
        fix = (
            f"delete the damaged shard file(s) ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) and re-run "
            "the same cache-teacher command: it recomputes only what is missing"
        )
    elif m["complete"] is not True:
        fix = "re-run the same cache-teacher command to finish the cache"
    else:
        fix = "rebuild the cache with the same cache-teacher command and --overwrite"
    return VerifyReport(
        cache_dir=str(d),
        kind=kind,
        mode=m["mode"],
        num_classes=int(m["num_classes"]),
        complete=m["complete"] is True,
        num_rows=int(m["num_rows"]),
        rows_verified=rows_verified,
        bytes=sum(s.bytes for s in shards),
        ok=not problems,
        problems=problems,
        notes=notes,
        shards=shards,
        seconds=time.perf_counter() - t0,
        fix=fix if problems else "",
    )
