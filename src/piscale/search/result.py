"""What a search returns.

An algorithm returns an ``Outcome``: its final particles (nodes of the step
tree), their log-weights and the index of the one it chose.
``piscale.search.run`` turns it into a ``SearchResult``: the chosen answer,
every final candidate as text, the work done, and (when asked) the trace.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from piscale.search.node import Node


@dataclass
class Outcome:
    """A search's final candidates and the one it chose."""

    nodes: list[Node]
    log_weights: list[float | None]
    """final log-weights (SMC), or logit-scale potentials of the scores."""
    chosen: int
    log_evidence: float | None = None
    """log Ẑ, the SMC estimate of the target's normalising constant
    (``piscale.smc``); None for searches that make none."""


@dataclass
class Candidate:
    """One final particle or sample."""

    text: str
    """the whole response (its steps joined as generated)."""
    answer: str | None
    """its final answer (last ``\\boxed{}``), None when it has none."""
    score: float | None
    """the aggregated reward of the response, on the reward's scale; None when
    it was not scored (no reward, or an outcome-only reward on an unfinished
    response)."""
    log_weight: float | None
    """the particle's final unnormalised log-weight (SMC algorithms), or the
    logit-scale potential of its score (the others); None when unscored or
    of zero weight (JSON has no infinities)."""
    finished: bool
    """True when the response ended on its own (end of sequence or a boxed
    answer), False when a step, token or context cap cut it."""


@dataclass
class SearchResult:
    question: str
    algorithm: str
    budget: int
    seed: int
    settings: dict[str, Any]
    answer: str | None
    text: str
    chosen: int
    """the index of the chosen candidate."""
    candidates: list[Candidate]
    usage: dict[str, float]
    """generated_tokens, prompt_tokens (tokens prefilled), reward_calls,
    reward_steps (step strings sent to the reward), extend_calls, wall_time
    (seconds)."""
    failures: list[dict] = field(default_factory=list)
    """{"depth", "reason"} of each particle dropped because the backend failed
    to write its step (a remote request that failed after its retries)."""
    log_evidence: float | None = None
    """the particle methods' estimate of log Z, the log normalising constant
    of the target their weighted particles approximate (with the
    ``incremental`` potential and softmax temperature τ, log E_p[r(x)^{1/τ}]
    under the model's own distribution p(x | c)); for particle Gibbs the
    estimate of its first, unconditional sweep, for parallel tempering that
    of its coldest chain's first sweep. None when the search makes no
    estimate: the sampling and tree searches, and the ``paper`` potential,
    whose weights are set from the current score rather than multiplied,
    so are not importance weights of any fixed target. Also None when every
    particle reached zero weight (the estimate is Z = 0; JSON has no
    infinities)."""
    trace: dict | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of everything in the result."""
        return asdict(self)
