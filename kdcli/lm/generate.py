"""The teacher answers: batched generation that hands every generated position's raw logits to a callback.

:func:`generate_with_capture` drives ``transformers``' own ``model.generate`` (KV cache, left padding, attention
mask, position ids from the mask, stopping on end-of-turn / eos) and decides every token itself, in one
:class:`~transformers.LogitsProcessor` (:class:`StepDriver`) that sees the model's **raw** next-token logits:

- ``generate`` copies ``outputs.logits[:, -1]`` to fp32 and passes it through its processor list
  (transformers 5.x, ``generation/utils.py``: ``GenerationMixin._sample``). Custom processors run *after* the
  defaults ``_get_logits_processor`` builds from the generation config (repetition penalty, min length, suppressed
  tokens, forced BOS/EOS, ...) and *before* the warpers (temperature, top-k, top-p; only with ``do_sample``).
  ``_prepare_generation_config`` fills every field the caller left ``None`` from ``model.generation_config``, so a
  checkpoint's ``generation_config.json`` (``repetition_penalty: 1.1``, ``suppress_tokens``, ``top_k`` ...) would
  alter the distribution the driver sees. :func:`neutral_generation_config` therefore swaps in a bare
  ``GenerationConfig()`` for the call; our config sets ``do_sample=False`` and nothing else that builds a
  processor, so the driver is the only processor and its input is the raw logits.
- The driver picks the token (greedy: ``argmax``, the first maximum as ``generate``'s own ``argmax``; sampled: see
  :func:`choose_tokens`), hands ``(step, logits, targets, active)`` to ``on_step``, then overwrites the scores with
  ``-inf`` everywhere but the chosen token, so ``generate``'s greedy selection takes exactly that token. (A greedy
  step where no end-of-turn can be forced returns the raw scores: ``generate``'s ``argmax`` of the same tensor is
  the driver's choice. Either way the returned sequences are checked against the driver's choices.)
- A row stops at the first stop id it chooses (the chat template's end-of-turn token, the tokenizer's and the
  model's eos). A row still running after its budget of ``budgets[r]`` answer tokens gets one more step whose token
  is forced to ``closer`` (the end-of-turn): its logits are captured like any other position (the student predicts
  the end-of-turn there, and the teacher's distribution at that prefix is what the cache needs), and the answer is
  a complete turn. ``generate`` pads rows that stopped; the driver reports them inactive (``active`` False) and
  they are never part of the result.

So one forward per step serves generation and the cache (no second pass), and ``steps x b x V`` logits are never
kept: ``on_step`` reduces each step on the device at once (:class:`StepReducer`).

**Sampling** (``uniforms`` given; :func:`step_uniforms`): every (row, step) has its own uniform number u, a pure
function of ``(seed, row key, generation index, step)`` (Philox4x64 keyed by BLAKE2b of the three, NumPy's raw
bit stream, which NumPy keeps stable across versions), and the token is the inverse CDF of the tempered (and
top-p-filtered) distribution at u. A row's answer thus depends on its own key and logits only: not on the
batch's size or composition, the row's position, the device's RNG, or how many rows finished before it. (Exact
equality across *different* batch compositions still assumes the logits are bitwise the same with other padding,
which floating-point matrix products do not promise; with the same batches, as kdcli's cache pass always forms
them, a re-run is bitwise identical.)
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from kdcli.infra.errors import UsageError

StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""``on_step(step, logits, targets, active)``: ``logits`` (b, V) fp32, the model's raw next-token logits (they may
be overwritten once the callback returns: copy them to keep them); ``targets`` (b,) the token the student's
sequence holds at that position (the chosen token, or ``closer`` where the row stops); ``active`` (b,) bool, False
for rows that stopped before this step (their logits and targets are meaningless)."""


