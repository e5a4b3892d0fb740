"""Every algorithm end to end on a real model, and ``solve_many`` vs separate solves.

1. Runs each algorithm (pf, pg, pt, bon, wbon, sc, beam, dvts) on one GSM8K
   question and records its answer, tokens and wall time.
2. Solves ``--questions`` GSM8K questions with particle filtering twice: once
   with one ``solve_many`` call (the backend merges their steps into shared
   forward passes) and once question by question; records the backend's
   forward passes and wall time for both, and whether the answers agree.

    python bench/bench_solve_many.py --model smollm2-135m-instruct --engine hf

Writes ``bench/results/solve_many-<label>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from piscale.api import load_lm, load_reward
from piscale.search import ALGORITHMS, run, run_many

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"


def questions(n: int) -> list[str]:
    with open(DATA) as handle:
        return [json.loads(line)["question"] for _, line in zip(range(n), handle)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--engine", default="hf")
    parser.add_argument("--reward", default="arith")
    parser.add_argument("--budget", type=int, default=4)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--max-step-tokens", type=int, default=32)
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated; empty to skip part 1")
    parser.add_argument("--label", default=None)
    args = parser.parse_args()

    lm = load_lm(args.model, engine=args.engine)
    reward = load_reward(args.reward, policy=lm, policy_spec=args.model, engine=args.engine)
    options = {"max_steps": args.max_steps, "max_step_tokens": args.max_step_tokens}
    problems = questions(args.questions)
    result: dict = {"model": args.model, "engine": type(lm).__name__, "reward": args.reward, "budget": args.budget,
                    "options": options, "algorithms": {}}

    async def every_algorithm():
        for name in filter(None, args.algorithms.split(",")):
            budget = max(8, args.budget) if name in ("pg", "pt") else args.budget
            start = time.perf_counter()
            solved = await run(lm, None if name == "sc" else reward, problems[0], algorithm=name, budget=budget,
                               seed=0, **options)
            result["algorithms"][name] = {"answer": solved.answer, "budget": budget, "usage": solved.usage,
                                          "wall_time_s": time.perf_counter() - start}
            print(f"{name:5s} answer={solved.answer!r} tokens={solved.usage['generated_tokens']}")

    async def together():
        return await run_many(lm, reward, problems, algorithm="pf", budget=args.budget, seed=0, **options)

    async def separately():
        return [await run(lm, reward, q, algorithm="pf", budget=args.budget, seed=0, **options) for q in problems]

    asyncio.run(every_algorithm())
    for name, solve in (("solve_many", together), ("separate", separately)):
        before = lm.usage.snapshot()
        start = time.perf_counter()
        answers = asyncio.run(solve())
        usage = lm.usage.since(before)
        result[name] = {"forward_passes": usage.forward_passes, "generated_tokens": usage.generated_tokens,
                        "wall_time_s": time.perf_counter() - start, "answers": [a.answer for a in answers]}
        print(f"{name}: {usage.forward_passes} forward passes, {result[name]['wall_time_s']:.1f}s")
    result["same_answers"] = result["solve_many"]["answers"] == result["separate"]["answers"]
    label = args.label or f"{args.model}-{args.engine}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"solve_many-{label}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
