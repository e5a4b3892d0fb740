"""The learned value served on its whole backbone against one cut above the layer it reads.

The shipped head reads one hidden layer of its backbone (layer 18 of
Qwen2.5-Coder-0.5B's 24 blocks); ``load_value_reward`` drops the blocks above
it and the final norm (``keep_blocks_below``). Workload: the first
``--answers`` stored best-of-N answers of each of ``--problems`` GSM8K test
problems, scored as particle filtering scores them: all answers of a problem
together, one more blank-line step at a time, incremental over the value's
cache, ``model`` aggregation. The two backbones run the workload in turn,
``--repeats`` times each, in one process, so that both see the same machine
load; reported: the median wall time of each, their ratio, the tokens read,
and the largest difference between the two backbones' scores (they must
agree). Results go to ``bench/results/value_cut.json``.

    OMP_NUM_THREADS=2 python bench/bench_value_cut.py
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from _report import header, settings

from piscale.eval.store import ResultStore
from piscale.models import load_transformers
from piscale.rewards.aggregate import answer_steps, score_trajectories
from piscale.rewards.value import HeadFile, StepValueReward, keep_blocks_below, shipped_head_path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def stored_answers(database: Path, problems: int, answers: int) -> list[tuple[str, list[list[str]]]]:
    """(question, answers cut at blank lines) for the first ``problems``
    problems holding a best-of-N search at budget 16."""
    store = ResultStore(database, read_only=True)
    [config] = [c["config_key"] for c in store.configs()]
    rows = sorted(
        (r for r in store.results(config) if r["algorithm"] == "bon" and r["budget"] == 16),
        key=lambda r: int(r["problem_id"].rsplit("-", 1)[1]),
    )
    found = []
    for row in rows[:problems]:
        search = store.search(row["search_id"])
        texts = [c["text"] for c in search["candidates"][:answers]]
        found.append((search["question"], [answer_steps(t) for t in texts]))
    return found


def score_growing(reward: StepValueReward, workload) -> tuple[float, list[float]]:
    """Seconds to score the workload step by step, and every final score."""
    started = time.perf_counter()
    finals = []
    for question, steps in workload:
        depth = max(len(s) for s in steps)
        for t in range(1, depth + 1):
            scores = asyncio.run(score_trajectories(reward, [question] * len(steps), [s[:t] for s in steps], "model"))
        finals += scores
    return time.perf_counter() - started, finals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", type=Path, default=ROOT / "experiments/db/gsm8k-qwen2.5-coder-0.5b.sqlite")
    parser.add_argument("--problems", type=int, default=2)
    parser.add_argument("--answers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default=None, help="the backbone's dtype (default: the head's, as served)")
    parser.add_argument("--output", type=Path, default=RESULTS / "value_cut.json")
    args = parser.parse_args()
    started_at = time.time()

    path = shipped_head_path()
    head_file = HeadFile.read(path)
    meta = head_file.metadata
    dtype = args.dtype or meta.get("dtype", "float32")
    whole_model, tokenizer = load_transformers(meta["backbone"], dtype=dtype)
    cut_model = copy.deepcopy(whole_model)
    layer = keep_blocks_below(cut_model, int(meta["layer"]))
    layout = meta["layout"]

    def reward(model, layer: int) -> StepValueReward:
        return StepValueReward(model, tokenizer, head_file.head, layer=layer, system_prompt=layout.get("system_prompt"),
                               prompt_format=layout.get("prompt_format"))

    workload = stored_answers(args.database, args.problems, args.answers)
    runs: dict[str, list[float]] = {"whole": [], "cut": []}
    finals: dict[str, list[float]] = {}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, model, read in (("whole", whole_model, int(meta["layer"])), ("cut", cut_model, layer)):
            fresh = reward(model, read)  # a fresh cache each time: every run reads the same tokens
            seconds, finals[name] = score_growing(fresh, workload)
            runs[name].append(round(seconds, 2))
            tokens[name] = fresh.usage.scored_tokens
    whole, cut = statistics.median(runs["whole"]), statistics.median(runs["cut"])
    report = {
        **header("value_cut", started_at, torch=torch.__version__, torch_threads=torch.get_num_threads()),
        "settings": settings(args),
        "head": path.name,
        "backbone": meta["backbone"],
        "dtype": dtype,
        "blocks": {"whole": whole_model.config.num_hidden_layers, "cut": cut_model.config.num_hidden_layers},
        "layer_read": int(meta["layer"]),
        "seconds": runs,
        "median_seconds": {"whole": whole, "cut": cut},
        "cut_over_whole": round(cut / whole, 3),
        "tokens_read": tokens,
        "largest_score_difference": max(abs(a - b) for a, b in zip(finals["whole"], finals["cut"])),
        "answers_scored": len(finals["cut"]),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("dtype", "blocks", "median_seconds", "cut_over_whole", "tokens_read",
                                             "largest_score_difference")}, indent=2))


if __name__ == "__main__":
    main()
