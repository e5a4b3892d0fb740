"""Fitting a step-value head on stored rollouts, and measuring it on held-out problems.

**Data.** Every step t of every stored rollout is one example: the backbone's
hidden state h_t at the end of the step (``StepValueReward.read_features``,
the function that serves the reward) and a label y_t, the rollout's outcome
1{x correct} (or, where collected, the Monte-Carlo fraction of correct
completions from x_{<=t}). Features are cached on disk per rollout, so a
retrain (another layer, another head, another regularisation) reads no
backbone at all.

**Split.** Rollouts of one problem share their prefix distribution, so
examples are split by *problem*: a problem's rollouts are all in training or
all in validation (a deterministic hash of the problem id and the seed).

**Fit.** Logistic regression on standardised features, z = (h - mu) / sigma,
minimising the mean cross-entropy plus (lambda / 2) ||w||^2 with L-BFGS:

    L(w, b) = -mean_t [ y_t log s(w.z_t + b) + (1 - y_t) log(1 - s(w.z_t + b)) ] + lambda/2 ||w||^2.

With outcome labels the minimiser estimates E[y | h] = V (module doc of
``piscale.values``); the layer and lambda are chosen on a part of the
training problems held out from the fit, never on the validation problems.
An MLP head (one ReLU layer, Adam) is the option for a non-linear V.

**Measures** on the validation problems:

* AUROC on step labels: the probability that a step of a correct rollout
  scores above a step of an incorrect one (Mann-Whitney U / (n_+ n_-), ties
  counting one half);
* pairwise accuracy: over the pairs (correct, incorrect) of finished rollouts
  of the same problem, the fraction where the correct one's final score is
  higher (ties one half), pooled over problems; the number a reward needs
  for best-of-N or particle filtering to pick correct answers.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from piscale.eval.store import ResultStore
from piscale.rewards.value import ValueHead
from piscale.values.collect import stored_rollouts
from piscale.values.measures import Pairwise, auroc, pairwise_accuracy, step_pairwise_accuracy


OBJECTIVES = ("within", "pooled")
"""``within``: per-problem intercepts absorb problem difficulty and the head
learns what separates answers to one problem (``fit_logistic``); ``pooled``:
one intercept, the plain estimate of V."""

L2_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0)
"""Regularisation strengths tried (on standardised features and a mean loss,
lambda = 1 already shrinks hard: examples are steps, strongly correlated
within a rollout, so there are far fewer independent ones than rows)."""


class TrainError(ValueError):
    """Bad training input; the message says what."""


@dataclass(frozen=True)
class LabelledRollout:
    problem_id: str
    question: str
    system: str
    steps: tuple[str, ...]
    correct: bool
    mc_values: tuple[float, ...] | None = None
    """Monte-Carlo estimate of V after each step, where collected."""

    @property
    def key(self) -> str:
        """What the backbone reads: the features' cache key."""
        text = json.dumps([self.system, self.question, list(self.steps)])
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def labelled_rollouts(store: ResultStore, first: int | None = None) -> list[LabelledRollout]:
    """Every stored rollout with its labels; with ``first``, only those of the
    first ``first`` problem collections stored (a problem's rollouts under
    one collection setting), so that a database that has grown since still
    gives exactly the same training data."""
    found = []
    collections = stored_rollouts(store)
    if first is not None:
        if first > len(collections):
            raise TrainError(f"{store.path} holds {len(collections)} problem collections, fewer than the {first} asked for")
        collections = collections[:first]
    for result in collections:
        for rollout in result["rollouts"]:
            if not rollout["steps"]:
                continue
            mc = None
            if "mc_correct" in rollout:
                mc = tuple(c / rollout["mc_k"] for c in rollout["mc_correct"])
            found.append(
                LabelledRollout(
                    result["problem_id"], result["question"], result["system"] or "",
                    tuple(rollout["steps"]), bool(rollout["correct"]), mc,
                )
            )
    return found


def data_sha256(rollouts: Sequence[LabelledRollout]) -> str:
    """sha256 of the training data: every rollout's text and labels, in order."""
    digest = hashlib.sha256()
    for r in rollouts:
        digest.update(json.dumps([r.problem_id, r.key, r.correct, r.mc_values]).encode())
    return digest.hexdigest()


