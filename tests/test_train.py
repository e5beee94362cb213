"""train_student: determinism, validation split, schedules, refusal to clobber a finished run."""

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from kdcli.config import CacheConfig, TrainConfig
from kdcli.infra.errors import UsageError
from kdcli.stages.cache import cache_teacher
from kdcli.stages.train import schedule as lr_schedule
from kdcli.stages.train import train_student


def cfg(blobs_npz, out, **kw):
    return TrainConfig(
        **{
            "student": "mlp",
            "student_args": {"hidden": [16]},
            "data": str(blobs_npz),
            "out": str(out),
            "epochs": 2,
            "batch_size": 64,
            **kw,
        }
    )


def test_same_seed_same_weights_different_seed_different(tmp_path, blobs_npz, teacher_run):
    cache_teacher(CacheConfig(teacher=str(teacher_run), data=str(blobs_npz), out=str(tmp_path / "c"), shard_size=100))
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("z", 2)):
        train_student(cfg(blobs_npz, tmp_path / name, cache=str(tmp_path / "c"), seed=seed, val_fraction=0.2))
        runs[name] = load_file(str(tmp_path / name / "model.safetensors"))
    assert all(np.array_equal(runs["a"][k].numpy(), runs["b"][k].numpy()) for k in runs["a"])
    assert not all(np.array_equal(runs["a"][k].numpy(), runs["z"][k].numpy()) for k in runs["a"])


def test_validation_rows_are_never_trained_on(tmp_path, blobs_npz):
    s = train_student(cfg(blobs_npz, tmp_path / "r", val_fraction=0.25))
    assert s.train_rows == 450  # 600 rows, 150 held out
    m = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all("val_accuracy" in e and "val_nll" in e for e in m)


def test_learns_the_blobs(tmp_path, blobs_npz):
    s = train_student(cfg(blobs_npz, tmp_path / "r", epochs=8, lr=3e-3, val_fraction=0.2))
    assert s.val_accuracy > 0.85


def test_bf16_precision_learns_the_blobs_with_float32_weights(tmp_path, blobs_npz):
    s = train_student(cfg(blobs_npz, tmp_path / "r", epochs=8, lr=3e-3, val_fraction=0.2, precision="bf16"))
    assert s.val_accuracy > 0.85
    w = load_file(str(tmp_path / "r" / "model.safetensors"))
    assert all(v.dtype.is_floating_point and v.element_size() == 4 for v in w.values())


def test_finished_run_is_not_clobbered(tmp_path, blobs_npz):
    train_student(cfg(blobs_npz, tmp_path / "r", epochs=1))
    before = (tmp_path / "r" / "model.safetensors").read_bytes()
    with pytest.raises(UsageError, match="already holds a finished run"):
        train_student(cfg(blobs_npz, tmp_path / "r", epochs=1, seed=5))
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == before
    train_student(cfg(blobs_npz, tmp_path / "r", epochs=1, seed=5, overwrite=True))
    assert (tmp_path / "r" / "model.safetensors").read_bytes() != before


def test_alpha_without_cache_is_refused(tmp_path, blobs_npz):
    with pytest.raises(UsageError, match="no --cache"):
        train_student(cfg(blobs_npz, tmp_path / "r", alpha=0.5))


@pytest.mark.parametrize("schedule,expect", [("constant", [1, 1, 1]), ("cosine", [1, 0.5, 0]), ("linear", [1, 0.5, 0])])
def test_schedules(schedule, expect):
    f = lr_schedule(TrainConfig(student="m", data="d", out="o", schedule=schedule, warmup_steps=2), total_steps=12)
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0)  # warmup
    assert [round(f(s), 6) for s in (2, 7, 12)] == pytest.approx(expect, abs=1e-6)


def test_bf16_on_a_cpu_without_native_bf16_warns_once(monkeypatch, capsys):
    import torch

    import kdcli.infra.precision as kt

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    kt.warn_emulated_bf16.cache_clear()
    for _ in range(3):
        with kt.precision_context("bf16", torch.device("cpu")):
            pass
    with kt.precision_context("fp32", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    assert capsys.readouterr().err.count("AVX512-BF16") == 1
