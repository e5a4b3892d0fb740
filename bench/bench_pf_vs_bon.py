"""Particle filtering versus best-of-N: the cost of searching step by step.

Both algorithms get the same model, budget (N particles / N samples), token
cap per answer and sampling temperature, on the same questions (the first
``--questions`` GSM8K test problems, solved together with ``run_many``):

* ``bon``: N complete answers per question in one ``extend`` call each;
* ``pf``: N particles per question advanced one step ("\\n\\n") at a time,
  scored after every step, resampled (multinomial, every step): resampling
  forks backend sequences, it never re-reads a prefix.

The reward is a stand-in that costs nothing (a hash of the partial answer
mapped into (0, 1)), so the comparison measures generation and the search's
own overhead, not a reward model. Reported per algorithm: wall time (median
of ``--repeats`` runs, the two algorithms alternating), generated and
prefilled tokens, forward passes, and the wall-time ratio pf / bon (target:
at most 1.3; the ideal is 1.0, since the same number of tokens is generated).
Because the two algorithms do not generate exactly the same number of tokens,
the ratio of seconds per generated token is reported too.

    python bench/bench_pf_vs_bon.py --model smollm2-135m-instruct --engine hf
    python bench/bench_pf_vs_bon.py --model toy

Results go to ``bench/results/pf_vs_bon.json`` (``--out`` to change);
``--label`` adds a run under that name to the file instead of replacing it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from piscale.lm.base import LanguageModel
from piscale.rewards.base import Reward
from piscale.search import run_many

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"
FALLBACK_QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
]


class HashReward(Reward):
    """A free stand-in for a process reward: a deterministic pseudo-random
    score in (0, 1) per partial answer."""

    name = "hash"
    scale = "probability"

    async def score(self, prompts, trajectories):
        return [
            [0.05 + 0.9 * (zlib.crc32("".join(steps[: t + 1]).encode()) % 1000) / 999 for t in range(len(steps))]
            for steps in trajectories
        ]


def questions(count: int) -> list[str]:
    if DATA.exists():
        with DATA.open() as handle:
            rows = [json.loads(line)["question"] for _, line in zip(range(count), handle)]
        if rows:
            return rows
    return (FALLBACK_QUESTIONS * count)[:count]


async def measure(lm: LanguageModel, algorithm: str, prompts: list[str], args) -> dict:
    before = lm.usage.snapshot()
    start = time.perf_counter()
    results = await run_many(
        lm, HashReward(), prompts, algorithm, budget=args.budget, seed=args.seed,
        max_tokens=args.max_tokens, temperature=args.temperature,
    )
    wall = time.perf_counter() - start
    engine = lm.usage.since(before)
    print(f"  {algorithm}: {wall:.2f}s, {engine.generated_tokens} tokens, {engine.forward_passes} passes", file=sys.stderr)
    return {
        "wall_time": wall,
        "generated_tokens": sum(r.usage["generated_tokens"] for r in results),
        "prompt_tokens": sum(r.usage["prompt_tokens"] for r in results),
        "extend_calls": sum(r.usage["extend_calls"] for r in results),
        "reward_calls": sum(r.usage["reward_calls"] for r in results),
        "forward_passes": engine.forward_passes,
        "engine_prefill_tokens": engine.prefill_tokens,
        "engine_time": engine.wall_time,
        "answers": [r.answer for r in results],
    }


def summarise(runs: list[dict]) -> dict:
    wall = [r["wall_time"] for r in runs]
    last = runs[-1]
    summary = {key: last[key] for key in last if key not in ("wall_time", "answers")}
    summary.update(
        wall_time_median=statistics.median(wall),
        wall_times=[round(w, 4) for w in wall],
        seconds_per_token=statistics.median(wall) / max(last["generated_tokens"], 1),
    )
    return summary


async def main(args, build: Callable[[], LanguageModel]) -> dict:
    lm = build()
    prompts = questions(args.questions)
    await measure(lm, "bon", prompts[:1], args)  # warm-up: first passes, allocations
    runs: dict[str, list[dict]] = {"bon": [], "pf": []}
    for repeat in range(args.repeats):
        order = ("bon", "pf") if repeat % 2 == 0 else ("pf", "bon")
        for algorithm in order:
            runs[algorithm].append(await measure(lm, algorithm, prompts, args))
    await lm.close()
    pf, bon = summarise(runs["pf"]), summarise(runs["bon"])
    return {
        "model": args.model,
        "engine": args.engine,
        "device": args.device,
        "budget": args.budget,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "questions": len(prompts),
        "repeats": args.repeats,
        "pf": pf,
        "bon": bon,
        "wall_time_ratio_pf_over_bon": pf["wall_time_median"] / bon["wall_time_median"],
        "seconds_per_token_ratio_pf_over_bon": pf["seconds_per_token"] / bon["seconds_per_token"],
        "target_ratio": 1.3,
    }


def parse(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a model spec for piscale.lm.load")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--device", default=None)
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default=None, help="keep earlier runs in --out and add this one under LABEL")
    parser.add_argument("--out", type=Path, default=RESULTS / "pf_vs_bon.json")
    return parser.parse_args(argv)


def default_backend(args) -> Callable[[], LanguageModel]:
    def build() -> LanguageModel:
        from piscale.lm import load

        return load(args.model, engine=args.engine, device=args.device)

    return build


def write(result: dict, args) -> None:
    result.update(
        command="python bench/bench_pf_vs_bon.py " + " ".join(sys.argv[1:]),
        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        machine={
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_at_end": list(os.getloadavg()),
        },
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.label:
        existing = json.loads(args.out.read_text()) if args.out.exists() else {}
        runs = existing.get("runs", {}) if isinstance(existing.get("runs"), dict) else {}
        runs[args.label] = result
        payload = {"benchmark": "pf_vs_bon", "runs": runs}
    else:
        payload = {"benchmark": "pf_vs_bon", "runs": {"default": result}}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    arguments = parse()
    outcome = asyncio.run(main(arguments, default_backend(arguments)))
    write(outcome, arguments)
    print(json.dumps({k: v for k, v in outcome.items() if k not in ("pf", "bon")}, indent=2))
    for name in ("bon", "pf"):
        row = outcome[name]
        print(f"{name}: {row['wall_time_median']:.2f}s  {row['generated_tokens']} tokens  {row['forward_passes']} passes")
