"""Teacher logits -> what a cache row stores. Runs on the teacher's device; only the reduced tensors leave it.

All modes start from ``log_softmax(z)`` at T = 1 in fp32. Log-probabilities (not probabilities) are stored, in
fp16: ``softmax(logp / T) == softmax(z / T)`` for every T, so a ``full`` cache serves every temperature, and fp16
log-probs keep the tail that fp16 probabilities would flush.

Notation: p = softmax(z) (the teacher at T = 1), q_T = softmax(z / T) = p^(1/T) / Z_T with
``Z_T = sum_j p_j^(1/T)``, so ``log q_T(i) = logp_i / T - log Z_T``.

- ``full``:     ``logprobs`` (rows, C)
- ``topk``:     ``topk_ids`` (rows, k), ``topk_logprobs`` (rows, k), ``tail_logmass`` (rows,) = log of the
                probability mass outside the top k, computed exactly as a logsumexp over the other classes
- ``sample``:   ``sample_ids`` (rows, S) and ``sample_counts`` (rows, S): S draws from the teacher's T = 1
                distribution, merged into distinct ids with their counts (unused slots have count 0), plus
                ``sample_logprobs`` (rows, S), the teacher's log-prob of each id
- ``priority``: priority sampling (Duffield, Lund & Thorup 2007, "Priority sampling for estimation of arbitrary
                subset sums"): with u_i ~ uniform(0, 1] per class, the K classes with the largest priority
                ``p_i / u_i`` are kept: ``priority_ids`` (rows, K) and ``priority_logprobs`` (rows, K), sorted by
                log-prob (largest first), and ``priority_tau`` (rows,) = log tau, tau the (K + 1)-th largest
                priority (-inf when K >= C: every class is kept). ``sum_kept max(p_i, tau) f(i)`` is then an unbiased
                estimate of ``sum_i p_i f(i)`` for every f (the K items are sampled without replacement). With
                ``sampler_temperatures`` the priorities are ``pi_i / u_i`` for a mixture pi of tempered teachers
                (:func:`sampler_logprobs`) and tau is in pi's units.

**Per-temperature statistics** (``temperatures``): T = 1 needs nothing more (the arrays above are exact or
unbiased there). For every other listed T, in the order of :func:`stat_temperatures`, one column of a
(rows, len) array holds what makes the sparse loss exact or unbiased at that T:

- ``topk``: ``tail_logmass_t`` = log(1 - sum_{i in top k} q_T(i)), the true tempered tail mass (a logsumexp over
  the other classes of logp / T, minus log Z_T). The (k + 1)-bucket distribution at T is then known exactly.
- ``sample`` / ``priority``: ``sample_logz_t`` / ``priority_logz_t`` = log Z_T = logsumexp(logp / T). Then
  ``q_T(i) / p_i = exp(logp_i * (1/T - 1) - log Z_T)`` is known at every stored id, and reweighting the T = 1
  sample by it is unbiased at T (no self-normalisation; see :mod:`kdcli.losses`).

Storage dtypes: ``STAT_DTYPES`` (its docstring gives the measured error of each choice).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch

from kdcli.cache.manifest import (MODE_KEYS, MODES, STAT_KEYS, mode_keys, normalize_temperatures,  # noqa: F401
                                  stat_temperatures)

LOGPROB_DTYPE = torch.float16
DEFAULT_TEMPERATURES = (1.0, 2.0, 4.0)
STAT_DTYPES = {"tail_logmass_t": torch.float16, "sample_logz_t": torch.float32, "priority_logz_t": torch.float32}
"""Storage dtypes of the per-temperature statistics, chosen by measurement (200-class and 49,152-class teachers,
T = 2 and 4, against float64 references):

- ``tail_logmass_t`` float16: the bucketed KL per row moves by 3e-4 on average (at most 2e-3) relative, against
  1.3e-4 (at most 1e-3) with float32, the rest being the float16 top-k log-probs; the mean over rows by < 1.1e-4.
  A log tail mass is <= 0 and needs absolute precision only where the tail is large (log near 0), where float16
  is finest.
- ``*_logz_t`` float32: log Z_T scales every weight of its row, and reaches 8 at T = 4 on a 49k vocabulary, where
  float16's spacing is 2^-8: measured (keeping every class, so only rounding remains) the KL per row moved by
  6.5e-3 on average and 1.7e-2 at most relative at T = 4 in float16, against 2.7e-4 in float32.
