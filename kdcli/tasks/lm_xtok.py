"""Language models across tokenizers: ``train-student`` / ``eval`` with ``--cross-tokenizer METHOD``.

The language-model task (:class:`TokenTask`) with one more choice: a student (an eval model) whose tokenizer differs
from the cache's. Without ``--cross-tokenizer`` such a student is refused (exit 2, naming the flag), so nobody gets
a cross-tokenizer loss by accident; with it the student reads DATA with its own tokenizer, packing and max length,
and learns from the cache where the two tokenizations line up (:mod:`kdcli.lm.xtok`, :mod:`kdcli.lm.xtok_loss`;
docs/lm.md, "Any teacher, any student"). Everything else is the one training loop (checkpoints, exact resume, DDP
under torchrun; the epoch's batches are shuffled student rows, :attr:`TrainJob.batches_from_cache`) and the one
eval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdcli.cache.fused import FusedReader
from kdcli.config import EvalConfig, given
from kdcli.infra import log
from kdcli.infra.errors import UsageError
from kdcli.infra.precision import precision_context
from kdcli.lm.align import require_fast, vocab_strings
from kdcli.lm.bpb import bits_per_byte
from kdcli.lm.chat_template import tokenizer_template
from kdcli.lm.hf import (
    build_lm,
    default_tokenizer_spec,
    fused_head_weight,
    is_lm_run_dir,
    lm_hidden,
    lm_logits,
    read_lm_meta,
)
from kdcli.lm.text import (
    TextSettings,
    TokenData,
    load_text,
    load_tokenizer,
    loss_positions,
    pad_batch,
    read_chat_template,
    tokenizer_identity,
)
from kdcli.lm.xtok import (
    CrossTeacher,
    TeacherIndex,
    check_method,
    predicted_bytes,
    require_spans,
)
from kdcli.lm.xtok_loss import (
    Buckets,
    XtokLoss,
    aligned_divergence,
    describe_method,
    top1_agreement,
    uld_distance,
    xtok_kd_loss,
)
from kdcli.models.weights import weight_bytes
from kdcli.tasks.base import EvalJob, cache_label
from kdcli.tasks.lm import (
    LMEvalReport,
    LMModelReport,
    LMTrainSummary,
    TokenTask,
    TokenTrainJob,
    check_peft_options,
    lm_size_and_speed,
    pad_id_of,
    perplexity,
    predicted_logits,
    settings_from_manifest,
)
from kdcli.tasks.reports import TrainSummary

XTOK_ONLY = ("vocab_map", "uld_weight")  # options that configure --cross-tokenizer


def check_xtok_options(cfg) -> None:
    """Refuse (exit 2) options that only configure --cross-tokenizer when it is not given, and --cross-tokenizer
    without a cache."""
    if not cfg.cross_tokenizer:
        for name in XTOK_ONLY:
            if name in given(cfg):
                raise UsageError(
                    f"--{name.replace('_', '-')} configures --cross-tokenizer; add --cross-tokenizer METHOD"
                )
        return
    if not cfg.cache:
        raise UsageError(
            "--cross-tokenizer distils from (measures against) a teacher cache made with another tokenizer: add "
            "--cache CACHE_DIR"
        )
    if "uld_weight" in given(cfg) and cfg.cross_tokenizer != "hybrid":
        raise UsageError("--uld-weight weights the ULD term of --cross-tokenizer hybrid; drop it")
    for name in ("num_workers", "block_rows"):  # train-student: the cache is read per batch of student rows
        if getattr(cfg, name, None):
            raise UsageError(
                f"--{name.replace('_', '-')} sizes how the cache's own rows are streamed; with --cross-tokenizer the "
                "batches are the student's rows and their teacher rows are read per batch: drop it"
            )


def check_same_tokenizer(cfg, reader, model: str, tokenizer: str | None) -> None:
    """Without --cross-tokenizer: refuse (exit 2) a student / eval model whose tokenizer (``tokenizer``, else its
    own) differs from the one that built the cache, naming the flag that distils across tokenizers. A model
    without a tokenizer of its own reads with the cache's, as before."""
    spec = tokenizer or default_tokenizer_spec(model)
    if spec is None or reader is None or isinstance(reader, FusedReader):
        return
    want = reader.manifest.get("tokenizer") or {}
    try:
        tok = load_tokenizer(spec, cfg.trust_remote_code)
    except UsageError:
        if tokenizer:
            raise
        return  # a model directory without tokenizer files: the cache's tokenizer is used
    if not want.get("sha256") or tokenizer_identity(tok, spec)["sha256"] == want["sha256"]:
        return
    x = reader.manifest.get("xtok") or {}
    if x and getattr(tok, "is_fast", False) and vocab_strings(tok, reader.vocab_size).sha256 == x["vocab"]["sha256"]:
        return  # the same vocabulary (a copy whose chat template or special-token names differ)
    what = f"--tokenizer {spec}" if tokenizer else f"{model}'s tokenizer"
    raise UsageError(
        f"{what} differs from the tokenizer that built cache {reader.dir}, so the token ids do not line up; pass "
        "--cross-tokenizer aligned|uld|hybrid to distil across tokenizers (docs/lm.md), or use the teacher's "
        "tokenizer"
    )


