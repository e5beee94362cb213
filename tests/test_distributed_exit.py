"""Leaving a torchrun process group: on gloo the ranks exit one after another, the highest first
(kdcli.infra.distributed.cleanup says why: gloo torn down at exit while a peer closes its connections aborts the
process)."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import atexit, os, sys, time
    from pathlib import Path
    import torch
    from kdcli.infra import distributed

    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])

    def last_words():  # registered before init: atexit runs it after kdcli's cleanup, just before the exit
        if rank == 0 and not (out / "rank1-leaving").exists():
            sys.stderr.write("rank 0 left before rank 1\\n")
            os._exit(3)

    def leaving():  # registered after init: rank 1 runs it before kdcli's cleanup starts
        (out / f"rank{rank}-leaving").write_text(str(time.time()))

    atexit.register(last_words)
    ctx = distributed.init(torch.device("cpu"))
    atexit.register(leaving)
    assert (ctx.rank, ctx.world) == (rank, 2)
    ctx.barrier()
    if rank == 1:
        time.sleep(1.0)  # rank 1 is the slow one: without the ordered exit rank 0 would leave first
""")


def test_ranks_leave_highest_first(tmp_path):
    (tmp_path / "script.py").write_text(SCRIPT)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(tmp_path / "script.py"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    # rank 0 got to its very last line only after rank 1 (asleep for 1 s) had reached its exit path: it waited.
    # (Comparing the two exit timestamps raced: rank 1 closes its connection in cleanup, before its last atexit.)
    assert (tmp_path / "rank1-leaving").exists() and "rank 0 left before rank 1" not in p.stderr
    assert "terminate called" not in p.stderr