def validation_problems(problem_ids: Sequence[str], fraction: float, seed: int) -> set[str]:
    """A deterministic ``fraction`` of the problems, by hashing id and seed."""
    if not 0 < fraction < 1:
        raise TrainError(f"the validation fraction must be in (0, 1), got {fraction}")
    unique = sorted(set(problem_ids))
    ranked = sorted(unique, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    count = max(1, round(fraction * len(unique)))
    if count >= len(unique):
        raise TrainError(f"{len(unique)} problems are too few to hold out {fraction:.0%} and still train")
    return set(ranked[:count])


# -- features --------------------------------------------------------------------
class FeatureCache:
    """Hidden states of rollouts on disk: one ``.npy`` per rollout
    ([layers, steps, hidden], float16) in a folder named by the backbone, the
    layers and the layout, so nothing read with one setting serves another."""

    def __init__(self, root: str | Path, backbone: str, layers: Sequence[int], layout: dict):
        setting = json.dumps({"backbone": backbone, "layers": list(layers), "layout": layout}, sort_keys=True)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", backbone)[-40:]
        self.folder = Path(root) / f"{slug}-{hashlib.sha256(setting.encode()).hexdigest()[:12]}"
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "setting.json").write_text(setting)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        path = self.path(key)
        return np.load(path) if path.is_file() else None

    def put(self, key: str, features: np.ndarray) -> None:
        temporary = self.folder / f"{key}.partial.npy"
        np.save(temporary, features.astype(np.float16))
        temporary.replace(self.path(key))  # atomic: a kill never leaves half a file


def extract_features(
    reward, rollouts: Sequence[LabelledRollout], layers: Sequence[int], cache: FeatureCache,
    *, batch: int = 8, progress: Callable[[int, int], None] | None = None,
) -> list[np.ndarray]:
    """[layers, steps, hidden] per rollout, from the cache or the backbone."""
    missing = [i for i, r in enumerate(rollouts) if not cache.path(r.key).is_file()]
    for start in range(0, len(missing), batch):
        chosen = [rollouts[i] for i in missing[start : start + batch]]
        features = reward.read_features([r.question for r in chosen], [list(r.steps) for r in chosen], layers)
        for r, f in zip(chosen, features):
            cache.put(r.key, f)
        if progress is not None:
            progress(min(start + batch, len(missing)), len(missing))
    return [cache.get(r.key).astype(np.float32) for r in rollouts]


@dataclass
class StepTable:
    """One row per step: features of one layer, label, which rollout and problem."""

    features: np.ndarray
    labels: np.ndarray
    outcome: np.ndarray
    rollout: np.ndarray
    last: np.ndarray
    """True for a rollout's final step (its score is the answer's score)."""


def step_table(
    rollouts: Sequence[LabelledRollout], features: Sequence[np.ndarray], layer_index: int, labels: str = "outcome"
) -> StepTable:
    if labels not in ("outcome", "mc"):
        raise TrainError(f"labels must be 'outcome' or 'mc', got {labels!r}")
    rows, ys, outcomes, owners, lasts = [], [], [], [], []
    for i, (r, f) in enumerate(zip(rollouts, features)):
        steps = f.shape[1]
        if steps != len(r.steps):
            raise TrainError(f"features of a rollout of {r.problem_id} have {steps} steps, the rollout {len(r.steps)}")
        rows.append(f[layer_index])
        y = np.full(steps, float(r.correct))
        if labels == "mc" and r.mc_values is not None:
            y = np.asarray(r.mc_values, dtype=float)
        ys.append(y)
        outcomes.append(np.full(steps, float(r.correct)))
        owners.append(np.full(steps, i))
        lasts.append(np.arange(steps) == steps - 1)
    return StepTable(np.concatenate(rows), np.concatenate(ys), np.concatenate(outcomes),
                     np.concatenate(owners), np.concatenate(lasts))


