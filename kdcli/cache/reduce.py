"""Teacher logits -> what a cache row stores. Runs on the teacher's device; only the reduced tensors leave it.

Every mode starts from ``log_softmax(z)`` at T = 1 in fp32. Log-probabilities (not probabilities) are stored, in
fp16: ``softmax(logp / T) == softmax(z / T)`` for every T, so a ``full`` cache serves every temperature, and fp16
log-probs keep the tail that fp16 probabilities would flush. What each mode keeps of them, and the per-temperature
statistics that make a sparse mode exact or unbiased at T: its own file under :mod:`kdcli.cache.modes`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from kdcli.cache.modes import get_mode, modes
from kdcli.cache.modes.base import numpy_id_dtype


def reduce_logits(
    logits: torch.Tensor,
    mode: str,
    *,
    top_k: int | None = None,
    samples: int | None = None,
    generator: torch.Generator | None = None,
    temperatures: Iterable[float] | None = None,
    sampler_temperatures: Iterable[float] | None = None,
) -> dict[str, torch.Tensor]:
    """(rows, C) logits -> dict of per-row tensors, still on the logits' device (:meth:`Mode.reduce`).

    ``top_k`` / ``samples``: the mode's K (``--top-k`` for topk; draws for sample, kept classes for priority);
    ``generator`` drives the samplers (it must live on the logits' device); ``temperatures``: the stored ones (1 is
    always implied); ``sampler_temperatures``: priority sampling's pi (default (1,))."""
    m = get_mode(mode)
    k = {"top_k": top_k, "samples": samples}.get(m.size_option)
    return m.reduce(torch.log_softmax(logits.float(), dim=-1), k, generator, temperatures, sampler_temperatures)


def storage_arrays(
    arrays: dict[str, np.ndarray], num_classes: int, layout: dict | None = None
) -> dict[str, np.ndarray]:
    """Host arrays -> the dtypes a cache stores them in (:meth:`Mode.storage` of the mode whose arrays they are);
    ``layout``: the manifest's (token caches record narrower dtypes), default a classification cache's."""
    layout = layout or {"id_dtype": numpy_id_dtype(num_classes).name}
    for m in modes():
        if m.keys_[0] in arrays:
            return m.storage(arrays, layout)
    return dict(arrays)


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