def model_tokenizer(cfg, model: str):
    """(spec, tokenizer) of a cross-tokenizer student or eval model: ``--tokenizer``, else its own; it must have
    character offsets (a fast tokenizer)."""
    spec = cfg.tokenizer or default_tokenizer_spec(model)
    if spec is None:
        raise UsageError(
            f"--cross-tokenizer: {model!r} carries no tokenizer; pass --tokenizer with the one it reads text with"
        )
    tok = load_tokenizer(spec, cfg.trust_remote_code)
    require_fast(tok, f"--cross-tokenizer (the tokenizer {spec})")
    return spec, tok


def model_settings(cfg, reader, tok, model: str) -> TextSettings:
    """How a cross-tokenizer model reads DATA: the cache's packing, prompt template and prompt loss (they decide
    which text is predicted); its own max length (--max-length, a run dir's recorded one, else the cache's) and its
    own chat template (--chat-template, else its tokenizer's, else the cache's)."""
    cache = settings_from_manifest(reader.manifest)
    own = TextSettings.from_dict(read_lm_meta(Path(model)).get("text") or {}) if is_lm_run_dir(model) else None
    template = read_chat_template(cfg.chat_template)
    if template is None and not tokenizer_template(tok):
        template = own.chat_template if own is not None and own.chat_template else cache.chat_template
    return TextSettings(
        max_length=cfg.max_length or (own.max_length if own is not None else cache.max_length),
        pack=cache.pack,
        prompt_template=cache.prompt_template,
        prompt_loss=cache.prompt_loss,
        chat_template=template,
    )


def load_model_text(cfg, reader, tok, model: str) -> TokenData:
    """DATA as a cross-tokenizer model reads it (:func:`model_settings`), with every token's span in the text;
    pre-tokenized rows (token ids without their text) are refused: nothing places their tokens in the text."""
    data = load_text(cfg.data, tok, model_settings(cfg, reader, tok, model), target_masks=True, spans=True)
    if data.spans is None:
        raise UsageError(
            f"--cross-tokenizer: {cfg.data} holds pre-tokenized rows (token ids without their text); give the text "
            "rows the cache was made from"
        )
    return data


def cross_student_loss(
    model, ids, mask, idx, targets, aligned, labels, spec: XtokLoss, *, precision: str, net, fused: bool
):
    """The cross-tokenizer training loss over the predicted positions ``idx`` of a (b, L) batch, and the number of
    argmaxes that hit the label. A student whose logits are ``hidden @ W.T`` takes the chunked output layer
    (:func:`~kdcli.lm.xtok_loss.xtok_kd_loss` with ``hidden``: no (tokens, V) logits kept); others, and
    ``fused=False`` (an FSDP-sharded head), the logits of their own forward pass. ``net``: the forward pass runs
    through it (DDP)."""
    net = model if net is None else net
    with precision_context(precision, ids.device):
        weight = fused_head_weight(model) if fused else None
        if weight is not None:
            h = lm_hidden(model, ids, mask) if net is model else net(ids, mask, hidden_only=True)  # (b, L, d)
            return xtok_kd_loss(
                None, targets, aligned, labels, spec, hidden=h.reshape(-1, h.shape[-1])[idx], weight=weight
            )
        logits = lm_logits(model, ids, mask, call=net)
    sel = logits.reshape(-1, logits.shape[-1])[idx].float()  # (tokens, V)
    return xtok_kd_loss(sel, targets, aligned, labels, spec)


# -- training ------------------------------------------------------------------------------------------------------


@dataclass
class CrossTrainSummary(LMTrainSummary):
    cross_tokenizer: str = ""
    aligned_share: float = 0.0  # of the student's predicted training tokens
    vocab_map: dict | None = None  # VocabMap.summary()

    def count_rows(self) -> list[tuple[str, str]]:
        v = self.vocab_map or {}
        return super().count_rows() + [
            (
                "cross-tokenizer",
                f"{self.cross_tokenizer}: {self.aligned_share:.1%} of the student's tokens aligned, "
                f"{v.get('num_matched', 0):,} shared strings",
            )
        ]


