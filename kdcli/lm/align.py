"""Cross-tokenizer alignment: where each token sits in the text, the vocabulary as strings, and the positions at
which a teacher and a student with different tokenizers predict the next token from the same text.

**Coordinates: UTF-8 bytes.** Every span is a half-open range of byte offsets, not characters: a byte-level BPE
(GPT-2, Llama 3, Qwen, SmolLM) or a byte-fallback sentencepiece model (``<0xE2>``) splits one multi-byte character
into several tokens, which a fast tokenizer's character offsets report as the *same* character span; in bytes each
gets its own. TRL's GOLD works in bytes for the same reason (huggingface/trl ``trl/experimental/utils.py``:
``encode_with_byte_offsets``). Bytes are also the unit of bits per byte (:mod:`kdcli.lm.bpb`).

**Spans tile the text** (:func:`token_spans`): token ``i`` covers ``[start_i, end_i)`` with ``start_i = end_{i-1}``
(``start_0 = 0``), so the bytes before a token's start are exactly the text its prediction was conditioned on. How
``end_i`` is found, in order:

1. the token's *surface* (:func:`vocab_strings`: the bytes it spells) is the next bytes of the text at the cursor,
   and its end lands inside the span the tokenizer's offsets give it: ``end = cursor + len(surface)``. This splits
   the pieces of one multi-byte character, gives a byte-level ``Ġthe`` its leading space even where the tokenizer
   trims offsets (``trim_offsets``), and handles overlapping offsets (SmolLM2 reports ``Ġâ`` as " ☃" and the two
   bytes after it as "☃" again);
2. otherwise the offsets decide: ``end = max(cursor, min(offset_end, next token's offset_start))`` -- the next
   token's start caps it, so a sentencepiece dummy-prefix ``▁`` that shares the first character's offsets gets
   zero width, and a normalised token (lower-cased, NFKC) covers what its offsets say.

Gaps (text no token covers, e.g. whitespace a pre-tokenizer drops) therefore belong to the *following* token.
Special tokens written *in* the text (a chat template's ``<|im_end|>``) cover their characters like any token.

**Segments and keys** (:class:`SegmentSpans`, :func:`segment_tokens`): kdcli tokenizes pieces of a row on their own
-- a document (text rows), the formatted prompt and the response (prompt/response rows), an assistant turn's
content inside the rendered chat (chat rows) -- and both tokenizers see these *segments* with identical text,
whatever else differs (packing into chunks of their own length, a chat template, ``--teacher-prompt``). A token's
span is recorded relative to its segment, with the segment's global index. The EOS kdcli appends after a document
or response, and the first token of a chat turn's end-of-turn marker, are *zero width at the segment's end*: "the
segment ends here". A prediction's **key** is ``(segment, start)``: the next token starts at that byte of that
segment. A teacher and a student prediction with equal keys have seen the same text of the segment and predict the
token that starts there: they **align** (:func:`align_keys`). Elsewhere (a student boundary inside a teacher token
or vice versa) the position is **skipped**, not merged (docs/lm.md: GOLD's span merging multiplies chain-rule
probabilities into unnormalised vectors that are not a divergence between two distributions of the same event;
skipping keeps every aligned term an exact comparison, and the share of aligned positions is reported). Zero-width
tokens elsewhere (a lone sentencepiece ``▁``) and tokens outside every segment (prompt text a template adds, chat
headers) have no key. *Assumption* (packed text rows): each model's context starts at its own chunk boundary, so
two aligned predictions have seen the same text up to the same byte, each from its own chunk start.

**The vocabulary as strings** (:func:`vocab_strings`): each id's surface as it appears in decoded text, as bytes
(byte-level ``Ġ`` -> space, ``Ċ`` -> newline, ...; sentencepiece ``▁`` -> space; byte-fallback ``<0xNN>`` -> that
byte). A token that is part of a UTF-8 character is its raw bytes, so a byte-level teacher's ``0xE2`` and a
byte-fallback student's ``<0xE2>`` match: both say "the next byte is 0xE2". Special tokens are compared by their
content in a separate namespace (a ``str``, never equal to a ``bytes`` surface); ids without text (padding rows of
an embedding matrix larger than the tokenizer) are ``None`` and never match. :func:`vocab_map` maps ids whose
surfaces are equal to shared *buckets*; several ids with one surface on either side share one bucket (their
probabilities are added on each side, an exact coarsening), and everything unmatched falls into one ``rest``
bucket per side.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kdcli.infra.errors import UsageError

SPAN_UNIT = "utf8_bytes"
EOS_KEY = "<eos>"  # the shared surface of both sides' EOS with vocab_map(..., pair_eos=True)
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (openai/gpt-2 ``src/encoder.py``; the same table
    as huggingface/tokenizers' ByteLevel pre-tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


BYTE_LEVEL_DECODE = {c: b for b, c in _bytes_to_unicode().items()}


# -- the vocabulary as strings -----------------------------------------------------------------------------------


def _slow(tok, what: str) -> UsageError:
    name = getattr(tok, "name_or_path", "") or type(tok).__name__
    return UsageError(
        f"{what} needs a fast tokenizer with character offsets, and {name} is a slow one; load it "
        "from a directory with a tokenizer.json (or convert it with transformers' "
        "convert_slow_tokenizer)"
    )


def require_fast(tok, what: str = "cross-tokenizer distillation") -> None:
    """UsageError (exit 2) for a tokenizer without character offsets (a "slow", Python-only tokenizer)."""
    if not getattr(tok, "is_fast", False) or getattr(tok, "backend_tokenizer", None) is None:
        raise _slow(tok, what)


def _decoder_kind(spec: dict) -> tuple[str, str | None]:
    """('byte_level' | 'metaspace' | 'literal', the metaspace replacement character) from a tokenizer.json."""

    def types(node) -> list[dict]:
        if not node:
            return []
        if node.get("type") == "Sequence":
            return [d for sub in node.get("decoders") or node.get("pretokenizers") or [] for d in types(sub)]
        return [node]

    decs = types(spec.get("decoder"))
    pres = types(spec.get("pre_tokenizer"))
    names = {d.get("type") for d in decs}
    if "ByteLevel" in names or (not decs and any(p.get("type") == "ByteLevel" for p in pres)):
        return "byte_level", None
    for d in decs:
        if d.get("type") == "Metaspace":
            return "metaspace", d.get("replacement", "▁")
        if d.get("type") == "Replace" and (d.get("pattern") or {}).get("String") and d.get("content") == " ":
            return "metaspace", d["pattern"]["String"]
    unsupported = names - {"ByteFallback", "Fuse", "Strip", None}
    if unsupported:
        raise UsageError(
            f"cannot spell the vocabulary of a tokenizer with a {'/'.join(sorted(unsupported))} decoder "
            "as text; cross-tokenizer distillation supports byte-level BPE, sentencepiece-style (▁, "
            "byte fallback) and literal-piece tokenizers"
        )
    return "literal", None


def _piece_bytes(piece: str, kind: str, replacement: str | None, byte_fallback: bool) -> bytes:
    if kind == "byte_level":
        if all(c in BYTE_LEVEL_DECODE for c in piece):
            return bytes(BYTE_LEVEL_DECODE[c] for c in piece)
        return piece.encode("utf-8")
    if byte_fallback:
        m = _BYTE_FALLBACK.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
    if kind == "metaspace":
        piece = piece.replace(replacement, " ")
    return piece.encode("utf-8")


@dataclass(frozen=True)
class VocabStrings:
    """A tokenizer's vocabulary as comparable strings: ``surfaces[id]`` is ``bytes`` (what the token spells in
    decoded text), ``str`` (a special token: its content, compared only with other special tokens) or ``None`` (an
    id with no text). ``eos_id``: the tokenizer's EOS (see :func:`vocab_map`'s ``pair_eos``)."""

    surfaces: tuple
    eos_id: int | None
    kind: str  # byte_level | metaspace | literal

    def __len__(self) -> int:
        return len(self.surfaces)

    def span_bytes(self, token_id: int) -> bytes | None:
        """What the token covers when it is written in the text: its surface, or a special token's content."""
        s = self.surfaces[token_id] if 0 <= token_id < len(self.surfaces) else None
        return s.encode("utf-8") if isinstance(s, str) else s

    def to_json(self) -> dict:
        """A JSON-able, exactly invertible form (:meth:`from_json`) for a cache to record: text surfaces that are
        valid UTF-8 as strings, other bytes as ``{"hex": ...}``, special tokens as ``{"special": ...}``."""
        out = []
        for s in self.surfaces:
            if s is None:
                out.append(None)
            elif isinstance(s, str):
                out.append({"special": s})
            else:
                try:
                    out.append(s.decode("utf-8"))
                except UnicodeDecodeError:
                    out.append({"hex": s.hex()})
        return {"kind": self.kind, "eos_id": self.eos_id, "surfaces": out}

    @classmethod
    def from_json(cls, d: dict) -> VocabStrings:
        def one(x):
            if x is None:
                return None
            if isinstance(x, str):
                return x.encode("utf-8")
            if "hex" in x:
                return bytes.fromhex(x["hex"])
            return str(x["special"])

        return cls(tuple(one(x) for x in d["surfaces"]), d.get("eos_id"), d["kind"])

    @property
    def sha256(self) -> str:
        """SHA-256 of the surfaces and the EOS id (what :func:`vocab_map` depends on), independent of how they were
        obtained (a tokenizer, or a cache's recorded table)."""
        h = hashlib.sha256()
        for s in self.surfaces:
            if s is None:
                h.update(b"n")
            elif isinstance(s, str):
                b = s.encode("utf-8")
                h.update(b"s" + len(b).to_bytes(4, "little") + b)
            else:
                h.update(b"b" + len(s).to_bytes(4, "little") + s)
        h.update(json.dumps({"eos_id": self.eos_id}).encode())
        return h.hexdigest()


