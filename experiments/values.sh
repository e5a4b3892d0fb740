#!/usr/bin/env bash
# A step value learned from the policy's own graded rollouts (piscale prm
# collect / train), in order. Every collection step resumes from its
# database, so running this again after any interruption loses only the
# problems that were in flight; training reuses the features it cached.
#
#   bash experiments/values.sh            # every step, in order
#   bash experiments/values.sh pilot      # one step
#
# Rollouts come from GSM8K *training* problems only (gsm8k_train); the test
# problems stay untouched for evaluation. The live database is in runs/ (not
# tracked); experiments/snapshot.sh copies it into experiments/db/.
set -euo pipefail
cd "$(dirname "$0")/.."
PISCALE=${PISCALE:-.venv/bin/piscale}
ENGINE=${ENGINE:-llamacpp}
mkdir -p runs

name=values-gsm8k_train-qwen2.5-coder-0.5b
live=runs/$name.sqlite snapshot=experiments/db/$name.sqlite
if [[ ! -e $live && -e $snapshot ]]; then cp "$snapshot" "$live"; fi

# One policy and one sampling setting (the ones particle filtering runs the
# GSM8K evaluations with: temperature 0.8, steps end at a blank line, 512
# tokens), so the pilot's problems are the first ones of the larger run.
collect=(--dataset gsm8k_train --model qwen2.5-coder-0.5b-instruct --engine "$ENGINE"
         --max-tokens 512 --temperature 0.8 --db "$live"
         --engine-option n_threads=2 --engine-option max_sequences=128 --engine-option context_length=1024)

# 20 problems x 4 rollouts: does the policy solve some but not all of a
# problem's rollouts often enough for labels to carry information?
pilot() { "$PISCALE" prm collect "${collect[@]}" --limit 20 --rollouts 4 --seed 0 --parallel 6; }

# The training set: the first 300 problems x 4 rollouts (the pilot's 20 included).
# The first heads were fitted on the first 139, where the run stood then; the
# held-out pairwise accuracy (0.66 against 0.76 on the training folds) asked
# for more problems with both outcomes, so the run goes on past 200.
rollouts() { "$PISCALE" prm collect "${collect[@]}" --limit 300 --rollouts 4 --seed 0 --parallel 8; }

# Pairs of answers to the same problem, one right and one wrong, are what a
# within-problem head learns from, and problems the policy never solves have
# none. So: 8 more rollouts (seed 1) of each of the first 139 problems that
# had at least one correct rollout of 4, written to a JSONL file that keeps
# their ids (gsm8k_train-N), so the new rollouts pair with the old ones.
more() {
  local subset=runs/gsm8k_train-solvable-139.jsonl
  .venv/bin/python - "$live" "$subset" <<'PY'
import gzip, json, sys
from collections import defaultdict
from importlib.resources import files
from piscale.eval.store import ResultStore
from piscale.values.train import labelled_rollouts
correct = defaultdict(list)
for r in labelled_rollouts(ResultStore(sys.argv[1], read_only=True), first=139):
    correct[r.problem_id].append(r.correct)
with gzip.open(files("piscale.data") / "gsm8k_train.jsonl.gz", "rt") as source, open(sys.argv[2], "w") as out:
    for index, line in enumerate(source):
        if any(correct.get(f"gsm8k_train-{index}", [])):
            out.write(json.dumps({**json.loads(line), "id": f"gsm8k_train-{index}"}) + "\n")
PY
  "$PISCALE" prm collect "${collect[@]}" --dataset "$subset" --rollouts 8 --seed 1 --parallel 8
}

# Monte-Carlo labels (Math-Shepherd) on a subset: 4 completions from every
# unfinished prefix of 4 more rollouts (seed 1) of the first 20 problems.
monte_carlo() {
  "$PISCALE" prm collect "${collect[@]}" --limit 20 --rollouts 4 --seed 1 --parallel 2 \
    --mc-completions 4 --mc-problems 20
}

# Heads on two backbones: the policy itself (Qwen2.5-Coder-0.5B through
# transformers) and SmolLM2-135M; each tries its middle, 3/4 and last layer
# and four regularisation strengths, chosen on held-out problems (25%).
train_qwen() {
  "$PISCALE" prm train --db "$live" --backbone qwen2.5-coder-0.5b-instruct --seed 0 \
    --out runs/value-qwen2.5-coder-0.5b.safetensors --report runs/value-qwen2.5-coder-0.5b.json
}
train_smollm() {
  "$PISCALE" prm train --db "$live" --backbone smollm2-135m-instruct --seed 0 \
    --out runs/value-smollm2-135m.safetensors --report runs/value-smollm2-135m.json
}

# Ship the chosen head (HEAD=runs/value-....safetensors) as the package's
# default: copied into src/piscale/rewards/heads/ with its sha256, backbone,
# and the command, data hash and seed that trained it in manifest.json.
ship() {
  local head=${HEAD:?set HEAD to the head file to ship}
  cp "$head" src/piscale/rewards/heads/default.safetensors
  .venv/bin/python - src/piscale/rewards/heads <<'PY'
import json, sys
from pathlib import Path
from piscale.rewards.value import HeadFile, file_sha256
folder = Path(sys.argv[1])
path = folder / "default.safetensors"
meta = HeadFile.read(path).metadata
entry = {
    "file": path.name, "sha256": file_sha256(path), "backbone": meta["backbone"], "dtype": meta.get("dtype"),
    "layer": meta["layer"], "policy": meta["policy"], "training": meta["training"],
    "validation": meta["metrics"]["validation"], "baselines_on_validation": meta["metrics"]["baselines_on_validation"],
}
(folder / "manifest.json").write_text(json.dumps({"default": entry}, indent=2, sort_keys=True) + "\n")
print(json.dumps(entry, indent=2))
PY
}

# Parsed whole before it runs, so editing this file during a long step is safe.
main() {
  case "${1:-all}" in
    pilot) pilot ;;
    rollouts) rollouts ;;
    more) more ;;
    monte-carlo) monte_carlo ;;
    train-qwen) train_qwen ;;
    train-smollm) train_smollm ;;
    ship) ship ;;
    all) pilot; rollouts; more; monte_carlo; train_qwen; train_smollm ;;
    *) echo "unknown step: $1 (pilot | rollouts | more | monte-carlo | train-qwen | train-smollm | ship | all)" >&2; exit 2 ;;
  esac
}

main "$@"; exit
