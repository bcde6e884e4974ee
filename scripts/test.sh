#!/usr/bin/env bash
# Set up and run the test suite on a fresh machine (CPU-only): the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's Chromium drives the browser test (Playwright's own browser download is not used).
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the browser test will skip"
  fi
fi
# torch==2.13.0 first and in the same resolve, so a CPU machine never pulls a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0" -e ".[test]"
python -m ruff check seekling tests benchmarks
python -m pytest -q -p no:cacheprovider "$@"
