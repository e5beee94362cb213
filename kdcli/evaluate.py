"""evaluate(cfg): models + data (+ cache) -> metrics against the labels and against the cached teacher.

The teacher is never re-run: agreement and KL come from the cache's view-0 rows, which must match the data
(fingerprint and per-row hashes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdcli.cache.reader import CacheReader
from kdcli.config import EvalConfig
from kdcli.data import load_data
from kdcli.errors import CacheError, UsageError
from kdcli.losses import soft_kl, targets_from_arrays
from kdcli.models import build_model, is_run_dir, resolve_device
from kdcli.teacher import teacher_num_classes

ECE_BINS = 15


@dataclass
class ModelReport:
    model: str
    num_samples: int
    accuracy: float
    errors: int
    precision_macro: float
    recall_macro: float
    f1_macro: float
    nll: float
    ece: float
    agreement: float | None
    kl_to_teacher: float | None
    num_parameters: int
    weight_bytes: int
    samples_per_second: float
    reliability: list[dict] = field(default_factory=list)  # per confidence bin: count, confidence, accuracy


@dataclass
class EvalReport:
    data: str
    cache: str | None
    temperature: float
    models: list[ModelReport]
    failures: list[str]


def classification_metrics(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict:
    """Accuracy, macro precision/recall/F1 (over classes present in labels or predictions), NLL, ECE."""
    pred = logits.argmax(1)
    correct = pred == y
    cm = torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes).view(num_classes, num_classes)
    tp = cm.diag().double()
    support, predicted = cm.sum(1).double(), cm.sum(0).double()
    present = (support + predicted) > 0
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp_min(1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12),
                     torch.zeros_like(tp))
    probs = logits.softmax(1)
    conf = probs.max(1).values
    bins = torch.clamp((conf * ECE_BINS).long(), max=ECE_BINS - 1)
    ece = 0.0
    reliability = []
    for b in range(ECE_BINS):
        m = bins == b
        cnt = int(m.sum())
        if cnt:
            c, a = float(conf[m].mean()), float(correct[m].float().mean())
            ece += cnt / len(y) * abs(a - c)
            reliability.append({"bin": b, "count": cnt, "confidence": c, "accuracy": a})
    return {"accuracy": float(correct.float().mean()), "errors": int((~correct).sum()),
            "precision_macro": float(precision[present].mean()), "recall_macro": float(recall[present].mean()),
            "f1_macro": float(f1[present].mean()), "nll": float(F.cross_entropy(logits, y)), "ece": ece,
            "reliability": reliability}


def _load_model(spec: str, num_classes: int | None, input_shape):
    """A run dir, or ``MODEL@WEIGHTS`` for a built-in/plugin model with a weights file."""
    weights = None
    if not is_run_dir(spec) and "@" in spec:
        spec, weights = spec.rsplit("@", 1)
    if not is_run_dir(spec) and weights is None:
        if Path(spec).exists():
            raise UsageError(f"{spec} is not a kdcli run directory (no model.json)")
        raise UsageError(f"--model {spec!r}: give a kdcli run directory, or MODEL@WEIGHTS for a built-in or "
                         "file.py:factory model")
    return build_model(spec, None, num_classes=num_classes, input_shape=input_shape, weights=weights)


def evaluate(cfg: EvalConfig) -> EvalReport:
    from kdcli.lm import is_text_spec

    if is_text_spec(cfg.data):  # JSONL text: language-model metrics
        from kdcli.lm.evaluate import evaluate_lm

        return evaluate_lm(cfg)
    device = resolve_device(cfg.device)
    widths = {teacher_num_classes(m.rsplit("@", 1)[0] if "@" in m else m) for m in cfg.model} - {None}
    if len(widths) > 1:
        raise UsageError(f"the models output different numbers of classes: {sorted(widths)}")
    reader = CacheReader(cfg.cache) if cfg.cache else None
    num_classes = reader.num_classes if reader else (widths.pop() if widths else None)
    data = load_data(cfg.data, num_classes=num_classes)
    targets = None
    if reader is not None:
        reader.check_data(data.identity())
        rows = reader.read_rows(0, data.n)  # view 0 of every sample
        if not np.array_equal(rows["sample_index"], np.arange(data.n)) or not np.array_equal(
                rows["row_hash"], data.row_hash):
            raise CacheError(f"cache {cfg.cache} rows do not line up with {cfg.data}")
        targets = targets_from_arrays(rows, reader.mode, reader.num_classes)
    if cfg.min_agreement is not None and reader is None:
        raise UsageError("--min-agreement needs --cache (the teacher's outputs)")
    reports = []
    for spec in cfg.model:
        model, info = _load_model(spec, data.num_classes, data.input_shape)
        model.to(device).eval()
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = torch.cat([model(data.x[a:a + cfg.batch_size].to(device)).float().cpu()
                                for a in range(0, data.n, cfg.batch_size)])  # (n, C)
        secs = time.perf_counter() - t0
        m = classification_metrics(logits, data.y, data.num_classes)
        agreement = kl = None
        if targets is not None:
            agreement = float((logits.argmax(1) == targets.top1()).float().mean())
            kl = float(soft_kl(logits, targets, cfg.temperature).mean())
        weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        reports.append(ModelReport(model=spec, num_samples=data.n, agreement=agreement, kl_to_teacher=kl,
                                   num_parameters=info.num_parameters, weight_bytes=weight_bytes,
                                   samples_per_second=data.n / max(secs, 1e-9), **m))
    failures = []
    for r in reports:
        if cfg.min_accuracy is not None and r.accuracy < cfg.min_accuracy:
            failures.append(f"{r.model}: accuracy {r.accuracy:.4f} < --min-accuracy {cfg.min_accuracy:g}")
        if cfg.min_agreement is not None and r.agreement < cfg.min_agreement:
            failures.append(f"{r.model}: agreement {r.agreement:.4f} < --min-agreement {cfg.min_agreement:g}")
    return EvalReport(data=cfg.data, cache=cfg.cache, temperature=cfg.temperature, models=reports,
                      failures=failures)
