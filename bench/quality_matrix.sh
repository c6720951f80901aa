#!/usr/bin/env bash
# The README's quality table: every recipe on the default model, then `lape-awq eval` on all of them.
# About 52 minutes on the 2-core CPU (seven AWQ runs of ~6.3 min each, two LAPE runs, two evals).
# Usage: bash bench/quality_matrix.sh [WORK_DIR]
set -euo pipefail
E=${1:-$(mktemp -d)}
MIX=ko,en,zh,ja,fr,es,vi,id
lape-awq neurons --quiet --out "$E/neurons.safetensors"
lape-awq neurons --quiet --top-rate 0.04 --out "$E/neurons-top4.safetensors"
q() { name=$1; shift; lape-awq quantize --quiet --out "$E/$name" "$@"; }
q rtn --method rtn
q awq-en --method awq --calib-langs en
q awq-opt-en --method awq-opt --calib-langs en --neurons "$E/neurons.safetensors"
q awq-opt-random-en --method awq-opt --calib-langs en --neurons "$E/neurons.safetensors" --random-neurons
q awq-mix8 --method awq --calib-langs $MIX
q awq-opt-mix8 --method awq-opt --calib-langs $MIX --neurons "$E/neurons.safetensors"
q awq-opt-random-mix8 --method awq-opt --calib-langs $MIX --neurons "$E/neurons.safetensors" --random-neurons
q awq-opt-top4-mix8 --method awq-opt --calib-langs $MIX --neurons "$E/neurons-top4.safetensors"
ckpts=()
for c in rtn awq-en awq-opt-en awq-opt-random-en awq-mix8 awq-opt-mix8 awq-opt-random-mix8 awq-opt-top4-mix8; do ckpts+=(--checkpoint "$E/$c"); done
lape-awq eval --quiet --langs ko,en --max-tokens 2048 --out "$E/eval-koen" "${ckpts[@]}"
lape-awq eval --quiet --langs zh,ja,fr,es,vi,id --max-tokens 512 --out "$E/eval-other" "${ckpts[@]}"
echo "results in $E/eval-koen and $E/eval-other"
