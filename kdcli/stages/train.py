"""train_student(cfg): cache reader + data -> loss -> optimizer loop -> RUN_DIR.

This is the one training loop for every task: the run dir, checkpoints and resume, DDP under torchrun, device-side
metric sums, metrics.jsonl and crash points live here; the task (:mod:`kdcli.tasks`) loads the data and the
student, turns a batch into loss parts, measures held-out data and saves the student.

RUN_DIR holds:
- ``model.safetensors`` + ``model.json``: the student's weights and how to rebuild it (``kdcli eval`` needs nothing
  else); ``model_source.py`` too when the student came from a file.py plugin; ``tokenizer/`` for language models
  (a Hugging Face LM student's run dir is a Hugging Face model directory instead: kdcli.lm.hf.save_lm_run)
- ``config.yaml``: the resolved config; ``metrics.jsonl``: one JSON line per epoch; ``summary.json``
- ``checkpoint.pt`` while training (model, optimizer, scheduler, RNG states, position in the epoch), written
  atomically every ``checkpoint_every`` steps and at each epoch end; removed when the run finishes

The data order of an epoch is a pure function of (seed, epoch), so a resumed run skips exactly the batches it had
trained on and, on the CPU, ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdcli.cache.fused import FusedReader
from kdcli.cache.manifest import stored_temperatures
from kdcli.cache.reader import CacheLoader
from kdcli.config import TrainConfig, check_task_options, to_dict, write_yaml
from kdcli.infra import crashpoints, distributed, log
from kdcli.infra.atomic import atomic_write_bytes, is_disk_full, remove_partials
from kdcli.infra.errors import Diverged, UsageError
from kdcli.infra.lock import LOCK, DirLock
from kdcli.infra.outdir import check_out, empty_dir, make_dir, remove_stale, staging_dir, swap_in
from kdcli.infra.precision import precision_context, resolve_device
from kdcli.losses import describe
from kdcli.models.plugins import check_model_spec
from kdcli.models.weights import unpickling_problem
from kdcli.tasks import TrainJob, TrainSummary, pick_task
from kdcli.tasks.base import check_cache_use, open_teacher

__all__ = [
    "CHECKPOINT",
    "CONFIG",
    "METRICS",
    "SUMMARY",
    "TrainSummary",
    "apply_max_norm",
    "build_optimizer",
    "holdout",
    "label_batches",
    "precision_context",
    "schedule",
    "train_student",
]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
# Options that may change between an interrupted run and its resumption without changing the result.
RESUME_FREE = ("resume", "overwrite", "num_workers", "checkpoint_every", "device")


def config_hash(cfg: TrainConfig) -> str:
    d = {k: v for k, v in to_dict(cfg).items() if k not in RESUME_FREE}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


RUN_MARKERS = (SUMMARY, CHECKPOINT, METRICS)


def is_run_output(d: Path) -> bool:
    """A directory train-student wrote: its config.yaml and a summary, checkpoint or metrics file. A Hugging Face
    model directory, a cache or any other folder has neither: ``--overwrite`` never replaces one."""
    return (d / CONFIG).is_file() and any((d / n).is_file() for n in RUN_MARKERS)


def _load_checkpoint(run: Path, cfg: TrainConfig) -> dict:
    path = run / CHECKPOINT
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(
            f"cannot load {path} as a plain checkpoint ({unpickling_problem(e)}); it is damaged or not "
            "kdcli's: remove it or pass --overwrite"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("config_hash") != config_hash(cfg):
        raise UsageError(
            f"{run} holds a checkpoint from a run with different settings; use the same options to "
            "resume, or --overwrite to start over"
        )
    return ckpt


def _prepare_run_dir(cfg: TrainConfig, out: Path, stack: ExitStack) -> tuple[Path, dict | None]:
    """Where this run writes and the checkpoint it resumes from (None: a fresh start). Rank 0 only, ``out``
    locked. A finished run is never replaced in place: with ``--overwrite`` the new run trains in a staging
    directory beside it (:func:`kdcli.infra.outdir.staging_dir`) and is swapped in when it finishes, so a failed or
    interrupted replacement leaves the old run whole; ``--overwrite --resume`` continues such a replacement."""
    remove_partials(out)
    others = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    finished = (out / SUMMARY).exists()
    if finished and not cfg.overwrite:
        raise UsageError(f"{out} already holds a finished run; pass --overwrite to replace it or choose another --out")
    if others and (finished or cfg.overwrite) and not is_run_output(out):
        raise UsageError(
            f"--overwrite: {out} is not a kdcli run directory ({others[0]}, ...); kdcli only replaces "
            "what train-student wrote: choose another --out"
        )
    if (out / CHECKPOINT).exists() and not finished and (cfg.resume or not cfg.overwrite):
        return out, _load_checkpoint(out, cfg)
    if others and (finished or cfg.overwrite):  # build the replacement beside the old run
        stage = staging_dir(out)
        make_dir(stage)
        stack.enter_context(DirLock(stage))
        remove_partials(stage)
        if cfg.resume and (stage / CHECKPOINT).exists():
            log.info(f"--overwrite --resume: continuing the replacement of {out} in {stage}")
            return stage, _load_checkpoint(stage, cfg)
        empty_dir(
            stage,
            lambda d: is_run_output(d) or all(p.name in (LOCK, CONFIG, METRICS) for p in d.iterdir()),
            "--overwrite",
        )
        log.info(f"--overwrite: training in {stage}; it replaces {out} when the run has finished")
        return stage, None
    if cfg.resume:
        log.warn(f"--resume: no checkpoint in {out}; starting from the beginning")
    elif set(others) - {CONFIG, METRICS}:
        raise UsageError(
            f"--out {out} is not empty ({others[0]}, ...) and holds no kdcli run; choose an empty or new directory"
        )
    return out, None


def holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The validation split: (sorted held-out row ids, bool mask of rows to train on), a pure function of the seed.
    Held-out samples are never trained on (with augmented views, none of their views are)."""
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = np.sort(perm[: int(round(fraction * n))])
    keep = np.ones(n, dtype=bool)
    keep[val_idx] = False
    if not keep.any():
        raise UsageError("--val-fraction leaves nothing to train on")
    return val_idx, keep


