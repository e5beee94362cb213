"""The commands' configs, composed from shared parts: one dataclass per command is the schema, the defaults and the
help text at once.

Every field is a flag (``batch_size`` <-> ``--batch-size``) and a YAML key of the same name. A field declares the
``--help`` panel it is listed in and the tasks that use it (:func:`~kdcli.config.base.opt`); what two commands share
is declared once, in a part (:class:`Placement`, :class:`RemoteCode`, :class:`FusedTeacher`, :class:`TextReading`)
the commands inherit. The dataclasses are keyword-only, so parts compose in any order.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdcli.cache.modes import mode_names
from kdcli.config.base import CLASSIFICATION, DEVICES, LANGUAGE_MODEL, TEMPERATURE_MAX, TEMPERATURE_MIN, cache_list, opt
from kdcli.config.generation import Generation

LM = (LANGUAGE_MODEL,)
CLS = (CLASSIFICATION,)


# -- shared parts ----------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Placement:
    device: str = opt("auto", "auto uses CUDA when available.", choices=DEVICES, panel="Output")


@dataclass(kw_only=True)
class RemoteCode:
    trust_remote_code: bool = opt(
        False,
        "Let a Hugging Face model or tokenizer directory run its own Python code (the "
        "auto_map of its config.json / tokenizer_config.json: modeling_*.py, "
        "tokenization_*.py ...). Without it such a directory is refused (exit 2); "
        "kdcli never asks on stdin.",
        panel="Language models",
        tasks=LM,
    )


@dataclass(kw_only=True)
class FusedTeacher:
    """Several --cache values as one teacher, and a sparse cache at a temperature it does not store."""

    cache_weights: str | None = opt(
        None,
        "With several --cache: their weights, comma-separated in the same order "
        "(e.g. 0.5,0.3,0.2; >= 0, normalised to sum to 1). Default: equal.",
        panel="Cache",
    )
    combine: str = opt(
        "mean",
        "With several --cache: mean fuses the teachers' probabilities (a mixture, Hinton et "
        "al. 2015's ensemble), geometric their log-probabilities (weighted, renormalised).",
        choices=("mean", "geometric"),
        panel="Cache",
    )
    approximate_temperature: bool = opt(
        False,
        "Allow a topk/sample/priority cache at a temperature it does not "
        "store (see cache-teacher --temperatures): topk then spreads the "
        "teacher's tail mass evenly over the other classes, sample/priority "
        "self-normalise the draws -- biased, printed in the loss line.",
        panel="Cache",
    )

    def __post_init__(self) -> None:
        self.cache = cache_list(self.cache)


@dataclass(kw_only=True)
class TextReading:
    """How train-student and eval read LM DATA when no cache says it."""

    tokenizer: str | None = opt(
        None,
        "LM DATA: the tokenizer (a HF dir, .gguf file or tokenizer.json). Default: the "
        "cache's, else the (first) model's own.",
        panel="Language models",
        tasks=LM,
    )
    max_length: int | None = opt(
        None,
        "LM: tokens per sequence. Default: the cache's, else the model's recorded setting, else 512.",
        min=2,
        panel="Language models",
        tasks=LM,
    )
    chat_template: str | None = opt(
        None,
        "LM chat rows: a Jinja chat template FILE instead of the tokenizer's own. "
        "Default: the cache's, else the model's recorded one.",
        panel="Language models",
        tasks=LM,
    )


CROSS_TOKENIZER_METHODS = ("aligned", "uld", "hybrid")
VOCAB_MAPS = ("strict", "prefix")


@dataclass(kw_only=True)
class CrossTokenizer:
    """A student (or eval model) whose tokenizer differs from the cache's: docs/lm.md, "Any teacher, any student"."""

    cross_tokenizer: str | None = opt(
        None,
        "LM: distil from a cache made with another tokenizer. aligned: the KL between the "
        "two next-token distributions mapped onto the token strings both vocabularies "
        "share (the rest one bucket), at the positions where both tokenizations have a "
        "boundary; uld: the sorted-probability distance (Boizard et al. 2024) at those "
        "positions; hybrid: aligned + uld inside the unmatched rest. Without it a student "
        "whose tokenizer differs from the cache's is refused.",
        choices=CROSS_TOKENIZER_METHODS,
        panel="Language models",
        tasks=LM,
    )
    vocab_map: str = opt(
        "strict",
        "With --cross-tokenizer: strict matches equal token strings only; prefix also puts "
        "a token the other vocabulary cannot spell into the bucket of its longest shared "
        "prefix (a much smaller student vocabulary).",
        choices=VOCAB_MAPS,
        panel="Language models",
        tasks=LM,
    )
    uld_weight: float = opt(
        1.0,
        "With --cross-tokenizer hybrid: the weight of the ULD term inside the unmatched rest.",
        min=0.0,
        panel="Language models",
        tasks=LM,
    )


