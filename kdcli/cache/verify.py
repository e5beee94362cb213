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

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from kdcli.cache.atomic import PARTIAL
from kdcli.cache.lock import LOCK
from kdcli.cache.manifest import (MODE_KEYS, RANK_MANIFEST_GLOB, STAT_DTYPE_NAMES, STAT_KEYS, read_manifest,
                                  shard_name, stat_temperatures)
from kdcli.errors import CacheError

NORM_TOL = 1e-2
"""Max |logsumexp| (nats) of a stored distribution. fp16 log-probs round each value to 2^-12 relative, which moves
the total mass by at most entropy * 2^-12 (< 3e-3 for a 50k vocabulary); anything past 1e-2 is damage."""

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


# -- content checks ------------------------------------------------------------------------------------------------
def _lse(a: np.ndarray) -> np.ndarray:
    """Row-wise logsumexp in float32 (``-inf`` entries allowed; ample for a 1e-2 tolerance)."""
    a = a.astype(np.float32, copy=False)
    m = np.max(a, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", under="ignore"):
        return np.log(np.sum(np.exp(a - m), axis=-1)) + m[..., 0]


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))[0])


def _logprob_problems(name: str, lp: np.ndarray, where, valid: np.ndarray | None = None) -> list[str]:
    v = lp if valid is None else np.where(valid, lp, 0)
    bad = ~np.isfinite(v)
    if bad.any():
        return [f"{name} has NaN/inf at {where(_first(bad))}"]
    pos = v > 0
    if pos.any():
        return [f"{name} has a positive log-probability at {where(_first(pos))}"]
    return []


def _norm_problem(lse: np.ndarray, what: str, where) -> list[str]:
    off = np.abs(lse) > NORM_TOL
    if off.any():
        i = _first(off)
        return [f"{what} does not normalise at {where(i)}: logsumexp = {lse[i]:+.4f} (tolerance {NORM_TOL:g})"]
    return []


def _f32(a: np.ndarray) -> np.ndarray:
    """float16 -> float32. numpy's cast is scalar code; torch's is vectorised (F16C), ~1.5-2x faster, and torch is
    already loaded wherever caches are read for training."""
    if a.dtype == np.float16 and "torch" in sys.modules:
        return sys.modules["torch"].from_numpy(np.ascontiguousarray(a)).float().numpy()
    return a.astype(np.float32)


def _plausible(lp: np.ndarray, tail: np.ndarray | None) -> bool:
    """Fast all-clear for (rows, k) float32 log-probs (+ a tail log-mass per row): all finite and <= 0 and every
    row's mass within NORM_TOL of 1. exp(lp) <= 1 cannot overflow; NaN fails every comparison."""
    if lp.size and not (lp.max() <= 0 and lp.min() > -np.inf):
        return False
    mass = np.exp(lp).sum(axis=-1)
    if tail is not None:
        if tail.size and not tail.max() <= 0:  # -inf allowed: no mass outside the top k
            return False
        mass += np.exp(tail)
    return bool(np.all(np.abs(np.log(mass)) <= NORM_TOL))


def _distinct_sorted(ids: np.ndarray, lp: np.ndarray) -> bool:
    if ids.shape[-1] < 2:
        return True
    s = np.sort(ids, axis=-1)
    return not (s[:, 1:] == s[:, :-1]).any() and not (np.diff(lp, axis=-1) > 0).any()


def _topk_problems(ids, lp, tail, num_classes: int, where) -> list[str]:
    out = []
    if ids.size and int(ids.max()) >= num_classes:
        out.append(f"topk_ids has id {int(ids.max())} >= {num_classes} classes at "
                   f"{where(_first(ids >= num_classes))}")
    s = np.sort(ids.astype(np.int64), axis=-1)
    dup = (s[:, 1:] == s[:, :-1]).any(axis=-1) if ids.shape[-1] > 1 else np.zeros(len(ids), bool)
    if dup.any():
        out.append(f"topk_ids repeats an id at {where(int(np.flatnonzero(dup)[0]))}")
    found = _logprob_problems("topk_logprobs", lp, where)
    if not found and lp.shape[-1] > 1 and (np.diff(lp, axis=-1) > 0).any():
        found = [f"topk_logprobs are not sorted (largest first) at {where(_first(np.diff(lp, axis=-1) > 0))}"]
    t = tail.astype(np.float32)
    if np.isnan(t).any() or (t > 0).any():
        found.append(f"tail_logmass is NaN or positive at {where(_first(np.isnan(t) | (t > 0)))}")
    out += found
    if not found:
        out += _norm_problem(_lse(np.concatenate([lp, t[:, None]], axis=-1)), "top-k log-probs + tail log-mass",
                             where)
    return out


