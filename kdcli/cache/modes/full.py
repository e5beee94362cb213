"""``full``: every class's log-probability, ``logprobs`` (rows, C) float16. Exact at every temperature:
``softmax(logp / T) == softmax(z / T)`` (a constant shift of the logits), so one cache serves every T."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from kdcli.cache.modes.base import (
    LOGPROB_DTYPE,
    Mode,
    Targets,
    div_rows,
    f32,
    logmeanexp,
    logprob_problems,
    lse,
    norm_problem,
    np_logsumexp,
    plausible,
)

COMBINES = ("mean", "geometric")


@dataclass
class FullTargets(Targets):
    logprobs: torch.Tensor | None = None  # (b, C) the teacher's log-probs at T = 1

    mode: ClassVar[str] = "full"
    exact_at_every_T: ClassVar[bool] = True
    dense: ClassVar[bool] = True

    def top1(self):
        return self.logprobs.argmax(dim=-1)

    def soft_rows(self, s_log, temperature, divergence, beta, approximate):
        p_log = F.log_softmax(self.logprobs / float(temperature), dim=-1)
        return div_rows(p_log, s_log, divergence, beta)

    def head_grad(self, c):
        """The softmax of the cached log-probs at T (W = 1): ``mult * q - c_soft * p``."""
        p_log = F.log_softmax(self.logprobs / c.T, dim=1)
        p = p_log.exp()
        soft_sum = float(torch.where(p > 0, p * (p_log - (c.s - c.lse[:, None])), torch.zeros_like(p)).sum())
        return c.qT.mul_(c.mult).sub_(p, alpha=c.c_soft), None, soft_sum


class FullMode(Mode):
    name = "full"
    keys_ = ("logprobs",)
    sparse = False
    exact_at_every_T = True
    fusion = "exact"
    loss_note = "exact"

    def temperature_layout(self, temperatures, sampler_temperatures=None):
        return {"temperatures": None, "stat_temperatures": None, "stat_dtype": None, "sampler_temperatures": None}

    def keys(self, temperatures=None):
        return self.keys_

    def reduce(self, logp, k, generator, temperatures, sampler_temperatures=None):
        return {"logprobs": logp.to(LOGPROB_DTYPE)}

    def bytes_per_entry(self, layout, width, n_stats):
        return 2 * width

    def expected(self, m):
        return {"logprobs": (np.dtype(np.float16), (int(m["num_classes"]),))}

    def problems(self, manifest, arrays, where):
        lp = f32(arrays["logprobs"])
        if plausible(lp, None):
            return []
        return logprob_problems("logprobs", lp, where) or norm_problem(lse(lp), "logprobs", where)

    def targets(self, arrays, num_classes, temperatures, sampler_temperatures):
        return FullTargets(
            **self.target_fields(arrays, num_classes, temperatures),
            logprobs=torch.from_numpy(arrays["logprobs"]).float(),
        )

    def fuse(self, parts: list[dict[str, np.ndarray]], weights: list[float], combine: str) -> dict[str, np.ndarray]:
        """K teachers' rows -> the fused teacher's ``logprobs`` (float32): ``mean`` the mixture ``sum_k w_k p_k``,
        ``geometric`` the renormalised ``prod_k p_k^w_k``; both exact up to the fp16 rounding of the stored
        log-probs (computed in float64, renormalised). Token caches' ``target_logprobs`` get the same normaliser.
        ``weights``: the live (non-zero) teachers' weights, one per part."""
        targets = [p["target_logprobs"] for p in parts] if "target_logprobs" in parts[0] else None
        if combine == "mean":
            fused = logmeanexp([p["logprobs"] for p in parts], weights)  # log sum_k w_k p_k(i)
            tgt = None if targets is None else logmeanexp(targets, weights)
        elif combine == "geometric":
            fused = sum(w * p["logprobs"].astype(np.float64) for p, w in zip(parts, weights))  # sum_k w_k log p_k
            tgt = None if targets is None else sum(w * t.astype(np.float64) for t, w in zip(targets, weights))
        else:
            raise ValueError(f"unknown combine {combine!r}; use one of {COMBINES}")
        log_z = np_logsumexp(fused, axis=-1, keepdims=True)  # renormalise (exact for geometric; fp16 rounding only
        out = {"logprobs": (fused - log_z).astype(np.float32)}  # for mean)
        if tgt is not None:
            out["target_logprobs"] = (tgt - log_z[..., 0]).astype(np.float32)
        return out


MODE = FullMode()
