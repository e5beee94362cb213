"""Crash safety of cache-teacher, proven on real processes: SIGKILL at exact instants, resume, lock, Ctrl-C.

Each crash is a real ``python -m kdcli cache-teacher`` that SIGKILLs (or stops, or interrupts) itself at a named
point through the test-only hook in kdcli/infra/crashpoints.py (``KDCLI_TEST_KILL_AT=POINT:N[:ACTION]``). Shards are
byte-for-byte deterministic, so "identical to an uninterrupted run" is checked on every shard's sha256 *and* on
the rows read back.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import make_blobs
from typer.testing import CliRunner, Result

from kdcli.cache.reader import CacheReader
from kdcli.cache.verify import verify_cache
from kdcli.cli import app
from kdcli.config import CacheConfig, TrainConfig
from kdcli.models.weights import sha256_file
from kdcli.stages.cache import cache_teacher
from kdcli.stages.train import train_student

ROWS, SHARD = 600, 128  # 5 shards: 4 x 128 + 88; teacher batches of 50 straddle shard edges
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ws(tmp_path_factory, one_thread):  # in-process runs on one thread: no OpenMP spinning on a busy 2-core machine
    return _workspace(tmp_path_factory)


def _workspace(tmp_path_factory):
    d = tmp_path_factory.mktemp("reliability")
    x, y = make_blobs(n=ROWS)
    np.savez(d / "blobs.npz", x=x, y=y)
    train_student(
        TrainConfig(
            student="mlp",
            student_args={"hidden": [32]},
            data=str(d / "blobs.npz"),
            out=str(d / "teacher"),
            epochs=2,
            lr=3e-3,
            seed=0,
        )
    )
    cache_teacher(
        CacheConfig(
            teacher=str(d / "teacher"), data=str(d / "blobs.npz"), out=str(d / "ref"), shard_size=SHARD, batch_size=50
        )
    )
    return d


def cmd(ws: Path, out: Path) -> list:
    return [
        "cache-teacher",
        "--teacher",
        ws / "teacher",
        "--data",
        ws / "blobs.npz",
        "--out",
        out,
        "--shard-size",
        SHARD,
        "--batch-size",
        50,
    ]


def rerun(ws: Path, out: Path) -> Result:
    """The same command again, in-process (typer's CliRunner): the crash was real, the resume needs no new
    interpreter (each one costs ~2 s of imports on a 2-core CI box)."""
    return CliRunner().invoke(app, list(map(str, cmd(ws, out))))


def popen(args: list, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kdcli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **ENV, **env},
    )


def wait_stopped(p: subprocess.Popen, timeout: float = 60) -> None:
    """Block until the child has SIGSTOPped itself at its crash point (it then holds its lock, frozen)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        pid, status = os.waitpid(p.pid, os.WUNTRACED | os.WNOHANG)
        if pid and os.WIFSTOPPED(status):
            return
        if pid:
            raise AssertionError(
                f"child ended before its crash point: status {status}, stderr {p.stderr.read()[-2000:]}"
            )
        time.sleep(0.02)
    raise AssertionError("child never reached its crash point")


def ref_shas(ws: Path) -> dict[str, str]:
    return {s["name"]: s["sha256"] for s in json.loads((ws / "ref" / "manifest.json").read_text())["shards"]}


def assert_only_whole_shards(ws: Path, out: Path) -> None:
    """What a crash may leave: whole shards at final names (byte-identical to the reference), *.partial
    leftovers, and a manifest that is valid JSON, lists only whole shards and says complete: false."""
    ref = ref_shas(ws)
    for p in out.glob("shard-*.h5"):
        assert sha256_file(p) == ref[p.name], f"{p.name} at its final name is not whole"
        with h5py.File(p, "r") as f:
            assert len(f["row_index"]) > 0
    if (out / "manifest.json").exists():
        m = json.loads((out / "manifest.json").read_text())
        assert m["complete"] is False
        for s in m["shards"]:
            assert s["sha256"] == ref[s["name"]] and sha256_file(out / s["name"]) == s["sha256"]


def assert_identical_to_reference(ws: Path, out: Path) -> None:
    assert not list(out.glob("*.partial")), "leftover partial files"
    assert not (out / ".lock").exists()
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] is True
    assert {s["name"]: s["sha256"] for s in m["shards"]} == ref_shas(ws)
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", *ref_shas(ws)])
    a, b = CacheReader(ws / "ref").read_rows(0, ROWS), CacheReader(out).read_rows(0, ROWS)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert verify_cache(out).ok


