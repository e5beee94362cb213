"""``priority``: priority sampling (Duffield, Lund & Thorup 2007, "Priority sampling for estimation of arbitrary
subset sums"), K classes kept without replacement.

With u_i ~ uniform(0, 1] per class, the K classes with the largest priority ``pi_i / u_i`` are kept, tau being the
(K + 1)-th largest. Stored per row (per token): ``priority_ids`` (K), ``priority_logprobs`` (K, float16, largest
first), ``priority_tau`` (float32, log tau; -inf when K >= C: every class kept) and, per stored T != 1,
``priority_logz_t`` = log Z_T. ``pi`` is the *sampler* distribution: p by default, or the mean of q_T over the
cache's ``sampler_temperatures`` (then the tail classes that matter at high T get kept as well).

What the loss assumes: for any f, ``sum_kept max(pi_i, tau) / pi_i * q_T(i) * f(i)`` is an unbiased estimate of
``sum_i q_T(i) f(i)`` (DLT's unbiased subset sums applied to ``pi_i * (q_T(i) f(i) / pi_i)``), with the same
log Z_T per stored T as ``sample``. With pi = p and T = 1 the weights are DLT's ``max(p_i, tau)``. Classes with
``p_i >= tau`` are kept every time and weighted exactly: much less variance than K draws with replacement.
*Approximation* (an unstored T): the weights normalised to sum to 1 (self-normalised, biased like sample's).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from kdcli.cache.modes.base import (
    LOGPROB_DTYPE,
    NORM_TOL,
    STAT_DTYPES,
    SampledMode,
    WeightedIdTargets,
    first,
    fmt_temperatures,
    is_t1,
    log_normalizers,
    lse,
    match_temperature,
    normalize_temperatures,
    repeated_ids,
    stat_temperatures,
)
from kdcli.infra.errors import UsageError


def sampler_logprobs(
    logp: torch.Tensor, sampler_temperatures: Iterable[float] | None, temperatures: Iterable[float] | None
) -> torch.Tensor:
    """log pi for priority sampling: logp itself for the default sampler (1,), else the log of the mean of q_T over
    ``sampler_temperatures`` (a defensive mixture: q_T / pi <= len(sampler_temperatures) for each of them, so no
    class that matters at one of those T is left to a rare draw with a huge weight). Each sampler temperature must
    be stored (the loss recomputes pi at the kept ids from the stored log Z_T)."""
    ts = tuple(float(t) for t in (sampler_temperatures or (1.0,)))
    stored = normalize_temperatures(temperatures)
    missing = [t for t in ts if t not in stored]
    if missing:
        raise ValueError(f"sampler temperatures {missing} must be among the stored temperatures {list(stored)}")
    if ts == (1.0,):
        return logp
    acc = None
    for t in ts:  # logaddexp one temperature at a time: two (rows, C) buffers, not one per temperature
        lq = torch.log_softmax(logp / t, dim=-1)
        acc = lq if acc is None else torch.logaddexp(acc, lq, out=acc)
    return acc.sub_(math.log(len(ts)))


def priority_sample(
    logp: torch.Tensor, k: int, generator: torch.Generator | None = None, log_pi: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Priority sampling of (rows, C) log-probs: ``(ids, logprobs, log_tau)``, (rows, K), (rows, K), (rows,).

    Priorities ``log(pi_i / u_i) = log pi_i - log u_i`` (pi = p unless ``log_pi`` is given) with u_i ~ uniform(0, 1]
    from ``generator``; the K largest are kept (sorted by log-prob, largest first) and log tau is the (K + 1)-th
    largest priority. u is drawn in float32: a class whose pi_i is below tau * 2^-24 is never kept (it would have
    been, with probability < 6e-8, at a weight > 1.6e7). K is capped at C;
    with K = C every class is kept and log tau = -inf (the estimate is then the exact sum). Classes with p = 0
    have priority 0 and are kept only when fewer than K classes have p > 0 (then log tau = -inf too). Vectorised:
    one uniform draw per class and one top-(K + 1) per row, no Python loop (V = 49,152 wide rows are fine)."""
    c = logp.shape[-1]
    k = min(int(k), c)
    # priority = logp - log u, u = 1 - r, r ~ [0, 1): built in place in one (rows, C) buffer
    key = torch.rand(logp.shape, generator=generator, device=logp.device, dtype=logp.dtype)
    key.neg_().log1p_().neg_().add_(logp if log_pi is None else log_pi)  # (rows, C) log priorities
    key = key.masked_fill_(torch.isnan(key), float("-inf"))  # NaN logits are refused by the caller after the fact
    if k < c:
        top, idx = torch.topk(key, k + 1, dim=-1)  # (rows, K + 1), largest first
        ids, log_tau = idx[:, :k], top[:, k]
    else:
        ids = torch.arange(c, device=logp.device).expand(logp.shape[0], c)
        log_tau = torch.full(logp.shape[:1], float("-inf"), device=logp.device)
    lp = torch.gather(logp, -1, ids)
    lp, order = torch.sort(lp, dim=-1, descending=True)
    ids = torch.gather(ids, -1, order)
    return ids, lp, log_tau


