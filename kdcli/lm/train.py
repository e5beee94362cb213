"""train_student_lm(cfg): token cache + JSONL -> per-token distillation loss -> optimizer loop -> LM RUN_DIR.

One training row is one sequence; the loss is averaged over its *predicted* tokens (the cached positions):

    loss = alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE(student, next token)

with D forward KL (default), reverse KL or JSD (``--divergence``). The student reads exactly the token ids the
cache was built for (same tokenizer, checked by SHA-256; same packing/truncation, from the manifest; every row's
hash is checked against the cache's). With ``--teacher-prompt`` caches the student never sees the teacher's
context: it learns to behave as if it had.

RUN_DIR holds what :mod:`kdcli.train` writes (model.safetensors, model.json, config.yaml, metrics.jsonl,
summary.json, checkpoint.pt while training) plus ``tokenizer/``: ``kdcli eval`` needs nothing else.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdcli import log
from kdcli.cache.atomic import atomic_write_bytes
from kdcli.cache.lock import DirLock
from kdcli.config import TrainConfig, to_dict, write_yaml
from kdcli.errors import CacheError, UsageError
from kdcli.lm.cache import TokenCacheReader
from kdcli.lm.head_loss import head_kd_loss
from kdcli.lm.hf import TinyTransformer, build_lm, default_tokenizer_spec, lm_logits, save_lm_run
from kdcli.lm.text import TextSettings, TokenData, load_text, load_tokenizer, loss_positions, pad_batch, \
    tokenizer_identity
from kdcli.losses import LossParts, Targets, describe, kd_loss, targets_from_arrays
from kdcli.distributed import Dist
from kdcli.models import resolve_device
from kdcli.train import CONFIG, METRICS, SUMMARY, TrainSummary, _append_line, _optimizer, _prepare_run_dir, holdout, \
    label_batches, precision_context, restore, _save_checkpoint, _schedule


@dataclass
class LMTrainSummary(TrainSummary):
    train_tokens: int = 0
    tokens_per_second: float = 0.0
    divergence: str = "forward"
    val_perplexity: float | None = None
    eval_perplexity: float | None = None


def settings_from_manifest(manifest: dict) -> TextSettings:
    t = manifest["text"]
    return TextSettings(max_length=int(t["max_length"]), pack=bool(t["pack"]), prompt_template=t["prompt_template"],
                        prompt_loss=bool(t["prompt_loss"]))


def tokenizer_for_cache(manifest: dict, override: str | None, cache_dir) -> tuple[object, str]:
    """The cache's tokenizer (or ``override``), refusing one whose content differs from what built the cache."""
    want = manifest.get("tokenizer") or {}
    spec = override or want.get("spec")
    if not spec:
        raise CacheError(f"cache {cache_dir} records no tokenizer; rebuild it with this kdcli")
    if not Path(spec).exists():
        raise UsageError(f"the cache's tokenizer {spec} is gone; pass --tokenizer with a copy of it (e.g. the teacher "
                         "directory or .gguf file)")
    tok = load_tokenizer(spec)
    got = tokenizer_identity(tok, spec)
    if want.get("sha256") and got["sha256"] != want["sha256"]:
        raise CacheError(f"tokenizer {spec} differs from the one that built cache {cache_dir} (sha256 "
                         f"{got['sha256'][:12]} vs {want['sha256'][:12]}); the token ids would not line up")
    return tok, spec


