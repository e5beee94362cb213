"""LM DATA -> token-id sequences with stable row hashes, for token-level caches and LM training.

**Where rows come from.** DATA is a ``.jsonl`` file (one JSON object a line), a ``.parquet`` file, a directory of
``.parquet`` files (read in name order) or a directory written by ``datasets.Dataset.save_to_disk`` (its Arrow
files, in the order its ``state.json`` lists them). Parquet and Arrow are read with pyarrow, one record batch at a
time and only the columns used (``pip install 'kdcli[data-lm]'``). ``DATA[a:b]`` keeps rows ``a`` to ``b - 1``
(Python slice semantics) before anything else. The same rows in any of these formats give the same sequences, the
same row hashes and so the same cache.

**Row kinds** (one kind per DATA; a row/column set is recognised in this order):

- ``{"text": ...}``: packed by default: every document's tokens followed by EOS, concatenated, cut into
  ``max_length``-token chunks (the last one shorter); with ``pack: false`` each row is truncated to ``max_length``.
  Every token after the first of a sequence is predicted.
- ``{"prompt": ..., "response": ...}``: one sequence each: ``prompt_template.format(prompt=...)`` tokenized, then
  the response tokenized **on its own** (plus EOS), so the response tokens are the same whatever context precedes
  them. Only response tokens are predicted unless ``prompt_loss`` is set. A sequence longer than ``max_length``
  loses the end of its response (and, if the prompt alone is too long, the start of its prompt).
- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`` or ShareGPT
  ``{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}`` (``user``/``assistant`` are accepted
  for ``from`` too). Rendered with the tokenizer's own chat template, or ``chat_template`` (the Jinja text of
  ``--chat-template FILE``), and tokenized as ``tokenizer.apply_chat_template(messages)`` tokenizes it. Predicted
  tokens: every assistant turn's tokens including its end-of-turn marker, nothing else (every token with
  ``prompt_loss``). They are found by rendering the conversation up to each assistant turn with and without the
  generation prompt and mapping the characters of the turn (up to the last non-whitespace character the template
  writes after it, e.g. ``<|im_end|>`` but not the newline after it) to tokens through the tokenizer's offsets; this
  works with any template that renders earlier turns the same way whatever follows (checked; otherwise an error).
  Only ``role`` and ``content`` of each message reach the template. A chat row is never packed with another: it
  is one sequence, ending at its last predicted token (tokens after it are never predicted); longer than
  ``max_length`` it loses its end (noted), and a row with no assistant token left in ``max_length`` is skipped
  (noted). A multi-turn row's predicted tokens are several runs: ``TokenData.target_mask`` marks them (callers
  opt in with ``load_text(..., target_masks=True)`` and pass the masks to :func:`loss_positions`; without it
  such a row is refused).
- pre-tokenized: ``{"input_ids": [...], "labels": [...]}`` (``labels`` and ``attention_mask`` optional): token ids
  used as they are (not packed, not re-tokenized); ``labels`` in Hugging Face's unshifted convention say which
  tokens are predicted (:mod:`kdcli.lm.pretokenized`). What ``kdcli cache import`` writes beside an imported cache.

**Teacher-only context** (``teacher_prompt``, see :func:`teacher_view`): with a ``{prompt}`` placeholder (prompt/
response rows) the teacher reads ``teacher_prompt.format(prompt=<the row's prompt>)`` followed by the same
response tokens. Without one it is a system prompt for the teacher alone: for chat rows a system message
**preceding** the row's own (both joined into one system message, the teacher prompt first, a blank line between,
so templates that allow one system message still work; a row without one gets only the teacher prompt, which also
replaces a template's default system prompt); for prompt/response rows the teacher prompt, a blank line, then
the student's prompt. The student never sees it; the teacher's predicted tokens are the student's, checked token
by token, so the cache lines up with the student's positions one to one.

Row ``i`` is identified by its index and ``row_hash[i]``: BLAKE2b-64 over the row's token ids (int32 LE), the
index of its first predicted token (int64 LE) and, only where the predicted tokens are not one run to the end, the
predicted-token mask (``numpy.packbits``). The fingerprint is SHA-256 over all row hashes in order, so a
re-tokenized, re-packed, re-templated, edited or reordered dataset never matches a cache built from another one.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from kdcli.data import RowIdentity, split_slice
from kdcli.infra.errors import UsageError
from kdcli.lm import pretokenized
from kdcli.lm.align import Segments, SegmentSpans, VocabStrings, chat_segments, text_segment, vocab_strings

HF_HINT = "install the Hugging Face extra: pip install 'kdcli[hf]'"
TOKENIZER_DIR = "tokenizer"  # inside a kdcli LM run dir


# -- tokenizers --------------------------------------------------------------------------------------------------


def transformers_module():
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


REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")


def remote_code(path: Path) -> list[str]:
    """The code a Hugging Face directory asks to run (``auto_map`` entries of its config.json and
    tokenizer_config.json, e.g. ``modeling_x.XModel``); empty for a plain model, a .gguf file or a file."""
    found: list[str] = []
    if not Path(path).is_dir():
        return found
    for name in REMOTE_CODE_FILES:
        try:
            auto_map = json.loads((Path(path) / name).read_text()).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(auto_map, dict):
            found += [str(v if isinstance(v, str) else next(iter(v or [None]), v)) for v in auto_map.values()]
        elif auto_map:
            found.append(str(auto_map))
    return found


def check_remote_code(path: Path, trust_remote_code: bool) -> None:
    """Refuse (exit 2) a Hugging Face directory that would run its own Python code, unless the user said
    ``--trust-remote-code``. transformers is always called with ``trust_remote_code`` set explicitly, so it never
    asks on stdin (its prompt would land on kdcli's stdout, the results channel)."""
    code = remote_code(path)
    if code and not trust_remote_code:
        raise UsageError(
            f"{path} asks to run its own code ({', '.join(sorted(set(code)))[:160]} via auto_map); kdcli "
            "runs no code from a model directory unless you pass --trust-remote-code"
        )


@functools.lru_cache(maxsize=8)
def _load_tokenizer_cached(spec: str, mtime: float, trust_remote_code: bool):
    tf = transformers_module()
    p = Path(spec)
    kw = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    try:
        if p.is_dir() and (p / TOKENIZER_DIR).is_dir() and (p / "model.json").is_file():
            check_remote_code(p / TOKENIZER_DIR, trust_remote_code)
            return tf.AutoTokenizer.from_pretrained(str(p / TOKENIZER_DIR), **kw)
        if p.is_dir():
            check_remote_code(p, trust_remote_code)
            return tf.AutoTokenizer.from_pretrained(str(p), **kw)
        if p.suffix == ".gguf":
            return tf.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, **kw)
        if p.suffix == ".json":
            return tf.PreTrainedTokenizerFast(tokenizer_file=str(p))
    except UsageError:
        raise
    except Exception as e:  # a tokenizer the library cannot read is bad input, whatever it raises
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
        raise UsageError(f"cannot load a tokenizer from {spec}: {first}") from None
    raise UsageError(
        f"tokenizer {spec!r}: give a local Hugging Face directory, a .gguf file, a tokenizer.json "
        "file or a kdcli LM run directory"
    )


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """A Hugging Face tokenizer from a local dir, a ``.gguf`` file, a ``tokenizer.json`` or a kdcli LM run dir.
    A directory whose tokenizer needs its own code is refused unless ``trust_remote_code`` (--trust-remote-code)."""
    p = Path(spec)
    if not p.exists():
        raise UsageError(f"tokenizer not found: {spec} (give a local directory, a .gguf file or a tokenizer.json)")
    import copy

    tok = _load_tokenizer_cached(str(p.resolve()), p.stat().st_mtime, bool(trust_remote_code))
    return copy.deepcopy(tok)  # callers may mutate theirs


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
    h.update(
        json.dumps(
            {
                "special": {k: str(getattr(tok, k, None)) for k in ("eos_token", "bos_token", "unk_token")},
                "chat_template": getattr(tok, "chat_template", None),
            },
            sort_keys=True,
        ).encode()
    )
    return {
        "spec": str(spec),
        "name": getattr(tok, "name_or_path", "") or Path(spec).name,
        "sha256": h.hexdigest(),
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
    }