def vocab_strings(tok, vocab_size: int | None = None) -> VocabStrings:
    """Every id's surface (module docstring), for a fast Hugging Face tokenizer; ``vocab_size`` (the model's
    logits, when larger than the tokenizer) pads with ``None``. UsageError for a slow tokenizer or an unsupported
    decoder."""
    require_fast(tok)
    spec = json.loads(tok.backend_tokenizer.to_str())
    kind, replacement = _decoder_kind(spec)
    byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
    n = max(len(tok), vocab_size or 0)
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    added = {int(i): t for i, t in getattr(tok, "added_tokens_decoder", {}).items()}
    out: list = []
    for i in range(n):
        t = added.get(i)
        if t is not None:
            out.append(str(t.content) if t.special else str(t.content).encode("utf-8"))
        elif i < len(pieces) and pieces[i] is not None:
            out.append(_piece_bytes(pieces[i], kind, replacement, byte_fallback))
        else:
            out.append(None)
    return VocabStrings(tuple(out), tok.eos_token_id, kind)


class BucketNumbers:
    """Buckets ``0 .. num_matched - 1`` are the matched strings, bucket ``num_matched`` the rest."""

    num_matched: int

    @property
    def rest(self) -> int:
        return self.num_matched

    @property
    def num_buckets(self) -> int:
        return self.num_matched + 1


