"""``sample`` (RS-KD, Anshumann et al. 2025, "Sparse Logit Sampling"): S draws from the teacher at T = 1.

Stored per row (per token): ``sample_ids`` and ``sample_counts`` (S each: the draws merged into distinct ids with
their counts, unused slots count 0; counts uint16, uint8 in token caches with S <= 255), ``sample_logprobs`` (S,
float16: the teacher's log-prob of each id) and, per stored T != 1, ``sample_logz_t`` = log Z_T.

What the loss assumes: for any f, ``sum_j (c_j / n) * (q_T(j) / p_j) * f(j)`` is an unbiased estimate of
``sum_i q_T(i) f(i)`` (importance sampling, no self-normalisation), and ``q_T(j) / p_j = exp(logp_j * (1/T - 1) -
log Z_T)`` is known exactly from the stored log Z_T. At T = 1 the weights are c_j / n. *Approximation* (an unstored
T): the same weights with Z_T estimated from the draws and the weights normalised to sum to 1 (``w ~ c_j
p_j^(1/T - 1)``): consistent but biased for a few dozen draws (1.25x the exact KL with 24 draws at T = 2 on a
200-class teacher in issue 13; 1.36x in tests/test_sparse_temperatures.py's teacher).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from kdcli.cache.modes.base import (
    LOGPROB_DTYPE,
    STAT_DTYPES,
    SampledMode,
    WeightedIdTargets,
    first,
    ids_in_range,
    log_normalizers,
    logprob_problems,
    stat_temperatures,
)


def merge_draws(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, s) draws -> (ids, counts), each (rows, s): distinct ids first, zero counts after."""
    d, _ = torch.sort(draws, dim=-1)
    new = torch.ones_like(d, dtype=torch.bool)
    new[:, 1:] = d[:, 1:] != d[:, :-1]
    slot = torch.cumsum(new.long(), dim=-1) - 1  # (rows, s) run index of each draw
    counts = torch.zeros_like(d).scatter_add_(-1, slot, torch.ones_like(d))
    ids = torch.zeros_like(d).scatter_(-1, slot, d)
    return ids, counts


