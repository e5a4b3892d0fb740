"""Running an evaluation grid: algorithms x budgets x seeds over a task.

The grid is planned against the database first: every cell already stored is
skipped, so re-running a command resumes it, and a command whose cells are
all stored does not even load the model. Pending work becomes *jobs*, one per
(algorithm, run budget, seed) and the problems it still lacks; each job sends
its problems to ``piscale.search.run_many`` in chunks, and every result is
graded and committed the moment its chunk returns. A kill therefore loses at
most one chunk. Before each chunk the database is read again, so a second
process working on the same grid does not redo what the first has stored
meanwhile.

Best-of-N, weighted best-of-N and self-consistency differ only in how they
pick from N independent samples, so the ones in a grid that take the same
options share their samples: one search per problem and seed, at the largest
missing budget, yields the rows of all three, and the smaller budgets are
subsampled from those samples (``piscale.eval.subsample``). Comparisons
between them are then paired, as search-and-learn's are.

Search options (``--option KEY=VALUE``) go to every algorithm of the grid that
takes them; ``ALGORITHM.KEY=VALUE`` targets one algorithm. The options an
algorithm actually receives form its *variant*, part of each result's key.
Cells an algorithm cannot run (beam search and DVTS need a budget that is a
multiple of their beam width) are listed in ``Evaluation.unsupported`` and
skipped, not run.
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import itertools
import json
import os
import platform
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from piscale.eval.grade import SUBSAMPLED_ALGORITHMS, rows_from_result
from piscale.eval.grid import EvalConfig, EvalError, Grid, Job, algorithm_options, budget_problems, variant_label
from piscale.eval.identity import keyed_description, model_identity, package_versions, reward_identity
from piscale.eval.store import ResultRow, ResultStore
from piscale.tasks import Problem, Task, format_prompt

if TYPE_CHECKING:
    from piscale.lm.base import LanguageModel


SolveMany = Callable[..., Awaitable[Sequence]]
"""``run_many(lm, reward, questions, algorithm, budget, seed, *, system, trace, **options)``."""


@dataclass
class Progress:
    """What has happened so far in this process, for a progress display."""

    searches_done: int = 0
    searches_total: int = 0
    failures: int = 0
    """Searches that raised; they are recorded and retried by the next run."""
    rows_stored: int = 0
    correct: int = 0
    graded: int = 0
    generated_tokens: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    problems_done: int = 0
    """Problems whose every search of this run has finished (stored or failed)."""
    searches_left: dict[str, int] = field(default_factory=dict, repr=False)
    """Per problem, the searches of this run not yet finished."""

    @classmethod
    def planned(cls, jobs: Sequence[Job]) -> Progress:
        left: dict[str, int] = {}
        for job in jobs:
            for problem in job.problems:
                left[problem.id] = left.get(problem.id, 0) + 1
        return cls(searches_total=sum(left.values()), searches_left=left)

    @property
    def problems_total(self) -> int:
        return len(self.searches_left)

    def finished(self, problem_id: str) -> None:
        """One search of ``problem_id`` has finished, or needs no running."""
        self.searches_left[problem_id] -= 1
        if self.searches_left[problem_id] == 0:
            self.problems_done += 1

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.graded if self.graded else None

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / max(time.perf_counter() - self.started, 1e-9)




class Evaluation:
    """One task, configuration and grid against one results database."""

    def __init__(
        self,
        store: ResultStore,
        task: Task,
        config: EvalConfig,
        grid: Grid,
        *,
        limit: int | None = None,
        skip: int = 0,
        identity: Mapping | None = None,
    ):
        self.store = store
        self.task = task
        self.config = config
        self.grid = grid
        self.problems = task.head(limit, skip)
        self.options = algorithm_options(grid.algorithms, config.options)
        self.variants = {a: variant_label(o) for a, o in self.options.items()}
        self.unsupported: dict[tuple[str, int], str] = {
            (a, b): reason
            for a in grid.algorithms
            for b, reason in budget_problems(a, grid.budgets, self.options[a]).items()
        }
        self.model_identity = dict(identity) if identity is not None else model_identity(config.model)
        description = {
            "dataset": {"name": task.name, "source": task.source, "fingerprint": task.fingerprint},
            "model": self.model_identity,
            "reward": reward_identity(config.reward, config.model),
            "engine": config.engine,
            "system": config.system,
            "prompt_template": config.prompt_template,
        }
        keyed = keyed_description(description)
        self.config_key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]
        # A database written when the key still held where the data was read
        # from keeps its key: the same data, model and reward resume there.
        for stored in store.configs():
            if stored["config_key"] != self.config_key and keyed_description(stored["description"]) == keyed:
                self.config_key = stored["config_key"]
                break
        store.ensure_config(self.config_key, task.label, config.model, config.reward, description)

    def budgets_for(self, algorithm: str) -> tuple[int, ...]:
        return tuple(b for b in self.grid.budgets if (algorithm, b) not in self.unsupported)

    @property
    def cell_count(self) -> int:
        """Cells of the grid that will be filled (unsupported ones excluded)."""
        per_problem = sum(len(self.budgets_for(a)) for a in self.grid.algorithms)
        return len(self.problems) * per_problem * len(self.grid.seeds)

    # -- planning -------------------------------------------------------------
    def pending(self) -> list[Job]:
        """The jobs that would fill every missing cell of the grid."""
        stored = self.store.stored_cells(self.config_key)
        jobs: list[Job] = []
        # selections that take the same options share one set of samples
        sharing: dict[str, list[str]] = {}
        for algorithm in self.grid.algorithms:
            if algorithm in SUBSAMPLED_ALGORITHMS:
                sharing.setdefault(self.variants[algorithm], []).append(algorithm)
        for seed in self.grid.seeds:
            for variant, selections in sharing.items():
                by_need: dict[tuple, list[Problem]] = {}
                for problem in self.problems:
                    need = []
                    for algorithm in selections:
                        budgets = self.budgets_for(algorithm)
                        missing = tuple(b for b in budgets if (problem.id, algorithm, variant, b, seed) not in stored)
                        if missing:
                            need.append((algorithm, missing))
                    if need:
                        by_need.setdefault(tuple(need), []).append(problem)
                for need, todo in by_need.items():
                    (algorithm, missing), *shared = need
                    budget = max(b for _, budgets in need for b in budgets)
                    options = self.options[algorithm]
                    jobs.append(Job(algorithm, variant, options, budget, seed, missing, tuple(todo), tuple(shared)))
            for algorithm in self.grid.algorithms:
                if algorithm in SUBSAMPLED_ALGORITHMS:
                    continue
                variant, options = self.variants[algorithm], self.options[algorithm]
                budgets = self.budgets_for(algorithm)
                for budget in budgets:
                    todo = tuple(p for p in self.problems if (p.id, algorithm, variant, budget, seed) not in stored)
                    if todo:
                        jobs.append(Job(algorithm, variant, options, budget, seed, (budget,), todo))
        return jobs

    # -- running --------------------------------------------------------------
    def start_run(self, extra: Mapping | None = None) -> int:
        info = {
            "argv": sys.argv,
            "grid": {"algorithms": self.grid.algorithms, "budgets": self.grid.budgets, "seeds": self.grid.seeds},
            "options": {a: o for a, o in self.options.items() if o},
            "unsupported": [f"{a}@{b}: {reason}" for (a, b), reason in self.unsupported.items()],
            "problems": len(self.problems),
            "versions": package_versions(),
            "host": socket.gethostname(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "user": _user(),
            **(extra or {}),
        }
        return self.store.start_run(self.config_key, info)

    async def run(
        self,
        lm: LanguageModel | None,
        reward: object,
        *,
        run_id: int,
        solve_many: SolveMany | None = None,
        chunk_size: int = 8,
        trace: bool = False,
        on_progress: Callable[[Progress], None] | None = None,
        jobs: Sequence[Job] | None = None,
        max_failures_in_a_row: int = 10,
        parallel: int = 1,
    ) -> Progress:
        """Run the pending jobs (or ``jobs``), storing every result at once.

        A search that raises (say, a trajectory outgrew the reward model's
        context) is recorded in the ``failures`` table and the run goes on;
        a chunk that raises is retried one problem at a time, so one bad
        problem does not cost its neighbours. ``max_failures_in_a_row``
        failures with no success between them stop the run with an
        ``EvalError``: the cause is then not one problem but the setup.

        ``parallel`` chunks of that order (the algorithms and budgets of one
        block of problems, mostly) are in flight at once, and the next starts
        as soon as one returns, so their particles share the backend's
        passes: a batch stays full while one search waits for its slowest
        particle. Results are stored as each chunk returns.

        An engine with a fixed number of cache slots (``lm.max_sequences``,
        as llama.cpp has) gets chunks it can hold: a chunk of a budget-``b``
        search has at most ``max_sequences // (parallel * b)`` problems (at
        least one), so that a wave of searches does not fail for want of
        slots and fall back to one problem at a time."""
        if chunk_size < 1:
            raise EvalError(f"chunk_size must be >= 1, got {chunk_size}")
        if parallel < 1:
            raise EvalError(f"parallel must be >= 1, got {parallel}")
        if max_failures_in_a_row < 1:
            raise EvalError(f"max_failures_in_a_row must be >= 1, got {max_failures_in_a_row}")
        if solve_many is None:
            from piscale.search import run_many as solve_many
        jobs = self.pending() if jobs is None else list(jobs)
        reward_scale = getattr(reward, "scale", "probability") if reward is not None else "probability"
        progress = Progress.planned(jobs)
        if on_progress:
            on_progress(progress)
        in_a_row = 0
        work = _problem_major(jobs, self.problems, chunk_size)
        capacity = lm.max_sequences if lm is not None else None
        if capacity is not None and capacity > 0:
            work = _within_capacity(work, max(1, capacity // parallel))
        async for job, outcomes in self._attempt_all(solve_many, lm, reward, work, parallel, progress, trace):
            in_a_row = self._record(run_id, job, outcomes, reward_scale, progress, in_a_row, max_failures_in_a_row)
            if on_progress:
                on_progress(progress)
        return progress

    def _still_to_do(self, job: Job, chunk: Sequence[Problem], progress: Progress) -> list[Problem]:
        """The problems of ``chunk`` that some cell of ``job`` lacks, read
        from the database now, so that another writer's results are skipped."""
        stored = self.store.stored_cells(self.config_key, [p.id for p in chunk])
        todo = [p for p in chunk if not all(cell in stored for cell in job.cells(p))]
        progress.searches_total -= len(chunk) - len(todo)
        for problem in chunk:
            if problem not in todo:
                progress.finished(problem.id)
        return todo

    async def _attempt_all(self, solve_many, lm, reward, work, parallel: int, progress: Progress, trace: bool):
        """Each (job, outcomes) as its searches return, keeping ``parallel``
        chunks in flight: the next starts as soon as any one finishes, so a
        slow search never leaves the batch to its stragglers alone. One at a
        time is simply awaited, so that an interrupt raised inside a search
        reaches the caller as it would without this loop (from a task,
        asyncio lets it escape the event loop instead); several run as
        tasks, cancelled if this generator is left."""
        if parallel == 1:
            for job, chunk in work:
                todo = self._still_to_do(job, chunk, progress)
                if todo:
                    yield job, await self._attempt(solve_many, lm, reward, job, todo, trace)
            return

        async def attempt(job: Job, chunk: Sequence[Problem]):
            todo = self._still_to_do(job, chunk, progress)
            return job, (await self._attempt(solve_many, lm, reward, job, todo, trace) if todo else [])

        waiting = iter(work)
        running: set[asyncio.Future] = set()
        try:
            while True:
                for job, chunk in itertools.islice(waiting, parallel - len(running)):
                    running.add(asyncio.ensure_future(attempt(job, chunk)))
                if not running:
                    return
                finished, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    job, outcomes = task.result()
                    if outcomes:
                        yield job, outcomes
        finally:
            for task in running:
                task.cancel()

    def _record(
        self, run_id: int, job: Job, outcomes, reward_scale: str, progress: Progress, in_a_row: int, limit: int
    ) -> int:
        """Store a job's outcomes, or record its failures; returns the count
        of failures in a row, raising ``EvalError`` when it reaches ``limit``."""
        for problem, outcome in outcomes:
            failure: Exception | None = None
            if isinstance(outcome, Exception):
                failure, message = outcome, f"{type(outcome).__name__}: {outcome}"
            else:
                try:
                    self._store(run_id, job, problem, outcome, reward_scale, progress)
                except Exception as error:  # grading one strange result must not end a long run
                    failure, message = error, f"storing the result failed: {type(error).__name__}: {error}"
            if failure is None:
                in_a_row = 0
                continue
            cell = (problem.id, job.algorithm, job.variant, job.budget, job.seed)
            self.store.record_failure(self.config_key, run_id, cell, message)
            progress.failures += 1
            progress.finished(problem.id)
            in_a_row += 1
            if in_a_row >= limit:
                raise EvalError(
                    f"{in_a_row} searches in a row failed, the last ({job.algorithm} at budget "
                    f"{job.budget}, problem {problem.id}) with {message}"
                ) from failure
        return in_a_row

    async def _attempt(
        self, solve_many: SolveMany, lm: object, reward: object, job: Job, problems: Sequence[Problem], trace: bool
    ) -> list[tuple[Problem, dict | Exception]]:
        """Each problem with its result, or with the exception its search raised."""
        questions = [format_prompt(self.config.prompt_template, p.question) for p in problems]
        try:
            results = await solve_many(
                lm,
                reward,
                questions,
                job.algorithm,
                job.budget,
                job.seed,
                system=self.config.system,
                trace=trace,
                **dict(job.options),
            )
        except Exception as error:  # any search error: isolate it to the problem that caused it
            if len(problems) == 1:
                return [(problems[0], error)]
            outcomes: list[tuple[Problem, dict | Exception]] = []
            for problem in problems:
                outcomes += await self._attempt(solve_many, lm, reward, job, [problem], trace)
            return outcomes
        if len(results) != len(problems):
            raise EvalError(f"the search returned {len(results)} results for {len(problems)} questions")
        return [(problem, _as_dict(result)) for problem, result in zip(problems, results)]

    def _store(
        self, run_id: int, job: Job, problem: Problem, result: dict, reward_scale: str, progress: Progress
    ) -> None:
        produced: list[ResultRow] = []

        def derive(stored_result: Mapping) -> list[ResultRow]:
            produced[:] = [
                row
                for algorithm, budgets in ((job.algorithm, job.stores), *job.shared)
                for row in rows_from_result(
                    stored_result, problem.id, problem.reference, budgets, reward_scale, job.variant, algorithm
                )
            ]
            return produced

        cell = (problem.id, job.algorithm, job.variant, job.budget, job.seed)
        progress.rows_stored += self.store.save_search(self.config_key, run_id, cell, result, derive)
        progress.searches_done += 1
        progress.finished(problem.id)
        progress.generated_tokens += float(result.get("usage", {}).get("generated_tokens", 0))
        for row in produced:
            if not row.subsampled:
                progress.graded += 1
                progress.correct += int(row.correct)


