"""Numeric precision of teacher and student passes: autocast contexts, chosen in one place."""

from __future__ import annotations

import contextlib
import functools

import torch

from kdcli.infra import log
from kdcli.infra.errors import UsageError

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}  # cache-teacher --dtype -> autocast dtype


def teacher_autocast(dtype: str, device: torch.device):
    """The teacher's forward precision (``cache-teacher --dtype``); log-softmax is always computed in fp32."""
    return torch.autocast(device.type, dtype=AMP[dtype]) if dtype in AMP else contextlib.nullcontext()


def precision_context(precision: str, device: torch.device):
    """The autocast context for ``--precision`` (bf16: bfloat16 matrix products, float32 everything autocast keeps
    in float32); a no-op context for fp32. Warns once where the CPU has no native bfloat16 products."""
    if precision != "bf16":
        return contextlib.nullcontext()
    if device.type == "cpu" and not getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)():
        warn_emulated_bf16()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@functools.cache
def warn_emulated_bf16() -> None:  # once per process, not once per step
    log.warn(
        "--precision bf16 on a CPU without AVX512-BF16: bfloat16 products are emulated and likely slower than "
        "--precision fp32"
    )


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available; use --device auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