# -- fitting ---------------------------------------------------------------------
def standardisation(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    return mean.astype(np.float32), np.where(scale > 1e-6, scale, 1.0).astype(np.float32)


def fit_logistic(
    features: np.ndarray, labels: np.ndarray, l2: float = 1e-2, iterations: int = 200,
    groups: np.ndarray | None = None,
) -> ValueHead:
    """Logistic regression (module doc) by L-BFGS; labels may be soft (in [0, 1]).

    With ``groups`` (an integer per row: the problem), the fit is *within*
    groups: every group gets its own intercept, logit V = a_g + w . z, so the
    intercepts absorb what differs between groups (how hard a problem is) and
    w is fitted on the variation inside a group alone. Only groups whose
    labels vary say anything about w, so only they enter that fit. The head's
    single bias is then refitted on all rows with w fixed, which keeps its
    probabilities at the average level; comparisons within a problem, the
    only ones a search makes, do not depend on it."""
    features, labels = _checked(features, labels)
    mean, scale = standardisation(features)
    z = torch.as_tensor((features - mean) / scale, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.float64)
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    if groups is None:
        b = _minimised(lambda w, b: _cross_entropy(z @ w + b, y) + 0.5 * l2 * (w @ w), w, iterations)
        return ValueHead(mean, scale, [w.detach().numpy().astype(np.float32)], [np.float32(b)], "logistic")
    groups = np.asarray(groups)
    if groups.shape != labels.shape:
        raise TrainError(f"need one group per row; got {groups.shape} for {labels.shape[0]} rows")
    varying = [g for g in np.unique(groups) if np.ptp(labels[groups == g]) > 0]
    if not varying:
        raise TrainError("a within-problem fit needs a problem whose labels differ (some correct, some not)")
    rows = np.isin(groups, varying)
    index = torch.as_tensor(np.searchsorted(varying, groups[rows]))
    zg, yg = z[rows], y[rows]
    _minimised(lambda w, a: _cross_entropy(zg @ w + a[index], yg) + 0.5 * l2 * (w @ w), w, iterations, len(varying))
    fixed = (z @ w).detach()
    b = _minimised(lambda _, b: _cross_entropy(fixed + b, y), torch.zeros(0, dtype=torch.float64), iterations)
    return ValueHead(mean, scale, [w.detach().numpy().astype(np.float32)], [np.float32(b)], "logistic")


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)


def _minimised(loss_of: Callable, w: torch.Tensor, iterations: int, intercepts: int = 0) -> float:
    """Minimise ``loss_of(w, b)`` over w (in place) and b, an intercept (a
    vector of ``intercepts`` if given, else a scalar); returns b's mean."""
    b = torch.zeros(intercepts or (), dtype=torch.float64, requires_grad=True)
    parameters = [w, b] if w.numel() else [b]
    optimiser = torch.optim.LBFGS(parameters, max_iter=iterations, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        value = loss_of(w, b)
        value.backward()
        return value

    optimiser.step(closure)
    return float(b.detach().mean())


def fit_mlp(
    features: np.ndarray, labels: np.ndarray, *, hidden: int = 64, l2: float = 1e-3, epochs: int = 300, seed: int = 0
) -> ValueHead:
    """A one-hidden-layer ReLU head by full-batch Adam with weight decay."""
    features, labels = _checked(features, labels)
    mean, scale = standardisation(features)
    torch.manual_seed(seed)
    z = torch.as_tensor((features - mean) / scale, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.float32)
    first, second = torch.nn.Linear(z.shape[1], hidden), torch.nn.Linear(hidden, 1)
    parameters = [*first.parameters(), *second.parameters()]
    optimiser = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=l2)
    for _ in range(epochs):
        optimiser.zero_grad()
        logits = second(torch.relu(first(z))).squeeze(-1)
        torch.nn.functional.binary_cross_entropy_with_logits(logits, y).backward()
        optimiser.step()
    as_numpy = lambda t: t.detach().numpy().astype(np.float32)  # noqa: E731
    return ValueHead(
        mean, scale, [as_numpy(first.weight), as_numpy(second.weight[0])],
        [as_numpy(first.bias), np.float32(second.bias.item())], "mlp",
    )


