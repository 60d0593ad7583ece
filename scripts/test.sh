#!/usr/bin/env bash
# Set up (see setup.sh) and run the test suite; GUI tests get a real GL context from Xvfb + Mesa
# through pytest-xvfb.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest "$@"
