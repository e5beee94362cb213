"""Peak memory of loading a Hugging Face teacher in fp32 vs bf16 (cache-teacher --dtype), one fresh process each.

    python benchmarks/bench_teacher_memory.py [--teacher SmolLM2.gguf] [--out /tmp/kd-bench-mem]

For each dtype and each form of the teacher (the GGUF file as shipped, and the same model saved as a Hugging Face
safetensors directory), a fresh Python process imports kdcli, records its peak resident set (VmHWM), loads the
teacher with kdcli.lm.hf.build_lm(..., dtype=...) exactly as cache-teacher does, records VmHWM again, then runs one
teacher forward pass over 2 x 128 tokens of Hamlet (logits: 48 MiB) and records it a third time. Peak RSS counts
the pages of memory-mapped safetensors files the process touched. Three forms of the same weights: the GGUF file
(Q4_1, de-quantized at load), a safetensors directory stored in fp32, and one stored in bf16 (how most checkpoints
ship). Each process also saves its fp32 log-probs, so the bf16 runs are compared with the fp32 one (mean |delta
log-p| over the vocabulary, top-1 agreement). After the forward pass it also reads the resident set split into
anonymous memory and file pages (RssAnon / RssFile: mapped safetensors pages are clean, the kernel can drop them).
Prints a table (MiB) and writes bench_teacher_memory.json in --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from lm_common import play_rows, smollm2_gguf  # noqa: E402

CHILD = r"""
import json, sys, time
import numpy as np
import torch

def hwm(key="VmHWM"):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # MiB
spec, dtype, out, text = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
torch.set_num_threads(2)
from kdcli.lm.hf import build_lm, lm_logits  # imports torch + transformers
from kdcli.lm.text import load_tokenizer
tok = load_tokenizer(spec)
ids = torch.tensor(tok(open(text).read())["input_ids"][:256]).view(2, 128)
base = hwm()
t0 = time.perf_counter()
model, info = build_lm(spec, dtype=dtype)
load_s = time.perf_counter() - t0
loaded = hwm()
param_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
model.eval()
t0 = time.perf_counter()
with torch.inference_mode():
    logp = torch.log_softmax(lm_logits(model, ids).float(), -1)
fwd_s = time.perf_counter() - t0
np.save(out, logp.numpy())
print(json.dumps({"base_mib": base, "loaded_mib": loaded, "forward_mib": hwm(), "anon_mib": hwm("RssAnon"),
                  "file_mib": hwm("RssFile"), "param_mib": param_mib,
                  "load_s": load_s, "forward_s": fwd_s, "param_dtype": str(next(model.parameters()).dtype)}))
"""


def measure(spec: str, dtype: str, out: Path) -> dict:
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            spec,
            dtype,
            str(out / f"logp-{Path(spec).name}-{dtype}.npy"),
            str(out / "text.txt"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=None, help="a .gguf file (default: the packaged SmolLM2-135M-Instruct)")
    ap.add_argument("--out", default="/tmp/kd-bench-mem")
    args = ap.parse_args()
    gguf = Path(args.teacher) if args.teacher else smollm2_gguf()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "text.txt").write_text("\n".join(r["text"] for r in play_rows("hamlet", 4000)))
    dirs = {"hf-fp32": out / "teacher-hf-fp32", "hf-bf16": out / "teacher-hf-bf16"}
    if not all((d / "config.json").is_file() for d in dirs.values()):  # the same weights as safetensors dirs
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        m = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        for d, dt in ((dirs["hf-fp32"], torch.float32), (dirs["hf-bf16"], torch.bfloat16)):
            plain = AutoModelForCausalLM.from_config(m.config)  # a GGUF-loaded model refuses save_pretrained
            plain.load_state_dict(m.state_dict())
            plain.to(dt).save_pretrained(str(d))
            tok.save_pretrained(str(d))
        del m
    rows = []
    forms = {str(gguf): "gguf", str(dirs["hf-fp32"]): "hf-fp32", str(dirs["hf-bf16"]): "hf-bf16"}
    for spec, form in forms.items():
        res = {d: measure(spec, d, out) for d in ("fp32", "bf16")}
        import numpy as np

        a = np.load(out / f"logp-{Path(spec).name}-fp32.npy")
        b = np.load(out / f"logp-{Path(spec).name}-bf16.npy")
        for d, r in res.items():
            r.update(form=form, dtype=d, load_delta_mib=r["loaded_mib"] - r["base_mib"])
            if d == "bf16":
                r["mean_abs_dlogp_vs_fp32"] = float(np.abs(a - b).mean())
                r["top1_agreement_vs_fp32"] = float((a.argmax(-1) == b.argmax(-1)).mean())
            rows.append(r)
    print(
        f"{'teacher':8} {'dtype':5} {'params MiB':>10} {'peak after import':>17} {'peak after load':>15} "
        f"{'load +MiB':>9} {'peak fwd':>8} {'anon/file now':>13} {'load s':>6}  vs fp32"
    )
    for r in rows:
        cmp = (
            f"|dlogp| {r['mean_abs_dlogp_vs_fp32']:.4f}, top-1 {r['top1_agreement_vs_fp32']:.3f}"
            if "mean_abs_dlogp_vs_fp32" in r
            else ""
        )
        print(
            f"{r['form']:8} {r['dtype']:5} {r['param_mib']:10.0f} {r['base_mib']:17.0f} {r['loaded_mib']:15.0f} "
            f"{r['load_delta_mib']:9.0f} {r['forward_mib']:8.0f} {r['anon_mib']:7.0f}/{r['file_mib']:<5.0f} "
            f"{r['load_s']:6.1f}  {cmp}"
        )
    (out / "bench_teacher_memory.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