def save_tokenizer(tok, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(directory))


# -- settings and data -------------------------------------------------------------------------------------------


@dataclass
class TextSettings:
    """How DATA rows become sequences. Part of a token cache's settings and of an LM run dir."""

    max_length: int = 512
    pack: bool = True
    prompt_template: str = "{prompt}"
    prompt_loss: bool = False
    chat_template: str | None = None  # Jinja text replacing the tokenizer's own chat template (chat rows)

    def as_dict(self) -> dict:
        d = asdict(self)
        if d["chat_template"] is None:  # absent, not null: manifests written before chat rows stay identical
            del d["chat_template"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TextSettings:
        """The settings recorded by :meth:`as_dict` (a manifest's ``text`` or a run dir's); other keys ignored."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass
class TokenData(RowIdentity):
    """Token sequences (the student's view) with the index of each one's first predicted token."""

    spec: str
    kind: str  # "text", "prompt" or "chat"
    ids: list[np.ndarray]  # per sequence, int32 token ids (length <= max_length)
    first_target: np.ndarray  # (n,) int64: the first predicted token; without target_mask, [first_target, len)
    row_hash: np.ndarray  # (n,) uint64
    settings: TextSettings
    vocab_size: int
    prompts: list[str] | None = None  # prompt/response rows: the raw prompt (for --teacher-prompt)
    response_start: np.ndarray | None = None  # (n,) prompt/response rows: index of the first response token
    notes: list[str] = field(default_factory=list)
    # Multi-turn chat rows (load_text(..., target_masks=True)): per sequence, True at each predicted token. None
    # when every sequence predicts one run of tokens to its end, [first_target, len).
    target_mask: list[np.ndarray] | None = None
    chats: list[list[dict]] | None = None  # chat rows: the normalised messages (for --teacher-prompt)
    # load_text(..., spans=True): per sequence, each token's segment and byte span in it (kdcli.lm.align), and the
    # identity of the segments' texts (what a student with another tokenizer must agree on)
    spans: list[SegmentSpans] | None = None
    segments: dict | None = None
    vocab: VocabStrings | None = None  # with spans: every id's surface, as the spans were computed with

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(s) for s in self.ids], dtype=np.int64)

    @property
    def num_targets(self) -> np.ndarray:
        """(n,) predicted tokens per sequence (= cached positions)."""
        if self.target_mask is not None:
            return np.array([int(m.sum()) for m in self.target_mask], dtype=np.int64)
        return np.maximum(self.lengths - self.first_target, 0)

    def masks(self, rows) -> list[np.ndarray] | None:
        """``target_mask`` of ``rows`` (for :func:`loss_positions`), or None when no sequence needs one."""
        return None if self.target_mask is None else [self.target_mask[i] for i in rows]

    @property
    def num_classes(self) -> int:
        return self.vocab_size

    def identity_extra(self) -> dict:
        return {"kind": self.kind, "num_tokens": int(self.lengths.sum()), "num_targets": int(self.num_targets.sum())}


def _is_one_run(mask: np.ndarray, first: int) -> bool:
    """True when the predicted tokens are exactly [first, len)."""
    return bool(mask[first:].all()) and not mask[:first].any()


def token_row_hashes(
    ids: list[np.ndarray], first_target: np.ndarray, masks: list[np.ndarray] | None = None
) -> np.ndarray:
    out = np.empty(len(ids), dtype=np.uint64)
    for i, s in enumerate(ids):
        h = hashlib.blake2b(np.ascontiguousarray(s, dtype="<i4").tobytes(), digest_size=8)
        h.update(np.int64(first_target[i]).astype("<i8").tobytes())
        if masks is not None and not _is_one_run(masks[i], int(first_target[i])):
            h.update(np.packbits(masks[i]).tobytes())
        out[i] = int.from_bytes(h.digest(), "little")
    return out


PROMPT = "{prompt}"


def read_template(value: str | None) -> str | None:
    """A template or teacher prompt, or ``@path`` to read it from a file.

    With a ``{prompt}`` placeholder it must be a valid format string (literal braces written ``{{ }}``); without
    one it is literal text (a teacher-only system prompt; a student ``--prompt-template`` needs the placeholder,
    which :func:`load_text` checks)."""
    if value is None:
        return None
    if value.startswith("@"):
        p = Path(value[1:])
        try:
            value = p.read_text()
        except OSError as e:
            raise UsageError(f"cannot read template file {p}: {e.__class__.__name__}") from None
    if PROMPT in value:
        try:
            value.format(prompt="x")
        except (KeyError, IndexError, ValueError) as e:
            raise UsageError(
                f"template {value[:60]!r} is not a valid format string ({e}); write literal braces as {{{{ and }}}}"
            ) from None
    elif not value.strip():
        raise UsageError("empty --teacher-prompt or --prompt-template: give its text, or leave the option out")
    return value


def _check_prompt_template(value: str) -> str:
    if PROMPT not in value:
        raise UsageError(
            f"template {value[:60]!r} has no {{prompt}} placeholder; write where the row's prompt goes, "
            "e.g. 'You are a pirate.\\n\\n{prompt}'"
        )
    return read_template(value)


def read_chat_template(path: str | None) -> str | None:
    """The Jinja text of a ``--chat-template FILE`` (None: use the tokenizer's own)."""
    if path is None:
        return None
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(
            f"cannot read --chat-template {p}: {e.__class__.__name__}; give a Jinja chat template file"
        ) from None
    if "{{" not in text and "{%" not in text:
        raise UsageError(
            f"--chat-template {p} is not a Jinja template (no {{{{ ... }}}} or {{% ... %}}); give a "
            'file like a tokenizer_config.json\'s "chat_template" value'
        )
    return text


# -- reading rows: JSONL, Parquet, saved Hugging Face datasets ----------------------------------------------------

ARROW_HINT = "install the LM data extra: pip install 'kdcli[data-lm]'"
ROW_KEYS = (
    ("text", ("text",)),
    ("prompt", ("prompt", "response")),
    ("messages", ("messages",)),
    ("conversations", ("conversations",)),
    ("tokens", pretokenized.COLUMNS),
)
KIND_OF = {"text": "text", "prompt": "prompt", "messages": "chat", "conversations": "chat", "tokens": "tokens"}
KIND_NAMES = {"text": "text", "prompt": "prompt/response", "chat": "chat", "tokens": "pre-tokenized"}
NEEDS = '"text", "prompt" and "response", "messages" (chat), "conversations" (ShareGPT) or "input_ids" (pre-tokenized)'
BATCH_ROWS = 1024  # rows per Arrow record batch read


def _row_bounds(sl: slice | None, count) -> tuple[int, int]:
    """[start, stop) of ``sl`` over ``count()`` rows; ``count`` is only called when a bound is negative."""
    if sl is None:
        return 0, 1 << 62
    if (sl.start or 0) >= 0 and (sl.stop is None or sl.stop >= 0):
        return sl.start or 0, (1 << 62) if sl.stop is None else sl.stop
    start, stop, _ = sl.indices(count())
    return start, stop


def _utf8_lines(f, path: Path):
    """The lines of a file opened in binary mode, decoded as UTF-8; invalid bytes are one UsageError naming the
    line."""
    for lineno, raw in enumerate(f, 1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(
                f"{path} line {lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at column "
                f"{e.start + 1}); JSONL text must be UTF-8"
            ) from None


def read_jsonl(path: Path, sl: slice | None = None):
    """Yield ``(where, row)`` for the non-blank lines of a JSONL file (rows ``sl`` only), parsed lazily."""
    if not path.is_file():
        raise UsageError(f"data file not found: {path}")

    def count() -> int:
        with open(path, "rb") as f:
            return sum(1 for line in _utf8_lines(f, path) if line.strip())

    start, stop = _row_bounds(sl, count)
    i = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(_utf8_lines(f, path), 1):
            if not line.strip():
                continue
            if i >= stop:
                break
            i += 1
            if i <= start:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise UsageError(f"{path} line {lineno}: JSON nested too deeply to read") from None
            if not isinstance(obj, dict):
                raise UsageError(f"{path} line {lineno}: each line must be a JSON object with {NEEDS}")
            yield f"{path} line {lineno}", obj


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UsageError(
            "Parquet and Hugging Face dataset DATA are read with the pyarrow package, which is not installed",
            hint=ARROW_HINT,
        ) from None
    return pyarrow


def arrow_kind(base: Path) -> str | None:
    """``"parquet"`` (a .parquet file or a directory of them), ``"arrow"`` (a ``save_to_disk`` directory),
    ``"dataset_dict"`` (a ``DatasetDict.save_to_disk`` directory: one split must be chosen) or None."""
    if base.suffix == ".parquet":
        return "parquet"
    if not base.is_dir():
        return None
    if (base / "state.json").is_file() and (base / "dataset_info.json").is_file():
        return "arrow"
    if (base / "dataset_dict.json").is_file():
        return "dataset_dict"
    if any(p.suffix == ".parquet" and p.is_file() for p in base.iterdir()):
        return "parquet"
    return None


def _arrow_files(spec: str, base: Path, kind: str) -> list[Path]:
    if kind == "dataset_dict":
        try:
            splits = json.loads((base / "dataset_dict.json").read_text()).get("splits") or []
        except (OSError, ValueError, AttributeError):
            splits = []
        eg = f"{base / splits[0]}" if splits else f"{base}/train"
        raise UsageError(
            f"{spec} holds several splits ({', '.join(map(str, splits)) or '?'}); pass one of them as DATA, e.g. {eg}"
        )
    if kind == "parquet":
        if base.is_file():
            return [base]
        if not base.exists():
            raise UsageError(f"data file not found: {base}")
        return sorted(p for p in base.iterdir() if p.suffix == ".parquet" and p.is_file())
    try:
        state = json.loads((base / "state.json").read_text())
        names = [d["filename"] for d in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(
            f'{base}/state.json does not list the dataset\'s files ("_data_files"); re-save it with '
            "datasets.Dataset.save_to_disk"
        ) from None
    for name in names:  # confined to the dataset's own directory: a state.json never points kdcli elsewhere
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise UsageError(
                f"{base}/state.json lists the data file {name!r}; a saved dataset's files are plain file "
                "names inside its directory"
            )
    files = [base / name for name in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing or not files:
        raise UsageError(
            f"{spec}: Arrow file {missing[0] if missing else '(none listed)'} of the saved dataset is missing"
        )
    return files


def _is_str(pa, t) -> bool:
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t))
    )


def _pick_columns(pa, spec: str, where: str, schema, row_keys=ROW_KEYS) -> tuple[str, tuple[str, ...]]:
    """The row format (a ``row_keys`` name) and its columns for an Arrow schema; UsageError naming what was found."""
    names = list(schema.names)
    found = f"found columns {names}"
    for fmt, cols in row_keys:
        if not all(c in names for c in cols):
            continue
        if fmt == "tokens":  # pre-tokenized rows (kdcli/lm/pretokenized.py): input_ids [+ labels, attention_mask]
            cols = cols + tuple(c for c in pretokenized.OPTIONAL_COLUMNS if c in names)
            for c in cols:
                problem = pretokenized.arrow_column_problem(pa, c, schema.field(c).type)
                if problem:
                    raise UsageError(f"{where}: {problem}; {found}")
            return fmt, cols
        for c in cols:
            t = schema.field(c).type
            if fmt in ("text", "prompt"):
                ok = _is_str(pa, t)
                want = "strings"
            else:
                keys = ("role", "content") if fmt == "messages" else ("from", "value")
                item = t.value_type if (pa.types.is_list(t) or pa.types.is_large_list(t)) else None
                ok = (
                    item is not None
                    and pa.types.is_struct(item)
                    and all(item.get_field_index(k) >= 0 and _is_str(pa, item.field(k).type) for k in keys)
                )
                want = "lists of {" + ", ".join(keys) + "} records (strings)"
            if not ok:
                raise UsageError(f'{where}: column "{c}" holds {t}, not {want}; {found}')
        return fmt, cols
    raise UsageError(f"{where}: no usable columns: need {NEEDS}; {found}")


def read_arrow(spec: str, base: Path, kind: str, sl: slice | None, row_keys=ROW_KEYS):
    """Yield ``(where, row)`` for the rows ``sl`` of Parquet / saved-dataset DATA, one record batch at a time,
    reading only the columns of the row kind (the first of ``row_keys`` whose columns the files have)."""
    pa = _pyarrow()
    files = _arrow_files(spec, base, kind)
    if not files:
        raise UsageError(f"{spec}: no .parquet files in {base}")
    parquet = kind == "parquet"

    def open_file(f: Path):
        try:
            if parquet:
                return pa.parquet.ParquetFile(str(f))
            return pa.ipc.open_stream(pa.memory_map(str(f)))
        except (OSError, pa.ArrowException) as e:
            what = "a Parquet" if parquet else "an Arrow stream"
            raise UsageError(f"{f} is not {what} file ({str(e).splitlines()[0][:120] if str(e) else ''})") from None

    def schema_of(handle):
        return handle.schema_arrow if parquet else handle.schema

    def count() -> int:
        n = 0
        for f in files:
            h = open_file(f)
            n += h.metadata.num_rows if parquet else sum(b.num_rows for b in h)
        return n

    start, stop = _row_bounds(sl, count)
    many = len(files) > 1
    g = 0  # global index of the next row
    fmt = cols = None
    for f in files:
        if g >= stop:
            return
        h = open_file(f)
        file_fmt, file_cols = _pick_columns(pa, spec, str(f), schema_of(h), row_keys)
        if fmt is None:
            fmt, cols = file_fmt, file_cols
        elif (file_fmt, file_cols) != (fmt, cols):
            raise UsageError(f"{f} has {file_fmt} columns where the files before it have {fmt}; use one row kind")
        if parquet:
            md = h.metadata
            if g + md.num_rows <= start:  # the whole file is before the slice: not read
                g += md.num_rows
                continue
            groups, offset = [], g
            for r in range(md.num_row_groups):
                n_r = md.row_group(r).num_rows
                if offset + n_r > start and offset < stop:
                    groups.append(r)
                elif not groups:
                    g += n_r  # a row group before the slice
                offset += n_r
            batches = h.iter_batches(batch_size=BATCH_ROWS, row_groups=groups, columns=list(cols))
        else:
            batches = (b.select(list(cols)) for b in h)
        first_in_file = g
        for b in _checked_batches(pa, batches, f, parquet):
            n = b.num_rows
            lo, hi = max(start - g, 0), min(stop - g, n)
            if lo < hi:
                for k, row in enumerate(b.slice(lo, hi - lo).to_pylist()):
                    gi = g + lo + k
                    where = f"{base} row {gi}" + (f" ({f.name} row {gi - first_in_file})" if many else "")
                    yield where, row
            g += n
            if g >= stop:
                return


def _checked_batches(pa, batches, f: Path, parquet: bool):
    """Record batches of ``f``; a damaged file (a corrupt page, a truncated Arrow stream) is one UsageError naming
    it, not a pyarrow error from the middle of a read."""
    it = iter(batches)
    while True:
        try:
            b = next(it)
        except StopIteration:
            return
        except (OSError, ValueError, pa.ArrowException) as e:
            what = "Parquet" if parquet else "Arrow"
            first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:160]
            raise UsageError(f"{f}: the {what} file is damaged ({first}); re-write or re-download it") from None
        yield b


def iter_rows(spec: str, row_keys=ROW_KEYS):
    """``(where, row)`` for each row of a DATA spec (JSONL, Parquet, saved dataset; optionally ``[a:b]``).
    ``row_keys``: the column sets an Arrow file may be read with (``(format, columns)``, the first match wins;
    JSONL rows keep every key); ``cache-teacher --generate`` also reads a lone ``prompt`` column."""
    base, sl = split_slice(spec)
    path = Path(base)
    kind = arrow_kind(path)
    if kind is not None:
        return read_arrow(spec, path, kind, sl, row_keys)
    return read_jsonl(path, sl)


def _row_format(where: str, row: dict) -> str:
    """Which ROW_KEYS format a row is in (string fields checked; chat messages are checked by _chat_messages)."""
    for fmt, keys in ROW_KEYS:  # noqa: B007 - the match is used after the loop
        if all(k in row for k in keys):
            break
    else:
        raise UsageError(f"{where}: a row needs {NEEDS}; found keys {sorted(row)}")
    if fmt in ("text", "prompt"):
        for k in keys:
            if row[k] is None:
                raise UsageError(f'{where}: "{k}" is null; every row needs a string there')
            if not isinstance(row[k], str):
                raise UsageError(f'{where}: "{k}" must be a string, got {type(row[k]).__name__}')
    return fmt


ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _chat_messages(where: str, row: dict, fmt: str) -> list[dict]:
    """A chat row's turns as ``[{"role": ..., "content": ...}]`` (role in ROLES, content a string)."""
    turns = row[fmt]
    role_key, text_key = ("role", "content") if fmt == "messages" else ("from", "value")
    if not isinstance(turns, list) or not turns:
        raise UsageError(
            f'{where}: "{fmt}" must be a non-empty list of {{"{role_key}": ..., "{text_key}": '
            f"...}} turns, got {type(turns).__name__ if turns is not None else 'null'}"
        )
    out = []
    for j, m in enumerate(turns, 1):
        if not isinstance(m, dict):
            raise UsageError(
                f'{where}: turn {j} of "{fmt}" must be an object with "{role_key}" and '
                f'"{text_key}", got {type(m).__name__}'
            )
        role = m.get(role_key)
        if not isinstance(role, str):
            raise UsageError(
                f'{where}: turn {j} needs a string "{role_key}", got '
                f"{type(role).__name__ if role is not None else 'null'}"
            )
        if fmt == "messages":
            ok = role in ROLES
            known = ", ".join(ROLES)
        else:
            ok = role in SHAREGPT_ROLES
            role = SHAREGPT_ROLES.get(role)
            known = "system, human, gpt (or user, assistant)"
        if not ok:
            raise UsageError(f"{where}: turn {j} has unknown {role_key} {m.get(role_key)!r}; use one of {known}")
        content = m.get(text_key)
        if not isinstance(content, str):
            raise UsageError(
                f'{where}: turn {j} ({m.get(role_key)}) needs a string "{text_key}", got '
                f"{type(content).__name__ if content is not None else 'null'}"
            )
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise UsageError(
            f"{where}: no assistant turn; a chat row needs at least one "
            + ('{"role": "assistant"} message' if fmt == "messages" else '{"from": "gpt"} turn')
            + " (its tokens are what is predicted)"
        )
    return out


# -- chat rendering ----------------------------------------------------------------------------------------------


def _render(tok, messages: list[dict], template: str | None, gen: bool, where: str) -> str:
    """One conversation rendered as ``apply_chat_template(tokenize=False)`` renders it, within time, step and size
    limits (:mod:`kdcli.lm.chat_template`)."""
    from kdcli.lm.chat_template import render

    return render(tok, messages, template, gen, where)


def render_chat(
    tok, messages: list[dict], template: str | None, where: str = "chat row"
) -> tuple[list[int], np.ndarray]:
    """Token ids of a rendered conversation (as ``apply_chat_template`` tokenizes it) and a bool mask, True at
    every token of an assistant turn (its content and end-of-turn marker; not its header, not what follows)
    (:func:`render_chat_parts`)."""
    chat = render_chat_parts(tok, messages, template, where)
    return chat.ids, chat.mask


@dataclass
class RenderedChat:
    """A rendered conversation: its text, token ids and their character offsets, each assistant turn's character
    range ``[start, end)`` (with the message index) and the predicted-token mask."""

    text: str
    ids: list[int]
    offsets: np.ndarray  # (n, 2) character offsets
    turns: list[tuple[int, int, int]]  # (message index, start, end)
    mask: np.ndarray  # (n,) bool


def render_chat_parts(tok, messages: list[dict], template: str | None, where: str = "chat row") -> RenderedChat:
    """The rendered conversation and where its assistant turns are (:func:`render_chat`).

    For assistant turn ``j`` the conversation is rendered up to turn ``j - 1`` with the generation prompt (the
    turn starts where that ends) and up to turn ``j`` (it ends at the last non-whitespace character); a template
    that ignores ``add_generation_prompt`` has the turn start where its content does. Both renders must be
    prefixes of the whole conversation's. Characters map to tokens through the tokenizer's offsets: a token
    overlapping a turn is predicted."""
    full = _render(tok, messages, template, False, where)
    spans = []
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = _render(tok, messages[: j + 1], template, False, where)
        plain = _render(tok, messages[:j], template, False, where) if j else ""
        gen = _render(tok, messages[:j], template, True, where) if j else plain
        if gen != plain and upto.startswith(gen):
            start = len(gen)
        else:  # turn 0, or a template without a generation prompt: the turn starts at its content
            body = m["content"].strip()
            start = upto.find(body, len(plain)) if body and upto.startswith(plain) else -1
            if start < 0:
                raise UsageError(
                    f"{where}: cannot find where assistant turn {j + 1} starts in the rendered chat "
                    "(the chat template neither writes a generation prompt before it nor its content "
                    "as given); use --chat-template with a template that does"
                )
        end = len(upto.rstrip())
        if not full.startswith(upto[:end]):
            raise UsageError(
                f"{where}: the chat template renders assistant turn {j + 1} differently once later "
                "turns follow, so its tokens cannot be located; use --chat-template with a template "
                "that renders each turn the same way"
            )
        if end > start:
            spans.append((j, start, end))
    try:
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise UsageError(
            "chat rows need a fast tokenizer (one with a tokenizer.json) to locate the assistant tokens"
        ) from None
    ids = list(enc["input_ids"])
    offs = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), dtype=bool)
    for _, a, b in spans:
        mask |= (offs[:, 0] < b) & (offs[:, 1] > a)
    if len(mask):
        mask[0] = False  # nothing predicts the first token
    return RenderedChat(full, ids, offs, spans, mask)