@dataclass(frozen=True)
class VocabMap(BucketNumbers):
    """Teacher and student ids -> shared buckets ``0 .. num_matched - 1`` (one per surface both vocabularies have,
    ordered by the smallest teacher id spelling it) and the ``rest`` bucket ``num_matched`` (every id whose surface
    the other side lacks; with ``projected``, only ids without a shared prefix: :func:`vocab_map`). An exact
    partition of each vocabulary: a bucket's probability is the sum over its ids."""

    teacher_bucket: np.ndarray  # (V_teacher,) int64 in [0, num_matched]
    student_bucket: np.ndarray  # (V_student,) int64 in [0, num_matched]
    num_matched: int
    projected: bool = False

    @classmethod
    def identity(cls, vocab_size: int) -> VocabMap:
        """The same tokenizer on both sides: bucket i = id i, an empty rest bucket."""
        ids = np.arange(vocab_size, dtype=np.int64)
        return cls(ids, ids.copy(), vocab_size)

    def teacher_counts(self) -> np.ndarray:
        """(num_buckets,) teacher ids per bucket."""
        return np.bincount(self.teacher_bucket, minlength=self.num_buckets)

    def student_counts(self) -> np.ndarray:
        return np.bincount(self.student_bucket, minlength=self.num_buckets)

    @property
    def sha256(self) -> str:
        """SHA-256 of the mapping itself (both bucket arrays, int64 little-endian, and ``num_matched``)."""
        h = hashlib.sha256()
        h.update(np.int64(self.num_matched).tobytes())  # (projected or not shows in the bucket arrays)
        h.update(np.asarray(self.teacher_bucket, dtype="<i8").tobytes())
        h.update(np.asarray(self.student_bucket, dtype="<i8").tobytes())
        return h.hexdigest()

    def summary(self) -> dict:
        """What a manifest or a run's metrics record about the mapping."""
        tc, sc = self.teacher_counts(), self.student_counts()
        t_matched, s_matched = int(tc[: self.rest].sum()), int(sc[: self.rest].sum())
        return {
            "sha256": self.sha256,
            "num_matched": self.num_matched,
            "projected": self.projected,
            "teacher_vocab_size": len(self.teacher_bucket),
            "student_vocab_size": len(self.student_bucket),
            "teacher_matched_ids": t_matched,
            "student_matched_ids": s_matched,
            "teacher_matched_share": t_matched / max(len(self.teacher_bucket), 1),
            "student_matched_share": s_matched / max(len(self.student_bucket), 1),
            "merged_buckets": int(((tc[: self.rest] > 1) | (sc[: self.rest] > 1)).sum()),
        }


