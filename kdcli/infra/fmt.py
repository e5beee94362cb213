"""How numbers and tables look, for every summary: the data of a table (:class:`TableData`), which summaries build
and :mod:`kdcli.report` renders (no summary imports rich; the renderer knows no summary type)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TableData:
    """A table to show: a title, an optional header (none: a key-value table), rows of cells, a caption.
    ``justify`` per column (left, right, center); the first column of a key-value table is bold."""

    title: str
    rows: list[list[str]]
    header: list[str] | None = None
    justify: list[str] | None = None
    caption: str | None = None
    fold: bool = True  # long cells wrap inside their column instead of widening the table
    notes: list[str] = field(default_factory=list)  # not shown in the table: printed on stderr by the CLI


def key_values(title: str, rows: list[tuple[str, str]]) -> TableData:
    return TableData(title=title, rows=[[k, v] for k, v in rows])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def kl_text(x: float) -> str:
    """A KL is >= 0; fp16-stored teacher log-probs can make a model's KL to itself -1e-6 (shown as 0.0000)."""
    return f"{max(x, 0.0):.4f}"
