"""Input augmentations whose parameters are data: sampled once, stored beside the soft labels, re-applied exactly.

A cached view is (sample, parameters). The teacher saw ``apply(x, params)``; the student trains on the same
``apply(x, params)``, so soft labels and inputs always agree (FKD; Beyer et al. 2022, "patient and consistent").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdcli.infra.errors import UsageError


@dataclass(frozen=True)
class Shift:
    """Translate an image by (dy, dx) whole pixels, each uniform in [-max_shift, max_shift], zero fill."""

    max_shift: int

    param_names = ("dy", "dx")

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        s = self.max_shift
        return torch.randint(-s, s + 1, (n, 2), generator=generator).to(torch.float32)  # (n, 2)

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """x: (b, c, h, w) or (b, h, w); params: (b, 2). Output pixel (i, j) = input (i - dy, j - dx)."""
        squeeze = x.dim() == 3
        if squeeze:
            x = x.unsqueeze(1)
        if x.dim() != 4:
            raise UsageError(f"shift augmentation needs image inputs (b, c, h, w); got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        s = self.max_shift
        p = params.to(device=x.device, dtype=torch.long)
        padded = F.pad(x, (s, s, s, s))  # (b, c, h+2s, w+2s)
        rows = torch.arange(h, device=x.device)[None, :] + s - p[:, 0:1]  # (b, h)
        cols = torch.arange(w, device=x.device)[None, :] + s - p[:, 1:2]  # (b, w)
        bi = torch.arange(b, device=x.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (b, h, w, c)
        out = out.permute(0, 3, 1, 2).contiguous()
        return out.squeeze(1) if squeeze else out


def parse_augment(spec: str | None) -> Shift | None:
    if spec is None or spec in ("", "none"):
        return None
    name, _, arg = spec.partition(":")
    if name == "shift":
        try:
            n = int(arg) if arg else 2
        except ValueError:
            raise UsageError(f"augment 'shift:N' needs an integer N; got {spec!r}") from None
        if n < 1:
            raise UsageError(f"augment 'shift:N' needs N >= 1; got {spec!r}")
        return Shift(n)
    raise UsageError(f"unknown augment {spec!r}; supported: shift:N (random pixel shift in [-N, N])")
