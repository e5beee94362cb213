"""Command configs: one dataclass per command is the schema, the defaults and the help text at once.

Every field is a flag (``batch_size`` <-> ``--batch-size``) and a YAML key of the same name. Values come from,
in increasing priority: the dataclass default, the ``--config`` YAML file, the flags. Validation is strict: an
unknown key, a wrong type or an out-of-range value is a :class:`~kdcli.infra.errors.UsageError` (exit 2) naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdcli.cache.modes import mode_names
from kdcli.infra.errors import UsageError

REQUIRED = dataclasses.MISSING


def opt(default: Any = REQUIRED, help: str = "", *, min: float | None = None, max: float | None = None,
        gt: float | None = None, lt: float | None = None, choices: tuple[str, ...] | None = None,
        repeat: bool = False, short: str | None = None) -> Any:
    """A config field with its help text and bounds (``min``/``max`` inclusive, ``gt``/``lt`` exclusive)."""
    meta = dict(help=help, min=min, max=max, gt=gt, lt=lt, choices=choices, repeat=repeat, short=short)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


DEVICES = ("auto", "cpu", "cuda")
TEMPERATURE_MIN, TEMPERATURE_MAX = 0.01, 1000.0
"""Temperatures kdcli accepts (loss, eval and the ones a cache stores). Outside it the tempered log-probs and
their statistics leave float32/float16 (logp / T overflows, T^2 reaches inf) and nothing useful is left to learn."""


def cache_list(value) -> list:
    """``--cache`` as a list: one directory (the Python API, older configs) is a list of one, None an empty one."""
    if isinstance(value, str):
        return [value]
    return [] if value is None else value


@dataclass
class CacheConfig:
    """Run the teacher once over DATA and write its log-probabilities to a cache directory."""

    teacher: str = opt(help="Teacher MODEL: a kdcli run dir, a built-in name (mlp, cnn), or path/to/file.py:factory; "
                            "for .jsonl DATA a Hugging Face dir or .gguf file (causal LM).")
    data: str = opt(help="DATA: mnist:train, file.npz, file.h5, or path/to/file.py:factory; for a token-level LM "
                         "cache file.jsonl, file.parquet, a directory of .parquet files or a datasets.save_to_disk "
                         "directory, with text, prompt/response or chat (messages / ShareGPT conversations) rows; "
                         "slice with [a:b].")
    out: str = opt(help="Cache directory to write (manifest.json + shard-*.h5).")
    teacher_weights: str | None = opt(None, "Weights for the teacher: .safetensors, or a torch state_dict "
                                            "(loaded with weights_only=True).")
    teacher_args: dict = opt({}, "Keyword arguments for the teacher factory (KEY=VALUE, values parsed as YAML).",
                             repeat=True)
    mode: str | None = opt(None, "What to store per row: full (all classes), topk (K ids + log-probs + tail "
                                 "log-mass), sample (ids drawn from the teacher with counts) or priority (priority "
                                 "sampling: --samples ids without replacement + a threshold; less variance than "
                                 "sample). Default: topk when --top-k is given, else full.",
                           choices=mode_names())
    top_k: int | None = opt(None, "K for --mode topk.", min=1)
    samples: int = opt(16, "--mode sample: draws per row (stored as distinct ids + counts); --mode priority: ids kept "
                           "per row.", min=1, max=65535)
    temperatures: str = opt("1,2,4", "Temperatures at which a topk/sample/priority cache is exact (topk: the true "
                                     "tempered tail mass) or unbiased (sample/priority: log Z_T), comma-separated; "
                                     "1 is always included. train-student/eval at another T refuse unless "
                                     "--approximate-temperature. Full caches are exact at every T.")
    views: int = opt(1, "Augmented views per sample, each cached with its augmentation parameters "
                        "(view 0 is the plain input).", min=1)
    augment: str | None = opt(None, "Augmentation for views >= 1, e.g. shift:2 (random pixel shift in "
                                    "[-2, 2] on each axis).")
    batch_size: int = opt(512, "Rows per teacher forward pass.", min=1)
    shard_size: int = opt(16384, "Rows per HDF5 shard.", min=1)
    compression: str = opt("auto", "Lossless shard compression (HDF5 filters: readers decompress transparently). "
                                   "auto: gzip for token-level (LM) topk/sample/priority caches (~25-40% "
                                   "smaller), none otherwise (full log-probs decompress ~14x slower than they read; "
                                   "classification caches are small); gzip: level 4 + byte shuffle, smallest; lzf: "
                                   "+ shuffle, faster, "
                                   "larger, needs h5py to read; none: uncompressed, fastest reads. An existing "
                                   "cache keeps its own (--overwrite re-writes it).",
                           choices=("auto", "gzip", "lzf", "none"))
    device: str = opt("auto", "auto uses CUDA when available.", choices=DEVICES)
    dtype: str = opt("fp32", "Teacher precision: a Hugging Face teacher (dir or .gguf) is loaded with its weights "
                              "in this dtype (bf16/fp16 halve its memory); other teachers run their forward pass "
                              "under autocast. Log-softmax is always computed in fp32.",
                     choices=("fp32", "bf16", "fp16"))
    teacher_device_map: str = opt("none", "LM: auto loads a Hugging Face teacher with accelerate's "
                                          "device_map=\"auto\": spread over every visible GPU, then CPU memory, for "
                                          "teachers larger than one device (needs accelerate: pip install "
                                          "'kdcli[hf]'); --device is then where log-softmax and the reduction run. "
                                          "none: the whole teacher on --device.", choices=("none", "auto"))
    seed: int = opt(0, "Seed for augmentation parameters and sampling.")
    overwrite: bool = opt(False, "Replace an existing cache made with different settings.")
    tokenizer: str | None = opt(None, "LM DATA: tokenizer, a HF dir, .gguf file or tokenizer.json. Default: the "
                                      "teacher's own.")
    max_length: int = opt(512, "LM: tokens per sequence (text rows are packed into chunks of this length; "
                               "prompt/response and chat rows are one sequence each, truncated to it).", min=2)
    no_pack: bool = opt(False, "LM: one sequence per text row (truncated to --max-length) instead of packing rows.")
    prompt_template: str = opt("{prompt}", "LM prompt/response rows: what the student reads before the response; "
                                           "{prompt} is the row's prompt. @FILE reads it from a file.")
    teacher_prompt: str | None = opt(None, "LM prompt distillation: context only the teacher reads (@FILE reads a "
                                           "file); the student never sees it and the cached positions stay the "
                                           "student's. Plain TEXT is a teacher-only system prompt: for chat rows a "
                                           "system message before the row's own (joined into one, TEXT first; it "
                                           "replaces a template's default system prompt), for prompt/response rows "
                                           "TEXT and a blank line before the prompt. A TEMPLATE with {prompt} (the "
                                           "row's prompt; prompt/response rows) replaces the prompt.")
    prompt_loss: bool = opt(False, "LM prompt/response rows: also cache (and train on) the prompt tokens, not only "
                                   "the response; chat rows: every token, not only the assistant turns.")
    chat_template: str | None = opt(None, "LM chat rows: a Jinja chat template FILE that renders them instead of the "
                                          "tokenizer's own (needed when it has none); its text is recorded in the "
                                          "cache, so train-student and eval with --cache render the same tokens.")
    trust_remote_code: bool = opt(False, "LM: let a Hugging Face model or tokenizer directory run its own Python "
                                         "code (the auto_map of its config.json / tokenizer_config.json: "
                                         "modeling_*.py, tokenization_*.py ...). Without it such a directory is "
                                         "refused (exit 2); kdcli never asks on stdin.")


@dataclass
class TrainConfig:
    """Train a student from a teacher cache (distillation) or on labels alone (baseline / teacher)."""

    student: str = opt(help="Student MODEL: a built-in name (mlp, cnn; transformer for LMs), path/to/file.py:factory, "
                            "a Hugging Face dir or .gguf file (LMs), or a run dir to start from.")
    data: str = opt(help="Training DATA (the same spec the cache was built from).")
    out: str = opt(help="Run directory to write (weights, config, metrics, checkpoints).")
    student_args: dict = opt({}, "Keyword arguments for the student factory (KEY=VALUE, values parsed as YAML).",
                             repeat=True)
    cache: list = opt([], "Teacher cache directory. Without it the student trains on labels alone. Repeat to fuse "
                          "several teachers over the same data (full caches: exact at every T; topk, sample or "
                          "priority caches: --combine mean at T = 1; see docs/fusion.md).", repeat=True)
    cache_weights: str | None = opt(None, "With several --cache: their weights, comma-separated in the same order "
                                          "(e.g. 0.5,0.3,0.2; >= 0, normalised to sum to 1). Default: equal.")
    combine: str = opt("mean", "With several --cache: mean fuses the teachers' probabilities (a mixture, Hinton et "
                               "al. 2015's ensemble), geometric their log-probabilities (weighted, renormalised).",
                       choices=("mean", "geometric"))
    peft: str | None = opt(None, "Language models: train a parameter-efficient adapter of a pretrained Hugging Face "
                                 "student (needs the peft extra) instead of all its weights. lora: low-rank updates "
                                 "of its linear layers; prompt: a learned prompt embedding (soft prompt) before "
                                 "every sequence.", choices=("lora", "prompt"))
    peft_args: dict = opt({}, "Adapter settings (KEY=VALUE, values parsed as YAML): lora: r (8), lora_alpha (8), "
                              "lora_dropout, target_modules=[q_proj,v_proj]; prompt: num_virtual_tokens (16), "
                              "init_text=TEXT (start from a hard prompt's embeddings).", repeat=True)
    peft_save: str | None = opt(None, "What a --peft run dir holds: merged (LoRA default: the adapted model, "
                                      "loadable without peft) or adapter (the adapter alone, naming its base; the "
                                      "only choice for prompt tuning).", choices=("merged", "adapter"))
    temperature: float = opt(4.0, "Softmax temperature T for the soft term.", min=TEMPERATURE_MIN,
                             max=TEMPERATURE_MAX)
    approximate_temperature: bool = opt(False, "Allow a topk/sample/priority cache at a temperature it does not "
                                               "store (see cache-teacher --temperatures): topk then assumes the "
                                               "tail spread like the student's, sample/priority self-normalise the "
                                               "draws -- biased, printed in the loss line.")
    alpha: float | None = opt(None, "Weight of the soft term: loss = alpha*T^2*KL(teacher_T || student_T) + "
                                    "(1-alpha)*CE(labels). Default 0.9 with --cache, 0 without.", min=0.0, max=1.0)
    epochs: int = opt(10, "Passes over the training rows.", min=1)
    lr: float = opt(1e-3, "Peak learning rate.", gt=0.0)
    optimizer: str = opt("adamw", "Optimizer.", choices=("adamw", "adam", "sgd"))
    momentum: float = opt(0.9, "Momentum for sgd.", min=0.0, lt=1.0)
    weight_decay: float = opt(0.0, "Weight decay (decoupled for adamw).", min=0.0)
    precision: str = opt("fp32", "fp32: float32 throughout (exact). bf16: mixed precision: matrix products in "
                                 "bfloat16 (a language-model student's output layer included), weights, optimizer "
                                 "state, softmax and loss in float32; faster on GPUs and on CPUs with AVX512-BF16 "
                                 "or AMX, slower where bfloat16 is emulated.", choices=("fp32", "bf16"))
    schedule: str = opt("constant", "Learning-rate schedule over all steps (after warmup).",
                        choices=("constant", "cosine", "linear"))
    warmup_steps: int = opt(0, "Linear warmup steps.", min=0)
    max_norm: float | None = opt(None, "Max-norm constraint on each unit's incoming weights (Hinton et al.).",
                                 gt=0.0)
    augment: str | None = opt(None, "On-the-fly augmentation for label-only training, e.g. shift:2. With a cache "
                                    "the student sees exactly the cached views instead.")
    batch_size: int = opt(128, "Rows per optimizer step; per process under torchrun (global batch = batch size x "
                               "processes).", min=1)
    eval_data: str | None = opt(None, "DATA to measure after every epoch (accuracy, NLL, errors in metrics.jsonl), "
                                      "e.g. mnist:test. Never trained on.")
    val_fraction: float = opt(0.0, "Fraction of the data held out for validation (chosen by seed).", min=0.0,
                              lt=1.0)
    seed: int = opt(0, "Seed for initialisation, data order and dropout.")
    device: str = opt("auto", "auto uses CUDA when available.", choices=DEVICES)
    fsdp: bool = opt(False, "Under torchrun: shard the student's weights, gradients and optimizer state over the "
                            "processes (PyTorch FSDP2, one unit per transformer layer) instead of replicating them "
                            "(DDP), for students too large for one device. Checkpoints and the run dir hold the "
                            "whole model.")
    gradient_checkpointing: bool = opt(False, "LM students: keep only each transformer layer's input during the "
                                              "forward pass and recompute the rest in the backward pass (Hugging "
                                              "Face students: their own activation checkpointing; the built-in "
                                              "transformer: torch.utils.checkpoint per block). Less activation "
                                              "memory, ~1 extra forward pass of time, the same gradients. Not for "
                                              "classification students.")
    num_workers: int = opt(0, "DataLoader worker processes reading the cache (persistent; per process under "
                              "torchrun). 0: read in the training process.", min=0)
    block_rows: int = opt(0, "Cache rows per contiguous read (block); the training order shuffles blocks, then rows "
                             "within groups of blocks. 0: auto (about 512 KiB a block, so it depends on the cache "
                             "mode). Give the same N to caches of different modes to train on the same batches.",
                          min=0)
    checkpoint_every: int = opt(0, "Also checkpoint every N optimizer steps (0: at the end of each epoch only).",
                                min=0)
    resume: bool = opt(False, "Continue from the checkpoint in --out.")
    overwrite: bool = opt(False, "Replace an existing finished run in --out.")
    divergence: str = opt("forward", "Soft-term divergence: forward KL(teacher||student), reverse KL(student||"
                                     "teacher), or jsd (generalised Jensen-Shannon, skew --jsd-beta).",
                          choices=("forward", "reverse", "jsd"))
    jsd_beta: float = opt(0.5, "JSD skew beta: beta*KL(p||m) + (1-beta)*KL(q||m), m = beta*p + (1-beta)*q "
                               "(p teacher, q student).", gt=0.0, lt=1.0)
    tokenizer: str | None = opt(None, "LM DATA without --cache: tokenizer (HF dir, .gguf, tokenizer.json). "
                                      "With --cache the cache's tokenizer is used.")
    max_length: int | None = opt(None, "LM without --cache: tokens per sequence (default 512). With --cache it comes "
                                       "from the cache.", min=2)
    chat_template: str | None = opt(None, "LM chat rows without --cache: a Jinja chat template FILE instead of the "
                                          "tokenizer's own. With --cache the cache's is used.")
    trust_remote_code: bool = opt(False, "LM: let a Hugging Face model or tokenizer directory run its own Python "
                                         "code (the auto_map of its config.json / tokenizer_config.json: "
                                         "modeling_*.py, tokenization_*.py ...). Without it such a directory is "
                                         "refused (exit 2); kdcli never asks on stdin.")

    def __post_init__(self) -> None:
        self.cache = cache_list(self.cache)


@dataclass
class EvalConfig:
    """Measure one or more models on DATA, against the labels and (with --cache) against the teacher."""

    model: list = opt(help="A kdcli run dir (or a built-in/file.py MODEL with --model-weights). Repeat to compare.",
                      repeat=True)
    data: str = opt(help="Evaluation DATA, e.g. mnist:test.")
    cache: list = opt([], "Teacher cache over the same DATA: adds agreement and KL to the teacher. Repeat to "
                          "measure against the fused teacher (see --combine).", repeat=True)
    cache_weights: str | None = opt(None, "With several --cache: their weights, comma-separated in the same order "
                                          "(normalised to sum to 1). Default: equal.")
    combine: str = opt("mean", "With several --cache: mean (mixture of the teachers' probabilities) or geometric "
                               "(weighted mean of log-probabilities, renormalised).", choices=("mean", "geometric"))
    temperature: float = opt(1.0, "Temperature for the KL to the teacher.", min=TEMPERATURE_MIN, max=TEMPERATURE_MAX)
    approximate_temperature: bool = opt(False, "Allow a topk/sample/priority cache at a temperature it does not "
                                               "store (see cache-teacher --temperatures): topk then assumes the "
                                               "tail spread like the student's, sample/priority self-normalise the "
                                               "draws -- biased, printed in the loss line.")
    batch_size: int = opt(1024, "Rows per forward pass.", min=1)
    device: str = opt("auto", "auto uses CUDA when available.", choices=DEVICES)
    json: bool = opt(False, "Print exactly one JSON document on stdout instead of a table.")
    min_accuracy: float | None = opt(None, "Exit 1 unless every model's accuracy is >= X (a fraction).",
                                     min=0.0, max=1.0)
    min_agreement: float | None = opt(None, "Exit 1 unless every model's top-1 agreement with the teacher is "
                                            ">= X (needs --cache).", min=0.0, max=1.0)
    plot: str | None = opt(None, "Write a PNG: test error per epoch (from each run's metrics) and a reliability "
                                 "diagram (needs matplotlib).")
    class_bias: dict = opt({}, "Add VALUE to class CLASS's logit before measuring, CLASS=VALUE (repeatable), e.g. "
                               "3=3.5; CLASS=fit chooses the value with the fewest errors on --bias-data (Hinton et "
                               "al. 2015: a student distilled without a class learns too low a bias for it). The "
                               "report shows errors before and after.", repeat=True)
    bias_data: str | None = opt(None, "Labelled DATA on which CLASS=fit biases are chosen, e.g. a held-out slice. "
                                      "Default: the evaluation --data itself (what the paper did; optimistic).")
    tokenizer: str | None = opt(None, "LM DATA: tokenizer; default: the cache's, else the first model's.")
    max_length: int | None = opt(None, "LM: tokens per sequence; default: the cache's, else the first model's "
                                       "training setting.", min=2)
    chat_template: str | None = opt(None, "LM chat rows without --cache: a Jinja chat template FILE; default: the "
                                          "first model's recorded one, else its tokenizer's own.")
    trust_remote_code: bool = opt(False, "LM: let a Hugging Face model or tokenizer directory run its own Python "
                                         "code (the auto_map of its config.json / tokenizer_config.json: "
                                         "modeling_*.py, tokenization_*.py ...). Without it such a directory is "
                                         "refused (exit 2); kdcli never asks on stdin.")
    latency_repeats: int = opt(1, "Latency per row at batch 1 and at --batch-size (LM: the eval batch, at most 16 "
                                  "sequences): the median of at least N timed forward passes per batch size, after "
                                  "a warm-up (the eval pass's own full batches count, so a large eval set costs no "
                                  "extra pass). More repeats steady the numbers; 0 skips the measurement.", min=0)

    def __post_init__(self) -> None:
        self.cache = cache_list(self.cache)


@dataclass
class CompressConfig:
    """Shrink a trained run: magnitude pruning and/or int8 Linear weights; the result is a run dir for eval and
    train-student --student (fine-tuning)."""

    model: str = opt(help="The kdcli run dir to compress (a classification or language-model student).")
    out: str = opt(help="Run dir to write (new or empty; --overwrite replaces an earlier compress output).")
    quantize: str | None = opt(None, "int8: every nn.Linear weight as int8 with one float32 scale per output "
                                     "channel (symmetric; biases, embeddings, norms and convolutions stay float), "
                                     "computed as a float product: the same logits on every device. int8-dynamic: "
                                     "the same weights, and at inference each input row quantised to int8 too, "
                                     "multiplied in integers: faster on CPU, slightly less exact. Weights tied to "
                                     "another tensor (an LM head tied to its embedding) are left alone.",
                               choices=("int8", "int8-dynamic"))
    prune: float | None = opt(None, "Magnitude pruning: zero this FRACTION of each nn.Linear weight (smallest |w|; "
                                    "with --structured, of each hidden layer's output units). Applied before "
                                    "--quantize.", gt=0.0, lt=1.0)
    structured: bool = opt(False, "With --prune: remove whole output units (rows, smallest L2 norm) of every Linear "
                                  "followed, through element-wise activations/dropout, by another Linear in an "
                                  "nn.Sequential, and the matching inputs of that next Linear: the model really "
                                  "shrinks.")
    overwrite: bool = opt(False, "Replace an existing --out that an earlier kdcli compress wrote (built beside it "
                                 "and swapped in when done; nothing else is ever replaced).")
    json: bool = opt(False, "Print exactly one JSON document on stdout instead of a table.")


def fields_of(cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


_ANNOTATION_NAMES = {"dict": dict, "list": list, "str": str, "int": int, "float": float, "bool": bool,
                     "None": type(None)}


def _parse_annotation(text: str) -> Any:
    """``"int | None"`` -> ``int | None`` by table lookup (never ``eval``): config fields use these names only."""
    parts = []
    for name in text.split("|"):
        name = name.strip().split("[", 1)[0]  # list[str] -> list
        if name not in _ANNOTATION_NAMES:
            raise TypeError(f"config field annotation {text!r}: {name!r} is not one of {sorted(_ANNOTATION_NAMES)}")
        parts.append(_ANNOTATION_NAMES[name])
    return parts[0] if len(parts) == 1 else typing.Union[tuple(parts)]


def _base_type(tp: Any) -> tuple[type, bool]:
    """(underlying type, optional?) for annotations such as ``int | None``."""
    if isinstance(tp, str):
        tp = _parse_annotation(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def field_type(f: dataclasses.Field) -> tuple[type, bool]:
    return _base_type(f.type)


def _type_name(tp: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping",
            list: "a list"}[tp]


def _coerce(key: str, value: Any, f: dataclasses.Field) -> Any:
    tp, optional = field_type(f)
    if value is None:
        if optional:
            return None
        if tp is list and f.default_factory is not REQUIRED:  # type: ignore[misc]
            return []  # a repeatable option given as null: none (what a label-only run's config.yaml records)
        raise UsageError(f"config key '{key}' must be {_type_name(tp)}, got null")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"config key '{key}' must be a finite number; got {value!r}")
    if tp is list and isinstance(value, str):
        value = [value]
    ok = isinstance(value, tp) and not (tp in (int, float) and isinstance(value, bool))
    if not ok:
        raise UsageError(f"config key '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is list and not all(isinstance(v, str) for v in value):
        raise UsageError(f"config key '{key}' must be a list of strings")
    if tp is dict and not all(isinstance(k, str) for k in value):
        raise UsageError(f"config key '{key}' must be a mapping with string keys")
    if tp is dict:
        bad = nonfinite_value(value)
        if bad is not None:
            raise UsageError(f"config key '{key}': {bad[0]} is {bad[1]!r}; model and adapter arguments must be finite "
                             "numbers")
    m = f.metadata
    if m.get("choices") and value not in m["choices"]:
        raise UsageError(f"config key '{key}' must be one of {', '.join(m['choices'])}; got {value!r}")
    bounds = [("min", lambda v, b: v >= b, ">="), ("max", lambda v, b: v <= b, "<="),
              ("gt", lambda v, b: v > b, ">"), ("lt", lambda v, b: v < b, "<")]
    for name, test, sym in bounds:
        b = m.get(name)
        if b is not None and not test(value, b):
            raise UsageError(f"config key '{key}' must be {sym} {b:g}; got {value!r}")
    return value


def nonfinite_value(value: Any, where: str = "") -> tuple[str, Any] | None:
    """(path, value) of the first NaN/inf number in a (nested) YAML value: a float, or a string that reads as one
    ("nan", "inf", "-Infinity"), which a library would turn into a float (``--peft-arg lora_alpha=nan``)."""
    if isinstance(value, dict):
        for k, v in value.items():
            found = nonfinite_value(v, f"{where}.{k}" if where else str(k))
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = nonfinite_value(v, f"{where}[{i}]")
            if found:
                return found
    elif isinstance(value, float) and not math.isfinite(value):
        return where, value
    elif isinstance(value, str) and value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        return where, value
    return None


class _OneValuePerKey(yaml.SafeLoader):
    """``yaml.SafeLoader`` (never executes code) that refuses a key given twice in one mapping, which PyYAML would
    silently resolve to the last -- the YAML side of the CLI's no-last-wins rule (kdcli/cli.py)."""

    def construct_mapping(self, node, deep=False):
        first: dict = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else []:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: explicit keys override merged ones
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                again = key in first
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if again:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first at line {first[key] + 1}); give it once",
                    key_node.start_mark)
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    """Parse a YAML mapping with ``yaml.SafeLoader`` (never executes code); a key given twice is an error."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise UsageError(f"config file not found: {p}") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read config file {p}: {e.__class__.__name__}") from None
    try:
        data = yaml.load(text, Loader=_OneValuePerKey)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        loc = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise UsageError(f"malformed YAML in {p}{loc}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {p} must hold a mapping of option: value, got {type(data).__name__}")
    return data


def parse_kv(items: list[str], key: str) -> dict:
    """``["hidden=[800,800]", "dropout=0.5"]`` -> ``{"hidden": [800, 800], "dropout": 0.5}`` (YAML values)."""
    out: dict = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--{key.replace('_', '-')} expects KEY=VALUE, got {item!r}")
        if name.strip() in out:  # --student-arg hidden=[8] --student-arg hidden=[16]: no silent last-wins
            raise UsageError(f"--{key.replace('_', '-')} {name.strip()}=... given twice; give each KEY once")
        try:
            out[name.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise UsageError(f"--{key.replace('_', '-')} {item!r}: the value is not valid YAML") from None
    return out


def parse_temperatures(value: Any, key: str = "temperatures") -> tuple[float, ...]:
    """``"1,2,4"``, ``4``, ``[1, 2, 4]`` or ``["1", "2"]`` -> sorted distinct temperatures, 1 always included (a
    sparse cache is exact at T = 1 for free). A value that is not a positive, finite number is a UsageError naming
    ``key``. For ``cache-teacher --temperatures`` (and ``--sampler-temperatures``)."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    out = {1.0}
    for item in items:
        try:
            t = float(item.strip() if isinstance(item, str) else item)
        except (TypeError, ValueError):
            t = float("nan")
        if isinstance(item, bool) or not (t > 0 and t != float("inf")):
            raise UsageError(f"config key '{key}' must list positive temperatures, e.g. 1,2,4; got {item!r}")
        if not TEMPERATURE_MIN <= t <= TEMPERATURE_MAX:
            raise UsageError(f"config key '{key}': temperature {t:g} is outside [{TEMPERATURE_MIN:g}, "
                             f"{TEMPERATURE_MAX:g}], where the stored statistics stay finite; e.g. 1,2,4")
        out.add(t)
    return tuple(sorted(out))


