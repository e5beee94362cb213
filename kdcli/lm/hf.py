"""Causal language models for kdcli: Hugging Face (local dir or GGUF file), a built-in transformer, plugins.

LM MODEL specs:

- ``path/to/hf_dir`` (with ``config.json``): ``AutoModelForCausalLM.from_pretrained(dir)``, offline
- ``path/to/model.gguf``: ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`` (de-quantized to fp32, or
  to the ``dtype`` asked for)
- ``transformer``: the built-in decoder-only student (:class:`TinyTransformer`); its vocabulary is the teacher's
- ``llama``: a freshly initialised Hugging Face ``LlamaForCausalLM`` sized by ``--student-arg`` (:func:`llama_student`):
  a built-in student whose run dir transformers, vLLM and llama.cpp's converter read as they are
- ``path/to/file.py:factory``: a callable returning an ``nn.Module`` mapping ``(b, L)`` ids to ``(b, L, V)`` logits
  (it receives ``vocab_size`` when its signature accepts it)
- a kdcli LM run dir (``model.json`` with ``"kind": "lm"``): rebuilt with its tokenizer, no other flags

Every model is called as ``lm_logits(model, ids, mask) -> (b, L, V)``; ``lm_hidden`` + ``fused_head_weight`` give the
final hidden states and the output weight where logits are exactly ``hidden @ weight.T`` (the fused loss).

A run dir of a Hugging Face student (``layout: hf`` in model.json) IS a Hugging Face model directory:
``config.json``, ``model.safetensors`` (sharded past :data:`HF_SHARD_SIZE`), ``generation_config.json`` and the
tokenizer files; a peft adapter run (``layout: adapter``) holds ``adapter_config.json`` + ``adapter_model.safetensors``
and names its base. Run dirs of earlier kdcli (``model.safetensors`` + ``tokenizer/``) still load.

Big teachers: a Hugging Face model loads with its weights in ``dtype`` (``bf16``/``fp16`` halve its memory) and,
with ``device_map="auto"``, spread by accelerate over the visible GPUs and CPU memory; such a model is placed
already (never ``.to(device)``) and reads its inputs on :func:`input_device`.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kdcli.infra.errors import UsageError
from kdcli.lm.adapters import hf_inner, is_peft_model, load_adapter, merged, prompt_inputs, save_adapter, virtual_tokens
from kdcli.lm.text import HF_HINT, TOKENIZER_DIR, check_remote_code, transformers_module
from kdcli.models.plugins import PLUGIN_COPY, call_factory, is_plugin_spec, load_factory, run_dir_plugin
from kdcli.models.quant import finish_compressed, rebuild_compressed
from kdcli.models.weights import MODEL_JSON, WEIGHTS, count_parameters, sha256_file


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(dropout)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, L, d) -> (b, L, d)
        b, L, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, L, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (b, h, L, d/h)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, L, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TinyTransformer(nn.Module):
    """A small decoder-only transformer (GPT-2 style, learned positions, tied input/output embeddings).

    Padding needs no mask: attention is causal and padding is only ever appended on the right, so real positions
    never attend to it.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        d_ff: int | None = None,
        max_length: int = 1024,
        dropout: float = 0.0,
        tie_embeddings: bool = True,
    ):
        super().__init__()
        if d_model % n_heads:
            raise UsageError(f"transformer: d_model {d_model} must be divisible by n_heads {n_heads}")
        self.max_length = max_length
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_length, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff or 4 * d_model, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.tok.weight
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    gradient_checkpointing = False  # set by gradient_checkpointing_enable(): recompute each block in backward

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """As Hugging Face models do: keep only each block's input, recompute the block in the backward pass
        (torch.utils.checkpoint, non-reentrant; dropout draws are replayed exactly)."""
        self.gradient_checkpointing = True

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, hidden_only: bool = False
    ) -> torch.Tensor:
        """(b, L, V) logits; ``hidden_only``: the (b, L, d) final hidden states (the fused loss applies the head)."""
        h = self.hidden(input_ids)
        return h if hidden_only else self.head(h)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(b, L) ids -> (b, L, d) final hidden states: the logits are ``hidden @ head.weight.T``."""
        b, L = input_ids.shape  # (b, L) int64
        if L > self.max_length:
            raise UsageError(
                f"sequence of {L} tokens is longer than the transformer's max_length "
                f"{self.max_length}; pass --student-arg max_length={L} or a smaller --max-length"
            )
        x = self.tok(input_ids) + self.pos(torch.arange(L, device=input_ids.device))  # (b, L, d)
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if ckpt else blk(x)
        return self.ln_f(x)


def llama_student(
    vocab_size: int,
    hidden_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = True,
    **extra,
) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` (``--student llama``): small defaults, any other ``LlamaConfig``
    field as ``--student-arg KEY=VALUE`` (rope_theta, rms_norm_eps, pad_token_id, ...)."""
    tf = transformers_module()
    if hidden_size % num_attention_heads:
        raise UsageError(
            f"llama: hidden_size {hidden_size} must be divisible by num_attention_heads {num_attention_heads}"
        )
    try:
        cfg = tf.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads or num_attention_heads,
            intermediate_size=intermediate_size or 4 * hidden_size,
            max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=tie_word_embeddings,
            **extra,
        )
        return tf.LlamaForCausalLM(cfg)
    except (TypeError, ValueError) as e:
        raise UsageError(f"bad arguments for built-in model 'llama': {e}") from None


