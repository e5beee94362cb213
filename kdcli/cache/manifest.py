"""manifest.json: what a cache holds, who made it, from which data, and which shards are whole.

The manifest is written atomically after every published shard with ``complete: false`` (so a resumed run knows
which shards are whole) and one last time with ``complete: true``. Readers refuse anything not complete.

Under torchrun each rank publishes its own shards and records them in its own ``manifest.rank-NNNNN.json`` (the
same document, listing only that rank's shards), so no two processes ever write one file; rank 0 merges them into
``manifest.json`` after a barrier, and a resumed run (any number of processes) merges leftovers first.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path
from typing import Any

from kdcli import __version__
from kdcli.cache.modes import mode_names
from kdcli.cache.storage import Location, locate
from kdcli.infra.errors import CacheError

MANIFEST = "manifest.json"
TEACHER_VOCAB = "teacher_vocab.json"  # a token cache with spans (manifest "xtok"): the teacher's vocabulary as strings
RANK_MANIFEST_GLOB = "manifest.rank-*.json"
FORMAT = "kdcli-cache"
FORMAT_VERSION = 1


def stored_temperatures(manifest: dict) -> dict:
    """``temperatures`` and ``sampler_temperatures`` keyword arguments for
    :func:`kdcli.losses.targets_from_arrays` from a manifest; a cache written before temperatures were recorded
    stores T = 1 only (its sparse targets are exact/unbiased there and nowhere else)."""
    return {
        "temperatures": tuple(float(t) for t in (manifest.get("temperatures") or (1.0,))),
        "sampler_temperatures": tuple(float(t) for t in (manifest.get("sampler_temperatures") or (1.0,))),
    }


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.h5"


def new_manifest(
    *, teacher: dict, data: dict, settings: dict, layout: dict, num_rows: int, tokenizer: dict | None = None
) -> dict:
    """``settings`` must match for a cache to be reused; ``layout`` describes the stored arrays."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kdcli_version": __version__,
        "teacher": teacher,
        "data": data,
        "tokenizer": tokenizer,
        "settings": settings,
        **layout,
        "num_rows": num_rows,
        "shards": [],
        "complete": False,
    }


def rank_manifest_name(rank: int) -> str:
    return f"manifest.rank-{rank:05d}.json"


def write_manifest(cache_dir: str | Path | Location, manifest: dict, name: str = MANIFEST) -> None:
    """Publish the manifest whole: locally ``*.partial`` + fsync + rename, in object storage one PUT."""
    # "complete" is written last in the document as well as last in time.
    body = {k: v for k, v in manifest.items() if k != "complete"}
    body["complete"] = bool(manifest.get("complete", False))
    locate(cache_dir).put_bytes(name, (json.dumps(body, indent=2) + "\n").encode())


