"""``topk``: the k most likely classes and one tail bucket.

Stored per row (per token): ``topk_ids`` (k; uint16 when C <= 65,536, else int32), ``topk_logprobs`` (k, float16,
largest first), ``tail_logmass`` (log of the mass outside the top k, computed exactly as a logsumexp over the
other classes; float32, float16 in token caches) and, per stored T != 1, ``tail_logmass_t`` = log(1 - sum_{top k}
q_T), the true tempered tail mass.

What the loss assumes: the k stored classes plus one tail bucket holding the rest of the mass; the student is
compared on the same k + 1 buckets, its tail bucket being its own mass outside the teacher's top k. That is the
exact KL between the two bucketed distributions (a lower bound on the full KL, data-processing inequality, that
tends to it as the tail shrinks) at every stored T: the k buckets share ``1 - tail_T`` in proportion to
``p_i^(1/T)``. At T = 1 the tail is ``exp(tail_logmass)``. *Approximation* (an unstored T, ``approximate``): the
T = 1 tail mass m spread evenly over the C - k other classes (the maximum-entropy choice), giving the tempered tail
bucket a log-weight of ``log(C - k) + (log m - log(C - k)) / T``. Far off for T > 1 on large vocabularies: 0.448
against an exact bucketed 0.630 on a 200-class teacher at T = 2 (issue 13, via the CLI).

Fused topk teachers (``padded`` targets, :meth:`TopkMode.fuse`): slots whose log-prob is -inf are unused (their
classes are in the tail) and ids may repeat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from kdcli.cache.modes.base import (
    LOGPROB_DTYPE,
    NORM_TOL,
    STAT_DTYPES,
    Mode,
    Targets,
    div_rows,
    f32,
    first,
    fmt_temperatures,
    log1mexp,
    logmeanexp,
    logprob_problems,
    lse,
    norm_problem,
    np_logsumexp,
    plausible,
    repeated_ids,
    stat_temperatures,
)
from kdcli.infra.errors import UsageError

TINY_TAIL = 1e-30  # below this the student's tail mass is recomputed in log space (float32 underflow)


def topk_bucket_logprobs(
    id_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    num_classes: int,
    temperature: float,
    tail_logmass_t: torch.Tensor | None = None,
    padded: bool = False,
) -> torch.Tensor:
    """The teacher's (b, k + 1) bucket log-probs at T: its k ids and one tail bucket (module docstring).

    ``tail_logmass_t`` (b,): the stored log tail mass at T (exact): the tail bucket gets exactly that mass and the
    k ids share the rest in proportion to ``p_i^(1/T)``. None: exact at T = 1 (``tail_logmass``); at any other T
    the uniform-tail approximation (``padded``: over the classes outside the row's used slots)."""
    T = float(temperature)
    if tail_logmass_t is not None:
        head = F.log_softmax(id_logprobs / T, dim=1) + log1mexp(tail_logmass_t)[:, None]  # (b, k)
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


def _fold(
    g: torch.Tensor, f: torch.Tensor, ids: torch.Tensor, vals: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gradient ``f[:, None] * g`` with ``vals`` at ``ids`` instead, kept as (g', f) with the row factor f left
    for the output-layer products (one V-wide pass saved): g' at ids holds ``vals / f``. Rows where f is 0 or not
    finite cannot be folded; then the factor is applied here and (g, None) returned."""
    if bool(torch.isfinite(f).all()) and bool((f.abs() > 1e-30).all()):
        return g.scatter_(1, ids, vals / f[:, None]), f
    return g.mul_(f[:, None]).scatter_(1, ids, vals), None


def _tail_grad_in_log_space(
    x: torch.Tensor, lse_: torch.Tensor, tail_log: torch.Tensor, p_tail: torch.Tensor, mult: float, c_soft: float
) -> torch.Tensor:
    """The topk gradient on tail classes, ``mult * q_m - c_soft * p_tail * q_m / q_tail``, from the tempered logits
    ``x`` of rows whose student tail mass underflows float32 (q_m = exp(x - lse), q_tail = exp(tail_log))."""
    return mult * torch.exp(x - lse_[:, None]) - c_soft * p_tail[:, None] * torch.exp(x - (lse_ + tail_log)[:, None])


@dataclass
class TopkTargets(Targets):
    ids: torch.Tensor | None = None  # (b, k) int64
    id_logprobs: torch.Tensor | None = None  # (b, k) teacher log-prob of each id (T = 1)
    tail_logmass: torch.Tensor | None = None  # (b,)
    padded: bool = False  # fused topk: slots whose id_logprobs are -inf are unused (their classes are in the tail)

    mode: ClassVar[str] = "topk"

    def top1(self):
        return self.ids[:, 0]  # ids sorted by log-prob, largest first (fused: the most likely shared id)

    def buckets(self, temperature: float, approximate: bool = False) -> torch.Tensor:
        """The teacher's (b, k + 1) bucket log-probs at T: exact at a stored T, the documented approximation at
        another T with ``approximate``, else UsageError."""
        stat = self.stat_at(temperature, approximate)
        return topk_bucket_logprobs(
            self.id_logprobs, self.tail_logmass, self.num_classes, temperature, stat, padded=self.padded
        )

    def padded_head(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For fused (``padded``) targets: which slots are used (b, k), and which classes are head buckets, a
        (b, C) mask shaped like ``like`` (ids may repeat: counted, not scattered, so the mask is deterministic)."""
        used = self.id_logprobs > float("-inf")
        return used, torch.zeros_like(like).scatter_add_(1, self.ids, used.to(like.dtype)) > 0

    def soft_rows(self, s_log, temperature, divergence, beta, approximate):
        p_log = self.buckets(temperature, approximate)  # (b, k+1)
        s_top = torch.gather(s_log, 1, self.ids)  # (b, k)
        if self.padded:  # unused slots (ids may repeat) stay in the student's tail, no bucket of their own
            used, in_head = self.padded_head(s_log)
            s_tail = torch.logsumexp(s_log.masked_fill(in_head, float("-inf")), dim=1)
            s_top = torch.where(used, s_top, float("-inf"))
        else:
            s_tail = torch.logsumexp(s_log.scatter(1, self.ids, float("-inf")), dim=1)  # (b,)
        return div_rows(p_log, torch.cat([s_top, s_tail[:, None]], dim=1), divergence, beta)

    def head_grad(self, c):
        """The bucket probability on each of the k ids and, on every other id m, the teacher's tail mass spread as
        the student spreads its own: ``p_tail * q_m / q_tail`` (W = 1)."""
        if self.padded:
            return self._head_grad_padded(c)
        qT, s, lse_, mult, c_soft = c.qT, c.s, c.lse, c.mult, c.c_soft
        p_log = self.buckets(c.T, c.approximate)
        ids = self.ids
        k = ids.shape[1]
        q_ids = qT.gather(1, ids)
        # the student's mass outside the teacher's top k: 1 - sum(q_ids), summed directly where that cancels
        tail = (1.0 - q_ids.sum(dim=1)).clamp_min(0.0)
        direct = torch.nonzero(tail < 0.05).squeeze(1)
        if len(direct):
            tail[direct] = qT[direct].scatter(1, ids[direct], 0.0).sum(dim=1)
        tail_log = torch.log(tail)
        tiny = torch.nonzero(tail < TINY_TAIL).squeeze(1)
        masked = None
        if len(tiny):  # float32 underflow: redo those rows' tail in log space
            masked = s[tiny].scatter(1, ids[tiny], -math.inf)
            tail_log[tiny] = torch.logsumexp(masked, dim=1) - lse_[tiny]
        s_buckets = torch.cat([s.gather(1, ids) - lse_[:, None], tail_log[:, None]], dim=1)
        soft_sum = float(div_rows(p_log, s_buckets, "forward", 0.5).sum())
        p_b = p_log.exp()
        # every other id m: mult * q_m - c_soft * p_tail * q_m / q_tail = f * q_m
        f = mult - c_soft * p_b[:, k] / tail_log.exp()
        if masked is not None:  # those rows' gradient in log space, at its final scale (f = 1 for them)
            qT[tiny] = _tail_grad_in_log_space(masked, lse_[tiny], tail_log[tiny], p_b[tiny, k], mult, c_soft)
            f[tiny] = 1.0
        g, f = _fold(qT, f, ids, mult * q_ids - c_soft * p_b[:, :k])
        return g, f, soft_sum

    def _head_grad_padded(self, c):
        """The same bucketed KL and gradient for fused topk targets, with the head classes as a (c, V) mask
        instead of a scatter over distinct ids. Returns the gradient with its row factor applied."""
        qT, s, lse_, mult, c_soft = c.qT, c.s, c.lse, c.mult, c.c_soft
        p_log = self.buckets(c.T, c.approximate)  # (c, k + 1), -inf on unused slots
        ids, k = self.ids, self.ids.shape[1]
        used, head = self.padded_head(qT)
        tail_log = torch.log(qT.masked_fill(head, 0.0).sum(dim=1))  # the student's mass outside the head, summed
        tiny = torch.nonzero(tail_log < math.log(TINY_TAIL)).squeeze(1)
        if len(tiny):  # float32 underflow: those rows' tail in log space
            tail_log[tiny] = torch.logsumexp(s[tiny].masked_fill(head[tiny], -math.inf), dim=1) - lse_[tiny]
        s_at = torch.where(used, s.gather(1, ids) - lse_[:, None], -math.inf)
        soft_sum = float(div_rows(p_log, torch.cat([s_at, tail_log[:, None]], dim=1), "forward", 0.5).sum())
        p_b = p_log.exp()
        p_head = torch.zeros_like(qT).scatter_add_(1, ids, torch.where(used, p_b[:, :k], 0.0))
        # head class i: mult * q_i - c_soft * p_i; tail class m: mult * q_m - c_soft * p_tail * q_m / q_tail
        tail_grad = qT * (mult - c_soft * p_b[:, k] / tail_log.exp())[:, None]
        if len(tiny):
            tail_grad[tiny] = _tail_grad_in_log_space(s[tiny], lse_[tiny], tail_log[tiny], p_b[tiny, k], mult, c_soft)
        return torch.where(head, qT * mult - c_soft * p_head, tail_grad), None, soft_sum


def fuse_topk(
    ids: list[np.ndarray], logprobs: list[np.ndarray], tails: list[np.ndarray], weights: list[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """K teachers' topk rows (ids (n, k_j), log-probs, log tail mass (n,)) -> the mixture on the buckets of the ids
    every teacher kept + one tail: (ids (n, sum k_j), log-probs, log tail (n,)), float32. Exact: mixing commutes
    with bucketing (kdcli.cache.fused).

    The slots are the union of the teachers' ids (repeats included); a slot is *used* (finite log-prob) at the
    first occurrence of an id every teacher kept, and every other slot's class is in the tail. Slots are sorted by
    ``sum_{k kept i} w_k p_k(i)``: exact for the shared ids, a lower bound for the others (a repeat sorts last), so
    slot 0 is the fused teacher's most likely class as far as the caches know it (``TopkTargets.top1``)."""
    allids = np.concatenate(ids, axis=1)  # (n, K)
    n, width = allids.shape
    known = np.zeros((n, width))  # sum over the teachers that kept the id of w_k p_k(id)
    count = np.zeros((n, width), dtype=np.int64)  # how many teachers kept it
    eqs = [allids[:, :, None] == idj[:, None, :] for idj in ids]  # (n, K, k_j): slot == teacher j's id
    for eq, lpj, wj in zip(eqs, logprobs, weights):
        known += wj * np.where(eq, np.exp(lpj[:, None, :].astype(np.float64)), 0.0).sum(axis=2)
        count += eq.any(axis=2)
    firsts = np.ones((n, width), dtype=bool)  # the first occurrence of each id in the row
    for j in range(1, width):
        firsts[:, j] = ~(allids[:, :j] == allids[:, j : j + 1]).any(axis=1)
    shared = firsts & (count == len(ids))
    with np.errstate(divide="ignore"):
        fused = np.where(shared, np.log(known), -np.inf)
        key = np.where(firsts, np.log(known), -np.inf)
    # the tail: every teacher's own tail plus its mass on the ids not shared by all, mixed
    tail_parts = []
    for eq, lpj, tj in zip(eqs, logprobs, tails):
        in_i = (eq & shared[:, :, None]).any(axis=1)  # (n, k_j): teacher j's ids that are shared
        ext = np.concatenate([tj[:, None].astype(np.float64), np.where(in_i, -np.inf, lpj.astype(np.float64))], 1)
        tail_parts.append(np_logsumexp(ext, axis=1))
    tail = np.minimum(logmeanexp(tail_parts, weights), 0.0)
    order = np.argsort(-key, axis=1, kind="stable")
    return (
        np.take_along_axis(allids, order, axis=1),
        np.take_along_axis(fused, order, axis=1).astype(np.float32),
        tail.astype(np.float32),
    )


class TopkMode(Mode):
    name = "topk"
    keys_ = ("topk_ids", "topk_logprobs", "tail_logmass")
    size_option = size_key = "top_k"
    stat_key = "tail_logmass_t"
    fusion = "buckets"
    loss_note = "exact over the top-k + tail buckets"
    approximation = "uniform tail"

    def check_size(self, k, width, what):
        if k >= width:
            raise UsageError(f"--top-k {k} keeps every one of the {width} {what}; use --mode full")

    def layout(self, k, width, token):
        out = super().layout(k, width, token)
        if token:
            out["tail_dtype"] = "float16"
        return out

    def reduce(self, logp, k, generator, temperatures, sampler_temperatures=None):
        ts = stat_temperatures(temperatures)
        k = min(int(k), logp.shape[-1])
        vals, ids = torch.topk(logp, k, dim=-1)  # (rows, k), sorted descending
        rest = logp.scatter(-1, ids, float("-inf"))
        tail = torch.logsumexp(rest, dim=-1)  # (rows,) log mass outside the top k (-inf when k == C)
        out = {
            "topk_ids": ids.to(torch.int32),
            "topk_logprobs": vals.to(LOGPROB_DTYPE),
            "tail_logmass": tail.to(torch.float32),
        }
        if ts:  # log(1 - sum_topk q_T) = logsumexp_{i not in top k}(logp_i / T) - log Z_T, per T; one V-wide pass
            cols = []  # each: log Z_T is that tail sum logaddexp'd with the k-wide sum over the top k
            for t in ts:
                rest_t = torch.logsumexp(rest / t, dim=-1)
                cols.append(rest_t - torch.logaddexp(rest_t, torch.logsumexp(vals / t, dim=-1)))
            out["tail_logmass_t"] = torch.stack(cols, dim=-1).to(STAT_DTYPES["tail_logmass_t"])
        return out

    def storage(self, arrays, layout):
        out = super().storage(arrays, layout)
        if layout.get("tail_dtype") and "tail_logmass" in out:
            out["tail_logmass"] = out["tail_logmass"].astype(layout["tail_dtype"])
        return out

    def bytes_per_entry(self, layout, width, n_stats):
        tail = np.dtype(layout.get("tail_dtype") or np.float32).itemsize
        return (np.dtype(layout["id_dtype"]).itemsize + 2) * int(layout["top_k"]) + tail + 2 * n_stats

    def describe(self, k, token):
        return f", k={k}"

    def expected(self, m):
        return {
            **self.ids_expected(m, m.get("top_k")),
            **self.stat_expected(m),
            "tail_logmass": (np.dtype(m.get("tail_dtype") or np.float32), ()),
        }

    def problems(self, manifest, arrays, where):
        num_classes = int(manifest["num_classes"])
        ids, lp, tail = arrays["topk_ids"], f32(arrays["topk_logprobs"]), arrays["tail_logmass"]
        out = []
        fine = (not ids.size or int(ids.max()) < num_classes) and plausible(lp, f32(tail)) and _distinct_sorted(ids, lp)
        if not fine:  # the fast all-clear failed: find and name the first bad row
            if ids.size and int(ids.max()) >= num_classes:
                out.append(
                    f"topk_ids has id {int(ids.max())} >= {num_classes} classes at {where(first(ids >= num_classes))}"
                )
            out += repeated_ids("topk_ids", ids, where)
            found = logprob_problems("topk_logprobs", lp, where)
            if not found and lp.shape[-1] > 1 and (np.diff(lp, axis=-1) > 0).any():
                found = [f"topk_logprobs are not sorted (largest first) at {where(first(np.diff(lp, axis=-1) > 0))}"]
            t = tail.astype(np.float32)
            if np.isnan(t).any() or (t > 0).any():
                found.append(f"tail_logmass is NaN or positive at {where(first(np.isnan(t) | (t > 0)))}")
            out += found
            if not found:
                out += norm_problem(
                    lse(np.concatenate([lp, t[:, None]], axis=-1)), "top-k log-probs + tail log-mass", where
                )
        return out + self.stat_problems(manifest, arrays, where)

    def stat_problems(self, manifest, arrays, where):
        """``tail_logmass_t`` <= 0 and, at T > 1, >= the T = 1 tail (tempering never moves mass into the top k;
        <= at T < 1)."""
        key = self.stat_key
        if key not in arrays:
            return []
        ts = stat_temperatures(manifest.get("temperatures"))
        x = np.asarray(arrays[key], dtype=np.float32)
        tail = arrays.get("tail_logmass")
        if x.ndim != 2 or x.shape[1] != len(ts):
            return [f"{key} has shape {x.shape}, expected (rows, {len(ts)}) for T = {fmt_temperatures(ts)}"]
        if np.isnan(x).any():
            return [f"{key} has NaN at {where(first(np.isnan(x)))}"]
        slack = NORM_TOL + 2.0**-10 * np.abs(np.where(np.isfinite(x), x, 0))  # float16 rounding
        bad = x > slack
        if tail is not None:
            t1 = np.asarray(tail, dtype=np.float32)[:, None]
            with np.errstate(invalid="ignore"):
                off = np.where(np.asarray(ts)[None, :] > 1, x < t1 - slack, x > t1 + slack)
            bad |= off & np.isfinite(t1)
        if bad.any():
            i = first(bad)
            j = int(np.flatnonzero(bad[i])[0])
            t1 = f"{float(tail[i]):+.4f}" if tail is not None else "not stored"
            return [
                f"{key} is not a possible tempered tail mass at {where(i)} (log {float(x[i, j]):+.4f} at "
                f"T = {ts[j]:g}; log tail at T = 1: {t1})"
            ]
        return []

    def targets(self, arrays, num_classes, temperatures, sampler_temperatures):
        return TopkTargets(
            **self.target_fields(arrays, num_classes, temperatures),
            tail_logmass=torch.from_numpy(arrays["tail_logmass"]).float(),
        )

    def fuse(self, parts, weights, combine):
        """The mixture on the ids every teacher kept + one tail (:func:`fuse_topk`), laid out on the union of the
        teachers' ids; the targets are ``padded``."""
        ids, lp, tail = fuse_topk(
            [p["topk_ids"] for p in parts],
            [p["topk_logprobs"] for p in parts],
            [p["tail_logmass"] for p in parts],
            weights,
        )
        return {"topk_ids": ids, "topk_logprobs": lp, "tail_logmass": tail}

    def fused_targets(self, arrays, num_classes):
        t = self.targets(arrays, num_classes, (1.0,), (1.0,))
        t.padded = True
        return t


def _distinct_sorted(ids: np.ndarray, lp: np.ndarray) -> bool:
    if ids.shape[-1] < 2:
        return True
    s = np.sort(ids, axis=-1)
    return not (s[:, 1:] == s[:, :-1]).any() and not (np.diff(lp, axis=-1) > 0).any()


MODE = TopkMode()
