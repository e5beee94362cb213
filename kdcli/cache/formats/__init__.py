"""Caches that travel: the formats ``kdcli cache export`` writes and ``kdcli cache import`` reads (docs/formats.md).

| format | file | export | import |
|---|---|---|---|
| ``parquet`` | parquet.py | every kind and mode: kdcli's own columns | array-identical shards |
| ``axolotl`` | axolotl.py | token caches of a mode that keeps the teacher's top entries | a ``topk`` cache |
| ``distillkit`` | distillkit.py | no | DistillKit's compressed captures -> a ``topk`` cache |

A format is one :class:`~kdcli.cache.formats.base.Format` object (``FORMAT_OBJECT`` in its module): what it refuses
and loses on export, its writer, its reader. Adding one means adding its file and one line in :data:`REGISTRY`.
This module imports no format (and no pyarrow, no torch) until one is asked for: ``--help`` lists the names
without loading anything. The commands are :mod:`kdcli.stages.convert`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from kdcli.infra.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from kdcli.cache.formats.base import Format

REGISTRY: dict[str, str] = {
    "parquet": "kdcli.cache.formats.parquet",
    "axolotl": "kdcli.cache.formats.axolotl",
    "distillkit": "kdcli.cache.formats.distillkit",
}
EXPORT_FORMATS = ("parquet", "axolotl")
IMPORT_FORMATS = ("parquet", "axolotl", "distillkit")


def format_names(action: str) -> tuple[str, ...]:
    """The formats ``action`` ("export" or "import") handles."""
    return EXPORT_FORMATS if action == "export" else IMPORT_FORMATS


def get_format(name: str, action: str) -> Format:
    """The registered format ``name`` for ``action``; UsageError (exit 2) naming the ones that exist."""
    names = format_names(action)
    if name not in names:
        other = " (it is import-only)" if action == "export" and name in IMPORT_FORMATS else ""
        raise UsageError(f"unknown {action} format {name!r}{other}; use one of {', '.join(names)}")
    return importlib.import_module(REGISTRY[name]).FORMAT_OBJECT