class CrossTokenTrainJob(TokenTrainJob):
    """``train-student --cross-tokenizer``: the student's own rows, the teacher's targets where they align."""

    batches_from_cache = False

    def __init__(self, cfg, alpha: float, reader):
        self.cfg, self.alpha, self.reader = cfg, alpha, reader
        require_spans(reader)
        check_method(cfg.cross_tokenizer, reader.mode, cfg.divergence, isinstance(reader, FusedReader))
        self.tok_spec, tok = model_tokenizer(cfg, cfg.student)
        self.peft_save = check_peft_options(cfg)  # before the run dir is touched
        self.tok, self.pad_id = tok, pad_id_of(tok)
        self.V = None  # the student's own vocabulary
        self.data = data = load_model_text(cfg, reader, tok, cfg.student)
        for note in data.notes:
            log.info(f"note: {note}")
        self.num_samples = data.n
        self.teacher: CrossTeacher | None = None
        self.aligned = None
        self._buckets: dict = {}

    def build_student(self) -> None:
        super().build_student()
        if self.teacher is None:  # (FSDP rebuilds the student at the end to save it: the teacher stays)
            cfg = self.cfg
            student = vocab_strings(self.tok, self.info.vocab_size)
            self.teacher = CrossTeacher(self.reader, self.data, student, project=cfg.vocab_map == "prefix")

    def spec(self, device: torch.device) -> XtokLoss:
        cfg = self.cfg
        b = self._buckets.get(device)
        if b is None:
            b = self._buckets[device] = Buckets.of(self.teacher.vmap, device)
        return XtokLoss(
            cfg.cross_tokenizer,
            b,
            cfg.temperature,
            self.alpha,
            divergence=cfg.divergence,
            beta=cfg.jsd_beta,
            uld_weight=cfg.uld_weight,
            approximate=cfg.approximate_temperature,
        )

    @property
    def soft_term(self) -> str:
        """The soft term of the printed loss: the method's, summed over the aligned positions only."""
        cfg = self.cfg
        kl = {"forward": "KL(teacher_T || student_T)", "reverse": "KL(student_T || teacher_T)"}.get(
            cfg.divergence, f"JSD_beta={cfg.jsd_beta:g}(teacher_T, student_T)"
        )
        return {
            "aligned": f"{kl}[string buckets]",
            "uld": "ULD(teacher_T, student_T)",
            "hybrid": f"({kl}[string buckets] + {cfg.uld_weight:g} * ULD[rest])",
        }[cfg.cross_tokenizer] + "@aligned"

    def describe(self, train_samples, n_val):
        cfg = self.cfg
        a, n = self.aligned = self.teacher.aligned_share(train_samples)
        v = self.teacher.vmap.summary()
        return (
            super().describe(train_samples, n_val)
            + f"; --cross-tokenizer {cfg.cross_tokenizer} ({describe_method(cfg.cross_tokenizer, self.reader.mode)}), "
            f"{cfg.vocab_map} vocabulary map: {v['num_matched']:,} shared strings "
            f"({v['student_matched_share']:.1%} of the student's ids, {v['teacher_matched_share']:.1%} of the "
            f"teacher's); {a / max(n, 1):.1%} of the student's predicted tokens align with a cached position "
            "(the rest train on the labels only)"
        )

    def step(self, net, batch, device, global_step):
        cfg, data = self.cfg, self.data
        rows = batch["sample_index"]
        seqs = [data.ids[i] for i in rows]
        ids, mask = pad_batch(seqs, self.pad_id)
        idx, labels = loss_positions(seqs, data.first_target[rows], ids.shape[1], data.masks(rows))
        targets = aligned = None
        if self.alpha > 0:
            xb = self.teacher.batch(rows)
            if len(xb.aligned):
                targets = self.reader.targets(xb.arrays).to(device)
                aligned = torch.from_numpy(xb.aligned).to(device)
        parts, correct = cross_student_loss(
            self.model,
            torch.from_numpy(ids).to(device),
            torch.from_numpy(mask).to(device),
            torch.from_numpy(idx).to(device),
            targets,
            aligned,
            torch.from_numpy(labels).to(device),
            self.spec(device),
            precision=cfg.precision,
            net=net,
            fused=not cfg.fsdp,
        )
        return parts, correct, len(labels)

    epoch_fields = (
        TokenTrainJob.epoch_fields[:2]
        + (("val bpb", "val_bits_per_byte", "{:.4f}"),)
        + (TokenTrainJob.epoch_fields[2:])
    )

    def heldout_metrics(self, model, val_idx, device):
        out = super().heldout_metrics(model, val_idx, device)
        if len(val_idx):
            m = perplexity(model, self.data, val_idx, device, pad_id=self.pad_id)
            out["val_bits_per_byte"] = bits_per_byte(m["nll"] * m["tokens"], predicted_bytes(self.data, val_idx))
        return out

    def summary(self, base: TrainSummary, last: dict, train_units: int) -> CrossTrainSummary:
        a, n = self.aligned or (0, 1)
        lm = super().summary(base, last, train_units)
        return CrossTrainSummary(
            **vars(lm),
            cross_tokenizer=self.cfg.cross_tokenizer,
            aligned_share=a / max(n, 1),
            vocab_map=self.teacher.vmap.summary(),
        )


