"""Does the value head gain from reading several layers at once?

Cross-validates, by problem over 4 folds of the *training* problems, the
within-problem logistic head of ``piscale prm train`` on the features the
training run cached (layers 12, 18 and 24 of the backbone at every step
end), read four ways: layer 18 alone (the shipped head's layer), layers
12+18 and 12+18+24 concatenated, and their mean. Each fold's L2 strength is
chosen on the other folds alone, as ``prm train --folds`` does. No test
problem is read. Writes the measures as JSON.

    .venv/bin/python experiments/value_layers.py \\
        --db experiments/db/values-gsm8k_train-qwen2.5-coder-0.5b.sqlite --problems 300 \\
        --out experiments/values/value-layers-300.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from piscale.eval.store import ResultStore
from piscale.models import piscale_home
from piscale.values.train import cross_validated_scores, evaluate_scores, labelled_rollouts, step_table

CACHED_LAYERS = (12, 18, 24)


def cached_features(rollouts, cache: Path) -> list[np.ndarray]:
    """[layers, steps, hidden] per rollout from the training run's cache."""
    setting = json.loads((cache / "setting.json").read_text())
    if tuple(setting["layers"]) != CACHED_LAYERS:
        raise SystemExit(f"{cache} holds layers {setting['layers']}, not {list(CACHED_LAYERS)}")
    missing = [r.problem_id for r in rollouts if not (cache / f"{r.key}.npy").is_file()]
    if missing:
        raise SystemExit(f"{len(missing)} rollouts have no cached features (run piscale prm train first): {missing[:5]}")
    return [np.load(cache / f"{r.key}.npy").astype(np.float32) for r in rollouts]


def feature_folder() -> Path:
    """The training run's feature folder under $PISCALE_HOME, where there is one."""
    folders = sorted((piscale_home() / "value-features").glob("qwen2.5-coder-0.5b-instruct-*"))
    if len(folders) != 1:
        raise SystemExit(f"{len(folders)} feature folders found; pass --cache")
    return folders[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--problems", type=int, default=None)
    parser.add_argument("--cache", type=Path, default=None,
                        help="the feature folder (default: the one under $PISCALE_HOME/value-features)")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    rollouts = labelled_rollouts(ResultStore(args.db, read_only=True), args.problems)
    raw = cached_features(rollouts, args.cache or feature_folder())
    readings = {
        "layer 18": lambda f: f[[1]],
        "layers 12+18": lambda f: np.concatenate([f[0], f[1]], axis=-1)[None],
        "layers 12+18+24": lambda f: np.concatenate([f[0], f[1], f[2]], axis=-1)[None],
        "mean of 12, 18, 24": lambda f: f.mean(axis=0, keepdims=True),
    }
    report = {"db": str(args.db), "problems": args.problems, "rollouts": len(rollouts), "folds": args.folds,
              "machine": f"{platform.machine()}, 2 cores", "readings": {}}
    for name, read in readings.items():
        started = time.perf_counter()
        features = [read(f) for f in raw]
        scores, _ = cross_validated_scores(rollouts, features, [0], args.folds, seed=0, kind="logistic",
                                           objective="within")
        measured = evaluate_scores(scores, step_table(rollouts, features, 0), rollouts, np.arange(len(rollouts)))
        report["readings"][name] = {**measured.to_dict(), "seconds": round(time.perf_counter() - started, 1)}
        print(f"{name:20s} pairwise {measured.pairwise.accuracy:.3f}  step pairwise "
              f"{measured.step_pairwise.accuracy:.3f}  step AUROC {measured.step_auroc:.3f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
