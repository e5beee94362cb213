"""Distillation losses: pure functions of student logits, cached teacher targets and labels.

    loss = alpha * T^2 * KL(p_teacher^T || q_student^T) + (1 - alpha) * CE(student logits, labels)

Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network": soft targets at temperature T; the
soft term is scaled by T^2 so its gradients keep their size as T changes. T^2 is applied for every alpha (a loss
whose scale jumps when alpha reaches 0 is a trap: see torchdistill's KDLoss). alpha = 1 is pure distillation,
alpha = 0 is plain supervised training.

Notation: the cache stores log-probs at T = 1, ``logp = log p``; the teacher at T is ``q_T = p^(1/T) / Z_T`` with
``Z_T = sum_j p_j^(1/T)`` (so ``log q_T = logp / T - log Z_T``); s_T is the student at T. A sparse cache is exact
or unbiased at the temperatures it *stores* (``Targets.temperatures``; 1 always): at any other T the losses raise
:class:`~kdcli.infra.errors.UsageError` naming the stored ones, unless ``approximate=True``.

What each cache mode assumes about the teacher distribution, and the approximation it makes at an unstored T, is
written in the mode's own file and computed by its targets (:mod:`kdcli.cache.modes`): ``full`` is exact at every
T; ``topk`` is the exact KL on the k + 1 buckets (a lower bound of the full KL); ``sample`` (RS-KD, Anshumann et
al. 2025) and ``priority`` (Duffield, Lund & Thorup 2007) are unbiased estimates. For the estimating modes every
term of the divergence is a sum over the vocabulary of a known function weighted by q_T (or by s_T): the reported
soft value is an unbiased estimate of the full-vocabulary divergence at a stored T (of the cross-entropy part
``-sum_i q_T(i) log s_T(i)``, whose gradient trains, and of the teacher's negative entropy, which only shifts the
value), up to the fp16 rounding of the stored log-probs. Single estimates can be negative.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdcli.cache.modes import check_temperature
from kdcli.cache.modes.base import DIVERGENCES, Targets, fmt_temperatures


def soft_kl(
    student_logits: torch.Tensor,
    targets: Targets,
    temperature: float,
    divergence: str = "forward",
    beta: float = 0.5,
    *,
    approximate: bool = False,
) -> torch.Tensor:
    """(b,) divergence between teacher_T and student_T per row, *without* the T^2 factor.

    ``divergence``: ``forward`` KL(p || q) (Hinton et al. 2015), ``reverse`` KL(q || p) (mode-seeking; MiniLLM,
    Gu et al. 2024), or ``jsd``: the generalised Jensen-Shannon divergence
    ``beta * KL(p || m) + (1 - beta) * KL(q || m)`` with ``m = beta * p + (1 - beta) * q`` (GKD, Agarwal et al.
    2024); ``beta`` in (0, 1) skews it, 0.5 is the symmetric JSD. p is the teacher, q the student, both at T.

    The targets compute it (:meth:`Targets.soft_rows`): exact for full targets, the exact divergence between the
    bucketed distributions for topk (a lower bound on the full-vocabulary value, data-processing inequality),
    unbiased estimates for sample and priority. Sparse targets at a temperature they do not store: UsageError,
    unless ``approximate``.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; use one of {DIVERGENCES}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1); got {beta}")
    T = float(temperature)
    s_log = F.log_softmax(student_logits.float() / T, dim=-1)  # (b, C)
    return targets.soft_rows(s_log, T, divergence, beta, approximate)


@dataclass
class LossParts:
    total: torch.Tensor  # scalar, what is backpropagated
    soft: torch.Tensor  # scalar, T^2 * mean KL (0 when there are no targets)
    hard: torch.Tensor  # scalar, mean CE on labels


