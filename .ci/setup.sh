#!/usr/bin/env bash
# Everything the tests need on a fresh machine: the test host in .venv and the headless browser
# of the editor test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-host.sh .venv
bash .ci/install-browser.sh
