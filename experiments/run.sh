#!/usr/bin/env bash
# The evaluation runs behind docs/results.md, in order. Each step resumes from
# its database, so running this again after any interruption loses nothing
# that was stored.
#
#   bash experiments/run.sh              # every step, in order
#   bash experiments/run.sh gsm8k-0.5b   # one step
#
# Live databases are in runs/ (not tracked: SQLite in WAL mode must not be
# copied while written). experiments/snapshot.sh copies them consistently into
# experiments/db/, which is tracked; a run with no live database starts from
# that snapshot.
set -euo pipefail
cd "$(dirname "$0")/.."
PISCALE=${PISCALE:-.venv/bin/piscale}
mkdir -p runs

# The grid every step runs, unless its function declares its own.
grid=(--reward arith --algorithms pf,bon,wbon,sc,dvts --budgets 1,2,4,8,16 --seeds 0
      --chunk-size 4 --parallel 3 --engine llamacpp)

step() {
  local name=$1; shift
  local live=runs/$name.sqlite snapshot=experiments/db/$name.sqlite
  if [[ ! -e $live && -e $snapshot ]]; then cp "$snapshot" "$live"; fi
  "$PISCALE" eval "$@" "${grid[@]}" --db "$live"
}

gsm8k_0_5b() {
  step gsm8k-qwen2.5-coder-0.5b --dataset gsm8k --limit 100 --model qwen2.5-coder-0.5b-instruct \
    --option max_tokens=512 --engine-option max_sequences=200 --engine-option context_length=1024
}
math500_0_5b() {
  step math500-qwen2.5-coder-0.5b --dataset math500 --limit 12 --model qwen2.5-coder-0.5b-instruct \
    --option max_tokens=1024 --engine-option max_sequences=200 --engine-option context_length=1536
}
gsm8k_1_5b() {
  step gsm8k-qwen2.5-coder-1.5b --dataset gsm8k --limit 10 --model qwen2.5-coder-1.5b-instruct \
    --option max_tokens=512 --engine-option max_sequences=200 --engine-option context_length=1024
}

# Particle filtering at budget 16 with a remedy for the narrowing of its
# population under a coarse reward, on the first 24 GSM8K problems:
# systematic resampling (particles tied at the top weight are each kept once
# instead of drawn at random). The database starts as the 0.5B GSM8K run's
# searches of those problems, so the report pairs the variant with every
# stored algorithm on the same problems.
gsm8k_0_5b_remedies() {
  local name=gsm8k-qwen2.5-coder-0.5b-remedies
  if [[ ! -e runs/$name.sqlite && ! -e experiments/db/$name.sqlite ]]; then
    cp experiments/db/gsm8k-qwen2.5-coder-0.5b.sqlite "runs/$name.sqlite"
    python3 - "runs/$name.sqlite" 24 <<'PY'
import sqlite3, sys
db, keep = sqlite3.connect(sys.argv[1]), [f"gsm8k-{i}" for i in range(int(sys.argv[2]))]
marks = ",".join("?" * len(keep))
for table in ("results", "failures", "searches"):
    db.execute(f"DELETE FROM {table} WHERE problem_id NOT IN ({marks})", keep)
db.commit()
db.execute("VACUUM")
PY
  fi
  local grid=(--reward arith --algorithms pf --budgets 16 --seeds 0 --chunk-size 4 --parallel 3 --engine llamacpp)
  step "$name" --dataset gsm8k --limit 24 --model qwen2.5-coder-0.5b-instruct \
    --option max_tokens=512 --option pf.resampler=systematic \
    --engine-option max_sequences=200 --engine-option context_length=1024
}

# Particle filtering with the correct-SMC options (the incremental potential,
# so that the weighted particles target p(x | c) r(x); systematic resampling
# only when ESS/N < 0.5) at budget 8, against the 100-problem run's
# baselines under the same reward (the arithmetic checker) on the same
# problems. The options are the textbook ones, fixed before this run and
# chosen on no test problem; the database starts as a copy of the
# 100-problem run's, so every pair is over the same problems and samples.
gsm8k_0_5b_smc() {
  local name=gsm8k-qwen2.5-coder-0.5b-smc
  if [[ ! -e runs/$name.sqlite && ! -e experiments/db/$name.sqlite ]]; then
    cp experiments/db/gsm8k-qwen2.5-coder-0.5b.sqlite "runs/$name.sqlite"
  fi
  local grid=(--reward arith --algorithms pf --budgets 8 --seeds 0 --chunk-size 4 --parallel 3 --engine llamacpp)
  step "$name" --dataset gsm8k --limit "${LIMIT:-100}" --model qwen2.5-coder-0.5b-instruct \
    --option max_tokens=512 --option pf.potential=incremental --option pf.resampler=systematic \
    --option pf.ess_threshold=0.5 --engine-option max_sequences=200 --engine-option context_length=1024
}

