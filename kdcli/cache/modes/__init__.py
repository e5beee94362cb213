"""Cache modes: what a cache stores per row (per predicted token), one file each, registered here.

| mode | file | stores | the loss at a stored T |
|---|---|---|---|
| ``full`` | full.py | every class's log-prob | exact |
| ``topk`` | topk.py | k ids + log-probs + the tail's log-mass | exact on the k + 1 buckets |
| ``sample`` | sample.py | ids drawn from the teacher, with counts | unbiased estimate |
| ``priority`` | priority.py | K ids kept by priority sampling + the threshold | unbiased estimate |

A mode is one :class:`~kdcli.cache.modes.base.Mode` object (its stored keys and dtypes, its reduction from logits
on the device, its per-temperature statistic, its bytes per entry, its checks, the targets it hands the losses).
Adding a mode means adding its file and one line in :data:`REGISTRY`; nothing else in kdcli names a mode
(tests/test_cache_modes.py lists the registered modes and round-trips each one against the full-vocabulary
reference). This module imports no mode (and no torch) until one is asked for: the CLI's ``--help`` lists the names
without loading anything.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from kdcli.infra.errors import CacheError

if TYPE_CHECKING:  # pragma: no cover
    from kdcli.cache.modes.base import Mode, Targets

REGISTRY: dict[str, str] = {
    "full": "kdcli.cache.modes.full",
    "topk": "kdcli.cache.modes.topk",
    "sample": "kdcli.cache.modes.sample",
    "priority": "kdcli.cache.modes.priority",
}
"""mode name (the manifest's ``mode``, ``cache-teacher --mode``) -> the module defining ``MODE``."""


DEFAULT = "full"  # cache-teacher without --mode or a size option
IMPLIED = {"top_k": "topk"}  # cache-teacher --top-k K without --mode


def mode_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get_mode(name: str) -> Mode:
    """The registered mode ``name``; a name kdcli does not know is a CacheError (exit 3: it comes from a manifest;
    ``--mode`` is checked against :func:`mode_names` when the options are read)."""
    module = REGISTRY.get(name) if isinstance(name, str) else None
    if module is None:
        raise CacheError(f"unknown cache mode {name!r} (this kdcli knows {', '.join(REGISTRY)})")
    return importlib.import_module(module).MODE


def modes() -> list[Mode]:
    return [get_mode(n) for n in REGISTRY]


def exact_at_every_t(name: str) -> bool:
    """True for a mode whose targets are exact at every temperature (a full distribution); False for the others and
    for what is not a registered mode (a fused mixture)."""
    return name in REGISTRY and get_mode(name).exact_at_every_T


def check_temperature(mode: str, temperatures, temperature: float, approximate: bool = False) -> bool:
    """True when targets of ``mode`` storing ``temperatures`` are exact/unbiased at ``temperature``; False when
    they are not but ``approximate`` allows the documented approximation; else UsageError (exit 2) naming the
    stored temperatures. A mode exact at every T (full) always is. Call it once before training or evaluating."""
    from kdcli.cache.modes.base import require_temperature

    return require_temperature(mode, exact_at_every_t(mode), temperatures, temperature, approximate)


def sparse_modes() -> tuple[str, ...]:
    """The modes that store a subset of the classes (and per-temperature statistics)."""
    return tuple(m.name for m in modes() if m.sparse)


def targets_from_arrays(
    arrays: dict, mode: str, num_classes: int, *, temperatures=(1.0,), sampler_temperatures=(1.0,)
) -> Targets:
    """The :class:`~kdcli.cache.modes.base.Targets` of a batch of a ``mode`` cache's arrays (what a reader returns).

    ``temperatures``: what the cache's manifest lists (``manifest.stored_temperatures``); a cache without the list
    stores T = 1 only. The per-temperature array must have one column per listed T other than 1."""
    from kdcli.cache.modes.base import normalize_temperatures

    return get_mode(mode).targets(
        arrays, num_classes, normalize_temperatures(temperatures), tuple(float(x) for x in sampler_temperatures)
    )
