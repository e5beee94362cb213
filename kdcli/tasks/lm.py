"""Token-level language modelling: one row = one token sequence; the cache stores one entry per *predicted* token.

A row's predicted tokens are never padding, and for prompt/response rows only the response unless
``--prompt-loss``; token arrays are flattened across rows with an ``offsets`` array. Per token:

- ``topk``:   ``topk_ids`` (k, uint16 when V <= 65,536), ``topk_logprobs`` (k, fp16), ``tail_logmass`` (fp16)
- ``sample``: ``sample_ids`` (S), ``sample_counts`` (S, uint8 when S <= 255), ``sample_logprobs`` (S, fp16)
- ``full``:   ``logprobs`` (V, fp16): only sensible for small vocabularies or reference runs
- always ``target_logprobs`` (fp16): the teacher's log-prob of the token that follows (teacher perplexity from
  the cache, no teacher needed at eval time)

With ``--teacher-prompt`` the teacher reads its own context before the response; the cached positions are the
response tokens, identical in the teacher's and the student's sequences (see :mod:`kdcli.lm.text`).

Training averages the loss over a batch's predicted tokens:

    loss = alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE(student, next token)

with D forward KL (default), reverse KL or JSD (``--divergence``). The student reads exactly the token ids the
cache was built for (same tokenizer, checked by SHA-256; same packing/truncation, from the manifest; every row's
hash is checked against the cache's). An LM run dir holds what every run dir holds plus ``tokenizer/``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdcli.cache.manifest import TEACHER_VOCAB, new_manifest
from kdcli.cache.modes.base import Mode, Targets
from kdcli.cache.tokens import TokenCacheReader, token_keys
from kdcli.cache.writer import resolve_compression
from kdcli.config import EvalConfig
from kdcli.infra import log
from kdcli.infra.errors import CacheError, UsageError
from kdcli.infra.fmt import TableData
from kdcli.infra.precision import precision_context
from kdcli.lm.adapters import add_adapter, is_peft_model, peft_module, trainable_counts
from kdcli.lm.bpb import bits_per_byte
from kdcli.lm.head_loss import head_kd_loss
from kdcli.lm.hf import (
    BUILTIN_LMS,
    HF_BUILTINS,
    LMForward,
    build_lm,
    default_tokenizer_spec,
    enable_gradient_checkpointing,
    fused_head_weight,
    input_device,
    is_lm_run_dir,
    is_placed,
    lm_hidden,
    lm_logits,
    read_lm_meta,
    save_lm_run,
)
from kdcli.lm.text import (
    TextSettings,
    TokenData,
    load_text,
    load_tokenizer,
    loss_positions,
    pad_batch,
    read_chat_template,
    read_template,
    target_counts,
    teacher_view,
    tokenizer_identity,
)
from kdcli.lm.xtok import cache_record, cached_spans, predicted_bytes
from kdcli.losses import LossParts, kd_loss, soft_kl
from kdcli.models.plugins import is_plugin_spec
from kdcli.models.weights import weight_bytes
from kdcli.tasks.base import CacheJob, EvalJob, Task, TrainJob, cache_label, cache_layout, cache_mode, size_and_speed
from kdcli.tasks.reports import CacheSummary, SizeAndSpeed, TrainSummary, metric_table, teacher_and_size_rows

LOGIT_BUDGET = 1 << 27  # teacher logits per forward pass (b * L * V floats): 512 MiB in fp32
SHARD_BYTES = 256 << 20  # cap on one shard's payload: the writer holds at most ~3 shards in memory


@dataclass
class LMCacheSummary(CacheSummary):
    num_tokens: int = 0
    bytes_per_token: float = 0.0
    tokens_per_second: float = 0.0
    vocab_size: int = 0
    full_fp16_ratio: float = 0.0  # (V * 2 bytes) / bytes_per_token: how much smaller than full fp16 log-probs

    # a token-level (LM) cache: sizes per predicted token (CacheSummary.table)
    def count_rows(self) -> list[tuple[str, str]]:
        return [("sequences", f"{self.num_rows:,}"), ("predicted tokens", f"{self.num_tokens:,}")]

    def size_note(self) -> str:
        ids = f" for {self.unique_ids:.1f} distinct ids/token" if self.unique_ids is not None else ""
        return (
            f"{self.bytes_per_token:.1f} B/token{ids}, {self.full_fp16_ratio:,.0f}x smaller than full fp16 "
            f"log-probs over {self.vocab_size:,}"
        )

    def speed_note(self) -> str:
        return f"{self.tokens_per_second:,.0f} tokens/s"


@dataclass
class LMTrainSummary(TrainSummary):
    train_tokens: int = 0
    tokens_per_second: float = 0.0
    divergence: str = "forward"
    val_perplexity: float | None = None
    eval_perplexity: float | None = None
    trainable_parameters: int | None = None  # --peft: the adapter's parameters (student_parameters: all)

    # an LM run: sequences are rows, tokens are what matters (TrainSummary.table)
    def count_rows(self) -> list[tuple[str, str]]:
        rows = [
            ("train rows", f"{self.train_rows:,}"),
            ("train tokens", f"{self.train_tokens:,} ({self.divergence} divergence)"),
        ]
        if self.eval_perplexity is not None:
            rows.append(("eval perplexity", f"{self.eval_perplexity:.2f}"))
        return rows

    def parameters_note(self) -> str:
        return f" ({self.trainable_parameters:,} trainable)" if self.trainable_parameters is not None else ""

    def speed_note(self) -> str:
        return f"{self.tokens_per_second:,.0f} tokens/s"


# -- shared by the stages ------------------------------------------------------------------------------------------


def text_settings(cfg) -> TextSettings:
    return TextSettings(
        max_length=cfg.max_length,
        pack=not cfg.no_pack,
        prompt_template=read_template(cfg.prompt_template) or "{prompt}",
        prompt_loss=cfg.prompt_loss,
        chat_template=read_chat_template(cfg.chat_template),
    )


def settings_from_manifest(manifest: dict) -> TextSettings:
    return TextSettings.from_dict(manifest["text"])


def tokenizer_for_cache(
    manifest: dict, override: str | None, cache_dir, trust_remote_code: bool = False
) -> tuple[object, str]:
    """The cache's tokenizer (or ``override``), refusing one whose content differs from what built the cache."""
    want = manifest.get("tokenizer") or {}
    spec = override or want.get("spec")
    if not spec:
        raise CacheError(f"cache {cache_dir} records no tokenizer; rebuild it with this kdcli")
    if not Path(spec).exists():
        raise UsageError(
            f"the cache's tokenizer {spec} is gone; pass --tokenizer with a copy of it (e.g. the teacher "
            "directory or .gguf file)"
        )
    tok = load_tokenizer(spec, trust_remote_code)
    got = tokenizer_identity(tok, spec)
    if want.get("sha256") and got["sha256"] != want["sha256"]:
        raise CacheError(
            f"tokenizer {spec} differs from the one that built cache {cache_dir} (sha256 "
            f"{got['sha256'][:12]} vs {want['sha256'][:12]}); the token ids would not line up"
        )
    return tok, spec