@dataclass(frozen=True)
class GenerationSettings:
    """How the teacher answers (``cache-teacher --generate``). Part of a generated cache's identity."""

    max_new_tokens: int = 256
    """Answer tokens per generation at most, the end-of-turn token not counted (a longer answer is closed)."""
    generations_per_prompt: int = 1
    """Answers per prompt row, each with its own seed (needs ``sample``)."""
    sample: bool = False
    """Sample the answers (``--sample``); greedy (argmax) otherwise."""
    temperature: float = 1.0
    """``--gen-temperature``: answers are drawn from softmax(z / T) (sampling only)."""
    top_p: float = 1.0
    """``--top-p``: nucleus sampling, the smallest set of most probable tokens with mass >= P (sampling only)."""
    seed: int = 0
    """``--seed``: with the row's content hash and the generation index, what every draw depends on."""

    def check(self) -> GenerationSettings:
        """UsageError (one line) for values that cannot be used; returns self."""
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1 (got {self.max_new_tokens}): an answer needs a token")
        if self.generations_per_prompt < 1:
            raise UsageError(f"--generations-per-prompt must be >= 1 (got {self.generations_per_prompt})")
        if not self.sample:
            if self.generations_per_prompt > 1:
                raise UsageError(
                    f"--generations-per-prompt {self.generations_per_prompt} without --sample would "
                    "write the same greedy answer several times; add --sample"
                )
            if self.temperature != 1.0 or self.top_p != 1.0:
                raise UsageError(
                    "--gen-temperature/--top-p shape sampled answers; add --sample (greedy answers take the argmax)"
                )
        if not (self.temperature > 0 and np.isfinite(self.temperature)):
            raise UsageError(
                f"--gen-temperature must be > 0 (got {self.temperature}); for greedy answers drop --sample"
            )
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1] (got {self.top_p})")
        if not 0 <= self.seed < 2**63:
            raise UsageError(f"--seed must be in [0, 2^63) (got {self.seed})")
        return self

    def as_dict(self) -> dict:
        return asdict(self)

    def identity(self) -> dict:
        """What decides the answers (a generated cache's ``settings["generate"]``): greedy answers do not depend
        on the seed, temperature or top-p, so those are None there and do not make two greedy caches differ."""
        d = self.as_dict()
        if not self.sample:
            d.update(seed=None, temperature=None, top_p=None)
        return d


# -- sampling: one uniform per (row, step), the inverse CDF on the device -------------------------------------------


def step_uniforms(seed: int, keys: Sequence[int], generations: Sequence[int], steps: int) -> np.ndarray:
    """(b, steps) float64 in (0, 1): row r's uniforms for steps 0 .. steps - 1.

    Row r's stream is Philox4x64 (NumPy's ``random_raw``, a stable bit stream) keyed by BLAKE2b-128 of
    ``(seed, keys[r], generations[r])`` (little-endian int64 / uint64 / int64), so it depends on nothing else;
    u = (top 53 bits + 0.5) / 2^53 is never 0 or 1. A longer ``steps`` extends the same stream."""
    out = np.empty((len(keys), steps), dtype=np.float64)
    for r, (key, g) in enumerate(zip(keys, generations)):
        digest = hashlib.blake2b(struct.pack("<qQq", int(seed), int(key), int(g)), digest_size=16).digest()
        bits = np.random.Philox(key=int.from_bytes(digest, "little")).random_raw(steps)  # (steps,) uint64
        out[r] = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    return out


def choose_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """(b, V) logits, (b,) uniforms in (0, 1) -> (b,) token ids drawn from softmax(logits / T), top-p filtered.

    Exact inverse-CDF sampling in float64: the token is the first whose cumulative probability exceeds ``u`` times
    the kept mass (tokens of probability 0 are never chosen). Top-p keeps, in descending order of probability
    (a stable sort: ties keep vocabulary order), every token whose preceding mass is < P: the smallest set with
    mass >= P, the set ``transformers``' ``TopPLogitsWarper`` keeps (it removes the ascending-cumulative mass
    <= 1 - P). Row-wise operations only: a row's token does not depend on the other rows."""
    p = torch.softmax(logits.double() / temperature, dim=-1)  # (b, V) float64
    order = None
    if top_p < 1.0:
        p, order = torch.sort(p, dim=-1, descending=True, stable=True)  # (b, V)
        before = p.cumsum(-1) - p  # mass of the more probable tokens
        p = p * (before < top_p)
    cdf = p.cumsum(-1)  # (b, V)
    target = u.to(cdf)[:, None] * cdf[:, -1:]  # (b, 1), strictly below the kept mass
    idx = torch.searchsorted(cdf, target, right=True).clamp_(max=p.shape[-1] - 1)  # (b, 1)
    return (idx if order is None else order.gather(1, idx))[:, 0]


