"""Benchmark of the llama.cpp engine: raw decoding, then particle filtering
against the transformers engine.

1. ``throughput``: one prompt opened with ``n`` copies (``--batch-sizes``,
   default 1 and 8), each extended by ``--tokens`` tokens with no stop string
   (temperature 0.8, seeded), once with per-sequence caches (the default)
   and once with a unified cache. Reports generated tokens per second over
   the whole batch, forward passes, and what a fork costs (prefill tokens and
   seconds for forking every sequence once).
2. ``scatter``: 64 sequences each given a cache slot, then only every other
   one decoded (``--tokens`` tokens), as when half the particles of a search
   have finished their step: tokens/s with the engine moving the decoded
   sequences onto consecutive ids (``gather_slots``, the default) and
   without. llama.cpp runs one micro-batch per run of consecutive ids.
3. ``pf``: particle filtering (``piscale.search``, algorithm ``pf``) with
   ``--particles`` particles on the first ``--problems`` GSM8K test problems,
   one problem at a time, with the same policy model through each engine in
   ``--engines`` (default: llamacpp and hf), the engines taking turns. Reports wall time per problem,
   generated tokens per second, prefill tokens, cache copies and accuracy.
   The reward is
   ``--reward`` (a ``piscale.rewards`` spec); the default, an arithmetic step
   checker, costs no model calls, so the comparison measures the engines.
   With ``--together`` each engine then also solves all the problems at once
   (``run_many``), so that the particles of all problems share each pass;
   ``--skip-one-at-a-time`` measures only that. The engine
   ``llamacpp-ungathered`` is llama.cpp with ``gather_slots=False``.
   Skipped, with the reason recorded, when the search package or an engine is
   not installed.

Results go to ``bench/results/llamacpp.json`` (``--out``). Timing on a shared
machine is noisy: besides wall time the JSON records process CPU time, which
other processes' load does not inflate when each engine runs one thread
(``--threads 1``; spinning worker threads would count as CPU time).

    python bench/bench_llamacpp.py                          # both parts
    python bench/bench_llamacpp.py --part throughput --model smollm2-135m-instruct
    python bench/bench_llamacpp.py --part pf --together --skip-one-at-a-time --engines llamacpp llamacpp-ungathered hf
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path

from piscale.lm.base import LanguageModel, StepParams

RESULTS = Path(__file__).parent / "results"
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"
QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)


async def decode_throughput(lm: LanguageModel, batch_size: int, tokens: int) -> dict:
    """Tokens/s of ``batch_size`` sequences decoded together, and fork cost."""
    prompt = lm.prompt_ids(QUESTION)
    params = StepParams(max_tokens=tokens, stop=(), temperature=0.8)
    # warm-up: the first pass allocates buffers
    [warm] = await lm.open([prompt])
    await lm.extend(warm, StepParams(max_tokens=2, stop=(), temperature=0.8), seeds=[0])
    lm.release(warm)

    before = lm.usage.snapshot()
    start_open = time.perf_counter()
    [handles] = await lm.open([prompt], copies=batch_size)
    opened = time.perf_counter()
    cpu_start = time.process_time()
    outputs = await lm.extend(handles, params, seeds=list(range(batch_size)))
    decoded = time.perf_counter()
    decode_cpu = time.process_time() - cpu_start
    generated = sum(len(o.token_ids) for o in outputs)
    used = lm.usage.since(before)

    # A resampling that draws one ancestor for every child: the fork itself
    # is free, and the next pass first gives all children but one a copy of
    # the ancestor's cache. Timed against a pass that copies nothing.
    fork_before = lm.usage.snapshot()
    copies_before = lm.cache_copies
    children = lm.fork([handles[0]] * batch_size)
    lm.release(handles)
    one_token = StepParams(max_tokens=1, stop=(), temperature=0.8)
    start = time.perf_counter()
    await lm.extend(children, one_token, seeds=list(range(batch_size)))
    pass_with_copies = time.perf_counter() - start
    copies = lm.cache_copies - copies_before
    forked = lm.usage.since(fork_before)
    start = time.perf_counter()
    await lm.extend(children, one_token, seeds=list(range(batch_size)))
    plain_pass = time.perf_counter() - start
    lm.release(children)
    return {
        "batch_size": batch_size,
        "prompt_tokens": len(prompt),
        "generated_tokens": generated,
        "prefill_seconds": opened - start_open,
        "decode_seconds": decoded - opened,
        "tokens_per_second": generated / (decoded - opened),
        "tokens_per_cpu_second": generated / decode_cpu,
        "forward_passes": used.forward_passes,
        "prefill_tokens": used.prefill_tokens,
        "fork_prefill_tokens": forked.prefill_tokens,
        "fork_cache_copies": copies,
        "pass_after_fork_seconds": pass_with_copies,
        "pass_without_copies_seconds": plain_pass,
    }


async def scattered_throughput(lm, tokens: int, copies: int = 64) -> dict:
    """Tokens/s decoding every other one of ``copies`` sequences that each
    hold a cache slot of their own, so that their ids are not consecutive."""
    prompt = lm.prompt_ids(QUESTION)
    [handles] = await lm.open([prompt], copies=copies)
    # two tokens: the first comes from the prompt's logits, the second needs
    # a pass, which gives every copy a slot of its own
    await lm.extend(handles, StepParams(max_tokens=2, stop=(), temperature=0.8), seeds=list(range(copies)))
    decoded = handles[::2]
    moves_before = getattr(lm, "cache_moves", 0)
    before = lm.usage.snapshot()
    start = time.perf_counter()
    outputs = await lm.extend(decoded, StepParams(max_tokens=tokens, stop=(), temperature=0.8), seeds=list(range(len(decoded))))
    seconds = time.perf_counter() - start
    used = lm.usage.since(before)
    lm.release(handles)
    generated = sum(len(o.token_ids) for o in outputs)
    return {
        "sequences_held": copies,
        "sequences_decoded": len(decoded),
        "generated_tokens": generated,
        "decode_seconds": seconds,
        "tokens_per_second": generated / seconds,
        "forward_passes": used.forward_passes,
        "cache_moves": getattr(lm, "cache_moves", 0) - moves_before,
    }


def gsm8k_problems(count: int) -> list[dict]:
    problems = []
    with open(GSM8K) as lines:
        for line in lines:
            record = json.loads(line)
            answer = record["answer"].split("####")[-1].strip().replace(",", "")
            problems.append({"question": record["question"], "answer": answer})
            if len(problems) == count:
                break
    return problems


async def solve_one(lm: LanguageModel, args, index: int, problem: dict) -> dict:
    """PF on one problem through ``lm``: wall time and the work done."""
    from piscale.grading import answers_equal
    from piscale.rewards import from_spec
    from piscale.search import run

    reward = from_spec(args.reward.format(answer=problem["answer"]), policy=lm, policy_spec=args.model)
    before = lm.usage.snapshot()
    copies_before = getattr(lm, "cache_copies", 0)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = await run(lm, reward, problem["question"], "pf", budget=args.particles, seed=index)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    used = lm.usage.since(before)
    return {
        "problem": index,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "generated_tokens": used.generated_tokens,
        "prefill_tokens": used.prefill_tokens,
        "scored_tokens": used.scored_tokens,
        "forward_passes": used.forward_passes,
        "cache_copies": getattr(lm, "cache_copies", 0) - copies_before,
        "tokens_per_second": used.generated_tokens / wall,
        "answer": result.answer,
        "reference": problem["answer"],
        "correct": bool(result.answer is not None and answers_equal(result.answer, problem["answer"])),
    }


def summarise(rows: list[dict]) -> dict:
    wall = sum(r["wall_seconds"] for r in rows)
    cpu = sum(r["cpu_seconds"] for r in rows)
    generated = sum(r["generated_tokens"] for r in rows)
    passes = sum(r["forward_passes"] for r in rows)
    return {
        "problems": rows,
        "mean_wall_seconds_per_problem": wall / len(rows),
        "generated_tokens_per_second": generated / wall,
        "generated_tokens_per_cpu_second": generated / cpu,
        # Of the particles, how many decode in an average pass: the rest wait
        # for the slowest particle to end its step.
        "generated_tokens_per_forward_pass": generated / passes if passes else None,
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
    }


async def solve_together(lm: LanguageModel, args, problems: list[dict]) -> dict:
    """PF on all problems at once (``run_many``): their particles share passes."""
    from piscale.grading import answers_equal
    from piscale.rewards import from_spec
    from piscale.search import run_many

    reward = from_spec(args.reward, policy=lm, policy_spec=args.model)
    before = lm.usage.snapshot()
    start, cpu_start = time.perf_counter(), time.process_time()
    results = await run_many(lm, reward, [p["question"] for p in problems], "pf", budget=args.particles, seed=0)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    used = lm.usage.since(before)
    correct = [
        bool(r.answer is not None and answers_equal(r.answer, p["answer"])) for r, p in zip(results, problems)
    ]
    return {
        "problems": len(problems),
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "wall_seconds_per_problem": wall / len(problems),
        "generated_tokens": used.generated_tokens,
        "forward_passes": used.forward_passes,
        "generated_tokens_per_second": used.generated_tokens / wall,
        "generated_tokens_per_cpu_second": used.generated_tokens / cpu,
        "accuracy": sum(correct) / len(problems),
    }


def load_engine(spec: str, engine: str, threads: int | None, sequences: int = 16) -> LanguageModel:
    from piscale.lm import load

    if engine == "hf" and threads:
        import torch

        torch.set_num_threads(threads)
    options: dict = {}
    if engine.startswith("llamacpp"):
        # every particle of every problem in flight holds a slot; 1024 tokens
        # per sequence are plenty for GSM8K (a longer one ends with "context")
        options = {
            "max_sequences": sequences,
            "context_length": 1024,
            "unified_cache": engine == "llamacpp-unified",
            "gather_slots": engine != "llamacpp-ungathered",
        }
        if threads:
            options["n_threads"] = threads
        engine = "llamacpp"
    return load(spec, engine=engine, **options)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("throughput", "scatter", "pf", "all"), default="all")
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="catalog name or .gguf path")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per sequence in the throughput part")
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--problems", type=int, default=10)
    parser.add_argument(
        "--engines",
        nargs="+",
        default=["llamacpp", "hf"],
        help="llamacpp, llamacpp-unified (a unified cache), llamacpp-ungathered (gather_slots off) or hf",
    )
    parser.add_argument("--reward", default="arith", help="reward spec; {answer} is replaced by the reference")
    parser.add_argument(
        "--together", action="store_true", help="also solve all problems at once per engine (run_many)"
    )
    parser.add_argument(
        "--skip-one-at-a-time", action="store_true", help="with --together, measure only all problems at once"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="threads for both engines (default: llama.cpp and torch defaults)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "llamacpp.json")
    args = parser.parse_args()
    if args.skip_one_at_a_time and not args.together:
        parser.error("--skip-one-at-a-time leaves nothing to measure without --together")
    if args.together and "{answer}" in args.reward:
        parser.error("--together solves all problems with one reward; it cannot use a per-problem {answer}")

    report: dict = {
        "model": args.model,
        "threads": args.threads,
        "host": platform.node(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if args.out.exists():  # keep the other part's numbers when running one part
        previous = json.loads(args.out.read_text())
        if previous.get("model") == args.model:
            report = {**previous, **report}

    from piscale.lm.llamacpp import LlamaCppLM, available

    if not available():
        raise SystemExit("llama-cpp-python is not installed: make setup EXTRAS=llamacpp")

    if args.part in ("throughput", "all"):
        report["throughput"] = {}
        for unified in (False, True):
            cache = "unified" if unified else "per-sequence"
            start = time.perf_counter()
            lm = LlamaCppLM.from_spec(
                args.model,
                n_threads=args.threads,
                unified_cache=unified,
                max_sequences=max(args.batch_sizes) + 1,
                context_length=512 + args.tokens,
            )
            load_seconds = time.perf_counter() - start
            rows = []
            for batch_size in args.batch_sizes:
                row = await decode_throughput(lm, batch_size, args.tokens)
                print(f"llamacpp ({cache} cache) batch {batch_size}: {row['tokens_per_second']:.1f} tokens/s", flush=True)
                rows.append(row)
            report["throughput"][cache] = {
                "engine": "llamacpp", "threads": lm.n_threads, "load_seconds": load_seconds, "runs": rows
            }
            await lm.close()

    if args.part in ("scatter", "all"):
        report["scatter"] = {}
        for gather in (True, False):
            name = "gathered" if gather else "ungathered"
            lm = LlamaCppLM.from_spec(
                args.model, n_threads=args.threads, max_sequences=65, context_length=512 + args.tokens, gather_slots=gather
            )
            row = await scattered_throughput(lm, args.tokens)
            print(f"llamacpp ({name}) 32 of 64 sequences: {row['tokens_per_second']:.1f} tokens/s", flush=True)
            report["scatter"][name] = {"threads": lm.n_threads, **row}
            await lm.close()

    if args.part in ("pf", "all"):
        problems = gsm8k_problems(args.problems)
        results: dict = {"particles": args.particles, "reward": args.reward, "engines": {}}
        try:
            import piscale.search  # noqa: F401
        except ImportError as error:
            results["skipped"] = f"particle filtering is not available yet: {error}"
            print(results["skipped"])
        else:
            # Engines take turns problem by problem, so that a change of load
            # on a shared machine hits both alike.
            engines = {}
            for engine in [] if args.skip_one_at_a_time else args.engines:
                start = time.perf_counter()
                engines[engine] = load_engine(args.model, engine, args.threads, 2 * args.particles)
                results["engines"][engine] = {"load_seconds": time.perf_counter() - start}
            rows: dict[str, list[dict]] = {engine: [] for engine in engines}
            for index, problem in enumerate(problems):
                for engine, lm in engines.items():
                    row = await solve_one(lm, args, index, problem)
                    rows[engine].append(row)
                    print(
                        f"{engine} problem {index}: {row['wall_seconds']:.1f} s, {row['generated_tokens']} tokens, "
                        f"answer {row['answer']!r} (reference {row['reference']})",
                        flush=True,
                    )
                # a long run keeps what it has measured so far
                report["particle_filtering"] = {**results, "partial_rows": rows}
                save(args.out, report)
            for engine, lm in engines.items():
                results["engines"][engine].update(summarise(rows[engine]))
                await lm.close()
            results["engines"] = {engine: results["engines"].get(engine, {}) for engine in args.engines}
            save(args.out, report)
            if args.together:
                for engine in args.engines:
                    lm = load_engine(args.model, engine, args.threads, args.particles * len(problems) + 8)
                    run_all = await solve_together(lm, args, problems)
                    results["engines"][engine]["all_problems_at_once"] = run_all
                    print(
                        f"{engine} all {len(problems)} problems at once: {run_all['wall_seconds']:.1f} s, "
                        f"{run_all['generated_tokens_per_second']:.1f} tokens/s",
                        flush=True,
                    )
                    await lm.close()
            summary = results["engines"]
            if "generated_tokens_per_second" in summary.get("llamacpp", {}) and "hf" in engines:
                results["speedup_tokens_per_second"] = (
                    summary["llamacpp"]["generated_tokens_per_second"] / summary["hf"]["generated_tokens_per_second"]
                )
                results["speedup_wall_time"] = (
                    summary["hf"]["mean_wall_seconds_per_problem"] / summary["llamacpp"]["mean_wall_seconds_per_problem"]
                )
                results["speedup_tokens_per_cpu_second"] = (
                    summary["llamacpp"]["generated_tokens_per_cpu_second"]
                    / summary["hf"]["generated_tokens_per_cpu_second"]
                )
        report["particle_filtering"] = results

    save(args.out, report)
    print(f"wrote {args.out}")


def save(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