# -- the commands ----------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class CacheConfig(Generation, Placement, RemoteCode):
    """Run the teacher once over DATA and write its log-probabilities to a cache directory."""

    data: str = opt(
        help="DATA: mnist:train, file.npz, file.h5, or path/to/file.py:factory; for a token-level LM "
        "cache file.jsonl, file.parquet, a directory of .parquet files or a datasets.save_to_disk "
        "directory, with text, prompt/response or chat (messages / ShareGPT conversations) rows; "
        "slice with [a:b].",
        panel="Data",
    )
    teacher: str = opt(
        help="Teacher MODEL: a kdcli run dir, a built-in name (mlp, cnn), or path/to/file.py:factory; "
        "for text DATA a Hugging Face dir or .gguf file (causal LM).",
        panel="Teacher",
    )
    out: str = opt(help="Cache directory to write (manifest.json + shard-*.h5).", panel="Output")
    teacher_weights: str | None = opt(
        None,
        "Weights for the teacher: .safetensors, or a torch state_dict (loaded with weights_only=True).",
        panel="Teacher",
    )
    teacher_args: dict = opt(
        {},
        "Keyword arguments for the teacher factory (KEY=VALUE, values parsed as YAML).",
        repeat=True,
        panel="Teacher",
    )
    mode: str | None = opt(
        None,
        "What to store per row: full (all classes), topk (K ids + log-probs + tail "
        "log-mass), sample (ids drawn from the teacher with counts) or priority (priority "
        "sampling: --samples ids without replacement + a threshold; less variance than "
        "sample). Default: topk when --top-k is given, else full.",
        choices=mode_names(),
        panel="Cache",
    )
    top_k: int | None = opt(None, "K for --mode topk.", min=1, panel="Cache")
    samples: int = opt(
        16,
        "--mode sample: draws per row (stored as distinct ids + counts); --mode priority: ids kept per row.",
        min=1,
        max=65535,
        panel="Cache",
    )
    temperatures: str = opt(
        "1,2,4",
        "Temperatures at which a topk/sample/priority cache is exact (topk: the true "
        "tempered tail mass) or unbiased (sample/priority: log Z_T), comma-separated; "
        "1 is always included. train-student/eval at another T refuse unless "
        "--approximate-temperature. Full caches are exact at every T.",
        panel="Cache",
    )
    batch_size: int = opt(512, "Rows per teacher forward pass.", min=1, panel="Teacher")
    shard_size: int = opt(16384, "Rows per HDF5 shard.", min=1, panel="Cache")
    compression: str = opt(
        "auto",
        "Lossless shard compression (HDF5 filters: readers decompress transparently). "
        "auto: gzip for token-level (LM) topk/sample/priority caches (~25-40% "
        "smaller), none otherwise (full log-probs decompress ~14x slower than they read; "
        "classification caches are small); gzip: level 4 + byte shuffle, smallest; lzf: "
        "+ shuffle, faster, larger, needs h5py to read; none: uncompressed, fastest "
        "reads. An existing cache keeps its own (--overwrite re-writes it).",
        choices=("auto", "gzip", "lzf", "none"),
        panel="Cache",
    )
    views: int = opt(
        1,
        "Augmented views per sample, each cached with its augmentation parameters (view 0 is the plain input).",
        min=1,
        panel="Data",
        tasks=CLS,
    )
    augment: str | None = opt(
        None,
        "Augmentation for views >= 1, e.g. shift:2 (random pixel shift in [-2, 2] on each axis).",
        panel="Data",
        tasks=CLS,
    )
    dtype: str = opt(
        "fp32",
        "Teacher precision: a Hugging Face teacher (dir or .gguf) is loaded with its weights "
        "in this dtype (bf16/fp16 halve its memory); other teachers run their forward pass "
        "under autocast. Log-softmax is always computed in fp32.",
        choices=("fp32", "bf16", "fp16"),
        panel="Teacher",
    )
    teacher_device_map: str = opt(
        "none",
        "LM: auto loads a Hugging Face teacher with accelerate's "
        'device_map="auto": spread over every visible GPU, then CPU memory, for '
        "teachers larger than one device (needs accelerate: pip install "
        "'kdcli[hf]'); --device is then where log-softmax and the reduction run. "
        "none: the whole teacher on --device.",
        choices=("none", "auto"),
        panel="Teacher",
        tasks=LM,
    )
    seed: int = opt(0, "Seed for augmentation parameters and sampling.", panel="Cache")
    overwrite: bool = opt(
        False,
        "Replace an existing cache made with different settings (built beside it and "
        "swapped in when complete; only a kdcli cache is ever replaced).",
        panel="Output",
    )
    tokenizer: str | None = opt(
        None,
        "LM DATA: tokenizer, a HF dir, .gguf file or tokenizer.json. Default: the teacher's own.",
        panel="Language models",
        tasks=LM,
    )
    max_length: int = opt(
        512,
        "LM: tokens per sequence (text rows are packed into chunks of this length; "
        "prompt/response and chat rows are one sequence each, truncated to it).",
        min=2,
        panel="Language models",
        tasks=LM,
    )
    no_pack: bool = opt(
        False,
        "LM: one sequence per text row (truncated to --max-length) instead of packing rows.",
        panel="Language models",
        tasks=LM,
    )
    prompt_template: str = opt(
        "{prompt}",
        "LM prompt/response rows: what the student reads before the response; "
        "{prompt} is the row's prompt. @FILE reads it from a file.",
        panel="Language models",
        tasks=LM,
    )
    teacher_prompt: str | None = opt(
        None,
        "LM prompt distillation: context only the teacher reads (@FILE reads a "
        "file); the student never sees it and the cached positions stay the "
        "student's. Plain TEXT is a teacher-only system prompt: for chat rows a "
        "system message before the row's own (joined into one, TEXT first; it "
        "replaces a template's default system prompt), for prompt/response rows "
        "TEXT and a blank line before the prompt. A TEMPLATE with {prompt} (the "
        "row's prompt; prompt/response rows) replaces the prompt.",
        panel="Language models",
        tasks=LM,
    )
    prompt_loss: bool = opt(
        False,
        "LM prompt/response rows: also cache (and train on) the prompt tokens, not only "
        "the response; chat rows: every token, not only the assistant turns.",
        panel="Language models",
        tasks=LM,
    )
    chat_template: str | None = opt(
        None,
        "LM chat rows: a Jinja chat template FILE that renders them instead of the "
        "tokenizer's own (needed when it has none); its text is recorded in the "
        "cache, so train-student and eval with --cache render the same tokens.",
        panel="Language models",
        tasks=LM,
    )