def schedule(cfg: TrainConfig, total_steps: int):
    """The learning-rate factor per optimizer step: warmup, then constant, linear or cosine decay."""

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


def build_optimizer(
    name: str, params: list, *, lr: float, momentum: float = 0.9, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The optimizer train-student uses. Adam/AdamW take PyTorch's fused kernel (one pass over all parameters
    instead of a dozen: 5.5 -> 1.3 ms for a 3.3M-parameter step on 2 CPU cores) where every parameter allows it."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return cls(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


@torch.no_grad()
def apply_max_norm(model: nn.Module, max_norm: float) -> None:
    """Clip each unit's incoming weight vector to L2 norm <= max_norm (Linear rows, Conv filters)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w = m.weight.view(m.weight.shape[0], -1)
            norms = w.norm(dim=1, keepdim=True).clamp_min(1e-12)
            w.mul_(torch.clamp(max_norm / norms, max=1.0))


def label_batches(
    n_keep: np.ndarray, *, batch_size: int, seed: int, epoch: int, skip_batches: int = 0, rank: int = 0, world: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """Shuffled batches of sample indices for label-only training (no cache). Under DDP rank ``r`` takes the
    ``r``-th of ``world`` equal contiguous parts of the epoch's order (at most ``world - 1`` samples sit out)."""
    rng = np.random.default_rng([seed, epoch])
    order = n_keep[rng.permutation(len(n_keep))]
    part = len(order) // world
    order = order[rank * part : (rank + 1) * part] if world > 1 else order
    for i, a in enumerate(range(0, len(order), batch_size)):
        if i >= skip_batches:
            yield {"sample_index": order[a : a + batch_size]}


