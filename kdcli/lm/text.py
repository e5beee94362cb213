"""JSONL text -> token-id sequences with stable row hashes, for token-level caches and LM training.

Rows of a ``.jsonl`` DATA file are either all ``{"text": ...}`` (plain text) or all ``{"prompt": ..., "response":
...}`` (instruction data). Turning them into sequences (``TextSettings``):

- text rows are **packed** by default: every document's tokens followed by EOS, concatenated, cut into
  ``max_length``-token chunks (the last one shorter); with ``pack: false`` each row is truncated to ``max_length``.
  Every token after the first of a sequence is predicted.
- prompt/response rows are one sequence each: ``prompt_template.format(prompt=...)`` tokenized, then the response
  tokenized **on its own** (plus EOS), so the response tokens are the same whatever context precedes them. Only
  response tokens are predicted unless ``prompt_loss`` is set. A sequence longer than ``max_length`` loses the end
  of its response (and, if the prompt alone is too long, the start of its prompt).
- ``teacher_prompt`` (prompt distillation): the teacher sees ``teacher_prompt.format(prompt=...)`` followed by the
  same response tokens; the student never sees that context. Cached positions are the response tokens, which are
  identical in both sequences, so the teacher's log-probs line up with the student's positions one to one.

Row ``i`` is identified by its index and ``row_hash[i]``: BLAKE2b-64 over the row's token ids (int32 LE) and the
index of its first predicted token (int64 LE). The fingerprint is SHA-256 over all row hashes in order, so a
re-tokenized, re-packed, edited or reordered dataset never matches a cache built from another one.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kdcli.data import fingerprint, split_slice
from kdcli.errors import UsageError

HF_HINT = "install the Hugging Face extra: pip install 'kdcli[hf]'"
TOKENIZER_DIR = "tokenizer"  # inside a kdcli LM run dir


# -- tokenizers --------------------------------------------------------------------------------------------------

def _transformers():
    try:
        import transformers
    except ImportError:
        raise UsageError("Hugging Face tokenizers and models need the transformers package", hint=HF_HINT) from None
    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:  # pragma: no cover - older transformers
        pass
    return transformers


@functools.lru_cache(maxsize=8)
def _load_tokenizer_cached(spec: str, mtime: float):
    tf = _transformers()
    p = Path(spec)
    try:
        if p.is_dir() and (p / TOKENIZER_DIR).is_dir() and (p / "model.json").is_file():
            return tf.AutoTokenizer.from_pretrained(str(p / TOKENIZER_DIR), local_files_only=True)
        if p.is_dir():
            return tf.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        if p.suffix == ".gguf":
            return tf.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
        if p.suffix == ".json":
            return tf.PreTrainedTokenizerFast(tokenizer_file=str(p))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
        raise UsageError(f"cannot load a tokenizer from {spec}: {first}") from None
    raise UsageError(f"tokenizer {spec!r}: give a local Hugging Face directory, a .gguf file, a tokenizer.json "
                     "file or a kdcli LM run directory")


def load_tokenizer(spec: str):
    """A Hugging Face tokenizer from a local dir, a ``.gguf`` file, a ``tokenizer.json`` or a kdcli LM run dir."""
    p = Path(spec)
    if not p.exists():
        raise UsageError(f"tokenizer not found: {spec} (give a local directory, a .gguf file or a tokenizer.json)")
    import copy

    return copy.deepcopy(_load_tokenizer_cached(str(p.resolve()), p.stat().st_mtime))  # callers may mutate theirs


def tokenizer_identity(tok, spec: str) -> dict:
    """Name/path, SHA-256 of what decides the token ids (the serialized tokenizer.json minus its padding/truncation
    runtime settings, the EOS/BOS/UNK tokens and the chat template: the same tokenizer hashes the same whether it
    came from a GGUF file, a HF dir or a run dir's copy) and sizes."""
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        spec_json = json.loads(backend.to_str())
        spec_json.pop("padding", None)
        spec_json.pop("truncation", None)
        h.update(json.dumps(spec_json, sort_keys=True).encode())
    else:  # slow (sentencepiece) tokenizers: hash the vocabulary
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(json.dumps({"special": {k: str(getattr(tok, k, None)) for k in ("eos_token", "bos_token", "unk_token")},
                         "chat_template": getattr(tok, "chat_template", None)}, sort_keys=True).encode())
    return {"spec": str(spec), "name": getattr(tok, "name_or_path", "") or Path(spec).name,
            "sha256": h.hexdigest(), "vocab_size": len(tok), "eos_token_id": tok.eos_token_id}


def save_tokenizer(tok, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(directory))


# -- settings and data -------------------------------------------------------------------------------------------

@dataclass
class TextSettings:
    """How JSONL rows become sequences. Part of a token cache's settings and of an LM run dir."""

    max_length: int = 512
    pack: bool = True
    prompt_template: str = "{prompt}"
    prompt_loss: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TokenData:
    """Token sequences (the student's view) with the index of each one's first predicted token."""

    spec: str
    kind: str  # "text" or "prompt"
    ids: list[np.ndarray]  # per sequence, int32 token ids (length <= max_length)
    first_target: np.ndarray  # (n,) int64: tokens [first_target, len) are predicted
    row_hash: np.ndarray  # (n,) uint64
    settings: TextSettings
    vocab_size: int
    prompts: list[str] | None = None  # prompt/response rows: the raw prompt (for --teacher-prompt)
    response_start: np.ndarray | None = None  # (n,) prompt/response rows: index of the first response token
    notes: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(s) for s in self.ids], dtype=np.int64)

    @property
    def num_targets(self) -> np.ndarray:
        """(n,) predicted tokens per sequence (= cached positions)."""
        return np.maximum(self.lengths - self.first_target, 0)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.row_hash)

    def identity(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "num_samples": self.n,
                "num_tokens": int(self.lengths.sum()), "num_targets": int(self.num_targets.sum()),
                "num_classes": self.vocab_size, "fingerprint": self.fingerprint}


