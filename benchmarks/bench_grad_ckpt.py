"""Peak memory and time of one training step with and without train-student --gradient-checkpointing.

    python benchmarks/bench_grad_ckpt.py [--batch 8] [--length 512]

One fresh process per (student, setting): the built-in transformer (d_model 256, 6 layers, fused output-layer
loss) and a Hugging Face Llama of the same width and depth (autograd path), a (batch, length) batch of random ids,
labels only, vocabulary --vocab (default 8,192: small enough that the layers' activations, not the output layer,
decide the peak). Each process records VmHWM (peak RSS, MiB) after building the model and after
three forward/backward steps, and the mean step time. Prints one line per run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time
import torch
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
kind, ckpt, b, L, V = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(2)
from kdcli.lm.hf import TinyTransformer, enable_gradient_checkpointing
from kdcli.tasks.lm import student_loss
torch.manual_seed(0)
if kind == "transformer":
    model = TinyTransformer(V, d_model=256, n_layers=6, n_heads=4, max_length=L)
else:
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=L))
if ckpt:
    enable_gradient_checkpointing(model, kind)
model.train()
ids = torch.randint(0, V, (b, L))
idx = torch.arange(b * L).view(b, L)[:, :-1].reshape(-1)
labels = ids[:, 1:].reshape(-1)
built = hwm()
times = []
for _ in range(3):
    t0 = time.perf_counter()
    parts, _ = student_loss(model, ids, torch.ones_like(ids), idx, None, labels, temperature=1.0, alpha=0.0)
    parts.total.backward()
    model.zero_grad(set_to_none=False)
    times.append(time.perf_counter() - t0)
print(json.dumps({"student": kind, "checkpointing": ckpt, "built_mib": built, "peak_mib": hwm(),
                  "step_s": sum(times[1:]) / 2, "loss": float(parts.total)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args()
    for kind in ("transformer", "llama"):
        for ckpt in ("0", "1"):
            p = subprocess.run(
                [sys.executable, "-c", CHILD, kind, ckpt, str(args.batch), str(args.length), str(args.vocab)],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(p.stdout.strip().splitlines()[-1])
            print(
                f"{r['student']:11} checkpointing={str(r['checkpointing']):5}  after build {r['built_mib']:6.0f} MiB  "
                f"peak {r['peak_mib']:6.0f} MiB  step {r['step_s']:5.2f} s  loss {r['loss']:.4f}"
            )


if __name__ == "__main__":
    main()
