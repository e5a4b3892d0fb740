"""Preference data from a reward (Xu et al., 2024, section "annotation").

For every prompt, ``k`` responses are sampled from a policy model (or taken
from the prompt's record), each is scored by a reward (typically a
customizable density ratio, ``cdr:STRONG,WEAK``), and the pair

    chosen   = the response with the highest reward
    rejected = the lowest-scored one, or one drawn at random among those
               scored below the chosen one by more than ``margin``

is written out. A prompt whose usable responses all tie yields no pair.

Output: JSON lines in the shape preference trainers read (TRL's
``DPOTrainer`` among them): ``prompt``, ``chosen``, ``rejected``, plus the
prompt's ``id``, both scores, the policy and reward names, the system
prompt and sampling settings, and every candidate with its score, token
count, finish reason and, when sampled, its token ids (as generated, the
end-of-sequence token included; distillation scores exactly these). Prompts without a
pair go to a second file (``OUT`` with ``.skipped.jsonl``) with the reason
and their candidates, so nothing is dropped without a trace.

Responses that hit the token cap are not candidates unless
``keep_truncated``: a cut-off answer is neither a good "chosen" nor a fair
"rejected". Empty responses and failed ones never are.

Resuming: both files grow one batch of prompts at a time, flushed to disk;
a rerun skips every prompt already in either file (by id), after removing a
last line that a crash cut short. A prompt's samples and its random choice
depend only on the seed and the prompt's id, so a resumed run writes what an
uninterrupted one would have.
"""

from __future__ import annotations

import asyncio
import math
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from piscale.jsonl import JSONLinesError, append_lines, read_lines
from piscale.tasks import BUILTIN_FILES, TaskError, identified_records, load_task, read_records
from piscale.lm.base import LanguageModel
from piscale.rewards.aggregate import check_aggregation, score_trajectories
from piscale.rewards.base import Reward
from piscale.search.driver import SEED_RANGE
from piscale.search.node import split_steps

PROMPT_FIELDS = ("prompt", "question", "problem", "instruction")
REJECTED_RULES = ("lowest", "random")
STEP_DELIMITER = "\n\n"


class AnnotationError(ValueError):
    """Bad input or an output file that belongs to another annotation."""


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str
    responses: tuple[str, ...] | None = None
    """given responses to score instead of sampling (None: sample ``k``)."""


@dataclass
class Summary:
    """What an ``annotate`` call did (prompts resumed from earlier runs are
    counted in ``already_done`` only)."""

    prompts: int = 0
    already_done: int = 0
    pairs: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    generated_tokens: int = 0
    responses: int = 0


# -- input ------------------------------------------------------------------


def load_prompts(source: str, field: str | None = None, limit: int | None = None) -> list[PromptRecord]:
    """Prompts from a JSON-lines file (or JSON array), or the questions of a
    built-in evaluation task (``gsm8k``, ``math500``, ...). A record's prompt
    is ``field`` or the first of ``PROMPT_FIELDS`` it has; its id the first of
    the evaluation ids (``unique_id``, ``id``, ``idx``), else its line number;
    an optional ``responses`` list of strings is scored instead of sampling."""
    if limit is not None and limit < 1:
        raise AnnotationError(f"limit must be >= 1, got {limit}")
    if source in BUILTIN_FILES or source.startswith("hf:"):
        try:
            task = load_task(source)
        except TaskError as error:
            raise AnnotationError(str(error)) from error
        return [PromptRecord(p.id, p.question) for p in task.head(limit)]
    path = Path(source)
    if not path.is_file():
        raise AnnotationError(
            f"no prompts at {source!r}: not a file and not a built-in task ({', '.join(BUILTIN_FILES)})"
        )
    try:
        records = read_records(path)
    except TaskError as error:
        raise AnnotationError(str(error)) from error
    fields = (field,) if field else PROMPT_FIELDS
    prompts: list[PromptRecord] = []
    try:
        for where, prompt_id, record in identified_records(records, str(path), lambda _, number: f"line-{number}"):
            prompt = next((record[f] for f in fields if isinstance(record.get(f), str) and record[f].strip()), None)
            if prompt is None:
                raise AnnotationError(f"{where}: no prompt; expected a non-empty string in {' or '.join(fields)}")
            prompts.append(PromptRecord(prompt_id, prompt, _given_responses(record.get("responses"), where)))
            if limit is not None and len(prompts) == limit:
                break
    except TaskError as error:
        raise AnnotationError(str(error)) from error
    if not prompts:
        raise AnnotationError(f"{path}: no prompts in it")
    return prompts


