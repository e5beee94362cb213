"""Distillation losses: pure functions of student logits, cached teacher targets and labels.

    loss = alpha * T^2 * KL(p_teacher^T || q_student^T) + (1 - alpha) * CE(student logits, labels)

Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network": soft targets at temperature T; the
soft term is scaled by T^2 so its gradients keep their size as T changes. T^2 is applied for every alpha (a loss
whose scale jumps when alpha reaches 0 is a trap: see torchdistill's KDLoss). alpha = 1 is pure distillation,
alpha = 0 is plain supervised training.

Notation: the cache stores log-probs at T = 1, ``logp = log p``; the teacher at T is ``q_T = p^(1/T) / Z_T`` with
``Z_T = sum_j p_j^(1/T)`` (so ``log q_T = logp / T - log Z_T``); s_T is the student at T. A sparse cache is exact
or unbiased at the temperatures it *stores* (``Targets.temperatures``; 1 always): at any other T the losses raise
:class:`~kdcli.errors.UsageError` naming the stored ones, unless ``approximate=True`` (the approximations below).
What each cache mode assumes about the teacher distribution:

- ``full``: exact at every T. ``softmax(logp / T) == softmax(z / T)``.
- ``topk``: the k stored classes plus one *tail bucket* holding the rest of the mass; the student is compared on
  the same k + 1 buckets, its tail bucket being its own mass outside the teacher's top k. This is the exact KL
  between the two bucketed distributions (a lower bound on the full KL, data-processing inequality, that tends to
  it as the tail shrinks) at every stored T: the cache holds the true tempered tail mass
  ``tail_T = 1 - sum_{i in top k} q_T(i)`` (``tail_logmass_t``), and the k buckets share the rest in proportion to
  ``p_i^(1/T)``. At T = 1 the tail is ``exp(tail_logmass)``.
  *Approximation* (unstored T, ``approximate=True``; what every T != 1 used before temperatures were stored): the
  T = 1 tail mass m is assumed spread evenly over the C - k other classes (the maximum-entropy choice), giving the
  tempered tail bucket a log-weight of ``log(C - k) + (log m - log(C - k)) / T``. Far off for T > 1 on large
  vocabularies: 0.448 against an exact bucketed 0.630 on a 200-class teacher at T = 2 (issue 13, via the CLI).
- ``sample`` (RS-KD, Anshumann et al. 2025, "Sparse Logit Sampling"): n draws from p (T = 1) with counts c_j.
  For any f, ``sum_j (c_j / n) * (q_T(j) / p_j) * f(j)`` is an unbiased estimate of ``sum_i q_T(i) f(i)``
  (importance sampling, no self-normalisation), and the cache stores ``log Z_T`` (``sample_logz_t``) so that
  ``q_T(j) / p_j = exp(logp_j * (1/T - 1) - log Z_T)`` is known exactly. At T = 1 the weights are c_j / n.
  *Approximation* (unstored T): the same weights with Z_T estimated from the draws and the weights normalised
  to sum to 1 (``w ~ c_j p_j^(1/T - 1)``): consistent but biased for a few dozen draws (1.25x the exact KL with
  24 draws at T = 2 on a 200-class teacher in issue 13; 1.36x in tests/test_sparse_temperatures.py's teacher).
- ``priority`` (Duffield, Lund & Thorup 2007, "Priority sampling for estimation of arbitrary subset sums"; sampling
  without replacement): the K classes with the largest ``pi_i / u_i`` (u_i uniform) are kept, with tau the
  (K + 1)-th largest. ``pi`` is the *sampler* distribution: p by default, or the mean of q_T over the cache's
  ``sampler_temperatures`` (then the tail classes that matter at high T get kept as well). For any f,
  ``sum_kept max(pi_i, tau) / pi_i * q_T(i) * f(i)`` is an unbiased estimate of ``sum_i q_T(i) f(i)`` (DLT's
  unbiased subset sums applied to ``pi_i * (q_T(i) f(i) / pi_i)``), with the same ``log Z_T`` per stored T as
  ``sample``. With pi = p and T = 1 the weights are DLT's ``max(p_i, tau)``. Classes with ``p_i >= tau`` are kept
  every time and weighted exactly: much less variance than K draws with replacement.
  *Approximation* (unstored T): the weights normalised to sum to 1 (self-normalised, biased like ``sample``'s).

For ``sample`` and ``priority`` every term of the divergence is a sum over the vocabulary of a known function
weighted by q_T (or by s_T, below): the reported soft value is an unbiased estimate of the full-vocabulary
divergence at a stored T (of the cross-entropy part ``-sum_i q_T(i) log s_T(i)``, whose gradient trains, and of
the teacher's negative entropy ``sum_i q_T(i) log q_T(i)``, which only shifts the value), up to the fp16 rounding
of the stored log-probs. Single estimates can be negative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdcli.cache.manifest import STAT_KEYS, normalize_temperatures
from kdcli.errors import UsageError

SPARSE_MODES = ("topk", "sample", "priority")
_T_RTOL = 1e-6  # a temperature matches a stored one within this relative tolerance


@dataclass
class Targets:
    """Cached teacher targets for a batch of rows (any mode), on the student's device.

    ``temperatures`` are the temperatures the cache stores exactly (normalised: sorted, 1 included);
    ``stats[:, j]`` is the per-row statistic for the j-th of them other than 1 (``tail_logmass_t`` for topk,
    log Z_T for sample and priority); ``sampler_temperatures`` defines priority sampling's pi (module docstring).
    """

    mode: str
    num_classes: int
    logprobs: torch.Tensor | None = None  # full: (b, C)
    ids: torch.Tensor | None = None  # topk / sample / priority: (b, k) int64
    id_logprobs: torch.Tensor | None = None  # topk / sample / priority: (b, k) teacher log-prob of each id (T = 1)
    tail_logmass: torch.Tensor | None = None  # topk: (b,)
    counts: torch.Tensor | None = None  # sample: (b, k) draw counts, 0 for unused slots
    log_tau: torch.Tensor | None = None  # priority: (b,) log of the threshold tau (-inf: every class kept)
    stats: torch.Tensor | None = None  # (b, len(temperatures) - 1): per stored T != 1, in order
    temperatures: tuple = (1.0,)
    sampler_temperatures: tuple = (1.0,)
    padded: bool = False  # topk: slots whose id_logprobs are -inf are unused (their classes are in the tail)
    parts: tuple | None = None  # mixture: one Targets (sample or priority) per fused teacher (``ids``: theirs, side
    # by side) ...
    part_weights: tuple | None = None  # ... and its weight (they sum to 1)

    def _map(self, f) -> "Targets":
        kw = {k: (f(v) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        if self.parts is not None:
            kw["parts"] = tuple(p._map(f) for p in self.parts)
        return Targets(**kw)

    def to(self, device: torch.device) -> "Targets":
        return self._map(lambda v: v.to(device, non_blocking=True))

    def rows(self, sl: slice) -> "Targets":
        """The same targets for rows ``sl`` only (views, no copies)."""
        return self._map(lambda v: v[sl])

    def top1(self) -> torch.Tensor:
        """(b,) the teacher's most likely class (for sample mode: the most drawn id; for fused topk targets: the
        most likely of the ids every teacher kept)."""
        if self.mode == "mixture":
            raise ValueError("a mixture of sampled teachers has no known top-1 class")
        if self.mode == "full":
            return self.logprobs.argmax(dim=-1)
        if self.mode in ("topk", "priority"):  # ids sorted by log-prob, largest first
            return self.ids[:, 0]
        return torch.gather(self.ids, 1, self.counts.argmax(dim=-1, keepdim=True)).squeeze(1)


def _stat_temperatures(temperatures) -> tuple[float, ...]:
    return tuple(t for t in temperatures if t != 1.0)


def _match(temperatures, T: float) -> float | None:
    for t in temperatures:
        if math.isclose(t, T, rel_tol=_T_RTOL):
            return t
    return None


def _fmt(ts) -> str:
    return ", ".join(f"{t:g}" for t in ts)


def check_temperature(mode: str, temperatures, temperature: float, approximate: bool = False) -> bool:
    """True when targets of ``mode`` storing ``temperatures`` are exact/unbiased at ``temperature``; False when
    they are not but ``approximate`` allows the documented approximation; else :class:`UsageError` (exit 2)
    naming the stored temperatures. ``full`` is exact at every T. Call it once before training or evaluating."""
    if mode == "full" or _match(tuple(temperatures) + (1.0,), float(temperature)) is not None:
        return True
    if approximate:
        return False
    raise UsageError(
        f"this {mode} cache is exact only at the temperatures it stores (T = {_fmt(sorted(set(temperatures)))}), "
        f"not at T = {float(temperature):g}: rebuild it with cache-teacher --temperatures including "
        f"{float(temperature):g}, train/evaluate at a stored T, or accept the documented approximation with "
        "--approximate-temperature")


def temperature_stat(targets: Targets, temperature: float, approximate: bool = False) -> torch.Tensor | None:
    """(b,) the stored statistic at ``temperature`` (``tail_logmass_t`` for topk, log Z_T for sample and priority)
    for a stored T != 1; None at T = 1 (nothing needed) or when approximating an unstored T; UsageError at an
    unstored T without ``approximate``."""
    T = float(temperature)
    if not check_temperature(targets.mode, targets.temperatures, T, approximate):
        return None
    t = _match(targets.temperatures, T)
    if targets.mode == "full" or t is None or t == 1.0:
        return None
    return targets.stats[:, _stat_temperatures(targets.temperatures).index(t)]


def _exact_t1(temperature: float) -> bool:
    return math.isclose(float(temperature), 1.0, rel_tol=_T_RTOL)


def targets_from_arrays(arrays: dict, mode: str, num_classes: int, *, temperatures=(1.0,),
                        sampler_temperatures=(1.0,)) -> Targets:
    """Build :class:`Targets` from the numpy arrays a cache reader returns (ids widened to int64).

    ``temperatures``: what the cache's manifest lists (``manifest.stored_temperatures``); a cache without the list
    stores T = 1 only. The per-temperature array (``tail_logmass_t``, ``sample_logz_t``, ``priority_logz_t``) must
    have one column per listed T other than 1."""
    temps = normalize_temperatures(temperatures)
    stat_ts = _stat_temperatures(temps)
    t = lambda k: torch.from_numpy(arrays[k])  # noqa: E731
    kw: dict = {"temperatures": temps, "sampler_temperatures": tuple(float(x) for x in sampler_temperatures)}
    stat_key = STAT_KEYS.get(mode)
    if stat_ts and stat_key is not None:
        a = arrays.get(stat_key)
        if a is None or a.ndim != 2 or a.shape[1] != len(stat_ts):
            raise ValueError(f"{mode} targets stored for T = {_fmt(stat_ts)} need {stat_key!r} with "
                             f"{len(stat_ts)} column(s); got {None if a is None else a.shape}")
        kw["stats"] = t(stat_key).float()
    if mode == "full":
        return Targets(mode, num_classes, logprobs=t("logprobs").float(), **kw)
    if mode == "topk":
        return Targets(mode, num_classes, ids=t("topk_ids").long(), id_logprobs=t("topk_logprobs").float(),
                       tail_logmass=t("tail_logmass").float(), **kw)
    if mode == "priority":
        missing = [x for x in kw["sampler_temperatures"] if _match(temps, x) is None]
        if missing:
            raise ValueError(f"priority sampler temperatures {_fmt(missing)} are not among the stored T = "
                             f"{_fmt(temps)}")
        return Targets(mode, num_classes, ids=t("priority_ids").long(), id_logprobs=t("priority_logprobs").float(),
                       log_tau=t("priority_tau").float(), **kw)
    if mode == "sample":
        return Targets(mode, num_classes, ids=t("sample_ids").long(), id_logprobs=t("sample_logprobs").float(),
                       counts=torch.from_numpy(arrays["sample_counts"].astype("float32")), **kw)
    raise ValueError(f"unknown target mode {mode!r}")


def check_divergence(mode: str, divergence: str) -> None:
    """UsageError (exit 2) for a divergence targets of ``mode`` cannot serve: a ``mixture`` (fused sample/priority
    teachers) trains with forward KL only."""
    if mode == "mixture" and divergence != "forward":
        raise UsageError(f"--divergence {divergence}: fused sample/priority caches train with forward KL only "
                         "(the weighted mean of the teachers' KLs has the gradient of the KL to their mixture; "
                         "no such identity holds for reverse KL or JSD): use --divergence forward")


def padded_head(targets: Targets, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For fused topk targets (``padded``): which slots are used (b, k), and which classes are head buckets, a
    (b, C) mask shaped like ``like`` (ids may repeat: counted, not scattered, so the mask is deterministic)."""
    used = targets.id_logprobs > float("-inf")
    return used, torch.zeros_like(like).scatter_add_(1, targets.ids, used.to(like.dtype)) > 0


