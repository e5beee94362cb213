"""evaluate_lm(cfg): LMs + JSONL (+ token cache) -> perplexity, next-token accuracy, agreement and KL to the teacher.

Metrics are over the *predicted* tokens (the positions a cache stores: never padding; for prompt/response rows
only the response unless the data settings say otherwise). With ``--cache`` the teacher is never re-run: its
top-1 and its distribution come from the cache (whose rows must match the data, row by row), and its perplexity
from the cached ``target_logprobs``. ``--model`` accepts kdcli LM run dirs and Hugging Face dirs / GGUF files (so
the teacher itself can be measured: parameters, bytes, tokens per second).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdcli.config import EvalConfig
from kdcli.errors import CacheError, UsageError
from kdcli.evaluate import threshold_failures
from kdcli.lm.cache import TokenCacheReader
from kdcli.lm.hf import build_lm, default_tokenizer_spec, is_lm_run_dir, read_lm_meta
from kdcli.lm.text import TextSettings, load_text, load_tokenizer
from kdcli.lm.train import check_batch, predicted_logits, settings_from_manifest, tokenizer_for_cache
from kdcli.losses import soft_kl, targets_from_arrays
from kdcli.models import resolve_device


@dataclass
class LMModelReport:
    model: str
    num_tokens: int
    perplexity: float
    nll: float
    accuracy: float  # next-token top-1 accuracy against the data
    agreement: float | None  # top-1 agreement with the cached teacher
    kl_to_teacher: float | None  # mean KL(teacher_T || model_T) per token, from the cache
    num_parameters: int
    weight_bytes: int
    tokens_per_second: float


@dataclass
class LMEvalReport:
    data: str
    cache: str | None
    temperature: float
    num_sequences: int
    num_tokens: int
    teacher: dict | None  # from the cache: spec, parameters, mode, perplexity (from target_logprobs)
    models: list[LMModelReport]
    failures: list[str]
    kind: str = "lm"
    notes: list[str] = field(default_factory=list)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers, tied tensors counted once."""
    seen: dict[int, int] = {}
    for t in list(model.state_dict().values()):
        seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
    return sum(seen.values())