# -- eval ----------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class CrossModelReport(LMModelReport):
    """An eval model measured across tokenizers: ``agreement`` and ``kl_to_teacher`` are means over the aligned
    positions (where the two tokenizations share a boundary), on the buckets of the vocabulary map."""

    tokenizer: str
    aligned_share: float  # of the model's predicted tokens
    teacher_aligned_share: float  # of the cache's positions
    uld_to_teacher: float | None = None  # mean ULD on aligned positions (--cross-tokenizer uld / hybrid)
    shared_strings: int = 0


@dataclass
class CrossEvalReport(LMEvalReport):
    cross_tokenizer: str = ""

    def table(self):
        t = super().table()
        extra = [
            [
                "aligned share (model / teacher tokens)",
                *[f"{m.aligned_share:.4f} / {m.teacher_aligned_share:.4f}" for m in self.models],
            ],
            ["shared token strings", *[f"{m.shared_strings:,}" for m in self.models]],
        ]
        if any(m.uld_to_teacher is not None for m in self.models):
            extra.append(["ULD on aligned positions", *[f"{m.uld_to_teacher:.4f}" for m in self.models]])
        rows = [list(r) for r in t.rows]
        for r in rows:
            if r[0].startswith("top-1 agreement"):
                r[0] = "top-1 agreement (aligned positions)"
            elif r[0].startswith("KL(teacher"):
                r[0] += " (aligned)"
        at = next((i for i, r in enumerate(rows) if r[0].startswith("top-1 agreement")), len(rows))
        t.rows = rows[:at] + extra + rows[at:]
        t.title = (
            f"eval on {self.data} across tokenizers (--cross-tokenizer {self.cross_tokenizer}; the cache: "
            f"{self.num_sequences:,} sequences, {self.num_tokens:,} predicted teacher tokens)"
        )
        return t