def check_cache_settings(cfg, settings: TextSettings) -> None:
    """--max-length / --chat-template given with --cache must be the cache's (the student reads its sequences)."""
    if cfg.max_length and cfg.max_length != settings.max_length:
        raise UsageError(
            f"--max-length {cfg.max_length} differs from the cache's {settings.max_length}; drop it "
            "(the student trains on the sequences the cache was built for)"
        )
    if cfg.chat_template and read_chat_template(cfg.chat_template) != settings.chat_template:
        raise UsageError(
            f"--chat-template {cfg.chat_template} differs from the chat template the cache was built "
            "with; drop it (the cache's is used)"
        )


def check_peft_options(cfg) -> str | None:
    """What a --peft run dir will hold ("merged" or "adapter"), None without --peft; refuses inconsistent flags."""
    if cfg.peft is None:
        if cfg.peft_args or cfg.peft_save:
            raise UsageError("--peft-arg/--peft-save configure an adapter: add --peft lora or --peft prompt")
        return None
    if cfg.fsdp:
        raise UsageError("--peft trains a small adapter; it does not combine with --fsdp (use DDP: drop --fsdp)")
    if cfg.peft == "prompt" and cfg.peft_save == "merged":
        raise UsageError(
            "a soft prompt cannot be merged into the weights; drop --peft-save (a prompt-tuned run dir "
            "holds the adapter and names its base)"
        )
    peft_module()  # installed? (exit 2 naming the extra)
    return cfg.peft_save or ("merged" if cfg.peft == "lora" else "adapter")


