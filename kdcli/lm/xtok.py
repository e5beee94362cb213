"""Cross-tokenizer distillation from a token cache (docs/lm.md, "Any teacher, any student").

**What ``cache-teacher`` records** (:func:`cache_record`): per cached position, where the predicted teacher token sits
in its segment of the text (``span_segment``, ``span_start``, ``span_end``, int32 UTF-8 byte offsets;
:mod:`kdcli.lm.align`), and beside the shards the teacher's vocabulary as strings (``teacher_vocab.json``,
:meth:`~kdcli.lm.align.VocabStrings.to_json`, exactly invertible), checksummed in the manifest's ``xtok`` object
together with the identity of the segments' texts. A cache without them (made before this kdcli, or by a teacher
whose tokenizer has no offsets) serves only students with the teacher's tokenizer (:func:`require_spans`: exit 2,
naming the fix).

**What a student with another tokenizer does** (:class:`CrossTeacher`): its own rows (its tokenizer, its packing,
its max length) are keyed the same way from the same text (checked: the segments' identity must match, else exit
3). For a batch of its rows it reads the cached rows that hold the same segments (:class:`TeacherIndex`: each
cached row's segment range, built once from the ``span_segment`` column), pairs the predictions with equal keys
(:func:`~kdcli.lm.align.align_keys`) and hands the teacher's targets at the aligned positions to the loss
(:mod:`kdcli.lm.xtok_loss`) through a :class:`~kdcli.lm.align.VocabMap` between the two vocabularies. Unaligned
student positions train on the labels only.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from kdcli.cache.manifest import TEACHER_VOCAB
from kdcli.cache.modes import get_mode
from kdcli.cache.tokens import SPAN_KEYS, TokenCacheReader
from kdcli.infra.errors import CacheError, UsageError
from kdcli.lm.align import SegmentSpans, VocabMap, VocabStrings, align_keys, span_keys, vocab_map
from kdcli.lm.text import TokenData

XTOK_VERSION = 1
SPAN_UNIT = "utf8_bytes"
BLOCK_ROWS = 64  # cached rows read (and decoded) at once by a cross-tokenizer student
BLOCK_CACHE_BYTES = 64 << 20  # decoded blocks kept per process (least recently used dropped first)


# -- cache-teacher -------------------------------------------------------------------------------------------------


def cache_record(data: TokenData) -> tuple[dict, bytes]:
    """The manifest's ``xtok`` object and the content of ``teacher_vocab.json`` for a cache of ``data`` (loaded with
    ``spans=True``: its ``vocab``, the surfaces the spans were computed with, not spelled a second time)."""
    vocab = data.vocab
    body = json.dumps(vocab.to_json(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    record = {
        "version": XTOK_VERSION,
        "span_unit": SPAN_UNIT,
        "span_keys": list(SPAN_KEYS),
        "segments": data.segments,
        "vocab": {
            "file": TEACHER_VOCAB,
            "file_sha256": hashlib.sha256(body).hexdigest(),
            "sha256": vocab.sha256,
            "kind": vocab.kind,
            "size": len(vocab),
            "eos_id": vocab.eos_id,
        },
    }
    return record, body


def predicted_index(length: int, first_target: int, mask: np.ndarray | None) -> np.ndarray:
    """The predicted tokens of one sequence, in the order kdcli caches them (:func:`kdcli.lm.text.loss_positions`)."""
    if mask is not None:
        t = np.flatnonzero(np.asarray(mask)[:length]).astype(np.int64)
        return t[t >= 1]
    return np.arange(max(int(first_target), 1), length, dtype=np.int64)


def predicted_spans(data: TokenData, rows) -> SegmentSpans:
    """The spans of the predicted tokens of ``rows`` (in order, concatenated): one entry per cached position of a
    cache of ``data``, or per loss position of a training batch."""
    parts = []
    for i in rows:
        i = int(i)
        mask = data.target_mask[i] if data.target_mask is not None else None
        parts.append(data.spans[i][predicted_index(len(data.ids[i]), int(data.first_target[i]), mask)])
    return SegmentSpans.concat(parts)


def cached_spans(data: TokenData, start: int, stop: int) -> dict[str, np.ndarray]:
    """The span arrays a cache stores for rows ``[start, stop)`` (int32, one entry per predicted token)."""
    sp = predicted_spans(data, range(start, stop))
    return {"span_segment": sp.segment, "span_start": sp.start, "span_end": sp.end}


def predicted_bytes(data: TokenData, rows=None) -> int:
    """UTF-8 bytes the predicted tokens of ``rows`` (default: all) cover in their segments (bits per byte)."""
    sp = predicted_spans(data, range(data.n) if rows is None else rows)
    return int((sp.end.astype(np.int64) - sp.start).sum())


# -- reading a cache across tokenizers ------------------------------------------------------------------------------


def require_spans(reader: TokenCacheReader) -> dict:
    """The cache's ``xtok`` record; UsageError (exit 2) for a cache that has none, CacheError for another version."""
    x = reader.manifest.get("xtok")
    if not x and reader.manifest.get("imported"):
        raise UsageError(
            f"cache {reader.dir} was imported ({reader.manifest['imported'].get('format', 'another tool')}): its "
            "rows are token ids without their text, so it cannot serve a student with another tokenizer; cache "
            "the teacher on the text with kdcli cache-teacher, or train a student with the cache's tokenizer"
        )
    if not x and (reader.manifest.get("text") or {}).get("data_kind") == "tokens":
        raise UsageError(
            f"cache {reader.dir} was made from pre-tokenized rows (token ids without their text), so it cannot serve "
            "a student with another tokenizer; cache the teacher on the text rows (text, prompt/response or chat)"
        )
    if not x and (reader.manifest.get("settings") or {}).get("generate"):
        raise UsageError(
            f"cache {reader.dir} was written by cache-teacher --generate, which records no token spans, so it cannot "
            "serve a student with another tokenizer; cache the teacher over its answers (cache-teacher --data "
            "CACHE_DIR/answers.jsonl, the same --teacher-prompt) and train the student from that cache"
        )
    if not x:
        raise UsageError(
            f"cache {reader.dir} records no token spans (made before kdcli recorded them, or by a teacher "
            "tokenizer without offsets), so it cannot serve a student with another tokenizer; re-cache with this "
            "kdcli: the same cache-teacher command with --overwrite"
        )
    if x.get("version") != XTOK_VERSION or x.get("span_unit") != SPAN_UNIT:
        raise CacheError(
            f"cache {reader.dir} records token spans version {x.get('version')} ({x.get('span_unit')}); this kdcli "
            f"reads version {XTOK_VERSION}: re-cache with this kdcli"
        )
    return x


