#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv on first use, then runs what was asked.
#   bash scripts/dev.sh demo [options]   prune the embedded default model end to end (see README)
#   bash scripts/dev.sh test [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! cmp -s requirements-dev.txt .venv/.requirements-dev.txt; then
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt
  cp requirements-dev.txt .venv/.requirements-dev.txt
fi
export HF_HUB_OFFLINE=1
command=${1:-test}
shift || true
case "$command" in
  demo) exec .venv/bin/python -m ecodiff_core demo "$@" ;;
  test) exec .venv/bin/python -m pytest -q "$@" ;;
  *) echo "usage: bash scripts/dev.sh demo|test [args]" >&2; exit 2 ;;
esac
