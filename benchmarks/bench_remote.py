"""A training epoch from an S3-compatible server on 127.0.0.1 / the same epoch from local disk.   target: <= 1.10

The cache is a real kdcli cache (``cache-teacher`` over synthetic data, a teacher trained by kdcli; full mode over
``--classes`` classes: 2 bytes a class a row, ~100 MB at the defaults). It is uploaded to a moto S3 server started
here in its own process (the store is another machine's job: its CPU time must not share this process's GIL), and
one epoch is read the way ``train-student`` reads it: ``CacheLoader`` (contiguous ~512 KiB blocks, 16 random blocks
shuffled together per group, every block checked), with ``--step`` a small student step per batch (targets, MLP
forward, KD loss, backward, AdamW) or without it the reads alone. Local and remote epochs alternate, ``--repeats``
times each, best kept, so background load hits both alike. Printed: remote / local per access strategy, the requests
and bytes each one fetched, the most bytes it held at once, the CPU seconds of this process (every thread, DataLoader
workers included) and of the server, and the median of the back-to-back remote/local pairs (load drift cancels).

Strategies (how h5py's reads of a remote shard are served):
  kdcli          exact byte ranges of each group's blocks (HDF5's own layout), fetched in one concurrent request
                 batch on a background thread one group ahead (kdcli.cache.storage, the default)
  kdcli-noahead  the same ranges, fetched when a block is read (no read-ahead)
  fsspec-CACHE   h5py over fsspec's own file object, ``fs.open(path, cache_type=CACHE, block_size=--fsspec-block)``:
                 readahead, blockcache, bytes, background, none
  whole          every shard downloaded whole and kept (memory grows with the cache: a reference, not an option)

    python benchmarks/bench_remote.py [--rows 50000] [--classes 1000] [--shard-size 8192] [--repeats 2]
        [--strategies kdcli,kdcli-noahead,fsspec-readahead,fsspec-blockcache] [--no-step] [--out DIR]

Writes bench_remote.json next to the printout (in --out). Needs the [remote] extra (fsspec, s3fs, moto[server]).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BUCKET = "kd-bench"


def kdcli(*args) -> None:
    p = subprocess.run([sys.executable, "-m", "kdcli", *map(str, args)], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"kdcli {' '.join(map(str, args))} failed:\n{p.stderr[-2000:]}")


def build_cache(work: Path, rows: int, classes: int, shard_size: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, size=rows)
    protos = rng.normal(size=(classes, 64)).astype(np.float32)
    x = (protos[y] + rng.normal(scale=0.5, size=(rows, 64))).astype(np.float32)
    data = work / "syn.npz"
    np.savez(data, x=x, y=y)
    cache = work / f"cache-{rows}x{classes}-{shard_size}"
    if not (cache / "manifest.json").exists():
        kdcli(
            "train-student",
            "--student",
            "mlp",
            "--student-arg",
            "hidden=[256]",
            "--data",
            data,
            "--out",
            work / "teacher",
            "--epochs",
            "1",
            "--batch-size",
            "512",
            "--overwrite",
        )
        kdcli(
            "cache-teacher",
            "--teacher",
            work / "teacher",
            "--data",
            data,
            "--out",
            cache,
            "--shard-size",
            shard_size,
            "--overwrite",
        )
    return data, cache


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


def upload(endpoint: str, cache: Path) -> str:
    import boto3

    s3 = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench", aws_secret_access_key="bench"
    )
    s3.create_bucket(Bucket=BUCKET)
    for p in sorted(cache.iterdir()):
        if p.is_file():
            s3.upload_file(str(p), BUCKET, f"{cache.name}/{p.name}")
    return f"s3://{BUCKET}/{cache.name}"


class FsspecShards:
    """``ShardFiles`` stand-in: h5py over fsspec's own buffered file object (``fs.open``), nothing fetched ahead."""

    def __init__(self, location, shards, cache_type: str, block_size: int):
        from kdcli.cache.storage import FetchStats

        self.location, self.names = location, [s["name"] for s in shards]
        self.cache_type, self.block_size = cache_type, block_size
        self._files, self._raw, self.stats = {}, {}, FetchStats()

    def file(self, i):
        import h5py

        if i not in self._files:
            fs, _ = self.location.fs()
            self._raw[i] = fs.open(
                self.location.path(self.names[i]), "rb", cache_type=self.cache_type, block_size=self.block_size
            )
            self._files[i] = h5py.File(self._raw[i], "r")
        return self._files[i]

    @property
    def handles(self):
        return self._files

    def fetch(self, key, spans, wait=False):
        pass

    def wait(self, key):
        pass

    def release(self, key):
        pass

    def hold(self, spans):
        import contextlib

        return contextlib.nullcontext()

    def raise_transport_error(self):
        pass

    def close(self):
        for f in self._files.values():
            f.close()
        for r in self._raw.values():
            r.close()
        self._files, self._raw = {}, {}


def cpu_seconds() -> float:
    """CPU time of this process, every thread (the reads, the fetch thread, fsspec's event loop, the step)."""
    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime  # children: DataLoader workers, once joined


