#!/usr/bin/env bash
# The README's quality tables: every recipe on the default model, then `lape-awq eval` on all of them.
# About 200 minutes on the 2-core CPU (fourteen AWQ / RTN runs of up to ~6.5 min each, nineteen GPTQ runs
# of 1.5-9 min, two LAPE runs, ten evals).
# Usage: bash bench/quality_matrix.sh [WORK_DIR]
#
# Five parts, each its own eval files (the report merges evals of the same texts):
# - the decoder recipes with the FP16 vocabulary (`--vocab-bits 16`), so they compare methods,
#   calibrations and neuron controls alone (bench/results/quality_2026-11-25);
# - the vocabulary at 8 and 4 bits on the default decoder recipe: `awq-v4-mix8` and `awq-opt-v4-mix8`
#   are exactly the default checkpoints of `lape-awq quantize` (bench/results/quality_2026-12-02);
# - GPTQ, AWQ + GPTQ and the language-weighted calibration with the FP16 vocabulary, beside part 1's
#   (bench/results/quality_2026-12-07);
# - GPTQ's act-order and quantized inputs, and the best of them as a whole recipe (part 4);
# - GPTQ's grid search on part 4's best recipe, with LAPE's / random kept neurons and as a whole recipe
#   (part 5, bench/results/quality_2026-12-07 *_gptq5_*).
set -euo pipefail
E=${1:-$(mktemp -d)}
MIX=ko,en,zh,ja,fr,es,vi,id
lape-awq neurons --quiet --out "$E/neurons.safetensors"
lape-awq neurons --quiet --top-rate 0.04 --out "$E/neurons-top4.safetensors"
q() { name=$1; shift; lape-awq quantize --quiet --out "$E/$name" "$@"; }
evals() { out=$1; shift; ckpts=(); for c in "$@"; do ckpts+=(--checkpoint "$E/$c"); done
  lape-awq eval --quiet --langs ko,en --max-tokens 2048 --out "$E/$out-koen" "${ckpts[@]}"
  lape-awq eval --quiet --langs zh,ja,fr,es,vi,id --max-tokens 512 --out "$E/$out-other" "${ckpts[@]}"; }

# Part 1: decoder recipes, FP16 vocabulary.
V16=(--vocab-bits 16)
q rtn --method rtn "${V16[@]}"
q awq-en --method awq --calib-langs en "${V16[@]}"
q awq-opt-en --method awq-opt --calib-langs en --neurons "$E/neurons.safetensors" "${V16[@]}"
q awq-opt-random-en --method awq-opt --calib-langs en --neurons "$E/neurons.safetensors" --random-neurons "${V16[@]}"
q awq-mix8 --method awq --calib-langs $MIX "${V16[@]}"
q awq-opt-mix8 --method awq-opt --calib-langs $MIX --neurons "$E/neurons.safetensors" "${V16[@]}"
q awq-opt-random-mix8 --method awq-opt --calib-langs $MIX --neurons "$E/neurons.safetensors" --random-neurons "${V16[@]}"
q awq-opt-top4-mix8 --method awq-opt --calib-langs $MIX --neurons "$E/neurons-top4.safetensors" "${V16[@]}"
evals decoder rtn awq-en awq-opt-en awq-opt-random-en awq-mix8 awq-opt-mix8 awq-opt-random-mix8 awq-opt-top4-mix8

# Part 2: the quantized vocabulary (the defaults: 4 bits; AWQ-opt keeps 2,048 Korean rows).
q awq-v8-mix8 --method awq --vocab-bits 8
q awq-v4-mix8 --method awq
q awq-opt-v4-mix8 --method awq-opt --neurons "$E/neurons.safetensors"
evals vocab awq-v8-mix8 awq-v4-mix8 awq-opt-v4-mix8