def _priority_problems(ids, lp, log_tau, num_classes: int, where) -> list[str]:
    """Kept ids in range and distinct, log-probs <= 0 (-inf: a class of probability 0, kept only when fewer than K
    have any), sorted largest first, kept mass <= 1; log tau not NaN and not +inf."""
    out = []
    if ids.size and int(ids.max()) >= num_classes:
        out.append(f"priority_ids has id {int(ids.max())} >= {num_classes} classes at "
                   f"{where(_first(ids >= num_classes))}")
    if ids.shape[-1] > 1:
        srt = np.sort(ids.astype(np.int64), axis=-1)
        dup = (srt[:, 1:] == srt[:, :-1]).any(axis=-1)
        if dup.any():
            out.append(f"priority_ids repeats an id at {where(int(np.flatnonzero(dup)[0]))}")
    bad = np.isnan(lp) | (lp > 0) | (lp == np.inf)
    if bad.any():
        return out + [f"priority_logprobs has NaN or a positive log-probability at {where(_first(bad))}"]
    with np.errstate(invalid="ignore"):
        unsorted = np.diff(lp, axis=-1) > 0 if lp.shape[-1] > 1 else np.zeros((len(lp), 1), bool)
    if unsorted.any():
        out.append(f"priority_logprobs are not sorted (largest first) at {where(_first(unsorted))}")
    over = _lse(lp) > NORM_TOL
    if over.any():
        out.append(f"priority_logprobs hold more than all the probability mass at {where(_first(over))}")
    t = np.asarray(log_tau, dtype=np.float32)
    if (np.isnan(t) | (t == np.inf)).any():
        out.append(f"priority_tau is NaN or +inf at {where(_first(np.isnan(t) | (t == np.inf)))}")
    return out