def _require_chat_template(tok, settings: TextSettings) -> None:
    from kdcli.lm.chat_template import tokenizer_template

    if settings.chat_template is None and not tokenizer_template(tok):
        name = getattr(tok, "name_or_path", "") or "the tokenizer"
        raise UsageError(
            f"chat rows need a chat template, and {name} has none; pass --chat-template FILE (a Jinja chat template)"
        )


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# -- building sequences ------------------------------------------------------------------------------------------


def load_text(
    spec: str,
    tok,
    settings: TextSettings,
    *,
    vocab_size: int | None = None,
    target_masks: bool = False,
    spans: bool = False,
) -> TokenData:
    """Read a DATA spec (optionally sliced by row, before packing) and tokenize it.

    ``target_masks``: the caller handles :attr:`TokenData.target_mask` (multi-turn chat rows, whose predicted
    tokens are several runs); without it such a row is refused with a clear error. ``spans``: also record where
    each token sits in its segment of the text (:attr:`TokenData.spans`, :mod:`kdcli.lm.align`; the same ids: one
    tokenizer call gives both); needs a fast tokenizer (UsageError otherwise). Pre-tokenized rows have no text:
    their :attr:`TokenData.spans` stay None whatever ``spans`` says."""
    L = settings.max_length
    if L < 2:
        raise UsageError("--max-length must be >= 2: a sequence needs a token to predict from")
    rows = iter_rows(spec)
    first_row = next(rows, None)
    if first_row is None:
        raise UsageError(f"{spec}: no rows")
    kind = KIND_OF[_row_format(*first_row)]
    spans = spans and kind != "tokens"  # token ids without their text: nothing to place them in

    def same_kind():
        for where, row in itertools.chain([first_row], rows):
            fmt = _row_format(where, row)
            if KIND_OF[fmt] != kind:
                raise UsageError(
                    f"{spec} mixes {KIND_NAMES[kind]} rows and {KIND_NAMES[KIND_OF[fmt]]} rows "
                    f"({where}); use one kind per file"
                )
            yield where, row, fmt

    out = {"prompts": None, "response_start": None, "target_mask": None, "chats": None}
    notes: list[str] = []
    eos = tok.eos_token_id
    vocab = None
    if spans:
        try:
            vocab = vocab_strings(tok, vocab_size)
        except UsageError as e:  # a vocabulary kdcli cannot spell: no spans (no bits per byte, no other tokenizer)
            if not getattr(tok, "is_fast", False):
                raise  # no offsets at all: the caller asked for spans it cannot have
            notes.append(f"no token spans: {e}")
            spans = False
    segments = Segments(kind) if spans else None
    seq_spans: list[SegmentSpans] = []
    if kind == "text":
        docs, doc_spans = [], []
        for _, r, _ in same_kind():
            if spans:
                d, sp = text_segment(tok, vocab, r["text"], segments.add(r["text"]), eos)
                doc_spans.append(sp)
            else:
                d = _encode(tok, r["text"]) + ([eos] if eos is not None else [])
            docs.append(d)
        if settings.pack:
            flat = np.fromiter((t for d in docs for t in d), dtype=np.int32)
            cuts = [(a, a + L) for a in range(0, len(flat), L) if len(flat[a : a + L]) >= 2]
            ids = [flat[a:b] for a, b in cuts]
            if spans:
                flat_spans = SegmentSpans.concat(doc_spans)
                seq_spans = [flat_spans[a:b] for a, b in cuts]
        else:
            cut = sum(len(d) > L for d in docs)
            if cut:
                notes.append(f"{cut} of {len(docs)} rows were truncated to --max-length {L}")
            ids = [np.asarray(d[:L], dtype=np.int32) for d in docs]
            seq_spans = [sp[:L] for sp in doc_spans]
        first = np.ones(len(ids), dtype=np.int64)
    elif kind == "prompt":
        template = _check_prompt_template(settings.prompt_template)
        ids, first_l, starts, prompts = [], [], [], []
        cut_resp = cut_prompt = 0
        for _, r, _ in same_kind():
            text = template.format(prompt=r["prompt"])
            if spans:
                p, p_sp = text_segment(tok, vocab, text, segments.add(text), None)
                resp, r_sp = text_segment(tok, vocab, r["response"], segments.add(r["response"]), eos)
            else:
                p = _encode(tok, text)
                resp = _encode(tok, r["response"]) + ([eos] if eos is not None else [])
            if len(p) > L - 1:
                p = p[len(p) - (L - 1) :]
                p_sp = p_sp[len(p_sp) - (L - 1) :] if spans else None
                cut_prompt += 1
            if len(p) + len(resp) > L:
                resp = resp[: L - len(p)]
                r_sp = r_sp[: L - len(p)] if spans else None
                cut_resp += 1
            if spans:
                seq_spans.append(SegmentSpans.concat([p_sp, r_sp]))
            ids.append(np.asarray(p + resp, dtype=np.int32))
            starts.append(len(p))
            first_l.append(1 if settings.prompt_loss else max(len(p), 1))
            prompts.append(r["prompt"])
        if cut_resp:
            notes.append(f"{cut_resp} of {len(ids)} responses were cut at --max-length {L}")
        if cut_prompt:
            notes.append(f"{cut_prompt} of {len(ids)} prompts were longer than --max-length {L} and lost their start")
        first = np.asarray(first_l, dtype=np.int64)
        out["prompts"], out["response_start"] = prompts, np.asarray(starts, dtype=np.int64)
    elif kind == "tokens":  # used as they are: prompt and chat templates shape text rows only
        seqs = pretokenized.read_sequences(((w, r) for w, r, _ in same_kind()), L, settings.prompt_loss)
        ids, first, notes = seqs.ids, seqs.first_target, notes + seqs.notes
        if ids and not seqs.one_run:
            if not target_masks:
                raise UsageError(
                    f"{spec}: pre-tokenized rows whose labels mark several runs of predicted tokens are not handled "
                    "by this command yet"
                )
            out["target_mask"] = seqs.masks
    else:
        if settings.prompt_template != PROMPT:
            raise UsageError(
                "--prompt-template is for prompt/response rows; chat rows are rendered with the chat "
                "template (--chat-template FILE to replace the tokenizer's)"
            )
        _require_chat_template(tok, settings)
        ids, first_l, masks, chats = [], [], [], []
        n_rows = cut = skipped = 0
        multi = False
        for where, r, fmt in same_kind():
            n_rows += 1
            msgs = _chat_messages(where, r, fmt)
            chat = render_chat_parts(tok, msgs, settings.chat_template, where)
            seq, mask = chat.ids, chat.mask
            if spans:  # every assistant turn is a segment (numbered even where the row is skipped below)
                segs = {j: segments.add(m["content"].strip()) for j, m in enumerate(msgs) if m["role"] == "assistant"}
                turns = [(segs[j], a, b, msgs[j]["content"]) for j, a, b in chat.turns]
                row_spans = chat_segments(chat.text, seq, chat.offsets, turns, vocab)
            hits = np.flatnonzero(mask)
            if not len(hits):
                raise UsageError(f"{where}: the chat template renders no token for the assistant turns")
            end = int(hits[-1]) + 1  # tokens after the last predicted one are never predicted: dropped
            was_cut = end > L
            end = min(end, L)
            seq, mask = np.asarray(seq[:end], dtype=np.int32), mask[:end]
            if settings.prompt_loss:
                mask = np.arange(end) >= 1
            if not mask.any():
                skipped += 1
                continue
            cut += was_cut
            f = int(np.argmax(mask))
            if not _is_one_run(mask, f):
                if not target_masks:
                    raise UsageError(
                        f"{where}: {sum(m['role'] == 'assistant' for m in msgs)} assistant turns with "
                        "other turns between them are several runs of predicted tokens, which this "
                        "command does not handle yet; give each assistant turn its own row"
                    )
                multi = True
            ids.append(seq)
            first_l.append(f)
            masks.append(mask)
            chats.append(msgs)
            if spans:
                seq_spans.append(row_spans[:end])
        if cut:
            notes.append(
                f"{cut} of {n_rows} chat rows were cut at --max-length {L} (chat rows are not packed: "
                "each is one sequence)"
            )
        if skipped:
            notes.append(
                f"{skipped} of {n_rows} chat rows had no assistant token within --max-length {L} and were skipped"
            )
        first = np.asarray(first_l, dtype=np.int64)
        out["chats"] = chats
        out["target_mask"] = masks if multi else None
    if not ids:
        raise UsageError(f"{spec}: no sequence with at least 2 tokens")
    width = vocab_size or len(tok)
    top = max(int(s.max()) for s in ids if len(s))
    if top >= width:
        raise UsageError(f"{spec}: token id {top} is out of range for a vocabulary of {width}")
    return TokenData(
        spec=spec,
        kind=kind,
        ids=ids,
        first_target=first,
        row_hash=token_row_hashes(ids, first, out["target_mask"]),
        settings=settings,
        vocab_size=width,
        notes=notes,
        spans=seq_spans if spans else None,
        segments=segments.identity() if spans else None,
        vocab=vocab,
        **out,
    )