def train_student(cfg: TrainConfig) -> TrainSummary:
    t_start = time.perf_counter()
    alpha = cfg.alpha if cfg.alpha is not None else (0.9 if cfg.cache else 0.0)
    if alpha > 0 and not cfg.cache:
        raise UsageError(
            f"--alpha {alpha:g} weights a teacher term but no --cache was given; pass --cache CACHE_DIR or --alpha 0"
        )
    if cfg.fsdp and distributed.env_world()[1] == 1:
        raise UsageError(
            "--fsdp shards the student over torchrun processes; launch with `torchrun --standalone "
            "--nproc-per-node N -m kdcli train-student ...`, or drop --fsdp"
        )
    task = pick_task(cfg.data)
    check_task_options(cfg, task.name, cfg.data)  # an option this task would ignore: refused
    check_model_spec(cfg.student, "--student", task.builtin_models)
    reader = open_teacher(task, cfg)  # one cache, or the fused teacher of several
    if reader is not None and alpha > 0:
        check_cache_use(reader, cfg.temperature, cfg.approximate_temperature, divergence=cfg.divergence)
    job = task.train_job(cfg, alpha, reader)  # data loaded and checked against the cache; the student comes later
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    check_out(out)
    # Under torchrun every rank trains (DDP); rank 0 holds the run-dir lock and writes every output.
    ctx = distributed.init(device)
    with ExitStack() as stack:
        main: dict = {}

        def prepare() -> tuple[str, bool]:  # rank 0 only: (where the run writes, resuming?)
            remove_stale(out)
            main["created"] = make_dir(out)
            stack.enter_context(DirLock(out))
            main["work"], main["ckpt"] = _prepare_run_dir(cfg, out, stack)
            return str(main["work"]), main["ckpt"] is not None

        work, resuming = ctx.on_main(prepare)
        work = Path(work)
        ckpt = ctx.agree(
            lambda: (
                main.get("ckpt")
                if ctx.is_main or not resuming
                else torch.load(work / CHECKPOINT, map_location="cpu", weights_only=True)
            )
        )
        try:
            summary = _train(cfg, work, out, ckpt, alpha, job, t_start, ctx)
        except BaseException:
            if ctx.is_main and not (work / CHECKPOINT).exists():  # nothing to resume from: leave no half run
                if work != out:
                    shutil.rmtree(work, ignore_errors=True)
                elif main.get("created"):
                    stack.close()  # the lock first, then the directory this command made
                    shutil.rmtree(out, ignore_errors=True)
            raise
        if ctx.is_main and work != out:
            swap_in(work, out)  # the finished replacement takes the old run's place in one step
        return summary