def _given_responses(responses: object, where: str) -> tuple[str, ...] | None:
    """A record's own ``responses`` (to score instead of sampling), checked."""
    if responses is None:
        return None
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise AnnotationError(f"{where}: 'responses' must be a list of strings")
    if len(responses) < 2:
        raise AnnotationError(f"{where}: {len(responses)} response(s) given; a pair needs at least 2")
    return tuple(responses)


# -- the choice -------------------------------------------------------------


def choose_pair(
    texts: Sequence[str],
    scores: Sequence[float | None],
    *,
    rejected: str = "lowest",
    margin: float = 0.0,
    rng: np.random.Generator | None = None,
) -> tuple[int, int] | str:
    """(chosen, rejected) indices among the responses with a finite score, or
    the reason there is no pair. Chosen is the first response with the highest
    score; rejected is taken among responses scored below it by more than
    ``margin`` whose text differs from the chosen one: the lowest-scored
    (first of them on a tie) or, with ``rejected="random"``, a uniform draw."""
    if rejected not in REJECTED_RULES:
        raise ValueError(f"rejected must be one of {REJECTED_RULES}, got {rejected!r}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    usable = [i for i, s in enumerate(scores) if s is not None and math.isfinite(s)]
    if len(usable) < 2:
        return f"{len(usable)} usable response(s); a pair needs 2"
    chosen = max(usable, key=lambda i: (scores[i], -i))
    best = scores[chosen]
    worse = [i for i in usable if scores[i] < best - margin and texts[i] != texts[chosen]]
    if not worse:
        return "tie: no response scored below the best" + (f" by more than {margin:g}" if margin else "")
    if rejected == "lowest":
        return chosen, min(worse, key=lambda i: (scores[i], i))
    generator = rng if rng is not None else np.random.default_rng()
    return chosen, int(worse[int(generator.integers(len(worse)))])


def prompt_seeds(seed: int, prompt_id: str, k: int) -> list[int]:
    """The sampling seeds of one prompt's ``k`` responses: a function of the
    run's seed and the prompt's id only, so resuming changes nothing."""
    return [zlib.crc32(f"{seed}:{prompt_id}:{i}".encode()) % SEED_RANGE for i in range(k)]


# -- output -----------------------------------------------------------------


def skipped_path(out: Path) -> Path:
    name = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(name + ".skipped.jsonl")


def _read_done(path: Path, scoring: Mapping[str, object], sampled: Mapping[str, object]) -> set[str]:
    """Ids already written to ``path``, after cutting a torn last line (a
    crash cut it short; its prompt is redone); refuses a file scored
    otherwise (``scoring``) or sampled otherwise (``sampled``, checked on
    lines whose responses were sampled)."""
    done = set()
    try:
        for _, record in read_lines(path):
            expected = dict(scoring) | (dict(sampled) if record.get("policy") != "given" else {})
            for key, value in expected.items():
                if record.get(key) != value:
                    raise AnnotationError(
                        f"{path} was written with {key} {record.get(key)!r}, not {value!r}; "
                        "pass another --out, or the same settings to resume it"
                    )
            done.add(str(record["id"]))
    except JSONLinesError as error:
        raise AnnotationError(f"{error}; is it an annotation file?") from None
    return done


# -- the run ----------------------------------------------------------------


async def annotate(
    prompts: Sequence[PromptRecord],
    lm: LanguageModel | None,
    reward: Reward,
    out: str | os.PathLike,
    *,
    k: int = 4,
    rejected: str = "lowest",
    margin: float = 0.0,
    max_tokens: int = 512,
    temperature: float = 0.8,
    top_p: float = 1.0,
    seed: int = 0,
    system: str | None = None,
    aggregation: str = "model",
    keep_truncated: bool = False,
    batch_size: int = 8,
    progress: Callable[[Summary], None] | None = None,
) -> Summary:
    """Annotate ``prompts`` into ``out`` (see the module docstring); returns
    what this call did. ``lm`` samples ``k`` responses per prompt that has no
    responses of its own (it may be None when every prompt has some)."""
    from piscale.api import sample

    if k < 2:
        raise AnnotationError(f"k must be >= 2 (a pair needs two responses), got {k}")
    if batch_size < 1:
        raise AnnotationError(f"batch_size must be >= 1, got {batch_size}")
    check_aggregation(aggregation)
    choose_pair([], [], rejected=rejected, margin=margin)  # validates the rule before any work
    if lm is None and any(p.responses is None for p in prompts):
        raise AnnotationError("some prompts have no responses and no model was given to sample them")
    out = Path(out)
    if not out.parent.is_dir():
        raise AnnotationError(f"directory of {out} does not exist")
    skipped_out = skipped_path(out)
    # What the responses were drawn from: a resumed file must not mix two
    # distributions, and distillation needs to know the proposal. Given
    # responses were drawn from nothing piscale knows.
    scoring = {"reward": reward.name, "reward_scale": reward.scale, "system": system}
    sampled = {
        "policy": lm.name if lm is not None else None,
        "sampling": {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens},
    }
    given = {"policy": "given", "sampling": None}
    done = _read_done(out, scoring, sampled) | _read_done(skipped_out, scoring, sampled)
    summary = Summary(prompts=len(prompts), already_done=sum(p.id in done for p in prompts))
    todo = [p for p in prompts if p.id not in done]
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]

        async def responses_of(p: PromptRecord) -> list[dict]:
            if p.responses is not None:
                return [{"text": text, "tokens": None, "finish_reason": "given"} for text in p.responses]
            outputs = await sample(
                lm, p.prompt, k, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                seeds=prompt_seeds(seed, p.id, k), system=system,
            )
            summary.generated_tokens += sum(len(o.token_ids) for o in outputs)
            return [
                {"text": o.text, "tokens": len(o.token_ids), "finish_reason": o.finish_reason,
                 "token_ids": list(o.token_ids)}
                | ({"error": o.error} if o.error else {})
                for o in outputs
            ]

        candidates = await asyncio.gather(*(responses_of(p) for p in batch))
        await _score(reward, batch, candidates, aggregation, keep_truncated)
        pairs, skipped = [], []
        for p, responses in zip(batch, candidates):
            rng = np.random.default_rng(zlib.crc32(f"{seed}:{p.id}:rejected".encode()))
            texts = [r["text"] for r in responses]
            choice = choose_pair(texts, [r["score"] for r in responses], rejected=rejected, margin=margin, rng=rng)
            identity = {**scoring, **(given if p.responses is not None else sampled)}
            base = {"id": p.id, "prompt": p.prompt}
            if isinstance(choice, str):
                skipped.append({**base, "skipped": choice, **identity, "responses": responses})
                reason = "tie" if choice.startswith("tie") else "too few usable responses"
                summary.skipped[reason] = summary.skipped.get(reason, 0) + 1
                continue
            best, worst = choice
            pairs.append({
                **base, "chosen": texts[best], "rejected": texts[worst],
                "chosen_score": responses[best]["score"], "rejected_score": responses[worst]["score"],
                **identity, "responses": responses,
            })
        # Pairs are written before skips: a crash between the two writes
        # redoes only skipped prompts, which write the same lines again.
        append_lines(out, pairs)
        append_lines(skipped_out, skipped)
        summary.pairs += len(pairs)
        summary.responses += sum(map(len, candidates))
        if progress is not None:
            progress(summary)
    return summary