def read_manifest(cache_dir: str | Path | Location, *, require_complete: bool = True, name: str = MANIFEST) -> dict:
    """The manifest of a local or remote cache (:func:`kdcli.cache.storage.locate`), checked."""
    loc = locate(cache_dir)
    path = f"{str(loc).rstrip('/')}/{name}"
    if not loc.has(name):  # CacheError "cache directory not found: ..." (a missing bucket or prefix too)
        raise CacheError(
            f"{cache_dir} has no {MANIFEST}: not a kdcli cache (or its manifest was deleted: rebuild "
            "it with cache-teacher --overwrite)"
        )
    try:
        m = json.loads(loc.read_bytes(name).decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(
            f"{path} is not valid JSON ({e.__class__.__name__}); the cache is damaged: rebuild it "
            "with cache-teacher --overwrite"
        ) from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CacheError(f"{path} is not a kdcli cache manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"{path} has cache format version {m.get('format_version')}; this kdcli reads version "
            f"{FORMAT_VERSION}: rebuild the cache with this kdcli"
        )
    required = ("teacher", "data", "settings", "mode", "num_classes", "num_rows", "shards", "complete")
    missing = [k for k in required if k not in m]
    if missing:
        raise CacheError(f"{path} lacks the key {missing[0]!r}; the manifest is damaged")
    problem = manifest_problem(m)
    if problem:
        raise CacheError(
            f"{path}: {problem}; the manifest is damaged (rebuild the cache with cache-teacher --overwrite)"
        )
    if require_complete and m["complete"] is not True:
        raise CacheError(
            f"cache {cache_dir} is incomplete (complete: false): re-run the same cache-teacher command to resume it"
        )
    return m


SHARD_NAME = re.compile(r"shard-\d{5,}\.h5")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def manifest_problem(m: dict) -> str | None:
    """The first field of a manifest that a reader cannot use as it is (None: the fields are well-formed). Shard
    names are confined to the cache directory: ``shard-NNNNN.h5``, never a path (``/``, ``..``, absolute), so a
    manifest can never make kdcli read or size a file outside its own directory."""
    for key in ("teacher", "data", "settings"):
        if not isinstance(m[key], dict):
            return f"{key!r} must be an object, got {type(m[key]).__name__}"
    if m["mode"] not in mode_names():
        return f"unknown cache mode {m['mode']!r} (this kdcli knows {', '.join(mode_names())})"
    for key in ("num_classes", "num_rows"):
        if not _int(m[key]) or m[key] < 0:
            return f"{key!r} must be a non-negative integer, got {m[key]!r}"
    if "shard_size" in m and (not _int(m["shard_size"]) or m["shard_size"] < 1):
        return f"'shard_size' must be a positive integer, got {m['shard_size']!r}"
    if not isinstance(m["shards"], list):
        return f"'shards' must be a list, got {type(m['shards']).__name__ if m['shards'] is not None else 'null'}"
    for i, sh in enumerate(m["shards"]):
        if not isinstance(sh, dict):
            return f"shard entry {i} must be an object, got {type(sh).__name__}"
        name = sh.get("name")
        if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
            return (
                f"shard entry {i} has name {name!r}; shard names are shard-NNNNN.h5 inside the cache directory "
                "(never a path)"
            )
        for key in ("row_start", "row_stop", "bytes"):
            if not _int(sh.get(key)) or sh[key] < 0:
                return f"shard {name}: {key!r} must be a non-negative integer, got {sh.get(key)!r}"
        if "sha256" in sh and not isinstance(sh["sha256"], str):
            return f"shard {name}: 'sha256' must be a string"
    return None


def plan_differences(old: dict, new: dict) -> list[str]:
    """What differs between an existing cache and the one a command would build (empty: same cache)."""
    diffs = []
    ot, nt = old["teacher"], new["teacher"]
    if ot.get("weights_sha256") != nt.get("weights_sha256"):
        diffs.append(
            "teacher weights differ (sha256 "
            f"{str(ot.get('weights_sha256'))[:12]} vs {str(nt.get('weights_sha256'))[:12]})"
        )
    for key in ("args", "num_parameters"):
        if ot.get(key) != nt.get(key):
            diffs.append(f"teacher {key} differ ({ot.get(key)} vs {nt.get(key)})")
    if ot.get("weights_sha256") is None and ot.get("spec") != nt.get("spec"):
        diffs.append(f"teacher spec differs ({ot.get('spec')} vs {nt.get('spec')})")
    od, nd = old["data"], new["data"]
    # A generated cache's data are its answers, fingerprinted when it completes; the prompts they answer are part
    # of its settings (settings["generate"]), compared below.
    for key in ("num_samples",) if "generate" in new["settings"] else ("num_samples", "fingerprint"):
        if od.get(key) != nd.get(key):
            diffs.append(f"data {key} differs ({str(od.get(key))[:16]} vs {str(nd.get(key))[:16]})")
    if old.get("tokenizer") != new.get("tokenizer"):
        diffs.append("tokenizer differs")
    if (old.get("xtok") or {}).get("version") != (new.get("xtok") or {}).get("version"):
        diffs.append("token spans differ (a cache made before kdcli recorded them, or by another version)")
    for key in sorted(set(old["settings"]) | set(new["settings"])):
        if old["settings"].get(key) != new["settings"].get(key):
            diffs.append(f"setting {key} differs ({old['settings'].get(key)} vs {new['settings'].get(key)})")
    return diffs


def check_matches_data(manifest: dict, data_identity: dict, cache_dir: Any) -> None:
    """Refuse (exit 3) a cache built from other data: row count, then the fingerprint over row hashes."""
    md = manifest["data"]
    if md.get("num_samples") != data_identity["num_samples"]:
        raise CacheError(
            f"cache {cache_dir} was built from {md.get('num_samples')} rows of {md.get('spec')!r} "
            f"but {data_identity['spec']!r} has {data_identity['num_samples']} rows"
        )
    if md.get("fingerprint") != data_identity["fingerprint"]:
        raise CacheError(
            f"cache {cache_dir} does not match the data: {data_identity['spec']!r} has different "
            f"row contents or order than {md.get('spec')!r} had when the cache was built "
            "(rows reordered, edited or relabelled); rebuild the cache for this data"
        )


# -- shard plans: which shards a run still has to compute, and which rank computes which -------------------------
def missing_shards(manifest: dict) -> list[int]:
    """Indices of the shards the manifest does not list yet (shard ``i`` covers rows ``[i*size, (i+1)*size)``)."""
    size, rows = int(manifest["shard_size"]), int(manifest["num_rows"])
    listed = {int(s["row_start"]) // size for s in manifest["shards"]}
    return [i for i in range(-(-rows // size)) if i not in listed]


def split_contiguous(items: list, rank: int, world: int) -> list:
    """Rank ``rank``'s contiguous slice of ``items``; slices are disjoint, cover ``items`` and differ by <= 1."""
    n = len(items)
    return items[n * rank // world : n * (rank + 1) // world]


def contiguous_runs(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted indices -> ``[(first, last + 1), ...]`` runs of consecutive values."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def merge_rank_manifests(cache_dir: str | Path | Location) -> int:
    """Fold every ``manifest.rank-*.json`` into ``manifest.json`` (then delete them); returns how many shards
    they added. A rank manifest planned for a different cache is dropped: its shards are not this cache's."""
    loc = locate(cache_dir)
    files = loc.listing(missing_ok=True)
    names = sorted(fnmatch.filter(files, RANK_MANIFEST_GLOB))
    if not names:
        return 0
    main = read_manifest(loc, require_complete=False) if MANIFEST in files else None
    added = 0
    for name in names:
        try:
            part = read_manifest(loc, require_complete=False, name=name)
        except CacheError:
            continue  # written atomically, so only a foreign file lands here
        if main is None:
            main = {**part, "shards": [], "complete": False}
        if plan_differences(main, part):
            continue
        known = {s["name"] for s in main["shards"]}
        new = [s for s in part["shards"] if s["name"] not in known]
        main["shards"] = sorted(main["shards"] + new, key=lambda s: s["row_start"])
        added += len(new)
    if main is not None:
        write_manifest(loc, main)  # the merged manifest is stored before the rank files go
    for name in names:
        loc.remove(name)
    return added
