#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks (it has torch 2.11, triton 3.6, Python 3.12, no network)
# into wheels/ (git-ignored), stamp the commit being measured, and check that the working tree plus wheels/
# fit the device tool's 64 MiB carry limit. Run it right before every device call (downloads once).
#   bash benchmarks/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
DEST=${HQCLIP_WHEELS:-wheels}
LIMIT_MIB=64
# What the GPU image lacks (../shared/GPU.md) for the campaign's steps: the peers, the project's own imports.
PACKAGES=(
    open_clip_torch==3.3.0   # ClipLoss and open_clip_train: the loss and training-step peers (call 1)
    inf-cl==1.2.1            # Inf-CL, the fused-loss peer (call 1)
    ftfy==6.3.1 wcwidth==0.9.4            # open_clip's and our tokenizer (ftfy needs wcwidth)
    webdataset==1.0.2 braceexpand==0.1.7  # hqclip_fast.data, imported by the trainer
    omegaconf==2.4.0         # hqclip_fast.config, imported by the trainer
    xformers==0.0.35         # the towers' attention backend (call 2; needs torch >= 2.10)
)
mkdir -p "$DEST"
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$DEST" "${PACKAGES[@]}"
# The tree travels without .git: gpu_campaign.py checks every file against these blob hashes, so results are
# stamped with this commit only if the tree measured is this commit.
{ git rev-parse HEAD; git -c core.quotePath=false ls-tree -r HEAD; } >"$DEST/COMMIT"
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo "fetch_gpu_wheels.sh: uncommitted changes; the call's results will be marked dirty" >&2
fi
ls -l "$DEST"
# What the call carries: tracked and untracked-but-not-ignored files, plus wheels/.
tree_kib=$(git ls-files -z --cached --others --exclude-standard | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
wheels_kib=$(du -sk "$DEST" | cut -f1)
echo "carry: working tree $((tree_kib / 1024)) MiB + $DEST $((wheels_kib / 1024)) MiB; commit $(head -1 "$DEST/COMMIT")"
if [ $((tree_kib + wheels_kib)) -gt $((LIMIT_MIB * 1024)) ]; then
    echo "fetch_gpu_wheels.sh: over the device tool's ${LIMIT_MIB} MiB carry limit" >&2
    exit 1
fi
