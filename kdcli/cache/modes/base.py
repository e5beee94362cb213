"""What every cache mode shares: the :class:`Mode` interface, the :class:`Targets` it hands the losses, and the
primitives several modes use (temperatures, divergences between bucketed distributions, block checks).

A mode (full, topk, sample, priority: one file each, registered in :mod:`kdcli.cache.modes`) is everything that
depends on what a cache stores per row (per predicted token in a token cache):

- the ``cache-teacher`` option that sizes it (``--top-k``, ``--samples``) and what it refuses;
- its datasets, their dtypes and the manifest keys that record them; bytes per entry;
- its reduction of teacher log-probabilities on the device (:meth:`Mode.reduce`), and per stored temperature the
  statistic that makes it exact or unbiased there (``STAT_DTYPES`` below gives the measured reasons for the dtypes);
- the checks every read and ``cache verify`` run on it (:meth:`Mode.problems`, :meth:`Mode.expected`);
- the :class:`Targets` its arrays become for the losses: the soft divergence per row, the fused LM head's gradient
  and the teacher's top-1 live there (:mod:`kdcli.losses` and :mod:`kdcli.lm.head_loss` call them).

Notation (as :mod:`kdcli.losses`): the cache stores log-probs at T = 1, ``logp = log p``; the teacher at T is
``q_T = p^(1/T) / Z_T`` with ``Z_T = sum_j p_j^(1/T)``; s_T is the student at T.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch

from kdcli.infra.errors import UsageError

# -- temperatures ---------------------------------------------------------------------------------------------------
T_RTOL = 1e-6  # a temperature matches a stored one within this relative tolerance


def normalize_temperatures(temperatures: Iterable[float] | None) -> tuple[float, ...]:
    """Sorted, distinct, positive and finite temperatures, always including 1 (which needs no extra statistics).
    Raises ValueError naming the bad value."""
    out = {1.0}
    for t in temperatures or ():
        t = float(t)
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperatures must be positive and finite; got {t!r}")
        out.add(t)
    return tuple(sorted(out))


def stat_temperatures(temperatures: Iterable[float] | None) -> tuple[float, ...]:
    """The temperatures that get a column in the per-temperature arrays: the listed ones other than 1, sorted."""
    return tuple(t for t in normalize_temperatures(temperatures) if t != 1.0)


def match_temperature(temperatures: Iterable[float], T: float) -> float | None:
    """The stored temperature equal to T (within ``T_RTOL``: float noise from YAML or a flag), or None."""
    for t in temperatures:
        if math.isclose(t, T, rel_tol=T_RTOL):
            return t
    return None


def fmt_temperatures(ts: Iterable[float]) -> str:
    return ", ".join(f"{t:g}" for t in ts)


def is_t1(temperature: float) -> bool:
    return math.isclose(float(temperature), 1.0, rel_tol=T_RTOL)


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
LOGPROB_DTYPE = torch.float16


def log_normalizers(logp: torch.Tensor, temperatures: tuple[float, ...]) -> torch.Tensor:
    """(rows, C) log-probs at T = 1 -> (rows, len(temperatures)) log Z_T = logsumexp(logp / T)."""
    return torch.stack([torch.logsumexp(logp / t, dim=-1) for t in temperatures], dim=-1)


def np_logsumexp(a: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
    """log sum exp along ``axis``, shifted by the maximum (-inf where every term is -inf)."""
    m = a.max(axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    out = np.log(np.exp(a - m).sum(axis=axis, keepdims=True)) + m
    return out if keepdims else out.squeeze(axis)


def logmeanexp(xs: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """log sum_k w_k exp(xs[k]) in float64 (-inf where every term is -inf): a mixture's log-probs."""
    return np_logsumexp(np.stack([x.astype(np.float64) + np.log(w) for x, w in zip(xs, weights)]), axis=0)


def numpy_id_dtype(num_classes: int) -> np.dtype:
    """Class ids as uint16 when the classes (vocabulary) fit, else int32."""
    return np.dtype(np.uint16) if num_classes <= 65536 else np.dtype(np.int32)


# -- divergences between normalised distributions (per row) -----------------------------------------------------------
DIVERGENCES = ("forward", "reverse", "jsd")