BUILTIN_LMS = {"transformer": TinyTransformer, "llama": llama_student}
HF_BUILTINS = ("llama",)  # built-in students that are Hugging Face models
HF_SHARD_SIZE = "5GB"  # save_pretrained's max_shard_size for HF run dirs
# model types whose logits are exactly lm_head(final hidden states) (no soft-capping, scaling or bias)
FUSABLE_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gpt2",
        "gpt_neox",
        "phi3",
        "olmo",
        "olmo2",
        "smollm3",
        "gemma",
        "starcoder2",
    }
)


@dataclass
class LMInfo:
    """How an LM was built: enough to rebuild it (model.json) and to identify it in a manifest."""

    spec: str
    kind: str  # "builtin", "hf", "plugin", "run"
    args: dict = field(default_factory=dict)
    vocab_size: int = 0
    weights_sha256: str | None = None
    num_parameters: int = 0
    hf_config: dict | None = None  # for HF models: config.to_dict(), to rebuild without the original files
    source: dict | None = None  # for kind "run": the run dir's model.json (how to rebuild it)
    compression: dict | None = None  # kdcli compress's record (kdcli/models/quant.py), carried into later runs
    load_dtype: str | None = None  # HF models: the dtype the weights were loaded in (float32, bfloat16, float16)
    device_map: dict | None = None  # HF teachers placed by accelerate: module -> device

    def identity(self) -> dict:
        out = {
            "spec": self.spec,
            "args": self.args,
            "weights_sha256": self.weights_sha256,
            "num_parameters": self.num_parameters,
            "vocab_size": self.vocab_size,
        }
        if self.load_dtype not in (None, "float32"):
            out["load_dtype"] = self.load_dtype
        if self.device_map is not None:
            out["device_map"] = self.device_map  # where it ran, not part of the cache's identity
        return out


def is_lm_run_dir(spec: str) -> bool:
    p = Path(spec) / MODEL_JSON
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("kind") == "lm"
    except (OSError, ValueError, AttributeError):
        return False


def is_hf_spec(spec: str) -> bool:
    p = Path(spec)
    return (p.is_dir() and (p / "config.json").is_file()) or (p.suffix == ".gguf")


def default_tokenizer_spec(model_spec: str) -> str | None:
    """The tokenizer that comes with a model: an HF dir, a GGUF file, or a run dir's copy."""
    if is_lm_run_dir(model_spec):
        return str(Path(model_spec))
    if is_hf_spec(model_spec):
        return model_spec
    return None


def _hf_weights_sha(p: Path) -> str | None:
    if p.is_file():
        return sha256_file(p)
    files = sorted(list(p.glob("*.safetensors")) + list(p.glob("*.bin")))
    if not files:
        return None
    if len(files) == 1:
        return sha256_file(files[0])
    import hashlib

    h = hashlib.sha256()
    for f in files:
        h.update(sha256_file(f).encode())
    return h.hexdigest()


LOAD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # cache-teacher --dtype
DEVICE_MAPS = ("none", "auto")  # cache-teacher --teacher-device-map


