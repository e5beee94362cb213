"""Every registered cache mode, round-tripped: reduce the teacher's logits -> publish a shard -> read it back ->
targets -> the soft loss, against the full-vocabulary reference (torch.distributions, float64).

What each mode promises decides the check, read from the mode object (so a mode added to the registry is tested
without touching this file): exact at every T (full); the exact KL between the bucketed distributions (a mode
that fuses on buckets: topk); an unbiased estimate (the sampled modes: the mean over many independent draws is
within 5 standard errors of the exact KL), at T = 1 and at a stored T = 2."""

from __future__ import annotations

import pkgutil

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, kl_divergence

import kdcli.cache.modes as registry
from kdcli.cache.manifest import new_manifest, write_manifest
from kdcli.cache.modes import get_mode, mode_names
from kdcli.cache.reader import CacheReader
from kdcli.cache.writer import ShardWriter
from kdcli.losses import soft_kl

C, K, TEMPS = 40, 6, (1.0, 2.0)


def test_every_mode_file_is_registered_and_owns_its_datasets():
    """One file per mode, each registered under its own name; no two modes store a dataset of the same name (a
    shard says which mode wrote it), and each keys list starts with what identifies the mode's arrays."""
    files = {m.name for m in pkgutil.iter_modules(registry.__path__)} - {"base"}
    assert files == set(mode_names())
    seen: set[str] = set()
    for name in mode_names():
        mode = get_mode(name)
        assert mode.name == name
        keys = set(mode.keys(TEMPS))
        assert not keys & seen, (name, keys & seen)
        seen |= keys


def logits(rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, C, generator=g, dtype=torch.float64) * 2.0
    t[torch.arange(rows), torch.randint(0, C, (rows,), generator=g)] += 4.0  # a peaked teacher, a spread tail
    return t.float()


def round_trip(tmp_path, name: str, t: torch.Tensor, seed: int = 0):
    """Reduce ``t`` with mode ``name`` the way cache-teacher does, write one shard, read it back as targets."""
    mode = get_mode(name)
    k = mode.size(type("Opts", (), {"top_k": K, "samples": K})()) if mode.size_option else None
    layout = {
        "kind": "classification",
        "num_classes": C,
        "mode": name,
        **mode.layout(k, C, token=False),
        **mode.temperature_layout(TEMPS if mode.sparse else None),
        "shard_size": len(t),
    }
    m = new_manifest(teacher={}, data={"num_samples": len(t)}, settings={}, layout=layout, num_rows=len(t))
    d = tmp_path / f"{name}-{seed}"
    d.mkdir()
    write_manifest(d, m)
    red = mode.reduce(torch.log_softmax(t, -1), k, torch.Generator().manual_seed(seed), TEMPS)
    arrays = mode.storage({key: v.numpy() for key, v in red.items()}, layout)
    w = ShardWriter(d, m, shard_size=len(t), threaded=False)
    w.add(
        {
            "row_index": np.arange(len(t)),
            "sample_index": np.arange(len(t)),
            "row_hash": np.arange(len(t), dtype=np.uint64),
            **arrays,
        }
    )
    w.close()
    m["complete"] = True
    write_manifest(d, m)
    reader = CacheReader(d)
    return reader.targets(reader.read_rows(0, len(t)))


def reference_kl(t: torch.Tensor, s: torch.Tensor, T: float) -> torch.Tensor:
    return kl_divergence(Categorical(logits=t.double() / T), Categorical(logits=s.double() / T))


def bucketed_kl(t: torch.Tensor, s: torch.Tensor, ids: torch.Tensor, T: float) -> torch.Tensor:
    """KL between teacher and student coarsened onto the ``ids`` + one tail bucket, both tempered, in float64."""
    p, q = torch.softmax(t.double() / T, -1), torch.softmax(s.double() / T, -1)
    pb = torch.cat([p.gather(1, ids), 1 - p.gather(1, ids).sum(1, keepdim=True)], 1)
    qb = torch.cat([q.gather(1, ids), 1 - q.gather(1, ids).sum(1, keepdim=True)], 1)
    return (pb * (pb.log() - qb.log())).sum(1)


@pytest.mark.parametrize("T", TEMPS)
@pytest.mark.parametrize("name", mode_names())
def test_round_trip_against_the_full_vocabulary_reference(tmp_path, name, T):
    mode = get_mode(name)
    t = logits(16, seed=1)
    s = logits(16, seed=2) * 0.8
    if mode.exact_at_every_T:
        got = soft_kl(s, round_trip(tmp_path, name, t), T).double()
        torch.testing.assert_close(got, reference_kl(t, s, T), rtol=2e-3, atol=2e-3)  # fp16 log-probs
    elif mode.fusion == "buckets":
        targets = round_trip(tmp_path, name, t)
        got = soft_kl(s, targets, T).double()
        torch.testing.assert_close(got, bucketed_kl(t, s, targets.ids, T), rtol=2e-3, atol=2e-3)
        assert (got <= reference_kl(t, s, T) + 2e-3).all()  # a lower bound of the full KL
    else:
        assert mode.sampled
        rows = 1500  # one teacher row repeated: independent draws, seeded per batch as cache-teacher seeds them
        tt, ss = t[3:4].expand(rows, C), s[3:4].expand(rows, C)
        est = soft_kl(ss, round_trip(tmp_path, name, tt, seed=7), T).double()
        ref = reference_kl(t[3:4], s[3:4], T).item()
        se = est.std().item() / rows**0.5
        assert abs(est.mean().item() - ref) < 5 * se + 1e-3, (est.mean().item(), ref, se)