ORACLE_REWARD = "verify"
"""The reward spec that means: verify each problem's answer against its own
reference. An oracle, for upper bounds and tests; results with it say how
well a perfect outcome reward would do."""


def oracle_reward(problems: Sequence[Problem], template: str):
    """A ``VerifierReward`` that knows every problem's reference, keyed by
    the question exactly as the search passes it to the reward."""
    from piscale.rewards import VerifierReward

    references: dict[str, str] = {}
    for problem in problems:
        question = format_prompt(template, problem.question)
        if references.setdefault(question, problem.reference) != problem.reference:
            raise EvalError(
                f"problem {problem.id} repeats a question with a different reference; the oracle cannot tell them apart"
            )
    return VerifierReward(references)


def _within_capacity(
    work: Sequence[tuple[Job, tuple[Problem, ...]]], sequences: int
) -> list[tuple[Job, tuple[Problem, ...]]]:
    """Split each chunk so that its searches hold at most ``sequences``
    sequences, counting ``budget`` per problem (particles, samples or beams)."""
    split = []
    for job, chunk in work:
        per_chunk = max(1, sequences // max(1, job.budget))
        split += [(job, chunk[i : i + per_chunk]) for i in range(0, len(chunk), per_chunk)]
    return split


def _problem_major(
    jobs: Sequence[Job], problems: Sequence[Problem], chunk_size: int
) -> list[tuple[Job, tuple[Problem, ...]]]:
    """Each job's problems in chunks, ordered so that a block of
    ``chunk_size`` problems goes through every job before the next block
    starts: an interrupted run leaves whole problems done (every cell of the
    grid), not whole algorithms, so a partial table compares like with like."""
    position = {problem.id: index for index, problem in enumerate(problems)}
    work = []
    for job_index, job in enumerate(jobs):
        blocks: dict[int, list[Problem]] = {}
        for problem in job.problems:
            blocks.setdefault(position.get(problem.id, 0) // chunk_size, []).append(problem)
        work += [(block, job_index, job, tuple(chunk)) for block, chunk in blocks.items()]
    work.sort(key=lambda item: (item[0], item[1]))
    return [(job, chunk) for _, _, job, chunk in work]


def _as_dict(result: object) -> dict:
    if isinstance(result, Mapping):
        return dict(result)
    if hasattr(result, "to_dict"):
        return result.to_dict()
    raise EvalError(f"the search returned a {type(result).__name__}, not a SearchResult")


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (some containers); the run is still valid
        return None