# Part 3: GPTQ and AWQ + GPTQ in the same format, with and without kept neurons (FP16 vocabulary, like
# part 1, so they compare with its awq-mix8 / awq-opt-mix8); c64, c128: 64 or 128 calibration sequences,
# not 16; ko2: Korean calibration tokens weigh twice the others' in the objectives.
q gptq-mix8 --method gptq "${V16[@]}"
q gptq-opt-mix8 --method gptq-opt --neurons "$E/neurons.safetensors" "${V16[@]}"
q gptq-opt-random-mix8 --method gptq-opt --neurons "$E/neurons.safetensors" --random-neurons "${V16[@]}"
q awq-gptq-mix8 --method awq-gptq "${V16[@]}"
q awq-gptq-opt-mix8 --method awq-gptq-opt --neurons "$E/neurons.safetensors" "${V16[@]}"
q gptq-c64-mix8 --method gptq --calib-samples 64 "${V16[@]}"
q gptq-opt-c64-mix8 --method gptq-opt --calib-samples 64 --neurons "$E/neurons.safetensors" "${V16[@]}"
q gptq-c128-mix8 --method gptq --calib-samples 128 "${V16[@]}"
q awq-opt-ko2-mix8 --method awq-opt --calib-weights ko=2 --neurons "$E/neurons.safetensors" "${V16[@]}"
# Other kept-neuron rules at LAPE's budget (79 Korean neurons on the default model): the most sensitive
# neurons of all (no LAPE), and the most sensitive of the LAPE top-rate 0.04 candidates.
q awq-opt-sens-mix8 --method awq-opt --neuron-rule sensitive --neurons "$E/neurons.safetensors" "${V16[@]}"
q awq-opt-lsens-mix8 --method awq-opt --neuron-rule lape-sensitive --max-neurons 79 \
  --neurons "$E/neurons-top4.safetensors" "${V16[@]}"
evals gptq gptq-mix8 gptq-opt-mix8 gptq-opt-random-mix8 awq-gptq-mix8 awq-gptq-opt-mix8 gptq-c64-mix8 \
  gptq-opt-c64-mix8 gptq-c128-mix8 awq-opt-ko2-mix8 awq-opt-sens-mix8 awq-opt-lsens-mix8

# Part 4: GPTQ's act-order (ao: columns by decreasing input energy, static grids) and quantized inputs (qi:
# each layer calibrated on its quantized predecessors' outputs), then the best of them as a whole recipe
# with the default 4-bit vocabulary and kept Korean neurons and rows, beside part 2's awq-opt-v4-mix8
# (bench/results/quality_2026-12-07, *_gptq4_*).
q gptq-ao-c64-mix8 --method gptq --calib-samples 64 --act-order "${V16[@]}"
q gptq-qi-c64-mix8 --method gptq --calib-samples 64 --quantized-inputs "${V16[@]}"
q gptq-ao-qi-c64-mix8 --method gptq --calib-samples 64 --act-order --quantized-inputs "${V16[@]}"
q gptq-ao-qi-c64-ko2-mix8 --method gptq --calib-samples 64 --act-order --quantized-inputs --calib-weights ko=2 "${V16[@]}"
q gptq-ao-qi-c128-mix8 --method gptq --calib-samples 128 --act-order --quantized-inputs "${V16[@]}"
q gptq-opt-ao-qi-c128-v4-mix8 --method gptq-opt --calib-samples 128 --act-order --quantized-inputs \
  --neurons "$E/neurons.safetensors"
q gptq-opt-ao-qi-c64-ko2-v4-mix8 --method gptq-opt --calib-samples 64 --act-order --quantized-inputs \
  --calib-weights ko=2 --neurons "$E/neurons.safetensors"
evals gptq4 gptq-ao-c64-mix8 gptq-qi-c64-mix8 gptq-ao-qi-c64-mix8 gptq-ao-qi-c64-ko2-mix8 gptq-ao-qi-c128-mix8 \
  gptq-opt-ao-qi-c128-v4-mix8 gptq-opt-ao-qi-c64-ko2-v4-mix8

# Part 5: GPTQ's grid search (gs: each group's range shrunk where the expected output error is least).
GS=(--calib-samples 64 --act-order --quantized-inputs --grid-search --calib-weights ko=2)
q gptq-ao-qi-gs-c64-ko2-mix8 --method gptq "${GS[@]}" "${V16[@]}"
q gptq-opt-ao-qi-gs-c64-ko2-mix8 --method gptq-opt "${GS[@]}" --neurons "$E/neurons.safetensors" "${V16[@]}"
q gptq-opt-random-ao-qi-gs-c64-ko2-mix8 --method gptq-opt "${GS[@]}" --neurons "$E/neurons.safetensors" \
  --random-neurons "${V16[@]}"
q gptq-opt-ao-qi-gs-c64-ko2-v4-mix8 --method gptq-opt "${GS[@]}" --neurons "$E/neurons.safetensors"
evals gptq5 gptq-ao-qi-gs-c64-ko2-mix8 gptq-opt-ao-qi-gs-c64-ko2-mix8 gptq-opt-random-ao-qi-gs-c64-ko2-mix8 \
  gptq-opt-ao-qi-gs-c64-ko2-v4-mix8
echo "results in $E/{decoder,vocab,gptq,gptq4,gptq5}-{koen,other}"
