#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks (it has torch 2.11, triton 3.6, Python 3.12, no network)
# into wheels/ (git-ignored), check they fit the device tool's 64 MiB carry limit, and stamp the commit that
# gpu_campaign.py records when the tree travels without .git. Run it before every device call (downloads once).
#   bash benchmarks/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
DEST=${HQCLIP_WHEELS:-wheels}
LIMIT_MIB=60   # 64 MiB carried in all, working tree included
# The peers of issue 8 and the project's own needs that the GPU image lacks (its pip list has none of these).
PACKAGES=(
    open_clip_torch==3.3.0   # ClipLoss and open_clip_train, the peers of bench_loss / bench_train / bench_towers
    inf-cl==1.2.1            # Inf-CL, the fused-loss peer
    xformers==0.0.35         # attention backend of bench_towers (needs torch >= 2.10)
    ftfy==6.3.1 wcwidth==0.9.4          # the tokenizer (ftfy needs wcwidth)
    webdataset==1.0.2 braceexpand==0.1.7  # the data loader
    omegaconf==2.4.0         # hqclip_fast.config, imported by the trainer step of bench_train
)
mkdir -p "$DEST"
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$DEST" "${PACKAGES[@]}"
commit=$(git rev-parse HEAD)
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then echo "$commit dirty" >"$DEST/COMMIT"; else echo "$commit" >"$DEST/COMMIT"; fi
ls -l "$DEST"
total_kib=$(du -sk "$DEST" | cut -f1)
echo "wheels: $((total_kib / 1024)) MiB in $DEST ($(cat "$DEST/COMMIT"))"
if [ "$total_kib" -gt $((LIMIT_MIB * 1024)) ]; then
    echo "fetch_gpu_wheels.sh: $DEST is over ${LIMIT_MIB} MiB; the device tool carries 64 MiB in all" >&2
    exit 1
fi