# Particle filtering against its baselines under the learned step value
# (experiments/values.sh trains it on GSM8K *training* rollouts; `value`
# names the head shipped in the package), on GSM8K *test* problems, none of
# which the value ever saw. One database; every invocation shares its
# configuration (model, reward, prompt), so every row pairs by problem:
#   1. bon, wbon and sc at budgets 1-32 (one set of 32 samples per problem,
#      subsampled for the smaller budgets; its candidates also give the
#      reward's pairwise accuracy on test problems);
#   2. pf with the correct-SMC options (incremental potential, systematic
#      resampling when ESS/N < 0.5) at 4 and 8; its weighted-vote answer
#      is re-chosen from the same particles;
#   3. pf with the paper's defaults at 8;
#   4. DVTS at 8.
# Problems come in blocks of BLOCK (default 8): every algorithm finishes a
# block before the next one starts, so a stop at any time leaves a complete,
# paired grid. LIMIT (default 200) is the last problem; re-running resumes.
gsm8k_0_5b_value() {
  local name=gsm8k-qwen2.5-coder-0.5b-value block=${BLOCK:-8} limit
  for (( limit = block; limit < ${LIMIT:-200} + block; limit += block )); do
    (( limit > ${LIMIT:-200} )) && limit=${LIMIT:-200}
    local common=(--dataset gsm8k --limit "$limit" --model qwen2.5-coder-0.5b-instruct --reward value
                  --option max_tokens=512 --seeds 0 --chunk-size 4 --parallel 3 --engine llamacpp
                  --engine-option max_sequences=200 --engine-option context_length=1024)
    grid=("${common[@]}" --algorithms bon,wbon,sc --budgets 1,2,4,8,16,32)
    step "$name"
    grid=("${common[@]}" --algorithms pf --budgets 4,8 --option pf.potential=incremental
          --option pf.resampler=systematic --option pf.ess_threshold=0.5)
    step "$name"
    grid=("${common[@]}" --algorithms pf --budgets 8)
    step "$name"
    grid=("${common[@]}" --algorithms dvts --budgets 8)
    step "$name"
  done
}

# The same particle filter as step 2 above (correct-SMC options, budget 8,
# under REWARD, default `value`), on the first LIMIT (default 100) test
# problems, whose best-of-N answers the 100-problem run already holds (bon@16,
# the same policy, prompt and sampling): experiments/reward_table.py
# re-scores those under the same reward, giving bon and wbon at 8 and 16 per
# problem with no new generation, and experiments/value_pairs.py pairs them
# with this run. SEEDS (default 0; e.g. 0,1) repeats the filter with other
# seeds on the same problems. Problems run in order and resume after a stop.
# REWARD='value*arith*final:certainty^10' steers by value*arith and weighs
# the policy's certainty in on the final particles only (a terminal
# potential). DB names the database (default
# gsm8k-qwen2.5-coder-0.5b-value-pf): a run whose configuration the default
# already holds under other code (final: was once applied at each answer's
# own end) goes to another, or it would resume as done.
gsm8k_0_5b_value_pf() {
  local grid=(--dataset gsm8k --limit "${LIMIT:-100}" --model qwen2.5-coder-0.5b-instruct --reward "${REWARD:-value}"
              --option max_tokens=512 --seeds "${SEEDS:-0}" --chunk-size 4 --parallel 3 --engine llamacpp
              --engine-option max_sequences=200 --engine-option context_length=1024
              --algorithms pf --budgets 8 --option pf.potential=incremental
              --option pf.resampler=systematic --option pf.ess_threshold=0.5)
  step "${DB:-gsm8k-qwen2.5-coder-0.5b-value-pf}"
}

# A second set of 16 answers per problem for the first LIMIT (default 100)
# test problems: best-of-N at 16 with seed 1, the same policy, prompt,
# sampling and reward as the first section's run (so the same configuration
# key), in a database of its own so that the first section's tables keep
# their one seed. experiments/reward_table.py reads both databases as 32
# independent answers per problem, which gives best-of-N and weighted
# best-of-N at 32 under any reward re-scored there:
#   python experiments/reward_table.py experiments/db/gsm8k-qwen2.5-coder-0.5b.sqlite \
#     experiments/db/gsm8k-qwen2.5-coder-0.5b-bon-seed1.sqlite --budget 16 --select-budgets 8,16,32 ...
gsm8k_0_5b_bon_seed1() {
  local grid=(--reward arith --algorithms bon --budgets 16 --seeds 1 --chunk-size 4 --parallel 3 --engine llamacpp)
  step gsm8k-qwen2.5-coder-0.5b-bon-seed1 --dataset gsm8k --limit "${LIMIT:-100}" --model qwen2.5-coder-0.5b-instruct \
    --option max_tokens=512 --engine-option max_sequences=200 --engine-option context_length=1024
}