def _log_softmax_rows(d: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim of ``d`` whose rows already have their maximum subtracted (so exp cannot
    overflow): ``d - log(sum(exp(d)))``. For a few classes per row this is 4 element-wise ops, cheaper than one
    F.log_softmax call (which costs ~20 us on a (128, 10) tensor, mostly outside the arithmetic)."""
    return d - d.exp().sum(dim=-1, keepdim=True).log()


class _FullForwardKD(torch.autograd.Function):
    """``alpha * T^2 * mean KL(p_T || s_T) + (1 - alpha) * mean CE`` for ``full`` targets and forward KL, with the
    closed-form gradient ``alpha * T / b * (s_T - p_T) + (1 - alpha) / b * (softmax(z) - onehot(y))``.

    The same value and gradient as autograd through :func:`soft_kl` + cross-entropy (tests/test_losses.py pins
    them to float32 rounding), in a fraction of the small ops: for a classifier's (b, 10) logits each op costs more
    in dispatch than in arithmetic, and this loss was most of what a training epoch from a cache paid over a plain
    label epoch (benchmarks/bench_spine.py)."""

    @staticmethod
    def forward(ctx, z, logprobs, labels, T, alpha):  # noqa: D102
        b = max(z.shape[0], 1)
        d = z - z.amax(dim=-1, keepdim=True)  # both student softmaxes share the row maximum
        s_log = _log_softmax_rows(d / T if T != 1.0 else d)
        t = logprobs / T if T != 1.0 else logprobs
        p_log = _log_softmax_rows(t - t.amax(dim=-1, keepdim=True))
        p = p_log.exp()
        # sum_i p_i (log p_i - log s_i); a class of teacher probability 0 (log p = -inf) contributes 0
        soft = torch.vdot(p.reshape(-1), (p_log.clamp_min(-1e30) - s_log).reshape(-1)) * (T * T / b)
        if labels is not None and alpha < 1.0:
            h_log = s_log if T == 1.0 else _log_softmax_rows(d)
            hard = F.nll_loss(h_log, labels, reduction="sum") / b
        else:
            h_log, hard = None, torch.zeros((), dtype=z.dtype, device=z.device)
        ctx.save_for_backward(s_log, p, h_log, labels)
        ctx.T, ctx.alpha, ctx.b = T, alpha, b
        ctx.mark_non_differentiable(soft, hard)
        ctx.set_materialize_grads(False)  # no zero tensors for the two non-differentiable outputs
        return alpha * soft + (1.0 - alpha) * hard, soft, hard

    @staticmethod
    def backward(ctx, grad_total, _gs, _gh):  # noqa: D102
        s_log, p, h_log, labels = ctx.saved_tensors
        g = (s_log.exp() - p).mul_(ctx.alpha * ctx.T / ctx.b)
        if h_log is not None:
            c = (1.0 - ctx.alpha) / ctx.b
            g.add_(h_log.exp(), alpha=c)
            g.scatter_add_(1, labels[:, None], torch.full((len(labels), 1), -c, dtype=g.dtype, device=g.device))
        return g.mul_(grad_total), None, None, None, None


def kd_loss(
    student_logits: torch.Tensor,
    targets: Targets | None,
    labels: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
    weight: torch.Tensor | None = None,
    divergence: str = "forward",
    beta: float = 0.5,
    approximate: bool = False,
) -> LossParts:
    """``alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE(labels)``, averaged over rows.

    ``D`` is forward KL(teacher || student) by default (see :func:`soft_kl` for reverse and jsd); T^2 scales every
    divergence. ``weight`` (b,) optionally masks rows (0/1); if every row is masked the loss is 0, not NaN. For
    language models a "row" is one predicted token. ``approximate``: allow sparse targets at a temperature they do
    not store (module docstring); without it that is a UsageError.
    """
    # Without ``weight`` every row counts once: the sums skip the multiplication by ones (x * 1 == x, so the
    # values and gradients are bit-identical) and the denominator is the row count. Each of these small ops costs
    # more in dispatch than in arithmetic for a classifier's (b, 10) logits: the step of a small student is
    # dominated by their number (benchmarks/bench_spine.py).
    b = student_logits.shape[0]
    if (
        weight is None and targets is not None and targets.dense and divergence == "forward" and alpha > 0
    ):  # the common classifier case: one fused function, closed-form gradient
        total, soft, hard = _FullForwardKD.apply(
            student_logits.float(), targets.logprobs, labels, float(temperature), float(alpha)
        )
        return LossParts(total=total, soft=soft, hard=hard)
    w = None if weight is None else weight.float()
    denom = float(max(b, 1)) if w is None else w.sum().clamp_min(1.0)
    soft = hard = None
    if targets is not None and alpha > 0:
        kl = soft_kl(student_logits, targets, temperature, divergence, beta, approximate=approximate)
        soft = (temperature**2) * (kl if w is None else kl * w).sum() / denom
    if labels is not None and alpha < 1:
        ce = F.cross_entropy(student_logits.float(), labels, reduction="none")
        hard = (ce if w is None else ce * w).sum() / denom
    if soft is None or hard is None:
        zero = student_logits.sum() * 0.0
        soft, hard = (zero if soft is None else soft), (zero if hard is None else hard)
    return LossParts(total=alpha * soft + (1.0 - alpha) * hard, soft=soft, hard=hard)


def describe(
    alpha: float,
    temperature: float,
    has_cache: bool,
    divergence: str = "forward",
    beta: float = 0.5,
    *,
    mode: str | None = None,
    temperatures=None,
    approximate: bool = False,
    note: str = "",
    approximation: str = "",
    term: str | None = None,
) -> str:
    """The resolved loss, printed when training starts; with ``mode`` (and the cache's stored ``temperatures``)
    it also says what the soft term is at T: ``note`` (the mode's: exact, an unbiased estimate ...) at a stored T,
    else the documented ``approximation``. ``term``: the soft term's formula when it is not the divergence's own
    (a cross-tokenizer method)."""
    T = temperature
    if not has_cache or alpha == 0:
        return "loss = CE(student, labels)   [alpha = 0: no teacher term]"
    term = (
        term
        or {
            "forward": "KL(teacher_T || student_T)",
            "reverse": "KL(student_T || teacher_T)",
            "jsd": f"JSD_beta={beta:g}(teacher_T, student_T)",
        }[divergence]
    )
    out = (
        f"loss = {alpha:g} * {T:g}^2 * {term} + {1 - alpha:g} * CE(student, labels)   "
        f"[T = {T:g}; soft weight alpha*T^2 = {alpha * T * T:g}]"
    )
    if mode is None:
        return out
    if check_temperature(mode, temperatures or (1.0,), T, approximate):
        return out + f"   [{mode} cache: {note} at T = {T:g}]"
    return out + (
        f"   [{mode} cache stores T = {fmt_temperatures(sorted({1.0, *temperatures}))}: APPROXIMATE at "
        f"T = {T:g} ({approximation})]"
    )
