"""Particle filtering on a vLLM server against the hf engine: the same model
(SmolLM2-135M-Instruct, float32, the folder the hf engine converts the catalog
GGUF into), the same problem, the same budget and seed, the same CPU threads.

Run in the vLLM venv (``make vllm-setup``)::

    OMP_NUM_THREADS=1 .venv-vllm/bin/python bench/bench_vllm.py --budget 8 --out bench/results/vllm_pf.json

It starts vLLM's OpenAI server itself (as the tests do), runs the search on
both engines, and writes wall time, tokens, tokens/s, the requests and cached
tokens vLLM reported, and vLLM's prefix-cache hit rate over the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from vllm_support import model_folder, vllm_server  # noqa: E402

from piscale import search  # noqa: E402
from piscale.lm.openai import OpenAILM  # noqa: E402
from piscale.lm.server_pool import parse_metrics  # noqa: E402
from piscale.rewards import from_spec  # noqa: E402

QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)


async def run_search(lm, budget: int, seed: int, options: dict) -> dict:
    reward = from_spec("arith", policy=lm, policy_spec="smollm2")
    started = time.perf_counter()
    result = await search.run(lm, reward, QUESTION, "pf", budget, seed=seed, **options)
    wall = time.perf_counter() - started
    generated = result.usage["generated_tokens"]
    return {
        "wall_s": round(wall, 2),
        "generated_tokens": generated,
        "tokens_per_s": round(generated / wall, 2),
        "answer": result.text,
        "engine_usage": lm.usage.to_dict(),
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--max-step-tokens", type=int, default=32)
    parser.add_argument("--out", default="bench/results/vllm_pf.json")
    args = parser.parse_args()
    options = dict(max_steps=args.max_steps, max_step_tokens=args.max_step_tokens, max_tokens=args.max_steps * args.max_step_tokens)

    import torch
    import vllm

    torch.set_num_threads(args.threads)
    folder = model_folder()
    report: dict = {
        "problem": QUESTION, "algorithm": "pf", "budget": args.budget, "seed": args.seed, "options": options,
        "threads": args.threads, "model": str(folder), "vllm": vllm.__version__, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }

    from piscale.lm.hf import TransformersLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    report["hf"] = await run_search(TransformersLM(model, tokenizer), args.budget, args.seed, options)
    print("hf", json.dumps(report["hf"]), flush=True)

    with vllm_server(folder, threads=args.threads) as server:
        lm = OpenAILM(server.model, server.base_url, tokenizer=tokenizer)
        before = parse_metrics(httpx.get(server.root + "/metrics").text)
        report["vllm_server"] = await run_search(lm, args.budget, args.seed, options)
        after = parse_metrics(httpx.get(server.root + "/metrics").text)
        hits = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
        queries = after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"]
        report["vllm_server"].update(
            server_usage=lm.server_usage.to_dict(),
            prefix_cache_hits=hits,
            prefix_cache_queries=queries,
            prefix_cache_hit_rate=round(hits / queries, 3) if queries else None,
        )
        await lm.close()
    print("vllm", json.dumps(report["vllm_server"]), flush=True)
    report["speedup"] = round(report["hf"]["wall_s"] / report["vllm_server"]["wall_s"], 2)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("speed-up", report["speedup"])


if __name__ == "__main__":
    asyncio.run(main())
