"""cache_teacher(cfg): data -> teacher (once, eval + inference_mode) -> reduce -> shard writer -> manifest.

This is the one cache pass for every task. The task (:mod:`kdcli.tasks`) loads the data and the teacher, plans the
manifest and turns a range of rows into reduced tensors; everything else is here: the cache directory and its
lock, resuming from whole shards, teacher batches that never cross a shard boundary, one batch of host-copy
lookahead, the split of the remaining shards over torchrun ranks, and the merged manifest.
"""

from __future__ import annotations

import fnmatch
import shutil
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from kdcli.cache.manifest import (
    MANIFEST,
    TEACHER_VOCAB,
    contiguous_runs,
    merge_rank_manifests,
    missing_shards,
    plan_differences,
    rank_manifest_name,
    read_manifest,
    shard_name,
    split_contiguous,
    write_manifest,
)
from kdcli.cache.reader import mean_unique_ids
from kdcli.cache.reduce import HostCopy
from kdcli.cache.storage import Location, StoreLock, locate
from kdcli.cache.writer import ShardWriter, compression_label
from kdcli.config import CacheConfig, check_task_options
from kdcli.config.generation import check_generation_options
from kdcli.infra import crashpoints, distributed, log
from kdcli.infra.atomic import remove_partials
from kdcli.infra.errors import CacheError, UsageError
from kdcli.infra.lock import LOCK, DirLock
from kdcli.infra.outdir import check_out, empty_dir, make_dir, remove_stale, staging_dir, swap_in
from kdcli.infra.precision import resolve_device, teacher_autocast
from kdcli.lm.answers import ANSWER_FILES
from kdcli.models.plugins import check_model_spec
from kdcli.tasks import CacheJob, CacheSummary, pick_task

__all__ = ["CacheSummary", "batch_ranges", "cache_teacher"]


def _is_cache_debris(name: str) -> bool:
    """Files a cache directory holds (or an interrupted cache-teacher leaves): shards, manifests, partials, the lock."""
    return (
        name.startswith("shard-")
        or name.endswith(".partial")
        or name in (MANIFEST, TEACHER_VOCAB)
        or name.startswith("manifest.rank-")
        or name == LOCK
        or name in ANSWER_FILES
    )


def _resume_state(work: Path | Location, plan: dict) -> tuple[dict, int] | None:
    """(manifest to continue, whole shards kept; -1: complete and up to date) when ``work`` holds this very cache
    (same teacher, data and settings), else None. Every whole shard is kept, not only the leading ones (a torchrun
    rank may have stopped before another)."""
    files = locate(work).listing(missing_ok=True)  # name -> bytes (one LIST request in object storage)
    if MANIFEST not in files:
        return None
    try:
        old = read_manifest(work, require_complete=False)
    except CacheError:
        return None
    if plan_differences(old, plan):
        return None
    kept = _whole_shards(files, old)
    if old["complete"] and len(kept) == len(old["shards"]):
        return old, -1
    old["shards"], old["complete"] = kept, False
    write_manifest(work, old)  # a damaged complete cache being repaired is incomplete until it is done
    return old, len(kept)


