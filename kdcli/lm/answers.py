"""Prompt rows -> the teacher's answers: the answers dataset and the cache over exactly the answer tokens.

**Prompt rows** (:func:`load_prompts`; JSONL, Parquet or a saved dataset, ``DATA[a:b]``, read with
:func:`kdcli.lm.text.iter_rows`): ``{"prompt": ...}`` (a ``"response"`` beside it is ignored: the teacher writes
the answer) or chat rows (``messages`` / ShareGPT ``conversations``) whose last turn is the user's. A row without
a prompt, an empty prompt, a text row, a last turn that is not the user's: UsageError, one line.

**The answers' row kind** (``answer_kind``): ``"chat"`` -- a ``messages`` row, the prompt as the student sees it
plus ``{"role": "assistant", "content": <answer>}``, rendered with the chat template (``chat_template`` or the
tokenizer's) -- for chat rows, and for prompt rows when there is a chat template (``"auto"``, the default: the
prompt becomes the user turn); ``"prompt"`` -- a ``{"prompt", "response"}`` row, kdcli's prompt/response kind
(``prompt_template``, the response tokenized on its own + EOS) -- for prompt rows without a chat template (or when
asked). Either way the answers file is ordinary kdcli LM data.

**What each side reads.** The teacher reads the student's rendering with the teacher-only context added exactly
as :func:`kdcli.lm.text.teacher_view` adds it (chat: a system message before the row's own, joined into one;
prompt rows: the ``{prompt}`` template, or the text, a blank line and the prompt) and the generation prompt
(``add_generation_prompt=True``). The student's answers row never holds the teacher prompt.

**Why the cache lines up, and what happens when it would not.** The distribution captured at generation step t is
the teacher's over (context + the first t answer tokens); the student's row, as :func:`kdcli.lm.text.load_text`
reads the answers file, predicts its assistant tokens. For each answer row :meth:`TeacherAnswers.batch` builds
the student's sequence exactly as ``load_text`` will and the teacher's exactly as ``teacher_view`` will (today's
``cache-teacher`` path on the answers file), and calls the row *aligned* when the teacher's sequence is the
generation context followed by the generated tokens and the end-of-turn token. Then the captured distributions
are that path's, position for position. Decoded text does not always re-tokenize to the ids that were generated
(a non-canonical BPE split such as ``th`` + ``e`` for ``the``, a byte sequence cut inside a character, a token
merging with the generation prompt, an earlier assistant turn in the prompt that the student also predicts):
such a row is **rescored** -- one forward pass over its teacher sequence, for those rows only, reduced by the
same function -- so every row of the cache equals the scoring pass over the answers file. The answer text is kept
as generated; :attr:`AnswerBatch.rescored` marks those rows (count and report them).

**The budget.** A row's answer may take ``min(max_new_tokens, max_length - prompt tokens - 1, teacher positions
- context - 1)`` tokens: the student's whole sequence (prompt, answer, end-of-turn) fits ``--max-length``, so
``load_text`` never cuts it. Past the budget the end-of-turn is forced (``finish_reason: "length"``).

**Row identity and seeds.** Prompt row i has a 64-bit content hash (BLAKE2b over the teacher's context ids and
the student's prompt ids): the key of its sampled answers' random streams (:func:`kdcli.lm.generate.step_uniforms`
with the generation index), so an answer depends on the row's content, the seed and the index only. Answer row
``a`` is generation ``a % N`` of prompt row ``a // N`` (N = ``generations_per_prompt``), and its hash is the one
``load_text`` gives the answers row (:func:`kdcli.lm.text.token_row_hashes`), so a cache built here is checked
against the answers file like any token cache.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kdcli.data import fingerprint
from kdcli.infra.atomic import atomic_write_bytes
from kdcli.infra.errors import UsageError
from kdcli.lm.chat_template import render, tokenizer_template
from kdcli.lm.generate import Generated, GenerationSettings, StepReducer, generate_with_capture, step_uniforms
from kdcli.lm.hf import input_device, lm_logits
from kdcli.lm.text import (
    PROMPT,
    ROLES,
    SHAREGPT_ROLES,
    TeacherView,
    TextSettings,
    TokenData,
    iter_rows,
    loss_positions,
    pad_batch,
    read_template,
    render_chat,
    teacher_view,
    token_row_hashes,
)

ANSWER_KINDS = ("auto", "chat", "prompt")
PROMPT_ROW_KEYS = (
    ("prompt", ("prompt", "response")),  # a response column is read (to say it is ignored), not needed
    ("prompt", ("prompt",)),
    ("messages", ("messages",)),
    ("conversations", ("conversations",)),
    ("text", ("text",)),  # read only to be refused with a message naming it
)
"""The Arrow column sets prompt rows are read with (:func:`kdcli.lm.text.iter_rows`): a lone ``prompt`` column is
enough here."""
Reduce = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
"""``reduce(logits (n, V) fp32, targets (n,) long) -> {name: (n, ...)}``: what the cache keeps of n positions."""


# -- prompt rows ---------------------------------------------------------------------------------------------------


@dataclass
class Prompts:
    """Prompt rows as the student and the teacher read them, before any answer."""

    spec: str
    kind: str  # the answers' row kind: "chat" or "prompt"
    student: list  # per row: the student's messages (chat) or prompt string (prompt)
    student_ids: list[np.ndarray]  # per row: the student's prompt tokens (int32), generation prompt included
    contexts: list[np.ndarray]  # per row: the teacher's context tokens (int32), generation prompt included
    row_hash: np.ndarray  # (n,) uint64: content hash (BLAKE2b-64 of contexts and student_ids)
    settings: TextSettings
    teacher_prompt: str | None
    closer: int  # the end-of-turn token the student's answer rows end with
    notes: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.contexts)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.row_hash)

    def identity(self) -> dict:
        """The prompts' part of a generated cache's identity (the answers' own is the answers file's TokenData)."""
        return {
            "spec": self.spec,
            "kind": self.kind,
            "num_prompts": self.n,
            "fingerprint": self.fingerprint,
            "num_context_tokens": int(sum(len(c) for c in self.contexts)),
        }


def _prompt_of(where: str, row: dict) -> tuple[str, object]:
    """("chat", messages) or ("prompt", text) for one DATA row; UsageError naming the row otherwise."""
    for fmt, role_key, text_key in (("messages", "role", "content"), ("conversations", "from", "value")):
        if fmt not in row:
            continue
        turns = row[fmt]
        if not isinstance(turns, list) or not turns:
            raise UsageError(f'{where}: "{fmt}" must be a non-empty list of turns ending with the user\'s')
        msgs = []
        for j, m in enumerate(turns, 1):
            raw = m.get(role_key) if isinstance(m, dict) else None
            if fmt == "messages":
                role = raw if raw in ROLES else None
            else:
                role = SHAREGPT_ROLES.get(raw) if isinstance(raw, str) else None
            content = m.get(text_key) if isinstance(m, dict) else None
            if role is None or not isinstance(content, str):
                raise UsageError(f'{where}: turn {j} of "{fmt}" needs a known "{role_key}" and a string "{text_key}"')
            msgs.append({"role": role, "content": content})
        if msgs[-1]["role"] != "user":
            raise UsageError(
                f"{where}: the last turn is the {msgs[-1]['role']}'s; --generate answers a conversation "
                "whose last turn is the user's (drop the trailing turn)"
            )
        if not msgs[-1]["content"].strip():
            raise UsageError(f"{where}: the last user turn is empty; give the teacher something to answer")
        return "chat", msgs
    if "prompt" in row:
        p = row["prompt"]
        if not isinstance(p, str):
            raise UsageError(f'{where}: "prompt" must be a string, got {type(p).__name__ if p is not None else "null"}')
        if not p.strip():
            raise UsageError(f"{where}: empty prompt; give the teacher something to answer")
        return "prompt", p
    found = "a text row" if "text" in row else f"keys {sorted(row)}"
    raise UsageError(
        f'{where}: --generate needs prompt rows ({{"prompt": ...}}) or chat rows whose last turn is '
        f"the user's; found {found}"
    )


def encode(tok, text: str) -> np.ndarray:
    """Token ids of ``text`` as kdcli tokenizes rendered text (no special tokens added), int32."""
    return np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int32)


def with_system_prompt(messages: list[dict], text: str) -> list[dict]:
    """The teacher's messages: ``text`` as a system message before the row's own, the two joined into one
    (as :func:`kdcli.lm.text.teacher_view` does; checked against it on every answer row)."""
    if messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{text}\n\n{messages[0]['content']}"}] + messages[1:]
    return [{"role": "system", "content": text}] + messages


def chat_closer(tok, template: str | None) -> int:
    """The one token a chat template closes an assistant turn with (e.g. SmolLM2's ``<|im_end|>``): what the
    student's row predicts after the answer's tokens. Found by rendering an empty assistant turn: its predicted
    tokens (:func:`kdcli.lm.text.render_chat`) are exactly the closing ones."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    ids, mask = render_chat(tok, probe, template, "the chat template's end of an assistant turn")
    closing = [int(t) for t in np.asarray(ids)[mask]]
    if len(closing) != 1:
        raise UsageError(
            f"the chat template closes an assistant turn with {len(closing)} tokens "
            f"({tok.convert_ids_to_tokens(closing)!r}); --generate needs a template that ends a turn "
            "with one end-of-turn token (pass --chat-template FILE)"
        )
    return closing[0]


def load_prompts(
    spec: str, tok, settings: TextSettings, teacher_prompt: str | None = None, *, answer_kind: str = "auto"
) -> Prompts:
    """Read prompt rows (module docstring) and render what the student and the teacher read before answering."""
    if answer_kind not in ANSWER_KINDS:
        raise ValueError(f"answer_kind must be one of {ANSWER_KINDS}")
    if settings.prompt_loss:
        raise UsageError(
            "--prompt-loss predicts the prompt's tokens, which generation does not score; drop it with --generate"
        )
    teacher_prompt = read_template(teacher_prompt)
    rows, with_response = [], 0
    for where, row in iter_rows(spec, PROMPT_ROW_KEYS):
        rows.append((where, *_prompt_of(where, row)))
        with_response += rows[-1][1] == "prompt" and "response" in row
    if not rows:
        raise UsageError(f"{spec}: no rows")
    kinds = {k for _, k, _ in rows}
    if len(kinds) > 1:
        where = next(w for w, k, _ in rows if k != rows[0][1])
        raise UsageError(f"{spec} mixes prompt rows and chat rows ({where}); use one kind per file")
    row_kind = rows[0][1]
    has_template = settings.chat_template is not None or tokenizer_template(tok) is not None
    kind = answer_kind if answer_kind != "auto" else ("chat" if row_kind == "chat" or has_template else "prompt")
    if row_kind == "chat" and kind != "chat":
        raise UsageError("chat rows are answered as chat rows; drop the prompt/response answer format")
    if kind == "chat" and not has_template:
        name = getattr(tok, "name_or_path", "") or "the tokenizer"
        raise UsageError(f"chat answers need a chat template, and {name} has none; pass --chat-template FILE")
    notes = []
    if with_response:
        notes.append(f'{with_response} rows carry a "response"; it is ignored (the teacher writes the answers)')
    student, s_ids, ctx = [], [], []
    if kind == "chat":
        if settings.prompt_template != PROMPT:
            raise UsageError(
                "--prompt-template is for prompt/response answers; chat answers are rendered with the chat template"
            )
        if teacher_prompt is not None and PROMPT in teacher_prompt:
            raise UsageError(
                "for chat answers --teacher-prompt is a system message only the teacher sees: drop the "
                "{prompt} placeholder"
            )
        closer = chat_closer(tok, settings.chat_template)
        for where, _, p in rows:
            msgs = p if row_kind == "chat" else [{"role": "user", "content": p}]
            t_msgs = with_system_prompt(msgs, teacher_prompt.rstrip()) if teacher_prompt is not None else msgs
            student.append(msgs)
            s_ids.append(encode(tok, render(tok, msgs, settings.chat_template, True, where)))
            ctx.append(encode(tok, render(tok, t_msgs, settings.chat_template, True, where)))
    else:
        if tok.eos_token_id is None:
            raise UsageError(
                "prompt/response answers end with the tokenizer's EOS token, and it has none; use a "
                "tokenizer with an eos_token or a chat template"
            )
        closer = int(tok.eos_token_id)
        template = settings.prompt_template
        if PROMPT not in template:
            raise UsageError(f"template {template[:60]!r} has no {{prompt}} placeholder")
        for _, _, p in rows:
            student.append(p)
            s_ids.append(encode(tok, template.format(prompt=p)))
            if teacher_prompt is None:
                context = template.format(prompt=p)
            elif PROMPT in teacher_prompt:
                context = teacher_prompt.format(prompt=p)
            else:
                context = teacher_prompt.rstrip() + "\n\n" + template.format(prompt=p)
            ctx.append(encode(tok, context))
    for i, c in enumerate(ctx):
        if len(c) == 0:
            raise UsageError(f"{rows[i][0]}: the teacher's context renders to no token")
    hashes = np.empty(len(ctx), dtype=np.uint64)
    for i, (c, s) in enumerate(zip(ctx, s_ids)):
        h = hashlib.blake2b(np.ascontiguousarray(c, dtype="<i4").tobytes(), digest_size=8)
        h.update(np.int64(len(c)).astype("<i8").tobytes())
        h.update(np.ascontiguousarray(s, dtype="<i4").tobytes())
        hashes[i] = int.from_bytes(h.digest(), "little")
    return Prompts(
        spec=spec,
        kind=kind,
        student=student,
        student_ids=s_ids,
        contexts=ctx,
        row_hash=hashes,
        settings=settings,
        teacher_prompt=teacher_prompt,
        closer=closer,
        notes=notes,
    )


# -- the student's answer rows, as load_text reads them --------------------------------------------------------------


def answer_record(
    prompts: Prompts, prompt_row: int, index: int, text: str, finish: str, n_tokens: int, gen: GenerationSettings
) -> dict:
    """One row of the answers file: the prompt as the student sees it, the teacher's answer, how it was made."""
    meta = {
        "prompt_row": int(prompt_row),
        "index": int(index),
        "finish_reason": finish,
        "answer_tokens": int(n_tokens),
        "max_new_tokens": gen.max_new_tokens,
        "sample": gen.sample,
        "gen_temperature": gen.temperature if gen.sample else None,
        "top_p": gen.top_p if gen.sample else None,
        "seed": gen.seed if gen.sample else None,
    }
    if prompts.kind == "chat":
        return {"messages": prompts.student[prompt_row] + [{"role": "assistant", "content": text}], "generation": meta}
    return {"prompt": prompts.student[prompt_row], "response": text, "generation": meta}


def student_data(prompts: Prompts, tok, records: list[dict], vocab_size: int, where: str = "answer row") -> TokenData:
    """The student's sequences of answer rows ``records``, built as :func:`kdcli.lm.text.load_text` builds them
    from the answers file (same rendering, same cuts, same row hashes; a test checks it on the written file)."""
    s = prompts.settings
    L = s.max_length
    ids, firsts, masks, chats, plist, starts = [], [], [], [], [], []
    multi = False
    for k, rec in enumerate(records):
        if prompts.kind == "chat":
            seq, mask = render_chat(tok, rec["messages"], s.chat_template, f"{where} {k}")
            hits = np.flatnonzero(mask)
            if not len(hits):
                raise UsageError(f"{where} {k}: the chat template renders no token for the answer")
            end = min(int(hits[-1]) + 1, L)
            seq, mask = np.asarray(seq[:end], dtype=np.int32), mask[:end]
            if not mask.any():
                raise UsageError(f"{where} {k}: no answer token fits --max-length {L}")
            f = int(np.argmax(mask))
            multi |= not (bool(mask[f:].all()) and not mask[:f].any())
            ids.append(seq)
            firsts.append(f)
            masks.append(mask)
            chats.append(rec["messages"])
        else:
            p = list(encode(tok, s.prompt_template.format(prompt=rec["prompt"])))
            resp = list(encode(tok, rec["response"])) + [int(tok.eos_token_id)]
            if len(p) > L - 1:
                p = p[len(p) - (L - 1) :]
            if len(p) + len(resp) > L:
                resp = resp[: L - len(p)]
            ids.append(np.asarray(p + resp, dtype=np.int32))
            firsts.append(max(len(p), 1))
            starts.append(len(p))
            plist.append(rec["prompt"])
    first = np.asarray(firsts, dtype=np.int64)
    tmask = masks if multi else None
    return TokenData(
        spec="",
        kind=prompts.kind,
        ids=ids,
        first_target=first,
        row_hash=token_row_hashes(ids, first, tmask),
        settings=s,
        vocab_size=vocab_size,
        prompts=plist if prompts.kind == "prompt" else None,
        response_start=np.asarray(starts, dtype=np.int64) if prompts.kind == "prompt" else None,
        target_mask=tmask,
        chats=chats if prompts.kind == "chat" else None,
    )


# -- one batch of answer rows --------------------------------------------------------------------------------------


@dataclass
class AnswerBatch:
    """Answer rows ``[start, stop)``: what the answers file and the cache get."""

    rows: np.ndarray  # (b,) answer row indices
    records: list[dict]  # the answers file's rows
    data: TokenData  # the student's sequences of these rows (as load_text reads the answers file)
    view: TeacherView  # the teacher's (as teacher_view builds them: today's cache-teacher path)
    reduced: dict[str, torch.Tensor]  # reduce's output over data's predicted positions, row-major
    rescored: np.ndarray  # (b,) bool: the row was scored by a forward pass (not aligned with generation)
    generated: Generated

    @property
    def lengths(self) -> np.ndarray:
        """(b,) cached positions per row (= the student's predicted tokens)."""
        return self.data.num_targets


def score_rows(
    model,
    seqs: list[np.ndarray],
    firsts: np.ndarray,
    masks: list[np.ndarray] | None,
    reduce: Reduce,
    device: torch.device,
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """One forward pass over teacher sequences, ``reduce`` on their predicted positions (row-major): the plain
    scoring path (what ``cache-teacher`` computes over a data file), used for rows generation cannot serve."""
    ids, mask = pad_batch(seqs, pad_id)  # (b, L) right-padded
    idx, tgt = loss_positions(seqs, firsts, ids.shape[1], masks)
    at = input_device(model, device)
    logits = lm_logits(model, torch.from_numpy(ids).to(at), torch.from_numpy(mask).to(at))  # (b, L, V)
    sel = logits.reshape(-1, logits.shape[-1])[torch.from_numpy(idx).to(logits.device)].to(device).float()
    return reduce(sel, torch.from_numpy(tgt).to(device))


def interleave(
    lengths: np.ndarray, from_a: np.ndarray, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Row-major positions of rows taken from ``a`` (rows where ``from_a``, in order) and ``b`` (the others):
    ``a`` holds the ``from_a`` rows' positions row after row, ``b`` the other rows'."""
    a_len = int(lengths[from_a].sum())
    idx, pa, pb = [], 0, a_len
    for n, in_a in zip(lengths.tolist(), from_a.tolist()):
        if in_a:
            idx.extend(range(pa, pa + n))
            pa += n
        else:
            idx.extend(range(pb, pb + n))
            pb += n
    out = {}
    for name in a:
        cat = torch.cat([a[name], b[name]], dim=0)
        out[name] = cat[torch.as_tensor(idx, dtype=torch.long, device=cat.device)]
    return out


class TeacherAnswers:
    """The teacher answering prompt rows: answer row ``a`` is generation ``a % N`` of prompt row ``a // N``.

    ``max_positions``: the teacher's position limit (None: the model config's ``max_position_embeddings``).
    ``stop_ids``: extra tokens that end an answer (default: the model's ``generation_config.eos_token_id``);
    the end-of-turn and the tokenizer's EOS always do. Every budget is checked here (UsageError, one line)."""

    def __init__(
        self,
        model,
        tok,
        prompts: Prompts,
        gen: GenerationSettings,
        *,
        pad_id: int | None = None,
        max_positions: int | None = None,
        stop_ids: tuple[int, ...] | None = None,
        vocab_size: int | None = None,
    ):
        self.model, self.tok, self.prompts, self.gen = model, tok, prompts, gen.check()
        self.pad_id = pad_id if pad_id is not None else (tok.pad_token_id if tok.pad_token_id is not None else 0)
        self.vocab_size = vocab_size or len(tok)
        if stop_ids is None:
            eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            stop_ids = tuple(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        stops = {prompts.closer, *(int(s) for s in stop_ids)}
        if tok.eos_token_id is not None:
            stops.add(int(tok.eos_token_id))
        self.stop_ids = tuple(sorted(stops))
        if max_positions is None:
            max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        L = prompts.settings.max_length
        budgets = np.empty(prompts.n, dtype=np.int64)
        for i in range(prompts.n):
            room = [gen.max_new_tokens, L - len(prompts.student_ids[i]) - 1]
            if max_positions:
                room.append(int(max_positions) - len(prompts.contexts[i]) - 1)
            budgets[i] = min(room)
            if budgets[i] < 1:
                why = f"--max-length {L}" if room[1] == budgets[i] else f"the teacher's {max_positions} positions"
                raise UsageError(
                    f"prompt row {i} leaves no room for an answer within {why} (its prompt takes "
                    f"{len(prompts.student_ids[i])} tokens, the teacher's context "
                    f"{len(prompts.contexts[i])}); raise --max-length or shorten the prompt"
                )
        self.budgets = budgets

    @property
    def num_rows(self) -> int:
        return self.prompts.n * self.gen.generations_per_prompt

    def batch(self, start: int, stop: int, reduce: Reduce, device: torch.device | str) -> AnswerBatch:
        """Answer rows ``[start, stop)``: generate (capturing each position through ``reduce``), build the answer
        rows, and rescore the rows whose re-tokenized answer does not line up (module docstring)."""
        device = torch.device(device)
        prompts, gen, N = self.prompts, self.gen, self.gen.generations_per_prompt
        rows = np.arange(start, stop, dtype=np.int64)
        p_idx, g_idx = rows // N, rows % N
        contexts = [prompts.contexts[i] for i in p_idx]
        budgets = self.budgets[p_idx]
        u = step_uniforms(gen.seed, prompts.row_hash[p_idx], g_idx, int(budgets.max()) + 1) if gen.sample else None
        collector = StepReducer(reduce)
        at = input_device(self.model, device)  # an accelerate-placed model generates on its first device
        out = generate_with_capture(
            self.model,
            contexts,
            budgets=budgets,
            closer=prompts.closer,
            stop_ids=self.stop_ids,
            pad_id=self.pad_id,
            device=at,
            uniforms=u,
            temperature=gen.temperature,
            top_p=gen.top_p,
            on_step=collector,
        )
        records = []
        for k in range(len(rows)):
            text = self.tok.decode(
                out.tokens[k].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            records.append(
                answer_record(prompts, int(p_idx[k]), int(g_idx[k]), text, out.finish[k], len(out.tokens[k]), gen)
            )
        data = student_data(prompts, self.tok, records, self.vocab_size)
        view = teacher_view(data, self.tok, prompts.teacher_prompt)
        aligned = np.zeros(len(rows), dtype=bool)
        for k in range(len(rows)):
            seq, f = view.seqs[k], int(view.first_target[k])
            one_run = view.target_mask is None or (
                bool(view.target_mask[k][f:].all()) and not view.target_mask[k][:f].any()
            )
            want = np.append(out.tokens[k], prompts.closer)
            aligned[k] = (
                one_run
                and len(seq) - f == len(want)
                and np.array_equal(seq[:f], contexts[k])
                and np.array_equal(seq[f:], want)
            )
        if not np.array_equal(data.num_targets[aligned], out.positions[aligned]):  # implied by the checks above
            raise RuntimeError("aligned rows with a different number of positions")
        captured = collector.gather(np.where(aligned, out.positions, 0))
        if aligned.all():
            reduced = captured
        else:
            redo = np.flatnonzero(~aligned)
            masks = view.masks(redo)
            scored = score_rows(
                self.model, [view.seqs[k] for k in redo], view.first_target[redo], masks, reduce, at, self.pad_id
            )
            reduced = scored if not aligned.any() else interleave(data.num_targets, aligned, captured, scored)
        return AnswerBatch(
            rows=rows, records=records, data=data, view=view, reduced=reduced, rescored=~aligned, generated=out
        )


# -- the answers file ----------------------------------------------------------------------------------------------

ANSWERS_JSONL, ANSWERS_PARQUET = "answers.jsonl", "answers.parquet"
ANSWER_FILES = (ANSWERS_JSONL, ANSWERS_PARQUET)
"""What ``cache-teacher --generate`` writes beside the shards (``--answers-parquet``: the Parquet copy too)."""


def answers_jsonl_bytes(records: list[dict]) -> bytes:
    """The answers file's JSONL text (UTF-8, one row a line)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def parquet_bytes(records: list[dict]) -> bytes:
    """The answers as a Parquet file's bytes (pyarrow): ``messages`` a list of {role, content} structs,
    ``generation`` a struct; :func:`kdcli.lm.text.load_text` reads the rows back as from the JSONL file."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(
            "answers.parquet is written with the pyarrow package, which is not installed",
            hint="pip install 'kdcli[data-lm]'",
        ) from None
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), buf)
    return buf.getvalue()


def write_answers(path: Path, records: list[dict], parquet: bool = False) -> Path:
    """Write the answers atomically (``*.partial``, fsync, rename): JSONL, or Parquet (``parquet``)."""
    path = Path(path)
    atomic_write_bytes(path, parquet_bytes(records) if parquet else answers_jsonl_bytes(records))
    return path