# -- driving transformers' generate --------------------------------------------------------------------------------


class StepDriver:
    """The one logits processor of a :func:`generate_with_capture` call (module docstring): chooses each row's
    token, reports the raw logits to ``on_step`` and forces the choice. Holds the per-row state of one call."""

    def __init__(
        self,
        width: int,
        budgets: torch.Tensor,
        closer: int,
        stop_ids: torch.Tensor,
        uniforms: torch.Tensor | None,
        temperature: float,
        top_p: float,
        on_step: StepCallback | None,
    ):
        self.width = width  # the padded prompt width: step = input_ids.shape[1] - width
        self.budgets = budgets  # (b,) answer tokens before the forced end-of-turn
        self.closer, self.stop_ids = closer, stop_ids
        self.uniforms, self.temperature, self.top_p = uniforms, temperature, top_p
        self.on_step = on_step
        self.done = torch.zeros(len(budgets), dtype=torch.bool, device=budgets.device)  # (b,) stopped rows
        self.chosen: list[torch.Tensor] = []  # per step (b,): the token each row took
        self.forced: list[tuple[int, torch.Tensor]] = []  # (step, (b,)): the end-of-turn was forced there
        self.limit = int(budgets.max()) + 1  # steps with a capture; later calls (none expected) are ignored
        self.first_forced = int(budgets.min())  # no end-of-turn is forced before this step (known on the host)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.width
        if step >= self.limit:  # defensive: every row has stopped by now
            return scores
        active = ~self.done
        if self.uniforms is None:
            tok = scores.argmax(dim=-1)  # (b,) the first maximum, as generate's own argmax
        else:
            tok = choose_tokens(scores, self.uniforms[:, step], self.temperature, self.top_p)
        stop = own_stop = torch.isin(tok, self.stop_ids)
        may_force = step >= self.first_forced
        if may_force:
            forced = active & (step >= self.budgets) & ~own_stop
            tok = torch.where(forced, torch.full_like(tok, self.closer), tok)
            stop = own_stop | forced
        targets = torch.where(stop, torch.full_like(tok, self.closer), tok)  # what the student's sequence holds
        if self.on_step is not None:
            self.on_step(step, scores, targets, active)
        self.chosen.append(tok)
        if may_force:
            self.forced.append((step, forced))
        self.done = self.done | stop
        if self.uniforms is not None or may_force:  # greedy, unforced: generate's argmax of these scores is tok
            scores.fill_(float("-inf")).scatter_(1, tok[:, None], 0.0)  # generate's argmax now takes tok
        return scores


@contextlib.contextmanager
def neutral_generation_config(model):
    """``model.generation_config`` replaced by a bare ``GenerationConfig()`` for the duration (module docstring:
    transformers fills unset fields from it, which could add processors in front of the driver). A PEFT model's
    ``generate`` runs its base model's, so the base model's config is swapped too."""
    from transformers import GenerationConfig

    owners = [model]
    base = model.get_base_model() if hasattr(model, "get_base_model") else None
    if base is not None and base is not model:
        owners.append(base)
    saved = [(m, hasattr(m, "generation_config"), getattr(m, "generation_config", None)) for m in owners]
    for m in owners:
        m.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for m, had, old in saved:
            if had:
                m.generation_config = old
            else:  # pragma: no cover - every GenerationMixin model has one
                del m.generation_config


