"""Labelled rollouts of a policy on training problems, stored resumably.

For a problem c the policy pi writes ``n`` answers step by step, exactly as
particle filtering extends its particles (steps end at a blank line, the same
temperature and token caps, ``piscale.search.driver.Driver``). Each finished
answer x is graded against the reference by the verifier
(``piscale.grading``), and its steps get labels of the value

    V(c, x_{<=t}) = P(the policy, continuing x_{<=t}, ends correct):

* **outcome labels** (always): every prefix x_{<=t} of a rollout gets the
  rollout's own correctness 1{x correct}. Given the prefix, the rest of the
  rollout is a draw from pi, so the label is a Bernoulli(V(c, x_{<=t})) draw:
  an unbiased, noisy estimate. Minimising cross-entropy on such labels fits
  their conditional expectation, which is V itself;
* **Monte-Carlo labels** (Math-Shepherd, Wang et al. 2024; optional, on the
  first ``mc_problems`` problems): from each unfinished prefix, ``k`` more
  completions; the label is the fraction that are correct, an estimate of V
  with variance V (1 - V) / k. The prefix's backend sequence is forked
  (``lm.fork``: llama.cpp shares the cache, transformers copies rows), so no
  prefix is read twice.

**Storage.** Rollouts go to the evaluation store (``piscale.eval.store``):
one *search* per problem (algorithm ``rollouts``, budget ``n``, the seed,
variant ``mc=k`` when Monte-Carlo labels were drawn) holding every rollout,
and one result row whose ``expected_accuracy`` is the fraction of correct
rollouts (the policy's pass@1 on the problem). A problem is written in one
transaction the moment its rollouts are graded, so a killed run loses only
the problems in flight, and running the same command again skips every
stored problem. The configuration records the data's fingerprint (sha256 of
its problems), the policy's identity (the catalog's file hashes), the prompt
and sampling settings; each run records its command and package versions.
``piscale report`` reads the database like any other.

**Seeds.** The rollouts of a problem depend only on the run's seed and the
problem's id (a generator seeded by both), not on which problems share the
backend's batches.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from piscale.eval.identity import model_identity, package_versions
from piscale.eval.store import ResultRow, ResultStore
from piscale.tasks import DEFAULT_PROMPT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, Problem, Task, format_prompt
from piscale.grading import answers_equal, extract_answer
from piscale.lm.base import LanguageModel, StepParams
from piscale.search.driver import SEED_RANGE, Driver
from piscale.search.node import Node, ready
from piscale.search.settings import Settings

ALGORITHM = "rollouts"
"""The algorithm name collections are stored under."""


class CollectError(ValueError):
    """A bad collection setting; the message says which."""


@dataclass(frozen=True)
class CollectConfig:
    """What decides a problem's rollouts; its hash (with the data's
    fingerprint and the policy's identity) keys the stored rollouts."""

    policy: str
    rollouts: int = 4
    seed: int = 0
    temperature: float = 0.8
    max_tokens: int = 512
    max_step_tokens: int = 256
    max_steps: int = 40
    step_delimiter: str = "\n\n"
    system: str = DEFAULT_SYSTEM_PROMPT
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    mc_completions: int = 0
    """k completions per unfinished prefix for Monte-Carlo labels (0: none)."""
    mc_problems: int = 0
    """how many problems, the first of the task, get Monte-Carlo labels."""

    def __post_init__(self) -> None:
        for name in ("rollouts", "max_tokens", "max_step_tokens", "max_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CollectError(f"{name} must be a positive integer, got {value!r}")
        for name in ("seed", "mc_completions", "mc_problems"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CollectError(f"{name} must be an integer >= 0, got {value!r}")
        if self.mc_problems and not self.mc_completions:
            raise CollectError("mc_problems > 0 needs mc_completions > 0 (the k of the Monte-Carlo labels)")
        if not self.policy:
            raise CollectError("no policy model given")
        self.settings()  # validates temperature, caps and delimiter

    def settings(self) -> Settings:
        return Settings(
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            max_step_tokens=self.max_step_tokens,
            max_steps=self.max_steps,
            step_delimiter=self.step_delimiter,
        )

    def sampling(self) -> dict:
        """The settings that decide rollouts, without the Monte-Carlo subset
        (a problem's variant says whether it has Monte-Carlo labels)."""
        chosen = asdict(self)
        for name in ("policy", "seed", "mc_problems"):
            chosen.pop(name)
        return chosen


def problem_seed(seed: int, problem_id: str) -> np.random.Generator:
    """The generator of one problem's rollouts: a function of the run's seed
    and the problem's id only."""
    digest = int.from_bytes(hashlib.sha256(problem_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


class Collection:
    """The rollouts of a policy on the problems of a task, in a store."""

    def __init__(self, store: ResultStore, task: Task, problems: Sequence[Problem], config: CollectConfig):
        if not problems:
            raise CollectError("no problems to collect rollouts on")
        self.store, self.task, self.problems, self.config = store, task, tuple(problems), config
        self.description = {
            "dataset": {"name": task.label, "fingerprint": task.fingerprint, "source": task.source},
            "model": model_identity(config.policy),
            "reward": {"spec": "verifier (piscale.grading.answers_equal against the reference)"},
            "collect": config.sampling(),
        }
        keyed = {
            **self.description,
            "dataset": {"fingerprint": task.fingerprint},
            "model": {k: v for k, v in self.description["model"].items() if k != "identity_unavailable"},
        }
        self.config_key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]
        store.ensure_config(self.config_key, task.label, config.policy, ALGORITHM, self.description)
        self.mc_ids = {p.id for p in self.problems[: config.mc_problems]}

    def variant(self, problem: Problem) -> str:
        return f"mc={self.config.mc_completions}" if problem.id in self.mc_ids else ""

    def cell(self, problem: Problem) -> tuple[str, str, str, int, int]:
        return (problem.id, ALGORITHM, self.variant(problem), self.config.rollouts, self.config.seed)

    def pending(self) -> list[Problem]:
        """Problems whose rollouts are not stored yet."""
        stored = self.store.stored_cells(self.config_key, [p.id for p in self.problems])
        return [p for p in self.problems if self.cell(p) not in stored]

    def start_run(self, command: Sequence[str], engine_options: dict | None = None) -> int:
        info = {
            "command": list(command),
            "packages": package_versions(),
            "host": platform.node(),
            "engine_options": engine_options or {},
            "problems": len(self.problems),
        }
        return self.store.start_run(self.config_key, info)

    async def run(
        self,
        lm: LanguageModel,
        run_id: int,
        *,
        parallel: int = 4,
        on_problem: Callable[[Problem, dict], None] | None = None,
    ) -> int:
        """Collect every pending problem, ``parallel`` at a time (they share
        the backend's batches); store each as soon as it is graded. Returns
        the number of problems stored. A failing problem is recorded as a
        failure (a later run retries it) and the others go on."""
        if parallel < 1:
            raise CollectError(f"parallel must be >= 1, got {parallel}")
        queue = list(self.pending())
        self.failed: list[tuple[str, str]] = []
        done = 0

        async def worker() -> None:
            nonlocal done
            while queue:
                problem = queue.pop(0)
                if self.cell(problem) in self.store.stored_cells(self.config_key, [problem.id]):
                    continue  # another process stored it meanwhile
                try:
                    result = await collect_problem(
                        lm, problem, self.config, mc=problem.id in self.mc_ids
                    )
                except Exception as error:  # recorded; the run goes on with the other problems
                    message = f"{type(error).__name__}: {error}"
                    self.store.record_failure(self.config_key, run_id, self.cell(problem), message)
                    self.failed.append((problem.id, message))
                    continue
                self.store.save_search(self.config_key, run_id, self.cell(problem), result, self._rows(problem))
                done += 1
                if on_problem is not None:
                    on_problem(problem, result)

        await asyncio.gather(*(worker() for _ in range(min(parallel, max(len(queue), 1)))))
        return done

    def _rows(self, problem: Problem) -> Callable[[dict], list[ResultRow]]:
        def derive(result: dict) -> list[ResultRow]:
            rollouts = result["rollouts"]
            first = rollouts[0]
            usage = result["usage"]
            return [
                ResultRow(
                    problem_id=problem.id,
                    algorithm=ALGORITHM,
                    variant=self.variant(problem),
                    budget=self.config.rollouts,
                    seed=self.config.seed,
                    reference=problem.reference,
                    answer=first["answer"],
                    correct=bool(first["correct"]),
                    expected_accuracy=float(np.mean([r["correct"] for r in rollouts])),
                    subsampled=False,
                    samples_from=len(rollouts),
                    subsets=1,
                    generated_tokens=float(usage["generated_tokens"]),
                    prompt_tokens=float(usage["prompt_tokens"]),
                    reward_calls=0.0,
                    wall_time=float(usage["wall_time"]),
                )
            ]

        return derive


@dataclass
class _Rollout:
    node: Node
    handle: int | None
    mc_correct: list[int] = field(default_factory=list)
    """correct completions out of k from each unfinished prefix, in step order."""


async def collect_problem(lm: LanguageModel, problem: Problem, config: CollectConfig, *, mc: bool = False) -> dict:
    """The graded rollouts of one problem (what the store keeps)."""
    settings = config.settings()
    question = format_prompt(config.prompt_template, problem.question)
    driver = Driver(lm, None, question, lm.prompt_ids(question, config.system), settings)
    rng = problem_seed(config.seed, problem.id)
    started = time.perf_counter()
    handles = await driver.open(config.rollouts)
    rollouts = [_Rollout(driver.root, handle) for handle in handles]
    try:
        while live := ready([r.node for r in rollouts]):
            children = await driver.extend(
                [rollouts[i].node for i in live], [rollouts[i].handle for i in live], rng
            )
            for i, child in zip(live, children):
                rollouts[i].node = child
                if child.done:
                    rollouts[i].handle = None  # the driver released it
            if mc:
                unfinished = [rollouts[i] for i in live if not rollouts[i].node.done]
                await _monte_carlo(driver, unfinished, problem.reference, config, rng)
    finally:
        driver.release([r.handle for r in rollouts])
    records = []
    for rollout in rollouts:
        node = rollout.node
        answer = extract_answer(node.response())
        correct = answers_equal(answer, problem.reference)
        record = {
            "steps": node.steps(),
            "answer": answer,
            "correct": bool(correct),
            "ended": node.ended,
            "tokens": node.total_tokens,
        }
        if mc:
            # Unfinished prefixes have k completions each; the last step's
            # value is its own outcome, known exactly.
            record["mc_correct"] = rollout.mc_correct + [config.mc_completions * int(correct)]
            record["mc_k"] = config.mc_completions
        records.append(record)
    return {
        "problem_id": problem.id,
        "question": question,
        "system": config.system,
        "reference": problem.reference,
        "rollouts": records,
        "usage": {**driver.usage.to_dict(time.perf_counter() - started)},
    }


async def _monte_carlo(
    driver: Driver, rollouts: Sequence[_Rollout], reference: str, config: CollectConfig, rng: np.random.Generator
) -> None:
    """k completions from each rollout's current (unfinished) prefix, read
    from forks of its sequence, in one backend call."""
    if not rollouts:
        return
    k = config.mc_completions
    lm = driver.lm
    forks = lm.fork([r.handle for r in rollouts for _ in range(k)])
    room = min(config.max_tokens - r.node.total_tokens for r in rollouts)
    params = StepParams(max_tokens=max(1, room), stop=(), temperature=config.temperature)
    seeds = [int(s) for s in rng.integers(0, SEED_RANGE, size=len(forks))]
    try:
        outputs = await lm.extend(forks, params, seeds=seeds)
    finally:
        lm.release(forks)
    for j, rollout in enumerate(rollouts):
        prefix = rollout.node.response()
        mine = outputs[j * k : (j + 1) * k]
        driver.usage.generated_tokens += sum(len(o.token_ids) for o in mine)
        rollout.mc_correct.append(sum(answers_equal(extract_answer(prefix + o.text), reference) for o in mine))


def stored_rollouts(store: ResultStore) -> list[dict]:
    """Every stored problem's rollouts (the dicts ``collect_problem``
    returns), with ``config_key``, ``seed`` and ``variant`` added, in the
    order they were stored."""
    found = []
    for entry in store.searches():
        if entry["algorithm"] != ALGORITHM:
            continue
        result = store.search(entry["search_id"])
        found.append({**result, "config_key": entry["config_key"], "seed": entry["seed"], "variant": entry["variant"]})
    if not found:
        raise CollectError(f"{store.path} holds no rollouts (no searches of algorithm {ALGORITHM!r})")
    return found
