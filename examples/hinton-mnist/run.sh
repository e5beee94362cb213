#!/usr/bin/env bash
# Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network", section 3 (MNIST), reproduced
# with kdcli commands only (as a CI script would). See docs/hinton.md for the design and the measured numbers.
#
#   1. teacher: trained on labels with dropout and +-2 pixel jitter           train-student --augment shift:2
#   2. run it ONCE over VIEWS jittered views of every training image, cache   cache-teacher --views --augment
#      the log-probs with each view's shift (view 0 = the plain image)
#   3. baseline: the 784-800-800-10 student on labels alone (no dropout,      train-student
#      no jitter: the paper's 146-error net)
#   4. distilled: the same student on the cached views' soft targets, the     train-student --cache
#      same number of training rows as the baseline (same budget)
#   5. eval all three on the 10,000 test images + a PNG (error curves,        eval --cache --plot
#      reliability diagram)
#   6. omit-3: a transfer set without any 3s, a distilled student from it,    cache-teacher --data '...?omit=3'
#      then its errors on the test 3s before/after raising the 3s' bias       eval --class-bias 3=fit
#      (chosen on held-out training rows, never on the test set)
#
# Usage: bash examples/hinton-mnist/run.sh [OUT_DIR]
#   QUICK=1  a smoke test of every step on small slices (about a minute); the numbers mean nothing.
#   TEACHER_RUN=DIR  reuse a teacher run dir trained earlier (by step 1's command) instead of training one.
#   T_EPOCHS, VIEWS, S_EPOCHS, O_VIEWS, O_EPOCHS, TEMP, ALPHA, SEED  override the full-mode settings below
#   (SEED: the students' seed; the teacher always uses seed 0).
#   Full run: see docs/hinton.md for the measured numbers and wall time on 2 CPU cores.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${1:-$ROOT/out/hinton-mnist}"
source "$ROOT/examples/env.sh"
kdcli_env  # kdcli on PATH, else ./.venv (the quick start's), else print the one command to run
kdcli_need matplotlib plot "step 5 (eval --plot)"

if [ "${QUICK:-0}" = 1 ]; then
  TRAIN="mnist:train[:1000]"; TEST="mnist:test[:500]"
  TRANSFER3="mnist:train[:800]?omit=3"; BIAS_DATA="mnist:train[800:1000]"
  T_EPOCHS=1; VIEWS=2; S_EPOCHS=1; O_VIEWS=2; O_EPOCHS=1
else
  TRAIN="mnist:train"; TEST="mnist:test"
  TRANSFER3="mnist:train[:55000]?omit=3"; BIAS_DATA="mnist:train[55000:]"
  T_EPOCHS=${T_EPOCHS:-6}; VIEWS=${VIEWS:-24}; S_EPOCHS=${S_EPOCHS:-2}; O_VIEWS=${O_VIEWS:-6}; O_EPOCHS=${O_EPOCHS:-2}
fi
TEMP=${TEMP:-2}; ALPHA=${ALPHA:-0.9}
B_EPOCHS=$((S_EPOCHS * VIEWS))  # same budget: the baseline sees as many training rows as the distilled student
mkdir -p "$OUT"
t0=$SECONDS
step() { echo "[hinton-mnist] $1 (${SECONDS}s since start)" >&2; }

# The paper's teacher is a 784-1200-1200-10 MLP; we use a small CNN (a stronger teacher is allowed; it gets
# ~60 test errors in a few CPU-minutes, the MLP needs hours). Dropout + jitter, as in the paper.
TEACHER=(--student cnn --student-arg "channels=[32,64]" --student-arg hidden=256 --student-arg dropout=0.4
         --augment shift:2 --epochs "$T_EPOCHS" --lr 2e-3 --batch-size 128)
STUDENT=(--student mlp --student-arg "hidden=[800,800]" --lr 1e-3 --batch-size 128 --eval-data "$TEST" --seed "${SEED:-0}")
COMMON=(--schedule cosine --warmup-steps 100 --overwrite)

if [ -n "${TEACHER_RUN:-}" ]; then  # a teacher trained earlier (by the command below): skip step 1
  TEACHER_DIR="$TEACHER_RUN"; step "1/6 teacher: reusing $TEACHER_DIR (TEACHER_RUN)"
else
  TEACHER_DIR="$OUT/teacher"; step "1/6 teacher"
  kdcli train-student "${TEACHER[@]}" "${COMMON[@]}" --data "$TRAIN" --eval-data "$TEST" --out "$TEACHER_DIR"
fi
step "2/6 cache: $VIEWS views per training image (view 0 plain, views 1.. shifted by up to 2 pixels)"
kdcli cache-teacher --teacher "$TEACHER_DIR" --data "$TRAIN" --views "$VIEWS" --augment shift:2 \
  --out "$OUT/cache-train" --overwrite
kdcli cache-teacher --teacher "$TEACHER_DIR" --data "$TEST" --out "$OUT/cache-test" --overwrite
step "3/6 baseline: labels only, $B_EPOCHS epochs"
kdcli train-student "${STUDENT[@]}" "${COMMON[@]}" --data "$TRAIN" --epochs "$B_EPOCHS" --out "$OUT/baseline"
step "4/6 distilled: T=$TEMP alpha=$ALPHA, $S_EPOCHS epochs over the $VIEWS cached views"
kdcli train-student "${STUDENT[@]}" "${COMMON[@]}" --data "$TRAIN" --cache "$OUT/cache-train" \
  --temperature "$TEMP" --alpha "$ALPHA" --epochs "$S_EPOCHS" --out "$OUT/distilled"
step "5/6 eval"
kdcli eval --model "$TEACHER_DIR" --model "$OUT/baseline" --model "$OUT/distilled" --data "$TEST" \
  --cache "$OUT/cache-test" --plot "$OUT/hinton-mnist.png"

step "6/6 omit-3: transfer set $TRANSFER3, bias chosen on $BIAS_DATA"
kdcli cache-teacher --teacher "$TEACHER_DIR" --data "$TRANSFER3" --views "$O_VIEWS" --augment shift:2 \
  --out "$OUT/cache-omit3" --overwrite
kdcli train-student "${STUDENT[@]}" "${COMMON[@]}" --data "$TRANSFER3" --cache "$OUT/cache-omit3" \
  --temperature "$TEMP" --alpha "$ALPHA" --epochs "$O_EPOCHS" --out "$OUT/distilled-omit3"
kdcli eval --model "$OUT/distilled-omit3" --data "$TEST" --class-bias 3=fit --bias-data "$BIAS_DATA"
step "done: $((SECONDS - t0)) s; plot: $OUT/hinton-mnist.png"