def evaluate_lm(cfg: EvalConfig) -> LMEvalReport:
    if cfg.plot:
        raise UsageError("--plot draws classification reliability diagrams; it does not apply to language models")
    device = resolve_device(cfg.device)
    reader = TokenCacheReader(cfg.cache) if cfg.cache else None
    first = cfg.model[0]
    if reader is not None:
        settings = settings_from_manifest(reader.manifest)
        if cfg.max_length and cfg.max_length != settings.max_length:
            raise UsageError(f"--max-length {cfg.max_length} differs from the cache's {settings.max_length}; drop it")
        tok, tok_spec = tokenizer_for_cache(reader.manifest, cfg.tokenizer, reader.dir)
        V = reader.vocab_size
    else:
        tok_spec = cfg.tokenizer or default_tokenizer_spec(first)
        if tok_spec is None:
            raise UsageError(f"--model {first!r} carries no tokenizer; pass --tokenizer")
        tok = load_tokenizer(tok_spec)
        if is_lm_run_dir(first):
            t = read_lm_meta(Path(first)).get("text") or {}
            settings = TextSettings(**{k: t[k] for k in ("max_length", "pack", "prompt_template", "prompt_loss")
                                       if k in t})
        else:
            settings = TextSettings()
        if cfg.max_length:
            settings.max_length = cfg.max_length
        V = None
    data = load_text(cfg.data, tok, settings, vocab_size=V or len(tok))
    if reader is not None:
        reader.check_data(data.identity())
    if cfg.min_agreement is not None and reader is None:
        raise UsageError("--min-agreement needs --cache (the teacher's outputs)")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    bs = max(1, min(cfg.batch_size, 16))
    rows_all = np.arange(data.n)
    teacher = None

    def cached(a: int) -> dict:  # the cache's rows [a, a + bs), checked against the data; read again per model
        batch = reader.read_rows(a, min(a + bs, data.n))  # so memory stays flat whatever the eval set's size
        if not np.array_equal(batch["sample_index"], rows_all[a:a + bs]):
            raise CacheError(f"cache {cfg.cache} rows do not line up with {cfg.data}")
        check_batch(batch, data, reader)
        return batch

    if reader is not None:
        nll_t = 0.0
        for a in range(0, data.n, bs):
            nll_t -= float(cached(a)["target_logprobs"].astype(np.float64).sum())
        n_tok = int(data.num_targets.sum())
        m = reader.manifest
        teacher = {"spec": m["teacher"].get("spec"), "num_parameters": m["teacher"].get("num_parameters"),
                   "mode": m["mode"], "perplexity": math.exp(min(nll_t / max(n_tok, 1), 700.0)),
                   "nll": nll_t / max(n_tok, 1), "teacher_prompt": m.get("text", {}).get("teacher_prompt")}
    reports = []
    for spec in cfg.model:
        model, info = build_lm(spec, None, vocab_size=V or len(tok))
        if V is not None and info.vocab_size != V:
            raise CacheError(f"vocabulary mismatch: the teacher (cache {cfg.cache}) has {V} logits per token but "
                             f"{spec} has {info.vocab_size}")
        model.to(device).eval()
        nll = correct = agree = kl = 0.0
        tokens = 0
        secs = 0.0
        with torch.inference_mode():
            for a, sel, y, dt in predicted_logits(model, data, rows_all, device, bs, pad_id):
                secs += dt
                nll += float(F.cross_entropy(sel, y, reduction="sum"))
                correct += float((sel.argmax(-1) == y).sum())
                tokens += len(y)
                if reader is not None:
                    targets = targets_from_arrays(cached(a), reader.mode, V).to(device)
                    agree += float((sel.argmax(-1) == targets.top1()).sum())
                    kl += float(soft_kl(sel, targets, cfg.temperature).sum())
        mean = nll / max(tokens, 1)
        reports.append(LMModelReport(
            model=spec, num_tokens=tokens, perplexity=math.exp(min(mean, 700.0)), nll=mean,
            accuracy=correct / max(tokens, 1), agreement=agree / max(tokens, 1) if reader else None,
            kl_to_teacher=kl / max(tokens, 1) if reader else None, num_parameters=info.num_parameters,
            weight_bytes=weight_bytes(model), tokens_per_second=int(data.lengths.sum()) / max(secs, 1e-9)))
    return LMEvalReport(data=cfg.data, cache=cfg.cache, temperature=cfg.temperature, num_sequences=data.n,
                        num_tokens=int(data.num_targets.sum()), teacher=teacher, models=reports,
                        failures=threshold_failures(reports, cfg, "next-token accuracy"), notes=data.notes)


def render_lm_eval(r: LMEvalReport):
    from rich.table import Table

    from kdcli.report import _human_bytes, _kl

    t = Table(title=f"eval on {r.data} ({r.num_sequences:,} sequences, {r.num_tokens:,} predicted tokens)",
              title_justify="left")
    t.add_column("metric", style="bold")
    for m in r.models:
        t.add_column(m.model, justify="right", overflow="fold")
    fmt = [("perplexity", lambda m: f"{m.perplexity:.3f}"), ("NLL / token", lambda m: f"{m.nll:.4f}"),
           ("next-token accuracy", lambda m: f"{m.accuracy:.4f}")]
    if r.cache:
        fmt += [("top-1 agreement w/ teacher", lambda m: f"{m.agreement:.4f}"),
                (f"KL(teacher‖model) T={r.temperature:g}", lambda m: _kl(m.kl_to_teacher))]
    fmt += [("parameters", lambda m: f"{m.num_parameters:,}"), ("weights", lambda m: _human_bytes(m.weight_bytes)),
            ("tokens/s (forward)", lambda m: f"{m.tokens_per_second:,.0f}")]
    for name, f in fmt:
        t.add_row(name, *[f(m) for m in r.models])
    if r.teacher:
        t.caption = (f"teacher (from the cache, {r.teacher['mode']}): {r.teacher['spec']}, "
                     f"{r.teacher['num_parameters']:,} parameters, perplexity {r.teacher['perplexity']:.3f}")
    return t