def _prepare_dir(out: Path, plan: dict, overwrite: bool, stack: ExitStack) -> tuple[Path, dict, int]:
    """Rank 0, ``out`` locked: where this run writes, the manifest it continues and how many whole shards it keeps
    (-1: up to date). A different cache is never cleared first: with ``--overwrite`` the new one is built in a
    staging directory beside it and swapped in when complete (:mod:`kdcli.infra.outdir`); re-running the same
    ``--overwrite`` command after an interruption resumes that staging directory."""
    names = [p.name for p in out.iterdir() if p.name != LOCK]
    diffs: list[str] = []
    if MANIFEST in names:
        try:
            old = read_manifest(out, require_complete=False)
            diffs = plan_differences(old, plan)
        except CacheError:
            if not overwrite:
                raise
            old, diffs = None, ["unreadable manifest"]
        if diffs and not overwrite:
            raise CacheError(
                f"{out} holds a different cache ({'; '.join(diffs[:3])}); pass --overwrite to "
                "replace it, or choose another --out"
            )
        if not diffs and old.get("compression") != plan.get("compression"):
            # Not part of the cache's identity: the same cache stays reusable and resumable, stored as it was
            # (the writer follows the manifest it extends); --overwrite re-writes it with the requested setting.
            was, asked = compression_label(old.get("compression")), compression_label(plan.get("compression"))
            if overwrite:
                diffs = [f"compression {was} -> {asked}"]
                log.info(f"--overwrite: re-writing {out} with compression {asked} (it is stored with {was})")
            else:
                log.info(
                    f"note: {out} is stored with compression {was}; keeping it for this cache (requested "
                    f"{asked}; pass --overwrite to re-write it)"
                )
        if not diffs:
            return (out, *_resume_state(out, plan))
    elif names:
        if not overwrite or not all(_is_cache_debris(n) for n in names):
            raise UsageError(
                f"--out {out} is not empty and holds no kdcli cache ({sorted(names)[0]}, ...); "
                "choose an empty or new directory"
            )
        diffs = ["leftovers of an interrupted cache without a manifest"]
    if not diffs:  # an empty directory
        write_manifest(out, plan)
        return out, plan, 0
    stage = staging_dir(out)  # --overwrite: build beside the old cache, swap in when complete
    make_dir(stage)
    stack.enter_context(DirLock(stage))
    remove_partials(stage)
    merge_rank_manifests(stage)
    state = _resume_state(stage, plan)
    if state is not None:
        log.info(f"--overwrite: continuing the replacement of {out} in {stage}")
        return (stage, *state)
    empty_dir(stage, lambda d: all(_is_cache_debris(p.name) for p in d.iterdir()), "--overwrite")
    log.info(f"--overwrite: writing the new cache in {stage}; it replaces {out} ({'; '.join(diffs[:2])}) when complete")
    # From its first instant the directory says which cache it is building (complete: false, no shards), so a
    # crash before the first manifest update still resumes instead of finding "a directory with stray shards".
    write_manifest(stage, plan)
    return stage, plan, 0


