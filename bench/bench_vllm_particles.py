"""Tokens/s of piscale's in-process vLLM engine (``--engine vllm``) against
the hf engine at 1, 16 and 64 particles: the same model, the same workload,
the same threads, in one run.

The workload is bench_engine.py's particle decoding: ``N`` copies of one
prompt (the GSM8K "Natalia" problem in the chat template), ``--steps`` steps
of exactly ``--step-tokens`` tokens (no stop string), and a multinomial
resampling between steps (forks of the chosen ancestors). Tokens/s is the
generated tokens over the wall time of the whole run, prefill included.

Run in the vLLM venv (``make vllm-setup``)::

    OMP_NUM_THREADS=1 .venv-vllm/bin/python bench/bench_vllm_particles.py --out bench/results/vllm_particles.json

The model defaults to SmolLM2-135M-Instruct in float32 (the vLLM tests'
folder, converted from the catalog GGUF by the hf engine on first use);
``--model`` takes another catalog name, converted the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import particles_cached  # noqa: E402
from vllm_support import model_folder, vllm_engine  # noqa: E402
from _report import header  # noqa: E402

QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)


def folder_for(model: str | None) -> Path:
    if model is None:
        return model_folder()
    from piscale.models import converted_path, load_transformers, resolve

    folder = converted_path(resolve(model), "float32")
    if not (folder / "config.json").is_file():
        load_transformers(model, device="cpu", dtype="float32")
    return folder


def measure(lm, particles: int, args, repeats: int) -> dict:
    prompt = lm.chat([{"role": "user", "content": QUESTION}])
    runs = []
    for repeat in range(repeats):
        rng = np.random.default_rng(args.seed + repeat)
        runs.append(asyncio.run(particles_cached(lm, prompt, particles, args.steps, args.step_tokens, rng)))
    best = min(runs, key=lambda run: run["wall_time_s"])
    return {
        "particles": particles,
        "prompt_tokens": len(prompt),
        "wall_s": round(best["wall_time_s"], 3),
        "generated_tokens": best["generated_tokens"],
        "tokens_per_s": round(best["generated_tokens"] / best["wall_time_s"], 1),
        "forward_passes": best["forward_passes"],
        "prefill_tokens": best["prefill_tokens"],
        "wall_times_s": [round(run["wall_time_s"], 3) for run in runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="a catalog name (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--particles", default="1,16,64")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--step-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="runs per point; the fastest is reported")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384, help="vLLM's token budget per engine step")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    counts = [int(n) for n in args.particles.split(",")]

    import torch
    import vllm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from piscale.lm.hf import TransformersLM

    torch.set_num_threads(args.threads)
    folder = folder_for(args.model)
    started = time.time()
    report: dict = {
        **header("vllm_particles", started, device="cpu"),
        "model": str(folder), "dtype": "float32", "vllm": vllm.__version__, "torch": torch.__version__,
        "workload": {"steps": args.steps, "step_tokens": args.step_tokens, "temperature": 0.8,
                     "resampling": "multinomial, every step", "threads": args.threads, "repeats": args.repeats},
    }

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    hf = TransformersLM(model, tokenizer)
    report["hf"] = []
    for n in counts:
        report["hf"].append(measure(hf, n, args, args.repeats))
        print("hf", json.dumps(report["hf"][-1]), flush=True)
    del hf, model

    report["vllm"] = []
    # vLLM 0.32's CPU runner fails ("CPU Generator does not use offset") on a seeded request whose
    # prefill is split over engine steps (chunked prefill rewinds the request's generator, which CPU
    # generators cannot): 64 forks' uncached tails exceed the default token budget of a step, so the
    # budget is raised past anything this workload schedules
    with vllm_engine(folder, threads=args.threads, max_num_batched_tokens=args.max_num_batched_tokens) as engine:
        measure(engine, 1, args, 1)  # warm-up: the first requests compile and allocate
        for n in counts:
            report["vllm"].append(measure(engine, n, args, args.repeats))
            print("vllm", json.dumps(report["vllm"][-1]), flush=True)
    report["vllm_over_hf_tokens_per_s"] = {
        str(h["particles"]): round(v["tokens_per_s"] / h["tokens_per_s"], 2) for h, v in zip(report["hf"], report["vllm"])
    }
    report["load_average_at_end"] = os.getloadavg()
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["vllm_over_hf_tokens_per_s"]))


if __name__ == "__main__":
    main()