def _load_hf(spec: str, dtype: str = "fp32", device_map: str = "none", trust_remote_code: bool = False) -> nn.Module:
    tf = transformers_module()
    p = Path(spec)
    if not p.exists():
        raise UsageError(f"model not found: {spec}")
    check_remote_code(p, trust_remote_code)
    kw: dict[str, Any] = {"dtype": LOAD_DTYPES[dtype], "local_files_only": True, "trust_remote_code": trust_remote_code}
    if device_map != "none":
        kw["device_map"] = device_map
    try:
        if p.suffix == ".gguf":
            with _quiet_gguf():
                model = tf.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, **kw)
            _drop_dequantized_gguf_marker(model)
        else:
            model = tf.AutoModelForCausalLM.from_pretrained(str(p), **kw)
    except ImportError as e:
        raise UsageError(f"loading {spec} needs a missing package ({e})", hint=HF_HINT) from None
    except Exception as e:  # a model directory the library cannot read (bad config, unpicklable .bin, ...): input
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
        raise UsageError(f"cannot load a causal LM from {spec}: {e.__class__.__name__}: {first}") from None
    return model


def _drop_dequantized_gguf_marker(model: nn.Module) -> None:
    """A GGUF file transformers de-quantized into plain float weights (every layer a plain Linear: no GGUF kernel
    package here) still carries its GGUF quantizer, which makes ``save_pretrained`` refuse ("quantized with gguf and
    is not serializable") and marks it untrainable. Such a model is an ordinary float model: drop the marker, so a
    GGUF student's run dir is saved like any Hugging Face student's. Models that keep packed GGUF layers are left
    as they are."""
    q = getattr(model, "hf_quantizer", None)
    if q is None or type(q).__name__ != "GgufHfQuantizer" or getattr(q, "packed_modules", None):
        return
    if any(type(m).__name__ == "GgufLinear" for m in model.modules()):
        return
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False) and not isinstance(getattr(type(model), "is_quantized", None), property):
        model.is_quantized = False


@contextlib.contextmanager
def _quiet_gguf():
    """transformers de-quantizes GGUF tensors under a tqdm bar; kdcli shows progress bars only on a TTY."""
    try:
        import transformers.modeling_gguf_pytorch_utils as g
    except ImportError:  # pragma: no cover
        yield
        return
    saved = getattr(g, "tqdm", None)
    if saved is None or sys.stderr.isatty():
        yield
        return
    g.tqdm = lambda it, *a, **k: it
    try:
        yield
    finally:
        g.tqdm = saved


def check_device_map(spec: str, device_map: str) -> None:
    """Refuse (exit 2) a device map this model cannot take: only Hugging Face dirs / .gguf files, with accelerate."""
    if device_map == "none":
        return
    if device_map not in DEVICE_MAPS:
        raise UsageError(f"unknown device map {device_map!r}; use one of {', '.join(DEVICE_MAPS)}")
    if is_lm_run_dir(spec) or not is_hf_spec(spec):
        raise UsageError(
            f"--teacher-device-map {device_map} spreads a Hugging Face teacher (a directory with "
            f"config.json or a .gguf file) over the devices; {spec!r} is not one: drop the flag"
        )
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise UsageError(f"--teacher-device-map {device_map} needs the accelerate package", hint=HF_HINT)


def is_placed(model: nn.Module) -> bool:
    """Whether accelerate placed the model (``device_map``): it must not be moved with ``.to(device)``."""
    return getattr(model, "hf_device_map", None) is not None or getattr(model, "_kdcli_placed", False)


def input_device(model: nn.Module, default: torch.device) -> torch.device:
    """Where a (possibly accelerate-placed) model reads its token ids: its input embedding's device, or the first
    GPU of its device map when that embedding is offloaded (accelerate moves offloaded weights in per call)."""
    if not is_placed(model):
        return default
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    dev = getattr(getattr(emb, "weight", None), "device", None)
    if dev is not None and dev.type != "meta":
        return dev
    gpus = [d for d in (getattr(model, "hf_device_map", None) or {}).values() if isinstance(d, int)]
    return torch.device("cuda", gpus[0]) if gpus else torch.device("cpu")