def _keys(v: VocabStrings, pair_eos: bool) -> list:
    keys = list(v.surfaces)
    if pair_eos and v.eos_id is not None and 0 <= v.eos_id < len(keys):
        keys[v.eos_id] = (EOS_KEY,)  # a tuple: equal only to the other side's EOS
    return keys


def vocab_map(
    teacher: VocabStrings, student: VocabStrings, *, pair_eos: bool = True, project: bool = False
) -> VocabMap:
    """Ids with equal surfaces -> one shared bucket (module docstring); all others -> the rest bucket.

    ``pair_eos``: the two EOS tokens match each other whatever their spelling. Right for text and prompt/response
    rows, where kdcli appends EOS outside the text (both mean "the document ends here"); wrong for chat rows
    rendered with the teacher's template, whose end-of-turn marker is literal text the student spells its own way:
    pass ``pair_eos=False`` there (special tokens then match by content only).

    ``project``: a token whose surface the other side lacks joins the bucket of its longest *shared* proper prefix
    (teacher " thousand" -> the bucket " thous" when both vocabularies have " thous" but the student lacks
    " thousand"); only tokens with no shared prefix (special tokens, ids without text) stay in the rest. Bucket w
    then means "the next token starts with w and has no longer shared prefix" on each side: an approximation of the
    same event (exact where the tokenizations coincide), but it keeps a small-vocabulary student's rest bucket from
    absorbing most of a large-vocabulary teacher's mass (docs/lm.md measures both). Off: the strict map
    (equal strings only)."""
    tk, sk = _keys(teacher, pair_eos), _keys(student, pair_eos)
    in_student = {k for k in sk if k is not None}
    order: dict = {}
    for k in tk:  # teacher id order: the identity map when both sides are one tokenizer with distinct surfaces
        if k is not None and k in in_student and k not in order:
            order[k] = len(order)
    m = len(order)
    longest = max((len(k) for k in order if isinstance(k, bytes)), default=0)

    def bucket(k) -> int:
        b = order.get(k) if k is not None else None
        if b is not None:
            return b
        if project and isinstance(k, bytes):
            for n in range(min(len(k) - 1, longest), 0, -1):
                b = order.get(k[:n])
                if b is not None:
                    return b
        return m

    t = np.fromiter((bucket(k) for k in tk), dtype=np.int64, count=len(tk))
    s = np.fromiter((bucket(k) for k in sk), dtype=np.int64, count=len(sk))
    return VocabMap(t, s, m, project)


# -- where tokens sit in the text --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSpans:
    """Token ids and the byte span each covers in one text (tiling: ``start[i] == end[i - 1]``)."""

    ids: np.ndarray  # (n,) int64
    start: np.ndarray  # (n,) int64 byte offsets into text.encode("utf-8")
    end: np.ndarray  # (n,) int64
    num_bytes: int  # len(text.encode("utf-8"))

    def __len__(self) -> int:
        return len(self.ids)

    def widths(self) -> np.ndarray:
        return self.end - self.start