def _train(
    cfg: TrainConfig,
    out: Path,
    final: Path,
    ckpt: dict | None,
    alpha: float,
    job: TrainJob,
    t_start: float,
    ctx: distributed.Dist,
) -> TrainSummary:
    """The loop. ``out`` is where the run's files are written (``final``, or the staging directory of an
    ``--overwrite``); ``final`` is the run dir the summary names."""
    device = ctx.device
    torch.manual_seed(cfg.seed)
    ctx.agree(job.build_student)  # a student that does not fit the data or cache: every rank raises the same
    model, info, reader = job.model, job.info, job.reader
    model.to(device)
    if cfg.fsdp:
        distributed.shard_model(model)  # rank 0's initial weights everywhere: every rank built them from the seed
    if ctx.enabled:  # each rank its own dropout draws (DDP broadcasts rank 0's initial weights to all)
        torch.manual_seed(cfg.seed + 1_000_003 * ctx.rank)
    if ctx.is_main:
        write_yaml({**to_dict(cfg), "alpha": alpha}, out / CONFIG)

    # validation split: a seeded choice of samples, never trained on (all their views are dropped)
    val_idx, keep = holdout(job.num_samples, cfg.val_fraction, cfg.seed)
    n_val = len(val_idx)
    train_samples = np.flatnonzero(keep)
    train_rows = len(train_samples) * job.views
    train_units = job.train_units(train_samples)
    # Under DDP each rank trains on an equal share (train_rows // world) per epoch: global batch = batch * world.
    steps_per_epoch = math.ceil((train_rows // ctx.world) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs

    opt = build_optimizer(
        cfg.optimizer,
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(cfg, total_steps))
    start_epoch, skip, global_step, acc = restore(
        ckpt, out, model, opt, sched, device, ctx, steps_per_epoch, sharded=cfg.fsdp
    )
    # DDP: rank 0's weights are broadcast here, gradients are averaged over ranks in every backward pass (FSDP2
    # shards in place: the model is its own wrapper)
    net = (
        torch.nn.parallel.DistributedDataParallel(
            job.forward_module(model), device_ids=[device] if device.type == "cuda" else None
        )
        if ctx.enabled and not cfg.fsdp
        else model
    )

    formula = describe(
        alpha,
        cfg.temperature,
        reader is not None,
        cfg.divergence,
        cfg.jsd_beta,
        mode=reader.mode if reader else None,
        temperatures=stored_temperatures(reader.manifest)["temperatures"] if reader else None,
        approximate=cfg.approximate_temperature,
        note=reader.loss_note if reader else "",
        approximation=reader.approximation if reader else "",
        term=job.soft_term,
    )
    log.info(formula + ("   (averaged over predicted tokens)" if job.unit == "tokens" else ""))
    if isinstance(reader, FusedReader):
        log.info(
            f"teacher: the {reader.describe()}; "
            + reader.exactness().format(unit="token" if job.unit == "tokens" else "row")
        )
    log.info(
        job.describe(train_samples, n_val) + f"; on {device}, {cfg.epochs} epochs x {steps_per_epoch} steps, "
        f"batch {cfg.batch_size}"
        + (f" per process x {ctx.world} processes = global batch {cfg.batch_size * ctx.world}" if ctx.enabled else "")
    )
    resumed_from = saved = global_step
    last: dict = {}
    loader = None
    if reader is not None and job.batches_from_cache:  # this rank's share of the cache (num_workers > 0: in workers)
        loader = CacheLoader(
            reader,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            keep=keep if n_val else None,
            rank=ctx.rank,
            world=ctx.world,
            num_workers=cfg.num_workers,
            block_rows=cfg.block_rows or None,
        )
    # loss, soft, hard (each times the batch's units), correct, since the last flush: summed on the device and
    # read back only at checkpoints and epoch ends, so a GPU never waits on the host inside an epoch
    pending = torch.zeros(4, dtype=torch.float64, device=device)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t_epoch = time.perf_counter()
        if loader is not None:
            batches = loader.epoch(epoch, skip_batches=skip)
        else:
            batches = label_batches(
                train_samples,
                batch_size=cfg.batch_size,
                seed=cfg.seed,
                epoch=epoch,
                skip_batches=skip,
                rank=ctx.rank,
                world=ctx.world,
            )
        step_in_epoch = skip
        with log.Progress(steps_per_epoch - skip, f"epoch {epoch + 1}/{cfg.epochs}", unit="steps") as progress:
            for batch in batches:
                parts, correct, units = job.step(net, batch, device, global_step)
                opt.zero_grad(set_to_none=True)
                parts.total.backward()
                opt.step()
                sched.step()
                if cfg.max_norm:
                    apply_max_norm(model, cfg.max_norm)
                acc["rows"] += len(batch["sample_index"])
                acc["units"] += units
                # (the same float64 values as stacking each part.double() * units: fewer small ops per step)
                pending[:3] += torch.stack([parts.total, parts.soft, parts.hard]).detach().double() * units
                pending[3] += correct
                step_in_epoch += 1
                global_step += 1
                progress.advance(1)
                crashpoints.reached("train-step")  # test-only fault injection (kdcli/infra/crashpoints.py)
                if global_step % FINITE_CHECK_EVERY == 0:
                    _check_finite(pending, None, epoch, global_step, saved, ctx)
                if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0 and step_in_epoch < steps_per_epoch:
                    _check_finite(pending, model, epoch, global_step, saved, ctx)
                    _flush(acc, pending)
                    _save_checkpoint(out, cfg, model, opt, sched, device, epoch, step_in_epoch, global_step, acc, ctx)
                    saved = global_step
        _check_finite(pending, model, epoch, global_step, saved, ctx)
        _flush(acc, pending)
        skip = 0
        acc["seconds"] += time.perf_counter() - t_epoch
        acc = _reduce_acc(acc, ctx)  # every rank's rows and sums; seconds of the slowest rank
        units = max(acc["units"], 1)
        secs = max(acc["seconds"], 1e-9)
        last = {"epoch": epoch + 1, "step": global_step}
        if job.unit == "rows":
            last["rows"] = int(acc["rows"])
        last.update(
            {
                "train_loss": acc["loss"] / units,
                "train_soft": acc["soft"] / units,
                "train_hard": acc["hard"] / units,
                "train_accuracy": acc["correct"] / units,
                "lr": opt.param_groups[0]["lr"],
                "seconds": acc["seconds"],
                "rows_per_second": acc["rows"] / secs,
            }
        )
        if job.unit != "rows":
            last[f"{job.unit}_per_second"] = acc["units"] / secs
        last.update(job.heldout_metrics(model, val_idx, device))
        if ctx.is_main:
            _append_line(out / METRICS, last)
        log.info(
            "epoch {epoch}/{total}: loss {train_loss:.4f} (soft {train_soft:.4f}, hard {train_hard:.4f}), ".format(
                total=cfg.epochs, **last
            )
            + job.epoch_message(last)
        )
        acc = _zero_acc()
        if epoch + 1 < cfg.epochs:
            _save_checkpoint(out, cfg, model, opt, sched, device, epoch + 1, 0, global_step, acc, ctx)
            saved = global_step

    if loader is not None:
        loader.close()
    if cfg.fsdp:  # gather the whole model on rank 0 and save it as a plain (unsharded) student
        whole = distributed.full_model_state(model)
        if ctx.is_main:
            job.build_student()
            job.model.load_state_dict(whole)
            job.save(out, job.model)
    else:
        ctx.check_replicas(model)
        if ctx.is_main:
            job.save(out, model)
    base = TrainSummary(
        run_dir=str(final),
        loss_formula=formula,
        epochs=cfg.epochs,
        steps=global_step,
        train_rows=train_rows,
        final_train_loss=last.get("train_loss", float("nan")),
        final_train_accuracy=last.get("train_accuracy", float("nan")),
        val_accuracy=last.get("val_accuracy"),
        eval_accuracy=last.get("eval_accuracy"),
        seconds=time.perf_counter() - t_start,
        rows_per_second=last.get("rows_per_second", 0.0),
        student_parameters=info.num_parameters,
        resumed_from_step=resumed_from,
    )
    summary = job.summary(base, last, train_units)
    if ctx.is_main:
        atomic_write_bytes(out / SUMMARY, json.dumps(asdict(summary), indent=2).encode())
        (out / CHECKPOINT).unlink(missing_ok=True)
    ctx.barrier()  # every rank returns once the run directory is final
    return summary


def restore(
    ckpt: dict | None,
    out: Path,
    model: nn.Module,
    opt,
    sched,
    device: torch.device,
    ctx: distributed.Dist,
    steps_per_epoch: int,
    sharded: bool = False,
) -> tuple[int, int, int, dict]:
    """Load a checkpoint into model, optimizer, scheduler and RNG states (this rank's under DDP) and cut
    metrics.jsonl back to it; returns (epoch, step in epoch, global step, accumulators). No checkpoint: a fresh
    start, and a metrics.jsonl left by an earlier attempt is removed. ``sharded``: the model is FSDP2-sharded and
    the checkpoint holds its whole state dicts (every rank keeps its shard)."""
    fresh_acc = _zero_acc
    if ckpt is None:
        if ctx.is_main and (out / METRICS).exists():
            (out / METRICS).unlink()
        return 0, 0, 0, fresh_acc()
    if bool(ckpt.get("fsdp", False)) != sharded:
        raise UsageError(
            f"{out} holds a checkpoint from a run {'with' if ckpt.get('fsdp') else 'without'} --fsdp: "
            "resume it the same way, or --overwrite"
        )
    if sharded:
        distributed.load_full_state(model, opt, ckpt["model"], ckpt["optimizer"])
    else:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    if int(ckpt.get("world", 1)) != ctx.world:
        raise UsageError(
            f"{out} holds a checkpoint from a run with {ckpt.get('world', 1)} process(es), not "
            f"{ctx.world}: resume it with the same torchrun --nproc-per-node, or --overwrite"
        )
    torch.set_rng_state(ckpt["rng_cpu_ranks"][ctx.rank] if ctx.enabled else ckpt["rng_cpu"])
    if device.type == "cuda" and "rng_cuda" in ckpt:
        torch.cuda.set_rng_state(ckpt["rng_cuda_ranks"][ctx.rank] if "rng_cuda_ranks" in ckpt else ckpt["rng_cuda"])
    epoch, skip, global_step = int(ckpt["epoch"]), int(ckpt["step_in_epoch"]), int(ckpt["global_step"])
    acc = {k: float(v) for k, v in ckpt["acc"].items()} if ctx.is_main else fresh_acc()  # sums over ranks
    if ctx.is_main:
        _truncate_lines(out / METRICS, int(ckpt["metrics_lines"]))
    log.info(f"resuming {out} at epoch {epoch + 1}, step {skip} of {steps_per_epoch} (global step {global_step})")
    return epoch, skip, global_step, acc


FINITE_CHECK_EVERY = 100
"""Steps between checks that the summed loss is finite (one device-to-host read; also at every checkpoint and
epoch end, where the weights are checked too, so no checkpoint or run dir ever holds NaN/inf)."""


def _check_finite(
    pending: torch.Tensor, model: nn.Module | None, epoch: int, step: int, saved: int, ctx: distributed.Dist
) -> None:
    """Stop a diverged run (exit 4, one line) before anything non-finite is saved; the last checkpoint stays.
    Under torchrun every rank learns of any rank's divergence (one all-reduce), so none is left waiting."""
    what = 0 if bool(torch.isfinite(pending).all()) else 1  # 1: the loss, 2: the weights
    bad = None
    if not what and model is not None:
        for name, p in model.named_parameters():
            t = p.detach()
            t = t.to_local() if hasattr(t, "to_local") else t  # an FSDP shard: this rank's part
            if not bool(torch.isfinite(t).all()):
                what, bad = 2, name
                break
    if ctx.enabled:
        what = int(ctx.all_reduce([float(what)], "max")[0])
    if not what:
        return
    cause = (
        "the loss became NaN or infinite"
        if what == 1
        else f"the weights became NaN or infinite{f' ({bad})' if bad else ''}"
    )
    kept = f"the run dir keeps the checkpoint of step {saved}" if saved else "nothing was saved"
    raise Diverged(
        f"training diverged: {cause} in epoch {epoch + 1}, by step {step}; {kept}. Lower --lr, check "
        "--temperature and the model / --peft-arg values, then re-run (--overwrite to start over)"
    )


def _flush(acc: dict, pending: torch.Tensor) -> None:
    """Add the device-side step sums into the host accumulators and zero them."""
    for key, value in zip(("loss", "soft", "hard", "correct"), pending.tolist()):
        acc[key] += value
    pending.zero_()


def _zero_acc() -> dict:
    return {"rows": 0.0, "units": 0.0, "loss": 0.0, "soft": 0.0, "hard": 0.0, "correct": 0.0, "seconds": 0.0}


def _reduce_acc(acc: dict, ctx: distributed.Dist | None) -> dict:
    """Accumulators summed over ranks (``seconds``: the slowest rank's); the identity in one process."""
    if ctx is None or not ctx.enabled:
        return acc
    keys = [k for k in acc if k != "seconds"]
    sums = ctx.all_reduce([acc[k] for k in keys], "sum")
    return {**dict(zip(keys, sums)), "seconds": ctx.all_reduce([acc["seconds"]], "max")[0]}


def _save_checkpoint(
    out: Path,
    cfg: TrainConfig,
    model,
    opt,
    sched,
    device,
    epoch: int,
    step_in_epoch: int,
    global_step: int,
    acc: dict,
    ctx: distributed.Dist | None = None,
) -> None:
    # Under DDP every rank calls this (the same steps): the accumulators are summed and every rank's RNG state
    # gathered, then rank 0 alone writes the checkpoint.
    acc = _reduce_acc(acc, ctx)
    rngs = None
    if ctx is not None and ctx.enabled:
        rngs = ctx.all_gather([torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if device.type == "cuda" else []))
    if cfg.fsdp:  # whole state dicts gathered on rank 0 (collectives: every rank takes part)
        model_state, opt_state = distributed.full_model_state(model), distributed.full_optimizer_state(model, opt)
    if ctx is not None and not ctx.is_main:
        return
    if not cfg.fsdp:
        model_state, opt_state = model.state_dict(), opt.state_dict()
    state = {
        "model": model_state,
        "optimizer": opt_state,
        "scheduler": sched.state_dict(),
        "fsdp": cfg.fsdp,
        "rng_cpu": torch.get_rng_state(),
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "global_step": global_step,
        "acc": acc,
        "config_hash": config_hash(cfg),
        "metrics_lines": _count_lines(out / METRICS),
        "world": ctx.world if ctx is not None else 1,
    }
    if rngs is not None:
        state["rng_cpu_ranks"] = [r[0] for r in rngs]
        if device.type == "cuda":
            state["rng_cuda_ranks"] = [r[1] for r in rngs]
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state()
    buf = io.BytesIO()
    torch.save(state, buf)  # serialised in memory: a failing disk write is then a plain OSError, not torch's
    try:
        atomic_write_bytes(out / CHECKPOINT, buf.getbuffer())  # the previous checkpoint stays whole until then
    except BaseException as e:
        if is_disk_full(e):
            raise UsageError(
                f"no space left on device while writing {out / CHECKPOINT}; free some space and "
                "re-run the same command: it resumes from the last whole checkpoint"
            ) from None
        raise


def _count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _truncate_lines(path: Path, n: int) -> None:
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)[:n]
        atomic_write_bytes(path, "".join(lines).encode())


def _append_line(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
