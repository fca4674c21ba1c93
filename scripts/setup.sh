#!/usr/bin/env bash
# Set up D3PO Studio in ./.venv on a fresh machine (CPU or GPU).
#   scripts/setup.sh          the app and the library
#   scripts/setup.sh --test   also the test tools and headless Chromium (for the browser test)
# torch is installed first and pinned, so that no other package pulls a different (multi-GB) build.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH="${D3PO_TORCH:-torch==2.13.0}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH"
pin=$(.venv/bin/python -c "import torch; print('torch==' + torch.__version__)")
extras=""
if [ "${1:-}" = "--test" ]; then
  extras="[test]"
  if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; the browser test will be skipped"
  fi
fi
.venv/bin/python -m pip install -q -c <(echo "$pin") -e ".${extras}"
echo "setup: done ($pin)"
