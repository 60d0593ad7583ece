#!/usr/bin/env bash
# Set up (see setup.sh) and run the test suite; GUI tests get a real GL context from Xvfb + Mesa
# through pytest-xvfb. Test files run in parallel (pytest-xdist, one worker per core, at most 4;
# a file's tests stay in one worker so that its module fixtures are built once); pass -n 0 to
# run in one process.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -n auto --maxprocesses 4 --dist loadfile "$@"
