"""Two vLLM servers as replicas against one: the same searches under the same
seed through the OpenAI engine, once with one endpoint and once with two;
the answers must be equal, and the wall times are compared.

The workload is particle filtering with the model judging itself on the
first ``--problems`` GSM8K test problems, solved together (``run_many``: the
searches run concurrently, so both replicas have work), SmolLM2-135M-Instruct
in float32. Each server gets ``--threads`` threads; every server's prefix
cache is emptied before each run. The runs go one, two, one, so a drift in
the machine's load shows as a difference between the two single-server runs.

Run in the vLLM venv (``make vllm-setup``)::

    OMP_NUM_THREADS=1 .venv-vllm/bin/python bench/bench_vllm_replicas.py --out bench/results/vllm_replicas.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from vllm_support import model_folder, vllm_server  # noqa: E402
from _report import header, settings  # noqa: E402

from piscale import search  # noqa: E402
from piscale.lm.openai import OpenAILM  # noqa: E402
from piscale.rewards.judge import LLMJudge  # noqa: E402
from piscale.tasks import load_task  # noqa: E402


async def solve(urls: list[str], model: str, folder: Path, questions: list[str], args) -> dict:
    lm = OpenAILM(model, urls if len(urls) > 1 else urls[0], tokenizer=str(folder))
    started = time.perf_counter()
    results = await search.run_many(
        lm, LLMJudge(lm), questions, "pf", args.budget, seed=args.seed,
        max_steps=args.max_steps, max_step_tokens=args.max_step_tokens, max_tokens=args.max_tokens,
    )
    wall = time.perf_counter() - started
    await lm.close()
    return {
        "endpoints": len(urls),
        "wall_s": round(wall, 2),
        "answers": [r.answer for r in results],
        "texts": [r.text for r in results],
        "candidates": [[c.text for c in r.candidates] for r in results],
        "generated_tokens": sum(r.usage["generated_tokens"] for r in results),
        "server_usage": lm.server_usage.to_dict(),
        "engine_usage": lm.usage.to_dict(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--problems", type=int, default=4)
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="threads of each server")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--max-step-tokens", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    questions = [p.question for p in load_task("gsm8k").problems[: args.problems]]
    folder = model_folder()
    started = time.time()
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # for /reset_prefix_cache
    runs = []
    # see bench_vllm_particles.py: no prefill split over engine steps
    extra = ("--max-num-batched-tokens", "16384")
    with vllm_server(folder, *extra, threads=args.threads) as first, vllm_server(folder, *extra, threads=args.threads) as second:
        for servers in ([first], [first, second], [first]):
            for server in (first, second):
                httpx.post(server.root + "/reset_prefix_cache", timeout=60).raise_for_status()
            load = os.getloadavg()
            run = asyncio.run(solve([s.base_url for s in servers], first.model, folder, questions, args))
            run["load_average_before"] = load
            runs.append(run)
            print(json.dumps({k: v for k, v in run.items() if k not in ("texts", "candidates")}), flush=True)
    one, two, one_again = runs
    report = {
        **header("vllm_replicas", started),
        "settings": settings(args),
        "model": str(folder),
        "runs": runs,
        "same_answers": one["texts"] == two["texts"] == one_again["texts"]
        and one["candidates"] == two["candidates"] == one_again["candidates"],
        "speedup_two_over_one": round((one["wall_s"] + one_again["wall_s"]) / 2 / two["wall_s"], 2),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("same answers", report["same_answers"], "speed-up", report["speedup_two_over_one"])


if __name__ == "__main__":
    main()