def left_pad(contexts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad to the longest: (b, W) int64 ids and (b, W) int64 attention mask (decoder-only generation pads on
    the left, so every row's next token sits in the last column)."""
    W = max(len(c) for c in contexts)
    ids = np.full((len(contexts), W), pad_id, dtype=np.int64)
    mask = np.zeros((len(contexts), W), dtype=np.int64)
    for i, c in enumerate(contexts):
        if len(c):
            ids[i, W - len(c) :] = c
            mask[i, W - len(c) :] = 1
    return ids, mask


@dataclass
class Generated:
    """What :func:`generate_with_capture` returns, per row (host arrays)."""

    tokens: list[np.ndarray]  # the answer's tokens (int64), stop / end-of-turn token excluded
    positions: np.ndarray  # (b,) captured positions = len(tokens) + 1 (the answer and its end-of-turn)
    finish: list[str]  # "stop": the teacher ended the answer; "length": the budget ran out, end-of-turn forced
    stop_token: np.ndarray  # (b,) the token that ended the row (a stop id, or the forced closer)
    sequences: np.ndarray  # (b, W + steps) what generate returned (left-padded prompt + tokens + padding)


def generate_with_capture(
    model,
    contexts: Sequence[Sequence[int]],
    *,
    budgets: Sequence[int],
    closer: int,
    stop_ids: Sequence[int],
    pad_id: int,
    device: torch.device | str | None = None,
    uniforms: np.ndarray | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    on_step: StepCallback | None = None,
) -> Generated:
    """Answer a batch of prompts with a Hugging Face causal LM (module docstring).

    ``contexts``: per row the teacher's token ids (generation prompt included), left-padded here with ``pad_id``.
    ``budgets``: per row the answer tokens allowed before the end-of-turn is forced (>= 0). ``closer``: the
    end-of-turn token (must be one of ``stop_ids``). ``uniforms`` (b, >= max(budgets) + 1): sample with
    :func:`choose_tokens` (from :func:`step_uniforms`); None: greedy. ``on_step``: see :data:`StepCallback`.
    Call under ``torch.no_grad()`` / ``inference_mode()`` (generate does its own ``no_grad``)."""
    from transformers import GenerationConfig, LogitsProcessorList

    if not hasattr(model, "generate"):
        raise UsageError(
            f"--generate needs a Hugging Face causal LM teacher (one with generate()); "
            f"{type(model).__name__} is not one"
        )
    if closer not in {int(s) for s in stop_ids}:
        raise ValueError("the closer must be one of the stop ids")
    b = len(contexts)
    if b == 0:
        raise ValueError("no rows to generate")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    ids, mask = left_pad(contexts, pad_id)
    budgets_t = torch.as_tensor(np.asarray(budgets, dtype=np.int64), device=device)  # (b,)
    steps = int(budgets_t.max()) + 1
    u = None
    if uniforms is not None:
        if uniforms.shape[0] != b or uniforms.shape[1] < steps:
            raise ValueError(f"uniforms must be (b, >= {steps}), got {uniforms.shape}")
        u = torch.as_tensor(uniforms[:, :steps], dtype=torch.float64, device=device)  # (b, steps)
    stops = torch.as_tensor(sorted({int(s) for s in stop_ids}), dtype=torch.long, device=device)
    driver = StepDriver(ids.shape[1], budgets_t, int(closer), stops, u, float(temperature), float(top_p), on_step)
    config = GenerationConfig(
        max_new_tokens=steps,
        do_sample=False,
        num_beams=1,
        num_return_sequences=1,
        eos_token_id=stops.tolist(),
        pad_token_id=int(pad_id),
        use_cache=True,
        return_dict_in_generate=False,
    )
    with neutral_generation_config(model):
        seqs = model.generate(
            input_ids=torch.from_numpy(ids).to(device),
            attention_mask=torch.from_numpy(mask).to(device),
            generation_config=config,
            logits_processor=LogitsProcessorList([driver]),
        )
    chosen = torch.stack(driver.chosen, dim=1).cpu().numpy()  # (b, taken steps)
    forced = np.zeros(chosen.shape, dtype=bool)
    for t, f in driver.forced:
        forced[:, t] = f.cpu().numpy()
    stop_set = stops.cpu().numpy()
    tokens, positions, finish, stop_tok = [], np.zeros(b, dtype=np.int64), [], np.zeros(b, dtype=np.int64)
    for r in range(b):
        hits = np.flatnonzero(np.isin(chosen[r], stop_set))
        if not len(hits):  # cannot happen: the budget forces a stop id
            raise RuntimeError(f"row {r} did not stop within {chosen.shape[1]} steps")
        s = int(hits[0])
        tokens.append(chosen[r, :s].astype(np.int64))
        positions[r] = s + 1
        finish.append("length" if forced[r, s] else "stop")
        stop_tok[r] = chosen[r, s]
    seqs = seqs.cpu().numpy()
    for r in range(b):  # what generate wrote is what the driver chose (a processor placed wrong would show here)
        got = seqs[r, ids.shape[1] : ids.shape[1] + positions[r]]
        if not np.array_equal(got, np.append(tokens[r], stop_tok[r])):
            raise RuntimeError(
                "transformers' generate did not take the driver's tokens; its logits processors are "
                "not what this version of kdcli expects"
            )
    return Generated(tokens=tokens, positions=positions, finish=finish, stop_token=stop_tok, sequences=seqs)


# -- reducing each step at once --------------------------------------------------------------------------------------


class StepReducer:
    """An ``on_step`` callback that reduces each step's logits at once and keeps only what ``reduce`` returns.

    ``reduce(logits (n, V) fp32, targets (n,)) -> {name: (n, ...) tensor}`` runs on the logits' device. With
    ``compact`` (default: on the CPU) only the rows still generating are reduced (selecting them needs their ids
    on the host: free on the CPU, a device sync per step on CUDA); without it every row is reduced and the rows
    that had stopped are dropped at the end (no sync; ``generate`` runs the forward over them anyway).
    :meth:`gather` returns the reduced positions row-major: row 0's positions 0 .. n_0 - 1, then row 1's, ...
    """

    def __init__(
        self, reduce: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]], compact: bool | None = None
    ):
        self.reduce, self.compact = reduce, compact
        self.steps: list[dict[str, torch.Tensor]] = []
        self.rows: list[np.ndarray | None] = []  # per step: the rows reduced (None: all)
        self.width = 0

    def __call__(self, step: int, logits: torch.Tensor, targets: torch.Tensor, active: torch.Tensor) -> None:
        if step != len(self.steps):
            raise RuntimeError(f"step {step} after {len(self.steps)} steps")
        self.width = logits.shape[0]
        compact = logits.device.type == "cpu" if self.compact is None else self.compact
        if compact:
            rows = torch.nonzero(active)[:, 0]  # (n,)
            all_rows = len(rows) == len(active)
            out = self.reduce(logits if all_rows else logits[rows], targets if all_rows else targets[rows])
            self.rows.append(None if all_rows else rows.cpu().numpy())
        else:
            out = self.reduce(logits, targets)
            self.rows.append(None)
        self.steps.append(out)

    def gather(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        """``{name: (sum(positions), ...)}``, row-major; row r's positions are steps 0 .. positions[r] - 1."""
        b = self.width
        offsets, index_of = [], []  # per step: where its rows start in the step-major concatenation
        total = 0
        for rows in self.rows:
            offsets.append(total)
            if rows is None:
                index_of.append(None)
                total += b
            else:
                pos = np.full(b, -1, dtype=np.int64)
                pos[rows] = np.arange(len(rows))
                index_of.append(pos)
                total += len(rows)
        flat = []
        for r in range(b):
            for t in range(int(positions[r])):
                k = r if index_of[t] is None else int(index_of[t][r])
                if k < 0:
                    raise RuntimeError(f"row {r} was not captured at step {t}")
                flat.append(offsets[t] + k)
        if not self.steps:
            return {}
        idx = torch.as_tensor(np.asarray(flat, dtype=np.int64))
        out = {}
        for name in self.steps[0]:
            cat = torch.cat([s[name] for s in self.steps], dim=0)  # (total, ...) step-major
            out[name] = cat[idx.to(cat.device)]
        return out