def server_cpu_seconds(pid: int) -> float:
    """CPU time of the S3 server process (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_reader(where: str, strategy: str, block: int):
    from kdcli.cache import storage
    from kdcli.cache.reader import CacheReader

    storage.WHOLE_SHARD_BYTES = 1 << 20
    storage.LRU_BYTES = 32 << 20
    if strategy == "whole":
        storage.WHOLE_SHARD_BYTES = 1 << 62
        storage.process_lru().cap = 1 << 62
    else:
        storage.process_lru().cap = storage.LRU_BYTES
    r = CacheReader(where)
    if strategy.startswith("fsspec-"):  # a benchmark-only swap of the reader's shard source
        r._shards = FsspecShards(r.location, r.shards, strategy.split("-", 1)[1], block)
    if strategy == "kdcli-noahead":
        r.prefetch = lambda group: None
    return r


def epoch(reader, args, data, step: bool, e: int) -> dict:
    import torch

    from kdcli.cache.reader import CacheLoader
    from kdcli.losses import kd_loss
    from kdcli.models.classifiers import MLP

    torch.manual_seed(0)
    student = MLP((64,), reader.num_classes, hidden=[args.hidden])
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    loader = CacheLoader(
        reader, batch_size=args.batch_size, seed=0, num_workers=args.num_workers, block_rows=args.block_rows or None
    )
    cpu0, server0 = cpu_seconds(), server_cpu_seconds(args.server_pid)
    t0 = time.perf_counter()
    rows = 0
    for b in loader.epoch(e):
        rows += len(b["row_index"])
        if step:
            idx = torch.from_numpy(b["sample_index"])
            targets = reader.targets(b)
            loss = kd_loss(student(xt[idx]), targets, yt[idx], temperature=4.0, alpha=0.9).total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - t0
    loader.close()  # joins the workers, so their CPU time is counted
    del loader
    import gc

    gc.collect()
    st = reader.fetch_stats
    out = {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds() - cpu0,
        "server_cpu_seconds": server_cpu_seconds(args.server_pid) - server0,
        "rows": rows,
        "requests": st.requests,
        "mib_fetched": st.bytes / 2**20,
        "peak_held_mib": st.peak_held / 2**20,
        "direct_reads": st.direct,
    }
    reader.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--shard-size", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--strategies", default="kdcli,kdcli-noahead,fsspec-readahead,fsspec-blockcache")
    ap.add_argument("--fsspec-block", type=int, default=1 << 20, help="block_size of the fsspec strategies")
    ap.add_argument("--no-step", action="store_true", help="reads alone, no student step")
    ap.add_argument("--num-workers", type=int, default=0, help="DataLoader workers reading the cache (both sides)")
    ap.add_argument("--block-rows", type=int, default=0, help="rows per block (both sides; 0: ~512 KiB, the default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="bench_remote_"))
    work.mkdir(parents=True, exist_ok=True)
    data_path, cache = build_cache(work, args.rows, args.classes, args.shard_size)
    data = dict(np.load(data_path))
    manifest = json.loads((cache / "manifest.json").read_text())
    cache_mib = sum(s["bytes"] for s in manifest["shards"]) / 2**20
    proc, endpoint = start_moto()
    args.server_pid = proc.pid
    try:
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_EC2_METADATA_DISABLED="true",
        )
        url = upload(endpoint, cache)
        import torch

        from kdcli.cache.reader import READ_AHEAD_BYTES

        torch.set_num_threads(1)
        res: dict = {
            "rows": args.rows,
            "classes": args.classes,
            "shards": len(manifest["shards"]),
            "shard_mib": cache_mib / len(manifest["shards"]),
            "cache_mib": cache_mib,
            "batch_size": args.batch_size,
            "step": not args.no_step,
            "num_workers": args.num_workers,
            "block_rows": args.block_rows,
            "read_ahead_mib": READ_AHEAD_BYTES / 2**20,
            "strategies": {},
        }
        print(
            f"cache: {args.rows} rows x {args.classes} classes (full), {cache_mib:.1f} MiB in "
            f"{len(manifest['shards'])} shards; moto S3 at {endpoint}; "
            f"{'student step per batch' if not args.no_step else 'reads only'}",
            flush=True,
        )
        strategies = args.strategies.split(",")
        local_best = float("inf")
        for name in strategies:
            best, best_local, local_cpu, paired = None, float("inf"), float("inf"), []
            for rep in range(args.repeats):
                loc = epoch(open_reader(str(cache), "kdcli", args.fsspec_block), args, data, not args.no_step, rep)
                best_local, local_cpu = min(best_local, loc["seconds"]), min(local_cpu, loc["cpu_seconds"])
                rem = epoch(open_reader(url, name, args.fsspec_block), args, data, not args.no_step, rep)
                assert rem["rows"] == loc["rows"]
                paired.append(rem["seconds"] / loc["seconds"])  # back to back: load drift cancels
                if best is None or rem["seconds"] < best["seconds"]:
                    best = rem
            local_best = min(local_best, best_local)
            best["local_seconds"], best["local_cpu_seconds"] = best_local, local_cpu
            best["ratio"] = best["seconds"] / best_local
            best["paired_ratios"] = paired
            best["paired_median"] = float(np.median(paired))
            res["strategies"][name] = best
            print(
                f"{name:18s} remote {best['seconds']:7.2f} s / local {best_local:6.2f} s = {best['ratio']:5.2f} "
                f"(median of {len(paired)} back-to-back pairs {best['paired_median']:.2f})  "
                f"(CPU here {best['cpu_seconds']:5.2f} s vs {best['local_cpu_seconds']:5.2f} s, server "
                f"{best['server_cpu_seconds']:5.2f} s)  {best['requests']:5d} requests, {best['mib_fetched']:7.1f} "
                f"MiB, {best['peak_held_mib']:5.1f} MiB held at most",
                flush=True,
            )
        res["local_seconds_best"] = local_best
    finally:
        proc.terminate()
    (work / "bench_remote.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {work / 'bench_remote.json'}")


if __name__ == "__main__":
    main()
