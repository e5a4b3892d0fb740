"""How much of vLLM's prefix cache a particle-filtering run with the model
judging itself finds, its scoring requests apart: scoring one-token
continuations (the judge's Yes) from prompt log-probabilities, which vLLM
reads past its prefix cache, against asking for those tokens'
log-probabilities at a generated position (``logprob_token_ids``), an
ordinary request that reads the prompt from the cache.

Run in the vLLM venv (``make vllm-setup``)::

    OMP_NUM_THREADS=1 .venv-vllm/bin/python bench/bench_vllm_cache.py --target engine --out bench/results/vllm_cache_engine.json
    OMP_NUM_THREADS=1 .venv-vllm/bin/python bench/bench_vllm_cache.py --target server --out bench/results/vllm_cache_server.json

``engine``: piscale's in-process vLLM engine (``--engine vllm``), its own
counts of prompt and cached tokens per request; ``server``: vLLM's OpenAI
server through the OpenAI engine, the hit rate from the server's /metrics.
Both run the same search twice on SmolLM2-135M-Instruct (float32), the
prefix cache emptied before each: scoring from prompt log-probabilities
(``score_next_tokens=False``; the OpenAI engine's ``score_mode=echo``), then
from the next-token log-probabilities.
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

from vllm_support import model_folder, vllm_engine, vllm_server  # noqa: E402
from _report import header, settings  # noqa: E402

from piscale import search  # noqa: E402
from piscale.lm.openai import OpenAILM  # noqa: E402
from piscale.lm.server_pool import parse_metrics  # noqa: E402
from piscale.rewards.judge import LLMJudge  # noqa: E402

QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)


async def pf(lm, args) -> dict:
    started = time.perf_counter()
    before = lm.usage.snapshot()
    result = await search.run(
        lm, LLMJudge(lm), QUESTION, "pf", args.budget, seed=args.seed,
        max_steps=args.max_steps, max_step_tokens=args.max_step_tokens, max_tokens=args.max_tokens,
    )
    return {"wall_s": round(time.perf_counter() - started, 1), "answer": result.answer,
            "search_usage": result.usage, "engine_usage": lm.usage.since(before).to_dict()}


def engine_runs(args) -> dict:
    runs = {}
    with vllm_engine(model_folder(), threads=args.threads) as engine:
        for label, next_tokens in (("prompt_logprobs", False), ("next_token", True)):
            engine.llm.reset_prefix_cache()
            engine.score_next_tokens = next_tokens
            before = dict(engine.cache.__dict__)
            run = asyncio.run(pf(engine, args))
            grown = {k: v - before[k] for k, v in engine.cache.__dict__.items()}
            run["generation_hit_rate"] = round(grown["cached_tokens"] / max(grown["prompt_tokens"], 1), 3)
            run["scoring_hit_rate"] = round(grown["scored_cached_tokens"] / max(grown["scored_prompt_tokens"], 1), 3)
            run["cache"] = grown
            runs[label] = run
            print(label, json.dumps(run), flush=True)
    return runs


def server_runs(args) -> dict:
    runs = {}
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # for /reset_prefix_cache
    with vllm_server(model_folder(), threads=args.threads) as server:
        for label, mode in (("prompt_logprobs", "echo"), ("next_token", "auto")):
            httpx.post(server.root + "/reset_prefix_cache", timeout=60).raise_for_status()
            before = parse_metrics(httpx.get(server.root + "/metrics", timeout=30).text)
            lm = OpenAILM(server.model, server.base_url, tokenizer=str(server.folder), score_mode=mode)
            run = asyncio.run(pf(lm, args))
            after = parse_metrics(httpx.get(server.root + "/metrics", timeout=30).text)
            hits = after["vllm:prefix_cache_hits_total"] - before.get("vllm:prefix_cache_hits_total", 0)
            queries = after["vllm:prefix_cache_queries_total"] - before.get("vllm:prefix_cache_queries_total", 0)
            run.update(hit_rate=round(hits / max(queries, 1), 3), cache_queries=queries, cache_hits=hits,
                       server_usage=lm.server_usage.to_dict())
            runs[label] = run
            print(label, json.dumps(run), flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", choices=("engine", "server"), default="engine")
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--max-step-tokens", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.time()
    runs = engine_runs(args) if args.target == "engine" else server_runs(args)
    report = {
        **header("vllm_cache", started),
        "settings": settings(args),
        "runs": runs,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
