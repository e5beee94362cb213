"""Parameter-efficient students with ``peft``: LoRA and prompt tuning (a learned prompt embedding).

- :func:`add_adapter` wraps a pretrained Hugging Face causal LM in a ``peft`` model whose only trainable weights
  are the adapter's (``--peft lora|prompt --peft-arg KEY=VALUE``)
- :func:`virtual_tokens` / :func:`hf_inner` let the forward passes (kdcli.lm.hf) run a peft model's underlying
  transformers model themselves: LoRA layers are injected into it, a soft prompt is prepended as input embeddings
  (and its positions dropped again), so the predicted positions line up with the cache's
- :func:`load_adapter` reads an adapter run dir (``adapter_config.json`` + ``adapter_model.safetensors``) onto its
  base model

Nothing here imports kdcli.lm.hf (hf.py calls into this module).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from kdcli.infra.errors import UsageError

PEFT_HINT = "install the extra: pip install 'kdcli[peft]'"
METHODS = ("lora", "prompt")
LORA_DEFAULTS = {"r": 8}
PROMPT_DEFAULTS = {"num_virtual_tokens": 16}


def peft_module(what: str = "--peft"):
    try:
        import peft
    except ImportError:
        raise UsageError(f"{what} needs the peft package, which is not installed", hint=PEFT_HINT) from None
    return peft


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def hf_inner(model: nn.Module) -> nn.Module:
    """The transformers model a peft model runs (LoRA layers injected into it); ``model`` itself otherwise."""
    return model.get_base_model() if is_peft_model(model) else model


def virtual_tokens(model: nn.Module) -> int:
    """How many learned prompt vectors precede every sequence (0 unless ``model`` is prompt-tuned)."""
    if not is_peft_model(model):
        return 0
    cfg = model.peft_config[model.active_adapter]
    return int(cfg.num_virtual_tokens) if getattr(cfg, "is_prompt_learning", False) else 0


def prompt_inputs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs_embeds, attention_mask)`` of a prompt-tuned model: its (b, n, d) soft prompt, then the (b, L, d)
    token embeddings. Positions ``[n:]`` are the sequence's."""
    inner = hf_inner(model)
    b = ids.shape[0]
    prompt = model.get_prompt(batch_size=b)  # (b, n, d)
    emb = inner.get_input_embeddings()(ids)  # (b, L, d)
    n = prompt.shape[1]
    mask = torch.ones_like(ids) if mask is None else mask
    full_mask = torch.cat([torch.ones((b, n), dtype=mask.dtype, device=mask.device), mask], dim=1)
    return torch.cat([prompt.to(emb.dtype), emb], dim=1), full_mask


def linear_names(model: nn.Module) -> list[str]:
    """The leaf names of the modules LoRA can adapt (Linear, Embedding, Conv1D), e.g. q_proj, v_proj."""
    names = set()
    for full, m in model.named_modules():
        if full and (isinstance(m, (nn.Linear, nn.Embedding)) or type(m).__name__ == "Conv1D"):
            names.add(full.rpartition(".")[2])
    return sorted(names)


def add_adapter(model: nn.Module, method: str, args: dict, *, tokenizer, student: str) -> nn.Module:
    """``model`` (a transformers causal LM) wrapped by peft with a fresh ``method`` adapter; only the adapter trains.
    ``init_text`` (prompt tuning) starts the soft prompt from that text's token embeddings, as peft's
    ``PromptTuningInit.TEXT`` does (the text's ids repeated or cut to ``num_virtual_tokens``)."""
    peft = peft_module()
    if method not in METHODS:
        raise UsageError(f"--peft {method!r}: choose one of {', '.join(METHODS)}")
    if is_peft_model(model):
        raise UsageError(
            f"student {student} already carries a {type(model).__name__} adapter; start from its base "
            "model or from a merged LoRA run dir"
        )
    if getattr(model, "config", None) is None or not hasattr(model, "generation_config"):
        raise UsageError(
            f"--peft adapts a Hugging Face causal LM; student {student!r} is not one (use a Hugging Face "
            "directory, a kdcli run dir of one, or --student llama)"
        )
    args = dict(args)
    if method == "lora":
        args = {**LORA_DEFAULTS, **args}
        targets = args.get("target_modules")
        if isinstance(targets, str) and targets != "all-linear":
            targets = args["target_modules"] = [t.strip() for t in targets.split(",") if t.strip()]
        found = linear_names(model)
        if isinstance(targets, (list, tuple)):
            missing = [t for t in targets if t not in found]
            if missing:
                raise UsageError(
                    f"LoRA target modules {missing} are not in student {student}; its adaptable "
                    f"modules are: {', '.join(found)}"
                )
        try:
            config = peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, **args)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                wrapped = peft.get_peft_model(model, config)
        except TypeError as e:
            raise UsageError(f"bad --peft-arg for lora: {e}") from None
        except ValueError as e:
            first = (str(e).strip().splitlines() or ["?"])[0][:200]
            raise UsageError(
                f"cannot add LoRA to student {student}: {first} (pass --peft-arg target_modules=[...]; "
                f"its adaptable modules are: {', '.join(found)})"
            ) from None
        return wrapped
    args = {**PROMPT_DEFAULTS, **args}
    init_text = args.pop("init_text", None)
    if init_text is not None and not str(init_text).strip():
        raise UsageError("--peft-arg init_text is empty; give a hard prompt to start the soft prompt from")
    try:
        config = peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM, **args)
        if int(config.num_virtual_tokens) < 1:
            raise ValueError("num_virtual_tokens must be at least 1")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            wrapped = peft.get_peft_model(model, config)
    except (TypeError, ValueError) as e:
        raise UsageError(f"bad --peft-arg for prompt: {e}") from None
    if init_text is not None:
        n = int(config.num_virtual_tokens)
        ids = tokenizer(str(init_text), add_special_tokens=False)["input_ids"]
        if not ids:
            raise UsageError(f"--peft-arg init_text {init_text!r} has no tokens")
        ids = (ids * (n // len(ids) + 1))[:n]  # as peft's PromptTuningInit.TEXT: repeat, then cut to n
        emb = hf_inner(wrapped).get_input_embeddings().weight
        with torch.no_grad():
            wrapped.prompt_encoder[wrapped.active_adapter].embedding.weight.copy_(
                emb[torch.tensor(ids, device=emb.device)].detach().clone()
            )
    return wrapped


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each shared tensor once."""
    seen: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    total = sum(p.numel() for p in seen.values())
    return sum(p.numel() for p in seen.values() if p.requires_grad), total


def save_adapter(model: nn.Module, directory: Path) -> None:
    """adapter_config.json + adapter_model.safetensors of ``model``'s active adapter (not peft's README stub)."""
    model.save_pretrained(str(directory), safe_serialization=True)
    (directory / "README.md").unlink(missing_ok=True)


def merged(model: nn.Module) -> nn.Module:
    """A LoRA model's weights folded into its base: a plain transformers model (modifies ``model``)."""
    return model.merge_and_unload()


def load_adapter(base: nn.Module, run_dir: Path) -> nn.Module:
    """The adapter saved in ``run_dir`` on ``base`` (frozen, for eval)."""
    peft = peft_module(f"{run_dir} holds a peft adapter; reading it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return peft.PeftModel.from_pretrained(base, str(run_dir), is_trainable=False)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
        raise UsageError(f"cannot load the adapter in {run_dir} onto its base: {first}") from None
