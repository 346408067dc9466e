#!/usr/bin/env bash
# Installs the headless browser that tests/test_editor.py drives (Debian's chromium, no
# recommended extras: the tests need no GPU driver, printer or desktop services). The tests
# talk to it over --remote-debugging-pipe with the standard library, so no Python package is
# needed. Skipped when a chromium is already on PATH.
set -euo pipefail
if command -v chromium >/dev/null; then
    echo "browser ready: $(chromium --version 2>/dev/null)"
    exit 0
fi
LOG="$(mktemp)"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; } >"$LOG" 2>&1; then
    cat "$LOG" >&2
    exit 1
fi
rm -f "$LOG"
echo "browser ready: $(chromium --version 2>/dev/null)"
