"""Continuations of the attribute prompts, scored, stored as JSON lines.

Each (prompt, draw) is one call of ``piscale.search.run``, and the calls of
a batch run concurrently, so the backend decodes them together:

* ``sample``: best-of-1 without a reward, i.e. one sample of the model;
* ``pf``: particle filtering toward π_β (``piscale.bias.tilt``) with
  ``particles`` particles; the output is one final particle drawn by its
  weight, so that it is a draw from (an approximation of) π_β;
* ``bon``: best-of-N under the same reward, the particle with the largest
  reward (β plays no part: a monotone reward picks the same one).

The prompt is the attribute set's instruction as the user's message and the
prompt text as the start of the assistant's reply, which the model goes on
writing (``continue_final_message``); only the continuation is scored, so the
attribute word in the prompt cannot move the score itself.

Every record carries the property score s of the continuation, its
log-likelihood under the model (a separate scoring pass over the text's
tokens, at temperature 1), and the tokens the search generated for it (N
particles' worth for ``pf`` and ``bon``).

Seeds: draw k of slot j uses the same seed for every attribute value (common
random numbers, so paired prompts differ by their attribute and not by their
luck), derived from the run's seed, the slot and k only, so a resumed run
writes what an uninterrupted one would.

Resuming: records are appended per batch and flushed; a rerun skips the
(value, slot, draw) keys already stored, after cutting a torn last line, and
refuses a file written with other settings.
"""

from __future__ import annotations

import asyncio
import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from piscale.bias.prompts import Attribute, Prompt
from piscale.bias.tilt import TargetReward, TextScorer
from piscale.jsonl import JSONLinesError, append_lines, read_lines
from piscale.lm.base import LanguageModel
from piscale.search import run
from piscale.search.driver import SEED_RANGE

METHODS = ("sample", "pf", "bon")