def pad_id_of(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else 0


def check_batch(batch: dict, data: TokenData, reader: TokenCacheReader) -> None:
    rows = batch["sample_index"]
    bad = np.flatnonzero(data.row_hash[rows] != batch["row_hash"])
    if len(bad):
        raise CacheError(
            f"cache {reader.dir} row {int(batch['row_index'][bad[0]])} was made from different tokens "
            f"than data row {int(rows[bad[0]])}; the cache does not belong to this data"
        )
    if not np.array_equal(data.num_targets[rows], batch["lengths"]):
        raise CacheError(f"cache {reader.dir}: cached positions per row do not match the data's predicted tokens")


def predicted_logits(
    model, data: TokenData, rows: np.ndarray, device: torch.device, batch_size: int = 8, pad_id: int = 0
):
    """Yield ``(start, logits, labels, seconds)`` per batch of ``rows``: the model's float logits (n, V) at the
    batch's predicted positions, their next-token labels (n,), and the forward pass's wall time. Batches with no
    predicted token are skipped. Call under ``torch.no_grad()`` / ``inference_mode()``."""
    for a in range(0, len(rows), batch_size):
        r = rows[a : a + batch_size]
        seqs = [data.ids[i] for i in r]
        ids, mask = pad_batch(seqs, pad_id)
        idx, tgt = loss_positions(seqs, data.first_target[r], ids.shape[1], data.masks(r))
        if not len(idx):
            continue
        t0 = time.perf_counter()
        logits = lm_logits(model, torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
        sel = logits.reshape(-1, logits.shape[-1])[torch.from_numpy(idx).to(device)].float()
        yield a, sel, torch.from_numpy(tgt).to(device), time.perf_counter() - t0


@torch.no_grad()
def perplexity(
    model, data: TokenData, rows: np.ndarray, device: torch.device, batch_size: int = 8, pad_id: int = 0
) -> dict:
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
    return {
        "nll": mean,
        "perplexity": math.exp(min(mean, 700.0)),
        "accuracy": correct / max(tokens, 1),
        "tokens": int(tokens),
    }


def student_loss(
    model,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    idx: torch.Tensor,
    targets: Targets | None,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    divergence: str = "forward",
    beta: float = 0.5,
    fused: bool = True,
    precision: str = "fp32",
    net=None,
    approximate: bool = False,
) -> tuple[LossParts, torch.Tensor]:
    """The training loss over the predicted positions ``idx`` of a (b, L) batch, and how many argmaxes hit the
    label (a tensor on the batch's device: no host sync).

    Forward KL on a student whose logits are ``hidden @ W.T`` (the built-in transformer, a Hugging Face student
    with a plain Linear head: :func:`kdcli.lm.hf.fused_head_weight`) takes the fused path (kdcli.lm.head_loss:
    output layer and loss in chunks, no (tokens, V) logits kept; same value and gradients); other students and
    divergences take ``kd_loss`` on the selected logits, and so does ``fused=False`` (an FSDP-sharded head is only
    whole inside the model's own forward pass). ``net`` is what the forward pass runs through: a DDP wrapper
    around ``LMForward(model)`` under torchrun, so gradients are averaged over ranks; ``model`` is the bare module.
    """
    net = model if net is None else net
    with precision_context(precision, ids.device):
        weight = fused_head_weight(model) if fused and divergence == "forward" else None
        if weight is not None:
            h = lm_hidden(model, ids, mask) if net is model else net(ids, mask, hidden_only=True)  # (b, L, d)
            parts, correct = head_kd_loss(
                h.reshape(-1, h.shape[-1])[idx],
                weight,
                targets,
                labels,
                temperature=temperature,
                alpha=alpha,
                precision=precision,
                approximate=approximate,
            )
            return parts, torch.as_tensor(correct, device=ids.device)
        logits = lm_logits(model, ids, mask, call=net)
    sel = logits.reshape(-1, logits.shape[-1])[idx].float()  # (tokens, V)
    parts = kd_loss(
        sel,
        targets,
        labels,
        temperature=temperature,
        alpha=alpha,
        divergence=divergence,
        beta=beta,
        approximate=approximate,
    )
    return parts, (sel.detach().argmax(-1) == labels).sum()


# -- cache pass ----------------------------------------------------------------------------------------------------


def lm_tokenizer(cfg):
    """(tokenizer, its spec) of ``cache-teacher``'s LM teacher: ``--tokenizer`` or the teacher's own."""
    if (cfg.teacher in BUILTIN_LMS or is_plugin_spec(cfg.teacher)) and not cfg.teacher_weights:
        raise UsageError(
            f"teacher {cfg.teacher!r} has no weights: pass --teacher-weights PATH, a Hugging Face directory or "
            ".gguf file, or a run directory made by `kdcli train-student`"
        )
    tok_spec = cfg.tokenizer or default_tokenizer_spec(cfg.teacher)
    if tok_spec is None:
        raise UsageError(
            f"teacher {cfg.teacher!r} carries no tokenizer; pass --tokenizer (a HF dir, .gguf file or tokenizer.json)"
        )
    return load_tokenizer(tok_spec, cfg.trust_remote_code), tok_spec


def lm_teacher(cfg, tok, tok_spec: str):
    """(model, info) of ``cache-teacher``'s LM teacher, with the plain token cache's checks (a vocabulary that
    covers the tokenizer's): the text cache and ``--generate``'s."""
    model, info = build_lm(
        cfg.teacher,
        cfg.teacher_args,
        vocab_size=len(tok),
        weights=cfg.teacher_weights,
        dtype=cfg.dtype,
        device_map=cfg.teacher_device_map,
        trust_remote_code=cfg.trust_remote_code,
    )
    if len(tok) > info.vocab_size:
        raise CacheError(
            f"vocabulary mismatch: tokenizer {tok_spec} has {len(tok)} tokens but the teacher {cfg.teacher} has "
            f"only {info.vocab_size} logits per token; use the teacher's own tokenizer"
        )
    return model, info


def token_cache_layout(cfg, mode: Mode, V: int):
    """:func:`kdcli.tasks.base.cache_layout` over a vocabulary of V, with a warning where a dense mode is large."""
    out = cache_layout(cfg, mode, V, token=True)
    if not mode.sparse and V > 4096:
        log.warn(
            f"--mode {mode.name} stores {V} fp16 log-probs ({2 * V:,} bytes) per token; --top-k 64 or "
            "--mode sample is ~300x smaller"
        )
    return out


def token_summary_fields(base: CacheSummary, manifest: dict, computed_tokens: float) -> dict:
    """The fields of an :class:`LMCacheSummary` for a complete token cache (``computed_tokens``: this run's)."""
    tokens = int(manifest["data"]["num_targets"])
    bpt = base.bytes / max(tokens, 1)
    V = int(manifest["vocab_size"])
    return dict(
        **vars(base),
        num_tokens=tokens,
        bytes_per_token=bpt,
        tokens_per_second=computed_tokens / max(base.seconds, 1e-9),
        vocab_size=V,
        full_fp16_ratio=2 * V / max(bpt, 1e-9),
    )


def capped_shard_size(
    requested: int, mode: Mode, mode_layout: dict, V: int, tokens_per_row: int, *, spans: bool = False
) -> int:
    """``--shard-size`` capped so one shard of rows of ``tokens_per_row`` cached positions stays under SHARD_BYTES."""
    n_stats = len(mode_layout.get("stat_temperatures") or ())
    per_token = mode.bytes_per_entry(mode_layout, V, n_stats) + 2 + 12 * spans  # + target_logprobs, spans
    return max(1, min(requested, SHARD_BYTES // (per_token * tokens_per_row)))


def capped_batch_size(requested: int, longest: int, V: int, what: str) -> int:
    """``--batch-size`` capped so one teacher pass's logits (b * longest * V floats) stay under LOGIT_BUDGET."""
    b = max(1, min(requested, LOGIT_BUDGET // (longest * V)))
    if b < requested:
        log.info(
            f"teacher batches of {b} {what} (--batch-size {requested} capped so the logits of one pass stay under "
            f"{LOGIT_BUDGET * 4 >> 20} MiB)"
        )
    return b


def token_cache_plan(
    cfg, mode: Mode, V: int, mode_layout: dict, temp_settings: dict, keys, text: TextSettings, teacher_prompt,
    data_kind: str, shard_size: int, load_dtype: str | None,
) -> tuple[dict, dict]:  # fmt: skip
    """(settings, layout) of a token cache's manifest: what makes it this cache, and how its rows are stored."""
    settings = {
        "mode": mode.name,
        "top_k": mode_layout["top_k"],
        "samples": mode_layout["samples"],
        "views": 1,
        "augment": None,
        "seed": cfg.seed if mode.sampled else None,
        "shard_size": shard_size,
        "dtype": cfg.dtype,
        "teacher_prompt": teacher_prompt,
        **text.as_dict(),
        **temp_settings,
    }
    if load_dtype not in (None, "float32"):  # weights stored in bf16/fp16, not only autocast
        settings["weights_dtype"] = cfg.dtype
    layout = {
        "kind": "token",
        "num_classes": V,
        "vocab_size": V,
        **mode_layout,
        "token_keys": list(keys),
        "views": 1,
        "augment": None,
        "aug_param_names": [],
        "shard_size": shard_size,
        "compression": resolve_compression(cfg.compression, token=True, mode=mode.name),
        "text": {**text.as_dict(), "teacher_prompt": teacher_prompt, "data_kind": data_kind},
    }
    return settings, layout


class TokenCacheJob(CacheJob):
    unit = "tokens"

    def __init__(self, cfg, mode: Mode):
        self.cfg, self.mode = cfg, mode
        tok, tok_spec = lm_tokenizer(cfg)
        self.pad_id = pad_id_of(tok)
        self.model, self.info = lm_teacher(cfg, tok, tok_spec)
        self.placed = is_placed(self.model)  # accelerate placed it: the pass must not move it
        self.V = V = self.info.vocab_size
        self.k, self.temperatures, mode_layout, temp_settings = token_cache_layout(cfg, mode, V)
        settings_obj = text_settings(cfg)
        self.teacher_prompt = teacher_prompt = read_template(cfg.teacher_prompt)
        offsets = bool(getattr(tok, "is_fast", False))  # where each token sits in the text (cross-tokenizer students)
        self.data = data = load_text(cfg.data, tok, settings_obj, vocab_size=V, target_masks=True, spans=offsets)
        for note in data.notes:
            log.info(f"note: {note}")
        spans = data.spans is not None  # not for a tokenizer without offsets, nor for pre-tokenized rows (no text)
        xtok, self.vocab_file = cache_record(data) if spans else (None, None)
        if not offsets:
            log.info(f"note: tokenizer {tok_spec} has no offsets: this cache cannot serve a student with another one")
        elif data.kind == "tokens":
            log.info("note: pre-tokenized rows have no text: this cache cannot serve a student with another tokenizer")
        elif not spans:  # load_text's note said why (a vocabulary kdcli cannot spell as text)
            log.info("note: this cache cannot serve a student with another tokenizer")
        self.view = teacher_view(data, tok, teacher_prompt)  # what the teacher reads; the same predicted tokens
        self.t_seqs, self.t_first = self.view.seqs, self.view.first_target
        max_pos = getattr(getattr(self.model, "config", None), "max_position_embeddings", None) or getattr(
            self.model, "max_length", None
        )
        self.longest = longest = max(len(s) for s in self.t_seqs)
        if max_pos and longest > max_pos:
            raise UsageError(
                f"the teacher reads sequences up to {longest} tokens but handles at most {max_pos}; "
                "lower --max-length or shorten --teacher-prompt"
            )
        self.num_rows = data.n
        self.sampled = mode.sampled
        self.shard_size = shard_size = capped_shard_size(
            cfg.shard_size, mode, mode_layout, V, settings_obj.max_length, spans=spans
        )
        self.batch_size = capped_batch_size(cfg.batch_size, longest, V, "sequences")
        keys = token_keys(mode.name, self.temperatures, spans=spans)
        self.token_keys = frozenset(keys)
        settings, layout = token_cache_plan(
            cfg, mode, V, mode_layout, temp_settings, keys, settings_obj, teacher_prompt,
            data.kind, shard_size, self.info.load_dtype
        )  # fmt: skip
        self.layout = layout = {**layout, **({"xtok": xtok} if xtok else {})}
        self.plan = new_manifest(
            teacher=self.info.identity(),
            data=data.identity(),
            settings=settings,
            layout=layout,
            num_rows=data.n,
            tokenizer=tokenizer_identity(tok, tok_spec),
        )

    def units(self, start: int, stop: int) -> int:
        return int(self.data.num_targets[start:stop].sum())

    def describe(self) -> str:
        cfg = self.cfg
        return (
            f"caching teacher {cfg.teacher} ({self.info.num_parameters:,} parameters, vocabulary {self.V}): "
            f"{self.num_rows} sequences, {int(self.data.num_targets.sum()):,} predicted tokens, mode "
            f"{self.mode.name}"
            + self.mode.describe(self.k, token=True)
            + (" (teacher prompt on)" if self.teacher_prompt else "")
            + (f"; weights in {self.info.load_dtype}" if self.info.load_dtype not in (None, "float32") else "")
            + (f"; placed by accelerate ({_placement(self.info.device_map)})" if self.placed else "")
        )

    def forward(self, start, stop, device, generator):
        seqs = self.t_seqs[start:stop]
        ids, mask = pad_batch(seqs, self.pad_id)
        masks = self.view.masks(range(start, stop))
        flat_idx, targets = loss_positions(seqs, self.t_first[start:stop], ids.shape[1], masks)
        lengths = target_counts(seqs, self.t_first[start:stop], masks)
        if not np.array_equal(lengths, self.data.num_targets[start:stop]):  # the teacher's positions = the student's
            raise RuntimeError(f"teacher/student position mismatch at rows {start}..{stop}")
        at = input_device(self.model, device)  # a model spread by accelerate reads on its first device
        logits = lm_logits(self.model, torch.from_numpy(ids).to(at), torch.from_numpy(mask).to(at))
        sel = logits.reshape(-1, logits.shape[-1])[torch.from_numpy(flat_idx).to(logits.device)]  # (tokens, V)
        sel = sel.to(device)  # the reduction runs on --device (a no-op unless the teacher's head sits elsewhere)
        if sel.shape[-1] != self.V:
            raise CacheError(f"the teacher returned {sel.shape[-1]} logits per token, expected {self.V}")
        logp = torch.log_softmax(sel.float(), dim=-1)  # (tokens, V) fp32
        reduced = self.mode.reduce(logp, self.k, generator, self.temperatures)
        tgt = torch.from_numpy(targets).to(device)
        reduced["target_logprobs"] = logp.gather(1, tgt[:, None])[:, 0].to(torch.float16)
        # (rows,) a row is bad if any of its tokens is: summed per row on the device, read with the rest
        token_row = torch.from_numpy(np.repeat(np.arange(len(seqs)), lengths)).to(device)
        bad = (~torch.isfinite(sel).all(dim=1)).to(torch.int32)
        reduced["nonfinite"] = (
            torch.zeros(len(seqs), dtype=torch.int32, device=device).index_add_(0, token_row, bad) > 0
        )
        rows = np.arange(start, stop, dtype=np.int64)
        host = {
            "row_index": rows,
            "sample_index": rows.copy(),
            "row_hash": self.data.row_hash[start:stop],
            "lengths": lengths,
            **(cached_spans(self.data, start, stop) if self.vocab_file else {}),
        }
        return host, reduced

    def storage(self, arrays):
        return self.mode.storage(arrays, self.layout)

    def nonfinite_message(self, row: int) -> str:
        return f"teacher produced NaN/inf logits in row {row} (sequence {row})"

    def files(self) -> dict[str, bytes]:
        return {TEACHER_VOCAB: self.vocab_file} if self.vocab_file else {}

    def summary(self, base: CacheSummary, manifest: dict, computed_units: int) -> LMCacheSummary:
        return LMCacheSummary(**token_summary_fields(base, manifest, computed_units))


def _placement(device_map: dict | None) -> str:
    """{'model.layers.0': '0', ..., 'lm_head': 'cpu'} -> 'cuda:0 12 modules, cpu 3 modules'."""
    counts: dict[str, int] = {}
    for dev in (device_map or {}).values():
        name = f"cuda:{dev}" if str(dev).isdigit() else str(dev)
        counts[name] = counts.get(name, 0) + 1
    if list(device_map or {}) == [""]:
        return f"all on {next(iter(counts))}"
    return ", ".join(f"{d} {n} module{'s' * (n != 1)}" for d, n in counts.items()) or "cpu"


# -- training ------------------------------------------------------------------------------------------------------


class TokenTrainJob(TrainJob):
    unit = "tokens"

    def __init__(self, cfg, alpha: float, reader: TokenCacheReader | None):
        self.cfg, self.alpha, self.reader = cfg, alpha, reader
        if reader is not None:
            settings = settings_from_manifest(reader.manifest)
            check_cache_settings(cfg, settings)
            tok, self.tok_spec = tokenizer_for_cache(reader.manifest, cfg.tokenizer, reader.dir, cfg.trust_remote_code)
            self.V = reader.vocab_size
        else:
            self.tok_spec = cfg.tokenizer or default_tokenizer_spec(cfg.student)
            if self.tok_spec is None:
                raise UsageError(f"training {cfg.student!r} on text without --cache needs --tokenizer")
            tok = load_tokenizer(self.tok_spec, cfg.trust_remote_code)
            settings = TextSettings(
                max_length=cfg.max_length or 512, chat_template=read_chat_template(cfg.chat_template)
            )
            self.V = None
        self.peft_save = check_peft_options(cfg)  # before the run dir is touched
        self.tok, self.pad_id = tok, pad_id_of(tok)
        self.data = data = load_text(cfg.data, tok, settings, vocab_size=self.V or len(tok), target_masks=True)
        for note in data.notes:
            log.info(f"note: {note}")
        if reader is not None:
            reader.check_data(data.identity())
        self.num_samples = data.n

    def build_student(self) -> None:
        cfg, data, V = self.cfg, self.data, self.V
        args = dict(cfg.student_args)
        if cfg.student == "transformer":
            args.setdefault("max_length", max(1024, data.settings.max_length))
        if cfg.student in HF_BUILTINS:
            args.setdefault("max_position_embeddings", max(1024, data.settings.max_length))
            for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
                args.setdefault(name, getattr(self.tok, name, None))
        peft = self.peft_save
        self.model, self.info = build_lm(
            cfg.student, args, vocab_size=V or len(self.tok), trust_remote_code=cfg.trust_remote_code
        )
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model, cfg.student)
        if V is not None and self.info.vocab_size != V:
            raise CacheError(
                f"vocabulary mismatch: the teacher (cache {self.reader.dir}) has {V} logits per token but "
                f"the student {cfg.student} has {self.info.vocab_size}; use a student with the teacher's "
                "vocabulary"
            )
        if self.info.vocab_size < len(self.tok):
            raise UsageError(
                f"the student has {self.info.vocab_size} logits per token but the tokenizer has {len(self.tok)} tokens"
            )
        if is_peft_model(self.model):
            raise UsageError(
                f"student {cfg.student} is a peft adapter run; train its base instead (--student "
                f"{(self.info.source or {}).get('peft', {}).get('base')}), with --peft to train an adapter"
            )
        self.adapter = None
        self.trainable = None
        if peft is not None:
            self.model = add_adapter(self.model, cfg.peft, cfg.peft_args, tokenizer=self.tok, student=cfg.student)
            trainable, total = trainable_counts(self.model)
            self.trainable = trainable
            self.info.num_parameters = total
            log.info(
                f"--peft {cfg.peft}: {trainable:,} trainable of {total:,} parameters "
                f"({100 * trainable / max(total, 1):.2f}%)"
            )
            base = str(Path(cfg.student).resolve()) if Path(cfg.student).exists() else None
            if peft == "adapter" and base is None:
                raise UsageError(
                    f"--peft-save adapter names the adapter's base, but the built-in student "
                    f"{cfg.student!r} has no saved weights; adapt a pretrained student (a Hugging Face "
                    "directory or a run dir) or, for LoRA, --peft-save merged"
                )
            self.adapter = {
                "method": cfg.peft,
                "args": dict(cfg.peft_args),
                "save": peft,
                "base": base,
                "base_sha256": self.info.weights_sha256,
            }
        self.eval_data = None
        if cfg.eval_data:
            self.eval_data = load_text(
                cfg.eval_data, self.tok, data.settings, vocab_size=self.info.vocab_size, target_masks=True
            )

    def forward_module(self, model):
        return LMForward(model)

    def train_units(self, train_samples):
        return int(self.data.num_targets[train_samples].sum())

    def describe(self, train_samples, n_val):
        return (
            f"student {self.cfg.student} ({self.info.num_parameters:,} parameters, vocabulary "
            f"{self.info.vocab_size}); {len(train_samples)} training sequences "
            f"({self.train_units(train_samples):,} predicted tokens), {n_val} validation"
            + (f"; cache mode {self.reader.mode}" if self.reader else "")
            + "; loss averaged over predicted tokens"
        )

    def step(self, net, batch, device, global_step):
        cfg, data = self.cfg, self.data
        rows = batch["sample_index"]
        seqs = [data.ids[i] for i in rows]
        ids, mask = pad_batch(seqs, self.pad_id)
        idx, labels = loss_positions(seqs, data.first_target[rows], ids.shape[1], data.masks(rows))
        targets = None
        if self.reader is not None:
            check_batch(batch, data, self.reader)
            targets = self.reader.targets(batch).to(device)
        y = torch.from_numpy(labels).to(device)
        parts, correct = student_loss(
            self.model,
            torch.from_numpy(ids).to(device),
            torch.from_numpy(mask).to(device),
            torch.from_numpy(idx).to(device),
            targets,
            y,
            temperature=cfg.temperature,
            alpha=self.alpha,
            divergence=cfg.divergence,
            beta=cfg.jsd_beta,
            precision=cfg.precision,
            net=net,
            fused=not cfg.fsdp,
            approximate=cfg.approximate_temperature,
        )
        return parts, correct, len(labels)

    epoch_fields = (
        ("token acc", "train_accuracy", "{:.4f}"),
        ("val ppl", "val_perplexity", "{:.2f}"),
        ("eval ppl", "eval_perplexity", "{:.2f}"),
        ("", "tokens_per_second", "{:,.0f} tokens/s"),
    )

    def heldout_metrics(self, model, val_idx, device):
        out = {}
        if len(val_idx):
            m = perplexity(model, self.data, val_idx, device, pad_id=self.pad_id)
            out.update({"val_perplexity": m["perplexity"], "val_accuracy": m["accuracy"], "val_nll": m["nll"]})
        if self.eval_data is not None:
            m = perplexity(model, self.eval_data, np.arange(self.eval_data.n), device, pad_id=self.pad_id)
            out.update({"eval_perplexity": m["perplexity"], "eval_accuracy": m["accuracy"], "eval_nll": m["nll"]})
        return out

    def save(self, out, model):
        save_lm_run(
            out,
            model,
            self.info,
            tokenizer=self.tok,
            tokenizer_id=tokenizer_identity(self.tok, self.tok_spec),
            text=self.data.settings.as_dict(),
            adapter=self.adapter,
        )

    def summary(self, base: TrainSummary, last: dict, train_units: int) -> LMTrainSummary:
        return LMTrainSummary(
            **vars(base),
            train_tokens=train_units,
            tokens_per_second=last.get("tokens_per_second", 0.0),
            divergence=self.cfg.divergence,
            val_perplexity=last.get("val_perplexity"),
            eval_perplexity=last.get("eval_perplexity"),
            trainable_parameters=self.trainable,
        )


# -- eval ----------------------------------------------------------------------------------------------------------


@dataclass
class LMModelReport(SizeAndSpeed):
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
    bits_per_byte: float | None = None  # NLL over the bytes the predicted tokens cover (kdcli.lm.bpb)


@dataclass
class LMEvalReport:
    data: str
    cache: str | list[str] | None  # the cache, or the fused caches
    temperature: float
    num_sequences: int
    num_tokens: int
    teacher: dict | None  # from the cache: spec, parameters, mode, perplexity (from target_logprobs)
    models: list[LMModelReport]
    failures: list[str]
    kind: str = "lm"
    notes: list[str] = field(default_factory=list)

    def table(self) -> TableData:
        fmt = [
            ("perplexity", lambda m: f"{m.perplexity:.3f}"),
            ("NLL / token", lambda m: f"{m.nll:.4f}"),
            *([("bits per byte", lambda m: bpb_text(m.bits_per_byte))] if self.has_bpb() else []),
            ("next-token accuracy", lambda m: f"{m.accuracy:.4f}"),
        ]
        fmt += teacher_and_size_rows(
            self.cache,
            self.temperature,
            self.models,
            "top-1 agreement w/ teacher",
            "next-token accuracy",
            ("tokens/s (forward)", lambda m: f"{m.tokens_per_second:,.0f}"),
        )
        caption = None
        if self.teacher:
            t = self.teacher
            who = "not recorded (an imported cache)" if t["spec"] is None else t["spec"]
            if t["num_parameters"] is not None:
                who += f", {t['num_parameters']:,} parameters"
            caption = f"teacher (from the cache, {t['mode']}): {who}, perplexity {t['perplexity']:.3f}"
            if t.get("bits_per_byte") is not None:
                caption += f", {t['bits_per_byte']:.4f} bits per byte"
        return metric_table(
            f"eval on {self.data} ({self.num_sequences:,} sequences, {self.num_tokens:,} predicted tokens)",
            self.models,
            fmt,
            caption,
        )

    def has_bpb(self) -> bool:
        return any(m.bits_per_byte is not None for m in self.models)


def bpb_text(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def lm_size_and_speed(model, spec: str, data: TokenData, bs: int, pad_id: int, repeats: int) -> dict:
    """Size and latency fields of an LM eval row: latency on the first batch's rows, padded to its longest (the
    eval pass has just warmed the model up)."""
    lat_ids, _ = pad_batch([data.ids[i] for i in range(min(bs, data.n))], pad_id)  # (b, L)
    return size_and_speed(
        model,
        spec if Path(spec).exists() else None,
        torch.from_numpy(lat_ids),
        len(lat_ids),
        repeats,
        forward=lambda m, ids: lm_logits(m, ids),
        warm=True,
    )


def eval_text_settings(cfg, reader: TokenCacheReader | None) -> tuple[object, TextSettings, int | None]:
    """(tokenizer, text settings, V) for eval: the cache's when there is one, else the first model's."""
    if reader is not None:
        settings = settings_from_manifest(reader.manifest)
        check_cache_settings(cfg, settings)
        tok, _ = tokenizer_for_cache(reader.manifest, cfg.tokenizer, reader.dir, cfg.trust_remote_code)
        return tok, settings, reader.vocab_size
    first = cfg.model[0]
    tok_spec = cfg.tokenizer or default_tokenizer_spec(first)
    if tok_spec is None:
        raise UsageError(f"--model {first!r} carries no tokenizer; pass --tokenizer")
    tok = load_tokenizer(tok_spec, cfg.trust_remote_code)
    if is_lm_run_dir(first):
        settings = TextSettings.from_dict(read_lm_meta(Path(first)).get("text") or {})
    else:
        settings = TextSettings()
    if cfg.chat_template:
        settings.chat_template = read_chat_template(cfg.chat_template)
    if cfg.max_length:
        settings.max_length = cfg.max_length
    return tok, settings, None


class TokenEvalJob(EvalJob):
    """The eval text (and, with a cache, the teacher's perplexity from its target log-probs) prepared once; every
    --model measured the same way: perplexity, next-token accuracy, agreement and KL per predicted token."""

    def __init__(self, cfg: EvalConfig, device: torch.device, reader: TokenCacheReader | None):
        self.cfg, self.device, self.reader = cfg, device, reader
        self.tok, settings, self.V = eval_text_settings(cfg, reader)
        spans = bool(getattr(self.tok, "is_fast", False))  # bits per byte need the bytes each token covers
        self.data = data = load_text(
            cfg.data, self.tok, settings, vocab_size=self.V or len(self.tok), target_masks=True, spans=spans
        )
        self.num_bytes = predicted_bytes(data) if data.spans is not None else None
        if reader is not None:
            reader.check_data(data.identity())
        self.pad_id = pad_id_of(self.tok)
        self.bs = max(1, min(cfg.batch_size, 16))
        self.teacher = None
        if reader is not None:
            nll_t = 0.0
            for a in range(0, data.n, self.bs):
                nll_t -= float(self.cached(a)["target_logprobs"].astype(np.float64).sum())
            n_tok = int(data.num_targets.sum())
            m = reader.manifest
            self.teacher = {
                "spec": m["teacher"].get("spec"),
                "num_parameters": m["teacher"].get("num_parameters"),
                "mode": m["mode"],
                "perplexity": math.exp(min(nll_t / max(n_tok, 1), 700.0)),
                "nll": nll_t / max(n_tok, 1),
                "bits_per_byte": bits_per_byte(nll_t, self.num_bytes) if self.num_bytes else None,
                "teacher_prompt": m.get("text", {}).get("teacher_prompt"),
            }

    def cached(self, a: int) -> dict:
        """The cache's rows [a, a + bs), checked against the data; read again per model, so memory stays flat
        whatever the eval set's size."""
        reader, data, bs = self.reader, self.data, self.bs
        batch = reader.read_rows(a, min(a + bs, data.n))
        if not np.array_equal(batch["sample_index"], np.arange(a, min(a + bs, data.n))):
            raise CacheError(f"cache {reader.dir} rows do not line up with {self.cfg.data}")
        check_batch(batch, data, reader)
        return batch

    unit = "sequences"

    @property
    def num_rows(self) -> int:
        return self.data.n

    def measure(self, spec: str) -> LMModelReport:
        cfg, data, device, reader, V = self.cfg, self.data, self.device, self.reader, self.V
        model, info = build_lm(spec, None, vocab_size=V or len(self.tok), trust_remote_code=cfg.trust_remote_code)
        if V is not None and info.vocab_size != V:
            raise CacheError(
                f"vocabulary mismatch: the teacher (cache {reader.dir}) has {V} logits per token but "
                f"{spec} has {info.vocab_size}"
            )
        model.to(device).eval()
        nll = correct = agree = kl = 0.0
        tokens = 0
        secs = 0.0
        with torch.inference_mode():
            for a, sel, y, dt in predicted_logits(model, data, np.arange(data.n), device, self.bs, self.pad_id):
                secs += dt
                nll += float(F.cross_entropy(sel, y, reduction="sum"))
                correct += float((sel.argmax(-1) == y).sum())
                tokens += len(y)
                if reader is not None:
                    targets = reader.targets(self.cached(a)).to(device)
                    agree += float((sel.argmax(-1) == targets.top1()).sum())
                    kl += float(soft_kl(sel, targets, cfg.temperature, approximate=cfg.approximate_temperature).sum())
                self.advance(min(self.bs, data.n - a))
        mean = nll / max(tokens, 1)
        stats = lm_size_and_speed(model, spec, data, self.bs, self.pad_id, cfg.latency_repeats)
        return LMModelReport(
            model=spec,
            num_tokens=tokens,
            perplexity=math.exp(min(mean, 700.0)),
            nll=mean,
            accuracy=correct / max(tokens, 1),
            agreement=agree / max(tokens, 1) if reader else None,
            kl_to_teacher=kl / max(tokens, 1) if reader else None,
            num_parameters=info.num_parameters,
            weight_bytes=weight_bytes(model),
            tokens_per_second=int(data.lengths.sum()) / max(secs, 1e-9),
            bits_per_byte=bits_per_byte(nll, self.num_bytes) if self.num_bytes else None,
            **stats,
        )

    def report(self, models: list[LMModelReport]) -> LMEvalReport:
        cfg, data = self.cfg, self.data
        return LMEvalReport(
            data=cfg.data,
            cache=cache_label(cfg),
            temperature=cfg.temperature,
            num_sequences=data.n,
            num_tokens=int(data.num_targets.sum()),
            teacher=self.teacher,
            models=models,
            failures=[],
            notes=data.notes,
        )


class TokenTask(Task):
    name = "language model"
    builtin_models = tuple(BUILTIN_LMS)
    accuracy_name = "next-token accuracy"

    def cache_job(self, cfg) -> TokenCacheJob:
        return TokenCacheJob(cfg, cache_mode(cfg))

    def open_cache(self, cache_dir: str) -> TokenCacheReader:
        return TokenCacheReader(cache_dir)

    def train_job(self, cfg, alpha, reader) -> TokenTrainJob:
        return TokenTrainJob(cfg, alpha, reader)

    def eval_job(self, cfg: EvalConfig, device: torch.device, reader: TokenCacheReader | None) -> TokenEvalJob:
        return TokenEvalJob(cfg, device, reader)
