"""Golden arrays: what kdcli's caches and resumed students hold, pinned so that a refactor that changes a cache or
a training run fails -- on any machine.

Each case builds a tiny cache or training run and compares its CONTENT with arrays stored in ``tests/golden/``:
caches array by array (every dataset of every shard, concatenated in manifest order) together with the manifest
fields that define the cache; students tensor by tensor from ``model.safetensors``.

How a comparison stays true on another CPU family (AVX2, AVX-512, AMX) and still catches a real
change (tests below prove both):

- **Integer arrays** (row ids, hashes, offsets, token ids, sampled and kept class ids, counts) are compared
  exactly. The inputs are chosen so that no id can flip on a rounding difference: the teachers' weights come from
  numpy's seeded generator (bit-identical everywhere; torch's CPU ``normal_`` rounds differently on each vector
  path), and :func:`near_ties` proves that every top-k decision has a margin far above float32 rounding.
- **Float arrays** are compared within a tolerance derived from their dtype (:func:`tolerance`): what one rounding
  into the stored dtype plus a few float32 ulps of the computation can move, never more. One changed log-prob of
  a realistic size, one changed id, or rows in another order fail (``test_the_comparison_catches_*``).
- **Exact equality** only where it is a product promise between two runs on the same machine, compared in the
  test, never against a literal: a resumed student equals an uninterrupted one bit for bit; a cache written by two
  processes equals the one-process cache array for array.

``KDCLI_GOLDEN_RECORD=1 python -m pytest tests/test_golden.py`` rewrites the arrays (an intended numeric change:
say why in the commit). ``KDCLI_GOLDEN_REPORT=FILE`` appends, per case and array, the largest deviation from the
golden in units of its tolerance (how the tolerances were checked on several float paths).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import make_blobs
from lm_helpers import make_tokenizer, text_rows, write_jsonl
from safetensors.numpy import load_file
from safetensors.torch import save_file
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.config import CacheConfig, resolve
from kdcli.stages.cache import cache_teacher

GOLDEN = Path(__file__).parent / "golden"
RECORD = bool(os.environ.get("KDCLI_GOLDEN_RECORD"))

# The manifest fields that define a cache's content (no timestamps, versions, paths, byte sizes or checksums).
MANIFEST_KEYS = (
    "format",
    "format_version",
    "kind",
    "mode",
    "num_classes",
    "vocab_size",
    "top_k",
    "samples",
    "logprob_dtype",
    "id_dtype",
    "count_dtype",
    "tail_dtype",
    "token_keys",
    "views",
    "augment",
    "aug_param_names",
    "shard_size",
    "text",
    "num_rows",
    "complete",
    "temperatures",
    "stat_temperatures",
    "stat_dtype",
    "sampler_temperatures",
)
DATA_KEYS = ("kind", "num_samples", "num_tokens", "num_targets", "num_classes", "input_shape", "fingerprint")

CLS = dict(shard_size=64, batch_size=32, seed=3)  # 200 rows -> shards of 64, 64, 64, 8; batches never straddle
CLS_MODES = {
    "full": dict(mode="full"),
    "topk": dict(top_k=2),
    "sample": dict(mode="sample", samples=8),
    "priority": dict(mode="priority", samples=3),
}
LM = dict(max_length=32, shard_size=8, batch_size=4, seed=3)  # 17 sequences -> 3 shards; batch 4 divides 8
LM_MODES = {
    "full": dict(mode="full"),
    "topk": dict(top_k=8),
    "sample": dict(mode="sample", samples=16),
    "priority": dict(mode="priority", samples=8),
}
STUDENT = {"d_model": 32, "n_layers": 1, "n_heads": 2, "max_length": 64}

# classification student: 180 training rows / batch 32 -> 6 steps per epoch, 18 in all; checkpoints at 4, 6, 8, 12, 16
CLS_TRAIN = [
    "--student",
    "mlp",
    "--student-arg",
    "hidden=[16]",
    "--student-arg",
    "dropout=0.3",
    "--epochs",
    "3",
    "--batch-size",
    "32",
    "--lr",
    "3e-3",
    "--schedule",
    "cosine",
    "--warmup-steps",
    "3",
    "--val-fraction",
    "0.1",
    "--seed",
    "7",
    "--checkpoint-every",
    "4",
    "--temperature",
    "3",
    "--alpha",
    "0.7",
]
CLS_KILL = "train-step:10"  # SIGKILL after step 10: the re-run continues from the step-8 checkpoint
# LM student: 17 sequences / batch 4 -> 5 steps per epoch, 10 in all; checkpoints at 3, 5 (epoch end), 6, 9
LM_TRAIN = [
    "--student",
    "transformer",
    *sum([["--student-arg", f"{k}={v}"] for k, v in STUDENT.items()], []),
    "--epochs",
    "2",
    "--batch-size",
    "4",
    "--lr",
    "3e-3",
    "--schedule",
    "cosine",
    "--warmup-steps",
    "2",
    "--temperature",
    "2",
    "--checkpoint-every",
    "3",
    "--seed",
    "5",
]
LM_KILL = "checkpoint.pt.partial:3"  # SIGKILL while writing the step-6 checkpoint: the re-run continues from step 5

# -- what a comparison tolerates ----------------------------------------------------------------------------------
ULPS = {np.dtype(np.float16): 2, np.dtype(np.float32): 64}
"""Stored-dtype ulps (of the value's magnitude) a float array may move between machines. A float16 array is computed
in float32 and rounded once: float32 noise far below a float16 step moves a stored value by at most one step (2
leave room at binade edges). A float32 array (tail masses, log Z_T, thresholds, student weights) carries the
float32 rounding of the computation itself: reductions over a few hundred classes in another order, trained
weights after a few dozen steps: 64 ulps (1.5e-5 relative). Measured against goldens recorded on AVX-512, under
ATEN_CPU_CAPABILITY default / avx2 / avx512 and MKL_ENABLE_INSTRUCTIONS=SSE4_2: at most 0.50 of the
float16 tolerance (one step) and 0.22 of the float32 one (14 ulps, the LM student)."""
ABS_FLOOR = 2.0**-14
"""Absolute slack near zero: a log-prob of -1e-5 is the difference of two numbers of the logits' size, so its
float32 rounding is absolute (~ |logit| * 2^-24), not relative to the result."""


def tolerance(golden: np.ndarray) -> np.ndarray:
    """Per element: how far a recomputation on another machine may land from ``golden``."""
    eps = float(np.finfo(golden.dtype).eps)
    mag = np.abs(np.where(np.isfinite(golden), golden, 0)).astype(np.float64)
    return ULPS[golden.dtype] * eps * mag + ABS_FLOOR


def deviation(golden: np.ndarray, got: np.ndarray) -> float:
    """The largest |got - golden| in units of :func:`tolerance` (inf where infinities or NaNs disagree); an integer
    array deviates by inf if any element differs."""
    if golden.shape != got.shape or golden.dtype != got.dtype:
        return float("inf")
    if golden.dtype.kind != "f":
        return 0.0 if np.array_equal(golden, got) else float("inf")
    g, x = golden.astype(np.float64), got.astype(np.float64)
    same_special = (np.isnan(g) & np.isnan(x)) | (np.isinf(g) & (g == x))
    if ((~np.isfinite(g) | ~np.isfinite(x)) & ~same_special).any():
        return float("inf")
    finite = np.isfinite(g)
    if not finite.any():
        return 0.0
    return float((np.abs(x - g)[finite] / tolerance(golden)[finite]).max())


def near_ties(logprobs: np.ndarray, k: int, margin: float = 1e-3) -> int:
    """Rows of (rows, C) log-probs where the k largest are not separated from each other and from the rest by
    ``margin`` nats: where a top-k cache's ids (or their order) could flip on float32 rounding (~1e-6 here)."""
    s = -np.sort(-logprobs.astype(np.float64), axis=1)[:, : k + 1]
    gaps = s[:, :-1] - s[:, 1:]
    finite = np.isfinite(s[:, :-1]) & np.isfinite(s[:, 1:])
    return int(((gaps < margin) & finite).any(axis=1).sum())


# -- building and reading what is compared ------------------------------------------------------------------------


def numpy_weights(model: torch.nn.Module, seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Every parameter of ``model`` drawn from numpy's seeded generator (bit-identical on every machine), scaled by
    1/sqrt(fan-in) like a default init."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, p in model.state_dict().items():
        fan_in = p.shape[-1] if p.dim() > 1 else max(p.shape[0], 1)
        w = rng.standard_normal(tuple(p.shape)) * (scale / np.sqrt(fan_in))
        out[name] = torch.from_numpy(w.astype(np.float32)).contiguous()
    return out


def mlp_teacher(d: Path, name: str, num_classes: int, input_shape: tuple, seed: int) -> list[str]:
    """cache-teacher flags for an ``mlp`` teacher (hidden 16) with numpy-drawn weights saved as safetensors."""
    from kdcli.models.classifiers import build_model

    model, _ = build_model("mlp", {"hidden": [16]}, num_classes=num_classes, input_shape=input_shape)
    save_file(numpy_weights(model, seed, scale=3.0), str(d / f"{name}.safetensors"))
    return ["--teacher", "mlp", "--teacher-arg", "hidden=[16]", "--teacher-weights", str(d / f"{name}.safetensors")]


def numpy_llama(directory: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny LlamaForCausalLM HF dir (as lm_helpers.make_llama) whose weights come from numpy, with a peaked head
    (large logit gaps, so the top-k ids of the golden caches have margins far above rounding)."""
    import shutil

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    state = numpy_weights(model, seed)
    for name, t in state.items():
        if "norm" in name:
            state[name] = torch.ones_like(t)  # RMSNorm gains of 1, as transformers initialises them
    state["lm_head.weight"] = state["lm_head.weight"] * 20.0
    model.load_state_dict(state)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, directory / f.name)
    return directory


def cache_arrays(d: Path) -> dict[str, np.ndarray]:
    """The cache-defining manifest subset (as one JSON string) and every dataset, shards concatenated in order."""
    m = json.loads((d / "manifest.json").read_text())
    subset = {k: m.get(k) for k in MANIFEST_KEYS}
    subset["data"] = {k: m["data"].get(k) for k in DATA_KEYS}
    subset["settings"] = m["settings"]
    subset["teacher"] = {k: m["teacher"].get(k) for k in ("weights_sha256", "num_parameters", "vocab_size")}
    tok = m.get("tokenizer")
    subset["tokenizer"] = None if tok is None else {k: tok.get(k) for k in ("sha256", "vocab_size", "eos_token_id")}
    subset["shards"] = [[s["name"], s["row_start"], s["row_stop"]] for s in m["shards"]]
    parts: dict[str, list[np.ndarray]] = {}
    for s in m["shards"]:
        with h5py.File(d / s["name"], "r") as f:
            for name in f:
                parts.setdefault(name, []).append(f[name][()])
    out = {name: np.concatenate(v) for name, v in parts.items()}
    out["__manifest__"] = np.array(json.dumps(subset, sort_keys=True))
    return out


def weight_arrays(run: Path) -> dict[str, np.ndarray]:
    return load_file(str(run / "model.safetensors"))


def problems(golden: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> list[str]:
    """Every array that differs beyond its tolerance (empty: the content is the golden's)."""
    out = []
    for name in sorted(set(golden) | set(got)):
        if name not in golden or name not in got:
            out.append(f"{name}: only in {'the golden' if name in golden else 'the new result'}")
            continue
        dev = deviation(golden[name], got[name])
        if dev > 1.0:
            g, x = golden[name], got[name]
            what = (
                f"{g.dtype}{g.shape} vs {x.dtype}{x.shape}"
                if g.shape != x.shape or g.dtype != x.dtype
                else f"{dev:.3g}x its tolerance"
            )
            out.append(f"{name}: {what}")
    return out


def check(name: str, got: dict[str, np.ndarray]) -> None:
    path = GOLDEN / f"{name}.npz"
    if RECORD:
        GOLDEN.mkdir(exist_ok=True)
        np.savez_compressed(path, **got)
        return
    with np.load(path, allow_pickle=False) as z:
        golden = {k: z[k] for k in z.files}
    report = os.environ.get("KDCLI_GOLDEN_REPORT")
    if report:
        with open(report, "a") as f:
            for k in sorted(set(golden) & set(got)):
                f.write(json.dumps({"case": name, "array": k, "deviation": deviation(golden[k], got[k])}) + "\n")
    found = problems(golden, got)
    assert not found, f"{name}: content changed: " + "; ".join(found[:5])


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def spawn(args: list, **extra) -> subprocess.Popen:
    return subprocess.Popen(
        [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env(), **extra}
    )


def flags(opts: dict) -> list[str]:
    return sum([[f"--{k.replace('_', '-')}", str(v)] for k, v in opts.items()], [])


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread, for every test here


@pytest.fixture(scope="module")
def ws(tmp_path_factory, one_thread):
    """Everything built once; the subprocesses (torchrun, killed runs) overlap with the in-process work."""
    d = tmp_path_factory.mktemp("golden")
    procs = {}
    runner = CliRunner()

    def cli(*args) -> None:
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.stderr[-3000:]

    try:
        x, y = make_blobs(n=200, seed=1)
        np.savez(d / "blobs.npz", x=x, y=y)
        teacher = mlp_teacher(d, "teacher", 4, (8,), seed=11)
        for mode, opts in CLS_MODES.items():
            cli(
                "cache-teacher",
                *teacher,
                "--data",
                d / "blobs.npz",
                "--out",
                d / f"cls-{mode}",
                *flags({**CLS, **opts}),
            )
        procs["torchrun"] = spawn(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                "-m",
                "kdcli",
                "cache-teacher",
                *teacher,
                "--data",
                d / "blobs.npz",
                "--out",
                d / "cls-sample-2proc",
                *flags({**CLS, **CLS_MODES["sample"]}),
            ]
        )
        procs["cls-killed"] = spawn(
            [
                sys.executable,
                "-m",
                "kdcli",
                "train-student",
                "--data",
                d / "blobs.npz",
                "--cache",
                d / "cls-full",
                "--out",
                d / "cls-run",
                *CLS_TRAIN,
            ],
            KDCLI_TEST_KILL_AT=CLS_KILL,
        )

        rng = np.random.default_rng(0)  # 4x4 one-channel "images", so a pixel shift means something
        xi = rng.random((64, 1, 4, 4)).astype(np.float32)
        np.savez(d / "img.npz", x=xi, y=(xi.reshape(64, -1)[:, :8].sum(1) > 4).astype(np.int64))
        cli(
            "cache-teacher",
            *mlp_teacher(d, "img-teacher", 2, (1, 4, 4), seed=12),
            "--data",
            d / "img.npz",
            "--out",
            d / "cls-views",
            "--views",
            3,
            "--augment",
            "shift:1",
            *flags(CLS),
        )

        tok = make_tokenizer(d / "tok")
        lm_teacher = numpy_llama(d / "lm-teacher", tok, seed=7)  # seed 7: no top-k near-tie (test below)
        write_jsonl(d / "text.jsonl", text_rows(12))
        for mode, opts in LM_MODES.items():
            cache_teacher(
                resolve(
                    CacheConfig,
                    None,
                    dict(teacher=str(lm_teacher), data=str(d / "text.jsonl"), out=str(d / f"lm-{mode}"), **LM, **opts),
                )
            )
        procs["lm-killed"] = spawn(
            [
                sys.executable,
                "-m",
                "kdcli",
                "train-student",
                "--data",
                d / "text.jsonl",
                "--cache",
                d / "lm-sample",
                "--out",
                d / "lm-run",
                *LM_TRAIN,
            ],
            KDCLI_TEST_KILL_AT=LM_KILL,
        )
        done = {}
        for name, p in procs.items():
            out, err = p.communicate(timeout=300)
            done[name] = (p.returncode, err)
        yield d, done
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()


def teacher_logprobs(d: Path) -> tuple[np.ndarray, np.ndarray]:
    """float32 log-probs of both golden teachers at every cached row / predicted token, computed here with kdcli's
    own model loaders (the caches store them in float16, too coarse to see a gap of 1e-3)."""
    from kdcli.data import load_data
    from kdcli.lm.hf import build_lm, lm_logits
    from kdcli.lm.text import TextSettings, load_text, load_tokenizer, loss_positions, pad_batch
    from kdcli.models.classifiers import build_model

    data = load_data(str(d / "blobs.npz"))
    model, _ = build_model(
        "mlp", {"hidden": [16]}, num_classes=4, input_shape=(8,), weights=str(d / "teacher.safetensors")
    )
    with torch.inference_mode():
        cls = torch.log_softmax(model(data.x).float(), dim=-1).numpy()
        tok = load_tokenizer(str(d / "lm-teacher"))
        text = load_text(str(d / "text.jsonl"), tok, TextSettings(max_length=LM["max_length"]))
        lm, _ = build_lm(str(d / "lm-teacher"))
        ids, mask = pad_batch(text.ids, 0)
        idx, _ = loss_positions(text.ids, text.first_target, ids.shape[1])
        logits = lm_logits(lm.eval(), torch.from_numpy(ids), torch.from_numpy(mask))
        lm_lp = torch.log_softmax(logits.reshape(-1, logits.shape[-1])[torch.from_numpy(idx)].float(), -1).numpy()
    return cls, lm_lp


def test_top_k_decisions_have_margins_far_above_rounding(ws):
    """No golden top-k id can flip on another machine: in every row the k kept classes and the next one are at
    least 1e-3 nats apart (float32 rounding moves a log-prob by ~1e-6)."""
    d, _ = ws
    cls, lm = teacher_logprobs(d)
    assert len(lm) == int(json.loads((d / "lm-full" / "manifest.json").read_text())["data"]["num_targets"])
    assert near_ties(cls, CLS_MODES["topk"]["top_k"]) == 0
    assert near_ties(lm, LM_MODES["topk"]["top_k"]) == 0


@pytest.mark.parametrize("mode", list(CLS_MODES))
def test_classification_cache(ws, mode):
    d, _ = ws
    check(f"cls-{mode}", cache_arrays(d / f"cls-{mode}"))


def test_classification_cache_with_augmented_views(ws):
    d, _ = ws
    m = json.loads((d / "cls-views" / "manifest.json").read_text())
    assert m["num_rows"] == 192 and m["views"] == 3 and m["aug_param_names"] == ["dy", "dx"]
    check("cls-views", cache_arrays(d / "cls-views"))


def test_torchrun_cache_equals_one_process(ws):
    """Two processes write the same cache as one, array for array (a product promise: compared exactly)."""
    d, done = ws
    rc, err = done["torchrun"]
    assert rc == 0, err[-3000:]
    one, two = cache_arrays(d / "cls-sample"), cache_arrays(d / "cls-sample-2proc")
    assert set(one) == set(two)
    for k in one:
        assert np.array_equal(one[k], two[k]), k


@pytest.mark.parametrize("mode", list(LM_MODES))
def test_token_cache(ws, mode):
    d, _ = ws
    m = json.loads((d / f"lm-{mode}" / "manifest.json").read_text())
    assert m["kind"] == "token" and len(m["shards"]) == 3 and m["shard_size"] == 8
    check(f"lm-{mode}", cache_arrays(d / f"lm-{mode}"))


def _resume(d: Path, done: dict, name: str, args: list, from_step: int, tmp_path: Path) -> dict[str, np.ndarray]:
    """args: --data D --cache C --out RUN, then the training flags. Returns the resumed run's weights."""
    rc, err = done[f"{name}-killed"]
    assert rc == -signal.SIGKILL, err[-3000:]
    run = d / f"{name}-run"
    assert torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["global_step"] == from_step
    assert not (run / "model.safetensors").exists()
    r = CliRunner().invoke(app, ["train-student", *map(str, args)])  # the same command again: it resumes by itself
    assert r.exit_code == 0, r.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == from_step
    resumed = weight_arrays(run)
    check(f"{name}-student-resumed", resumed)
    # and an uninterrupted run of the same settings reaches the very same weights, bit for bit
    whole = [*map(str, args[:5]), str(tmp_path / "whole"), *map(str, args[6:])]
    r = CliRunner().invoke(app, ["train-student", *whole])
    assert r.exit_code == 0, r.stderr[-3000:]
    uninterrupted = weight_arrays(tmp_path / "whole")
    assert set(uninterrupted) == set(resumed)
    for k in resumed:
        assert np.array_equal(resumed[k], uninterrupted[k]), k
    return resumed


def test_classification_student_killed_and_resumed(ws, tmp_path):
    d, done = ws
    args = ["--data", d / "blobs.npz", "--cache", d / "cls-full", "--out", d / "cls-run", *CLS_TRAIN]
    _resume(d, done, "cls", args, 8, tmp_path)


def test_lm_student_killed_and_resumed(ws, tmp_path):
    d, done = ws
    args = ["--data", d / "text.jsonl", "--cache", d / "lm-sample", "--out", d / "lm-run", *LM_TRAIN]
    _resume(d, done, "lm", args, 5, tmp_path)


# -- the comparison still catches real changes ---------------------------------------------------------------------


def _golden(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / f"{name}.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.skipif(RECORD, reason="recording")
def test_the_comparison_catches_one_changed_logprob_or_id_or_row_order():
    """One log-prob near -1 moved by 0.01 nats (a small real change: a logit moved by about 1e-2), one top-k id, or two
    rows of a shard swapped (another batch order): each is reported."""
    g = _golden("lm-topk")
    assert problems(g, g) == []
    lp = g["topk_logprobs"].copy()
    i = np.unravel_index(np.argmin(np.abs(lp.astype(np.float32) + 1.0)), lp.shape)  # a log-prob near -1
    lp[i] = np.float16(float(lp[i]) + 0.01)
    assert problems(g, {**g, "topk_logprobs": lp}) == [
        f"topk_logprobs: {deviation(g['topk_logprobs'], lp):.3g}x its tolerance"
    ]
    ids = g["topk_ids"].copy()
    ids[7, 0] += 1
    assert [p.split(":")[0] for p in problems(g, {**g, "topk_ids": ids})] == ["topk_ids"]
    c = _golden("cls-full")
    swapped = {k: v.copy() for k, v in c.items()}
    for k in ("row_index", "sample_index", "row_hash", "logprobs"):
        swapped[k][[3, 4]] = swapped[k][[4, 3]]
    assert {p.split(":")[0] for p in problems(c, swapped)} == {"row_index", "sample_index", "row_hash", "logprobs"}


@pytest.mark.skipif(RECORD, reason="recording")
def test_the_comparison_catches_a_student_trained_on_another_batch_order(ws, tmp_path):
    """The same classification run with its batches in another order (--block-rows 32 instead of the default
    block size: the same rows, shuffled differently) ends outside the golden's tolerance by a wide margin."""
    d, _ = ws
    args = [
        "train-student",
        "--data",
        d / "blobs.npz",
        "--cache",
        d / "cls-full",
        "--out",
        tmp_path / "other",
        *CLS_TRAIN,
        "--block-rows",
        "32",
    ]
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.stderr[-3000:]
    g, got = _golden("cls-student-resumed"), weight_arrays(tmp_path / "other")
    assert max(deviation(g[k], got[k]) for k in g) > 100
