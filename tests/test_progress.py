"""Progress for every long step: one ``log.Progress`` (a rich bar on a terminal, a plain line every ~10% or 10 s
otherwise, nothing for a step over within 2 s), used by cache-teacher, every train-student epoch, eval and cache
verify."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kdcli.infra import log


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture()
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(log.time, "perf_counter", c)
    return c


@pytest.fixture()
def lines(monkeypatch):
    out: list[str] = []
    monkeypatch.setattr(log, "info", out.append)
    return out


def run(clock: Clock, total: int, seconds_each: float, **kw) -> None:
    with log.Progress(total, "epoch 1/2", unit="steps", **kw) as p:
        for _ in range(total):
            clock.t += seconds_each
            p.advance(1)


def test_plain_lines_every_tenth_with_rate_and_time_left(clock, lines):
    run(clock, 100, 0.5)  # 50 s in all: a line at each 10% (every 5 s), none at the end (the caller reports it)
    assert len(lines) == 9
    assert lines[0] == "epoch 1/2: 10/100 steps (10%, 2.0 steps/s, 45 s left)"
    assert lines[-1] == "epoch 1/2: 90/100 steps (90%, 2.0 steps/s, 5 s left)"


def test_a_slow_step_still_shows_life_every_ten_seconds(clock, lines):
    run(clock, 1000, 4.0, every_s=10.0)  # 10% every 400 s: the 10 s rule paces the lines (every 3rd step, 12 s)
    assert lines[0] == "epoch 1/2: 3/1,000 steps (0%, 0.2 steps/s, 1 h 06 min left)"
    assert lines[1].startswith("epoch 1/2: 6/1,000 steps") and 333 <= len(lines) <= 333 + 9  # (+ the 10% marks)


def test_a_very_slow_rate_keeps_two_significant_digits(clock, lines):
    run(clock, 48, 30.0, every_s=10.0)  # one answer every 30 s: 0.033 answers/s, not "0.0"
    assert lines[0] == "epoch 1/2: 1/48 steps (2%, 0.033 steps/s, 23 min 30 s left)"


def test_a_short_step_prints_nothing(clock, lines):
    run(clock, 50, 0.01)  # 0.5 s in all
    assert lines == []


def test_bytes_are_shown_human_sized(clock, lines):
    with log.Progress(100 << 20, "cache verify", unit="bytes") as p:
        for _ in range(4):
            clock.t += 5
            p.advance(25 << 20)
    assert lines[0] == "cache verify: 25.0 MiB/100.0 MiB (25%, 5.0 MiB/s, 15 s left)"


def test_only_rank_zero_reports(clock, monkeypatch):
    printed: list[str] = []
    monkeypatch.setattr(log.err_console, "print", lambda *a, **k: printed.append(a[0]))
    log.set_rank(1, 2)
    try:
        run(clock, 100, 0.5)
    finally:
        log.set_rank(0, 1)
    assert printed == []
    run(clock, 100, 0.5)
    assert len(printed) == 9


@pytest.fixture()
def recorded(monkeypatch):
    """Every Progress the stages open: (description, total, unit, advanced)."""
    seen: list[list] = []

    class Recording(log.Progress):
        def __enter__(self):
            seen.append([self.description, self.total, self.unit, 0])
            return super().__enter__()

        def advance(self, n: int = 1) -> None:
            seen[-1][3] += n
            super().advance(n)

    monkeypatch.setattr(log, "Progress", Recording)
    return seen


def test_train_eval_cache_and_verify_report_progress(tmp_path: Path, blobs_npz: Path, recorded):
    from kdcli.cache.verify import verify_cache
    from kdcli.config import CacheConfig, EvalConfig, TrainConfig
    from kdcli.stages.cache import cache_teacher
    from kdcli.stages.evaluate import evaluate
    from kdcli.stages.train import train_student

    teacher = tmp_path / "teacher"
    train_student(TrainConfig(student="mlp", data=str(blobs_npz), out=str(teacher), epochs=2, batch_size=100))
    cache_teacher(CacheConfig(teacher=str(teacher), data=str(blobs_npz), out=str(tmp_path / "c")))
    evaluate(EvalConfig(model=[str(teacher), str(teacher)], data=str(blobs_npz), latency_repeats=0))
    verify_cache(tmp_path / "c")
    names = [r[0] for r in recorded]
    assert names == ["epoch 1/2", "epoch 2/2", "cache-teacher", "eval", "cache verify"]
    for desc, total, _unit, advanced in recorded:
        assert advanced == total > 0, desc  # each bar runs to its end
    assert recorded[0][1:3] == [6, "steps"]  # 600 rows / batch 100
    assert recorded[3][1:3] == [1200, "rows"]  # two models x 600 rows
    assert re.fullmatch(r"\d+", str(recorded[4][1])) and recorded[4][2] == "bytes"


def test_a_mark_right_after_a_timed_line_is_not_repeated(clock, lines):
    run(clock, 300, 0.35)  # the 10 s line lands at step 29, the 10% mark at step 30: one line, not two
    steps = [int(line.split(": ")[1].split("/")[0]) for line in lines]
    assert all(b - a >= 3 for a, b in zip(steps, steps[1:])), steps  # lines at least a second apart
    assert 9 <= len(lines) <= 14  # ~105 s: a line every 10 s, plus the marks that fall between them