@dataclass
class PriorityTargets(WeightedIdTargets):
    id_logprobs: torch.Tensor | None = None  # (b, K) teacher log-prob of each kept id (T = 1)
    log_tau: torch.Tensor | None = None  # (b,) log of the threshold tau (-inf: every class kept)
    sampler_temperatures: tuple = (1.0,)

    mode: ClassVar[str] = "priority"

    def top1(self):
        return self.ids[:, 0]  # ids sorted by log-prob, largest first

    def stored_log_z(self, t: float) -> torch.Tensor:
        """(b,) log Z_t for a stored temperature t (0 at t = 1)."""
        if t == 1.0:
            return torch.zeros_like(self.id_logprobs[:, 0])
        return self.stats[:, stat_temperatures(self.temperatures).index(match_temperature(self.temperatures, t))]

    def surely_kept(self, used: torch.Tensor) -> torch.Tensor:
        """Ids whose sampler probability is at or above tau: kept in every draw (log ratio 0)."""
        return used & (self.log_ratio() == 0)

    def log_ratio(self) -> torch.Tensor:
        """(b, K) ``log(max(pi_i, tau) / pi_i) = max(0, log tau - log pi_i)`` at each kept id (0 where p_i = 0), pi
        the sampler distribution: p, or the mean of q_t over ``sampler_temperatures`` (log Z_t from the cache)."""
        lp = self.id_logprobs
        ts = self.sampler_temperatures
        if tuple(ts) == (1.0,):
            log_pi = lp
        else:
            log_pi = torch.logsumexp(
                torch.stack([lp / t - self.stored_log_z(t)[:, None] for t in ts]), dim=0
            ) - math.log(len(ts))
        valid = lp > float("-inf")
        r = (self.log_tau[:, None] - log_pi).clamp_min(0.0)
        return torch.where(valid, r, torch.zeros_like(r))

    def id_weights(self, temperature, approximate=False):
        """``max(pi, tau) / pi * q_T`` at each kept id: unbiased at a stored T (W their row sum); self-normalised
        for the approximation at an unstored T."""
        T = float(temperature)
        stat = self.stat_at(T, approximate)
        lp = self.id_logprobs
        used = lp > float("-inf")
        ratio = self.log_ratio()
        zero = torch.zeros_like(lp)
        if stat is None and not is_t1(T):  # the approximation: self-normalised
            logw = torch.where(used, ratio + lp / T, torch.full_like(lp, float("-inf")))
            p_log = torch.where(used, lp / T - torch.logsumexp(logw, dim=1, keepdim=True), zero)
            return torch.softmax(logw, dim=1), p_log, used, None
        log_z = stat[:, None] if stat is not None else 0.0
        p_log = torch.where(used, lp / T - log_z, zero)
        w = torch.where(used, torch.exp(ratio + p_log), zero)
        return w, p_log, used, w.sum(dim=1)

    def student_weights(self, s_at, used):
        return torch.where(used, torch.exp(self.log_ratio() + s_at), torch.zeros_like(s_at))