def _checked(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features, labels = np.asarray(features, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise TrainError(f"need features [n, h] and labels [n]; got {features.shape} and {labels.shape}")
    if features.shape[0] < 2:
        raise TrainError("need at least two examples to fit a head")
    if not np.all((labels >= 0) & (labels <= 1)):
        raise TrainError("labels must lie in [0, 1]")
    return features, labels


@dataclass
class Evaluation:
    step_auroc: float | None
    pairwise: Pairwise
    step_pairwise: Pairwise
    steps: int
    rollouts: int

    @property
    def within_problem(self) -> float:
        """The mean of the two within-problem accuracies (finished answers
        and prefixes at equal depth): what a search can use."""
        found = [m.accuracy for m in (self.pairwise, self.step_pairwise) if m.accuracy is not None]
        return float(np.mean(found)) if found else 0.0

    def to_dict(self) -> dict:
        return {
            "step_auroc": self.step_auroc,
            "pairwise_accuracy": self.pairwise.accuracy,
            "pairs": self.pairwise.pairs,
            "problems_with_pairs": self.pairwise.problems,
            "step_pairwise_accuracy": self.step_pairwise.accuracy,
            "step_pairs": self.step_pairwise.pairs,
            "steps": self.steps,
            "rollouts": self.rollouts,
        }


def evaluate_scores(
    step_scores: np.ndarray, table: StepTable, rollouts: Sequence[LabelledRollout], chosen: np.ndarray
) -> Evaluation:
    """Measures of step scores (one per row of ``table``) on the rows of ``chosen`` rollouts."""
    rows = np.isin(table.rollout, chosen)
    outcome = table.outcome[rows]
    step_auroc = auroc(step_scores[rows], outcome) if 0 < outcome.sum() < len(outcome) else None
    owners = table.rollout[rows & table.last]
    correct = [rollouts[i].correct for i in owners]
    problems = [rollouts[i].problem_id for i in owners]
    pairwise = pairwise_accuracy(step_scores[rows & table.last], correct, problems)
    per_rollout = [step_scores[table.rollout == i] for i in owners]
    return Evaluation(
        step_auroc, pairwise, step_pairwise_accuracy(per_rollout, correct, problems), int(rows.sum()), int(len(owners))
    )


@dataclass
class Fitted:
    head: ValueHead
    layer: int
    l2: float
    validation: Evaluation
    train: Evaluation
    seconds: float
    candidates: list[dict] = field(default_factory=list)


def fit_and_choose(
    rollouts: Sequence[LabelledRollout], features: Sequence[np.ndarray], layers: Sequence[int], validation: set[str],
    *, kind: str = "logistic", l2_grid: Sequence[float] = L2_GRID, labels: str = "outcome",
    objective: str = "within", seed: int = 0, selection_fraction: float = 0.2,
) -> Fitted:
    """Choose (layer, lambda) without looking at the validation problems,
    then measure the choice on them once.

    The training problems are split again: heads for every (layer, lambda)
    are fitted on most of them and ranked on the rest (the *selection*
    problems) by what the objective aims at: with ``within`` (per-problem
    intercepts, ``fit_logistic``), the within-problem accuracies
    (``Evaluation.within_problem``); with ``pooled``, AUROC on step labels,
    then pairwise accuracy. The best setting is refitted on all training
    problems and evaluated on the validation problems."""
    if kind not in ("logistic", "mlp"):
        raise TrainError(f"unknown head kind {kind!r}; expected logistic or mlp")
    if objective not in OBJECTIVES:
        raise TrainError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    if objective == "within" and kind != "logistic":
        raise TrainError("the within-problem objective fits a logistic head; use --objective pooled for an mlp")
    problem_index = {p: k for k, p in enumerate(sorted({r.problem_id for r in rollouts}))}
    is_validation = np.array([r.problem_id in validation for r in rollouts])
    train_ids, validation_ids = np.flatnonzero(~is_validation), np.flatnonzero(is_validation)
    selection = validation_problems([rollouts[i].problem_id for i in train_ids], selection_fraction, seed + 1)
    is_selection = np.array([r.problem_id in selection for r in rollouts]) & ~is_validation
    fit_ids, selection_ids = np.flatnonzero(~is_validation & ~is_selection), np.flatnonzero(is_selection)

    def fit(table: StepTable, ids: np.ndarray, l2: float) -> tuple[ValueHead, float]:
        rows = np.isin(table.rollout, ids)
        started = time.perf_counter()
        if kind == "logistic":
            groups = None
            if objective == "within":
                groups = np.array([problem_index[rollouts[i].problem_id] for i in table.rollout[rows]])
            head = fit_logistic(table.features[rows], table.labels[rows], l2, groups=groups)
        else:
            head = fit_mlp(table.features[rows], table.labels[rows], l2=l2, seed=seed)
        return head, time.perf_counter() - started

    candidates, tables = [], {}
    for layer_index, layer in enumerate(layers):
        tables[layer] = step_table(rollouts, features, layer_index, labels)
        for l2 in l2_grid:
            head, seconds = fit(tables[layer], fit_ids, l2)
            measured = evaluate_scores(head.probabilities(tables[layer].features), tables[layer], rollouts, selection_ids)
            candidates.append({"layer": layer, "l2": l2, "seconds": seconds, "within_problem": measured.within_problem,
                               **measured.to_dict()})
    if objective == "within":
        best = max(candidates, key=lambda c: c["within_problem"])
    else:
        best = max(candidates, key=lambda c: (c["step_auroc"] or 0.0, c["pairwise_accuracy"] or 0.0))
    table = tables[best["layer"]]
    head, seconds = fit(table, train_ids, best["l2"])
    scores = head.probabilities(table.features)
    return Fitted(
        head, best["layer"], best["l2"],
        validation=evaluate_scores(scores, table, rollouts, validation_ids),
        train=evaluate_scores(scores, table, rollouts, train_ids),
        seconds=seconds,
        candidates=candidates,
    )


def reward_step_scores(reward, rollouts: Sequence[LabelledRollout], chosen: Sequence[int]) -> dict[int, np.ndarray]:
    """Another reward's score of every prefix of the ``chosen`` rollouts, as
    a search with ``model`` aggregation would see them: rollout -> [steps]."""
    import asyncio

    scores = asyncio.run(prefix_scores(reward, [rollouts[i].question for i in chosen], [rollouts[i].steps for i in chosen]))
    return dict(zip(chosen, scores))


async def prefix_scores(reward, questions: Sequence[str], trajectories: Sequence[Sequence[str]]) -> list[np.ndarray]:
    """``reward``'s score of every prefix of each trajectory (its first t
    steps, t = 1 .. T), as a search with ``model`` aggregation sees them."""
    from piscale.rewards.aggregate import score_trajectories

    prompts, prefixes, owners = [], [], []
    for i, (question, steps) in enumerate(zip(questions, trajectories)):
        for t in range(len(steps)):
            prompts.append(question)
            prefixes.append(list(steps[: t + 1]))
            owners.append(i)
    scores = await score_trajectories(reward, prompts, prefixes, "model")
    found: list[list[float]] = [[] for _ in trajectories]
    for i, score in zip(owners, scores):
        found[i].append(score)
    return [np.asarray(s) for s in found]


def scores_in_table(per_rollout: dict[int, np.ndarray], table: StepTable) -> np.ndarray:
    """Per-rollout step scores laid out as the rows of ``table`` (NaN elsewhere)."""
    scores = np.full(len(table.rollout), np.nan)
    for i, s in per_rollout.items():
        scores[table.rollout == i] = s
    return scores


def fold_problems(problem_ids: Sequence[str], folds: int, seed: int) -> list[set[str]]:
    """The problems dealt into ``folds`` groups of near-equal size (by a hash
    of id and seed), for cross-validation by problem."""
    unique = sorted(set(problem_ids), key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    if not 2 <= folds <= len(unique):
        raise TrainError(f"cross-validation needs 2 <= folds <= {len(unique)} problems, got {folds}")
    return [set(unique[k::folds]) for k in range(folds)]


def cross_validated_scores(
    rollouts: Sequence[LabelledRollout], features: Sequence[np.ndarray], layers: Sequence[int],
    folds: int, *, seed: int = 0, **options,
) -> tuple[np.ndarray, list[int]]:
    """Out-of-fold step scores: each fold's problems scored by a head chosen
    and fitted (``fit_and_choose``) on the other folds alone. Every problem
    is then held out once, so the measures use all of them. Returns the
    scores aligned with the rows of ``step_table(..., layer_index=0)``
    (rows are the same steps for every layer) and the layer each fold chose."""
    reference = step_table(rollouts, features, 0, options.get("labels", "outcome"))
    scores = np.full(len(reference.rollout), np.nan)
    chosen = []
    for held_out in fold_problems([r.problem_id for r in rollouts], folds, seed):
        fitted = fit_and_choose(rollouts, features, layers, held_out, seed=seed, **options)
        table = step_table(rollouts, features, list(layers).index(fitted.layer), options.get("labels", "outcome"))
        rows = np.isin(table.rollout, [i for i, r in enumerate(rollouts) if r.problem_id in held_out])
        scores[rows] = fitted.head.probabilities(table.features[rows])
        chosen.append(fitted.layer)
    return scores, chosen
