"""``cache-teacher --generate``: the teacher answers prompt rows, and the token cache covers exactly its answers.

One pass: :class:`GenerateCacheJob` is the token task's cache job for prompt DATA. Per teacher batch it calls
:meth:`kdcli.lm.answers.TeacherAnswers.batch`, which drives ``transformers``' ``generate`` and hands every
generated position's raw logits to this job's reduction (the cache mode's :meth:`~kdcli.cache.modes.base.Mode.reduce`
plus the target's log-prob, on the device, step by step: no ``steps x rows x V`` tensor is ever kept). The rest is
the one cache pass of :mod:`kdcli.stages.cache` (shards, resume, torchrun ranks, the manifest).

**The answers are as durable as the shards**: each answer row's JSON (and whether it was rescored) is a per-row
dataset of its shard (``answer_json``, fixed-width UTF-8 bytes), published atomically with the cached
distributions, so a resumed run never recomputes a whole shard and never publishes a shard without its answers.
When every shard is whole, :meth:`GenerateCacheJob.complete` (rank 0) gathers them in row order into
``CACHE_DIR/answers.jsonl`` (and ``answers.parquet`` with ``--answers-parquet``), reads that file back with
:func:`kdcli.lm.text.load_text` exactly as ``train-student --data CACHE_DIR/answers.jsonl`` will, checks every row
hash against the shards' (exit 3 otherwise), and records its identity as the manifest's ``data``: the existing
data checks then accept that file and refuse any other (exit 3).

**Identity.** ``settings["generate"]`` holds the generation settings (:meth:`GenerationSettings.identity`: greedy
runs ignore the sampling knobs), the answer kind, the stop ids and the prompts' fingerprint (their content: the
teacher's context and the student's prompt per row); :func:`kdcli.cache.manifest.plan_differences` compares it
instead of the data fingerprint, which is the answers', known only at the end. The manifest's ``answers`` entry
says what was written: files, SHA-256 of the JSONL bytes, rows, rescored rows, finish reasons, answer tokens.

**Reproducible**: greedy answers are the argmax; sampled ones draw one counter-based uniform per (row, step) from
(``--seed``, the prompt's hash, the generation index) (:func:`kdcli.lm.generate.step_uniforms`), and the pass's
batches never cross a shard and every run starts at a shard boundary, so a re-run, a run resumed after any number
of shards and a torchrun run (same ``--batch-size``) compute every batch identically (tests/test_generate_cli.py,
tests/test_generate_distributed.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from kdcli.cache.manifest import new_manifest
from kdcli.cache.modes.base import Mode
from kdcli.cache.storage import Location
from kdcli.cache.tokens import token_keys
from kdcli.infra import log
from kdcli.infra.errors import CacheError, UsageError
from kdcli.lm.answers import (
    ANSWERS_JSONL,
    ANSWERS_PARQUET,
    TeacherAnswers,
    answers_jsonl_bytes,
    load_prompts,
    parquet_bytes,
)
from kdcli.lm.generate import GenerationSettings
from kdcli.lm.hf import is_placed
from kdcli.lm.text import load_text, read_template, tokenizer_identity
from kdcli.tasks.base import CacheJob, cache_mode
from kdcli.tasks.lm import (
    LMCacheSummary,
    TokenTask,
    capped_batch_size,
    capped_shard_size,
    lm_teacher,
    lm_tokenizer,
    pad_id_of,
    text_settings,
    token_cache_layout,
    token_cache_plan,
    token_summary_fields,
)
from kdcli.tasks.reports import CacheSummary

ANSWER_KEY = "answer_json"
"""The per-row shard dataset holding each answer row (UTF-8 JSON ``{"row": <answers row>, "rescored": bool}``)."""


def generating_teacher(cfg, tok, tok_spec: str):
    """(model, info) of the teacher (:func:`kdcli.tasks.lm.lm_teacher`), refused unless it can ``generate()``."""
    model, info = lm_teacher(cfg, tok, tok_spec)
    if not hasattr(model, "generate"):
        raise UsageError(
            f"--generate needs a Hugging Face causal LM teacher (one with generate()); {cfg.teacher} is a "
            f"{type(model).__name__}: cache its text without --generate, or use a Hugging Face teacher"
        )
    return model, info


def generation_settings(cfg) -> GenerationSettings:
    """The config's generation options, checked (UsageError, one line)."""
    return GenerationSettings(
        max_new_tokens=cfg.max_new_tokens,
        generations_per_prompt=cfg.generations_per_prompt,
        sample=cfg.sample,
        temperature=cfg.gen_temperature,
        top_p=cfg.top_p,
        seed=cfg.seed,
    ).check()