def sample_weights(
    counts: torch.Tensor, id_logprobs: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
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


@dataclass
class SampleTargets(WeightedIdTargets):
    id_logprobs: torch.Tensor | None = None  # (b, S) teacher log-prob of each id (T = 1)
    counts: torch.Tensor | None = None  # (b, S) draw counts, 0 for unused slots

    mode: ClassVar[str] = "sample"

    def top1(self):
        """The most drawn id."""
        return torch.gather(self.ids, 1, self.counts.argmax(dim=-1, keepdim=True)).squeeze(1)

    def id_weights(self, temperature, approximate=False):
        """``counts / draws`` at T = 1 (self-normalised: exact); at a stored T the unbiased ``(c / n) q_T / p``
        (W their row sum); the self-normalised approximation at an unstored T."""
        T = float(temperature)
        stat = self.stat_at(T, approximate)
        lp = self.id_logprobs
        if stat is None:  # T = 1 (exact) or the approximation
            w, p_log, used, _ = sample_weights(self.counts, lp, T)
            return w, p_log, used, None
        c = self.counts
        used = c > 0
        n = c.sum(dim=1, keepdim=True)
        p_log = torch.where(used, lp / T - stat[:, None], torch.zeros_like(lp))
        w = torch.where(used, (c / n) * torch.exp(lp * (1.0 / T - 1.0) - stat[:, None]), torch.zeros_like(lp))
        return w, p_log, used, w.sum(dim=1)

    def student_weights(self, s_at, used):
        """(counts / draws) * s(j) / p(j): p at T = 1 is the sampler."""
        c = self.counts
        return torch.where(
            used, (c / c.sum(dim=1, keepdim=True)) * torch.exp(s_at - self.id_logprobs), torch.zeros_like(s_at)
        )


class SampleMode(SampledMode):
    name = "sample"
    keys_ = ("sample_ids", "sample_counts", "sample_logprobs")
    stat_key = "sample_logz_t"
    loss_note = "unbiased estimate from the sampled ids"

    def layout(self, k, width, token):
        out = super().layout(k, width, token)
        if token:
            out["count_dtype"] = (np.dtype(np.uint8) if k <= 255 else np.dtype(np.uint16)).name
        return out

    def reduce(self, logp, k, generator, temperatures, sampler_temperatures=None):
        ts = stat_temperatures(temperatures)
        s = int(k)
        # A row with NaN/inf logits is refused by the caller after the fact (no device sync per batch); a
        # uniform stand-in keeps multinomial from failing (on CUDA: a device-side assert) before that check.
        probs = torch.nan_to_num(logp.exp(), nan=1.0, posinf=1.0, neginf=0.0)
        draws = torch.multinomial(probs, s, replacement=True, generator=generator)  # (rows, s)
        ids, counts = merge_draws(draws)
        lp = torch.gather(logp, -1, ids.long())
        lp = torch.where(counts > 0, lp, torch.zeros_like(lp))
        out = {
            "sample_ids": ids.to(torch.int32),
            "sample_counts": counts.to(torch.int32),
            "sample_logprobs": lp.to(LOGPROB_DTYPE),
        }
        if ts:
            out["sample_logz_t"] = log_normalizers(logp, ts).to(STAT_DTYPES["sample_logz_t"])
        return out

    def storage(self, arrays, layout):
        out = super().storage(arrays, layout)
        if "sample_counts" in out:
            out["sample_counts"] = out["sample_counts"].astype(layout.get("count_dtype") or np.uint16)
        return out

    def bytes_per_entry(self, layout, width, n_stats):
        counts = np.dtype(layout.get("count_dtype") or np.uint16).itemsize
        return (np.dtype(layout["id_dtype"]).itemsize + counts + 2) * int(layout["samples"]) + 4 * n_stats

    def describe(self, k, token):
        return f", {k} draws" + ("/token" if token else "")

    def expected(self, m):
        return {
            **self.ids_expected(m, m.get("samples")),
            **self.stat_expected(m),
            "sample_counts": (np.dtype(m.get("count_dtype") or np.uint16), (m.get("samples"),)),
        }

    def problems(self, manifest, arrays, where):
        """Counts add up to the draws, ids in range, used slots packed first, distinct and ascending."""
        out = []
        num_classes = int(manifest["num_classes"])
        ids, counts, lp = arrays["sample_ids"], arrays["sample_counts"], arrays["sample_logprobs"]
        used = counts > 0
        draws = int(manifest.get("samples") or 0)
        total = counts.astype(np.int64).sum(axis=-1)
        if draws and (total != draws).any():
            i = int(np.flatnonzero(total != draws)[0])
            out.append(f"sample_counts of {where(i)} add up to {int(total[i])}, not the {draws} draws")
        out += ids_in_range("sample_ids", ids, num_classes, where, valid=used)
        prefix = np.cumprod(used, axis=-1).astype(bool)  # used slots come first, then unused
        if (used != prefix).any():
            out.append(
                f"sample slots are not packed (a used slot after an unused one) at {where(first(used != prefix))}"
            )
        i64 = ids.astype(np.int64)
        both = used[:, 1:] & used[:, :-1]
        if (both & (i64[:, 1:] <= i64[:, :-1])).any():
            out.append(
                f"sample_ids are not distinct and ascending at {where(first(both & (i64[:, 1:] <= i64[:, :-1])))}"
            )
        out += logprob_problems("sample_logprobs", lp, where, valid=used)
        return out + self.stat_problems(manifest, arrays, where)

    def distinct_ids(self, arrays):
        return int(np.count_nonzero(arrays["sample_counts"]))

    def targets(self, arrays, num_classes, temperatures, sampler_temperatures):
        counts = torch.from_numpy(arrays["sample_counts"].astype("float32"))
        return SampleTargets(**self.target_fields(arrays, num_classes, temperatures), counts=counts)


MODE = SampleMode()
