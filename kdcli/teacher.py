"""cache_teacher(cfg): data -> teacher (once, eval + inference_mode) -> reduce -> shard writer -> manifest.

Row ``r`` of a cache with ``views`` views over ``n`` samples is the pair (sample ``r % n``, view ``r // n``).
View 0 is the plain input; view ``v >= 1`` is ``augment.apply(x, params)`` with params drawn once from the seed
and stored in the shard (``aug_params``), so the student can train on exactly what the teacher saw.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcli import crashpoints, distributed, log
from kdcli.augment import parse_augment
from kdcli.cache.atomic import remove_partials
from kdcli.cache.lock import DirLock
from kdcli.cache.manifest import (MANIFEST, RANK_MANIFEST_GLOB, contiguous_runs, merge_rank_manifests,
                                  missing_shards, new_manifest, plan_differences, rank_manifest_name, read_manifest,
                                  shard_name, split_contiguous, write_manifest)
from kdcli.cache.reduce import HostCopy, numpy_id_dtype, reduce_logits, storage_arrays
from kdcli.cache.writer import ShardWriter, compression_label, resolve_compression
from kdcli.config import CacheConfig
from kdcli.data import LabelledData, load_data
from kdcli.errors import CacheError, UsageError
from kdcli.models import MODEL_JSON, build_model, is_run_dir, resolve_device

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class CacheSummary:
    cache_dir: str
    status: str  # "written", "resumed" or "up-to-date"
    mode: str
    num_rows: int
    rows_computed: int
    rows_skipped: int
    num_shards: int
    bytes: int
    bytes_per_row: float
    seconds: float
    rows_per_second: float
    teacher: str
    teacher_parameters: int
    device: str
    compression: str = "none"  # how the shards are stored (gzip-4+shuffle, lzf+shuffle, none)


def teacher_num_classes(spec: str) -> int | None:
    """A run-dir teacher knows its width; other specs take it from the data."""
    if is_run_dir(spec):
        try:
            return int(json.loads((Path(spec) / MODEL_JSON).read_text())["num_classes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None


def augment_params(n: int, views: int, augment, seed: int) -> np.ndarray | None:
    """(n * views, P) float32 parameters, zeros for view 0; None when there are no augmented views."""
    if views == 1:
        return None
    g = torch.Generator().manual_seed(seed)
    params = torch.zeros((n * views, len(augment.param_names)), dtype=torch.float32)
    params[n:] = augment.sample(n * (views - 1), g)
    return params.numpy()


def _layout(cfg: CacheConfig, mode: str, num_classes: int, augment) -> dict:
    return {"kind": "classification", "mode": mode, "num_classes": num_classes,
            "top_k": cfg.top_k if mode == "topk" else None, "samples": cfg.samples if mode == "sample" else None,
            "logprob_dtype": "float16", "id_dtype": numpy_id_dtype(num_classes).name if mode != "full" else None,
            "views": cfg.views, "augment": cfg.augment if cfg.views > 1 else None,
            "aug_param_names": list(augment.param_names) if (augment and cfg.views > 1) else [],
            "shard_size": cfg.shard_size,
            "compression": resolve_compression(cfg.compression, token=False, mode=mode)}


def _prepare_dir(out: Path, plan: dict, overwrite: bool, *, holes: bool = False) -> tuple[dict, int]:
    """Decide what to do with ``out``: returns (manifest to continue, first shard to compute; -1: up to date).
    ``holes=True`` keeps every whole shard, not only the leading ones (a torchrun rank may have stopped before
    another); the second value is then the number of whole shards kept."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).exists():
        try:
            old = read_manifest(out, require_complete=False)
            diffs = plan_differences(old, plan)
        except CacheError:
            if not overwrite:
                raise
            old, diffs = None, ["unreadable manifest"]
        if diffs and not overwrite:
            raise CacheError(f"{out} holds a different cache ({'; '.join(diffs[:3])}); pass --overwrite to "
                             "replace it, or choose another --out")
        if not diffs and old.get("compression") != plan.get("compression"):
            # Not part of the cache's identity: the same cache stays reusable and resumable, stored as it was
            # (the writer follows the manifest it extends); --overwrite re-writes it with the requested setting.
            was, asked = compression_label(old.get("compression")), compression_label(plan.get("compression"))
            if overwrite:
                diffs = [f"compression {was} -> {asked}"]
                log.info(f"--overwrite: re-writing {out} with compression {asked} (it is stored with {was})")
            else:
                log.info(f"note: {out} is stored with compression {was}; keeping it for this cache (requested "
                         f"{asked}; pass --overwrite to re-write it)")
        if not diffs:
            kept = _whole_shards(out, old) if holes else old["shards"][:_whole_prefix(out, old)]
            if old["complete"] and len(kept) == len(old["shards"]):
                return old, -1
            old["shards"], old["complete"] = kept, False
            write_manifest(out, old)  # a damaged complete cache being repaired is incomplete until it is done
            return old, len(kept)
        _clear_cache_files(out)
    elif any(p.name != ".lock" for p in out.iterdir()):
        stray = [p.name for p in out.iterdir() if p.name != ".lock"]
        if not overwrite or any(not (n.startswith("shard-") or n.endswith(".partial")) for n in stray):
            raise UsageError(f"--out {out} is not empty and holds no kdcli cache ({stray[0]}, ...); "
                             "choose an empty or new directory")
        _clear_cache_files(out)
    # From its first instant the directory says which cache it is building (complete: false, no shards), so a
    # crash before the first manifest update still resumes instead of finding "a directory with stray shards".
    write_manifest(out, plan)
    return plan, 0