def read_teacher_vocab(reader: TokenCacheReader) -> VocabStrings:
    """The teacher's vocabulary as strings, from the cache's ``teacher_vocab.json`` (checked against the manifest)."""
    want = require_spans(reader)["vocab"]
    try:
        body = reader.location.read_bytes(TEACHER_VOCAB)
    except (OSError, CacheError):
        raise CacheError(
            f"cache {reader.dir} lacks {TEACHER_VOCAB} (the teacher's vocabulary as strings); re-run the same "
            "cache-teacher command to restore it"
        ) from None
    if hashlib.sha256(body).hexdigest() != want.get("file_sha256"):
        raise CacheError(f"cache {reader.dir}: {TEACHER_VOCAB} differs from the manifest's sha256; re-cache")
    vocab = VocabStrings.from_json(json.loads(body))
    if vocab.sha256 != want.get("sha256") or len(vocab) != reader.vocab_size:
        raise CacheError(f"cache {reader.dir}: {TEACHER_VOCAB} does not hold the teacher's {reader.vocab_size} ids")
    return vocab


def check_segments(reader: TokenCacheReader, data: TokenData, spec: str) -> None:
    """Refuse (exit 3) student data whose segments' texts are not the cache's (another DATA, edited or reordered
    rows, another prompt template)."""
    want = require_spans(reader)["segments"]
    if data.segments != want:
        raise CacheError(
            f"cache {reader.dir} was made from other text than {spec} (segments {want.get('kind')} x "
            f"{want.get('count')}, sha256 {str(want.get('sha256'))[:12]}; the data has {data.segments['kind']} x "
            f"{data.segments['count']}, {data.segments['sha256'][:12]}): rows reordered, edited, another "
            "--prompt-template, or other data"
        )