@dataclass(kw_only=True)
class TrainConfig(FusedTeacher, TextReading, CrossTokenizer, Placement, RemoteCode):
    """Train a student from a teacher cache (distillation) or on labels alone (baseline / teacher)."""

    data: str = opt(help="Training DATA (the same spec the cache was built from).", panel="Data")
    student: str = opt(
        help="Student MODEL: a built-in name (mlp, cnn; transformer, llama for LMs), "
        "path/to/file.py:factory, a Hugging Face dir or .gguf file (LMs), or a run dir to start "
        "from.",
        panel="Student",
    )
    out: str = opt(help="Run directory to write (weights, config, metrics, checkpoints).", panel="Output")
    cache: list = opt(
        [],
        "Teacher cache directory. Without it the student trains on labels alone. Repeat to fuse "
        "several teachers over the same data (full caches: exact at every T; topk, sample or "
        "priority caches: --combine mean at T = 1; see docs/fusion.md).",
        repeat=True,
        panel="Teacher",
    )
    temperature: float = opt(
        4.0, "Softmax temperature T for the soft term.", min=TEMPERATURE_MIN, max=TEMPERATURE_MAX, panel="Teacher"
    )
    alpha: float | None = opt(
        None,
        "Weight of the soft term: loss = alpha*T^2*KL(teacher_T || student_T) + "
        "(1-alpha)*CE(labels). Default 0.9 with --cache, 0 without.",
        min=0.0,
        max=1.0,
        panel="Teacher",
    )
    epochs: int = opt(10, "Passes over the training rows.", min=1, panel="Optimisation")
    lr: float = opt(1e-3, "Peak learning rate.", gt=0.0, panel="Optimisation")
    batch_size: int = opt(
        128,
        "Rows per optimizer step; per process under torchrun (global batch = batch size x processes).",
        min=1,
        panel="Optimisation",
    )
    seed: int = opt(0, "Seed for initialisation, data order and dropout.", panel="Optimisation")
    student_args: dict = opt(
        {},
        "Keyword arguments for the student factory (KEY=VALUE, values parsed as YAML).",
        repeat=True,
        panel="Student",
    )
    optimizer: str = opt("adamw", "Optimizer.", choices=("adamw", "adam", "sgd"), panel="Optimisation")
    momentum: float = opt(0.9, "Momentum for sgd.", min=0.0, lt=1.0, panel="Optimisation")
    weight_decay: float = opt(0.0, "Weight decay (decoupled for adamw).", min=0.0, panel="Optimisation")
    schedule: str = opt(
        "constant",
        "Learning-rate schedule over all steps (after warmup).",
        choices=("constant", "cosine", "linear"),
        panel="Optimisation",
    )
    warmup_steps: int = opt(0, "Linear warmup steps.", min=0, panel="Optimisation")
    divergence: str = opt(
        "forward",
        "Soft-term divergence: forward KL(teacher||student), reverse KL(student||"
        "teacher), or jsd (generalised Jensen-Shannon, skew --jsd-beta).",
        choices=("forward", "reverse", "jsd"),
        panel="Optimisation",
    )
    jsd_beta: float = opt(
        0.5,
        "JSD skew beta: beta*KL(p||m) + (1-beta)*KL(q||m), m = beta*p + (1-beta)*q (p teacher, q student).",
        gt=0.0,
        lt=1.0,
        panel="Optimisation",
    )
    precision: str = opt(
        "fp32",
        "fp32: float32 throughout (exact). bf16: mixed precision: matrix products in "
        "bfloat16 (a language-model student's output layer included), weights, optimizer "
        "state, softmax and loss in float32; faster on GPUs and on CPUs with AVX512-BF16 "
        "or AMX, slower where bfloat16 is emulated.",
        choices=("fp32", "bf16"),
        panel="Optimisation",
    )
    max_norm: float | None = opt(
        None,
        "Max-norm constraint on each unit's incoming weights (Hinton et al.).",
        gt=0.0,
        panel="Optimisation",
        tasks=CLS,
    )
    augment: str | None = opt(
        None,
        "On-the-fly augmentation for label-only training, e.g. shift:2. With a cache "
        "the student sees exactly the cached views instead.",
        panel="Data",
        tasks=CLS,
    )
    eval_data: str | None = opt(
        None,
        "DATA to measure after every epoch (accuracy, NLL, errors in metrics.jsonl), "
        "e.g. mnist:test. Never trained on.",
        panel="Data",
    )
    val_fraction: float = opt(
        0.0, "Fraction of the data held out for validation (chosen by seed).", min=0.0, lt=1.0, panel="Data"
    )
    peft: str | None = opt(
        None,
        "Train a parameter-efficient adapter of a pretrained Hugging Face student (needs the "
        "peft extra) instead of all its weights. lora: low-rank updates of its linear "
        "layers; prompt: a learned prompt embedding (soft prompt) before every sequence.",
        choices=("lora", "prompt"),
        panel="Language models",
        tasks=LM,
    )
    peft_args: dict = opt(
        {},
        "Adapter settings (KEY=VALUE, values parsed as YAML): lora: r (8), lora_alpha (8), "
        "lora_dropout, target_modules=[q_proj,v_proj]; prompt: num_virtual_tokens (16), "
        "init_text=TEXT (start from a hard prompt's embeddings).",
        repeat=True,
        panel="Language models",
        tasks=LM,
    )
    peft_save: str | None = opt(
        None,
        "What a --peft run dir holds: merged (LoRA default: the adapted model, "
        "loadable without peft) or adapter (the adapter alone, naming its base; the "
        "only choice for prompt tuning).",
        choices=("merged", "adapter"),
        panel="Language models",
        tasks=LM,
    )
    gradient_checkpointing: bool = opt(
        False,
        "Keep only each transformer layer's input during the forward pass and "
        "recompute the rest in the backward pass (Hugging Face students: their "
        "own activation checkpointing; the built-in transformer: "
        "torch.utils.checkpoint per block). Less activation memory, ~1 extra "
        "forward pass of time, the same gradients.",
        panel="Language models",
        tasks=LM,
    )
    fsdp: bool = opt(
        False,
        "Under torchrun: shard the student's weights, gradients and optimizer state over the "
        "processes (PyTorch FSDP2, one unit per transformer layer) instead of replicating them "
        "(DDP), for students too large for one device. Checkpoints and the run dir hold the "
        "whole model.",
        panel="Optimisation",
    )
    num_workers: int = opt(
        0,
        "DataLoader worker processes reading the cache (persistent; per process under "
        "torchrun). 0: read in the training process.",
        min=0,
        panel="Cache",
    )
    block_rows: int = opt(
        0,
        "Cache rows per contiguous read (block); the training order shuffles blocks, then rows "
        "within groups of blocks. 0: auto (about 512 KiB a block, so it depends on the cache "
        "mode). Give the same N to caches of different modes to train on the same batches.",
        min=0,
        panel="Cache",
    )
    checkpoint_every: int = opt(
        0, "Also checkpoint every N optimizer steps (0: at the end of each epoch only).", min=0, panel="Output"
    )
    resume: bool = opt(False, "Continue from the checkpoint in --out.", panel="Output")
    overwrite: bool = opt(
        False,
        "Replace an existing finished run in --out (built beside it and swapped in when "
        "the new run has finished; only a kdcli run dir is ever replaced).",
        panel="Output",
    )