async def _score(
    reward: Reward, batch: Sequence[PromptRecord], candidates: Sequence[list[dict]], aggregation: str,
    keep_truncated: bool,
) -> None:
    """Set ``score`` on every response of the batch in one reward call;
    responses that are not candidates get None and an ``excluded`` reason."""
    prompts, trajectories, slots = [], [], []
    for p, responses in zip(batch, candidates):
        for response in responses:
            reason = _exclusion(response, keep_truncated)
            response["score"] = None
            if reason:
                response["excluded"] = reason
                continue
            prompts.append(p.prompt)
            trajectories.append(split_steps(response["text"], STEP_DELIMITER) if aggregation != "model" else [response["text"]])
            slots.append(response)
    if not slots:
        return
    scores = await score_trajectories(reward, prompts, trajectories, aggregation)  # type: ignore[arg-type]
    for response, value in zip(slots, scores):
        if math.isfinite(value):
            response["score"] = float(value)
        else:
            response["excluded"] = f"the reward gave {value}"


def _exclusion(response: Mapping, keep_truncated: bool) -> str | None:
    if response["finish_reason"] == "error":
        return "the backend failed to write it"
    if not response["text"].strip():
        return "empty"
    if response["finish_reason"] in ("length", "context") and not keep_truncated:
        return "hit the token cap"
    return None
