"""Distillation losses: pure functions of student logits, cached teacher targets and labels.

    loss = alpha * T^2 * KL(p_teacher^T || q_student^T) + (1 - alpha) * CE(student logits, labels)

Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network": soft targets at temperature T; the
soft term is scaled by T^2 so its gradients keep their size as T changes. T^2 is applied for every alpha (a loss
whose scale jumps when alpha reaches 0 is a trap: see torchdistill's KDLoss). alpha = 1 is pure distillation,
alpha = 0 is plain supervised training.

What each cache mode assumes about the teacher distribution (the cache stores log-probs at T = 1):

- ``full``: exact. ``softmax(logp / T) == softmax(z / T)``.
- ``topk``: the k stored classes plus one *tail bucket* holding the rest of the mass, exactly
  ``exp(tail_logmass)`` at T = 1. For T != 1 the tail's shape is unknown; it is assumed spread evenly over the
  C - k other classes (the maximum-entropy choice), which gives the tempered bucket a log-weight of
  ``log(C - k) + (tail_logmass - log(C - k)) / T``. The student is compared on the same k + 1 buckets, its tail
  bucket being its own mass outside the teacher's top k. At T = 1 this is the exact KL between the two bucketed
  distributions (a lower bound on the full KL that tends to it as the tail shrinks).
- ``sample``: ids drawn from the teacher at T = 1 with counts (Anshumann et al. 2025, "Sparse Logit Sampling",
  RS-KD). At T = 1 the weights ``counts / draws`` make the loss an unbiased estimate of the full KL. For T != 1
  the draws are reweighted by ``p^(1/T - 1)`` and self-normalised (consistent, slightly biased for few draws).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Targets:
    """Cached teacher targets for a batch of rows (any of the three modes), on the student's device."""

    mode: str
    num_classes: int
    logprobs: torch.Tensor | None = None  # full: (b, C)
    ids: torch.Tensor | None = None  # topk / sample: (b, k) int64
    id_logprobs: torch.Tensor | None = None  # topk / sample: (b, k) teacher log-prob of each id (T = 1)
    tail_logmass: torch.Tensor | None = None  # topk: (b,)
    counts: torch.Tensor | None = None  # sample: (b, k) draw counts, 0 for unused slots

    def to(self, device: torch.device) -> "Targets":
        moved = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items()}
        return Targets(**moved)

    def top1(self) -> torch.Tensor:
        """(b,) the teacher's most likely class (for sample mode: the most drawn id)."""
        if self.mode == "full":
            return self.logprobs.argmax(dim=-1)
        if self.mode == "topk":
            return self.ids[:, 0]
        return torch.gather(self.ids, 1, self.counts.argmax(dim=-1, keepdim=True)).squeeze(1)


def targets_from_arrays(arrays: dict, mode: str, num_classes: int) -> Targets:
    """Build :class:`Targets` from the numpy arrays a cache reader returns (ids widened to int64)."""
    t = lambda k: torch.from_numpy(arrays[k])  # noqa: E731
    if mode == "full":
        return Targets(mode, num_classes, logprobs=t("logprobs").float())
    if mode == "topk":
        return Targets(mode, num_classes, ids=t("topk_ids").long(), id_logprobs=t("topk_logprobs").float(),
                       tail_logmass=t("tail_logmass").float())
    return Targets(mode, num_classes, ids=t("sample_ids").long(), id_logprobs=t("sample_logprobs").float(),
                   counts=torch.from_numpy(arrays["sample_counts"].astype("float32")))


def _kl_rows(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """sum_i p_i (log p_i - log q_i) per row, with 0 * log 0 = 0."""
    p = p_log.exp()
    terms = torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p))
    return terms.sum(dim=-1)


DIVERGENCES = ("forward", "reverse", "jsd")


