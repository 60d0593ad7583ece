#!/usr/bin/env bash
# Set up (see setup.sh) and open napari on the embedded default: the synthetic H&E / HER2 IHC
# whole-slide pair, the built-in model and all widgets. Without a display it runs under Xvfb,
# saves a screenshot to demo.png and exits.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh demo
if [ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ]; then
  exec .venv/bin/napari-bci demo "$@"
else
  echo "demo: no display found; running under Xvfb and saving a screenshot to demo.png" >&2
  exec xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/napari-bci demo --screenshot demo.png "$@"
fi