# -- the teacher's view ------------------------------------------------------------------------------------------


@dataclass
class TeacherView:
    """The teacher's sequences: ``seqs[i]`` predicts the same tokens as the student's sequence ``i``, at its own
    positions ``[first_target[i], len)`` or, where ``target_mask`` is set, at ``target_mask[i]``."""

    seqs: list[np.ndarray]
    first_target: np.ndarray
    target_mask: list[np.ndarray] | None = None

    def masks(self, rows) -> list[np.ndarray] | None:
        return None if self.target_mask is None else [self.target_mask[i] for i in rows]


def _with_system_prompt(messages: list[dict], text: str) -> list[dict]:
    if messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{text}\n\n{messages[0]['content']}"}] + messages[1:]
    return [{"role": "system", "content": text}] + messages


def teacher_view(data: TokenData, tok, teacher_prompt: str | None) -> TeacherView:
    """What the teacher reads. Without a teacher prompt: the student's sequences.

    With one (see the module docstring): ``{prompt}`` templates for prompt/response rows; placeholder-free text for
    prompt/response rows (``text + "\\n\\n" + <the student's prompt>``, trailing whitespace of ``text`` dropped)
    and for chat rows (a system message before the row's own, the two joined into one). Each teacher sequence is
    cut after its predicted tokens, which must equal the student's (checked; an error names the row otherwise)."""
    if teacher_prompt is None:
        return TeacherView(data.ids, data.first_target, data.target_mask)
    if data.kind in ("text", "tokens"):
        raise UsageError(
            '--teacher-prompt needs prompt/response rows ({"prompt": ..., "response": ...}) or '
            "chat rows: the teacher's extra context goes before each prompt"
        )
    if data.settings.prompt_loss:
        raise UsageError(
            "--teacher-prompt cannot be combined with --prompt-loss: the teacher's prompt tokens differ "
            "from the student's, so only response positions line up"
        )
    template = read_template(teacher_prompt)
    if data.kind == "prompt":
        student = data.settings.prompt_template
        seqs, firsts = [], []
        for i, s in enumerate(data.ids):
            context = (
                template.format(prompt=data.prompts[i])
                if PROMPT in template
                else template.rstrip() + "\n\n" + student.format(prompt=data.prompts[i])
            )
            prefix = _encode(tok, context)
            resp = s[data.response_start[i] :]
            if len(prefix) == 0:
                raise UsageError(f"--teacher-prompt gives row {i} an empty context")
            seqs.append(np.concatenate([np.asarray(prefix, dtype=np.int32), resp]).astype(np.int32))
            firsts.append(len(prefix))
            assert np.array_equal(seqs[-1][len(prefix) :], s[data.first_target[i] :])
        return TeacherView(seqs, np.asarray(firsts, dtype=np.int64))
    if PROMPT in template:
        raise UsageError(
            "for chat rows --teacher-prompt is a system message only the teacher sees: drop the {prompt} placeholder"
        )
    text = template.rstrip()
    seqs, firsts, masks = [], [], []
    multi = False
    for i, s in enumerate(data.ids):
        want = s[data.target_mask[i]] if data.target_mask is not None else s[data.first_target[i] :]
        t_ids, t_mask = render_chat(
            tok,
            _with_system_prompt(data.chats[i], text),
            data.settings.chat_template,
            f"chat row {i} with --teacher-prompt",
        )
        t_ids = np.asarray(t_ids, dtype=np.int32)
        hits = np.flatnonzero(t_mask)
        if len(hits) < len(want) or not np.array_equal(t_ids[hits[: len(want)]], want):
            raise UsageError(
                f"sequence {i}: with --teacher-prompt the chat template renders the assistant turns as "
                "other tokens than without it, so the teacher's positions cannot line up with the "
                "student's; use a --chat-template that renders turns independently of the system "
                "message"
            )
        end = int(hits[len(want) - 1]) + 1
        t_ids, t_mask = t_ids[:end], t_mask[:end]
        f = int(hits[0])
        multi |= not _is_one_run(t_mask, f)
        seqs.append(t_ids)
        firsts.append(f)
        masks.append(t_mask)
    if multi and data.target_mask is None:
        raise UsageError(
            "with --teacher-prompt the teacher's predicted tokens form several runs where the "
            "student's form one; this command cannot line them up"
        )
    return TeacherView(seqs, np.asarray(firsts, dtype=np.int64), masks if data.target_mask is not None else None)


