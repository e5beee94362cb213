"""Summaries -> a rich table on stdout, or exactly one JSON document (rates as fractions, never percentages).

Every summary builds its own :class:`~kdcli.infra.fmt.TableData` (``summary.table()``); this module renders any
of them, knowing no summary type."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from kdcli.infra.fmt import TableData

PIPE_WIDTH = 120  # columns of a table written to a pipe or file when COLUMNS is unset (rich alone would use 80)


def table_width() -> int | None:
    """The width tables are laid out in: the terminal's own (None: rich measures it); on a pipe or file, COLUMNS,
    else :data:`PIPE_WIDTH`."""
    if sys.stdout.isatty():
        return None
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else PIPE_WIDTH


def out_console() -> Console:
    return Console(highlight=False, soft_wrap=True, width=table_width())


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
    # the first column (metric / key names) keeps its full width: a narrow table wraps the values, never a name
    first = max([len(names[0]), *(len(r[0]) for r in t.rows if r)], default=0)
    for i, name in enumerate(names):
        justify = (t.justify or [])[i] if t.justify and i < len(t.justify) else "left"
        table.add_column(
            name,
            justify=justify,
            style="bold" if i == 0 else None,
            overflow="fold" if t.fold else "ellipsis",
            min_width=first if i == 0 else None,
        )
    for row in t.rows:
        table.add_row(*row)
    return table


def show(summary: Any) -> None:
    """Print a summary's table on stdout."""
    out_console().print(render(summary.table()))