def _stat_problems(manifest: dict, key: str, stats: np.ndarray, tail: np.ndarray | None, num_classes: int,
                   where) -> list[str]:
    """The per-temperature statistics must be possible values: ``tail_logmass_t`` <= 0 and, at T > 1, >= the T = 1
    tail (tempering never moves mass into the top k; <= at T < 1); ``*_logz_t`` between 0 and (1 - 1/T) log C
    (Z_T = sum p^(1/T) is 1 for a one-hot p and C^(1 - 1/T) for a uniform one)."""
    ts = stat_temperatures(manifest.get("temperatures"))
    x = np.asarray(stats, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != len(ts):
        return [f"{key} has shape {x.shape}, expected (rows, {len(ts)}) for T = {', '.join(f'{t:g}' for t in ts)}"]
    if np.isnan(x).any():
        return [f"{key} has NaN at {where(_first(np.isnan(x)))}"]
    if key == "tail_logmass_t":
        slack = NORM_TOL + 2.0 ** -10 * np.abs(np.where(np.isfinite(x), x, 0))  # float16 rounding
        bad = x > slack
        if tail is not None:
            t1 = np.asarray(tail, dtype=np.float32)[:, None]
            with np.errstate(invalid="ignore"):
                off = np.where(np.asarray(ts)[None, :] > 1, x < t1 - slack, x > t1 + slack)
            bad |= off & np.isfinite(t1)
        if bad.any():
            i = _first(bad)
            j = int(np.flatnonzero(bad[i])[0])
            t1 = f"{float(tail[i]):+.4f}" if tail is not None else "not stored"
            return [f"{key} is not a possible tempered tail mass at {where(i)} (log {float(x[i, j]):+.4f} at "
                    f"T = {ts[j]:g}; log tail at T = 1: {t1})"]
        return []
    lo = np.minimum(0.0, (1 - 1 / np.asarray(ts)) * np.log(num_classes))[None, :] - NORM_TOL
    hi = np.maximum(0.0, (1 - 1 / np.asarray(ts)) * np.log(num_classes))[None, :] + NORM_TOL
    with np.errstate(invalid="ignore"):
        bad = ~((x >= lo) & (x <= hi))
    if bad.any():
        i = _first(bad)
        j = int(np.flatnonzero(bad[i])[0])
        return [f"{key} = {float(x[i, j]):.4f} at {where(i)} is outside [{float(lo[0, j]):.3f}, "
                f"{float(hi[0, j]):.3f}], the possible log Z_T at T = {ts[j]:g} for {num_classes} classes"]
    return []


def block_problems(manifest: dict, arrays: dict[str, np.ndarray], row_start: int,
                   token_rows: np.ndarray | None = None) -> list[str]:
    """Problems in the rows ``[row_start, row_start + n)`` of a cache (empty list: the block looks right).

    ``arrays`` holds the per-row arrays (``row_index``, ``sample_index``, ``row_hash``, ``aug_params``) and the
    mode's arrays: per row for classification caches, per token for token caches (then ``token_rows`` gives the
    row of each token, for messages)."""
    out: list[str] = []
    mode = manifest["mode"]
    num_classes = int(manifest["num_classes"])
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
            out.append(f"aug_params has NaN/inf at {row_at(_first(~np.isfinite(ap)))}")
        view0 = expect < num_samples
        if (ap[view0] != 0).any():
            out.append("aug_params of a view-0 row (the plain input) are not zero")
    where = tok_at
    if mode == "full":
        lp = _f32(arrays["logprobs"])
        if not _plausible(lp, None):  # the fast all-clear failed: find and name the first bad row
            found = _logprob_problems("logprobs", lp, where)
            out += found or _norm_problem(_lse(lp), "logprobs", where)
    elif mode == "topk":
        ids, lp, tail = arrays["topk_ids"], _f32(arrays["topk_logprobs"]), arrays["tail_logmass"]
        fine = (not ids.size or int(ids.max()) < num_classes) and _plausible(lp, _f32(tail)) and \
            _distinct_sorted(ids, lp)
        if not fine:  # the fast all-clear failed: find and name the first bad row
            out += _topk_problems(ids, lp, tail, num_classes, where)
    elif mode == "sample":
        ids, counts, lp = arrays["sample_ids"], arrays["sample_counts"], arrays["sample_logprobs"]
        used = counts > 0
        draws = int(manifest.get("samples") or 0)
        total = counts.astype(np.int64).sum(axis=-1)
        if draws and (total != draws).any():
            i = int(np.flatnonzero(total != draws)[0])
            out.append(f"sample_counts of {where(i)} add up to {int(total[i])}, not the {draws} draws")
        if (ids[used] >= num_classes).any():
            out.append(f"sample_ids has an id >= {num_classes} classes at "
                       f"{where(_first(used & (ids >= num_classes)))}")
        prefix = np.cumprod(used, axis=-1).astype(bool)  # used slots come first, then unused
        if (used != prefix).any():
            out.append("sample slots are not packed (a used slot after an unused one) at "
                       f"{where(_first(used != prefix))}")
        i64 = ids.astype(np.int64)
        both = used[:, 1:] & used[:, :-1]
        if (both & (i64[:, 1:] <= i64[:, :-1])).any():
            out.append(f"sample_ids are not distinct and ascending at "
                       f"{where(_first(both & (i64[:, 1:] <= i64[:, :-1])))}")
        out += _logprob_problems("sample_logprobs", lp, where, valid=used)
    elif mode == "priority":
        out += _priority_problems(arrays["priority_ids"], _f32(arrays["priority_logprobs"]), arrays["priority_tau"],
                                  num_classes, where)
    stat_key = STAT_KEYS.get(mode)
    if stat_key in arrays:
        out += _stat_problems(manifest, stat_key, arrays[stat_key], arrays.get("tail_logmass"), num_classes, where)
    if "target_logprobs" in arrays:
        out += _logprob_problems("target_logprobs", arrays["target_logprobs"], where)
    return out


# -- full verification ---------------------------------------------------------------------------------------------
def _expected_datasets(m: dict) -> dict[str, tuple[np.dtype | None, tuple | None]]:
    """name -> (dtype, trailing shape) of every dataset a shard must hold (None: not fixed by the manifest)."""
    mode, k, s = m["mode"], m.get("top_k"), m.get("samples")
    token = m.get("kind") == "token"
    id_dt = np.dtype(m["id_dtype"]) if m.get("id_dtype") else None
    out: dict = {name: (np.dtype(dt), ()) for name, dt in ROW_DTYPES.items()}
    if token:
        out["offsets"] = (np.dtype(np.int64), ())
    if m.get("aug_param_names"):
        out["aug_params"] = (np.dtype(np.float32), (len(m["aug_param_names"]),))
    f16 = np.dtype(np.float16)
    if mode == "full":
        out["logprobs"] = (f16, (int(m["num_classes"]),))
    elif mode == "topk":
        out["topk_ids"] = (id_dt, (k,))
        out["topk_logprobs"] = (f16, (k,))
        out["tail_logmass"] = (np.dtype(m.get("tail_dtype") or np.float32), ())
    elif mode == "sample":
        out["sample_ids"] = (id_dt, (s,))
        out["sample_counts"] = (np.dtype(m.get("count_dtype") or np.uint16), (s,))
        out["sample_logprobs"] = (f16, (s,))
    elif mode == "priority":
        out["priority_ids"] = (id_dt, (s,))
        out["priority_logprobs"] = (f16, (s,))
        out["priority_tau"] = (np.dtype(m.get("tau_dtype") or np.float32), ())
    stats = stat_temperatures(m.get("temperatures"))
    if mode in STAT_KEYS and stats:
        key = STAT_KEYS[mode]
        out[key] = (np.dtype(m.get("stat_dtype") or STAT_DTYPE_NAMES[key]), (len(stats),))
    if token:
        out["target_logprobs"] = (f16, ())
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


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


def _verify_shard(cache_dir: Path, m: dict, entry: dict, index: int, expect_start: int, fp: _Fingerprint,
                  data_hashes: np.ndarray | None) -> ShardReport:
    name = str(entry.get("name"))
    start, stop = int(entry.get("row_start", -1)), int(entry.get("row_stop", -1))
    rep = ShardReport(name=name, row_start=start, row_stop=stop, bytes=int(entry.get("bytes") or 0),
                      sha256_ok=None, ok=False)
    p = rep.problems
    if name != shard_name(index):
        p.append(f"manifest lists it as shard {index}, which should be named {shard_name(index)}")
    if start != expect_start:
        p.append(f"covers rows from {start}, expected {expect_start} (a gap or an overlap)")
    if stop <= start:
        p.append(f"has an empty or negative row range {start}..{stop}")
    path = cache_dir / name
    if not path.is_file():
        p.append("file is missing")
        return rep
    size = path.stat().st_size
    if size != rep.bytes:
        p.append(f"has {size} bytes, the manifest says {rep.bytes} (truncated or replaced)")
    rep.sha256_ok = _sha256(path) == entry.get("sha256")
    if not rep.sha256_ok:
        p.append("sha256 differs from the manifest (the file changed after it was written)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        p.append(f"is not a readable HDF5 file ({str(e).splitlines()[0][:120]})")
        return rep
    with f:
        n = stop - start
        token = m.get("kind") == "token"
        for key, want in (("row_start", start), ("row_stop", stop)):
            got = f.attrs.get(key)
            if got is None or int(got) != want:
                p.append(f"HDF5 attribute {key} is {got}, the manifest says {want}")
        expected = _expected_datasets(m)
        tok_keys = [k for k in expected if token and k not in ROW_DTYPES and k not in ("offsets", "aug_params")]
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
        row_keys = [k for k in expected if k != "offsets" and k not in tok_keys]
        for a, b in _chunks(n, width, offsets):
            arrays = {k: f[k][a:b] for k in row_keys}
            token_rows = None
            if token:
                lo, hi = int(offsets[a]), int(offsets[b])
                for k in tok_keys:
                    arrays[k] = f[k][lo:hi]
                token_rows = start + a + np.repeat(np.arange(b - a), np.diff(offsets[a:b + 1]))
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


def verify_cache(cache_dir: str | Path, data: str | None = None) -> VerifyReport:
    """Re-hash and re-check a whole cache. Raises CacheError only when there is no manifest to verify against."""
    t0 = time.perf_counter()
    d = Path(cache_dir)
    m = read_manifest(d, require_complete=False)
    problems: list[str] = []
    notes: list[str] = []
    if m["complete"] is not True:
        problems.append("manifest says complete: false (cache-teacher was interrupted or is still running; re-run "
                        "the same command to finish it)")
    kind = m.get("kind") or "classification"
    if m["mode"] not in MODE_KEYS:
        raise CacheError(f"{d}: unknown cache mode {m['mode']!r} in the manifest")
    data_hashes = None
    if data is not None:
        if kind == "token":
            raise CacheError("cache verify --data checks classification caches; for a token (LM) cache, run "
                             "train-student or eval with it, which check the data fingerprint")
        from kdcli.cache.manifest import check_matches_data
        from kdcli.data import load_data

        ds = load_data(data, num_classes=int(m["num_classes"]))
        check_matches_data(m, ds.identity(), d)
        data_hashes = ds.row_hash
    num_samples = int(m["data"].get("num_samples") or 0)
    fp = _Fingerprint(num_samples, int(m.get("views") or 1))
    shards: list[ShardReport] = []
    expect = 0
    for i, entry in enumerate(m["shards"]):
        rep = _verify_shard(d, m, entry, i, expect, fp, data_hashes)
        shards.append(rep)
        problems += [f"{rep.name}: {x}" for x in rep.problems]
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
            problems.append("the row hashes do not reproduce the data fingerprint in the manifest (rows edited, "
                            "reordered or from other data)")
    if kind == "token" and m["complete"] is True and all_ok:
        want_tokens = m["data"].get("num_targets")
        if want_tokens is not None:
            got_tokens = 0
            for s in m["shards"]:
                with h5py.File(d / s["name"], "r") as f:
                    got_tokens += int(f["offsets"][-1])
            if got_tokens != int(want_tokens):
                problems.append(f"shards hold {got_tokens} tokens, the manifest's data has {int(want_tokens)}")
    listed = {s.get("name") for s in m["shards"]}
    stray = sorted(p.name for p in d.glob("shard-*.h5") if p.name not in listed)
    if stray:
        notes.append(f"{len(stray)} shard file(s) not listed in the manifest ({stray[0]}...): leftovers of an "
                     "interrupted run; they are ignored and replaced when cache-teacher resumes")
    partials = sorted(p.name for p in d.glob("*" + PARTIAL))
    if partials:
        notes.append(f"{len(partials)} *{PARTIAL} file(s) ({partials[0]}...): leftovers of an interrupted write, "
                     "removed when cache-teacher runs again")
    ranks = sorted(p.name for p in d.glob(RANK_MANIFEST_GLOB))
    if ranks:
        notes.append(f"{len(ranks)} per-rank manifest(s) ({ranks[0]}...): an interrupted torchrun run; the next "
                     "cache-teacher run merges them")
    if (d / LOCK).exists():
        notes.append(f"{LOCK} present: a cache-teacher may be writing this cache now (or one was killed)")
    rows_verified = sum(s.rows for s in shards if s.ok)
    bad = [s.name for s in shards if not s.ok]
    if bad:
        fix = (f"delete the damaged shard file(s) ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) and re-run "
               "the same cache-teacher command: it recomputes only what is missing")
    elif m["complete"] is not True:
        fix = "re-run the same cache-teacher command to finish the cache"
    else:
        fix = "rebuild the cache with the same cache-teacher command and --overwrite"
    return VerifyReport(cache_dir=str(d), kind=kind, mode=m["mode"], num_classes=int(m["num_classes"]),
                        complete=m["complete"] is True, num_rows=int(m["num_rows"]), rows_verified=rows_verified,
                        bytes=sum(s.bytes for s in shards), ok=not problems, problems=problems, notes=notes,
                        shards=shards, seconds=time.perf_counter() - t0, fix=fix if problems else "")