class PriorityMode(SampledMode):
    name = "priority"
    keys_ = ("priority_ids", "priority_logprobs", "priority_tau")
    stat_key = "priority_logz_t"
    loss_note = "unbiased estimate (priority sampling)"

    def check_size(self, k, width, what):
        """K above the classes cannot be kept (K = C keeps every class: exact, like a full cache)."""
        if k > width:
            raise UsageError(
                f"--mode priority --samples {k} is more than the {width} {what} there are to keep; use "
                f"--samples {width} or fewer (or --mode full)"
            )

    def temperature_layout(self, temperatures, sampler_temperatures=None):
        out = super().temperature_layout(temperatures)
        ts = normalize_temperatures(temperatures)
        samplers = sorted({float(t) for t in (sampler_temperatures or (1.0,))})
        missing = [t for t in samplers if t not in ts]
        if missing:
            raise ValueError(f"sampler temperatures {missing} must be among the stored temperatures {list(ts)}")
        out["sampler_temperatures"] = samplers
        return out

    def reduce(self, logp, k, generator, temperatures, sampler_temperatures=None):
        ts = stat_temperatures(temperatures)
        log_pi = sampler_logprobs(logp, sampler_temperatures, temperatures)
        ids, lp, log_tau = priority_sample(logp, int(k), generator, log_pi)
        out = {
            "priority_ids": ids.to(torch.int32),
            "priority_logprobs": lp.to(LOGPROB_DTYPE),
            "priority_tau": log_tau.to(torch.float32),
        }
        if ts:
            out["priority_logz_t"] = log_normalizers(logp, ts).to(STAT_DTYPES["priority_logz_t"])
        return out

    def bytes_per_entry(self, layout, width, n_stats):
        return (np.dtype(layout["id_dtype"]).itemsize + 2) * int(layout["samples"]) + 4 + 4 * n_stats

    def describe(self, k, token):
        return f", K={k} kept" + ("/token" if token else "")

    def expected(self, m):
        return {
            **self.ids_expected(m, m.get("samples")),
            **self.stat_expected(m),
            "priority_tau": (np.dtype(m.get("tau_dtype") or np.float32), ()),
        }

    def problems(self, manifest, arrays, where):
        """Kept ids in range and distinct, log-probs <= 0 (-inf: a class of probability 0, kept only when fewer than
        K have any), sorted largest first, kept mass <= 1; log tau not NaN and not +inf."""
        num_classes = int(manifest["num_classes"])
        ids, lp, log_tau = arrays["priority_ids"], arrays["priority_logprobs"], arrays["priority_tau"]
        lp = np.asarray(lp, dtype=np.float32)
        out = []
        if ids.size and int(ids.max()) >= num_classes:
            out.append(
                f"priority_ids has id {int(ids.max())} >= {num_classes} classes at {where(first(ids >= num_classes))}"
            )
        out += repeated_ids("priority_ids", ids, where)
        bad = np.isnan(lp) | (lp > 0) | (lp == np.inf)
        if bad.any():
            return out + [f"priority_logprobs has NaN or a positive log-probability at {where(first(bad))}"]
        with np.errstate(invalid="ignore"):
            unsorted = np.diff(lp, axis=-1) > 0 if lp.shape[-1] > 1 else np.zeros((len(lp), 1), bool)
        if unsorted.any():
            out.append(f"priority_logprobs are not sorted (largest first) at {where(first(unsorted))}")
        over = lse(lp) > NORM_TOL
        if over.any():
            out.append(f"priority_logprobs hold more than all the probability mass at {where(first(over))}")
        t = np.asarray(log_tau, dtype=np.float32)
        if (np.isnan(t) | (t == np.inf)).any():
            out.append(f"priority_tau is NaN or +inf at {where(first(np.isnan(t) | (t == np.inf)))}")
        return out + self.stat_problems(manifest, arrays, where)

    def distinct_ids(self, arrays):
        return int(arrays["priority_ids"].size)

    def targets(self, arrays, num_classes, temperatures, sampler_temperatures):
        missing = [x for x in sampler_temperatures if match_temperature(temperatures, x) is None]
        if missing:
            raise ValueError(
                f"priority sampler temperatures {fmt_temperatures(missing)} are not among the stored T = "
                f"{fmt_temperatures(temperatures)}"
            )
        return PriorityTargets(
            **self.target_fields(arrays, num_classes, temperatures),
            log_tau=torch.from_numpy(arrays["priority_tau"]).float(),
            sampler_temperatures=sampler_temperatures,
        )


MODE = PriorityMode()