# point, rows the re-run must skip, whether a *.partial is left behind
KILL_POINTS = {
    "while writing the first manifest": ("manifest.json.partial:1", 0, True),
    "before the first shard": ("teacher-batch:1", 0, False),
    "mid-shard (half a shard on disk)": ("shard-partial:2", 128, True),
    "shard renamed, manifest not yet updated": ("shard-renamed:3", 256, False),
    "between shards": ("shard-published:2", 256, False),
    "while writing a manifest update": ("manifest.json.partial:4", 256, True),
    "while writing the final manifest": ("manifest.json.partial:7", 600, True),
}


@pytest.fixture(scope="module")
def killed(ws):
    """Every SIGKILL scenario started at once (independent processes, one directory each): their ~2 s of imports
    overlap instead of adding up. Each test below then checks and resumes its own."""
    runs = {
        where: (popen(cmd(ws, ws / f"killed-{i}"), {"KDCLI_TEST_KILL_AT": point}), ws / f"killed-{i}")
        for i, (where, (point, _, _)) in enumerate(KILL_POINTS.items())
    }
    yield runs
    for p, _ in runs.values():
        if p.poll() is None:
            p.kill()
        p.communicate()


@pytest.mark.parametrize("where", list(KILL_POINTS))
def test_sigkill_then_rerun_resumes_to_identical_cache(ws, killed, where):
    point, skipped, partial_left = KILL_POINTS[where]
    p, out = killed[where]
    _, err = p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL, err[-2000:]
    assert bool(list(out.glob("*.partial"))) == partial_left
    assert_only_whole_shards(ws, out)

    again = rerun(ws, out)
    assert again.exit_code == 0, again.stderr
    if skipped:
        assert f"skipping {skipped} of {ROWS} rows" in again.stderr
    else:
        assert "skipping" not in again.stderr
    if partial_left:
        assert "removed 1 partial file(s) left by an interrupted run" in again.stderr
    assert f"{ROWS - skipped:,} / {skipped:,}" in again.stdout  # computed / skipped row of the summary table
    assert_identical_to_reference(ws, out)


def test_second_writer_refused_at_once_then_stale_lock_taken_over(ws, tmp_path):
    out = tmp_path / "cache"
    first = popen(cmd(ws, out), {"KDCLI_TEST_KILL_AT": "shard-published:1:STOP"})
    try:
        wait_stopped(first)  # frozen after its first shard, holding the lock
        before = {p.name: sha256_file(p) for p in out.iterdir() if p.is_file()}
        t0 = time.monotonic()
        second = rerun(ws, out)  # in-process: the kernel's flock sees the other process all the same
        took = time.monotonic() - t0
        assert second.exit_code == 3, second.stderr
        lines = second.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and f"is being written by pid {first.pid}" in lines[-1]
        assert "wait for it to finish" in lines[-1] and "Traceback" not in second.stderr
        assert took < 60  # refused without waiting on the stopped writer
        assert {p.name: sha256_file(p) for p in out.iterdir() if p.is_file()} == before
    finally:
        first.kill()  # SIGKILL: its .lock file stays behind, naming a dead pid
        first.wait()
    assert json.loads((out / ".lock").read_text())["pid"] == first.pid
    third = rerun(ws, out)
    assert third.exit_code == 0, third.stderr
    assert f"taking over a stale lock on {out} left by process {first.pid}" in third.stderr
    assert f"skipping {SHARD} of {ROWS} rows" in third.stderr
    assert_identical_to_reference(ws, out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_mid_shard_exits_130_with_whole_shards_then_resumes(ws, tmp_path, sig):
    out = tmp_path / "cache"
    p = popen(cmd(ws, out), {"KDCLI_TEST_KILL_AT": "shard-partial:2:STOP"})  # half of shard 1 on disk
    wait_stopped(p)
    assert list(out.glob("*.partial"))
    os.kill(p.pid, sig)  # Ctrl-C (or a scheduler's SIGTERM) delivered while it is mid-write ...
    os.kill(p.pid, signal.SIGCONT)  # ... and handled as soon as it runs again
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted: whole shards/checkpoints already written are kept")
    assert "Traceback" not in err
    assert not list(out.glob("*.partial")) and not (out / ".lock").exists()
    assert_only_whole_shards(ws, out)  # the shard being written was finished and published, not torn
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["shards"]) >= 1
    again = rerun(ws, out)
    assert again.exit_code == 0 and f"skipping {len(m['shards']) * SHARD} of {ROWS} rows" in again.stderr
    assert_identical_to_reference(ws, out)


def test_deleted_damaged_shard_is_recomputed_alone(ws, tmp_path):
    """The repair `cache verify` recommends: delete the damaged shard, re-run the same command."""
    import shutil

    out = tmp_path / "cache"
    shutil.copytree(ws / "ref", out)
    (out / "shard-00003.h5").unlink()
    rep = verify_cache(out)
    assert not rep.ok and "delete the damaged shard file(s) (shard-00003.h5)" in rep.fix
    again = rerun(ws, out)
    assert again.exit_code == 0, again.stderr
    assert f"skipping {ROWS - SHARD} of {ROWS} rows" in again.stderr
    assert_identical_to_reference(ws, out)