@dataclass(frozen=True)
class Sampling:
    """How continuations are drawn; stored with every record."""

    method: str = "sample"
    samples: int = 4
    """draws per prompt."""
    particles: int = 1
    """N for pf and bon."""
    beta: float = 0.0
    """tilt strength of pf (π_β ∝ p · exp(β r))."""
    max_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    step_tokens: int = 8
    """pf: token cap of a step (a step also ends at ``step_delimiter``)."""
    step_delimiter: str = "\n\n"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name in ("samples", "particles", "max_tokens", "step_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.method == "sample" and self.particles != 1:
            raise ValueError("plain sampling draws one continuation per sample; particles must be 1")
        if self.method == "pf" and not self.beta > 0:
            raise ValueError(f"pf needs a tilt strength beta > 0, got {self.beta!r} (beta 0 is plain sampling)")
        if self.method != "pf" and self.beta != 0:
            raise ValueError("beta is the tilt of pf; sample and bon take none")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class Target:
    """The attribute-neutral target of the tilt: mean and spread of s."""

    mean: float
    width: float


class SampleFileError(ValueError):
    """A samples file that belongs to another run or cannot be read."""


def prompt_ids(lm: LanguageModel, attribute: Attribute, prompt: Prompt) -> list[int]:
    """The instruction as the user's turn, the prompt as the start of the reply."""
    if not attribute.instruction:
        return lm.encode(prompt.text)
    messages = [{"role": "user", "content": attribute.instruction}, {"role": "assistant", "content": prompt.text}]
    return lm.chat(messages, add_generation_prompt=False, continue_final_message=True)


def draw_seed(seed: int, slot: str, draw: int) -> int:
    return zlib.crc32(f"{seed}:{slot}:{draw}".encode()) % SEED_RANGE


def weighted_draw(log_weights: Sequence[float | None], seed: int) -> int:
    """One index drawn with probability proportional to exp(log-weight);
    None is a zero weight."""
    values = np.array([-np.inf if w is None else w for w in log_weights], dtype=float)
    if not np.isfinite(values).any():
        raise ValueError("every particle has zero weight")
    weights = np.exp(values - values[np.isfinite(values)].max())
    return int(np.random.default_rng(seed).choice(len(values), p=weights / weights.sum()))


async def continue_prompt(
    lm: LanguageModel,
    ids: list[int],
    prompt: Prompt,
    sampling: Sampling,
    seed: int,
    reward: TargetReward | None,
) -> dict[str, Any]:
    """One continuation of ``prompt`` by ``sampling.method``: its text and
    the tokens spent."""
    options: dict[str, Any] = {
        "max_tokens": sampling.max_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
        "step_delimiter": sampling.step_delimiter,
    }
    if sampling.method == "sample":
        result = await run(lm, None, prompt.text, "bon", 1, seed, system=None, prompt_ids=ids, **options)
        chosen = 0
    elif sampling.method == "bon":
        result = await run(
            lm, reward, prompt.text, "bon", sampling.particles, seed, system=None, prompt_ids=ids,
            aggregation="last", **options,
        )
        chosen = result.chosen
    else:
        result = await run(
            lm, reward, prompt.text, "pf", sampling.particles, seed, system=None, prompt_ids=ids,
            aggregation="last", potential="incremental", softmax_temperature=1.0 / sampling.beta,
            max_step_tokens=sampling.step_tokens, max_steps=sampling.max_tokens, **options,
        )
        chosen = weighted_draw([c.log_weight for c in result.candidates], seed)
    candidate = result.candidates[chosen]
    return {
        "text": candidate.text,
        "finished": candidate.finished,
        "generated_tokens": int(result.usage["generated_tokens"]),
        "reward_steps": int(result.usage["reward_steps"]),
        "log_evidence": result.log_evidence,
    }


async def log_likelihoods(lm: LanguageModel, ids: Sequence[list[int]], texts: Sequence[str]) -> list[tuple[float, int]]:
    """(sum of token log-probabilities, token count) of each text after its
    prompt, under the model at temperature 1; (0, 0) for an empty text."""
    continuations = [lm.encode(text) if text else [] for text in texts]
    todo = [i for i, tokens in enumerate(continuations) if tokens]
    out = [(0.0, 0)] * len(texts)
    if todo:
        scored = await lm.score([ids[i] for i in todo], [continuations[i] for i in todo])
        for i, result in zip(todo, scored):
            out[i] = (float(result.total), len(result.token_ids))
    return out


def read_records(path: Path, identity: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The records of a samples file, after cutting a torn last line;
    with ``identity``, refuses records written under another one."""
    records = []
    try:
        for _, record in read_lines(path):
            if identity is not None and record.get("run") != identity:
                raise SampleFileError(
                    f"{path} holds samples of another run ({record.get('run')}); "
                    "pass another output folder, or the same settings to resume it"
                )
            records.append(record)
    except JSONLinesError as error:
        raise SampleFileError(str(error)) from None
    return records


async def generate(
    lm: LanguageModel,
    scorer: TextScorer,
    attribute: Attribute,
    prompts: Sequence[Prompt],
    sampling: Sampling,
    out: str | os.PathLike,
    *,
    target: Target | None = None,
    identity: dict[str, Any] | None = None,
    concurrency: int = 16,
    progress: Callable[[int, int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Continue every prompt ``sampling.samples`` times into ``out`` (JSONL),
    resuming what is there; returns every record of the file. ``identity``
    (model, property, ...) is stored with each record beside the sampling
    settings and the target; ``progress(done, total, tokens)`` after each
    batch."""
    if sampling.method != "sample" and target is None:
        raise ValueError(f"{sampling.method} needs the neutral target of the tilt")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    out = Path(out)
    run_id = {**(identity or {}), "attribute": attribute.name, "sampling": asdict(sampling),
              "target": asdict(target) if target is not None else None}
    records = read_records(out, run_id)
    done = {(r["value"], r["slot"], r["draw"]) for r in records}
    jobs = [(p, k) for p in prompts for k in range(sampling.samples) if (p.value, p.slot, k) not in done]
    reward = TargetReward(scorer, target.mean, target.width) if target is not None else None
    ids_of = {p: prompt_ids(lm, attribute, p) for p, _ in jobs}
    tokens = 0
    for start in range(0, len(jobs), concurrency):
        batch = jobs[start : start + concurrency]
        began = time.perf_counter()
        outputs = await asyncio.gather(*(
            continue_prompt(lm, ids_of[p], p, sampling, draw_seed(sampling.seed, p.slot, k), reward) for p, k in batch
        ))
        seconds = time.perf_counter() - began
        texts = [o["text"] for o in outputs]
        scores = scorer.score_texts(texts)
        likelihoods = await log_likelihoods(lm, [ids_of[p] for p, _ in batch], texts)
        fresh = []
        for (p, k), output, score, (loglik, count) in zip(batch, outputs, scores, likelihoods):
            fresh.append({
                "value": p.value, "slot": p.slot, "draw": k, "word": p.word, "prompt": p.text,
                **output, "property": float(score), "loglik": loglik, "loglik_tokens": count,
                "seconds": seconds / len(batch), "run": run_id,
            })
            tokens += output["generated_tokens"]
        append_lines(out, fresh)
        records.extend(fresh)
        if progress is not None:
            progress(len(done) + start + len(batch), len(done) + len(jobs), tokens)
    return records


def neutral_target(records: Sequence[dict[str, Any]], neutral: str = "neutral") -> Target:
    """The mean and standard deviation of s over the neutral prompts' records."""
    values = np.array([r["property"] for r in records if r["value"] == neutral], dtype=float)
    if values.size < 2:
        raise ValueError(f"the target needs at least two samples of the {neutral!r} prompts, found {values.size}")
    return Target(float(values.mean()), float(values.std(ddof=1)))