def token_row_hashes(ids: list[np.ndarray], first_target: np.ndarray) -> np.ndarray:
    out = np.empty(len(ids), dtype=np.uint64)
    for i, s in enumerate(ids):
        h = hashlib.blake2b(np.ascontiguousarray(s, dtype="<i4").tobytes(), digest_size=8)
        h.update(np.int64(first_target[i]).astype("<i8").tobytes())
        out[i] = int.from_bytes(h.digest(), "little")
    return out


def read_template(value: str | None) -> str | None:
    """A template string, or ``@path`` to read it from a file. Must contain ``{prompt}``."""
    if value is None:
        return None
    if value.startswith("@"):
        p = Path(value[1:])
        try:
            value = p.read_text()
        except OSError as e:
            raise UsageError(f"cannot read template file {p}: {e.__class__.__name__}") from None
    if "{prompt}" not in value:
        raise UsageError(f"template {value[:60]!r} has no {{prompt}} placeholder; write where the row's prompt goes, "
                         "e.g. 'You are a pirate.\\n\\n{prompt}'")
    try:
        value.format(prompt="x")
    except (KeyError, IndexError, ValueError) as e:
        raise UsageError(f"template {value[:60]!r} is not a valid format string ({e}); write literal braces as "
                         "{{ and }}") from None
    return value


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise UsageError(f"data file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise UsageError(f"{path} line {lineno}: each line must be a JSON object with \"text\" or "
                                 "\"prompt\" and \"response\"")
            obj["_line"] = lineno
            rows.append(obj)
    return rows