def _whole_shards(files: dict[str, int], manifest: dict) -> list[dict]:
    """The listed shards present (``files``: name -> bytes) at their own index with the size the manifest recorded
    (gaps allowed)."""
    size = int(manifest["shard_size"])
    return [
        s
        for s in manifest["shards"]
        if s["row_start"] % size == 0
        and s["name"] == shard_name(s["row_start"] // size)
        and files.get(s["name"]) == s["bytes"]
    ]


def _prepare_remote(out: Location, plan: dict, overwrite: bool) -> tuple[Location, dict, int]:
    """:func:`_prepare_dir` for an object-store prefix (``out`` locked): resume this very cache, start in an empty
    prefix, refuse anything else. A different cache is never deleted: ``--overwrite`` builds its replacement beside a
    local cache and swaps it in with one rename, which an object store cannot do (a prefix is many objects)."""
    names = sorted(n for n in out.listing(missing_ok=True) if n != LOCK)
    if MANIFEST in names:
        old = read_manifest(out, require_complete=False)
        diffs = plan_differences(old, plan)
        if diffs:
            raise CacheError(
                f"{out} holds a different cache ({'; '.join(diffs[:3])}); "
                + ("--overwrite cannot replace a cache in object storage in one step: " if overwrite else "")
                + "delete its objects first (e.g. `aws s3 rm --recursive URL`) or choose another --out"
            )
        if old.get("compression") != plan.get("compression"):
            was, asked = compression_label(old.get("compression")), compression_label(plan.get("compression"))
            log.info(f"note: {out} is stored with compression {was}; keeping it for this cache (requested {asked})")
        return (out, *_resume_state(out, plan))
    if names:
        raise UsageError(
            f"--out {out} is not empty and holds no kdcli cache ({names[0]}, ...); choose an empty or new prefix"
        )
    write_manifest(out, plan)  # from its first instant the prefix says which cache it is building
    return out, plan, 0


def cache_teacher(cfg: CacheConfig) -> CacheSummary:
    t0 = time.perf_counter()
    task = pick_task(cfg.data, generate=cfg.generate)
    check_task_options(cfg, task.name, cfg.data)  # an option this task would ignore: refused
    check_generation_options(cfg)  # and a generation option without --generate
    check_model_spec(cfg.teacher, "--teacher", task.builtin_models)
    job = task.cache_job(cfg)  # options checked, data and teacher loaded, manifest planned
    if cfg.teacher_device_map != "none" and not job.placed:
        raise UsageError(
            f"--teacher-device-map {cfg.teacher_device_map} spreads a Hugging Face language-model "
            "teacher over the devices; this teacher is not one: drop the flag"
        )
    if job.placed and distributed.env_world()[1] > 1:
        raise UsageError(
            "--teacher-device-map spreads one teacher over every GPU of a single process; run "
            "cache-teacher without torchrun (or drop the flag to split the rows over processes)"
        )
    num_rows, shard_size = job.num_rows, job.shard_size
    loc = locate(cfg.out)  # a local directory, or an object-store prefix (s3://bucket/prefix): shards put whole
    out = loc.local
    if out is not None:
        check_out(out)
        remove_stale(out)
    # Under torchrun every rank runs this function: rank 0 holds the directory lock and owns manifest.json; the
    # shards still to compute are split into one contiguous run per rank, each rank publishes its own shards
    # (global names, one writer per shard) and records them in its own manifest.rank-N.json; rank 0 merges.
    ctx = distributed.init(resolve_device(cfg.device))
    device = ctx.device
    with ExitStack() as stack:
        main: dict = {}

        def open_cache():  # rank 0 only
            if loc.remote:
                stack.enter_context(StoreLock(loc))  # one writer: a conditional-create .lock object
                merge_rank_manifests(loc)
                work, manifest, kept = _prepare_remote(loc, job.plan, cfg.overwrite)
                if kept >= 0:  # up to date: the files are there (the manifest names their checksums); write nothing
                    put_files(locate(work), job)
                return str(work), manifest, kept
            main["created"] = make_dir(out)
            main["work"], manifest, kept = _open_cache(stack, out, job.plan, cfg.overwrite)
            if kept >= 0:
                put_files(locate(main["work"]), job)
            return str(main["work"]), manifest, kept

        work, manifest, kept = ctx.on_main(open_cache)
        work = locate(loc if loc.remote else Path(work))
        if kept < 0:
            size = f"{num_rows:,} rows" + (f", {job.units(0, num_rows):,} {job.unit}" if job.unit != "rows" else "")
            log.info(f"cache {loc} is complete and up to date ({size}, same teacher, data and settings); nothing to do")
            return _summary(cfg, job, manifest, "up-to-date", 0, num_rows, 0, t0, device)
        todo = missing_shards(manifest)
        todo_rows = [(i * shard_size, min((i + 1) * shard_size, num_rows)) for i in todo]
        first_row = num_rows - sum(b - a for a, b in todo_rows)  # rows already cached
        if first_row:
            log.info(f"resuming {work}: {kept} whole shard(s) found, skipping {first_row} of {num_rows} rows")
        log.info(
            job.describe()
            + f" on {device}"
            + (f"; {ctx.world} processes, {len(todo)} shard(s) split into contiguous runs" if ctx.enabled else "")
        )
        if not job.placed:
            job.model.to(device)
        job.model.eval()
        mine = split_contiguous(todo, ctx.rank, ctx.world)

        def compute() -> None:
            own = {**manifest, "shards": []} if ctx.enabled else manifest
            name = rank_manifest_name(ctx.rank) if ctx.enabled else MANIFEST
            writer = ShardWriter(
                work,
                own,
                shard_size=shard_size,
                first_shard=mine[0] if mine else 0,
                token_keys=job.token_keys,
                threaded=True,
                manifest_name=name,
            )
            try:
                for a, b in contiguous_runs(mine):
                    writer.seek(a)
                    run_teacher(job, cfg, device, a * shard_size, min(b * shard_size, num_rows), writer)
                writer.close()
            except BaseException:
                writer.abort()
                raise

        def finish() -> dict:  # rank 0: the merged manifest, complete; a replacement swapped into place
            done = _finish_cache(work, job)
            if not work.remote and work.local != out:
                swap_in(work.local, out)  # the complete new cache takes the old one's place in one step
            return done

        try:
            ctx.agree(compute)  # every rank's shards are published (or every rank raises the first error)
            manifest = ctx.on_main(finish)
        except BaseException:
            if ctx.is_main and not fnmatch.filter(work.listing(missing_ok=True), "shard-*.h5"):  # nothing to resume
                if work.remote:  # from: leave no empty cache
                    work.remove(MANIFEST)
                elif work.local != out:
                    shutil.rmtree(work.local, ignore_errors=True)
                elif main.get("created"):
                    stack.close()
                    shutil.rmtree(out, ignore_errors=True)
            raise
    status = "resumed" if first_row else "written"
    computed_units = sum(job.units(a, b) for a, b in todo_rows)
    return _summary(cfg, job, manifest, status, num_rows - first_row, first_row, computed_units, t0, device)


def put_files(work: Location, job: CacheJob) -> None:
    """The files a cache holds beside its shards (named and checksummed in the manifest), each written whole."""
    for name, body in job.files().items():
        work.put_bytes(name, body)


def _open_cache(stack: ExitStack, out: Path, plan: dict, overwrite: bool) -> tuple[Path, dict, int]:
    """Rank 0 (or the only process): lock ``out``, clean up, fold in shards an interrupted torchrun recorded."""
    stack.enter_context(DirLock(out))
    removed = remove_partials(out)
    if removed:
        log.info(f"removed {len(removed)} partial file(s) left by an interrupted run")
    try:
        merged = merge_rank_manifests(out)
    except CacheError:  # an unreadable manifest.json: _prepare_dir refuses or (--overwrite) builds beside it
        merged = 0
    if merged:
        log.info(f"collected {merged} shard(s) recorded by the ranks of an interrupted torchrun run")
    return _prepare_dir(out, plan, overwrite, stack)


def _finish_cache(out: Path | Location, job: CacheJob) -> dict:
    """Rank 0, after every rank published its shards: one manifest listing them all, what the job writes beside
    them (:meth:`CacheJob.complete`), ``complete: true``."""
    merge_rank_manifests(out)
    manifest = read_manifest(out, require_complete=False)
    missing = missing_shards(manifest)
    if missing:
        raise CacheError(
            f"cache {out}: shard(s) {missing[:5]} missing after every process finished; re-run the "
            "same command to compute them"
        )
    job.complete(out, manifest)
    manifest["complete"] = True
    write_manifest(out, manifest)
    return manifest


def batch_ranges(first_row: int, stop_row: int, batch_size: int, shard_size: int):
    """Teacher batches ``[start, stop)`` over rows ``[first_row, stop_row)``: at most ``batch_size`` rows and never
    across a shard boundary. Every run (fresh, resumed, any rank of a torchrun) starts at a shard boundary, so a
    row is always computed in the same batch; sample mode seeds its draws per batch, so caches are identical."""
    start = first_row
    while start < stop_row:
        stop = min(start + batch_size, (start // shard_size + 1) * shard_size, stop_row)
        yield start, stop
        start = stop


def run_teacher(
    job: CacheJob, cfg: CacheConfig, device: torch.device, first_row: int, stop_row: int, writer: ShardWriter
) -> None:
    """Rows ``[first_row, stop_row)``: forward, reduce on the device, copy only the reduced tensors back.

    One batch of lookahead: batch i's copy to the host is queued, then batch i-1 is collected and handed to the
    writer thread, so on CUDA the host never stalls the device (no sync inside a batch: the NaN/inf check travels
    back with the reduced tensors). On the CPU the same loop runs with copies that are no-ops."""
    pending = None  # the previous batch: (host row arrays, HostCopy of its reduced tensors, units)
    with (
        torch.inference_mode(),
        teacher_autocast(cfg.dtype, device),
        log.Progress(job.units(first_row, stop_row), "cache-teacher", unit=job.unit) as progress,
    ):
        for start, stop in batch_ranges(first_row, stop_row, job.batch_size, job.shard_size):
            gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + start) if job.sampled else None
            host, reduced = job.forward(start, stop, device, gen)
            copy = HostCopy(reduced)
            if pending is not None:
                _publish(job, *pending, writer, progress)
            pending = (host, copy, job.units(start, stop))
        if pending is not None:
            _publish(job, *pending, writer, progress)


def _publish(job: CacheJob, host: dict, copy: HostCopy, units: int, writer: ShardWriter, progress) -> None:
    arrays = copy.wait()
    bad = np.flatnonzero(arrays.pop("nonfinite"))
    if len(bad):
        raise UsageError(
            f"{job.nonfinite_message(int(host['row_index'][bad[0]]))}; nothing was written for that "
            "shard: check the teacher weights and --dtype"
        )
    writer.add({**host, **job.storage(arrays)})
    crashpoints.reached("teacher-batch")  # test-only fault injection (kdcli/infra/crashpoints.py)
    progress.advance(units)


def _summary(
    cfg: CacheConfig,
    job: CacheJob,
    manifest: dict,
    status: str,
    computed: int,
    skipped: int,
    computed_units: int,
    t0: float,
    device,
) -> CacheSummary:
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    secs = time.perf_counter() - t0
    rows = manifest["num_rows"]
    base = CacheSummary(
        cache_dir=str(cfg.out),
        status=status,
        mode=manifest["mode"],
        num_rows=rows,
        rows_computed=computed,
        rows_skipped=skipped,
        num_shards=len(manifest["shards"]),
        bytes=total_bytes,
        bytes_per_row=total_bytes / max(rows, 1),
        seconds=secs,
        rows_per_second=computed / max(secs, 1e-9),
        teacher=cfg.teacher,
        teacher_parameters=job.info.num_parameters,
        device=str(device),
        compression=compression_label(manifest.get("compression")),
        unique_ids=mean_unique_ids(cfg.out, manifest),
    )
    return job.summary(base, manifest, computed_units)