def _div_rows(p_log: torch.Tensor, q_log: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """Divergence per row between two normalised distributions given as log-probs (teacher p, student q)."""
    if divergence == "forward":
        return _kl_rows(p_log, q_log)
    if divergence == "reverse":
        return _kl_rows(q_log, p_log)
    m_log = torch.logaddexp(p_log + math.log(beta), q_log + math.log(1.0 - beta))  # log(beta*p + (1-beta)*q)
    return beta * _kl_rows(p_log, m_log) + (1.0 - beta) * _kl_rows(q_log, m_log)


def topk_bucket_logprobs(id_logprobs: torch.Tensor, tail_logmass: torch.Tensor, num_classes: int,
                         temperature: float) -> torch.Tensor:
    """The teacher's (b, k + 1) bucket log-probs at T: its k ids and one tail bucket (module docstring)."""
    T = float(temperature)
    m = num_classes - id_logprobs.shape[1]
    if m > 0:
        tail_w = math.log(m) + (tail_logmass - math.log(m)) / T  # (b,) tempered weight of the tail bucket
    else:
        tail_w = torch.full_like(tail_logmass, float("-inf"))
    return F.log_softmax(torch.cat([id_logprobs / T, tail_w[:, None]], dim=1), dim=1)


def sample_weights(counts: torch.Tensor, id_logprobs: torch.Tensor,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w, p_log, used, n)`` for (b, S) draws: the self-normalised weight of each drawn id (``counts / draws`` at
    T = 1, reweighted by ``p^(1/T - 1)`` otherwise; 0 on unused slots), log p_T at each drawn id, which slots hold a
    draw, and the number of draws per row (b, 1)."""
    T = float(temperature)
    used = counts > 0
    neg_inf = torch.full_like(id_logprobs, float("-inf"))
    logw = torch.where(used, torch.log(counts.clamp_min(1e-30)) + id_logprobs * (1.0 / T - 1.0), neg_inf)
    w = torch.softmax(logw, dim=1)
    # log Z_T = log E_{j~p}[p_j^(1/T - 1)], estimated from the same draws (exactly 0 at T = 1)
    n = counts.sum(dim=1, keepdim=True)
    log_z = torch.logsumexp(logw, dim=1) - torch.log(n[:, 0])
    return w, id_logprobs / T - log_z[:, None], used, n


def soft_kl(student_logits: torch.Tensor, targets: Targets, temperature: float, divergence: str = "forward",
            beta: float = 0.5) -> torch.Tensor:
    """(b,) divergence between teacher_T and student_T per row, *without* the T^2 factor.

    ``divergence``: ``forward`` KL(p || q) (Hinton et al. 2015), ``reverse`` KL(q || p) (mode-seeking; MiniLLM,
    Gu et al. 2024), or ``jsd``: the generalised Jensen-Shannon divergence
    ``beta * KL(p || m) + (1 - beta) * KL(q || m)`` with ``m = beta * p + (1 - beta) * q`` (GKD, Agarwal et al.
    2024); ``beta`` in (0, 1) skews it, 0.5 is the symmetric JSD. p is the teacher, q the student, both at T.

    ``full``: exact. ``topk``: the exact divergence between the teacher's and the student's (k + 1)-bucket
    distributions (the k ids + one tail bucket; see the module docstring): a lower bound on the full-vocabulary
    value for all three (data-processing inequality), equal when the tail is empty. ``sample``: an unbiased
    estimate at T = 1 for all three. Forward KL averages ``log p - log q`` over the draws; the student-side terms of
    reverse KL and JSD, sums over q, are split into the exact student entropy (over the whole vocabulary) and an
    importance-weighted estimate ``E_{j~p}[(q_j / p_j) g(j)] = sum_j q_j g(j)`` from the same draws.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; use one of {DIVERGENCES}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1); got {beta}")
    T = float(temperature)
    s_log = F.log_softmax(student_logits.float() / T, dim=-1)  # (b, C)
    if targets.mode == "full":
        p_log = F.log_softmax(targets.logprobs / T, dim=-1)
        return _div_rows(p_log, s_log, divergence, beta)
    if targets.mode == "topk":
        p_log = topk_bucket_logprobs(targets.id_logprobs, targets.tail_logmass, targets.num_classes, T)  # (b, k+1)
        s_top = torch.gather(s_log, 1, targets.ids)  # (b, k)
        s_tail = torch.logsumexp(s_log.scatter(1, targets.ids, float("-inf")), dim=1)  # (b,)
        return _div_rows(p_log, torch.cat([s_top, s_tail[:, None]], dim=1), divergence, beta)
    if targets.mode == "sample":
        c = targets.counts  # (b, S)
        lp = targets.id_logprobs  # (b, S) teacher log-prob at T = 1 of each drawn id
        w, p_log, used, n = sample_weights(c, lp, T)  # (b, S) weights and log p_T at each drawn id
        s_at = torch.gather(s_log, 1, targets.ids)  # (b, S) log q_T at each drawn id
        zero = torch.zeros_like(w)
        if divergence == "forward":
            return torch.where(used, w * (p_log - s_at), zero).sum(dim=1)
        # importance weights for sums over the student: (counts / draws) * q_T(j) / p(j), p at T = 1 (the sampler)
        iw = torch.where(used, (c / n) * torch.exp(s_at - lp), zero)  # (b, S)
        neg_entropy = (s_log.exp() * s_log).sum(dim=1)  # (b,) sum_j q_j log q_j, exact over the vocabulary
        if divergence == "reverse":  # sum_j q_j log q_j - sum_j q_j log p_j
            return neg_entropy - torch.where(used, iw * p_log, zero).sum(dim=1)
        m_at = torch.logaddexp(p_log + math.log(beta), s_at + math.log(1.0 - beta))  # (b, S) log m at each id
        kl_pm = torch.where(used, w * (p_log - m_at), zero).sum(dim=1)
        kl_qm = neg_entropy - torch.where(used, iw * m_at, zero).sum(dim=1)
        return beta * kl_pm + (1.0 - beta) * kl_qm
    raise ValueError(f"unknown target mode {targets.mode!r}")