def enable_gradient_checkpointing(model: nn.Module, spec: str) -> None:
    """``train-student --gradient-checkpointing``: Hugging Face models and the built-in transformer (a plugin model
    that offers ``gradient_checkpointing_enable()`` too); anything else is refused (exit 2)."""
    new = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x; the old name warns there
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if not callable(new or enable) or getattr(model, "supports_gradient_checkpointing", True) is False:
        raise UsageError(
            f"--gradient-checkpointing: student {spec!r} does not support it (Hugging Face models "
            "and the built-in transformer do; a file.py:factory model must define "
            "gradient_checkpointing_enable()); drop the flag"
        )
    # non-reentrant: works when the embeddings are frozen (LoRA, prompt tuning) and replays dropout draws
    if isinstance(model, TinyTransformer):
        enable()
    elif callable(new):
        new(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def hf_from_config(config: dict) -> nn.Module:
    tf = transformers_module()
    try:
        cfg_cls = tf.CONFIG_MAPPING[config["model_type"]]
    except (KeyError, TypeError):
        raise UsageError(f"unknown Hugging Face model_type {config.get('model_type')!r}") from None
    config = {k: v for k, v in config.items() if k != "auto_map"}  # a recorded config never names code to run
    try:
        return tf.AutoModelForCausalLM.from_config(
            cfg_cls.from_dict(config), dtype=torch.float32, trust_remote_code=False
        )
    except Exception as e:  # a damaged model.json: its config does not build a model
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
        raise UsageError(f"the recorded Hugging Face config does not build a model: {first}") from None


def output_width(model: nn.Module) -> int:
    """V: the number of logits per position (may exceed the tokenizer's size, e.g. padded embeddings)."""
    get = getattr(model, "get_output_embeddings", None)
    emb = get() if callable(get) else None
    if emb is not None and hasattr(emb, "weight"):
        return int(emb.weight.shape[0])
    was = model.training
    model.eval()
    with torch.inference_mode():
        dev = next(model.parameters(), torch.empty(0)).device
        out = lm_logits(model, torch.zeros((1, 2), dtype=torch.long, device=dev))
    model.train(was)
    return int(out.shape[-1])


def is_hf_model(model: nn.Module) -> bool:
    """A transformers causal LM, or a peft model around one."""
    model = hf_inner(model)
    return getattr(model, "config", None) is not None and hasattr(model, "generation_config")


def lm_logits(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None, *, call: nn.Module | None = None
) -> torch.Tensor:
    """(b, L) ids -> (b, L, V) logits for any supported LM. ``call`` runs the forward pass instead of ``model``:
    a DDP wrapper around :class:`LMForward` ``(model)`` (the wrapper must see every forward pass to average the
    gradients). A prompt-tuned model's virtual positions are dropped: position i is the sequence's token i."""
    if call is not None and call is not model:
        return call(ids, mask)
    if isinstance(model, TinyTransformer):
        return model(ids)
    if is_hf_model(model):
        inner, n = hf_inner(model), virtual_tokens(model)
        if n:
            emb, full = prompt_inputs(model, ids, mask)
            return inner(inputs_embeds=emb, attention_mask=full, use_cache=False).logits[:, n:]
        return inner(input_ids=ids, attention_mask=mask, use_cache=False).logits
    out = model(ids)
    out = getattr(out, "logits", out)
    if not isinstance(out, torch.Tensor) or out.dim() != 3:
        raise UsageError(
            f"model returned {type(out).__name__} {getattr(out, 'shape', '')}; an LM must map (b, L) "
            "token ids to (b, L, vocab) logits"
        )
    return out


def fused_head_weight(model: nn.Module) -> torch.Tensor | None:
    """The (V, d) output weight W when ``model``'s logits are exactly ``lm_hidden(model) @ W.T`` (the built-in
    transformer; an HF model of a :data:`FUSABLE_TYPES` type whose head is a plain bias-free Linear, LoRA-free and
    without logit soft-capping or scaling), else None (the loss then takes the logits)."""
    if isinstance(model, TinyTransformer):
        return model.head.weight
    if not is_hf_model(model):
        return None
    inner = hf_inner(model)
    cfg = inner.config
    head = inner.get_output_embeddings()
    if getattr(cfg, "model_type", None) not in FUSABLE_TYPES or type(head) is not nn.Linear or head.bias is not None:
        return None
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return None
    if getattr(inner, "base_model", inner) is inner:
        return None
    return head.weight


def lm_hidden(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(b, L) ids -> (b, L, d) final hidden states, for a model with a :func:`fused_head_weight`."""
    if isinstance(model, TinyTransformer):
        return model.hidden(ids)
    inner, n = hf_inner(model), virtual_tokens(model)
    base = inner.base_model  # the decoder without its head (LlamaModel, GPT2Model, ...)
    if n:
        emb, full = prompt_inputs(model, ids, mask)
        return base(inputs_embeds=emb, attention_mask=full, use_cache=False).last_hidden_state[:, n:]
    return base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


class LMForward(nn.Module):
    """``forward(ids, mask, hidden_only=False)`` for any LM: what a DDP wrapper wraps, so that the fused loss's
    hidden states (and the logits of the other paths) come from a forward pass DDP sees. Holds ``model`` (no
    parameters of its own)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.lm = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None, hidden_only: bool = False) -> torch.Tensor:
        return lm_hidden(self.lm, ids, mask) if hidden_only else lm_logits(self.lm, ids, mask)


def build_lm(
    spec: str,
    args: dict | None = None,
    *,
    vocab_size: int | None = None,
    weights: str | None = None,
    dtype: str = "fp32",
    device_map: str = "none",
    trust_remote_code: bool = False,
) -> tuple[nn.Module, LMInfo]:
    """An LM MODEL spec -> (module, info). ``vocab_size`` sizes built-in/plugin students. ``dtype`` and
    ``device_map`` apply to Hugging Face models only (weights loaded in that dtype; placed by accelerate); other
    models load in fp32 on the CPU, and a device map for them is refused. ``trust_remote_code``: let a Hugging Face
    directory run its own code (``--trust-remote-code``); without it such a directory is refused."""
    args = dict(args or {})
    check_device_map(spec, device_map)
    if is_lm_run_dir(spec):
        if args:
            raise UsageError(f"{spec} is a kdcli run directory; it rebuilds itself, drop the model arguments")
        return load_lm_run(Path(spec), weights=weights, trust_remote_code=trust_remote_code)
    if spec in BUILTIN_LMS and Path(spec).exists():
        raise UsageError(
            f"{spec!r} is both a built-in model and a path here; write ./{spec} for the path, or run "
            "from another directory for the built-in"
        )
    if spec in BUILTIN_LMS:
        if vocab_size is None and "vocab_size" not in args:
            raise UsageError(f"built-in {spec!r} needs a vocabulary: give --cache (the teacher's) or --tokenizer")
        args.setdefault("vocab_size", vocab_size)
        try:
            model = BUILTIN_LMS[spec](**args)
        except TypeError as e:
            raise UsageError(f"bad arguments for built-in model {spec!r}: {e}") from None
        info = LMInfo(
            spec=spec, kind="builtin", args=args, hf_config=model.config.to_dict() if is_hf_model(model) else None
        )
    elif is_plugin_spec(spec):
        factory, _ = load_factory(spec)
        model = call_factory(factory, spec, args, {"vocab_size": vocab_size})
        if not isinstance(model, nn.Module):
            raise UsageError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
        info = LMInfo(spec=spec, kind="plugin", args=args)
    elif is_hf_spec(spec):
        if args:
            raise UsageError(f"{spec} is a pretrained Hugging Face model; it takes no model arguments")
        model = _load_hf(spec, dtype, device_map, trust_remote_code)
        info = LMInfo(
            spec=spec, kind="hf", weights_sha256=_hf_weights_sha(Path(spec)), hf_config=model.config.to_dict()
        )
        info.load_dtype = str(LOAD_DTYPES[dtype]).removeprefix("torch.")
        if device_map != "none":
            model._kdcli_placed = True  # on a CPU-only machine accelerate places it all on the CPU, with no map
            info.device_map = {
                str(k): str(v) for k, v in (getattr(model, "hf_device_map", None) or {"": "cpu"}).items()
            }
    elif Path(spec).is_dir():
        raise UsageError(f"{spec} is neither a Hugging Face model directory (no config.json) nor a kdcli LM run dir")
    else:
        raise UsageError(
            f"unknown LM MODEL {spec!r}; use a Hugging Face directory, a .gguf file, the built-in "
            "'transformer', path/to/file.py:factory or a kdcli LM run directory"
        )
    if weights:
        from kdcli.models.weights import load_weights

        load_weights(model, Path(weights))
        info.weights_sha256 = sha256_file(Path(weights))
    info.num_parameters = count_parameters(model)
    info.vocab_size = output_width(model)
    return model, info


def save_lm_run(
    run_dir: Path,
    model: nn.Module,
    info: LMInfo,
    *,
    tokenizer,
    tokenizer_id: dict,
    text: dict,
    adapter: dict | None = None,
) -> None:
    """A self-contained LM run: model.json (how to rebuild it) and

    - a Hugging Face student (a LoRA one merged first): a Hugging Face model directory, ``save_pretrained`` +
      the tokenizer files (layout ``hf``)
    - a peft model with ``adapter["save"] == "adapter"``: ``adapter_config.json`` + ``adapter_model.safetensors``
      + the tokenizer files; model.json's ``peft`` names the base (layout ``adapter``)
    - any other (built-in transformer, plugin, compressed): model.safetensors (tied weights once) + tokenizer/

    ``adapter``: ``{"method", "args", "save", "base", "base_sha256"}`` for a peft student. model.json is written
    last: a run dir without it is unfinished."""
    import shutil

    from safetensors.torch import save_model

    from kdcli.infra.atomic import atomic_write_bytes, replace_atomically
    from kdcli.lm.text import save_tokenizer

    spec, kind, args, hf_config = info.spec, info.kind, info.args, info.hf_config
    compression = info.compression
    if kind == "run":  # a student that started from an earlier run keeps that run's recipe
        src = info.source or {}
        spec, kind, args, hf_config = src["spec"], src["model_kind"], src.get("args", {}), src.get("hf_config")
        if kind == "plugin":
            path, _, name = spec.rpartition(":")
            spec = f"{Path(info.spec) / path}:{name}" if not Path(path).is_absolute() else spec
    layout = "kdcli"
    if is_peft_model(model):
        if adapter and adapter.get("save") == "adapter":
            layout = "adapter"
        else:
            model = merged(model)
    if layout == "kdcli" and is_hf_model(model) and not compression:
        layout = "hf"
        hf_config = model.config.to_dict()
    _clear_hf_files(run_dir)  # an earlier run in this dir may have had another layout
    if layout != "kdcli":
        stage = run_dir / ".hf-staging"
        shutil.rmtree(stage, ignore_errors=True)
        if layout == "adapter":
            save_adapter(model, stage)
        else:
            _fill_generation_config(model, tokenizer)
            model.save_pretrained(str(stage), max_shard_size=HF_SHARD_SIZE, safe_serialization=True)
        tokenizer.save_pretrained(str(stage))
        for f in sorted(stage.iterdir()):
            replace_atomically(f, run_dir / f.name)
        stage.rmdir()
        shutil.rmtree(run_dir / TOKENIZER_DIR, ignore_errors=True)
    else:
        if kind == "plugin":
            _, src = load_factory(spec)
            if src.resolve() != (run_dir / PLUGIN_COPY).resolve():
                shutil.copyfile(src, run_dir / (PLUGIN_COPY + ".partial"))
                replace_atomically(run_dir / (PLUGIN_COPY + ".partial"), run_dir / PLUGIN_COPY)
            spec = f"{PLUGIN_COPY}:{spec.rpartition(':')[2]}"
        tmp = run_dir / (WEIGHTS + ".partial")
        save_model(model, str(tmp))
        replace_atomically(tmp, run_dir / WEIGHTS)
        tok_tmp = run_dir / (TOKENIZER_DIR + ".partial")
        shutil.rmtree(tok_tmp, ignore_errors=True)
        save_tokenizer(tokenizer, tok_tmp)
        shutil.rmtree(run_dir / TOKENIZER_DIR, ignore_errors=True)
        tok_tmp.rename(run_dir / TOKENIZER_DIR)
    meta = {
        "kind": "lm",
        "layout": layout,
        "spec": spec,
        "model_kind": kind,
        "args": args,
        "vocab_size": info.vocab_size,
        "num_parameters": info.num_parameters,
        "hf_config": hf_config,
        "tokenizer": tokenizer_id,
        "text": text,
    }
    if adapter:
        meta["peft"] = {**adapter, "save": "adapter" if layout == "adapter" else "merged"}
    if compression:
        meta["compression"] = compression
    atomic_write_bytes(run_dir / MODEL_JSON, json.dumps(meta, indent=2).encode())


HF_FILES = (
    "config.json",
    "generation_config.json",
    WEIGHTS,
    "model.safetensors.index.json",
    "adapter_config.json",
    "adapter_model.safetensors",
)


def _clear_hf_files(run_dir: Path) -> None:
    """Weights and configs an earlier save may have left (a sharded model's shards, an adapter) go first, so
    transformers never reads a mix."""
    for name in HF_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for p in run_dir.glob("model-*-of-*.safetensors"):
        p.unlink()


def _fill_generation_config(model: nn.Module, tokenizer) -> None:
    """EOS/PAD/BOS ids from the tokenizer where the model's config has none, so ``generate`` stops and pads."""
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        tid = getattr(tokenizer, name, None)
        if tid is None:
            continue
        if getattr(model.config, name, None) is None:
            setattr(model.config, name, tid)
        gen = getattr(model, "generation_config", None)
        if gen is not None and getattr(gen, name, None) is None:
            setattr(gen, name, tid)


def read_lm_meta(run_dir: Path) -> dict[str, Any]:
    try:
        meta = json.loads((Path(run_dir) / MODEL_JSON).read_text())
        meta["spec"], meta["model_kind"]  # noqa: B018 - presence check
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{run_dir}/{MODEL_JSON} is not a valid kdcli LM description: {e}") from None
    return meta


def load_lm_run(run_dir: Path, weights: str | None = None, trust_remote_code: bool = False) -> tuple[nn.Module, LMInfo]:
    """Rebuild a kdcli LM run dir from its model.json. Nothing it names runs code: a plugin model only from the
    run's own model_source.py, a Hugging Face layout only without ``auto_map`` (unless ``trust_remote_code``), an
    adapter's base only a model directory whose weights still hash to what the adapter was trained on."""
    from safetensors.torch import load_model

    meta = read_lm_meta(run_dir)
    kind, spec, args = meta["model_kind"], meta["spec"], meta.get("args", {})
    layout = meta.get("layout", "kdcli")
    if not isinstance(args, dict):
        raise UsageError(f'{run_dir}/{MODEL_JSON}: "args" must be a mapping, got {type(args).__name__}')
    if layout == "adapter":
        if weights:
            raise UsageError(f"{run_dir} holds a peft adapter; --weights does not apply to it")
        return _load_adapter_run(Path(run_dir), meta, trust_remote_code)
    if layout == "hf" and not weights:
        model = _load_hf(str(run_dir), trust_remote_code=trust_remote_code)
        return model, LMInfo(
            spec=str(run_dir),
            kind="run",
            args={},
            vocab_size=int(meta.get("vocab_size", 0)),
            weights_sha256=_hf_weights_sha(Path(run_dir)),
            num_parameters=count_parameters(model),
            hf_config=meta.get("hf_config"),
            source=meta,
        )
    if kind == "builtin" and not (layout == "hf" and meta.get("hf_config")):
        if spec not in BUILTIN_LMS:
            raise UsageError(
                f"{run_dir}/{MODEL_JSON} names built-in model {spec!r}, which kdcli does not have "
                f"({', '.join(BUILTIN_LMS)})"
            )
        try:
            model = BUILTIN_LMS[spec](**args)
        except TypeError as e:
            raise UsageError(f"{run_dir}/{MODEL_JSON}: bad arguments for built-in model {spec!r}: {e}") from None
    elif kind == "plugin":  # only the run's own copy of the plugin: never code that model.json points to elsewhere
        spec = run_dir_plugin(Path(run_dir), spec)
        factory, _ = load_factory(spec)
        model = call_factory(factory, spec, args, {"vocab_size": meta.get("vocab_size")})
        if not isinstance(model, nn.Module):
            raise UsageError(f"{run_dir}/{PLUGIN_COPY} returned {type(model).__name__}, not a torch.nn.Module")
    elif kind in ("hf", "builtin") and isinstance(meta.get("hf_config"), dict):
        model = hf_from_config(meta["hf_config"])
    else:
        raise UsageError(f"{run_dir}/{MODEL_JSON}: unknown model kind {kind!r}")
    wpath = Path(weights) if weights else Path(run_dir) / WEIGHTS
    if not wpath.is_file():
        raise UsageError(f"{run_dir} has no {WEIGHTS}: the run did not finish (resume it with --resume)")
    compression = meta.get("compression")
    rebuild_compressed(model, compression, wpath)  # int8 modules and pruned shapes, read from the weights file
    try:
        missing, unexpected = load_model(model, str(wpath), strict=False)
    except Exception as e:
        raise UsageError(f"weights {wpath} do not fit the model in {run_dir}: {str(e).splitlines()[0][:200]}") from None
    if unexpected or [m for m in missing if not _tied(model, m)]:
        raise UsageError(
            f"weights {wpath} do not fit the model: missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}"
        )
    finish_compressed(model, compression)
    info = LMInfo(
        spec=str(run_dir),
        kind="run",
        args={},
        vocab_size=int(meta.get("vocab_size", 0)),
        weights_sha256=sha256_file(wpath),
        num_parameters=count_parameters(model),
        hf_config=meta.get("hf_config"),
        source=meta,
        compression=compression,
    )
    return model, info


def weights_sha_of(spec: str) -> str | None:
    """The ``weights_sha256`` :func:`build_lm` would record for a Hugging Face dir, a .gguf file or an LM run dir,
    computed from the files alone (nothing is loaded)."""
    p = Path(spec)
    if is_lm_run_dir(spec):
        meta = read_lm_meta(p)
        if meta.get("layout") == "adapter":
            return None
        return (
            _hf_weights_sha(p)
            if meta.get("layout") == "hf"
            else (sha256_file(p / WEIGHTS) if (p / WEIGHTS).is_file() else None)
        )
    return _hf_weights_sha(p)


def _load_adapter_run(run_dir: Path, meta: dict, trust_remote_code: bool = False) -> tuple[nn.Module, LMInfo]:
    """A peft adapter run: its base (a Hugging Face dir, .gguf file or LM run dir) with the adapter on top. The base
    is checked before anything loads: it must be a model directory or file (never a plugin or a built-in name),
    and its weights must hash to what the adapter was trained on."""
    rec = meta.get("peft") or {}
    base = rec.get("base") if isinstance(rec, dict) else None
    if not isinstance(base, str) or not base:
        raise UsageError(f"{run_dir}/{MODEL_JSON} records no base model for its adapter (peft.base)")
    if is_plugin_spec(base) or not (is_hf_spec(base) or is_lm_run_dir(base)):
        raise UsageError(
            f"{run_dir}/{MODEL_JSON} names {base!r} as its adapter's base; a base must be a Hugging Face "
            "model directory, a .gguf file or a kdcli LM run dir that exists (kdcli never runs code a "
            "file it reads points to)"
        )
    if is_lm_run_dir(base) and read_lm_meta(Path(base)).get("layout") == "adapter":
        raise UsageError(
            f"the base {base} of adapter run {run_dir} is itself an adapter run; train adapters on a full model"
        )
    if not (rec.get("base_sha256") and isinstance(rec["base_sha256"], str)):
        raise UsageError(
            f"{run_dir}/{MODEL_JSON} records no weights hash of its base (peft.base_sha256); re-train "
            "the adapter with this kdcli"
        )
    sha = weights_sha_of(base)
    if sha != rec["base_sha256"]:
        raise UsageError(
            f"the base model {base} of adapter run {run_dir} has changed since the adapter was trained "
            f"(weights sha256 {str(sha)[:12]} vs {rec['base_sha256'][:12]})"
        )
    if not (run_dir / "adapter_model.safetensors").is_file():
        raise UsageError(f"{run_dir} has no adapter_model.safetensors (kdcli reads adapters as safetensors only)")
    base_model, _ = build_lm(base, trust_remote_code=trust_remote_code)
    model = load_adapter(base_model, run_dir)
    model.eval()
    info = LMInfo(
        spec=str(run_dir),
        kind="run",
        args={},
        vocab_size=int(meta.get("vocab_size", 0)),
        weights_sha256=sha256_file(run_dir / "adapter_model.safetensors"),
        num_parameters=count_parameters(model),
        hf_config=meta.get("hf_config"),
        source=meta,
    )
    return model, info


def _tied(model: nn.Module, name: str) -> bool:
    """A key safetensors' save_model dropped because it shares storage with another (tied embeddings)."""
    state = model.state_dict()
    t = state.get(name)
    return t is not None and any(k != name and v.data_ptr() == t.data_ptr() for k, v in state.items())
