"""Summaries -> a rich table on stdout, or exactly one JSON document (rates as fractions, never percentages).

Every summary builds its own :class:`~kdcli.infra.fmt.TableData` (``summary.table()``); this module renders any
of them, knowing no summary type."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from kdcli.infra.fmt import TableData

out_console = Console(highlight=False, soft_wrap=True)


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(to_jsonable(obj), indent=2) + "\n")
    sys.stdout.flush()


def render(t: TableData) -> Table:
    """A :class:`TableData` as a rich table: with a header, one column per header cell; without one, a key-value
    table (the keys bold)."""
    table = Table(
        title=t.title, show_header=t.header is not None, title_justify="left", caption=t.caption, caption_justify="left"
    )
    width = len(t.header) if t.header is not None else max((len(r) for r in t.rows), default=2)
    names = t.header or [""] * width
    for i, name in enumerate(names):
        justify = (t.justify or [])[i] if t.justify and i < len(t.justify) else "left"
        table.add_column(
            name, justify=justify, style="bold" if i == 0 else None, overflow="fold" if t.fold else "ellipsis"
        )
    for row in t.rows:
        table.add_row(*row)
    return table


def show(summary: Any) -> None:
    """Print a summary's table on stdout."""
    out_console.print(render(summary.table()))
