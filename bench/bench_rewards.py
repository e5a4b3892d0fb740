"""Reward benchmarks.

``incremental`` (the default): PRM incremental versus full re-scoring of a
growing trajectory. ``ranking``: how often each reward ranks a correct answer
above an incorrect one on GSM8K answers sampled from a small policy.

**incremental.** Workload: one prompt and one trajectory that grows step by step, as a particle
does in particle filtering; after each new step the PRM scores the whole
partial answer (every step gets a score). Two PRMs run it, the same random-
weight Qwen2 token-classification model behind both:

* ``full``: ``cache_tokens=0``: every call re-reads prompt and all steps;
* ``incremental``: the default: the KV cache of the previous call is reused
  and only the new step is read.

``--particles N`` grows N trajectories of the same prompt together, scored in
one batch per step, as particle filtering does. Reported per mode: tokens read by the model, wall time (median of
``--repeats`` runs), and the largest difference between the two modes' scores
(they must agree). The tokenizer is word-level over synthetic words, so a
step of ``--step-words`` words is that many tokens. Results go to
``bench/results/rewards_incremental.json`` (``--out`` to change).

    python bench/bench_rewards.py
    python bench/bench_rewards.py --shape qwen2.5-0.5b --device cuda --dtype bfloat16

**ranking.** The first ``--problems`` GSM8K test problems; ``--samples``
answers each from the policy (``--policy``, temperature 0.8, at most
``--max-tokens`` tokens, "put your final answer within \\boxed{}" appended to
the question), graded against the reference with ``piscale.grading``. Each
reward scores the answers of the problems that have both correct and incorrect
ones (only those can tell rewards apart) with ``model`` aggregation (the whole answer as one
step): the judge (``--judge`` model), the density ratio ``--strong`` over the
policy, and the arithmetic checker. For every problem with both correct and
incorrect answers, each (correct, incorrect) pair counts 1 if the correct
answer scores higher, 1/2 on a tie; the pairwise accuracy is the mean. Also
reported: how often the reward's top answer is correct (best-of-N selection),
next to the mean accuracy of one sample and of majority voting. The samples
are saved in ``bench/results/rewards_gsm8k_samples.json`` after every batch
and reused: a later run with the same settings goes on where one stopped, and
``--problems N`` with N no more than those saved scores without sampling.

    python bench/bench_rewards.py ranking --problems 50 --samples 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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


async def run_mode(prm: ClassificationPRM, prompt: str, particles: list[list[str]]) -> tuple[list, float]:
    """Score every particle after each of its steps; all particles in one batch."""
    prm.clear_cache()
    outputs = []
    start = time.perf_counter()
    for t in range(1, len(particles[0]) + 1):
        outputs.append(await prm.score([prompt] * len(particles), [steps[:t] for steps in particles]))
    if prm.device.type == "cuda":
        torch.cuda.synchronize()
    return outputs, time.perf_counter() - start


async def incremental(args: argparse.Namespace) -> None:
    dtype = getattr(torch, args.dtype)
    tokenizer = word_tokenizer(4000)
    model = random_prm_model(tokenizer, args.shape, dtype, args.device)
    rng = np.random.default_rng(0)

    def words(n: int) -> str:
        return " ".join(f"w{k}" for k in rng.integers(0, 4000, size=n))

    prompt = words(args.prompt_words)
    particles = [[words(args.step_words) for _ in range(args.steps)] for _ in range(args.particles)]

    results = {}
    scores = {}
    for mode, cache_tokens in (("full", 0), ("incremental", 1 << 20)):
        prm = ClassificationPRM(model, tokenizer, cache_tokens=cache_tokens)
        await run_mode(prm, prompt, particles)  # warm-up: allocator, kernels
        times = []
        for _ in range(args.repeats):
            prm.usage.scored_tokens = 0
            outputs, seconds = await run_mode(prm, prompt, particles)
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
        for full_call, incremental_call in zip(scores["full"], scores["incremental"])
        for full_row, incremental_row in zip(full_call, incremental_call)
        for a, b in zip(full_row, incremental_row)
    )
    trajectory_tokens = sum(len(ClassificationPRM(model, tokenizer).layout(prompt, steps)[0]) for steps in particles)
    report = {
        "benchmark": "prm incremental vs full re-scoring: trajectories grown step by step, all scored after each step",
        "shape": args.shape,
        "config": SHAPES[args.shape],
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine(),
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "steps": args.steps,
        "particles": args.particles,
        "step_words": args.step_words,
        "prompt_words": args.prompt_words,
        "trajectory_tokens": trajectory_tokens,
        "note": "trajectory_tokens sums the final length of every particle; incremental reading each token once reads exactly that many",
        "repeats": args.repeats,
        "modes": results,
        "token_ratio_full_over_incremental": results["full"]["tokens_read"] / results["incremental"]["tokens_read"],
        "speedup_wall": results["full"]["wall_seconds_median"] / results["incremental"]["wall_seconds_median"],
        "max_abs_score_difference": difference,
    }
    print(f"trajectories {trajectory_tokens} tokens; speedup {report['speedup_wall']:.2f}x; "
          f"max |full - incremental| = {difference:.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


# -- ranking ---------------------------------------------------------------------

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"
INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


async def sample_answers(args: argparse.Namespace, path: Path) -> list[dict]:
    """``--samples`` answers per problem from the policy, graded. They are
    saved in ``path`` after every batch of problems, and a later run goes on
    from there; ``--generate-only`` stops after sampling."""
    from piscale.grading import gsm8k_reference, is_correct
    from piscale.lm import load
    from piscale.lm.base import StepParams

    problems = [json.loads(line) for line in GSM8K.read_text().splitlines()[: args.problems]]
    settings = {"policy": args.policy, "samples": args.samples, "max_tokens": args.max_tokens, "temperature": 0.8}
    saved = {**settings, "generation_seconds": 0.0, "generated_tokens": 0, "problems": []}
    if path.exists():
        cached = json.loads(path.read_text())
        if all(cached.get(k) == v for k, v in settings.items()):
            saved = cached
    records = saved["problems"]
    if len(records) >= len(problems):
        return records[: len(problems)]
    lm = load(args.policy)
    params = StepParams(max_tokens=args.max_tokens, stop=(), temperature=0.8)
    # As many problems at a time as the engine has sequence slots for.
    chunk = max(1, getattr(lm, "max_sequences", 16) // args.samples)
    for first in range(len(records), len(problems), chunk):
        start = time.perf_counter()
        batch = problems[first : first + chunk]
        prompts = [lm.prompt_ids(p["question"] + INSTRUCTION) for p in batch]
        groups = await lm.open(prompts, copies=args.samples)
        handles = [h for group in groups for h in group]
        seeds = [first * args.samples + k for k in range(len(handles))]
        before = lm.usage.generated_tokens
        outputs = await lm.extend(handles, params, seeds=seeds)
        lm.release(handles)
        for k, problem in enumerate(batch):
            reference = gsm8k_reference(problem["answer"])
            responses = [o.text for o in outputs[k * args.samples : (k + 1) * args.samples]]
            records.append({
                "question": problem["question"],
                "reference": reference,
                "responses": responses,
                "correct": [is_correct(r, reference) for r in responses],
            })
        saved["generation_seconds"] += time.perf_counter() - start
        saved["generated_tokens"] += lm.usage.generated_tokens - before
        path.write_text(json.dumps(saved, indent=1) + "\n")
        print(f"sampled {len(records)} problems, {saved['generated_tokens']} tokens, "
              f"{saved['generation_seconds']:.0f} s", flush=True)
    await lm.close()
    return records


def ranking_metrics(records: list[dict], scores: list[list[float]]) -> dict:
    wins, pairs, top_correct = 0.0, 0, 0
    for record, values in zip(records, scores):
        correct = record["correct"]
        best = max(range(len(values)), key=values.__getitem__)
        top_correct += bool(correct[best])
        for i, good in enumerate(correct):
            for j, bad in enumerate(correct):
                if good and not bad:
                    pairs += 1
                    wins += 1.0 if values[i] > values[j] else 0.5 if values[i] == values[j] else 0.0
    return {
        "pairwise_accuracy": wins / pairs if pairs else None,
        "pairs": pairs,
        "top_answer_correct": top_correct / len(records),
    }


async def ranking(args: argparse.Namespace) -> None:
    from collections import Counter

    from piscale.grading import extract_answer, normalize_answer
    from piscale.lm import load
    from piscale.rewards import ArithmeticReward, answer_steps, score_trajectories
    from piscale.rewards.cdr import DEFAULT_CRITERIA, DensityRatioReward
    from piscale.rewards.judge import LLMJudge

    records = await sample_answers(args, RESULTS / "rewards_gsm8k_samples.json")
    if args.generate_only:
        return

    def per_problem(flat: list[float]) -> list[list[float]]:
        return [[v for v, o in zip(flat, owner) if o == k] for k in range(len(records))]

    voted = 0
    for record in records:
        answers = [extract_answer(r) for r in record["responses"]]
        counts = Counter(normalize_answer(a) for a in answers if a is not None)
        if counts:
            winner = counts.most_common(1)[0][0]
            voted += any(c and a is not None and normalize_answer(a) == winner for a, c in zip(answers, record["correct"]))
    report = {
        "benchmark": "reward ranking of sampled GSM8K answers",
        "problems": len(records),
        "samples_per_problem": args.samples,
        "policy": args.policy,
        "max_tokens": args.max_tokens,
        "aggregation": "model",
        "sample_accuracy": sum(sum(r["correct"]) for r in records) / (len(records) * args.samples),
        "any_correct": sum(any(r["correct"]) for r in records) / len(records),
        "majority_vote_correct": voted / len(records),
        "problems_with_correct_and_incorrect": sum(1 for r in records if any(r["correct"]) and not all(r["correct"])),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs, llama.cpp engine",
        "rewards": {},
    }
    out = args.out or RESULTS / "rewards_gsm8k_ranking.json"
    if out.exists():
        # Rewards measured by an earlier run on the same answers are kept.
        earlier = json.loads(out.read_text())
        if all(earlier.get(k) == report[k] for k in ("problems", "samples_per_problem", "policy", "max_tokens")):
            report["rewards"] = earlier.get("rewards", {})
    print(json.dumps({k: v for k, v in report.items() if k != "rewards"}, indent=1))

    # Only problems with both correct and incorrect answers can tell rewards
    # apart: on the others every choice is right, or every choice is wrong.
    # Scoring just those gives the same pairwise accuracy for less work, and
    # the best-of-N accuracy over all problems follows from it.
    all_correct = sum(1 for r in records if all(r["correct"]))
    records = [r for r in records if any(r["correct"]) and not all(r["correct"])]
    prompts, trajectories, owner = [], [], []
    for k, record in enumerate(records):
        for response in record["responses"]:
            steps = answer_steps(response or " ")
            prompts.append(record["question"] + INSTRUCTION)
            trajectories.append(steps)
            owner.append(k)

    def measured(flat: list[float], seconds: float) -> dict:
        metrics = ranking_metrics(records, per_problem(flat))
        top_mixed = metrics.pop("top_answer_correct")
        return {
            **metrics,
            "top_answer_correct": (all_correct + top_mixed * len(records)) / report["problems"],
            "answers_scored": len(flat),
            "seconds": seconds,
        }

    backends: dict[str, object] = {}

    def backend(spec: str):
        if spec not in backends:
            backends[spec] = load(spec)
        return backends[spec]

    for kind in args.rewards.split(","):
        if kind == "arith":
            name, reward = "arith", ArithmeticReward()
        elif kind == "judge":
            name, reward = f"judge {args.judge}", LLMJudge(backend(args.judge))
        elif kind == "cdr":
            name = f"cdr {args.strong} / {args.policy}"
            reward = DensityRatioReward(backend(args.strong), backend(args.policy), criteria=DEFAULT_CRITERIA)
        elif kind == "value" or kind.startswith("value:"):
            from piscale.rewards.spec import from_spec
            from piscale.rewards.value import file_sha256, shipped_head_path

            # The learned step value (the shipped head, or value:PATH); the
            # head's sha256 names it, so a retrained head gets its own row.
            head = kind.partition(":")[2] or shipped_head_path()
            reward = from_spec(kind)
            name = f"{kind} (head {file_sha256(head)[:12]})"
        else:
            raise SystemExit(f"unknown reward {kind!r}; choose from arith, judge, cdr, value, value:PATH")
        start = time.perf_counter()
        flat = await score_trajectories(reward, prompts, trajectories, "model")
        seconds = time.perf_counter() - start
        report["rewards"][name] = measured(flat, seconds)
        print(f"{name:50s} {report['rewards'][name]}", flush=True)
        if kind == "cdr":
            policy = backend(args.policy)
            lengths = [len(policy.encode("\n\n".join(s.strip() for s in steps))) for steps in trajectories]
            mean = [v / max(n, 1) for v, n in zip(flat, lengths)]
            report["rewards"][name + " (per-token mean)"] = measured(mean, seconds)
            print(f"{name + ' (per-token mean)':50s} {report['rewards'][name + ' (per-token mean)']}", flush=True)
        out.write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", choices=["incremental", "ranking"], default="incremental")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--particles", type=int, default=1)
    parser.add_argument("--step-words", type=int, default=50)
    parser.add_argument("--prompt-words", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--problems", type=int, default=50)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--policy", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--judge", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--strong", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--generate-only", action="store_true", help="ranking: only sample the answers")
    parser.add_argument("--rewards", default="arith,judge,cdr", help="ranking: which rewards to measure (arith, judge, cdr, value, value:PATH)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.mode == "ranking":
        asyncio.run(ranking(args))
    else:
        args.out = args.out or RESULTS / "rewards_incremental.json"
        asyncio.run(incremental(args))


if __name__ == "__main__":
    main()
