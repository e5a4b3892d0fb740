"""PRM benchmark: incremental versus full re-scoring of a growing trajectory.

Workload: one prompt and one trajectory that grows step by step, as a particle
does in particle filtering; after each new step the PRM scores the whole
partial answer (every step gets a score). Two PRMs run it, the same random-
weight Qwen2 token-classification model behind both:

* ``full``: ``cache_tokens=0``: every call re-reads prompt and all steps;
* ``incremental``: the default: the KV cache of the previous call is reused
  and only the new step is read.

Reported per mode: tokens read by the model, wall time (median of
``--repeats`` runs), and the largest difference between the two modes' scores
(they must agree). The tokenizer is word-level over synthetic words, so a
step of ``--step-words`` words is that many tokens. Results go to
``bench/results/rewards_incremental.json`` (``--out`` to change).

    python bench/bench_rewards.py
    python bench/bench_rewards.py --shape qwen2.5-0.5b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from piscale.rewards.prm import ClassificationPRM

RESULTS = Path(__file__).parent / "results"

SHAPES = {
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2),
}
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} {{ message['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def word_tokenizer(words: int):
    """A word-level tokenizer over ``w0 .. w{words-1}`` and the chat and
    separator special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<extra_0>", "system", "user", "assistant"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{k}" for k in range(words)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<extra_0>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def random_prm_model(tokenizer, shape: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForTokenClassification, Qwen2Config

    config = Qwen2Config(
        vocab_size=len(tokenizer), num_labels=2, max_position_embeddings=8192,
        pad_token_id=tokenizer.pad_token_id, **SHAPES[shape],
    )
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


async def run_mode(prm: ClassificationPRM, prompt: str, steps: list[str]) -> tuple[list[list[float]], float]:
    prm.clear_cache()
    outputs = []
    start = time.perf_counter()
    for t in range(1, len(steps) + 1):
        outputs.append((await prm.score([prompt], [steps[:t]]))[0])
    if prm.device.type == "cuda":
        torch.cuda.synchronize()
    return outputs, time.perf_counter() - start


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-words", type=int, default=50)
    parser.add_argument("--prompt-words", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", type=Path, default=RESULTS / "rewards_incremental.json")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    tokenizer = word_tokenizer(4000)
    model = random_prm_model(tokenizer, args.shape, dtype, args.device)
    rng = np.random.default_rng(0)

    def words(n: int) -> str:
        return " ".join(f"w{k}" for k in rng.integers(0, 4000, size=n))

    prompt = words(args.prompt_words)
    steps = [words(args.step_words) for _ in range(args.steps)]

    results = {}
    scores = {}
    for mode, cache_tokens in (("full", 0), ("incremental", 1 << 20)):
        prm = ClassificationPRM(model, tokenizer, cache_tokens=cache_tokens)
        await run_mode(prm, prompt, steps)  # warm-up: allocator, kernels
        times = []
        for _ in range(args.repeats):
            prm.usage.scored_tokens = 0
            outputs, seconds = await run_mode(prm, prompt, steps)
            times.append(seconds)
        scores[mode] = outputs
        results[mode] = {
            "tokens_read": prm.usage.scored_tokens,
            "wall_seconds_median": statistics.median(times),
            "wall_seconds_all": times,
        }
        print(f"{mode:12s} tokens read {prm.usage.scored_tokens:6d}  median {statistics.median(times):.3f} s")

    difference = max(
        abs(a - b)
        for full_row, incremental_row in zip(scores["full"], scores["incremental"])
        for a, b in zip(full_row, incremental_row)
    )
    trajectory_tokens = len(ClassificationPRM(model, tokenizer).layout(prompt, steps)[0])
    report = {
        "benchmark": "prm incremental vs full re-scoring, one trajectory scored after each step",
        "shape": args.shape,
        "config": SHAPES[args.shape],
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine(),
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "steps": args.steps,
        "step_words": args.step_words,
        "prompt_words": args.prompt_words,
        "trajectory_tokens": trajectory_tokens,
        "repeats": args.repeats,
        "modes": results,
        "token_ratio_full_over_incremental": results["full"]["tokens_read"] / results["incremental"]["tokens_read"],
        "speedup_wall": results["full"]["wall_seconds_median"] / results["incremental"]["wall_seconds_median"],
        "max_abs_score_difference": difference,
    }
    print(f"trajectory {trajectory_tokens} tokens; speedup {report['speedup_wall']:.2f}x; "
          f"max |full - incremental| = {difference:.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
