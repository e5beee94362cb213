"""``kdcli cache export`` and ``kdcli cache import``: a cache to the formats other trainers read, and back.

The formats themselves are :mod:`kdcli.cache.formats` (one file each). This stage does what every conversion
shares: the request checks (an option the format does not take, a missing ``--data`` / ``--tokenizer``), the refusals
and losses the format announces before anything is written (one stderr line per loss), the cache's own DATA re-read
and checked against its fingerprint where an export carries token ids, progress, and the output directory:

- ``--out`` is checked before any work (:func:`kdcli.infra.outdir.check_out`);
- the output is built in a hidden sibling ``.NAME.PID-HEX.partial`` and renamed into place only when whole; a
  failed or killed conversion leaves nothing at ``--out`` (the next run on that ``--out`` removes the leftover of a
  dead process: :func:`kdcli.infra.outdir.remove_stale`);
- ``--overwrite`` never deletes first: the finished output is swapped in for the old one in one step
  (:func:`kdcli.infra.outdir.swap_in`), and it only ever replaces what the same command writes (an export
  directory, a kdcli cache), never another directory.

An import ends with the checks ``kdcli cache verify`` runs (sha256 of every shard, every value, the data
fingerprint) on the new cache before it is put in place.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from kdcli.cache.formats import format_names, get_format
from kdcli.cache.formats.base import Format, Options
from kdcli.cache.formats.common import (
    TOKENS_FILE,
    ExportSummary,
    ImportSummary,
    TokenizerInfo,
    dir_bytes,
    is_token,
    say_lost,
)
from kdcli.cache.manifest import MANIFEST, check_matches_data, read_manifest
from kdcli.infra import log
from kdcli.infra.atomic import fsync_dir
from kdcli.infra.errors import CacheError, UsageError
from kdcli.infra.outdir import check_out, make_dir, remove_stale, swap_in

__all__ = ["ExportRequest", "ImportRequest", "export_cache", "import_cache"]


@dataclass
class ExportRequest:
    """``kdcli cache export CACHE --format FORMAT --out DIR``."""

    cache: str
    format: str
    out: str
    data: str | None = None  # the DATA the (token) cache was built from: token ids for the formats that carry them
    tokenizer: str | None = None  # a copy of the cache's tokenizer, where the recorded one is gone
    trust_remote_code: bool = False
    overwrite: bool = False
    options: Options = field(default_factory=Options)


@dataclass
class ImportRequest:
    """``kdcli cache import SRC --format FORMAT --out CACHE``."""

    source: str
    format: str
    out: str
    tokenizer: str | None = None  # the tokenizer that made the source's token ids (sources that record none)
    trust_remote_code: bool = False
    overwrite: bool = False
    options: Options = field(default_factory=Options)


OPTION_FLAGS = {
    "temperature": "--temperature",
    "alignment": "--alignment",
    "vocab_size": "--vocab-size",
    "ranks": "--ranks",
    "compression_config": "--compression-config",
}


def check_options(fmt: Format, opts: Options, action: str) -> None:
    """Refuse (exit 2) an option ``fmt`` does not take for ``action``: it would be ignored."""
    for name in opts.given():
        if name not in fmt.options(action):
            users = [n for n in format_names(action) if name in get_format(n, action).options(action)]
            where = f" --format {' and '.join(users)}" if users else ""
            raise UsageError(
                f"{OPTION_FLAGS[name]} applies to {action}{where}; {action} --format {fmt.name} would ignore it"
            )


# -- output directories -------------------------------------------------------------------------------------------
def is_export_dir(d: Path) -> bool:
    """A directory ``kdcli cache export`` wrote: Parquet parts and nothing else (what --overwrite may replace)."""
    names = [p.name for p in d.iterdir()]
    return bool(names) and all(n.startswith("part-") and n.endswith(".parquet") for n in names)


def is_cache_dir(d: Path) -> bool:
    """A kdcli cache (its manifest.json): what ``cache import --overwrite`` may replace."""
    return (d / MANIFEST).is_file()


def check_target(out: Path, overwrite: bool, is_own, what: str) -> None:
    """Before any work: ``out`` can become a directory, and is new, empty, or (with --overwrite) one of ours."""
    check_out(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(
                f"--out {out} already exists and is not empty; pass --overwrite to replace it, or choose a new one"
            )
        if not is_own(out):
            raise UsageError(
                f"--overwrite: {out} is not {what}; kdcli only replaces its own outputs: choose another --out"
            )


def staged(out: Path) -> Path:
    """A new hidden directory beside ``out`` to build in (same filesystem: the rename into place is atomic)."""
    parent = out.resolve().parent
    make_dir(parent)
    remove_stale(out)  # hidden .partial directories of a killed conversion
    tmp = parent / f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.partial"
    tmp.mkdir()
    return tmp


def put_in_place(tmp: Path, out: Path) -> None:
    """``tmp`` (whole) becomes ``out``: renamed, or swapped for the old output (--overwrite) in one step."""
    if out.exists() and not any(out.iterdir()):
        out.rmdir()  # an empty --out: the new output takes its place
    if out.exists():
        swap_in(tmp, out)
        return
    try:
        os.replace(tmp, out)
    except OSError as e:
        raise UsageError(
            f"--out {out} could not be created ({e.strerror}): did something write to it meanwhile?"
        ) from None
    fsync_dir(out.resolve().parent)


# -- export -------------------------------------------------------------------------------------------------------
def cache_token_data(manifest: dict, cache_dir: str, data: str, tokenizer: str | None, trust_remote_code: bool):
    """The :class:`~kdcli.lm.text.TokenData` of a token cache's rows: ``data`` read with the cache's tokenizer (or
    ``tokenizer``, which must hash the same) and text settings; CacheError if it is not the data the cache was built
    from (rows reordered, edited, other settings), as train-student checks it."""
    if not is_token(manifest):
        raise UsageError("--data adds token ids to an export of a token (LM) cache; this is a classification cache")
    from kdcli.lm.text import load_text
    from kdcli.tasks.lm import settings_from_manifest, tokenizer_for_cache

    tok, _ = tokenizer_for_cache(manifest, tokenizer, cache_dir, trust_remote_code)
    td = load_text(
        data, tok, settings_from_manifest(manifest), vocab_size=int(manifest["num_classes"]), target_masks=True
    )
    check_matches_data(manifest, td.identity(), cache_dir)
    return td


def open_reader(cache: str):
    """The reader of a complete cache, local or remote (:func:`kdcli.cache.storage.locate`)."""
    m = read_manifest(cache)
    if is_token(m):
        from kdcli.cache.tokens import TokenCacheReader

        return TokenCacheReader(cache)
    from kdcli.cache.reader import CacheReader

    return CacheReader(cache)


def export_cache(req: ExportRequest) -> ExportSummary:
    """Write the complete cache ``req.cache`` as ``req.format`` Parquet files into the directory ``req.out``."""
    t0 = time.perf_counter()
    fmt = get_format(req.format, "export")
    check_options(fmt, req.options, "export")
    out = Path(req.out)
    check_target(out, req.overwrite, is_export_dir, "a directory kdcli cache export wrote (part-*.parquet only)")
    reader = open_reader(req.cache)
    try:
        m = reader.manifest
        lost = fmt.plan_export(m, req.options)  # refusals: before anything is read or written
        extra = m.get("extra_row_keys") or []  # cache-teacher --generate: each row's answer, kept for resuming
        if extra:
            lost.append(f"the per-row answers ({', '.join(extra)}): the cache's answers.jsonl holds them (its DATA)")
        data = None
        if req.data is None:
            if fmt.export_data == "required":
                raise UsageError(
                    f"export --format {fmt.name} needs --data (the DATA the cache was built from): the cache holds "
                    "the teacher's targets, the rows also need the token ids"
                )
            if req.tokenizer is not None:
                raise UsageError("--tokenizer reads --data for the export; give --data too, or drop --tokenizer")
        elif fmt.export_data == "no":
            raise UsageError(f"--data: export --format {fmt.name} carries no token ids; drop it")
        else:
            data = cache_token_data(m, req.cache, req.data, req.tokenizer, req.trust_remote_code)
        say_lost(fmt.name, lost)
        tmp = staged(out)
        try:
            with log.Progress(int(m["num_rows"]), f"cache export --format {fmt.name}", unit="rows") as progress:
                rows, tokens, files = fmt.export(reader, tmp, data=data, opts=req.options, progress=progress)
            size = dir_bytes(tmp)
            put_in_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        reader.close()
    return ExportSummary(
        format=fmt.name,
        cache_dir=str(req.cache),
        out=str(out),
        kind=m.get("kind") or "classification",
        mode=m["mode"],
        rows=rows,
        tokens=tokens,
        files=files,
        bytes=size,
        cache_bytes=sum(int(s["bytes"]) for s in m["shards"]),
        lost=lost,
        seconds=time.perf_counter() - t0,
    )


# -- import -------------------------------------------------------------------------------------------------------
def tokenizer_info(spec: str, trust_remote_code: bool) -> TokenizerInfo:
    from kdcli.lm.text import load_tokenizer, tokenizer_identity

    tok = load_tokenizer(spec, trust_remote_code)
    return TokenizerInfo(spec=spec, identity=tokenizer_identity(tok, spec), size=len(tok))


def import_cache(req: ImportRequest) -> ImportSummary:
    """Turn ``req.source`` (in ``req.format``) into a complete kdcli cache at ``req.out``, checked as ``cache
    verify`` checks one before it is put in place."""
    t0 = time.perf_counter()
    fmt = get_format(req.format, "import")
    check_options(fmt, req.options, "import")
    src, out = Path(req.source), Path(req.out)
    if not src.exists():
        raise UsageError(f"{req.source} does not exist; give the {fmt.name} file or directory to import")
    tokenizer = None
    if fmt.import_tokenizer:
        if req.tokenizer is None:
            raise UsageError(
                f"the {fmt.name} source records no tokenizer: pass --tokenizer (the one that made its token ids, e.g. "
                "the teacher's directory or .gguf file)"
            )
        tokenizer = tokenizer_info(req.tokenizer, req.trust_remote_code)
    elif req.tokenizer is not None:
        raise UsageError(f"--tokenizer: a kdcli {fmt.name} export records its cache's tokenizer; drop the option")
    check_target(out, req.overwrite, is_cache_dir, "a kdcli cache (no manifest.json)")
    if src.resolve() == out.resolve() or out.resolve() in src.resolve().parents:
        raise UsageError(f"--out {out} is the source itself; import into a new directory")
    rows = fmt.source_rows(src, req.options)  # a source that is not this format: refused before any work
    tmp = staged(out)
    try:
        with log.Progress(rows * fmt.import_passes, f"cache import --format {fmt.name}", unit="rows") as progress:
            result = fmt.import_into(src, tmp, final=out, tokenizer=tokenizer, opts=req.options, progress=progress)
        check_imported(tmp, result.manifest)
        size = dir_bytes(tmp)
        put_in_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    m = result.manifest
    return ImportSummary(
        format=fmt.name,
        source=str(src),
        out=str(out),
        kind=m.get("kind") or "classification",
        mode=m["mode"],
        rows=int(m["num_rows"]),
        tokens=result.tokens,
        shards=len(m["shards"]),
        bytes=size,
        data=str(out / TOKENS_FILE) if result.tokens_file else None,
        unrecorded=result.unrecorded,
        approximate=result.approximate,
        notes=result.notes,
        seconds=time.perf_counter() - t0,
    )


def check_imported(work: Path, manifest: dict) -> None:
    """The new cache passes ``cache verify`` (every shard re-hashed, every value checked, the data fingerprint
    reproduced) before it is put in place: a converter bug is a CacheError here, never a cache that fails later."""
    from kdcli.cache.verify import verify_cache

    report = verify_cache(work)
    if not report.ok:
        raise CacheError(f"the imported cache fails verification: {report.problems[0]}")
    on_disk = json.loads((work / MANIFEST).read_text())
    if on_disk.get("complete") is not True or on_disk.get("num_rows") != manifest.get("num_rows"):
        raise CacheError("the imported cache's manifest was not completed")
