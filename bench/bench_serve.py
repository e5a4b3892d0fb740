"""Load test of ``piscale serve``: many clients sending particle-filtering requests.

Starts ``piscale serve`` on a model in a subprocess, then runs two phases
with the same kind of request (particle filtering over GSM8K questions, the
model judging its own steps by default, each request with its own seed and question,
capped in steps and tokens so that the whole run is bounded; ``--reward
arith`` swaps the judge for a reward that reads no model, to measure
generation alone):

* ``sequential``: ``--sequential`` requests one after another, which is what
  a server that handles one request at a time would achieve;
* ``concurrent``: ``--clients`` clients at once, each sending ``--requests``
  requests back to back, which is what batching across requests buys.

Reported per phase: requests sent, succeeded and failed (with the errors),
requests/s, p50/p95/max latency, generated tokens/s, and the engine's forward
passes per request (read from /metrics: fewer passes per request means the
steps of different requests shared passes). ``batching_gain`` is the ratio of
the two phases' requests/s. Requests not started before ``--deadline``
seconds are skipped and counted.

    python bench/bench_serve.py --engine-option max_sequences=168 --engine-option context_length=512
    python bench/bench_serve.py --reward arith --out bench/results/serve_load_arith.json ...
    python bench/bench_serve.py --model toy --clients 64 --requests 8

With llama.cpp (the default engine for the default model when installed)
the server admits requests while their particles fit the engine's cache
slots (``max_sequences``, 16 by default); give it enough slots for every
client's particles, or the concurrent phase measures queueing instead.

Results go to ``bench/results/serve_load.json`` (``--out`` to change). The
exit status is 1 when any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import httpx

from piscale.serve.process import free_port, server_process

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"
SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
FALLBACK_QUESTIONS = [
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
]


def questions(count: int) -> list[str]:
    if DATA.exists():
        lines = DATA.read_text().splitlines()[:count]
        found = [json.loads(line)["question"] for line in lines if line.strip()]
    else:
        found = []
    found = found or FALLBACK_QUESTIONS
    return [found[i % len(found)] for i in range(count)]


def read_metrics(base: str, attempts: int = 10) -> dict[str, float]:
    """The server's metrics; retried, since an engine pass holding its lock
    can keep a busy server from answering for a while."""
    for attempt in range(attempts):
        try:
            text = httpx.get(base + "/metrics", timeout=60).text
            break
        except httpx.HTTPError:
            if attempt == attempts - 1:
                raise
            time.sleep(5)
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return round(ordered[index], 3)


async def one_request(client: httpx.AsyncClient, args, question: str, seed: int) -> dict:
    body = {
        "model": args.model,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "piscale": {
            "algorithm": "pf",
            "budget": args.budget,
            "reward": args.reward,
            "seed": seed,
            "options": {"max_steps": args.max_steps, "max_step_tokens": args.max_step_tokens, "max_tokens": args.max_tokens},
        },
    }
    started = time.perf_counter()
    try:
        response = await client.post("/v1/chat/completions", json=body)
    except httpx.HTTPError as error:
        return {"ok": False, "error": f"{type(error).__name__}: {error}", "seconds": time.perf_counter() - started}
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        return {"ok": False, "error": f"HTTP {response.status_code}: {response.text[:200]}", "seconds": seconds}
    usage = response.json()["usage"]
    return {"ok": True, "seconds": seconds, "completion_tokens": usage["completion_tokens"], "reward_tokens": usage["reward_tokens"]}


async def phase(base: str, args, clients: int, per_client: int, seed_offset: int, deadline: float) -> dict:
    pool = questions(clients * per_client)
    results: list[dict] = []
    skipped = 0
    before = read_metrics(base)
    started = time.perf_counter()
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=args.request_timeout, limits=limits) as client:

        async def run_client(c: int) -> None:
            nonlocal skipped
            for r in range(per_client):
                if time.monotonic() > deadline:
                    skipped += per_client - r
                    return
                index = c * per_client + r
                results.append(await one_request(client, args, pool[index], seed_offset + index))

        await asyncio.gather(*(run_client(c) for c in range(clients)))
    wall = time.perf_counter() - started
    after = read_metrics(base)
    ok = [r for r in results if r["ok"]]
    latencies = [r["seconds"] for r in ok]
    generated = sum(r["completion_tokens"] for r in ok)
    passes = after["piscale_engine_forward_passes_total"] - before["piscale_engine_forward_passes_total"]
    return {
        "clients": clients,
        "requests_per_client": per_client,
        "sent": len(results),
        "succeeded": len(ok),
        "failed": len(results) - len(ok),
        "skipped_at_deadline": skipped,
        "errors": sorted({r["error"] for r in results if not r["ok"]})[:10],
        "wall_seconds": round(wall, 2),
        "requests_per_second": round(len(ok) / wall, 4) if wall > 0 else None,
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p95_s": percentile(latencies, 0.95),
        "latency_max_s": round(max(latencies), 3) if latencies else None,
        "generated_tokens": generated,
        "generated_tokens_per_second": round(generated / wall, 2) if wall > 0 else None,
        "reward_tokens": sum(r["reward_tokens"] for r in ok),
        "engine_forward_passes": int(passes),
        "engine_forward_passes_per_request": round(passes / len(ok), 2) if ok else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2, help="requests per client in the concurrent phase")
    parser.add_argument("--sequential", type=int, default=6, help="requests in the one-at-a-time phase")
    parser.add_argument("--budget", type=int, default=4)
    parser.add_argument(
        "--reward", default="judge",
        help="judge (the model judging its steps: scoring dominates the cost) or arith (no model: generation only)",
    )
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--max-step-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--deadline", type=float, default=1200.0, help="seconds for both phases together")
    parser.add_argument(
        "--engine-option", action="append", default=[],
        help="KEY=VALUE for the engine (repeatable), e.g. max_sequences=168 so that every particle in flight has a llama.cpp slot",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_load.json")
    args = parser.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-c", "from piscale.cli import app; app()", "serve", "--model", args.model,
        "--engine", args.engine, "--port", str(port), "--max-budget", str(max(args.budget, 1)),
        "--timeout", str(args.request_timeout), "--log-level", "warning",
        *[part for option in args.engine_option for part in ("--engine-option", option)],
    ]
    load_at_start = os.getloadavg()
    # fails with the server's log if it exits before answering
    with server_process(command, base + "/health", startup_s=600) as startup_seconds:
        deadline = time.monotonic() + args.deadline
        asyncio.run(phase(base, args, 1, 1, 10_000, deadline))  # warm-up: first-use costs out of the way
        sequential = asyncio.run(phase(base, args, 1, args.sequential, 0, deadline))
        concurrent = asyncio.run(phase(base, args, args.clients, args.requests, 1_000, deadline))

    gain = None
    if sequential["requests_per_second"] and concurrent["requests_per_second"]:
        gain = round(concurrent["requests_per_second"] / sequential["requests_per_second"], 2)
    record = {
        "benchmark": "serve_load",
        "command": "python bench/bench_serve.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in load_at_start]},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {
            "model": args.model, "engine": args.engine, "engine_options": args.engine_option,
            "algorithm": "pf", "reward": args.reward,
            "budget": args.budget, "max_steps": args.max_steps, "max_step_tokens": args.max_step_tokens,
            "max_tokens": args.max_tokens, "server_startup_seconds": round(startup_seconds, 1),
        },
        "sequential": sequential,
        "concurrent": concurrent,
        "batching_gain": gain,
        "note": "batching_gain = concurrent requests/s over one-at-a-time requests/s on the same server",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("sequential", "concurrent", "batching_gain")}, indent=2))
    return 1 if sequential["failed"] or concurrent["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