@dataclass(kw_only=True)
class EvalConfig(FusedTeacher, TextReading, CrossTokenizer, Placement, RemoteCode):
    """Measure one or more models on DATA, against the labels and (with --cache) against the teacher."""

    data: str = opt(help="Evaluation DATA, e.g. mnist:test.", panel="Data")
    model: list = opt(
        help="A kdcli run dir; for LMs also a Hugging Face dir or .gguf file; or MODEL@WEIGHTS (a "
        "built-in or file.py:factory MODEL with a weights file). Repeat to compare.",
        repeat=True,
        panel="Student",
    )
    cache: list = opt(
        [],
        "Teacher cache over the same DATA: adds agreement and KL to the teacher. Repeat to "
        "measure against the fused teacher (see --combine).",
        repeat=True,
        panel="Teacher",
    )
    temperature: float = opt(
        1.0, "Temperature for the KL to the teacher.", min=TEMPERATURE_MIN, max=TEMPERATURE_MAX, panel="Teacher"
    )
    batch_size: int = opt(1024, "Rows per forward pass.", min=1, panel="Student")
    json: bool = opt(False, "Print exactly one JSON document on stdout instead of a table.", panel="Output")
    min_accuracy: float | None = opt(
        None, "Exit 1 unless every model's accuracy is >= X (a fraction).", min=0.0, max=1.0, panel="Output"
    )
    min_agreement: float | None = opt(
        None,
        "Exit 1 unless every model's top-1 agreement with the teacher is >= X (needs --cache).",
        min=0.0,
        max=1.0,
        panel="Output",
    )
    plot: str | None = opt(
        None,
        "Write a PNG: test error per epoch (from each run's metrics) and a reliability diagram (needs matplotlib).",
        panel="Output",
        tasks=CLS,
    )
    class_bias: dict = opt(
        {},
        "Add VALUE to class CLASS's logit before measuring, CLASS=VALUE (repeatable), e.g. "
        "3=3.5; CLASS=fit chooses the value with the fewest errors on --bias-data (Hinton et "
        "al. 2015: a student distilled without a class learns too low a bias for it). The "
        "report shows errors before and after.",
        repeat=True,
        panel="Student",
        tasks=CLS,
    )
    bias_data: str | None = opt(
        None,
        "Labelled DATA on which CLASS=fit biases are chosen, e.g. a held-out slice. "
        "Default: the evaluation --data itself (what the paper did; optimistic).",
        panel="Data",
        tasks=CLS,
    )
    latency_repeats: int = opt(
        5,
        "Latency per row at batch 1 (one thread) and at --batch-size (LM: the eval batch, at "
        "most 16 sequences; --threads threads): the median and spread of at least N timed "
        "forward passes per batch size, after a warm-up (the eval pass's own full batches "
        "count, so a large eval set costs no extra pass). 0 skips the measurement.",
        min=0,
        panel="Student",
    )
    threads: int | None = opt(
        None,
        "torch intra-op threads for the eval passes and the batch --batch-size latency "
        "(batch 1 is always timed on one). Default: torch's own (one per core).",
        min=1,
        panel="Student",
    )