def kl_rows(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """sum_i p_i (log p_i - log q_i) per row, with 0 * log 0 = 0."""
    p = p_log.exp()
    terms = torch.where(p > 0, p * (p_log - q_log), 0.0)  # a scalar 0: no zeros tensor per call
    return terms.sum(dim=-1)


def div_rows(p_log: torch.Tensor, q_log: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """Divergence per row between two normalised distributions given as log-probs (teacher p, student q)."""
    if divergence == "forward":
        return kl_rows(p_log, q_log)
    if divergence == "reverse":
        return kl_rows(q_log, p_log)
    m_log = torch.logaddexp(p_log + math.log(beta), q_log + math.log(1.0 - beta))  # log(beta*p + (1-beta)*q)
    return beta * kl_rows(p_log, m_log) + (1.0 - beta) * kl_rows(q_log, m_log)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012); x = -inf gives 0, x = 0 gives -inf."""
    x = x.clamp_max(0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# -- the targets a mode hands the losses ------------------------------------------------------------------------------


@dataclass
class HeadChunk:
    """One chunk of the fused LM head (:mod:`kdcli.lm.head_loss`), as a mode's targets see it: the student's
    tempered logits ``s`` (c, V), their softmax ``qT`` (a buffer the gradient may be written into), the row
    log-normaliser ``lse`` (log q = s - lse), the temperature, and the gradient's coefficients: ``mult``
    multiplies q_T, ``c_soft`` the teacher's part, ``shared_hard`` the hard term's share of ``mult`` when one
    softmax serves both terms (T = 1; else 0)."""

    s: torch.Tensor
    qT: torch.Tensor
    lse: torch.Tensor
    T: float
    mult: float
    c_soft: float
    shared_hard: float
    approximate: bool


@dataclass
class Targets:
    """Cached teacher targets for a batch of rows, on the student's device: what a mode's arrays become.

    ``temperatures`` are the temperatures the cache stores exactly (sorted, 1 included); ``stats[:, j]`` is the
    per-row statistic for the j-th of them other than 1. Subclasses (one per mode, in the mode's file) hold their
    arrays and say how the soft term is computed from them: :meth:`soft_rows` (the divergence per row, without
    T^2), :meth:`head_grad` (the fused LM head's gradient on a chunk), :meth:`top1`."""

    num_classes: int
    temperatures: tuple = (1.0,)
    stats: torch.Tensor | None = None

    mode: ClassVar[str] = ""  # the mode's name (messages, describe)
    exact_at_every_T: ClassVar[bool] = False  # a full distribution: any T is exact
    dense: ClassVar[bool] = False  # ``logprobs`` holds every class (kd_loss's closed-form path)

    def _map(self, f) -> Targets:
        kw = {}
        for fl in fields(self):
            v = getattr(self, fl.name)
            if isinstance(v, torch.Tensor):
                v = f(v)
            elif isinstance(v, tuple) and v and isinstance(v[0], Targets):
                v = tuple(p._map(f) for p in v)
            kw[fl.name] = v
        return type(self)(**kw)

    def to(self, device: torch.device) -> Targets:
        return self._map(lambda v: v.to(device, non_blocking=True))

    def rows(self, sl: slice) -> Targets:
        """The same targets for rows ``sl`` only (views, no copies)."""
        return self._map(lambda v: v[sl])

    def take(self, index: torch.Tensor) -> Targets:
        """The same targets for rows ``index`` (a gather: e.g. the cached positions a cross-tokenizer student aligns
        with)."""
        return self._map(lambda v: v[index])

    def top1(self) -> torch.Tensor:
        """(b,) the teacher's most likely class."""
        raise NotImplementedError

    def check_divergence(self, divergence: str) -> None:
        """UsageError (exit 2) for a divergence these targets cannot serve."""

    def stat_at(self, temperature: float, approximate: bool = False) -> torch.Tensor | None:
        """(b,) the stored statistic at ``temperature`` for a stored T != 1; None at T = 1 (nothing needed) or when
        approximating an unstored T; UsageError at an unstored T without ``approximate``."""
        T = float(temperature)
        if not require_temperature(self.mode, self.exact_at_every_T, self.temperatures, T, approximate):
            return None
        t = match_temperature(self.temperatures, T)
        if self.exact_at_every_T or t is None or t == 1.0:
            return None
        return self.stats[:, stat_temperatures(self.temperatures).index(t)]

    def soft_rows(
        self, s_log: torch.Tensor, temperature: float, divergence: str, beta: float, approximate: bool
    ) -> torch.Tensor:
        """(b,) the divergence between teacher_T and student_T per row, without T^2 (``s_log``: the student's
        log-softmax at T, (b, C))."""
        raise NotImplementedError

    def head_grad(self, c: HeadChunk) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """The fused LM head on one chunk (forward KL): ``(g, f, soft_sum)``, the gradient w.r.t. the tempered
        logits being ``f[:, None] * g`` (``g`` itself when f is None), and the chunk's summed KL."""
        raise NotImplementedError


def require_temperature(
    mode: str, exact_at_every_T: bool, temperatures, temperature: float, approximate: bool = False
) -> bool:
    """True when targets of ``mode`` storing ``temperatures`` are exact/unbiased at ``temperature`` (always, for a
    mode ``exact_at_every_T``); False when they are not but ``approximate`` allows the documented approximation;
    else :class:`UsageError` (exit 2) naming the stored temperatures."""
    if exact_at_every_T or match_temperature(tuple(temperatures) + (1.0,), float(temperature)) is not None:
        return True
    if approximate:
        return False
    raise UsageError(
        f"this {mode} cache is exact only at the temperatures it stores (T = "
        f"{fmt_temperatures(sorted(set(temperatures)))}), not at T = {float(temperature):g}: rebuild it with "
        f"cache-teacher --temperatures including {float(temperature):g}, train/evaluate at a stored T, or accept "
        "the documented approximation with --approximate-temperature"
    )


# -- checks on stored arrays (every read, cache verify, every shard before it is published) ------------------------
NORM_TOL = 1e-2
"""Max |logsumexp| (nats) of a stored distribution. fp16 log-probs round each value to 2^-12 relative, which moves
the total mass by at most entropy * 2^-12 (< 3e-3 for a 50k vocabulary); anything past 1e-2 is damage."""


def lse(a: np.ndarray) -> np.ndarray:
    """Row-wise logsumexp in float32 (``-inf`` entries allowed; ample for a 1e-2 tolerance)."""
    a = a.astype(np.float32, copy=False)
    m = np.max(a, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", under="ignore"):
        return np.log(np.sum(np.exp(a - m), axis=-1)) + m[..., 0]


def first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))[0])


def logprob_problems(name: str, lp: np.ndarray, where, valid: np.ndarray | None = None) -> list[str]:
    v = lp if valid is None else np.where(valid, lp, 0)
    bad = ~np.isfinite(v)
    if bad.any():
        return [f"{name} has NaN/inf at {where(first(bad))}"]
    pos = v > 0
    if pos.any():
        return [f"{name} has a positive log-probability at {where(first(pos))}"]
    return []


def norm_problem(lse_rows: np.ndarray, what: str, where) -> list[str]:
    off = np.abs(lse_rows) > NORM_TOL
    if off.any():
        i = first(off)
        return [f"{what} does not normalise at {where(i)}: logsumexp = {lse_rows[i]:+.4f} (tolerance {NORM_TOL:g})"]
    return []


def f32(a: np.ndarray) -> np.ndarray:
    """float16 -> float32. numpy's cast is scalar code; torch's is vectorised (F16C), ~1.5-2x faster, and torch is
    already loaded wherever caches are read for training."""
    if a.dtype == np.float16 and "torch" in sys.modules:
        return sys.modules["torch"].from_numpy(np.ascontiguousarray(a)).float().numpy()
    return a.astype(np.float32)


def plausible(lp: np.ndarray, tail: np.ndarray | None) -> bool:
    """Fast all-clear for (rows, k) float32 log-probs (+ a tail log-mass per row): all finite and <= 0 and every
    row's mass within NORM_TOL of 1. exp(lp) <= 1 cannot overflow; NaN fails every comparison."""
    if lp.size and not (lp.max() <= 0 and lp.min() > -np.inf):
        return False
    mass = np.exp(lp).sum(axis=-1)
    if tail is not None:
        if tail.size and not tail.max() <= 0:  # -inf allowed: no mass outside the top k
            return False
        mass += np.exp(tail)
    return bool(np.all(np.abs(np.log(mass)) <= NORM_TOL))


def ids_in_range(name: str, ids: np.ndarray, num_classes: int, where, valid: np.ndarray | None = None) -> list[str]:
    bad = ids >= num_classes if valid is None else valid & (ids >= num_classes)
    if bad.any():
        return [f"{name} has an id >= {num_classes} classes at {where(first(bad))}"]
    return []


def repeated_ids(name: str, ids: np.ndarray, where) -> list[str]:
    if ids.shape[-1] < 2:
        return []
    s = np.sort(ids.astype(np.int64), axis=-1)
    dup = (s[:, 1:] == s[:, :-1]).any(axis=-1)
    return [f"{name} repeats an id at {where(int(np.flatnonzero(dup)[0]))}"] if dup.any() else []


# -- the mode interface -----------------------------------------------------------------------------------------------


class Mode:
    """One cache mode. Subclasses set the class attributes and implement the methods; see the module docstring."""

    name: ClassVar[str]
    keys_: ClassVar[tuple[str, ...]]  # the datasets stored per row (per token), before the per-T statistic
    size_option: ClassVar[str | None] = None  # the cache-teacher option that sets K (top_k, samples)
    size_key: ClassVar[str | None] = None  # the manifest key recording it
    sparse: ClassVar[bool] = True  # keeps a subset of classes (per-temperature statistics; compressed by default)
    sampled: ClassVar[bool] = False  # reduce() draws: seeded per teacher batch
    stat_key: ClassVar[str | None] = None  # the per-temperature statistic's dataset
    exact_at_every_T: ClassVar[bool] = False
    fusion: ClassVar[str] = "mixture"  # how K caches of this mode fuse (kdcli.cache.fused): exact/buckets/mixture
    loss_note: ClassVar[str] = ""  # what the soft term is at a stored T (the loss line)
    approximation: ClassVar[str] = ""  # what --approximate-temperature does at another T

    # -- cache-teacher ------------------------------------------------------------------------------------------------
    def size(self, cfg: Any) -> int | None:
        """K for this run (``--top-k`` / ``--samples``), None for a mode without one."""
        return getattr(cfg, self.size_option) if self.size_option else None

    def check_size(self, k: int | None, width: int, what: str) -> None:
        """Refuse (exit 2) a K this mode cannot serve on ``width`` classes (or vocabulary entries)."""

    def keys(self, temperatures: Iterable[float] | None = None) -> tuple[str, ...]:
        """The datasets a cache of this mode holds per row (per token for token caches), for the stored
        temperatures."""
        extra = (self.stat_key,) if self.stat_key and stat_temperatures(temperatures) else ()
        return self.keys_ + extra

    def temperature_layout(
        self, temperatures: Iterable[float] | None, sampler_temperatures: Iterable[float] | None = None
    ) -> dict:
        """Manifest keys recording the stored temperatures (they are also part of the cache's identity)."""
        ts = normalize_temperatures(temperatures)
        stats = stat_temperatures(ts)
        return {
            "temperatures": list(ts),
            "stat_temperatures": list(stats),
            "stat_dtype": str(STAT_DTYPES[self.stat_key]).removeprefix("torch.") if stats else None,
            "sampler_temperatures": None,
        }

    def layout(self, k: int | None, width: int, token: bool) -> dict:
        """The manifest keys describing the stored arrays (besides temperatures): K under ``top_k`` / ``samples``,
        dtypes; token caches (``token``) also record the narrower per-token dtypes."""
        out = {
            "top_k": k if self.size_key == "top_k" else None,
            "samples": k if self.size_key == "samples" else None,
            "logprob_dtype": "float16",
            "id_dtype": numpy_id_dtype(width).name if self.sparse else None,
        }
        if token:
            out.update(count_dtype=None, tail_dtype=None)
        return out

    def reduce(
        self,
        logp: torch.Tensor,
        k: int | None,
        generator: torch.Generator | None,
        temperatures: Iterable[float] | None,
        sampler_temperatures: Iterable[float] | None = None,
    ) -> dict[str, torch.Tensor]:
        """(rows, C) log-probs (T = 1, float32) -> the stored per-row tensors, still on the device."""
        raise NotImplementedError

    def storage(self, arrays: dict[str, np.ndarray], layout: dict) -> dict[str, np.ndarray]:
        """Host arrays -> the dtypes this mode stores (ids as the layout's ``id_dtype``)."""
        out = dict(arrays)
        for name in self.keys_:
            if name.endswith("_ids") and name in out:
                out[name] = out[name].astype(layout["id_dtype"])
        return out

    def bytes_per_entry(self, layout: dict, width: int, n_stats: int) -> int:
        """Bytes one row (token) of this mode stores, its statistics included."""
        raise NotImplementedError

    def describe(self, k: int | None, token: bool) -> str:
        """The cache-teacher log line's part naming K (", k=5")."""
        return ""

    # -- checks ---------------------------------------------------------------------------------------------------
    def expected(self, m: dict) -> dict[str, tuple[np.dtype | None, tuple]]:
        """name -> (dtype, trailing shape) of every dataset of this mode a shard must hold."""
        raise NotImplementedError

    def ids_expected(self, m: dict, k: int | None) -> dict[str, tuple[np.dtype | None, tuple]]:
        """A sparse mode's ids (the manifest's ``id_dtype``) and their float16 log-probs, K per entry."""
        ids, lp = self.keys_[0], self.keys_[0].replace("_ids", "_logprobs")
        return {ids: (np.dtype(m["id_dtype"]) if m.get("id_dtype") else None, (k,)), lp: (np.dtype(np.float16), (k,))}

    def stat_expected(self, m: dict) -> dict[str, tuple[np.dtype | None, tuple]]:
        stats = stat_temperatures(m.get("temperatures"))
        if not (self.stat_key and stats):
            return {}
        return {
            self.stat_key: (
                np.dtype(m.get("stat_dtype") or str(STAT_DTYPES[self.stat_key]).removeprefix("torch.")),
                (len(stats),),
            )
        }

    def problems(self, manifest: dict, arrays: dict[str, np.ndarray], where) -> list[str]:
        """Problems in a block of this mode's arrays (empty: they look right). ``where(i)`` names entry i."""
        raise NotImplementedError

    def stat_problems(self, manifest: dict, arrays: dict[str, np.ndarray], where) -> list[str]:
        """The per-temperature statistic must be possible values (log Z_T between 0 and (1 - 1/T) log C: Z_T =
        sum p^(1/T) is 1 for a one-hot p and C^(1 - 1/T) for a uniform one); modes override for other stats."""
        key = self.stat_key
        if key not in arrays:
            return []
        ts = stat_temperatures(manifest.get("temperatures"))
        x = np.asarray(arrays[key], dtype=np.float32)
        num_classes = int(manifest["num_classes"])
        if x.ndim != 2 or x.shape[1] != len(ts):
            return [f"{key} has shape {x.shape}, expected (rows, {len(ts)}) for T = {fmt_temperatures(ts)}"]
        if np.isnan(x).any():
            return [f"{key} has NaN at {where(first(np.isnan(x)))}"]
        lo = np.minimum(0.0, (1 - 1 / np.asarray(ts)) * np.log(num_classes))[None, :] - NORM_TOL
        hi = np.maximum(0.0, (1 - 1 / np.asarray(ts)) * np.log(num_classes))[None, :] + NORM_TOL
        with np.errstate(invalid="ignore"):
            bad = ~((x >= lo) & (x <= hi))
        if bad.any():
            i = first(bad)
            j = int(np.flatnonzero(bad[i])[0])
            return [
                f"{key} = {float(x[i, j]):.4f} at {where(i)} is outside [{float(lo[0, j]):.3f}, "
                f"{float(hi[0, j]):.3f}], the possible log Z_T at T = {ts[j]:g} for {num_classes} classes"
            ]
        return []

    def distinct_ids(self, arrays: dict[str, np.ndarray]) -> int | None:
        """Distinct teacher ids stored in these rows (the summary's ids per row), None where it is not counted."""
        return None

    # -- training ---------------------------------------------------------------------------------------------------
    def targets(
        self, arrays: dict[str, np.ndarray], num_classes: int, temperatures: tuple, sampler_temperatures: tuple
    ) -> Targets:
        """The :class:`Targets` of a batch of this mode's arrays (ids widened to int64)."""
        raise NotImplementedError

    def target_fields(self, arrays: dict[str, np.ndarray], num_classes: int, temperatures: tuple) -> dict:
        """What every mode's targets hold: the classes, the stored temperatures and their statistics, and (a sparse
        mode) its ids widened to int64 and their log-probs in float32."""
        out = {
            "num_classes": num_classes,
            "temperatures": temperatures,
            "stats": self.stats_tensor(arrays, temperatures),
        }
        if self.sparse:
            ids, lp = self.keys_[0], self.keys_[0].replace("_ids", "_logprobs")
            out.update(ids=torch.from_numpy(arrays[ids]).long(), id_logprobs=torch.from_numpy(arrays[lp]).float())
        return out

    def stats_tensor(self, arrays: dict[str, np.ndarray], temperatures: tuple) -> torch.Tensor | None:
        stat_ts = stat_temperatures(temperatures)
        if not (stat_ts and self.stat_key):
            return None
        a = arrays.get(self.stat_key)
        if a is None or a.ndim != 2 or a.shape[1] != len(stat_ts):
            raise ValueError(
                f"{self.name} targets stored for T = {fmt_temperatures(stat_ts)} need {self.stat_key!r} "
                f"with {len(stat_ts)} column(s); got {None if a is None else a.shape}"
            )
        return torch.from_numpy(a).float()


# -- targets that estimate from weighted ids (sample, priority, and fused mixtures of them) --------------------------


@dataclass
class WeightedIdTargets(Targets):
    """Targets whose soft term is a weighted sum over stored ids: ``sum_j w_j f(id_j)`` estimates
    ``sum_i q_T(i) f(i)`` (:meth:`id_weights`; sample and priority caches, fused mixtures of them). Forward KL is
    ``sum_j w_j (log p_T(j) - log s_T(j))``; the student-side terms of reverse KL and JSD, sums over the student's
    distribution, are split into the exact student entropy (over the whole vocabulary) and an importance-weighted
    estimate from the same ids (:meth:`student_weights`). Single estimates can be negative."""

    ids: torch.Tensor | None = None  # (b, S) int64

    def id_weights(
        self, temperature: float, approximate: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(w, p_log, used, W)``, each (b, S) but W: the weights, log q_T at each id (0 on unused slots), which
        slots hold an id, and W the weights' row sum (None where they sum to 1 by construction)."""
        raise NotImplementedError

    def surely_kept(self, used: torch.Tensor) -> torch.Tensor:
        """(b, S) bool: the stored ids the cache would have kept in every draw (inclusion probability 1). None by
        default; priority sampling keeps every id at or above its threshold."""
        return torch.zeros_like(used)

    def student_weights(self, s_at: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
        """(b, S) weights with ``sum_j iw_j g(id_j)`` an unbiased estimate of ``sum_i s(i) g(i)`` for the student's
        distribution s, given ``s_at`` = log s at each id."""
        raise NotImplementedError

    def soft_rows(self, s_log, temperature, divergence, beta, approximate):
        self.check_divergence(divergence)
        w, p_log, used, _ = self.id_weights(temperature, approximate)  # (b, S) weights and log p_T at each id
        s_at = torch.gather(s_log, 1, self.ids)  # (b, S) log q_T at each id
        zero = torch.zeros_like(w)
        if divergence == "forward":
            return torch.where(used, w * (p_log - s_at), zero).sum(dim=1)
        iw = self.student_weights(s_at, used)  # (b, S): sums over the student's q_T
        neg_entropy = (s_log.exp() * s_log).sum(dim=1)  # (b,) sum_j q_j log q_j, exact over the vocabulary
        if divergence == "reverse":  # sum_j q_j log q_j - sum_j q_j log p_j
            return neg_entropy - torch.where(used, iw * p_log, zero).sum(dim=1)
        m_at = torch.logaddexp(p_log + math.log(beta), s_at + math.log(1.0 - beta))  # (b, S) log m at each id
        kl_pm = torch.where(used, w * (p_log - m_at), zero).sum(dim=1)
        kl_qm = neg_entropy - torch.where(used, iw * m_at, zero).sum(dim=1)
        return beta * kl_pm + (1.0 - beta) * kl_qm

    def head_grad(self, c):
        """The weights on the stored ids, 0 elsewhere: unnormalised (their total W an unbiased estimate of 1) at a
        stored T, self-normalised where they sum to 1 (W None)."""
        w, p_log, used, W = self.id_weights(c.T, c.approximate)
        w = torch.where(used, w, torch.zeros_like(w))
        s_at = c.s.gather(1, self.ids) - c.lse[:, None]
        soft_sum = float(torch.where(used, w * (p_log - s_at), torch.zeros_like(w)).sum())
        rows = c.qT.shape[0]
        if W is None:
            g = c.qT.scatter_add_(1, self.ids, -(c.c_soft / c.mult) * w)
            return g, torch.full((rows,), c.mult, dtype=c.qT.dtype, device=c.qT.device), soft_sum
        # unnormalised weights: q_T is multiplied by c_soft * W (+ the hard term's share when the softmax is shared)
        f = c.c_soft * W + c.shared_hard
        return c.qT.scatter_add_(1, self.ids, -(c.c_soft / f)[:, None] * w), f, soft_sum


class SampledMode(Mode):
    """A mode that keeps ids drawn at random (``--samples`` of them, seeded per teacher batch) and estimates the loss
    from them without bias at a stored temperature; at another, ``--approximate-temperature`` self-normalises."""

    size_option, size_key = "samples", "samples"
    sampled = True
    approximation = "self-normalised weights"