# -- cache verify: no false alarms on every layout, and the JSON document --------------------------------------
@pytest.mark.parametrize(
    "settings",
    [{"top_k": 2}, {"mode": "sample", "samples": 9}, {"views": 3, "augment": "shift:1"}],
    ids=["topk", "sample", "views"],
)
def test_verify_passes_healthy_classification_caches(ws, tmp_path, settings):
    if "views" in settings:  # pixel shifts need images: 4x4 "images" and a teacher trained on them
        rng = np.random.default_rng(0)
        x = rng.random((64, 1, 4, 4)).astype(np.float32)
        np.savez(tmp_path / "img.npz", x=x, y=(x.reshape(64, -1)[:, :8].sum(1) > 4).astype(np.int64))
        train_student(TrainConfig(student="mlp", data=str(tmp_path / "img.npz"), out=str(tmp_path / "t"), epochs=1))
        data, teacher = tmp_path / "img.npz", tmp_path / "t"
    else:
        data, teacher = ws / "blobs.npz", ws / "teacher"
    cache_teacher(CacheConfig(teacher=str(teacher), data=str(data), out=str(tmp_path / "c"), shard_size=50, **settings))
    r = CliRunner().invoke(app, ["cache", "verify", str(tmp_path / "c"), "--data", str(data), "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)  # exactly one JSON document on stdout
    assert doc["ok"] is True and doc["problems"] == [] and doc["rows_verified"] == doc["num_rows"]
    assert all(s["sha256_ok"] and s["ok"] for s in doc["shards"]) and len(doc["shards"]) > 1
    if settings.get("top_k"):  # a tail log-mass of 0 (all the mass again) breaks normalisation, nothing else
        with h5py.File(tmp_path / "c" / "shard-00001.h5", "r+") as f:
            f["tail_logmass"][7] = 0.0
        rep = verify_cache(tmp_path / "c")
        # ... and (with the default --temperatures 1,2,4) no longer fits the stored tempered tail mass either
        assert not rep.ok and rep.shards[1].sha256_ok is False and len(rep.shards[1].problems) == 3
        assert re.fullmatch(
            r"top-k log-probs \+ tail log-mass does not normalise at row 57: logsumexp = \+0\.\d+ "
            r"\(tolerance 0\.01\)",
            rep.shards[1].problems[1],
        ), rep.shards[1].problems
        assert rep.shards[1].problems[2].startswith("tail_logmass_t is not a possible tempered tail mass at row 57")


def test_verify_token_caches(tmp_path):
    """Token-level (LM) caches: every mode verifies clean; a NaN behind a re-hashed manifest and a flipped bit
    are found."""
    pytest.importorskip("transformers")
    from lm_helpers import make_llama, make_tokenizer, text_rows, write_jsonl

    from kdcli.config import resolve

    teacher = make_llama(tmp_path / "teacher", make_tokenizer(tmp_path / "tok"))
    text = write_jsonl(tmp_path / "text.jsonl", text_rows(12))
    for mode, kw in (("full", {"mode": "full"}), ("topk", {"top_k": 5}), ("sample", {"mode": "sample", "samples": 8})):
        cache_teacher(
            resolve(
                CacheConfig,
                None,
                dict(teacher=str(teacher), data=str(text), out=str(tmp_path / mode), max_length=32, shard_size=4, **kw),
            )
        )
        rep = verify_cache(tmp_path / mode)
        assert rep.ok and rep.kind == "token" and rep.rows_verified == rep.num_rows, rep.problems
    shard = tmp_path / "topk" / "shard-00001.h5"
    with h5py.File(shard, "r+") as f:
        f["tail_logmass"][3] = np.nan
    m = json.loads((tmp_path / "topk" / "manifest.json").read_text())
    m["shards"][1]["sha256"] = sha256_file(shard)
    (tmp_path / "topk" / "manifest.json").write_text(json.dumps(m))
    rep = verify_cache(tmp_path / "topk")
    assert not rep.ok and rep.shards[1].sha256_ok and len(rep.problems) == 1, rep.problems
    assert re.fullmatch(
        r"shard-00001\.h5: tail_logmass is NaN or positive at row \d+ \(token 3 of the block\)", rep.problems[0]
    ), rep.problems
    b = bytearray((tmp_path / "full" / "shard-00000.h5").read_bytes())
    b[len(b) // 2] ^= 0x01
    (tmp_path / "full" / "shard-00000.h5").write_bytes(bytes(b))
    rep = verify_cache(tmp_path / "full")
    assert not rep.ok and rep.shards[0].sha256_ok is False
