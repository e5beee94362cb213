"""Pre-tokenized LM DATA: rows that already are token ids (``{"input_ids": [...], "labels": [...]}``).

This is the row layout of a Hugging Face dataset after tokenization, the one axolotl and TRL train from, and the one
``kdcli cache import`` writes beside an imported cache (``CACHE/tokens.parquet``): a capture made by another tool
records token ids, not the text they came from, so an imported cache is trained and evaluated on those ids.

- ``input_ids``: list of ints, the sequence (ids below the vocabulary size);
- ``labels`` (optional): list of ints, one per token, in the Hugging Face convention of causal LMs (not shifted:
  the model shifts): ``labels[t] = input_ids[t]`` where token ``t`` is predicted, ``-100`` where it is not. A
  label that is neither is refused (a shifted or remapped label column would silently train on other targets).
  Without ``labels`` every token after the first is predicted; ``--prompt-loss`` also predicts every one;
- ``attention_mask`` (optional): trailing zeros (right padding) are cut; any other zero is refused.

Token 0 is never predicted (nothing precedes it). A row is used as it is: not packed, not re-tokenized; one longer
than ``max_length`` loses its end (noted), one with no predicted token left is skipped (noted). The row hash is the
one every LM row gets (:func:`kdcli.lm.text.token_row_hashes`: the ids, the first predicted token, the predicted
mask where it is not one run), so the same sequences with the same predicted tokens have the same fingerprint
whichever kind of DATA they came from: a cache built from text matches its tokens exported as pre-tokenized rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from kdcli.infra.errors import UsageError

COLUMNS = ("input_ids",)
OPTIONAL_COLUMNS = ("labels", "attention_mask")
IGNORE_INDEX = -100  # Hugging Face / PyTorch CrossEntropyLoss's ignore_index: a token that is not predicted


@dataclass
class Sequences:
    """What :func:`read_sequences` makes of pre-tokenized rows (the fields :class:`~kdcli.lm.text.TokenData`
    takes)."""

    ids: list[np.ndarray] = field(default_factory=list)  # per row, int32
    masks: list[np.ndarray] = field(default_factory=list)  # per row, bool: True at each predicted token
    notes: list[str] = field(default_factory=list)

    @property
    def first_target(self) -> np.ndarray:
        """(n,) index of each row's first predicted token."""
        return np.array([int(np.argmax(m)) for m in self.masks], dtype=np.int64)

    @property
    def one_run(self) -> bool:
        """True when every row predicts one run of tokens to its end (no mask needed)."""
        return all(bool(m[int(np.argmax(m)) :].all()) for m in self.masks)


def int_list(where: str, name: str, value) -> np.ndarray:
    """A JSON/Arrow list of ints -> int64 array; UsageError naming the row and column otherwise."""
    if not isinstance(value, (list, tuple, np.ndarray)):
        got = type(value).__name__ if value is not None else "null"
        raise UsageError(f'{where}: "{name}" must be a list of token ids (integers), got {got}')
    a = np.asarray(value)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise UsageError(f'{where}: "{name}" must be a flat list of integers (token ids), got {a.dtype} {a.shape}')
    return a.astype(np.int64)


def predicted_mask(where: str, ids: np.ndarray, labels: np.ndarray | None, prompt_loss: bool) -> np.ndarray:
    """(L,) bool: the tokens a row predicts (module docstring)."""
    if labels is None or prompt_loss:
        mask = np.ones(len(ids), dtype=bool)
    else:
        if len(labels) != len(ids):
            raise UsageError(f'{where}: "labels" has {len(labels)} entries for {len(ids)} input_ids: one per token')
        mask = labels != IGNORE_INDEX
        bad = mask & (labels != ids)
        if bad.any():
            t = int(np.flatnonzero(bad)[0])
            raise UsageError(
                f"{where}: labels[{t}] = {int(labels[t])} but input_ids[{t}] = {int(ids[t])}; labels must be the "
                f"token itself where it is predicted and {IGNORE_INDEX} elsewhere (Hugging Face's unshifted "
                "convention): a shifted or remapped label column is not supported"
            )
    if len(mask):
        mask[0] = False  # nothing precedes the first token
    return mask


def read_sequences(rows: Iterable[tuple[str, dict]], max_length: int, prompt_loss: bool = False) -> Sequences:
    """``(where, row)`` pairs of pre-tokenized rows -> their sequences and predicted-token masks."""
    out = Sequences()
    n_rows = cut = skipped = unpadded = 0
    for where, row in rows:
        n_rows += 1
        ids = int_list(where, "input_ids", row.get("input_ids"))
        if ids.size and ids.min() < 0:
            raise UsageError(f'{where}: "input_ids" holds the negative id {int(ids.min())}')
        labels = row.get("labels")
        labels = None if labels is None else int_list(where, "labels", labels)
        attention = row.get("attention_mask")
        if attention is not None:
            am = int_list(where, "attention_mask", attention)
            if len(am) != len(ids):
                raise UsageError(f'{where}: "attention_mask" has {len(am)} entries for {len(ids)} input_ids')
            keep = int(np.flatnonzero(am)[-1]) + 1 if am.any() else 0
            if not am[:keep].all():
                raise UsageError(
                    f"{where}: attention_mask has a 0 before the last 1 (left padding or packed documents); give "
                    "each sequence as its own unpadded row"
                )
            if keep < len(ids):
                unpadded += 1
                ids, labels = ids[:keep], None if labels is None else labels[:keep]
        mask = predicted_mask(where, ids, labels, prompt_loss)
        if len(ids) > max_length:
            cut += int(mask[max_length:].any())
            ids, mask = ids[:max_length], mask[:max_length]
        if not mask.any():
            skipped += 1
            continue
        out.ids.append(ids.astype(np.int32))
        out.masks.append(mask)
    if unpadded:
        out.notes.append(f"{unpadded} of {n_rows} pre-tokenized rows were right-padded; their padding was cut")
    if cut:
        out.notes.append(f"{cut} of {n_rows} pre-tokenized rows were cut at --max-length {max_length}")
    if skipped:
        out.notes.append(f"{skipped} of {n_rows} pre-tokenized rows predict no token and were skipped")
    return out


def arrow_column_problem(pa, name: str, t) -> str | None:
    """Why an Arrow column cannot hold ``name`` of pre-tokenized rows (a list of integers), or None."""
    item = t.value_type if (pa.types.is_list(t) or pa.types.is_large_list(t)) else None
    if item is None or not pa.types.is_integer(item):
        return f'column "{name}" holds {t}, not lists of integers (token ids)'
    return None