def teacher_sequences(data: TokenData, tok, teacher_prompt: str | None) -> tuple[list[np.ndarray], np.ndarray]:
    """``(seqs, first_target)`` of :func:`teacher_view`, for callers that predict one run per sequence."""
    view = teacher_view(data, tok, teacher_prompt)
    if view.target_mask is not None:
        raise ValueError("multi-run (multi-turn chat) data: use teacher_view() and pass its masks to loss_positions")
    return view.seqs, view.first_target


def pad_batch(seqs: list[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest: (b, L) int64 ids and (b, L) int64 attention mask."""
    L = max(len(s) for s in seqs)
    ids = np.full((len(seqs), L), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), L), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def loss_positions(
    seqs: list[np.ndarray], first_target: np.ndarray, width: int, masks: list[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices into (b * width) of the logits that predict tokens, and the tokens they predict.

    Sequence ``i`` predicts tokens ``[first_target[i], len)``: its logits at positions ``first_target[i] - 1``
    to ``len - 2``; or, with ``masks`` (:attr:`TokenData.target_mask`, :attr:`TeacherView.target_mask`), the
    tokens ``t`` where ``masks[i][t]`` is True, from the logits at ``t - 1``. Padding is never a loss position.
    """
    idx, tgt = [], []
    for i, s in enumerate(seqs):
        if masks is not None:
            t = np.flatnonzero(masks[i][: len(s)]).astype(np.int64)
            t = t[t >= 1]
        else:
            t = np.arange(max(int(first_target[i]), 1), len(s), dtype=np.int64)
        if len(t):
            idx.append(i * width + t - 1)
            tgt.append(s[t].astype(np.int64))
    if not idx:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(idx), np.concatenate(tgt)


def target_counts(
    seqs: list[np.ndarray], first_target: np.ndarray, masks: list[np.ndarray] | None = None
) -> np.ndarray:
    """(b,) predicted tokens per sequence, as :func:`loss_positions` counts them (= cached positions per row)."""
    if masks is not None:
        return np.array([int(m[1 : len(s)].sum()) for s, m in zip(seqs, masks)], dtype=np.int64)
    return np.array([max(len(s) - max(int(a), 1), 0) for s, a in zip(seqs, first_target)], dtype=np.int64)