def mixture_targets(parts, weights) -> Targets:
    """Fused sample/priority teachers (:mod:`kdcli.cache.fused`): every part's targets and weight; the soft term
    is ``sum_k w_k`` (part k's estimate), computed over their ids side by side."""
    parts = tuple(parts)
    return Targets("mixture", parts[0].num_classes, ids=torch.cat([p.ids for p in parts], dim=1), parts=parts,
                   part_weights=tuple(float(w) for w in weights))


def _kl_rows(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """sum_i p_i (log p_i - log q_i) per row, with 0 * log 0 = 0."""
    p = p_log.exp()
    terms = torch.where(p > 0, p * (p_log - q_log), 0.0)  # a scalar 0: no zeros tensor per call
    return terms.sum(dim=-1)


DIVERGENCES = ("forward", "reverse", "jsd")


def div_rows(p_log: torch.Tensor, q_log: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """Divergence per row between two normalised distributions given as log-probs (teacher p, student q)."""
    if divergence == "forward":
        return _kl_rows(p_log, q_log)
    if divergence == "reverse":
        return _kl_rows(q_log, p_log)
    m_log = torch.logaddexp(p_log + math.log(beta), q_log + math.log(1.0 - beta))  # log(beta*p + (1-beta)*q)
    return beta * _kl_rows(p_log, m_log) + (1.0 - beta) * _kl_rows(q_log, m_log)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012); x = -inf gives 0, x = 0 gives -inf."""
    x = x.clamp_max(0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_bucket_logprobs(id_logprobs: torch.Tensor, tail_logmass: torch.Tensor, num_classes: int,
                         temperature: float, tail_logmass_t: torch.Tensor | None = None,
                         padded: bool = False) -> torch.Tensor:
    """The teacher's (b, k + 1) bucket log-probs at T: its k ids and one tail bucket (module docstring).

    ``tail_logmass_t`` (b,): the stored log tail mass at T (exact): the tail bucket gets exactly that mass and the
    k ids share the rest in proportion to ``p_i^(1/T)``. None: exact at T = 1 (``tail_logmass``); at any other T
    the uniform-tail approximation (``padded``: over the classes outside the row's used slots)."""
    T = float(temperature)
    if tail_logmass_t is not None:
        head = F.log_softmax(id_logprobs / T, dim=1) + _log1mexp(tail_logmass_t)[:, None]  # (b, k)
        return torch.cat([head, tail_logmass_t.clamp_max(0.0)[:, None]], dim=1)
    m = num_classes - id_logprobs.shape[1]
    if padded:  # fused topk targets: the unused slots' classes are in the tail too
        log_m = torch.log((num_classes - torch.isfinite(id_logprobs).sum(dim=1)).float())
        tail_w = torch.where(log_m > float("-inf"), log_m + (tail_logmass - log_m) / T, log_m)
    elif m > 0:
        tail_w = math.log(m) + (tail_logmass - math.log(m)) / T  # (b,) tempered weight of the tail bucket
    else:
        tail_w = torch.full_like(tail_logmass, float("-inf"))
    return F.log_softmax(torch.cat([id_logprobs / T, tail_w[:, None]], dim=1), dim=1)


def teacher_buckets(targets: Targets, temperature: float, approximate: bool = False) -> torch.Tensor:
    """topk targets -> the teacher's (b, k + 1) bucket log-probs at T: exact at a stored T, the documented
    approximation at another T with ``approximate``, else UsageError."""
    stat = temperature_stat(targets, temperature, approximate)
    return topk_bucket_logprobs(targets.id_logprobs, targets.tail_logmass, targets.num_classes, temperature, stat,
                                padded=targets.padded)


def sample_weights(counts: torch.Tensor, id_logprobs: torch.Tensor,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w, p_log, used, n)`` for (b, S) draws: the self-normalised weight of each drawn id (``counts / draws`` at
    T = 1, reweighted by ``p^(1/T - 1)`` otherwise; 0 on unused slots), log p_T at each drawn id, which slots hold a
    draw, and the number of draws per row (b, 1). Exact at T = 1; the *approximation* at an unstored T != 1."""
    T = float(temperature)
    used = counts > 0
    neg_inf = torch.full_like(id_logprobs, float("-inf"))
    logw = torch.where(used, torch.log(counts.clamp_min(1e-30)) + id_logprobs * (1.0 / T - 1.0), neg_inf)
    w = torch.softmax(logw, dim=1)
    # log Z_T = log E_{j~p}[p_j^(1/T - 1)], estimated from the same draws (exactly 0 at T = 1)
    n = counts.sum(dim=1, keepdim=True)
    log_z = torch.logsumexp(logw, dim=1) - torch.log(n[:, 0])
    return w, id_logprobs / T - log_z[:, None], used, n


def _stored_log_z(targets: Targets, t: float) -> torch.Tensor:
    """(b,) log Z_t for a stored temperature t (0 at t = 1)."""
    if t == 1.0:
        return torch.zeros_like(targets.id_logprobs[:, 0])
    return targets.stats[:, _stat_temperatures(targets.temperatures).index(_match(targets.temperatures, t))]


def priority_log_ratio(targets: Targets) -> torch.Tensor:
    """(b, K) ``log(max(pi_i, tau) / pi_i) = max(0, log tau - log pi_i)`` at each kept id (0 where p_i = 0), pi the
    sampler distribution: p, or the mean of q_t over ``sampler_temperatures`` (log Z_t from the cache)."""
    lp = targets.id_logprobs
    ts = targets.sampler_temperatures
    if tuple(ts) == (1.0,):
        log_pi = lp
    else:
        log_pi = torch.logsumexp(torch.stack([lp / t - _stored_log_z(targets, t)[:, None] for t in ts]), dim=0) \
            - math.log(len(ts))
    valid = lp > float("-inf")
    r = (targets.log_tau[:, None] - log_pi).clamp_min(0.0)
    return torch.where(valid, r, torch.zeros_like(r))


def id_weights(targets: Targets, temperature: float,
               approximate: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(w, p_log, used, W)`` for sample and priority targets at T (module docstring), each (b, S) but W:

    ``sum_j w_j f(id_j)`` estimates ``sum_i q_T(i) f(i)``: unbiased at a stored T (w does not sum to 1: W (b,) is
    its row sum), self-normalised (W is None: the rows sum to 1) at T = 1 for ``sample`` (where that is exact:
    ``counts / draws``) and for the approximation at an unstored T. ``p_log`` is log q_T at each id (0 on unused
    slots), ``used`` which slots hold an id."""
    T = float(temperature)
    if targets.mode == "mixture":  # fused teachers: every part's ids side by side, weighted by the part's weight
        ws, ps, us, tot = [], [], [], 0.0
        for part, pw in zip(targets.parts, targets.part_weights):
            w, p_log, used, W = id_weights(part, T, approximate)
            ws.append(w * pw)
            ps.append(p_log)
            us.append(used)
            tot = tot + pw * (W if W is not None else torch.ones_like(w[:, 0]))
        return torch.cat(ws, dim=1), torch.cat(ps, dim=1), torch.cat(us, dim=1), tot
    stat = temperature_stat(targets, T, approximate)
    lp = targets.id_logprobs
    if targets.mode == "sample":
        if stat is None:  # T = 1 (exact) or the approximation
            w, p_log, used, _ = sample_weights(targets.counts, lp, T)
            return w, p_log, used, None
        c = targets.counts
        used = c > 0
        n = c.sum(dim=1, keepdim=True)
        p_log = torch.where(used, lp / T - stat[:, None], torch.zeros_like(lp))
        w = torch.where(used, (c / n) * torch.exp(lp * (1.0 / T - 1.0) - stat[:, None]), torch.zeros_like(lp))
        return w, p_log, used, w.sum(dim=1)
    if targets.mode == "priority":
        used = lp > float("-inf")
        ratio = priority_log_ratio(targets)
        zero = torch.zeros_like(lp)
        if stat is None and not _exact_t1(T):  # the approximation: self-normalised
            logw = torch.where(used, ratio + lp / T, torch.full_like(lp, float("-inf")))
            p_log = torch.where(used, lp / T - torch.logsumexp(logw, dim=1, keepdim=True), zero)
            return torch.softmax(logw, dim=1), p_log, used, None
        log_z = stat[:, None] if stat is not None else 0.0
        p_log = torch.where(used, lp / T - log_z, zero)
        w = torch.where(used, torch.exp(ratio + p_log), zero)
        return w, p_log, used, w.sum(dim=1)
    raise ValueError(f"id_weights needs sample or priority targets, not {targets.mode!r}")


def student_weights(targets: Targets, s_at: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """(b, S) weights with ``sum_j iw_j g(id_j)`` an unbiased estimate of ``sum_i s(i) g(i)`` for the student's
    distribution s, given ``s_at`` = log s at each id: the sampler's inclusion weights times ``s / pi``."""
    zero = torch.zeros_like(s_at)
    if targets.mode == "sample":  # (counts / draws) * s(j) / p(j): p at T = 1 is the sampler
        c = targets.counts
        return torch.where(used, (c / c.sum(dim=1, keepdim=True)) * torch.exp(s_at - targets.id_logprobs), zero)
    return torch.where(used, torch.exp(priority_log_ratio(targets) + s_at), zero)


def soft_kl(student_logits: torch.Tensor, targets: Targets, temperature: float, divergence: str = "forward",
            beta: float = 0.5, *, approximate: bool = False) -> torch.Tensor:
    """(b,) divergence between teacher_T and student_T per row, *without* the T^2 factor.

    ``divergence``: ``forward`` KL(p || q) (Hinton et al. 2015), ``reverse`` KL(q || p) (mode-seeking; MiniLLM,
    Gu et al. 2024), or ``jsd``: the generalised Jensen-Shannon divergence
    ``beta * KL(p || m) + (1 - beta) * KL(q || m)`` with ``m = beta * p + (1 - beta) * q`` (GKD, Agarwal et al.
    2024); ``beta`` in (0, 1) skews it, 0.5 is the symmetric JSD. p is the teacher, q the student, both at T.

    ``full``: exact. ``topk``: the exact divergence between the teacher's and the student's (k + 1)-bucket
    distributions (the k ids + one tail bucket; see the module docstring): a lower bound on the full-vocabulary
    value for all three (data-processing inequality), equal when the tail is empty. ``sample`` and ``priority``:
    unbiased estimates for all three. Forward KL is ``sum_j w_j (log p_T(j) - log q_T(j))`` over the stored ids
    (:func:`id_weights`); the student-side terms of reverse KL and JSD, sums over q, are split into the exact
    student entropy (over the whole vocabulary) and an importance-weighted estimate from the same ids
    (:func:`student_weights`). Sparse targets at a temperature they do not store: UsageError, unless
    ``approximate`` (module docstring).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; use one of {DIVERGENCES}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1); got {beta}")
    T = float(temperature)
    s_log = F.log_softmax(student_logits.float() / T, dim=-1)  # (b, C)
    if targets.mode == "full":
        p_log = F.log_softmax(targets.logprobs / T, dim=-1)
        return div_rows(p_log, s_log, divergence, beta)
    if targets.mode == "topk":
        p_log = teacher_buckets(targets, T, approximate)  # (b, k+1)
        s_top = torch.gather(s_log, 1, targets.ids)  # (b, k)
        if targets.padded:  # unused slots (ids may repeat) stay in the student's tail, no bucket of their own
            used, in_head = padded_head(targets, s_log)
            s_tail = torch.logsumexp(s_log.masked_fill(in_head, float("-inf")), dim=1)
            s_top = torch.where(used, s_top, float("-inf"))
        else:
            s_tail = torch.logsumexp(s_log.scatter(1, targets.ids, float("-inf")), dim=1)  # (b,)
        return div_rows(p_log, torch.cat([s_top, s_tail[:, None]], dim=1), divergence, beta)
    check_divergence(targets.mode, divergence)
    if targets.mode in ("sample", "priority", "mixture"):  # mixture: sum_k w_k (teacher k's estimate)
        w, p_log, used, _ = id_weights(targets, T, approximate)  # (b, S) weights and log p_T at each id
        s_at = torch.gather(s_log, 1, targets.ids)  # (b, S) log q_T at each id
        zero = torch.zeros_like(w)
        if divergence == "forward":
            return torch.where(used, w * (p_log - s_at), zero).sum(dim=1)
        iw = student_weights(targets, s_at, used)  # (b, S): sums over the student's q_T
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


def kd_loss(student_logits: torch.Tensor, targets: Targets | None, labels: torch.Tensor | None, *,
            temperature: float, alpha: float, weight: torch.Tensor | None = None, divergence: str = "forward",
            beta: float = 0.5, approximate: bool = False) -> LossParts:
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
    if (weight is None and targets is not None and targets.mode == "full" and divergence == "forward"
            and alpha > 0):  # the common classifier case: one fused function, closed-form gradient
        total, soft, hard = _FullForwardKD.apply(student_logits.float(), targets.logprobs, labels,
                                                 float(temperature), float(alpha))
        return LossParts(total=total, soft=soft, hard=hard)
    w = None if weight is None else weight.float()
    denom = float(max(b, 1)) if w is None else w.sum().clamp_min(1.0)
    soft = hard = None
    if targets is not None and alpha > 0:
        kl = soft_kl(student_logits, targets, temperature, divergence, beta, approximate=approximate)
        soft = (temperature ** 2) * (kl if w is None else kl * w).sum() / denom
    if labels is not None and alpha < 1:
        ce = F.cross_entropy(student_logits.float(), labels, reduction="none")
        hard = (ce if w is None else ce * w).sum() / denom
    if soft is None or hard is None:
        zero = student_logits.sum() * 0.0
        soft, hard = (zero if soft is None else soft), (zero if hard is None else hard)
    return LossParts(total=alpha * soft + (1.0 - alpha) * hard, soft=soft, hard=hard)


def describe(alpha: float, temperature: float, has_cache: bool, divergence: str = "forward",
             beta: float = 0.5, *, mode: str | None = None, temperatures=None, approximate: bool = False) -> str:
    """The resolved loss, printed when training starts; with ``mode`` (and the cache's stored ``temperatures``)
    it also says whether the soft term is exact, an unbiased estimate or the documented approximation at T."""
    T = temperature
    if not has_cache or alpha == 0:
        return "loss = CE(student, labels)   [alpha = 0: no teacher term]"
    term = {"forward": "KL(teacher_T || student_T)", "reverse": "KL(student_T || teacher_T)",
            "jsd": f"JSD_beta={beta:g}(teacher_T, student_T)"}[divergence]
    out = (f"loss = {alpha:g} * {T:g}^2 * {term} + {1 - alpha:g} * CE(student, labels)   "
           f"[T = {T:g}; soft weight alpha*T^2 = {alpha * T * T:g}]")
    if mode is None:
        return out
    exact = check_temperature(mode, temperatures or (1.0,), T, approximate)
    what = {"full": "exact", "topk": "exact over the top-k + tail buckets",
            "sample": "unbiased estimate from the sampled ids", "priority": "unbiased estimate (priority sampling)",
            "mixture": "unbiased gradient; the value adds the teachers' Jensen-Shannon divergence"}
    if exact:
        return out + f"   [{mode} cache: {what[mode]} at T = {T:g}]"
    approximation = {"topk": "uniform tail", "mixture": "the mean of the tempered teachers"}.get(
        mode, "self-normalised weights")
    return out + (f"   [{mode} cache stores T = {_fmt(sorted({1.0, *temperatures}))}: APPROXIMATE at T = {T:g} "
                  f"({approximation})]")
