"""Engine benchmark: particle-style decoding with resampling, cached vs naive.

Workload: ``--particles`` sequences of one prompt, ``--steps`` steps of up to
``--step-tokens`` tokens each (no stop string, so every step has the same
length), and a multinomial resampling between steps. Two engines run it:

* ``cached``: ``TransformersLM`` as it is: one prefill, then forks gather
  cache rows and every forward pass reads one token per sequence;
* ``naive``: the same model and sampling, but every step re-reads each
  particle's whole prefix (prompt plus all earlier steps) from scratch, as a
  search loop over a stateless generate call does.

``--throughput`` instead measures raw decode tokens/s at several batch sizes
(``--batch-sizes``), for comparison with ``model.generate``.

The model is a catalog spec, or ``random:qwen2.5-1.5b`` / ``random:qwen2.5-0.5b``
for a random-weight model of that shape (fine for timing). Results go to
``bench/results/engine-<label>.json``.

    python bench/bench_engine.py --model smollm2-135m-instruct
    python bench/bench_engine.py --model random:qwen2.5-1.5b --device cuda --dtype bfloat16 --throughput
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from piscale.lm.base import StepParams
from piscale.lm.hf import TransformersLM

RESULTS = Path(__file__).parent / "results"
QUESTION = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?"

SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}


class _ByteTokenizer:
    """Decodes ids as bytes modulo 256: enough for a random-weight model,
    whose text is noise anyway, while keeping the engine's text path real."""

    eos_token_id = None
    pad_token_id = 0
    chat_template = None
    model_max_length = 32768

    def encode(self, text, add_special_tokens=False):
        return list(text.encode())

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i % 256 for i in ids).decode(errors="replace")


def build(spec: str, device: str, dtype: str):
    dtype_t = getattr(torch, dtype)
    if spec.startswith("random:"):
        from transformers import AutoModelForCausalLM, Qwen2Config

        shape = SHAPES[spec.split(":", 1)[1]]
        config = Qwen2Config(**shape, max_position_embeddings=32768)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype_t)
        return model.eval(), _ByteTokenizer()
    from piscale.models import load_transformers

    return load_transformers(spec, device=device, dtype=dtype)


def prompt_ids(lm: TransformersLM) -> list[int]:
    try:
        return lm.prompt_ids(QUESTION)
    except ValueError:  # no chat template (random-weight models)
        return lm.encode(QUESTION)


async def particles_cached(lm, prompt, particles, steps, step_tokens, rng) -> dict:
    params = StepParams(max_tokens=step_tokens, stop=(), temperature=0.8)
    before = lm.usage.snapshot()
    start = time.perf_counter()
    [handles] = await lm.open([prompt], copies=particles)
    first_prefill = lm.usage.since(before).prefill_tokens
    for _ in range(steps):
        await lm.extend(handles, params, seeds=rng.integers(2**31, size=particles).tolist())
        ancestors = rng.integers(particles, size=particles)
        children = lm.fork([handles[a] for a in ancestors])
        lm.release(handles)
        handles = children
    lm.release(handles)
    usage = lm.usage.since(before)
    return {
        "wall_time_s": time.perf_counter() - start,
        "prefill_tokens": usage.prefill_tokens,
        "prefill_tokens_after_first": usage.prefill_tokens - first_prefill,
        "generated_tokens": usage.generated_tokens,
        "forward_passes": usage.forward_passes,
    }


async def particles_naive(lm, prompt, particles, steps, step_tokens, rng) -> dict:
    params = StepParams(max_tokens=step_tokens, stop=(), temperature=0.8)
    before = lm.usage.snapshot()
    start = time.perf_counter()
    sequences = [list(prompt) for _ in range(particles)]
    for _ in range(steps):
        groups = await lm.open(sequences)  # re-reads every prefix
        handles = [g[0] for g in groups]
        await lm.extend(handles, params, seeds=rng.integers(2**31, size=particles).tolist())
        sequences = [lm.token_ids(h) for h in handles]
        lm.release(handles)
        ancestors = rng.integers(particles, size=particles)
        sequences = [list(sequences[a]) for a in ancestors]
    usage = lm.usage.since(before)
    return {
        "wall_time_s": time.perf_counter() - start,
        "prefill_tokens": usage.prefill_tokens,
        "generated_tokens": usage.generated_tokens,
        "forward_passes": usage.forward_passes,
    }


async def throughput(lm, prompt, batch_sizes, tokens) -> dict:
    params = StepParams(max_tokens=tokens, stop=(), temperature=0.8)
    rows = {}
    for batch in batch_sizes:
        [handles] = await lm.open([prompt], copies=batch)
        await lm.extend(handles, StepParams(max_tokens=4, stop=(), temperature=0.8), seeds=list(range(batch)))
        _sync()
        before = lm.usage.snapshot()
        start = time.perf_counter()
        await lm.extend(handles, params, seeds=list(range(batch)))
        _sync()
        elapsed = time.perf_counter() - start
        lm.release(handles)
        generated = lm.usage.since(before).generated_tokens
        rows[str(batch)] = {"decode_tokens_per_s": generated / elapsed, "wall_time_s": elapsed, "tokens": generated}
        rows[str(batch)]["generate_tokens_per_s"] = _generate_throughput(lm, prompt, batch, tokens)
        print(f"batch {batch}: engine {generated / elapsed:.1f} tokens/s, "
              f"model.generate {rows[str(batch)]['generate_tokens_per_s']:.1f} tokens/s")
    return rows


def _generate_throughput(lm, prompt, batch, tokens) -> float:
    """transformers' own sampling loop on the same batch, for reference
    (prefill excluded: a prefill-only call is timed and subtracted)."""
    ids = torch.tensor([prompt] * batch, device=lm.device)
    config = dict(do_sample=True, temperature=0.8, pad_token_id=0, eos_token_id=None)

    def timed(n):
        _sync()
        start = time.perf_counter()
        with torch.inference_mode():
            lm.model.generate(ids, max_new_tokens=n, min_new_tokens=n, **config)
        _sync()
        return time.perf_counter() - start

    timed(2)
    return batch * (tokens - 1) / (timed(tokens) - timed(1))


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--label", default=None)
    args = parser.parse_args()

    model, tokenizer = build(args.model, args.device, args.dtype)
    lm = TransformersLM(model, tokenizer, device=args.device, name=args.model)
    prompt = prompt_ids(lm)
    result = {
        "model": args.model,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "prompt_tokens": len(prompt),
    }
    if args.throughput:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        result["throughput"] = asyncio.run(throughput(lm, prompt, sizes, args.tokens))
    else:
        result["workload"] = {"particles": args.particles, "steps": args.steps, "step_tokens": args.step_tokens}
        runs = {"cached": [], "naive": []}
        for repeat in range(args.repeats):
            for name, run in (("cached", particles_cached), ("naive", particles_naive)):
                rng = np.random.default_rng(repeat)
                runs[name].append(asyncio.run(run(lm, prompt, args.particles, args.steps, args.step_tokens, rng)))
        for name, rows in runs.items():
            best = min(rows, key=lambda r: r["wall_time_s"])
            result[name] = best | {"wall_times_s": [r["wall_time_s"] for r in rows]}
        result["speedup"] = result["naive"]["wall_time_s"] / result["cached"]["wall_time_s"]
        print(json.dumps({k: result[k] for k in ("cached", "naive", "speedup")}, indent=1))
    label = args.label or f"{args.model.replace(':', '-')}-{args.device}{'-throughput' if args.throughput else ''}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"engine-{label}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