def answer_cells(records: list[dict], rescored: np.ndarray) -> np.ndarray:
    """(b,) fixed-width bytes: each answer row's JSON with its rescored flag (the shard's ``answer_json``). JSON
    escapes every control character, so no cell holds the NUL bytes NumPy strips from fixed-width strings."""
    cells = [
        json.dumps({"row": r, "rescored": bool(x)}, ensure_ascii=False).encode("utf-8")
        for r, x in zip(records, rescored)
    ]
    return np.asarray(cells, dtype=np.bytes_)


def read_answer_cells(cache: Location, manifest: dict) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """(answer rows, rescored flags, row hashes) of every listed shard, in row order (CacheError if one lacks them).
    A shard in object storage is read whole (this runs once, when the cache completes)."""
    rows, rescored, hashes = [], [], []
    for entry in sorted(manifest["shards"], key=lambda s: s["row_start"]):
        name = entry["name"]
        try:
            source = cache.local / name if cache.local is not None else io.BytesIO(cache.read_bytes(name))
            with h5py.File(source, "r") as f:
                cells, h = f[ANSWER_KEY][()], f["row_hash"][()]
        except (OSError, KeyError) as e:
            raise CacheError(
                f"shard {name} of {cache} holds no readable answers ({e.__class__.__name__}); rebuild the cache "
                "with cache-teacher --overwrite"
            ) from None
        for c in cells:
            cell = json.loads(bytes(c).decode("utf-8"))
            rows.append(cell["row"])
            rescored.append(bool(cell["rescored"]))
        hashes.append(h)
    return rows, np.asarray(rescored, dtype=bool), np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)


def in_cache(out: str, name: str) -> str:
    """``name`` inside the cache ``--out`` as the user wrote it (a local directory or an object-store URL)."""
    return f"{out.rstrip('/')}/{name}"


