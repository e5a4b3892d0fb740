"""What scoring with a learned step value costs next to generating.

Particle filtering at budget 8 (the paper's defaults, ``model`` aggregation,
or with ``--smc`` the options of the held-out run: incremental potential,
systematic resampling when ESS/N < 0.5) on GSM8K *training* problems beyond
the ones the heads were trained on, with the policy on llama.cpp and the
value head's backbone on transformers (the shipped head unless ``--head``
names another; in float32 where the CPU only emulates bfloat16). Each
search's time splits into the policy's compute (``lm.usage.wall_time``) and
the reward's (``reward.usage.wall_time``); the reward also reports the tokens
it read and the cached ones it reused.

    python experiments/value_cost.py --problems 4 --smc --out experiments/values/value-cost.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time

import torch

from piscale.tasks import load_task
from piscale.lm import load
from piscale.rewards.value import load_value_reward
from piscale.search import run_many


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", default=None, help="a head file (default: the shipped head)")
    parser.add_argument("--problems", type=int, default=4)
    parser.add_argument("--first", type=int, default=7000, help="index of the first gsm8k_train problem used")
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--smc", action="store_true", help="incremental potential, systematic resampling at ESS/N < 0.5")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    problems = load_task("gsm8k_train").problems[args.first : args.first + args.problems]
    lm = load("qwen2.5-coder-0.5b-instruct", engine="llamacpp", n_threads=2, max_sequences=64, context_length=1024)
    reward = load_value_reward(args.head)
    smc = {"potential": "incremental", "resampler": "systematic", "ess_threshold": 0.5} if args.smc else {}
    started = time.perf_counter()
    results = asyncio.run(
        run_many(lm, reward, [p.question for p in problems], "pf", args.budget, 0, max_tokens=512, **smc)
    )
    wall = time.perf_counter() - started
    report = {
        "head": args.head or "shipped",
        "backbone_dtype": str(reward.model.dtype).removeprefix("torch."),
        "pf_options": smc or "paper defaults",
        "problems": len(problems),
        "budget": args.budget,
        "wall_seconds": round(wall, 1),
        "policy_seconds": round(lm.usage.wall_time, 1),
        "reward_seconds": round(reward.usage.wall_time, 1),
        "reward_over_policy_time": round(reward.usage.wall_time / max(lm.usage.wall_time, 1e-9), 3),
        "generated_tokens": lm.usage.generated_tokens,
        "reward_tokens_read": reward.usage.scored_tokens,
        "reward_tokens_reused": reward.tokens_reused,
        "reward_tokens_per_generated_token": round(reward.usage.scored_tokens / max(lm.usage.generated_tokens, 1), 3),
        "reward_calls": reward.usage.calls,
        "answers": [r.answer for r in results],
        "references": [p.reference for p in problems],
        "machine": f"{platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch threads",
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