@dataclass(kw_only=True)
class CompressConfig:
    """Shrink a trained run: magnitude pruning and/or int8 Linear weights; the result is a run dir for eval and
    train-student --student (fine-tuning)."""

    model: str = opt(
        help="The kdcli run dir to compress (a classification or language-model student).", panel="Student"
    )
    out: str = opt(
        help="Run dir to write (new or empty; --overwrite replaces an earlier compress output).", panel="Output"
    )
    quantize: str | None = opt(
        None,
        "int8: every nn.Linear weight as int8 with one float32 scale per output "
        "channel (symmetric; biases, embeddings, norms and convolutions stay float), "
        "computed as a float product: the same logits on every device. int8-dynamic: "
        "the same weights, and at inference each input row quantised to int8 too, "
        "multiplied in integers: faster on CPU, slightly less exact. Weights tied to "
        "another tensor (an LM head tied to its embedding) are left alone.",
        choices=("int8", "int8-dynamic"),
        panel="Student",
    )
    prune: float | None = opt(
        None,
        "Magnitude pruning: zero this FRACTION of each nn.Linear weight (smallest |w|; "
        "with --structured, of each hidden layer's output units). Applied before "
        "--quantize.",
        gt=0.0,
        lt=1.0,
        panel="Student",
    )
    structured: bool = opt(
        False,
        "With --prune: remove whole output units (rows, smallest L2 norm) of every Linear "
        "followed, through element-wise activations/dropout, by another Linear in an "
        "nn.Sequential, and the matching inputs of that next Linear: the model really "
        "shrinks.",
        panel="Student",
    )
    overwrite: bool = opt(
        False,
        "Replace an existing --out that an earlier kdcli compress wrote (built beside it "
        "and swapped in when done; nothing else is ever replaced).",
        panel="Output",
    )
    json: bool = opt(False, "Print exactly one JSON document on stdout instead of a table.", panel="Output")