class CrossTokenEvalJob(EvalJob):
    """``eval --cross-tokenizer``: the teacher's bits per byte from the cache (its target log-probs and spans),
    then every --model on DATA read with its own tokenizer: perplexity, bits per byte, the share of its tokens that
    align, and on those KL, top-1 agreement (and ULD) against the cache."""

    unit = "sequences"

    def __init__(self, cfg: EvalConfig, device: torch.device, reader):
        self.cfg, self.device, self.reader = cfg, device, reader
        require_spans(reader)
        check_method(cfg.cross_tokenizer, reader.mode, "forward", isinstance(reader, FusedReader))
        for spec in cfg.model:  # every model's tokenizer, before anything is measured
            model_tokenizer(cfg, spec)
        reader.read_spans = True
        self.index = TeacherIndex.build(reader)
        nll = 0.0
        nbytes = 0
        for a in range(0, reader.num_rows, 256):
            rows = reader.read_rows(a, min(a + 256, reader.num_rows))
            nll -= float(rows["target_logprobs"].astype(np.float64).sum())
            nbytes += int((rows["span_end"].astype(np.int64) - rows["span_start"]).sum())
        n_tok = self.index.num_positions
        m = reader.manifest
        self.teacher = {
            "spec": m["teacher"].get("spec"),
            "num_parameters": m["teacher"].get("num_parameters"),
            "mode": m["mode"],
            "perplexity": math.exp(min(nll / max(n_tok, 1), 700.0)),
            "nll": nll / max(n_tok, 1),
            "bits_per_byte": bits_per_byte(nll, nbytes),
            "bytes": nbytes,
            "teacher_prompt": m.get("text", {}).get("teacher_prompt"),
        }
        self.bs = max(1, min(cfg.batch_size, 16))
        self.notes: list[str] = []
        self.rows_per_model = reader.num_rows  # progress: the cache's rows (each model's own count differs)

    @property
    def num_rows(self) -> int:
        return self.rows_per_model

    def measure(self, spec: str) -> CrossModelReport:
        cfg, device, reader = self.cfg, self.device, self.reader
        tok_spec, tok = model_tokenizer(cfg, spec)
        data = load_model_text(cfg, reader, tok, spec)
        self.notes += [n for n in data.notes if n not in self.notes]
        model, info = build_lm(spec, None, vocab_size=len(tok), trust_remote_code=cfg.trust_remote_code)
        teacher = CrossTeacher(
            reader, data, vocab_strings(tok, info.vocab_size), project=cfg.vocab_map == "prefix", index=self.index
        )
        b = Buckets.of(teacher.vmap, device)
        model.to(device).eval()
        nll = correct = kl = agree = uld = 0.0
        tokens = aligned = 0
        secs = 0.0
        rows = np.arange(data.n)
        uses_uld = cfg.cross_tokenizer in ("uld", "hybrid")
        done = 0
        with torch.inference_mode():
            for a, sel, y, dt in predicted_logits(model, data, rows, device, self.bs, pad_id_of(tok)):
                secs += dt
                nll += float(F.cross_entropy(sel, y, reduction="sum"))
                correct += float((sel.argmax(-1) == y).sum())
                tokens += len(y)
                xb = teacher.batch(rows[a : a + self.bs])
                if len(xb.aligned):
                    targets = reader.targets(xb.arrays).to(device)
                    z = sel[torch.from_numpy(xb.aligned).to(device)]
                    T, approx = cfg.temperature, cfg.approximate_temperature
                    kl += float(aligned_divergence(z, targets, b, T, approximate=approx).sum())
                    agree += float(top1_agreement(z, targets, b).sum())
                    if uses_uld:
                        uld += float(uld_distance(z, targets, T, approximate=approx).sum())
                    aligned += len(xb.aligned)
                # progress in the cache's rows: this model's share, spread over its own rows
                now = reader.num_rows * min(a + self.bs, data.n) // data.n
                self.advance(now - done)
                done = now
        self.advance(reader.num_rows - done)
        mean = nll / max(tokens, 1)
        stats = lm_size_and_speed(model, spec, data, self.bs, pad_id_of(tok), cfg.latency_repeats)
        return CrossModelReport(
            model=spec,
            num_tokens=tokens,
            perplexity=math.exp(min(mean, 700.0)),
            nll=mean,
            accuracy=correct / max(tokens, 1),
            agreement=agree / max(aligned, 1),
            kl_to_teacher=kl / max(aligned, 1),
            num_parameters=info.num_parameters,
            weight_bytes=weight_bytes(model),
            tokens_per_second=int(data.lengths.sum()) / max(secs, 1e-9),
            bits_per_byte=bits_per_byte(nll, predicted_bytes(data)),
            tokenizer=tok_spec,
            aligned_share=aligned / max(tokens, 1),
            teacher_aligned_share=aligned / max(self.index.num_positions, 1),
            uld_to_teacher=uld / max(aligned, 1) if uses_uld else None,
            shared_strings=teacher.vmap.num_matched,
            **stats,
        )

    def report(self, models: list[CrossModelReport]) -> CrossEvalReport:
        cfg = self.cfg
        return CrossEvalReport(
            data=cfg.data,
            cache=cache_label(cfg),
            temperature=cfg.temperature,
            num_sequences=self.reader.num_rows,
            num_tokens=self.index.num_positions,
            teacher=self.teacher,
            models=models,
            failures=[],
            notes=self.notes,
            cross_tokenizer=cfg.cross_tokenizer,
        )


# -- the task ------------------------------------------------------------------------------------------------------


class CrossTokenTask(TokenTask):
    """The language-model task, choosing the cross-tokenizer jobs for ``--cross-tokenizer`` (and refusing a student
    or eval model with another tokenizer without it)."""

    def train_job(self, cfg, alpha, reader):
        check_xtok_options(cfg)
        if cfg.cross_tokenizer:
            return CrossTokenTrainJob(cfg, alpha, reader)
        check_same_tokenizer(cfg, reader, cfg.student, cfg.tokenizer)
        return super().train_job(cfg, alpha, reader)

    def eval_job(self, cfg: EvalConfig, device: torch.device, reader):
        check_xtok_options(cfg)
        if cfg.cross_tokenizer:
            return CrossTokenEvalJob(cfg, device, reader)
        for spec in cfg.model:
            check_same_tokenizer(cfg, reader, spec, cfg.tokenizer)
        return super().eval_job(cfg, device, reader)