- ``priority_tau`` float32 (as ``tail_logmass``): float16 moved the per-row estimate by up to 14% at T = 4.
"""


def numpy_id_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint16) if num_classes <= 65536 else np.dtype(np.int32)


def reduce_logits(logits: torch.Tensor, mode: str, *, top_k: int | None = None, samples: int | None = None,
                  generator: torch.Generator | None = None,
                  temperatures: Iterable[float] | None = None,
                  sampler_temperatures: Iterable[float] | None = None) -> dict[str, torch.Tensor]:
    """(rows, C) logits -> dict of per-row tensors, still on the logits' device (module docstring).

    ``samples`` is S draws for ``sample`` and K kept classes for ``priority``; ``generator`` drives both samplers
    (it must live on the logits' device). ``temperatures``: the stored temperatures (1 is always implied); the
    sparse modes add their per-temperature array when any is not 1. ``sampler_temperatures`` (priority only, each
    one of the stored temperatures; default (1,)): priorities are drawn for pi = the mean of q_T over them
    (:func:`sampler_logprobs`)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (rows, C) fp32
    ts = stat_temperatures(temperatures)
    if mode == "full":
        return {"logprobs": logp.to(LOGPROB_DTYPE)}
    if mode == "topk":
        k = min(int(top_k), logp.shape[-1])
        vals, ids = torch.topk(logp, k, dim=-1)  # (rows, k), sorted descending
        rest = logp.scatter(-1, ids, float("-inf"))
        tail = torch.logsumexp(rest, dim=-1)  # (rows,) log mass outside the top k (-inf when k == C)
        out = {"topk_ids": ids.to(torch.int32), "topk_logprobs": vals.to(LOGPROB_DTYPE),
               "tail_logmass": tail.to(torch.float32)}
        if ts:  # log(1 - sum_topk q_T) = logsumexp_{i not in top k}(logp_i / T) - log Z_T, per T; one V-wide pass
            cols = []  # each: log Z_T is that tail sum logaddexp'd with the k-wide sum over the top k
            for t in ts:
                rest_t = torch.logsumexp(rest / t, dim=-1)
                cols.append(rest_t - torch.logaddexp(rest_t, torch.logsumexp(vals / t, dim=-1)))
            out["tail_logmass_t"] = torch.stack(cols, dim=-1).to(STAT_DTYPES["tail_logmass_t"])
        return out
    if mode == "sample":
        s = int(samples)
        # A row with NaN/inf logits is refused by the caller after the fact (no device sync per batch); a
        # uniform stand-in keeps multinomial from failing (on CUDA: a device-side assert) before that check.
        probs = torch.nan_to_num(logp.exp(), nan=1.0, posinf=1.0, neginf=0.0)
        draws = torch.multinomial(probs, s, replacement=True, generator=generator)  # (rows, s)
        ids, counts = _merge_draws(draws)
        lp = torch.gather(logp, -1, ids.long())
        lp = torch.where(counts > 0, lp, torch.zeros_like(lp))
        out = {"sample_ids": ids.to(torch.int32), "sample_counts": counts.to(torch.int32),
               "sample_logprobs": lp.to(LOGPROB_DTYPE)}
        if ts:
            out["sample_logz_t"] = log_normalizers(logp, ts).to(STAT_DTYPES["sample_logz_t"])
        return out
    if mode == "priority":
        log_pi = sampler_logprobs(logp, sampler_temperatures, temperatures)
        ids, lp, log_tau = priority_sample(logp, int(samples), generator, log_pi)
        out = {"priority_ids": ids.to(torch.int32), "priority_logprobs": lp.to(LOGPROB_DTYPE),
               "priority_tau": log_tau.to(torch.float32)}
        if ts:
            out["priority_logz_t"] = log_normalizers(logp, ts).to(STAT_DTYPES["priority_logz_t"])
        return out
    raise ValueError(f"unknown cache mode {mode!r}")


def log_normalizers(logp: torch.Tensor, temperatures: tuple[float, ...]) -> torch.Tensor:
    """(rows, C) log-probs at T = 1 -> (rows, len(temperatures)) log Z_T = logsumexp(logp / T)."""
    return torch.stack([torch.logsumexp(logp / t, dim=-1) for t in temperatures], dim=-1)


def sampler_logprobs(logp: torch.Tensor, sampler_temperatures: Iterable[float] | None,
                     temperatures: Iterable[float] | None) -> torch.Tensor:
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


def priority_sample(logp: torch.Tensor, k: int, generator: torch.Generator | None = None,
                    log_pi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def _merge_draws(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, s) draws -> (ids, counts), each (rows, s): distinct ids first, zero counts after."""
    d, _ = torch.sort(draws, dim=-1)
    first = torch.ones_like(d, dtype=torch.bool)
    first[:, 1:] = d[:, 1:] != d[:, :-1]
    slot = torch.cumsum(first.long(), dim=-1) - 1  # (rows, s) run index of each draw
    counts = torch.zeros_like(d).scatter_add_(-1, slot, torch.ones_like(d))
    ids = torch.zeros_like(d).scatter_(-1, slot, d)
    return ids, counts


def to_host(reduced: dict[str, torch.Tensor], num_classes: int) -> dict[str, np.ndarray]:
    """Copy reduced tensors to numpy with their storage dtypes (uint16 ids when the classes fit)."""
    return storage_arrays({name: t.detach().cpu().numpy() for name, t in reduced.items()}, num_classes)


class HostCopy:
    """Reduced tensors on their way to the host, started without waiting for the device.

    On CUDA each tensor is copied into pinned host memory with ``non_blocking=True`` and an event is recorded
    behind the copies on the current stream: the caller goes on to queue the next batch's forward pass while the
    copies run, and :meth:`wait` blocks only on this batch's event. Only the reduced tensors ever leave the
    device. On the CPU the tensors already are host memory: ``wait`` returns them as arrays, nothing is copied.
    """

    def __init__(self, reduced: dict[str, torch.Tensor]):
        self._host: dict[str, torch.Tensor] = {}
        self._event = None
        for name, t in reduced.items():
            t = t.detach()
            if t.is_cuda:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                buf.copy_(t, non_blocking=True)
                self._host[name] = buf
            else:
                self._host[name] = t
        if any(t.is_cuda for t in reduced.values()):
            self._event = torch.cuda.Event()
            self._event.record()  # on the current stream, after the copies

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def wait(self) -> dict[str, np.ndarray]:
        if self._event is not None:
            self._event.synchronize()
        return {name: t.numpy() for name, t in self._host.items()}


def storage_arrays(arrays: dict[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
    """Host arrays -> their storage dtypes (uint16 ids when the classes fit, uint16 sample counts)."""
    out = {}
    for name, a in arrays.items():
        if name.endswith("_ids"):
            a = a.astype(numpy_id_dtype(num_classes))
        elif name == "sample_counts":
            a = a.astype(np.uint16)
        out[name] = a
    return out