def predicted_logits(model, data: TokenData, rows: np.ndarray, device: torch.device, batch_size: int = 8,
                     pad_id: int = 0):
    """Yield ``(start, logits, labels, seconds)`` per batch of ``rows``: the model's float logits (n, V) at the
    batch's predicted positions, their next-token labels (n,), and the forward pass's wall time. Batches with no
    predicted token are skipped. Call under ``torch.no_grad()`` / ``inference_mode()``."""
    for a in range(0, len(rows), batch_size):
        r = rows[a:a + batch_size]
        seqs = [data.ids[i] for i in r]
        ids, mask = pad_batch(seqs, pad_id)
        idx, tgt = loss_positions(seqs, data.first_target[r], ids.shape[1])
        if not len(idx):
            continue
        t0 = time.perf_counter()
        logits = lm_logits(model, torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
        sel = logits.reshape(-1, logits.shape[-1])[torch.from_numpy(idx).to(device)].float()
        yield a, sel, torch.from_numpy(tgt).to(device), time.perf_counter() - t0


@torch.no_grad()
def perplexity(model, data: TokenData, rows: np.ndarray, device: torch.device, batch_size: int = 8,
               pad_id: int = 0) -> dict:
    """Mean next-token NLL, perplexity and top-1 accuracy over the predicted tokens of ``rows``."""
    was = model.training
    model.eval()
    nll = correct = tokens = 0.0
    for _, sel, y, _ in predicted_logits(model, data, rows, device, batch_size, pad_id):
        nll += float(F.cross_entropy(sel, y, reduction="sum"))
        correct += float((sel.argmax(-1) == y).sum())
        tokens += len(y)
    model.train(was)
    mean = nll / max(tokens, 1)
    return {"nll": mean, "perplexity": math.exp(min(mean, 700.0)), "accuracy": correct / max(tokens, 1),
            "tokens": int(tokens)}


def student_loss(model, ids: torch.Tensor, mask: torch.Tensor | None, idx: torch.Tensor, targets: Targets | None,
                 labels: torch.Tensor, *, temperature: float, alpha: float, divergence: str = "forward",
                 beta: float = 0.5, fused: bool = True, precision: str = "fp32") -> tuple[LossParts, int]:
    """The training loss over the predicted positions ``idx`` of a (b, L) batch, and how many argmaxes hit the label.

    The built-in transformer with forward KL takes the fused path (kdcli.lm.head_loss: output layer and loss in
    chunks, no (tokens, V) logits kept; same value and gradients); other students and divergences take
    ``kd_loss`` on the selected logits.
    """
    with precision_context(precision, ids.device):
        if fused and divergence == "forward" and isinstance(model, TinyTransformer):
            h = model.hidden(ids)
            return head_kd_loss(h.reshape(-1, h.shape[-1])[idx], model.head.weight, targets, labels,
                                temperature=temperature, alpha=alpha, precision=precision)
        logits = lm_logits(model, ids, mask)
    sel = logits.reshape(-1, logits.shape[-1])[idx].float()  # (tokens, V)
    parts = kd_loss(sel, targets, labels, temperature=temperature, alpha=alpha, divergence=divergence, beta=beta)
    return parts, int((sel.detach().argmax(-1) == labels).sum())


def check_batch(batch: dict, data: TokenData, reader: TokenCacheReader) -> None:
    rows = batch["sample_index"]
    bad = np.flatnonzero(data.row_hash[rows] != batch["row_hash"])
    if len(bad):
        raise CacheError(f"cache {reader.dir} row {int(batch['row_index'][bad[0]])} was made from different tokens "
                         f"than data row {int(rows[bad[0]])}; the cache does not belong to this data")
    if not np.array_equal(data.num_targets[rows], batch["lengths"]):
        raise CacheError(f"cache {reader.dir}: cached positions per row do not match the data's predicted tokens")


def train_student_lm(cfg: TrainConfig) -> LMTrainSummary:
    t_start = time.perf_counter()
    alpha = cfg.alpha if cfg.alpha is not None else (0.9 if cfg.cache else 0.0)
    if alpha > 0 and not cfg.cache:
        raise UsageError(f"--alpha {alpha:g} weights a teacher term but no --cache was given; pass --cache "
                         "CACHE_DIR or --alpha 0")
    if cfg.augment or cfg.max_norm:
        raise UsageError("--augment and --max-norm are for image classifiers, not language models")
    if cfg.num_workers:
        log.warn("--num-workers is ignored for language-model caches: batches are read in this process")
    reader = TokenCacheReader(cfg.cache) if cfg.cache else None
    if reader is not None:
        settings = settings_from_manifest(reader.manifest)
        if cfg.max_length and cfg.max_length != settings.max_length:
            raise UsageError(f"--max-length {cfg.max_length} differs from the cache's {settings.max_length}; drop it "
                             "(the student trains on the sequences the cache was built for)")
        tok, tok_spec = tokenizer_for_cache(reader.manifest, cfg.tokenizer, reader.dir)
        V = reader.vocab_size
    else:
        tok_spec = cfg.tokenizer or default_tokenizer_spec(cfg.student)
        if tok_spec is None:
            raise UsageError(f"training {cfg.student!r} on text without --cache needs --tokenizer")
        tok = load_tokenizer(tok_spec)
        settings = TextSettings(max_length=cfg.max_length or 512)
        V = None
    data = load_text(cfg.data, tok, settings, vocab_size=V or len(tok))
    for note in data.notes:
        log.info(f"note: {note}")
    if reader is not None:
        reader.check_data(data.identity())
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with DirLock(out):
        ckpt = _prepare_run_dir(cfg, out)
        return _train(cfg, out, ckpt, alpha, reader, data, tok, tok_spec, V, device, t_start)


def _train(cfg: TrainConfig, out: Path, ckpt: dict | None, alpha: float, reader: TokenCacheReader | None,
           data: TokenData, tok, tok_spec: str, V: int | None, device: torch.device, t_start: float) -> LMTrainSummary:
    torch.manual_seed(cfg.seed)
    args = dict(cfg.student_args)
    if cfg.student == "transformer":
        args.setdefault("max_length", max(1024, data.settings.max_length))
    model, info = build_lm(cfg.student, args, vocab_size=V or len(tok))
    if V is not None and info.vocab_size != V:
        raise CacheError(f"vocabulary mismatch: the teacher (cache {reader.dir}) has {V} logits per token but the "
                         f"student {cfg.student} has {info.vocab_size}; use a student with the teacher's vocabulary")
    if info.vocab_size < len(tok):
        raise UsageError(f"the student has {info.vocab_size} logits per token but the tokenizer has {len(tok)} tokens")
    model.to(device)
    write_yaml({**to_dict(cfg), "alpha": alpha}, out / CONFIG)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    val_idx, keep = holdout(data.n, cfg.val_fraction, cfg.seed)
    n_val = len(val_idx)
    train_rows = np.flatnonzero(keep)
    train_tokens = int(data.num_targets[train_rows].sum())
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs

    opt = _optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, total_steps))
    start_epoch, skip, global_step, acc = restore(ckpt, out, model, opt, sched, device, Dist(device=device),
                                                  steps_per_epoch, fresh_acc=_zero_acc)

    formula = describe(alpha, cfg.temperature, reader is not None, cfg.divergence, cfg.jsd_beta)
    log.info(formula + "   (averaged over predicted tokens)")
    log.info(f"student {cfg.student} ({info.num_parameters:,} parameters, vocabulary {info.vocab_size}) on {device}; "
             f"{len(train_rows)} training sequences ({train_tokens:,} predicted tokens), {n_val} validation; "
             f"{cfg.epochs} epochs x {steps_per_epoch} steps, batch {cfg.batch_size}"
             + (f"; cache mode {reader.mode}" if reader else ""))
    eval_data = None
    if cfg.eval_data:
        eval_data = load_text(cfg.eval_data, tok, data.settings, vocab_size=info.vocab_size)
    resumed_from = global_step
    last: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t_epoch = time.perf_counter()
        if reader is not None:
            batches = reader.iter_batches(batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                          keep=keep if n_val else None, skip_batches=skip)
        else:
            batches = label_batches(train_rows, batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                    skip_batches=skip)
        step_in_epoch = skip
        for batch in batches:
            rows = batch["sample_index"]
            seqs = [data.ids[i] for i in rows]
            ids, mask = pad_batch(seqs, pad_id)
            idx, labels = loss_positions(seqs, data.first_target[rows], ids.shape[1])
            targets = None
            if reader is not None:
                check_batch(batch, data, reader)
                targets = targets_from_arrays(batch, reader.mode, V).to(device)
            y = torch.from_numpy(labels).to(device)
            parts, correct = student_loss(model, torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device),
                                          torch.from_numpy(idx).to(device), targets, y, temperature=cfg.temperature,
                                          alpha=alpha, divergence=cfg.divergence, beta=cfg.jsd_beta,
                                          precision=cfg.precision)
            opt.zero_grad(set_to_none=True)
            parts.total.backward()
            opt.step()
            sched.step()
            n = len(labels)
            acc["rows"] += len(rows)
            acc["tokens"] += n
            acc["loss"] += float(parts.total.detach()) * n
            acc["soft"] += float(parts.soft.detach()) * n
            acc["hard"] += float(parts.hard.detach()) * n
            acc["correct"] += correct
            step_in_epoch += 1
            global_step += 1
            if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0 and step_in_epoch < steps_per_epoch:
                _save_checkpoint(out, cfg, model, opt, sched, device, epoch, step_in_epoch, global_step, acc)
        skip = 0
        acc["seconds"] += time.perf_counter() - t_epoch
        tokens = max(acc["tokens"], 1)
        last = {"epoch": epoch + 1, "step": global_step, "train_loss": acc["loss"] / tokens,
                "train_soft": acc["soft"] / tokens, "train_hard": acc["hard"] / tokens,
                "train_accuracy": acc["correct"] / tokens, "lr": opt.param_groups[0]["lr"],
                "seconds": acc["seconds"], "rows_per_second": acc["rows"] / max(acc["seconds"], 1e-9),
                "tokens_per_second": acc["tokens"] / max(acc["seconds"], 1e-9)}
        if n_val:
            m = perplexity(model, data, val_idx, device, pad_id=pad_id)
            last.update({"val_perplexity": m["perplexity"], "val_accuracy": m["accuracy"], "val_nll": m["nll"]})
        if eval_data is not None:
            m = perplexity(model, eval_data, np.arange(eval_data.n), device, pad_id=pad_id)
            last.update({"eval_perplexity": m["perplexity"], "eval_accuracy": m["accuracy"], "eval_nll": m["nll"]})
        _append_line(out / METRICS, last)
        log.info("epoch {epoch}/{total}: loss {train_loss:.4f} (soft {train_soft:.4f}, hard {train_hard:.4f}), "
                 "token acc {train_accuracy:.4f}".format(total=cfg.epochs, **last)
                 + (f", val ppl {last['val_perplexity']:.2f}" if n_val else "")
                 + (f", eval ppl {last['eval_perplexity']:.2f}" if eval_data is not None else "")
                 + f", {last['tokens_per_second']:,.0f} tokens/s")
        acc = _zero_acc()
        if epoch + 1 < cfg.epochs:
            _save_checkpoint(out, cfg, model, opt, sched, device, epoch + 1, 0, global_step, acc)

    save_lm_run(out, model, info, tokenizer=tok, tokenizer_id=tokenizer_identity(tok, tok_spec),
                text=data.settings.as_dict())
    summary = LMTrainSummary(
        run_dir=str(out), loss_formula=formula, epochs=cfg.epochs, steps=global_step, train_rows=len(train_rows),
        final_train_loss=last.get("train_loss", float("nan")),
        final_train_accuracy=last.get("train_accuracy", float("nan")), val_accuracy=last.get("val_accuracy"),
        eval_accuracy=last.get("eval_accuracy"), seconds=time.perf_counter() - t_start,
        rows_per_second=last.get("rows_per_second", 0.0), student_parameters=info.num_parameters,
        resumed_from_step=resumed_from, train_tokens=train_tokens,
        tokens_per_second=last.get("tokens_per_second", 0.0), divergence=cfg.divergence,
        val_perplexity=last.get("val_perplexity"), eval_perplexity=last.get("eval_perplexity"))
    atomic_write_bytes(out / SUMMARY, json.dumps(asdict(summary), indent=2).encode())
    (out / "checkpoint.pt").unlink(missing_ok=True)
    return summary


def _zero_acc() -> dict:
    return {"rows": 0.0, "tokens": 0.0, "loss": 0.0, "soft": 0.0, "hard": 0.0, "correct": 0.0, "seconds": 0.0}