def byte_offsets(text: str) -> np.ndarray:
    """(len(text) + 1,) the UTF-8 byte offset of each character offset."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    lens = 1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000)
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)


def encode_with_offsets(tok, text: str) -> tuple[list[int], np.ndarray]:
    """``tok(text, add_special_tokens=False)`` ids and their (n, 2) character offsets; UsageError without offsets."""
    require_fast(tok)
    try:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # no offsets after all
        raise _slow(tok, "cross-tokenizer distillation") from None
    ids = list(enc["input_ids"])
    return ids, np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)


def spans_from_offsets(text: str, ids: Sequence[int], char_offsets: np.ndarray, vocab: VocabStrings) -> TokenSpans:
    """Tiling byte spans (module docstring, steps 1-2) from a tokenizer's character offsets (n, 2) and the
    tokens' surfaces."""
    data = text.encode("utf-8")
    c2b = byte_offsets(text)
    offs = c2b[np.clip(np.asarray(char_offsets, dtype=np.int64).reshape(-1, 2), 0, len(text))]
    n = len(ids)
    start = np.zeros(n, dtype=np.int64)
    end = np.zeros(n, dtype=np.int64)
    cursor = 0
    for i, tid in enumerate(ids):
        a, b = int(offs[i, 0]), int(offs[i, 1])
        s = vocab.span_bytes(int(tid))
        if s and data.startswith(s, cursor) and a <= cursor + len(s) <= b:
            e = cursor + len(s)
        else:
            cap = int(offs[i + 1, 0]) if i + 1 < n else b
            e = max(cursor, min(b, cap))
        start[i], end[i] = cursor, e
        cursor = e
    return TokenSpans(np.asarray(ids, dtype=np.int64), start, end, len(data))


def token_spans(tok, text: str, vocab: VocabStrings | None = None) -> TokenSpans:
    """``text`` tokenized as kdcli tokenizes it (``tok(text, add_special_tokens=False)``), with each token's byte
    span. ``vocab``: :func:`vocab_strings` of ``tok`` (computed if omitted; pass it when calling this per row).
    UsageError for a tokenizer without offsets."""
    vocab = vocab if vocab is not None else vocab_strings(tok)
    ids, offs = encode_with_offsets(tok, text)
    return spans_from_offsets(text, ids, offs, vocab)


# -- segments and keys ---------------------------------------------------------------------------------------------
NO_SEGMENT = -1  # a token outside every segment (or a zero-width token inside one): no key, never aligned


@dataclass(frozen=True)
class SegmentSpans:
    """Per token of one sequence: its segment (``NO_SEGMENT``: none) and its byte span inside that segment."""

    segment: np.ndarray  # (n,) int32
    start: np.ndarray  # (n,) int32
    end: np.ndarray  # (n,) int32

    def __len__(self) -> int:
        return len(self.segment)

    @classmethod
    def empty(cls, n: int) -> SegmentSpans:
        return cls(np.full(n, NO_SEGMENT, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32))

    @classmethod
    def concat(cls, parts: Sequence[SegmentSpans]) -> SegmentSpans:
        if not parts:
            return cls.empty(0)
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("segment", "start", "end")))

    def __getitem__(self, index) -> SegmentSpans:
        return SegmentSpans(self.segment[index], self.start[index], self.end[index])

    def keys(self) -> np.ndarray:
        """(n,) int64 ``segment << 32 | start``, -1 for tokens without a segment."""
        return span_keys(self.segment, self.start)


def span_keys(segment: np.ndarray, start: np.ndarray) -> np.ndarray:
    """(n,) int64 prediction keys ``segment << 32 | start`` (-1 where ``segment`` is ``NO_SEGMENT``)."""
    seg = np.asarray(segment, dtype=np.int64)
    return np.where(seg >= 0, (seg << 32) | np.asarray(start, dtype=np.int64), -1)


