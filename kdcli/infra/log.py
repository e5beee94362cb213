"""Logs and progress on stderr (stdout carries results only). Progress bars on a TTY, plain lines otherwise."""

from __future__ import annotations

import math
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
    """``with Progress(total, "caching") as p: p.advance(n)``: every long step reports through this.

    On a terminal, a rich bar: done/total, units per second, time left. Otherwise (a pipe, a CI log) a plain line
    every ``every_s`` seconds or 10% of the total, whichever comes first, so logs show life without being flooded;
    a step that is over within ``quiet_s`` prints no line at all. Under torchrun only rank 0 shows progress."""

    def __init__(self, total: int, description: str, unit: str = "rows", every_s: float = 10.0, quiet_s: float = 2.0):
        self.total, self.description, self.unit = max(int(total), 0), description, unit
        self.every_s, self.quiet_s = every_s, quiet_s
        self.done = 0
        self._bar = None
        self._t0 = self._last = time.perf_counter()
        self._next_frac = 0.1

    def __enter__(self) -> Progress:
        if sys.stderr.isatty() and _rank == 0:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                MofNCompleteColumn,
                TaskProgressColumn,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            from rich.progress import Progress as RichProgress

            if self.unit == "bytes":
                counts = (DownloadColumn(), TaskProgressColumn(), TransferSpeedColumn())
            else:
                rate = TextColumn(f"{{task.speed:,.1f}} {self.unit}/s", markup=False)
                counts = (MofNCompleteColumn(), TaskProgressColumn(), rate)
            self._bar = RichProgress(
                "[progress.description]{task.description}",
                BarColumn(),
                *counts,
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=err_console,
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        return self

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n)
            return
        now = time.perf_counter()
        frac = self.done / max(self.total, 1)
        if now - self._t0 < self.quiet_s or self.done >= self.total:
            if frac >= self._next_frac:
                self._next_frac = math.floor(frac * 10 + 1) / 10
            return
        at_mark = frac >= self._next_frac
        if at_mark:
            self._next_frac = math.floor(frac * 10 + 1) / 10
        # a line every every_s, or at each 10% mark unless one was printed in the last second
        if now - self._last >= self.every_s or (at_mark and now - self._last >= 1.0):
            info(self.line(now))
            self._last = now

    def line(self, now: float) -> str:
        """The plain progress line: ``epoch 2/5: 1,200/3,000 steps (40%, 85 steps/s, 21 s left)``."""
        spent = max(now - self._t0, 1e-9)
        rate = self.done / spent
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        if self.unit == "bytes":
            from kdcli.infra.fmt import human_bytes

            done, speed = f"{human_bytes(self.done)}/{human_bytes(self.total)}", f"{human_bytes(rate)}/s"
        else:
            done = f"{self.done:,}/{self.total:,} {self.unit}"
            # two significant digits below 0.1/s (a teacher answering long prompts): never "0.0 answers/s"
            speed = f"{rate:,.{0 if rate >= 10 else 1}f}" if rate >= 0.1 else f"{rate:.2g}"
            speed += f" {self.unit}/s"
        return f"{self.description}: {done} ({self.done / max(self.total, 1):.0%}, {speed}, {_eta(left)} left)"

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


def _eta(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
