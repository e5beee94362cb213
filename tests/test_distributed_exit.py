"""Leaving a torchrun process group: on gloo the ranks exit one after another, the highest first (kdcli.distributed
.cleanup says why: gloo torn down at exit while a peer closes its connections aborts the process)."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import atexit, os, sys, time
    from pathlib import Path
    import torch
    from kdcli import distributed

    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])

    def last_words():  # registered before init: atexit runs it after kdcli's cleanup, just before the exit
        (out / f"rank{rank}-left").write_text(str(time.time()))
        if rank == 0 and not (out / "rank1-left").exists():
            sys.stderr.write("rank 0 left before rank 1\\n")
            os._exit(3)

    atexit.register(last_words)
    ctx = distributed.init(torch.device("cpu"))
    assert (ctx.rank, ctx.world) == (rank, 2)
    ctx.barrier()
    if rank == 1:
        time.sleep(1.0)  # rank 1 is the slow one: without the ordered exit rank 0 would leave first
''')


def test_ranks_leave_highest_first(tmp_path):
    (tmp_path / "script.py").write_text(SCRIPT)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(tmp_path / "script.py"), str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    left = {r: float((tmp_path / f"rank{r}-left").read_text()) for r in (0, 1)}
    assert left[1] <= left[0]
    assert "terminate called" not in p.stderr
