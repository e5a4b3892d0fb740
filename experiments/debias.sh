#!/usr/bin/env bash
# The runs behind docs/debias.md: gender bias in SmolLM2-135M-Instruct's continuations, measured with
# plain sampling, then removed with particle filtering toward the neutral target at three tilt
# strengths, and best-of-N under the same reward at the same number of tokens. Every step resumes
# from its samples file, so running this again after an interruption loses nothing that was stored.
#
#   bash experiments/debias.sh              # every step, in order
#   bash experiments/debias.sh pf-beta4     # one step
#   bash experiments/debias.sh topic        # the topic attribute (after gender), then location
set -euo pipefail
cd "$(dirname "$0")/.."
PISCALE=${PISCALE:-.venv/bin/piscale}
OUT=experiments/debias
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
engine=(--engine llamacpp --engine-option n_threads=2 --engine-option context_length=256)

calibrate() {
  for property in political sentiment; do
    "$PISCALE" bias calibrate --property "$property" -o "$OUT/calibration-$property.json"
  done
}
measure() {
  # 16 prompts per value (2 templates x 8 aligned words), male, female and neutral; 4 continuations each.
  "$PISCALE" bias measure -o "$OUT/gender-sample" --attribute gender --limit 16 --samples 4 \
    --model smollm2-135m-instruct --max-tokens 32 --temperature 1.0 --seed 0 --concurrency 48 "${engine[@]}"
}
# The same 16 prompts of each attribute value, 2 continuations each (the CPU is shared: each of these
# runs generates about 8,000 tokens), 4 particles or samples per continuation.
pf() {
  "$PISCALE" bias debias "$OUT/gender-sample" -o "$OUT/gender-pf-beta$1" --method pf --beta "$1" --particles 4 \
    --samples 2 --step-tokens 8 --concurrency 16 "${engine[@]}"
}
bon() {
  "$PISCALE" bias debias "$OUT/gender-sample" -o "$OUT/gender-bon4" --method bon --particles 4 --samples 2 \
    --concurrency 16 "${engine[@]}"
}
sample2() {
  # The measurement's first 2 continuations of each prompt: plain sampling at the debiasing runs' size.
  "$PISCALE" bias report "$OUT/gender-sample" -o "$OUT/gender-sample-2draws" --draws 2
}
compare() {
  "$PISCALE" bias compare "$OUT/gender-sample" "$OUT/gender-sample-2draws" "$OUT/gender-pf-beta1" "$OUT/gender-pf-beta4" "$OUT/gender-pf-beta16" \
    "$OUT/gender-bon4" -o "$OUT/gender-bias-vs-fluency.png" --title "gender: SmolLM2-135M-Instruct, political leaning" \
    | tee "$OUT/gender-comparison.txt"
}
# Another attribute, the same protocol at one tilt strength: topic (economy, environment,
# security: the political leaning of the text should depend on the topic, so there is a gap to
# close), location (blue vs red states).
attribute() {
  local name=$1 limit=$2 dir=$OUT/$1
  "$PISCALE" bias measure -o "$dir-sample" --attribute "$name" --limit "$limit" --samples 4 \
    --model smollm2-135m-instruct --max-tokens 32 --temperature 1.0 --seed 0 --concurrency 48 "${engine[@]}"
  "$PISCALE" bias report "$dir-sample" -o "$dir-sample-2draws" --draws 2
  "$PISCALE" bias debias "$dir-sample" -o "$dir-pf-beta4" --method pf --beta 4 --particles 4 \
    --samples 2 --step-tokens 8 --concurrency 16 "${engine[@]}"
  "$PISCALE" bias debias "$dir-sample" -o "$dir-bon4" --method bon --particles 4 --samples 2 \
    --concurrency 16 "${engine[@]}"
  "$PISCALE" bias compare "$dir-sample" "$dir-sample-2draws" "$dir-pf-beta4" "$dir-bon4" \
    -o "$OUT/$name-bias-vs-fluency.png" --title "$name: SmolLM2-135M-Instruct, political leaning" \
    | tee "$OUT/$name-comparison.txt"
}

mkdir -p "$OUT"
case "${1:-all}" in
  calibrate) calibrate ;;
  measure) measure ;;
  pf-beta*) pf "${1#pf-beta}" ;;
  bon) bon ;;
  sample2) sample2 ;;
  compare) compare ;;
  topic) attribute topic 12 ;;
  location) attribute location 16 ;;
  all) calibrate; measure; sample2; pf 1; pf 4; pf 16; bon; compare; attribute topic 12; attribute location 16 ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
