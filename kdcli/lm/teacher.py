"""cache_teacher_lm(cfg): JSONL -> tokens -> teacher LM (once) -> per-token top-k / sample / full -> token shards.

A token cache row is one sequence; it stores one entry per *predicted* token (never padding, and for
prompt/response rows only the response unless ``--prompt-loss``), flattened across rows with an ``offsets``
array. Per token:

- ``topk``:   ``topk_ids`` (k, uint16 when V <= 65,536), ``topk_logprobs`` (k, fp16), ``tail_logmass`` (fp16)
- ``sample``: ``sample_ids`` (S), ``sample_counts`` (S, uint8 when S <= 255), ``sample_logprobs`` (S, fp16)
- ``full``:   ``logprobs`` (V, fp16): only sensible for small vocabularies or reference runs
- always ``target_logprobs`` (fp16): the teacher's log-prob of the token that follows (teacher perplexity from
  the cache, no teacher needed at eval time)

With ``--teacher-prompt`` the teacher reads its own context before the response; the cached positions are the
response tokens, identical in the teacher's and the student's sequences (see :mod:`kdcli.lm.text`).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcli import log
from kdcli.cache.atomic import remove_partials
from kdcli.cache.lock import DirLock
from kdcli.cache.manifest import new_manifest, write_manifest
from kdcli.cache.reduce import numpy_id_dtype, reduce_logits, to_host
from kdcli.cache.writer import ShardWriter, compression_label, resolve_compression
from kdcli.config import CacheConfig
from kdcli.errors import CacheError, UsageError
from kdcli.lm.cache import TOKEN_KEYS
from kdcli.lm.hf import BUILTIN_LMS, build_lm, default_tokenizer_spec, lm_logits
from kdcli.lm.text import TextSettings, load_text, load_tokenizer, loss_positions, pad_batch, read_template, \
    teacher_sequences, tokenizer_identity
from kdcli.models import resolve_device
from kdcli.plugins import is_plugin_spec
from kdcli.teacher import AMP, CacheSummary, _prepare_dir

LOGIT_BUDGET = 1 << 27  # teacher logits per forward pass (b * L * V floats): 512 MiB in fp32
SHARD_BYTES = 256 << 20  # cap on one shard's payload: the writer holds at most ~3 shards in memory


@dataclass
class LMCacheSummary(CacheSummary):
    num_tokens: int = 0
    bytes_per_token: float = 0.0
    tokens_per_second: float = 0.0
    vocab_size: int = 0
    full_fp16_ratio: float = 0.0  # (V * 2 bytes) / bytes_per_token: how much smaller than full fp16 log-probs


def text_settings(cfg) -> TextSettings:
    return TextSettings(max_length=cfg.max_length, pack=not cfg.no_pack,
                        prompt_template=read_template(cfg.prompt_template) or "{prompt}",
                        prompt_loss=cfg.prompt_loss)


def check_vocab(what: str, size: int, teacher_size: int, fix: str) -> None:
    if size != teacher_size:
        raise CacheError(f"vocabulary mismatch: the teacher has {teacher_size} logits per token but {what} has "
                         f"{size}; {fix}")


def cache_teacher_lm(cfg: CacheConfig) -> LMCacheSummary:
    t0 = time.perf_counter()
    mode = cfg.mode or ("topk" if cfg.top_k else "full")
    if mode == "topk" and not cfg.top_k:
        raise UsageError("--mode topk needs --top-k K")
    if cfg.views != 1 or cfg.augment:
        raise UsageError("--views/--augment are for image data; token caches have one view per sequence")
    if (cfg.teacher in BUILTIN_LMS or is_plugin_spec(cfg.teacher)) and not cfg.teacher_weights:
        raise UsageError(f"teacher {cfg.teacher!r} has no weights: pass --teacher-weights PATH, a Hugging Face "
                         "directory or .gguf file, or a run directory made by `kdcli train-student`")
    tok_spec = cfg.tokenizer or default_tokenizer_spec(cfg.teacher)
    if tok_spec is None:
        raise UsageError(f"teacher {cfg.teacher!r} carries no tokenizer; pass --tokenizer (a HF dir, .gguf file or "
                         "tokenizer.json)")
    tok = load_tokenizer(tok_spec)
    tok_id = tokenizer_identity(tok, tok_spec)
    device = resolve_device(cfg.device)
    model, info = build_lm(cfg.teacher, cfg.teacher_args, vocab_size=len(tok), weights=cfg.teacher_weights)
    V = info.vocab_size
    if len(tok) > V:
        raise CacheError(f"vocabulary mismatch: tokenizer {tok_spec} has {len(tok)} tokens but the teacher "
                         f"{cfg.teacher} has only {V} logits per token; use the teacher's own tokenizer")
    if mode == "topk" and cfg.top_k >= V:
        raise UsageError(f"--top-k {cfg.top_k} keeps every one of the {V} vocabulary entries; use --mode full")
    if mode == "full" and V > 4096:
        log.warn(f"--mode full stores {V} fp16 log-probs ({2 * V:,} bytes) per token; --top-k 64 or --mode sample "
                 "is ~300x smaller")
    settings_obj = text_settings(cfg)
    teacher_prompt = read_template(cfg.teacher_prompt)
    data = load_text(cfg.data, tok, settings_obj, vocab_size=V)
    for note in data.notes:
        log.info(f"note: {note}")
    t_seqs, t_first = teacher_sequences(data, tok, teacher_prompt)
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None) or \
        getattr(model, "max_length", None)
    longest = max(len(s) for s in t_seqs)
    if max_pos and longest > max_pos:
        raise UsageError(f"the teacher reads sequences up to {longest} tokens but handles at most {max_pos}; "
                         "lower --max-length or shorten --teacher-prompt")
    num_rows = data.n
    id_dtype = numpy_id_dtype(V)
    count_dtype = np.dtype(np.uint8) if cfg.samples <= 255 else np.dtype(np.uint16)
    per_token = {"full": 2 * V, "topk": (id_dtype.itemsize + 2) * (cfg.top_k or 0) + 2,
                 "sample": (id_dtype.itemsize + count_dtype.itemsize + 2) * cfg.samples}[mode] + 2
    shard_size = max(1, min(cfg.shard_size, SHARD_BYTES // (per_token * settings_obj.max_length)))
    settings = {"mode": mode, "top_k": cfg.top_k if mode == "topk" else None,
                "samples": cfg.samples if mode == "sample" else None, "views": 1, "augment": None,
                "seed": cfg.seed if mode == "sample" else None, "shard_size": shard_size, "dtype": cfg.dtype,
                "teacher_prompt": teacher_prompt, **settings_obj.as_dict()}
    layout = {"kind": "token", "mode": mode, "num_classes": V, "vocab_size": V,
              "top_k": cfg.top_k if mode == "topk" else None, "samples": cfg.samples if mode == "sample" else None,
              "logprob_dtype": "float16", "id_dtype": id_dtype.name if mode != "full" else None,
              "count_dtype": count_dtype.name if mode == "sample" else None,
              "tail_dtype": "float16" if mode == "topk" else None, "token_keys": list(TOKEN_KEYS[mode]),
              "views": 1, "augment": None, "aug_param_names": [], "shard_size": shard_size,
              "compression": resolve_compression(cfg.compression, token=True, mode=mode),
              "text": {**settings_obj.as_dict(), "teacher_prompt": teacher_prompt, "data_kind": data.kind}}
    plan = new_manifest(teacher=info.identity(), data=data.identity(), settings=settings, layout=layout,
                        num_rows=num_rows, tokenizer=tok_id)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    n_targets = data.num_targets
    with DirLock(out):
        removed = remove_partials(out)
        if removed:
            log.info(f"removed {len(removed)} partial file(s) left by an interrupted run")
        manifest, first_shard = _prepare_dir(out, plan, cfg.overwrite)
        if first_shard < 0:
            log.info(f"cache {out} is complete and up to date ({num_rows} sequences, {int(n_targets.sum())} tokens, "
                     "same teacher, tokenizer, data and settings); nothing to do")
            return _summary(cfg, manifest, "up-to-date", 0, num_rows, 0, t0, info, device)
        first_row = first_shard * shard_size
        if first_row:
            log.info(f"resuming {out}: {first_shard} whole shard(s) found, skipping {first_row} of {num_rows} rows")
        log.info(f"caching teacher {cfg.teacher} ({info.num_parameters:,} parameters, vocabulary {V}) on {device}: "
                 f"{num_rows} sequences, {int(n_targets.sum()):,} predicted tokens, mode {mode}"
                 + (f", k={cfg.top_k}" if mode == "topk" else "") + (f", {cfg.samples} draws/token" if mode ==
                                                                     "sample" else "")
                 + (" (teacher prompt on)" if teacher_prompt else ""))
        model.to(device).eval()
        writer = ShardWriter(out, manifest, shard_size=shard_size, first_shard=first_shard,
                             token_keys=frozenset(TOKEN_KEYS[mode]), threaded=True)
        try:
            _run(cfg, model, data, t_seqs, t_first, device, mode, V, id_dtype, count_dtype, first_row, writer,
                 pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        manifest["complete"] = True
        write_manifest(out, manifest)
    status = "resumed" if first_row else "written"
    computed = int(n_targets[first_row:].sum())
    return _summary(cfg, manifest, status, num_rows - first_row, first_row, computed, t0, info, device)


def _run(cfg, model, data, t_seqs, t_first, device, mode, V, id_dtype, count_dtype, first_row, writer,
         pad_id: int) -> None:
    amp = torch.autocast(device.type, dtype=AMP[cfg.dtype]) if cfg.dtype in AMP else nullcontext()
    n = data.n
    longest = max(len(s) for s in t_seqs)
    rows_per_pass = max(1, min(cfg.batch_size, LOGIT_BUDGET // (longest * V)))
    if rows_per_pass < cfg.batch_size:
        log.info(f"teacher batches of {rows_per_pass} sequences (--batch-size {cfg.batch_size} capped so the "
                 f"logits of one pass stay under {LOGIT_BUDGET * 4 >> 20} MiB)")
    total = int(data.num_targets[first_row:].sum())
    with torch.inference_mode(), amp, log.Progress(total, "cache-teacher", unit="tokens") as progress:
        for start in range(first_row, n, rows_per_pass):
            stop = min(start + rows_per_pass, n)
            seqs = t_seqs[start:stop]
            ids, mask = pad_batch(seqs, pad_id)
            flat_idx, targets = loss_positions(seqs, t_first[start:stop], ids.shape[1])
            lengths = np.array([max(len(s) - int(a), 0) for s, a in zip(seqs, t_first[start:stop])], np.int64)
            expect = data.num_targets[start:stop]
            if not np.array_equal(lengths, expect):  # the teacher's positions must be the student's
                raise RuntimeError(f"teacher/student position mismatch at rows {start}..{stop}")
            logits = lm_logits(model, torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
            sel = logits.reshape(-1, logits.shape[-1])[torch.from_numpy(flat_idx).to(device)]  # (tokens, V)
            if sel.shape[-1] != V:
                raise CacheError(f"the teacher returned {sel.shape[-1]} logits per token, expected {V}")
            if not torch.isfinite(sel).all():
                raise UsageError(f"teacher produced NaN/inf logits in rows {start}..{stop - 1}; nothing was written "
                                 "for that shard: check the teacher weights and --dtype")
            logp = torch.log_softmax(sel.float(), dim=-1)  # (tokens, V) fp32
            gen = None
            if mode == "sample":
                gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + start)
            reduced = to_host(reduce_logits(logp, mode, top_k=cfg.top_k, samples=cfg.samples, generator=gen), V)
            if "tail_logmass" in reduced:
                reduced["tail_logmass"] = reduced["tail_logmass"].astype(np.float16)
            if "sample_counts" in reduced:
                reduced["sample_counts"] = reduced["sample_counts"].astype(count_dtype)
            tgt = torch.from_numpy(targets).to(device)
            reduced["target_logprobs"] = logp.gather(1, tgt[:, None])[:, 0].to(torch.float16).cpu().numpy()
            rows = np.arange(start, stop, dtype=np.int64)
            writer.add({"row_index": rows, "sample_index": rows.copy(), "row_hash": data.row_hash[start:stop],
                        "lengths": lengths, **reduced})
            progress.advance(int(lengths.sum()))


def _summary(cfg, manifest: dict, status: str, computed_rows: int, skipped: int, computed_tokens: int, t0: float,
             info, device) -> LMCacheSummary:
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    secs = time.perf_counter() - t0
    rows = manifest["num_rows"]
    tokens = int(manifest["data"]["num_targets"])
    bpt = total_bytes / max(tokens, 1)
    V = int(manifest["vocab_size"])
    return LMCacheSummary(cache_dir=str(cfg.out), status=status, mode=manifest["mode"], num_rows=rows,
                          rows_computed=computed_rows, rows_skipped=skipped, num_shards=len(manifest["shards"]),
                          bytes=total_bytes, bytes_per_row=total_bytes / max(rows, 1), seconds=secs,
                          rows_per_second=computed_rows / max(secs, 1e-9), teacher=cfg.teacher,
                          teacher_parameters=info.num_parameters, device=str(device), num_tokens=tokens,
                          bytes_per_token=bpt, tokens_per_second=computed_tokens / max(secs, 1e-9), vocab_size=V,
                          full_fp16_ratio=2 * V / max(bpt, 1e-9),
                          compression=compression_label(manifest.get("compression")))
