#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv on first use, then runs what was asked.
#   bash scripts/dev.sh demo [options]   prune the embedded default model end to end (see README)
#   bash scripts/dev.sh test [pytest args]
#        ruff's lint (rules in pyproject.toml) on the whole repository first, then pytest:
#        every tier; with a ComfyUI checkout (COMFYUI_PATH, or ../shared/ComfyUI beside the repository)
#        its Python requirements are installed into .venv too and the integration, server and browser
#        tiers run against it, otherwise they skip with a message saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! cmp -s requirements-dev.txt .venv/.requirements-dev.txt; then
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt
  cp requirements-dev.txt .venv/.requirements-dev.txt
  rm -f .venv/.comfyui-requirements.txt
fi
export HF_HUB_OFFLINE=1

# ComfyUI for the integration, server and browser tiers: COMFYUI_PATH, else the shared copy.
if [ -z "${COMFYUI_PATH:-}" ] && [ -f ../shared/ComfyUI/main.py ]; then
  COMFYUI_PATH="$(cd ../shared/ComfyUI && pwd)"
fi
if [ -n "${COMFYUI_PATH:-}" ]; then
  export COMFYUI_PATH
  # Its requirements, without letting pip replace the pinned CPU torch. torchaudio is left out: no
  # PyPI build matches the pinned torch, and a mismatched one breaks diffusers' imports (ComfyUI
  # itself runs without it). torchvision's missing C operators are declared by ecodiff_core/_compat.py.
  if ! cmp -s "$COMFYUI_PATH/requirements.txt" .venv/.comfyui-requirements.txt; then
    grep -E '^torch==' requirements-dev.txt > .venv/.torch-constraint.txt
    grep -vE '^\s*torchaudio\b' "$COMFYUI_PATH/requirements.txt" > .venv/.comfyui-requirements-filtered.txt
    .venv/bin/python -m pip install --quiet -c .venv/.torch-constraint.txt \
      -r .venv/.comfyui-requirements-filtered.txt
    cp "$COMFYUI_PATH/requirements.txt" .venv/.comfyui-requirements.txt
  fi
fi
# playwright-core for the browser tier, where scripts/browser_deps.sh put it (outside the repository).
node_modules="${ECODIFF_NODE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ecodiff-node}/node_modules"
if [ -z "${NODE_PATH:-}" ] && [ -d "$node_modules/playwright-core" ]; then
  export NODE_PATH="$node_modules"
fi

command=${1:-test}
shift || true
case "$command" in
  demo) exec .venv/bin/python -m ecodiff_core demo "$@" ;;
  test)
    if ! .venv/bin/ruff check --no-cache --quiet .; then
      echo "lint failed: fix the findings above (.venv/bin/ruff check --fix sorts imports)" >&2
      exit 1
    fi
    exec .venv/bin/python -m pytest -q "$@" ;;
  *) echo "usage: bash scripts/dev.sh demo|test [args]" >&2; exit 2 ;;
esac
