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

``--abuse`` measures what hostile requests do to the good ones instead: a
clean phase of ``--clients`` clients, then the same phase again while
``--abusers`` clients each send ``--abuse-requests`` of the inputs that used
to hurt the server (a NaN temperature, an answer math-verify stalls on, a
20 MB body, 2,000 prompts x n=128, JSON nested 5,000 deep, ``/tokenize`` of
``[1]``, mistyped fields) and a probe times ``/health`` throughout. It
reports the good requests' errors (target 0), their p95 latency against the
clean phase (target within 1.5x), what status each abuse got, the slowest
``/health`` answer, and the server's peak resident memory (``VmHWM``).
Results go to ``bench/results/serve_abuse.json``:

    python bench/bench_serve.py --abuse --model toy
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

from piscale.serve.process import free_port, server_process
from _report import header

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


def abuses(model: str, budget: int) -> list[tuple[str, str, bytes]]:
    """(name, path, body) of each hostile request, one of every kind."""
    chat = {"model": model, "messages": [{"role": "user", "content": "What is 2 + 2?"}]}
    nan = json.dumps({**chat, "seed": 1}).replace('"seed"', '"temperature": NaN, "seed"')
    nan_options = json.dumps({**chat, "budget": 4, "reward": "arith"}).replace('"reward"', '"options": {"temperature": NaN}, "reward"')
    verify = json.dumps({**chat, "messages": [{"role": "user", "content": "Write \\boxed{10^{10^{10}}} and stop."}],
                         "budget": budget, "reward": f"verify:10^{{10^{{{time.monotonic_ns() % 997 + 10}}}}}"})
    return [
        ("nan_temperature", "/v1/chat/completions", nan.encode()),
        ("nan_search_option", "/v1/chat/completions", nan_options.encode()),
        ("verify_adversarial", "/v1/chat/completions", verify.encode()),
        ("body_20mb", "/v1/chat/completions", json.dumps({**chat, "pad": "x" * 20_000_000}).encode()),
        ("prompts_2000_x_n_128", "/v1/completions",
         json.dumps({"model": model, "prompt": ["Hi"] * 2000, "n": 128, "max_tokens": 1}).encode()),
        ("nested_5000", "/v1/chat/completions", b"[" * 5000 + b"]" * 5000),
        ("tokenize_list", "/tokenize", b"[1]"),
        ("budget_string", "/v1/chat/completions", json.dumps({**chat, "budget": "8"}).encode()),
        ("stream_yes", "/v1/chat/completions", json.dumps({**chat, "stream": "yes"}).encode()),
    ]


async def abuse_phase(base: str, args, deadline: float, abusers: int, seed_offset: int) -> dict:
    """The concurrent phase with ``abusers`` hostile clients and a /health
    probe beside it."""
    import threading

    statuses: dict[str, list[int | str]] = {}
    health: list[float] = []
    done = threading.Event()
    kinds = abuses(args.model, args.budget)  # built before the clock starts (one body is 20 MB)

    async def abuser(a: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=args.request_timeout) as client:
            for r in range(args.abuse_requests):
                name, path, body = kinds[(a + r) % len(kinds)]
                try:
                    response = await client.post(path, content=body, headers={"content-type": "application/json"})
                    statuses.setdefault(name, []).append(response.status_code)
                except httpx.HTTPError as error:
                    statuses.setdefault(name, []).append(type(error).__name__)

    def probe() -> None:
        # Its own thread and connection: the clients' event loop busy with
        # 20 MB bodies must not show up as the server's latency.
        with httpx.Client(base_url=base, timeout=60) as client:
            while not done.is_set():
                started = time.perf_counter()
                client.get("/health")
                health.append(time.perf_counter() - started)
                done.wait(0.1)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    attackers = [asyncio.ensure_future(abuser(a)) for a in range(abusers)]
    good = await phase(base, args, args.clients, args.requests, seed_offset, deadline)
    await asyncio.gather(*attackers)
    done.set()
    prober.join()
    return {
        "good": good,
        "abuse_statuses": {name: sorted(codes, key=str) for name, codes in sorted(statuses.items())},
        "health_probes": len(health),
        "health_max_s": round(max(health), 3) if health else None,
        "health_p95_s": percentile(health, 0.95),
    }


def peak_memory_kib(pid: int) -> int | None:
    """The process's peak resident memory (``VmHWM``), in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run_abuse(args, command: list[str], base: str) -> int:
    import subprocess
    import tempfile

    from piscale.serve.process import wait_until_answering

    load_at_start = os.getloadavg()
    log = tempfile.TemporaryFile(mode="w+")
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        startup = wait_until_answering(base + "/health", 600, server, log)
        deadline = time.monotonic() + args.deadline
        asyncio.run(phase(base, args, 1, 1, 10_000, deadline))  # warm-up
        clean_run = asyncio.run(abuse_phase(base, args, deadline, 0, 1_000))
        clean = clean_run["good"]
        abused = asyncio.run(abuse_phase(base, args, deadline, args.abusers, 2_000))
        turned_away = read_metrics(base).get("piscale_requests_turned_away_total")
        peak = peak_memory_kib(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    clean_p95, abused_p95 = clean["latency_p95_s"], abused["good"]["latency_p95_s"]
    record = {
        **header("serve_abuse", load_at_start=load_at_start),
        "settings": {
            "model": args.model, "engine": args.engine, "engine_options": args.engine_option,
            "algorithm": "pf", "reward": args.reward, "budget": args.budget, "max_steps": args.max_steps,
            "max_step_tokens": args.max_step_tokens, "max_tokens": args.max_tokens,
            "abusers": args.abusers, "abuse_requests_each": args.abuse_requests,
            "server_startup_seconds": round(startup, 1),
        },
        "clean": clean,
        "clean_health_max_s": clean_run["health_max_s"],
        "clean_health_p95_s": clean_run["health_p95_s"],
        "abused": abused,
        "good_request_errors": abused["good"]["failed"],
        "p95_ratio_abused_over_clean": round(abused_p95 / clean_p95, 2) if clean_p95 and abused_p95 else None,
        "requests_turned_away_total": turned_away,
        "server_peak_resident_mib": round(peak / 1024, 1) if peak is not None else None,
    }
    out = args.out if args.out != RESULTS / "serve_load.json" else RESULTS / "serve_abuse.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    summary = ("good_request_errors", "p95_ratio_abused_over_clean", "server_peak_resident_mib", "requests_turned_away_total")
    print(json.dumps({**{k: record[k] for k in summary}, "clean_health_max_s": clean_run["health_max_s"],
                      "health_max_s": abused["health_max_s"], "abuse_statuses": abused["abuse_statuses"]}, indent=2))
    return 1 if clean["failed"] or abused["good"]["failed"] else 0


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
    parser.add_argument("--abuse", action="store_true", help="measure hostile requests beside good ones (see above)")
    parser.add_argument("--abusers", type=int, default=4, help="hostile clients in the --abuse run")
    parser.add_argument("--abuse-requests", type=int, default=9, help="hostile requests per hostile client")
    args = parser.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-c", "from piscale.cli import app; app()", "serve", "--model", args.model,
        "--engine", args.engine, "--port", str(port), "--max-budget", str(max(args.budget, 1)),
        "--timeout", str(args.request_timeout), "--log-level", "warning",
        *[part for option in args.engine_option for part in ("--engine-option", option)],
    ]
    if args.abuse:
        return run_abuse(args, command, base)
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
        **header("serve_load", load_at_start=load_at_start),
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
