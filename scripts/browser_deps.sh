#!/usr/bin/env bash
# Installs what the browser tier needs, if it can: Debian's chromium (never a downloaded browser) and npm's
# playwright-core in a folder outside the repository (scripts/dev.sh finds it there). Root or sudo for
# apt-get. Exits 0 either way: without them the browser tests skip and say why.
set -uo pipefail
node_dir="${ECODIFF_NODE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ecodiff-node}"
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo -n"
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  echo "browser tier: installing Debian's chromium"
  $sudo apt-get update -qq >/dev/null 2>&1 && \
    DEBIAN_FRONTEND=noninteractive timeout 600 $sudo apt-get install -y -qq chromium >/dev/null 2>&1 || \
    echo "browser tier: chromium could not be installed; the browser tests will skip"
fi
if command -v npm >/dev/null 2>&1 && [ ! -d "$node_dir/node_modules/playwright-core" ]; then
  echo "browser tier: installing playwright-core into $node_dir"
  mkdir -p "$node_dir"
  timeout 300 npm install --silent --no-audit --no-fund --prefix "$node_dir" playwright-core >/dev/null 2>&1 || \
    echo "browser tier: playwright-core could not be installed; the browser tests will skip"
fi
exit 0