# The same filter and its baselines on the next held-out test problems,
# FIRST to FIRST+99 (100-199, then 200-299), under value*arith, the reward
# the 100-problem run above was fixed on (chosen on training problems
# only): bon, wbon and sc from one set of 8 answers per problem, and the
# filter at 8 with the correct-SMC options, in blocks of BLOCK (default 8)
# problems so that a stop leaves a paired grid. LIMIT (default 100)
# problems past FIRST; resumes. experiments/value_pairs.py pairs the
# filter's weighted vote with wbon@8 over one database's problems, and
# experiments/pool_pairs.py over all of them with the run above.
gsm8k_0_5b_value_from() {
  local first=$1 block=${BLOCK:-8} limit
  local name=gsm8k-qwen2.5-coder-0.5b-value-$first-$((first + 99))
  for (( limit = block; limit < ${LIMIT:-100} + block; limit += block )); do
    (( limit > ${LIMIT:-100} )) && limit=${LIMIT:-100}
    local common=(--dataset gsm8k --skip "$first" --limit "$limit" --model qwen2.5-coder-0.5b-instruct
                  --reward 'value*arith' --option max_tokens=512 --seeds 0 --chunk-size 4 --parallel 3
                  --engine llamacpp --engine-option max_sequences=200 --engine-option context_length=1024)
    grid=("${common[@]}" --algorithms bon,wbon,sc --budgets 8)
    step "$name"
    grid=("${common[@]}" --algorithms pf --budgets 8 --option pf.potential=incremental
          --option pf.resampler=systematic --option pf.ess_threshold=0.5)
    step "$name"
  done
}

# The development set: GSM8K training problems from 300 on, past the 300 the
# shipped value head was fitted on, for choosing a filter's reward and
# settings without looking at the test problems. Best-of-N, weighted
# best-of-N and self-consistency at 8 and 16 (16 answers per problem,
# subsampled at 8) and the filter at 8 with the correct-SMC options, under
# REWARD (default value*arith), in blocks of BLOCK (default 8) problems so
# that a stop leaves a paired grid. LIMIT (default 100) problems; resumes.
# BASELINES=0 runs the filter alone (for another REWARD whose baselines
# experiments/reward_table.py can give from the stored answers).
gsm8k_train_dev() {
  local name=gsm8k_train-qwen2.5-coder-0.5b-dev block=${BLOCK:-8} limit
  for (( limit = block; limit < ${LIMIT:-100} + block; limit += block )); do
    (( limit > ${LIMIT:-100} )) && limit=${LIMIT:-100}
    local common=(--dataset gsm8k_train --skip 300 --limit "$limit" --model qwen2.5-coder-0.5b-instruct
                  --reward "${REWARD:-value*arith}" --option max_tokens=512 --seeds 0 --chunk-size 4 --parallel 3
                  --engine llamacpp --engine-option max_sequences=200 --engine-option context_length=1024)
    if [[ ${BASELINES:-1} != 0 ]]; then
      grid=("${common[@]}" --algorithms bon,wbon,sc --budgets 8,16)
      step "$name"
    fi
    grid=("${common[@]}" --algorithms pf --budgets 8 --option pf.potential=incremental
          --option pf.resampler=systematic --option pf.ess_threshold=0.5)
    step "$name"
  done
}

case "${1:-all}" in
  gsm8k-0.5b) gsm8k_0_5b ;;
  math500-0.5b) math500_0_5b ;;
  gsm8k-1.5b) gsm8k_1_5b ;;
  gsm8k-0.5b-remedies) gsm8k_0_5b_remedies ;;
  gsm8k-0.5b-value) gsm8k_0_5b_value ;;
  gsm8k-0.5b-smc) gsm8k_0_5b_smc ;;
  gsm8k-0.5b-value-pf) gsm8k_0_5b_value_pf ;;
  gsm8k-0.5b-bon-seed1) gsm8k_0_5b_bon_seed1 ;;
  gsm8k-train-dev) gsm8k_train_dev ;;
  gsm8k-0.5b-value-100-199) gsm8k_0_5b_value_from 100 ;;
  gsm8k-0.5b-value-200-299) gsm8k_0_5b_value_from 200 ;;
  all) gsm8k_0_5b; math500_0_5b; gsm8k_1_5b; gsm8k_0_5b_remedies ;;
  *) echo "unknown step: $1 (gsm8k-0.5b | math500-0.5b | gsm8k-1.5b | gsm8k-0.5b-remedies | gsm8k-0.5b-value | gsm8k-0.5b-smc | gsm8k-0.5b-value-pf | gsm8k-0.5b-bon-seed1 | gsm8k-train-dev | gsm8k-0.5b-value-100-199 | gsm8k-0.5b-value-200-299 | all)" >&2; exit 2 ;;
esac