def _row_kind(path: Path, row: dict) -> str:
    if "text" in row:
        kind, keys = "text", ("text",)
    elif "prompt" in row and "response" in row:
        kind, keys = "prompt", ("prompt", "response")
    else:
        raise UsageError(f"{path} line {row['_line']}: a row needs \"text\", or \"prompt\" and \"response\"; found "
                         f"keys {sorted(k for k in row if k != '_line')}")
    for k in keys:
        if not isinstance(row[k], str):
            raise UsageError(f"{path} line {row['_line']}: \"{k}\" must be a string, got {type(row[k]).__name__}")
    return kind


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def load_text(spec: str, tok, settings: TextSettings, *, vocab_size: int | None = None) -> TokenData:
    """Read a JSONL DATA spec (optionally sliced by row, before packing) and tokenize it."""
    base, sl = split_slice(spec)
    path = Path(base)
    rows = read_jsonl(path)
    if sl is not None:
        rows = rows[sl]
    if not rows:
        raise UsageError(f"{spec}: no rows")
    kinds = {_row_kind(path, r) for r in rows}
    if len(kinds) > 1:
        raise UsageError(f"{spec} mixes text rows and prompt/response rows; use one kind per file")
    kind = kinds.pop()
    L = settings.max_length
    if L < 2:
        raise UsageError("--max-length must be >= 2: a sequence needs a token to predict from")
    eos = tok.eos_token_id
    notes: list[str] = []
    prompts = None
    response_start = None
    if kind == "text":
        docs = [_encode(tok, r["text"]) + ([eos] if eos is not None else []) for r in rows]
        if settings.pack:
            flat = np.fromiter((t for d in docs for t in d), dtype=np.int32)
            ids = [flat[a:a + L] for a in range(0, len(flat), L)]
            ids = [s for s in ids if len(s) >= 2]
        else:
            cut = sum(len(d) > L for d in docs)
            if cut:
                notes.append(f"{cut} of {len(docs)} rows were truncated to --max-length {L}")
            ids = [np.asarray(d[:L], dtype=np.int32) for d in docs]
        first = np.ones(len(ids), dtype=np.int64)
    else:
        template = read_template(settings.prompt_template) or "{prompt}"
        ids, first_l, starts, prompts = [], [], [], []
        cut_resp = cut_prompt = 0
        for r in rows:
            p = _encode(tok, template.format(prompt=r["prompt"]))
            resp = _encode(tok, r["response"]) + ([eos] if eos is not None else [])
            if len(p) > L - 1:
                p = p[len(p) - (L - 1):]
                cut_prompt += 1
            if len(p) + len(resp) > L:
                resp = resp[:L - len(p)]
                cut_resp += 1
            seq = np.asarray(p + resp, dtype=np.int32)
            ids.append(seq)
            starts.append(len(p))
            first_l.append(1 if settings.prompt_loss else max(len(p), 1))
            prompts.append(r["prompt"])
        if cut_resp:
            notes.append(f"{cut_resp} of {len(rows)} responses were cut at --max-length {L}")
        if cut_prompt:
            notes.append(f"{cut_prompt} of {len(rows)} prompts were longer than --max-length {L} and lost their "
                         "start")
        first = np.asarray(first_l, dtype=np.int64)
        response_start = np.asarray(starts, dtype=np.int64)
    if not ids:
        raise UsageError(f"{spec}: no sequence with at least 2 tokens")
    width = vocab_size or len(tok)
    top = max(int(s.max()) for s in ids if len(s))
    if top >= width:
        raise UsageError(f"{spec}: token id {top} is out of range for a vocabulary of {width}")
    return TokenData(spec=spec, kind=kind, ids=ids, first_target=first, row_hash=token_row_hashes(ids, first),
                     settings=settings, vocab_size=width, prompts=prompts, response_start=response_start,
                     notes=notes)


def teacher_sequences(data: TokenData, tok, teacher_prompt: str | None) -> tuple[list[np.ndarray], np.ndarray]:
    """The teacher's sequences and the index of each one's first cached position's *target*.

    Without a teacher prompt these are the student's sequences. With one, sequence ``i`` is
    ``teacher_prompt.format(prompt)`` tokenized, then the student's response tokens; the tokens predicted at the
    cached positions are the same in both (checked here), so the cache lines up with the student's positions.
    """
    if teacher_prompt is None:
        return data.ids, data.first_target
    if data.kind != "prompt":
        raise UsageError("--teacher-prompt needs prompt/response rows ({\"prompt\": ..., \"response\": ...}): the "
                         "teacher's extra context goes before each prompt")
    if data.settings.prompt_loss:
        raise UsageError("--teacher-prompt cannot be combined with --prompt-loss: the teacher's prompt tokens differ "
                         "from the student's, so only response positions line up")
    template = read_template(teacher_prompt)
    seqs, firsts = [], []
    for i, s in enumerate(data.ids):
        prefix = _encode(tok, template.format(prompt=data.prompts[i]))
        resp = s[data.response_start[i]:]
        t = np.concatenate([np.asarray(prefix, dtype=np.int32), resp]).astype(np.int32)
        if len(prefix) == 0:
            raise UsageError(f"--teacher-prompt gives row {i} an empty context")
        seqs.append(t)
        firsts.append(len(prefix))
        assert np.array_equal(t[len(prefix):], s[data.first_target[i]:])
    return seqs, np.asarray(firsts, dtype=np.int64)


def pad_batch(seqs: list[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest: (b, L) int64 ids and (b, L) int64 attention mask."""
    L = max(len(s) for s in seqs)
    ids = np.full((len(seqs), L), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), L), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return ids, mask


def loss_positions(seqs: list[np.ndarray], first_target: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices into (b * width) of the logits that predict tokens, and the tokens they predict.

    Sequence ``i`` predicts tokens ``[first_target[i], len)``: its logits at positions ``first_target[i] - 1``
    to ``len - 2``. Padding is never a loss position.
    """
    idx, tgt = [], []
    for i, s in enumerate(seqs):
        a = int(first_target[i])
        if a < len(s):
            pos = np.arange(a - 1, len(s) - 1, dtype=np.int64)
            idx.append(i * width + pos)
            tgt.append(s[a:].astype(np.int64))
    if not idx:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(idx), np.concatenate(tgt)