class GenerateCacheJob(CacheJob):
    """The token cache job of ``cache-teacher --generate`` (module docstring): prompt rows in, answer rows out."""

    unit = "answers"

    def __init__(self, cfg, mode: Mode):
        self.cfg, self.mode = cfg, mode
        # what can be checked without the teacher first: its settings, then the prompts (with its tokenizer)
        self.gen = gen = generation_settings(cfg)
        text = text_settings(cfg)
        self.teacher_prompt = read_template(cfg.teacher_prompt)
        self.tok, tok_spec = lm_tokenizer(cfg)
        self.prompts = prompts = load_prompts(cfg.data, self.tok, text, self.teacher_prompt)
        for note in prompts.notes:
            log.info(f"note: {note}")
        self.model, self.info = generating_teacher(cfg, self.tok, tok_spec)
        self.placed = is_placed(self.model)
        self.V = V = self.info.vocab_size
        self.k, self.temperatures, mode_layout, temp_settings = token_cache_layout(cfg, mode, V)
        self.answers = TeacherAnswers(self.model, self.tok, prompts, gen, pad_id=pad_id_of(self.tok), vocab_size=V)
        self.num_rows = self.answers.num_rows
        self.sampled = mode.sampled
        most = int(self.answers.budgets.max()) + 1  # positions an answer row caches at most
        self.shard_size = capped_shard_size(cfg.shard_size, mode, mode_layout, V, most)
        # a rescored row is one plain forward over context + answer: the same logits budget as the text cache
        longest = max(len(c) for c in prompts.contexts) + most
        self.batch_size = capped_batch_size(cfg.batch_size, longest, V, "answers")
        keys = token_keys(mode.name, self.temperatures)
        self.token_keys = frozenset(keys)
        generate = {
            **gen.identity(),
            "answer_kind": prompts.kind,
            "stop_ids": [int(s) for s in self.answers.stop_ids],
            "num_prompts": prompts.n,
            "prompts_fingerprint": prompts.fingerprint,
        }
        settings, layout = token_cache_plan(
            cfg, mode, V, mode_layout, temp_settings, keys, text, self.teacher_prompt,
            prompts.kind, self.shard_size, self.info.load_dtype
        )  # fmt: skip
        settings["generate"] = generate
        self.layout = layout = {**layout, "extra_row_keys": [ANSWER_KEY]}
        # The data are the answers, known when the cache completes (complete() fills this entry in).
        data = {"spec": in_cache(cfg.out, ANSWERS_JSONL), "num_samples": self.num_rows, "fingerprint": None}
        self.plan = new_manifest(
            teacher=self.info.identity(),
            data=data,
            settings=settings,
            layout=layout,
            num_rows=self.num_rows,
            tokenizer=tokenizer_identity(self.tok, tok_spec),
        )
        self.plan["prompts"] = prompts.identity()

    def units(self, start: int, stop: int) -> int:
        return stop - start

    def describe(self) -> str:
        cfg, gen = self.cfg, self.gen
        how = f"sampled at T {gen.temperature:g}, top-p {gen.top_p:g}, seed {gen.seed}" if gen.sample else "greedy"
        per = f" x {gen.generations_per_prompt}" if gen.generations_per_prompt > 1 else ""
        return (
            f"teacher {cfg.teacher} ({self.info.num_parameters:,} parameters, vocabulary {self.V}) answers "
            f"{self.prompts.n} prompts{per} ({how}, at most {gen.max_new_tokens} tokens each"
            + (", teacher prompt on" if self.teacher_prompt else "")
            + f"); caching mode {self.mode.name}"
            + self.mode.describe(self.k, token=True)
            + " at the answer tokens"
        )

    def forward(self, start, stop, device, generator):
        V = self.V

        def reduce(z: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            """(n, V) raw fp32 logits of n answer positions, (n,) the tokens the student's rows hold there."""
            if z.shape[-1] != V:
                raise CacheError(f"the teacher returned {z.shape[-1]} logits per token, expected {V}")
            z = z.to(device)  # the reduction runs on --device (a no-op unless the teacher's head sits elsewhere)
            logp = torch.log_softmax(z.float(), dim=-1)  # (n, V)
            out = self.mode.reduce(logp, self.k, generator, self.temperatures)
            out["target_logprobs"] = logp.gather(1, y.to(device)[:, None])[:, 0].to(torch.float16)
            out["bad"] = (~torch.isfinite(z).all(dim=1)).to(torch.int32)  # (n,)
            return out

        batch = self.answers.batch(start, stop, reduce, device)
        reduced = dict(batch.reduced)
        lengths = batch.lengths
        token_row = torch.from_numpy(np.repeat(np.arange(stop - start), lengths)).to(device)
        bad = reduced.pop("bad")
        reduced["nonfinite"] = (
            torch.zeros(stop - start, dtype=torch.int32, device=device).index_add_(0, token_row, bad) > 0
        )
        rows = np.arange(start, stop, dtype=np.int64)
        host = {
            "row_index": rows,
            "sample_index": rows.copy(),
            "row_hash": batch.data.row_hash,
            "lengths": lengths,
            ANSWER_KEY: answer_cells(batch.records, batch.rescored),
        }
        return host, reduced

    def storage(self, arrays):
        return self.mode.storage(arrays, self.layout)

    def nonfinite_message(self, row: int) -> str:
        prompt = row // self.gen.generations_per_prompt
        return f"teacher produced NaN/inf logits while answering row {row} (prompt row {prompt})"

    def complete(self, work: Location, manifest: dict) -> None:
        """Rank 0, every shard whole: write the answers file(s) from the shards, read them back as train-student
        will, check them against the shards and record their identity (module docstring)."""
        t0 = time.perf_counter()
        rows, rescored, hashes = read_answer_cells(work, manifest)
        if len(rows) != self.num_rows:
            raise CacheError(f"cache {work}: the shards hold {len(rows)} answers, expected {self.num_rows}")
        body = answers_jsonl_bytes(rows)
        work.put_bytes(ANSWERS_JSONL, body)
        files = [ANSWERS_JSONL]
        if self.cfg.answers_parquet:
            work.put_bytes(ANSWERS_PARQUET, parquet_bytes(rows))
            files.append(ANSWERS_PARQUET)
        with tempfile.TemporaryDirectory() as tmp:
            path = work.local / ANSWERS_JSONL if work.local is not None else Path(tmp) / ANSWERS_JSONL
            if work.local is None:
                path.write_bytes(body)  # what the object store now holds
            data = load_text(str(path), self.tok, self.prompts.settings, vocab_size=self.V, target_masks=True)
        if data.n != len(hashes) or not np.array_equal(data.row_hash, hashes):
            bad = int(np.flatnonzero(data.row_hash != hashes)[0]) if data.n == len(hashes) else min(data.n, len(hashes))
            raise CacheError(
                f"cache {work}: {ANSWERS_JSONL} row {bad} does not read back as the tokens cached for it; rebuild "
                "the cache with cache-teacher --overwrite"
            )
        identity = data.identity()
        identity["spec"] = in_cache(self.cfg.out, ANSWERS_JSONL)
        manifest["data"] = identity
        finish = Counter(r["generation"]["finish_reason"] for r in rows)
        manifest["answers"] = {
            "files": files,
            "sha256": hashlib.sha256(body).hexdigest(),
            "rows": len(rows),
            "prompts": self.prompts.n,
            "rescored": int(rescored.sum()),
            "finish_reason": dict(sorted(finish.items())),
            "answer_tokens": int(sum(r["generation"]["answer_tokens"] for r in rows)),
        }
        tokens = manifest["answers"]["answer_tokens"]
        log.info(
            f"wrote {len(rows)} answers to {identity['spec']} ({tokens:,} answer tokens; {int(rescored.sum())} rows "
            f"rescored by a forward pass; {time.perf_counter() - t0:.1f} s)"
        )

    def summary(self, base: CacheSummary, manifest: dict, computed_units: int) -> LMCacheSummary:
        computed_tokens = int(manifest["data"]["num_targets"]) * computed_units / max(self.num_rows, 1)
        answers = manifest.get("answers") or {}
        return GenerateCacheSummary(
            **token_summary_fields(base, manifest, computed_tokens),
            answers_file=in_cache(self.cfg.out, ANSWERS_JSONL),
            num_prompts=self.prompts.n,
            rescored=int(answers.get("rescored", 0)),
            finish_reason=dict(answers.get("finish_reason") or {}),
        )


@dataclass
class GenerateCacheSummary(LMCacheSummary):
    """The cache summary of a --generate run: the answers file and how its rows ended, beside the token counts."""

    answers_file: str = ""
    num_prompts: int = 0
    rescored: int = 0
    finish_reason: dict | None = None

    def count_rows(self) -> list[tuple[str, str]]:
        ends = ", ".join(f"{n:,} {why}" for why, n in sorted((self.finish_reason or {}).items()))
        return [
            ("answers", f"{self.answers_file} ({self.num_rows:,} rows for {self.num_prompts:,} prompts; {ends})"),
            ("answer tokens", f"{self.num_tokens:,} cached ({self.rescored:,} rows rescored by a forward pass)"),
        ]

    def speed_note(self) -> str:
        return f"{self.tokens_per_second:,.0f} answer tokens/s"


class GenerateTask(TokenTask):
    """The token task whose cache job answers prompt rows (``cache-teacher --generate``)."""

    def cache_job(self, cfg) -> GenerateCacheJob:
        return GenerateCacheJob(cfg, cache_mode(cfg))