@dataclass
class LossParts:
    total: torch.Tensor  # scalar, what is backpropagated
    soft: torch.Tensor  # scalar, T^2 * mean KL (0 when there are no targets)
    hard: torch.Tensor  # scalar, mean CE on labels


def kd_loss(student_logits: torch.Tensor, targets: Targets | None, labels: torch.Tensor | None, *,
            temperature: float, alpha: float, weight: torch.Tensor | None = None, divergence: str = "forward",
            beta: float = 0.5) -> LossParts:
    """``alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE(labels)``, averaged over rows.

    ``D`` is forward KL(teacher || student) by default (see :func:`soft_kl` for reverse and jsd); T^2 scales every
    divergence. ``weight`` (b,) optionally masks rows (0/1); if every row is masked the loss is 0, not NaN. For
    language models a "row" is one predicted token.
    """
    b = student_logits.shape[0]
    w = torch.ones(b, device=student_logits.device) if weight is None else weight.float()
    denom = w.sum().clamp_min(1.0)
    zero = student_logits.sum() * 0.0
    soft = zero
    if targets is not None and alpha > 0:
        soft = (temperature ** 2) * (soft_kl(student_logits, targets, temperature, divergence, beta) * w).sum() / denom
    hard = zero
    if labels is not None and alpha < 1:
        hard = (F.cross_entropy(student_logits.float(), labels, reduction="none") * w).sum() / denom
    return LossParts(total=alpha * soft + (1.0 - alpha) * hard, soft=soft, hard=hard)


def describe(alpha: float, temperature: float, has_cache: bool, divergence: str = "forward",
             beta: float = 0.5) -> str:
    """The resolved loss, printed when training starts."""
    T = temperature
    if not has_cache or alpha == 0:
        return "loss = CE(student, labels)   [alpha = 0: no teacher term]"
    term = {"forward": "KL(teacher_T || student_T)", "reverse": "KL(student_T || teacher_T)",
            "jsd": f"JSD_beta={beta:g}(teacher_T, student_T)"}[divergence]
    return (f"loss = {alpha:g} * {T:g}^2 * {term} + {1 - alpha:g} * CE(student, labels)   "
            f"[T = {T:g}; soft weight alpha*T^2 = {alpha * T * T:g}]")
