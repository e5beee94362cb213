"""Logs and progress on stderr (stdout carries results only). Progress bars on a TTY, plain lines otherwise."""

from __future__ import annotations

import sys
import time

from rich.console import Console

err_console = Console(stderr=True, highlight=False, soft_wrap=True)
_rank, _world = 0, 1  # under torchrun only rank 0 prints info and progress (kdcli.infra.distributed sets this)


def set_rank(rank: int, world: int) -> None:
    global _rank, _world
    _rank, _world = rank, world


def info(msg: str) -> None:
    if _rank == 0:
        err_console.print(msg, markup=False)


def warn(msg: str) -> None:
    where = f"[rank {_rank}] " if _world > 1 else ""
    err_console.print(f"warning: {where}{msg}", markup=False, style="yellow")


class Progress:
    """``with Progress(total, "caching") as p: p.advance(n)``: a rich bar on a TTY, a line every ~10 s or 10%
    otherwise (so CI logs show life without being flooded)."""

    def __init__(self, total: int, description: str, unit: str = "rows", every_s: float = 10.0):
        self.total, self.description, self.unit, self.every_s = total, description, unit, every_s
        self.done = 0
        self._bar = None
        self._t0 = self._last = time.perf_counter()
        self._last_frac = 0.0

    def __enter__(self) -> Progress:
        if sys.stderr.isatty() and _rank == 0:
            from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=err_console,
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        return self

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n)
            return
        now = time.perf_counter()
        frac = self.done / max(self.total, 1)
        if now - self._last >= self.every_s or frac - self._last_frac >= 0.1 or self.done >= self.total:
            rate = self.done / max(now - self._t0, 1e-9)
            info(f"{self.description}: {self.done}/{self.total} {self.unit} ({frac:.0%}, {rate:,.0f} {self.unit}/s)")
            self._last, self._last_frac = now, frac

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
