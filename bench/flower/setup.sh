#!/usr/bin/env bash
# A separate venv with Flower (flwr) + numpy for bench/flower/run.py; nothing of pluralfed's.
# Usage: bench/flower/setup.sh [VENV_DIR]   (default bench/.flower-venv; git-ignore it)
# flwr 1.22.0 by default: its SuperLink Fleet API is gRPC (grpc-rere). From about 1.37 on, Flower
# moved its Runtime/Control (and in 1.42 Fleet) APIs to HTTP; set FLWR_VERSION to try another.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:-$here/../.flower-venv}"
py="${PYTHON:-python3.11}"
if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "flwr==${FLWR_VERSION:-1.22.0}" numpy cryptography
"$venv/bin/python" -c "import flwr, numpy; print('flwr', flwr.__version__, 'numpy', numpy.__version__)"
ls "$venv/bin" | grep -E '^(flwr|flower-)' || true