def check_method(method: str, mode: str, divergence: str, fused: bool) -> None:
    """What a cross-tokenizer method cannot serve, refused before anything is written (exit 2)."""
    if fused:
        raise UsageError(
            "--cross-tokenizer reads one teacher cache; fusing several --cache values across tokenizers is not "
            "supported: give one --cache"
        )
    if method in ("aligned", "hybrid") and get_mode(mode).sampled and divergence != "forward":
        raise UsageError(
            f"--cross-tokenizer {method} with a {mode} cache trains with forward KL only (reverse KL and JSD need "
            "the teacher's mass on buckets the sample does not determine); use --divergence forward, or a topk/full "
            "cache"
        )
    if method == "uld" and divergence != "forward":
        raise UsageError(
            "--divergence chooses the divergence of --cross-tokenizer aligned/hybrid; uld is a distance of its own: "
            "drop --divergence"
        )


@dataclass
class TeacherIndex:
    """Which cached rows hold which segments: for every row with a keyed position, its smallest and largest segment
    (rows are in data order, so both are non-decreasing)."""

    rows: np.ndarray  # (R,) int64 cached rows with at least one keyed position
    lo: np.ndarray  # (R,) int64
    hi: np.ndarray  # (R,) int64
    num_positions: int  # cached positions in all
    num_keyed: int  # ... with a key

    @classmethod
    def build(cls, reader: TokenCacheReader) -> TeacherIndex:
        rows, lo, hi = [], [], []
        positions = keyed = 0
        for row0, off, seg in reader.token_column("span_segment"):
            seg = seg.astype(np.int64)
            positions += len(seg)
            keyed += int((seg >= 0).sum())
            counts = np.diff(off)
            row_of = np.repeat(np.arange(len(counts)), counts)
            ok = seg >= 0
            if not ok.any():
                continue
            r = np.unique(row_of[ok])
            mins = np.full(len(counts), np.iinfo(np.int64).max)
            maxs = np.full(len(counts), -1)
            np.minimum.at(mins, row_of[ok], seg[ok])
            np.maximum.at(maxs, row_of[ok], seg[ok])
            rows.append(r + row0)
            lo.append(mins[r])
            hi.append(maxs[r])
        cat = (lambda xs: np.concatenate(xs).astype(np.int64)) if rows else (lambda xs: np.zeros(0, np.int64))
        out = cls(cat(rows), cat(lo), cat(hi), positions, keyed)
        if (np.diff(out.lo) < 0).any() or (np.diff(out.hi) < 0).any():
            raise CacheError(f"cache {reader.dir}: token spans are not in data order; re-cache with this kdcli")
        return out

    def rows_for(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Sorted cached rows holding any segment in the ranges ``[lo_j, hi_j]``."""
        a = np.searchsorted(self.hi, np.asarray(lo, np.int64), side="left")
        b = np.searchsorted(self.lo, np.asarray(hi, np.int64), side="right")
        if not len(a):
            return np.zeros(0, np.int64)
        return np.unique(np.concatenate([self.rows[x:y] for x, y in zip(a, b)] or [np.zeros(0, np.int64)]))


@dataclass
class CrossBatch:
    """A batch of student rows against the cache: ``aligned`` (A,) indexes the student's predicted positions (in
    :func:`kdcli.lm.text.loss_positions` order) that align, ``arrays`` the teacher's per-token arrays at them (in
    the same order), ``student`` the spans of every predicted student position."""

    aligned: np.ndarray
    arrays: dict[str, np.ndarray]
    student: SegmentSpans


class CrossTeacher:
    """The cache as seen by a student with another tokenizer (module docstring). ``data``: the student's rows,
    loaded with ``spans=True``; ``student_vocab``: its vocabulary as strings (padded to its logits);
    ``project``: the prefix vocabulary map (:func:`~kdcli.lm.align.vocab_map`)."""

    def __init__(
        self,
        reader: TokenCacheReader,
        data: TokenData,
        student_vocab: VocabStrings,
        project: bool = False,
        index: TeacherIndex | None = None,
    ):
        require_spans(reader)
        check_segments(reader, data, data.spec)
        self.reader, self.data = reader, data
        reader.read_spans = True
        self.teacher_vocab = read_teacher_vocab(reader)
        self.vmap: VocabMap = vocab_map(self.teacher_vocab, student_vocab, project=project)
        self.index = index if index is not None else TeacherIndex.build(reader)
        self.keys = reader.token_keys
        self.blocks: OrderedDict[int, dict] = OrderedDict()  # decoded blocks of cached rows, least recent first
        self.block_bytes = 0

    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The cached rows ``rows`` (sorted), through an LRU of decoded blocks of :data:`BLOCK_ROWS` rows (one read
        of a compressed shard decodes whole chunks anyway; a small cache stays decoded after its first epoch)."""
        parts = []
        for blk in np.unique(rows // BLOCK_ROWS):
            arrays = self.blocks.get(int(blk))
            if arrays is None:
                a = int(blk) * BLOCK_ROWS
                arrays = self.reader.read_rows(a, min(a + BLOCK_ROWS, self.reader.num_rows))
                self.blocks[int(blk)] = arrays
                self.block_bytes += sum(v.nbytes for v in arrays.values())
                while self.block_bytes > BLOCK_CACHE_BYTES and len(self.blocks) > 1:
                    _, old = self.blocks.popitem(last=False)
                    self.block_bytes -= sum(v.nbytes for v in old.values())
            else:
                self.blocks.move_to_end(int(blk))
            mine = rows[rows // BLOCK_ROWS == blk] - int(blk) * BLOCK_ROWS
            parts.append(self.reader.take(arrays, mine))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}

    def batch(self, rows: np.ndarray) -> CrossBatch:
        """The teacher's targets for the student rows ``rows`` (module docstring)."""
        student = predicted_spans(self.data, rows)
        s_keys = student.keys()
        lo, hi = [], []
        for i in rows:  # each student row's keyed segment range
            seg = self.data.spans[int(i)].segment
            seg = seg[seg >= 0]
            if len(seg):
                lo.append(int(seg.min()))
                hi.append(int(seg.max()))
        t_rows = self.index.rows_for(np.array(lo), np.array(hi))
        if not len(t_rows):
            return CrossBatch(np.zeros(0, np.int64), {}, student)
        got = self.read(t_rows)
        arrays = {k: got[k] for k in self.keys}
        si, ti = align_keys(span_keys(arrays["span_segment"], arrays["span_start"]), s_keys)
        return CrossBatch(si, {k: v[ti] for k, v in arrays.items()}, student)

    def aligned_share(self, rows) -> tuple[int, int]:
        """(aligned, predicted) student positions over ``rows``, from the cache's span columns alone."""
        t_keys = np.concatenate(
            [
                span_keys(seg, st)
                for (_, _, seg), (_, _, st) in zip(
                    self.reader.token_column("span_segment"), self.reader.token_column("span_start")
                )
            ]
            or [np.zeros(0, np.int64)]
        )
        s_keys = predicted_spans(self.data, rows).keys()
        return len(align_keys(t_keys, s_keys)[0]), len(s_keys)