def resolve(cls: type, config_path: str | Path | None = None, overrides: dict | None = None):
    """Build a validated ``cls`` from defaults < YAML file < flag overrides (``None`` means "not given")."""
    known = {f.name: f for f in fields_of(cls)}
    merged: dict[str, Any] = {}
    if config_path is not None:
        for key, value in read_yaml(config_path).items():
            if key not in known:
                close = difflib.get_close_matches(str(key), list(known), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise UsageError(f"unknown config key '{key}' in {config_path}{hint}")
            merged[key] = value
    for key, value in (overrides or {}).items():
        if key not in known:
            raise UsageError(f"unknown option '{key}'")
        if value is None:
            continue
        if known[key].type in ("dict", dict) and isinstance(merged.get(key), dict):
            value = {**merged[key], **value}  # flags add to / override the YAML mapping key by key
        merged[key] = value
    kwargs: dict[str, Any] = {}
    for name, f in known.items():
        if name in merged:
            kwargs[name] = _coerce(name, merged[name], f)
        elif f.default is REQUIRED and f.default_factory is REQUIRED:  # type: ignore[misc]
            raise UsageError(f"missing required option --{name.replace('_', '-')} (or '{name}:' in --config)")
    cfg = cls(**kwargs)
    cfg.given_keys = frozenset(merged)  # not a field: which options the user set (flags or YAML), see given()
    return cfg


def given(cfg: Any) -> frozenset[str]:
    """The options of ``cfg`` the user set on the command line or in --config (a config built in Python: none), so
    that an option whose value would be ignored can be refused instead of silently dropped."""
    return getattr(cfg, "given_keys", frozenset())


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def write_yaml(data: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