def _whole_prefix(out: Path, manifest: dict) -> int:
    """How many shards from the first are present with the size the manifest recorded."""
    n = 0
    for i, s in enumerate(manifest["shards"]):
        p = out / s["name"]
        if s["name"] != shard_name(i) or not p.is_file() or p.stat().st_size != s["bytes"]:
            break
        n += 1
    return n


def _whole_shards(out: Path, manifest: dict) -> list[dict]:
    """The listed shards present at their own index with the size the manifest recorded (gaps allowed)."""
    size = int(manifest["shard_size"])
    return [s for s in manifest["shards"]
            if s["row_start"] % size == 0 and s["name"] == shard_name(s["row_start"] // size)
            and (out / s["name"]).is_file() and (out / s["name"]).stat().st_size == s["bytes"]]


def _clear_cache_files(out: Path) -> None:
    for p in list(out.glob("shard-*.h5")) + list(out.glob(RANK_MANIFEST_GLOB)) + [out / MANIFEST]:
        p.unlink(missing_ok=True)
    remove_partials(out)


def cache_teacher(cfg: CacheConfig) -> CacheSummary:
    from kdcli.lm import is_text_spec

    if is_text_spec(cfg.data):  # JSONL text: token-level cache of a language model
        distributed.refuse("cache-teacher with JSONL (language-model) data")
        from kdcli.lm.teacher import cache_teacher_lm

        return cache_teacher_lm(cfg)
    t0 = time.perf_counter()
    mode = cfg.mode or ("topk" if cfg.top_k else "full")
    if mode == "topk" and not cfg.top_k:
        raise UsageError("--mode topk needs --top-k K")
    augment = parse_augment(cfg.augment)
    if cfg.views > 1 and augment is None:
        raise UsageError("--views > 1 needs --augment (e.g. shift:2): views would be identical")
    if not is_run_dir(cfg.teacher) and not cfg.teacher_weights:
        raise UsageError(f"teacher {cfg.teacher!r} has no weights: pass --teacher-weights PATH, or a run directory "
                         "made by `kdcli train-student`")
    data = load_data(cfg.data, num_classes=teacher_num_classes(cfg.teacher))
    device = resolve_device(cfg.device)
    model, info = build_model(cfg.teacher, cfg.teacher_args, num_classes=data.num_classes,
                              input_shape=data.input_shape, weights=cfg.teacher_weights)
    if mode == "topk" and cfg.top_k >= data.num_classes:
        raise UsageError(f"--top-k {cfg.top_k} keeps every one of the {data.num_classes} classes; use --mode full")
    num_rows = data.n * cfg.views
    settings = {"mode": mode, "top_k": cfg.top_k if mode == "topk" else None,
                "samples": cfg.samples if mode == "sample" else None, "views": cfg.views,
                "augment": cfg.augment if cfg.views > 1 else None,
                "seed": cfg.seed if (cfg.views > 1 or mode == "sample") else None,
                "shard_size": cfg.shard_size, "dtype": cfg.dtype}
    plan = new_manifest(teacher=info.identity(), data=data.identity(), settings=settings,
                        layout=_layout(cfg, mode, data.num_classes, augment), num_rows=num_rows)
    out = Path(cfg.out)
    # Under torchrun every rank runs this function: rank 0 holds the directory lock and owns manifest.json; the
    # shards still to compute are split into one contiguous run per rank, each rank publishes its own shards
    # (global names, one writer per shard) and records them in its own manifest.rank-N.json; rank 0 merges.
    ctx = distributed.init(device)
    device = ctx.device
    with ExitStack() as stack:
        manifest, kept = ctx.on_main(lambda: _open_cache(stack, out, plan, cfg.overwrite))
        if kept < 0:
            log.info(f"cache {out} is complete and up to date ({num_rows} rows, same teacher, data and settings); "
                     "nothing to do")
            return _summary(cfg, manifest, "up-to-date", 0, num_rows, t0, info, device)
        todo = missing_shards(manifest)
        first_row = num_rows - sum(_shard_rows(i, cfg.shard_size, num_rows) for i in todo)  # rows already cached
        if first_row:
            log.info(f"resuming {out}: {kept} whole shard(s) found, skipping {first_row} of {num_rows} rows")
        log.info(f"caching teacher {cfg.teacher} ({info.num_parameters:,} parameters) on {device}: "
                 f"{num_rows} rows ({data.n} samples x {cfg.views} view(s)), mode {mode}"
                 + (f", k={cfg.top_k}" if mode == "topk" else "") + (f", {cfg.samples} draws" if mode == "sample"
                                                                     else "")
                 + (f"; {ctx.world} processes, {len(todo)} shard(s) split into contiguous runs" if ctx.enabled
                    else ""))
        model.to(device).eval()
        params = augment_params(data.n, cfg.views, augment, cfg.seed)
        mine = split_contiguous(todo, ctx.rank, ctx.world)

        def compute() -> None:
            own = {**manifest, "shards": []} if ctx.enabled else manifest
            name = rank_manifest_name(ctx.rank) if ctx.enabled else MANIFEST
            writer = ShardWriter(out, own, shard_size=cfg.shard_size, first_shard=mine[0] if mine else 0,
                                 threaded=True, manifest_name=name)
            try:
                for a, b in contiguous_runs(mine):
                    writer.seek(a)
                    _run_teacher(cfg, model, data, device, mode, augment, params, a * cfg.shard_size,
                                 min(b * cfg.shard_size, num_rows), writer)
                writer.close()
            except BaseException:
                writer.abort()
                raise

        ctx.agree(compute)  # every rank's shards are published (or every rank raises the first error)
        manifest = ctx.on_main(lambda: _finish_cache(out))
    status = "resumed" if first_row else "written"
    return _summary(cfg, manifest, status, num_rows - first_row, first_row, t0, info, device)


def _open_cache(stack: ExitStack, out: Path, plan: dict, overwrite: bool) -> tuple[dict, int]:
    """Rank 0 (or the only process): lock ``out``, clean up, fold in shards an interrupted torchrun recorded."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    stack.enter_context(DirLock(out))
    removed = remove_partials(out)
    if removed:
        log.info(f"removed {len(removed)} partial file(s) left by an interrupted run")
    try:
        merged = merge_rank_manifests(out)
    except CacheError:  # an unreadable manifest.json: _prepare_dir refuses or (--overwrite) clears it
        merged = 0
    if merged:
        log.info(f"collected {merged} shard(s) recorded by the ranks of an interrupted torchrun run")
    return _prepare_dir(out, plan, overwrite, holes=True)


def _finish_cache(out: Path) -> dict:
    """Rank 0, after every rank published its shards: one manifest listing them all, ``complete: true``."""
    merge_rank_manifests(out)
    manifest = read_manifest(out, require_complete=False)
    missing = missing_shards(manifest)
    if missing:
        raise CacheError(f"cache {out}: shard(s) {missing[:5]} missing after every process finished; re-run the "
                         "same command to compute them")
    manifest["complete"] = True
    write_manifest(out, manifest)
    return manifest


def _shard_rows(i: int, shard_size: int, num_rows: int) -> int:
    return max(0, min((i + 1) * shard_size, num_rows) - i * shard_size)


def batch_ranges(first_row: int, stop_row: int, batch_size: int, shard_size: int):
    """Teacher batches ``[start, stop)`` over rows ``[first_row, stop_row)``: at most ``batch_size`` rows and never
    across a shard boundary. Every run (fresh, resumed, any rank of a torchrun) starts at a shard boundary, so a
    row is always computed in the same batch; sample mode seeds its draws per batch, so caches are identical."""
    start = first_row
    while start < stop_row:
        stop = min(start + batch_size, (start // shard_size + 1) * shard_size, stop_row)
        yield start, stop
        start = stop


def _run_teacher(cfg: CacheConfig, model, data: LabelledData, device: torch.device, mode: str, augment,
                 params: np.ndarray | None, first_row: int, num_rows: int, writer: ShardWriter) -> None:
    """Rows ``[first_row, num_rows)``: forward, reduce on the device, copy only the reduced tensors back.

    One batch of lookahead: batch i's copy to the host is queued, then batch i-1 is collected and handed to the
    writer thread, so on CUDA the host never stalls the device (no sync inside a batch: the NaN/inf check travels
    back with the reduced tensors). On the CPU the same loop runs with copies that are no-ops."""
    n = data.n
    amp = torch.autocast(device.type, dtype=AMP[cfg.dtype]) if cfg.dtype in AMP else nullcontext()
    pending = None  # the previous batch: (row arrays, HostCopy of its reduced tensors, aug params)
    with torch.inference_mode(), amp, log.Progress(num_rows - first_row, "cache-teacher") as progress:
        for start, stop in batch_ranges(first_row, num_rows, cfg.batch_size, cfg.shard_size):
            rows = np.arange(start, stop, dtype=np.int64)
            samples = rows % n
            s0 = start % n  # rows of one view are consecutive samples: a view of x, not a gathered copy
            x = data.x[s0:s0 + len(rows)] if s0 + len(rows) <= n else data.x[samples]  # (b, *input_shape)
            if params is not None:
                p = torch.from_numpy(params[start:stop])
                x = augment.apply(x, p)  # view 0 rows have zero params: the identity
            if device.type == "cuda":
                x = x.pin_memory()  # a pinned source makes the copy below truly asynchronous
            x = x.to(device, non_blocking=True)
            logits = model(x)  # (b, num_classes)
            gen = None
            if mode == "sample":
                gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + start)
            reduced = reduce_logits(logits, mode, top_k=cfg.top_k, samples=cfg.samples, generator=gen)
            reduced["nonfinite"] = ~torch.isfinite(logits).all(dim=1)  # (b,) checked on the host
            batch = {"row_index": rows, "sample_index": samples.astype(np.int64), "row_hash": data.row_hash[samples]}
            extra = {"aug_params": params[start:stop]} if params is not None else {}
            copy = HostCopy(reduced)
            if pending is not None:
                _publish(*pending, writer, progress, data.num_classes, n)
            pending = (batch, copy, extra)
        if pending is not None:
            _publish(*pending, writer, progress, data.num_classes, n)


def _publish(batch: dict, copy: HostCopy, extra: dict, writer: ShardWriter, progress, num_classes: int,
             n: int) -> None:
    arrays = copy.wait()
    bad = np.flatnonzero(arrays.pop("nonfinite"))
    if len(bad):
        row = int(batch["row_index"][bad[0]])
        raise UsageError(f"teacher produced NaN/inf logits at row {row} (sample {row % n}); nothing "
                         "was written for that shard: check the teacher weights and --dtype")
    writer.add({**batch, **storage_arrays(arrays, num_classes), **extra})
    crashpoints.reached("teacher-batch")  # test-only fault injection (kdcli/crashpoints.py)
    progress.advance(len(batch["row_index"]))


def _summary(cfg: CacheConfig, manifest: dict, status: str, computed: int, skipped: int, t0: float, info,
             device) -> CacheSummary:
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    secs = time.perf_counter() - t0
    rows = manifest["num_rows"]
    return CacheSummary(cache_dir=str(cfg.out), status=status, mode=manifest["mode"], num_rows=rows,
                        rows_computed=computed, rows_skipped=skipped, num_shards=len(manifest["shards"]),
                        bytes=total_bytes, bytes_per_row=total_bytes / max(rows, 1), seconds=secs,
                        rows_per_second=computed / max(secs, 1e-9), teacher=cfg.teacher,
                        teacher_parameters=info.num_parameters, device=str(device),
                        compression=compression_label(manifest.get("compression")))
