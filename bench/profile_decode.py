"""Profile one decoding step of the transformers engine (cProfile, by own time).

    python bench/profile_decode.py --model random:qwen2.5-1.5b --device cuda --dtype bfloat16 --batch 1
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time

from bench_engine import TransformersLM, StepParams, build, prompt_ids, _sync


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="random:qwen2.5-0.5b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    model, tokenizer = build(args.model, args.device, args.dtype)
    lm = TransformersLM(model, tokenizer, device=args.device)
    prompt = prompt_ids(lm)

    async def step():
        [handles] = await lm.open([prompt], copies=args.batch)
        await lm.extend(handles, StepParams(max_tokens=4, stop=()), seeds=list(range(args.batch)))
        _sync()
        start = time.perf_counter()
        await lm.extend(handles, StepParams(max_tokens=args.tokens, stop=()), seeds=list(range(args.batch)))
        _sync()
        print(f"{args.batch * args.tokens / (time.perf_counter() - start):.1f} tokens/s")

    profile = cProfile.Profile()
    profile.runcall(asyncio.run, step())
    pstats.Stats(profile).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