def segment_tokens(spans: TokenSpans, segment: int, length: int | None = None) -> SegmentSpans:
    """The keyed spans of a segment's tokens (``spans`` relative to the segment's first byte; ``length`` its bytes,
    default ``spans.num_bytes``): tokens with a width keep their span (clipped to the segment), zero-width tokens
    have no key. Tokens starting at or after the segment's end get none either (callers add the end marker with
    :func:`segment_end`)."""
    n = spans.num_bytes if length is None else int(length)
    keep = (spans.end > spans.start) & (spans.start < n) & (spans.start >= 0)
    seg = np.where(keep, segment, NO_SEGMENT).astype(np.int32)
    return SegmentSpans(seg, np.clip(spans.start, 0, n).astype(np.int32), np.clip(spans.end, 0, n).astype(np.int32))


def segment_end(segment: int, length: int) -> SegmentSpans:
    """The zero-width token that ends a segment (an appended EOS, a chat turn's end-of-turn marker)."""
    one = np.array([length], np.int32)
    return SegmentSpans(np.array([segment], np.int32), one, one.copy())


class Segments:
    """The segments of a DATA spec in order, as they are met (``add`` returns each one's global index); ``identity``
    is ``{"kind", "count", "sha256"}`` over their texts: what both sides of a cross-tokenizer run must agree on (the
    tokenizer-free counterpart of the data fingerprint over row hashes)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.count = 0
        self._h = hashlib.sha256(kind.encode() + b"\0")

    def add(self, text: str) -> int:
        b = text.encode("utf-8")
        self._h.update(len(b).to_bytes(8, "little") + b)
        self.count += 1
        return self.count - 1

    def identity(self) -> dict:
        return {"kind": self.kind, "count": self.count, "sha256": self._h.hexdigest()}


def text_segment(tok, vocab: VocabStrings, text: str, segment: int, eos: int | None) -> tuple[list[int], SegmentSpans]:
    """A document or a response: its token ids (then ``eos``, if any, zero-width at its end) and their keyed spans."""
    ts = token_spans(tok, text, vocab)
    ids = [int(i) for i in ts.ids]
    sp = segment_tokens(ts, segment)
    if eos is None:
        return ids, sp
    return ids + [int(eos)], SegmentSpans.concat([sp, segment_end(segment, ts.num_bytes)])


def chat_segments(
    text: str,
    ids: Sequence[int],
    char_offsets: np.ndarray,
    turns: Sequence[tuple[int, int, int, str]],
    vocab: VocabStrings,
) -> SegmentSpans:
    """Keyed spans of a rendered chat's tokens. ``turns``: per assistant turn ``(segment, a, b, content)``, the
    turn's character range ``[a, b)`` in ``text`` and the message content. The segment is the turn's stripped
    content where the template writes it inside ``[a, b)`` (not found: the turn has no keys). Tokens inside the
    content keep their spans relative to it; the first token starting at or after its end inside the turn (the
    end-of-turn marker) is zero-width at the segment's end; every other token has no key."""
    ts = spans_from_offsets(text, ids, char_offsets, vocab)
    c2b = byte_offsets(text)
    out = SegmentSpans.empty(len(ts))
    for segment, a, b, content in turns:
        body = content.strip()
        pos = text.find(body, a, b) if body else a
        if pos < 0:
            continue
        c0, n, stop = int(c2b[pos]), len(body.encode("utf-8")), int(c2b[b])
        rel = ts.start - c0
        inside = (rel >= 0) & (rel < n) & (ts.end > ts.start)
        out.segment[inside] = segment
        out.start[inside] = rel[inside]
        out.end[inside] = np.minimum(ts.end[inside] - c0, n)
        after = np.flatnonzero((rel >= n) & (ts.start < stop))
        if len(after):
            out.segment[after[0]], out.start[after[0]], out.end[after[0]] = segment, n, n
    return out


def align_keys(teacher_keys: np.ndarray, student_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(student_index, teacher_index)``: the predictions with equal keys (each key at most once per side; -1 never
    aligns), ordered by student index."""
    t, s = np.asarray(teacher_keys, np.int64), np.asarray(student_keys, np.int64)
    ti, si = np.flatnonzero(t >= 0), np.flatnonzero(s >= 0)
    _, a, b = np.intersect1d(t[ti], s[si], assume_unique=True, return_indices=True)
    order = np.argsort(si[b], kind="stable")
    return si[b][order].astype(np.int64), ti[a][order].astype(np.int64)
