#!/usr/bin/env bash
# The GPU campaign on the device machine (torch and triton there, no network): install the carried wheels
# (benchmarks/fetch_gpu_wheels.sh fills wheels/ here), put the project on the path, run gpu_campaign.py.
#   bash benchmarks/gpu_campaign.sh                                   # the one call (see benchmarks/README.md)
#   PYTHON=.venv/bin/python bash benchmarks/gpu_campaign.sh --device cpu   # the same call on a CPU, tiny sizes
# Arguments go to benchmarks/gpu_campaign.py (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${HQCLIP_WHEELS:-wheels}
SITE=${HQCLIP_SITE:-/tmp/hqclip-site}
SRC=${HQCLIP_SRC:-/tmp/hqclip-src}

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
else
    echo "gpu_campaign.sh: no wheels in $WHEELS/ (run benchmarks/fetch_gpu_wheels.sh and carry wheels); peers will be skipped" >&2
fi
# The packages sit one level down in kernels/ and recaption/, so link them into one path entry instead of an
# editable install (which would need setuptools from the network).
mkdir -p "$SRC"
ln -sfn "$PWD/hqclip_fast" "$SRC/hqclip_fast"
ln -sfn "$PWD/kernels/hqclip_kernels" "$SRC/hqclip_kernels"
ln -sfn "$PWD/recaption/hqclip_recaption" "$SRC/hqclip_recaption"
export PYTHONPATH="$SRC:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_campaign.py "$@"
