r"""Self-certainty: the policy's own confidence in what it wrote, as a reward.

No verifier, no second model: a partial answer x_{<=t} is scored from the
log-probabilities log p(x_k | c, x_{<k}) that the policy gave its own tokens
when it wrote them. Confidence-based selection of answers (its_hub; DeepConf,
Fu et al. 2025, "Deep Think with Confidence") rests on the observation that
correct reasoning tends to be written with fewer low-probability tokens than
wrong reasoning. The backend returns these numbers with every step
(``piscale.lm.base.StepOutput.logprobs``) and the search keeps them on its
particles, so the reward costs no forward pass at all.

Statistics (``statistic``), over the tokens x_1..x_n of the partial answer:

* ``mean`` (default): the mean token log-probability (1/n) sum_k log p(x_k | .),
  the log of the geometric-mean token probability, i.e. minus the log
  perplexity of the answer under the policy;
* ``group``: DeepConf's "lowest group confidence": the mean log-probability
  of every run of ``window`` consecutive tokens, and the lowest of them; a
  shorter answer is one group. Where ``mean`` lets a long confident
  stretch hide a short confused one, ``group`` scores an answer by its
  weakest passage.

Step t's score judges the partial answer through step t (as every reward's
does), so ``last`` and ``model`` aggregation give the statistic of the whole
answer; ``prod`` (a sum on this scale) and ``min`` combine those of its
prefixes. A partial answer with no tokens yet scores 0 (certainty 1): no
evidence either way. Answers sampled whole (best-of-N and its relatives)
carry all their tokens on their last step, so their earlier prefixes score 0
and every aggregation gives them the whole answer's statistic; ``last`` or
``model`` compares them with step-by-step searches on equal terms.

Scale. Scores are on the ``log`` scale: exp(score) is the geometric-mean token
probability, in (0, 1], and the search treats it as a likelihood. With the
paper's potential a particle's weight is exp(score / tau), with
``softmax_temperature`` tau; with the ``incremental`` potential the final
particles target p(x | c) · exp(score(x) / tau). Per-token means spread
little: answers 0.1 nat apart weigh e^0.1 ~ 1.1 : 1 at tau = 1 but e : 1 at
tau = 0.1, so tau is chosen by the spread of the scores (best-of-N and
weighted best-of-N do not depend on it). The sampling ``temperature`` does not change the scores:
backends report log-probabilities at temperature 1 (and before ``top_p``), so
the reward judges answers under the model itself, however they were drawn.

Differences from the papers. DeepConf's token confidence is the negative mean
log-probability of the k most likely tokens at each position, and Kang et al.
(2025) measure the divergence of the whole next-token distribution from
uniform; both need the distribution, which backends do not return. Here the
sampled token's log-probability stands in for them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from piscale.rewards.base import Reward

if TYPE_CHECKING:
    from piscale.lm.base import LanguageModel

STATISTICS: tuple[str, ...] = ("mean", "group")
DEFAULT_WINDOW = 32
"""Tokens per group for ``group``. DeepConf uses 2,048 on traces of many
thousand tokens; a step-by-step answer to a grade-school problem is a few
hundred tokens and a step a few dozen, so a window of about one step lets one
confused step show while a single uncertain number token does not decide."""


class SelfCertaintyReward(Reward):
    """The policy's confidence in a partial answer (see the module doc)."""

    scale = "log"
    needs_logprobs = True

    def __init__(
        self,
        statistic: str = "mean",
        window: int = DEFAULT_WINDOW,
        *,
        policy: LanguageModel | None = None,
        system: str | None = None,
    ):
        """``policy`` (with the ``system`` prompt it answered under) lets
        ``score`` judge answers given as text alone, such as stored ones, by
        reading their log-probabilities again (``step_logprobs``): a forward
        pass per answer, where a search gets them for free."""
        if statistic not in STATISTICS:
            raise ValueError(f"unknown self-certainty statistic {statistic!r}; choose one of {', '.join(STATISTICS)}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"the group window must be a positive number of tokens, got {window!r}")
        self.statistic = statistic
        self.window = window
        self.name = "certainty" if statistic == "mean" else f"certainty:group:{window}"
        self.policy = policy
        self.system = system

    async def score(self, prompts, trajectories) -> list[list[float]]:
        if self.policy is not None:
            if len(prompts) != len(trajectories):
                raise ValueError(f"got {len(prompts)} prompts but {len(trajectories)} trajectories; they must pair up")
            # One batch per question, so that its answers share the prompt.
            by_prompt: dict[str, list[int]] = {}
            for i, prompt in enumerate(prompts):
                if isinstance(trajectories[i], str):
                    raise TypeError(f"trajectory {i} is a string; pass a list of step strings")
                by_prompt.setdefault(prompt, []).append(i)
            logprobs: list = [None] * len(prompts)
            for prompt, members in by_prompt.items():
                read = await step_logprobs(self.policy, prompt, [trajectories[i] for i in members], self.system)
                for i, found in zip(members, read):
                    logprobs[i] = found
            return await self.score_with_logprobs(prompts, trajectories, logprobs)
        raise ValueError(
            f"reward {self.name!r} scores answers by the policy's own token log-probabilities, which "
            "texts alone do not carry; use it in a search (piscale solve, eval, serve), where the "
            "backend returns them with every step, or give it the policy that wrote the answers "
            "(SelfCertaintyReward(policy=lm)) to read them again"
        )

    async def score_with_logprobs(self, prompts, trajectories, logprobs) -> list[list[float]]:
        if not len(prompts) == len(trajectories) == len(logprobs):
            raise ValueError(
                f"got {len(prompts)} prompts, {len(trajectories)} trajectories and log-probabilities for "
                f"{len(logprobs)}; they must pair up"
            )
        results = []
        for i, (steps, step_logprobs) in enumerate(zip(trajectories, logprobs)):
            if isinstance(steps, str):
                raise TypeError(f"trajectory {i} is a string; pass a list of step strings")
            if len(step_logprobs) != len(steps):
                raise ValueError(
                    f"trajectory {i} has {len(steps)} steps but log-probabilities for {len(step_logprobs)}"
                )
            results.append(self.prefix_scores(step_logprobs))
        return results

    def prefix_scores(self, step_logprobs: Sequence[Sequence[float]]) -> list[float]:
        """The statistic of every partial answer: entry t covers the tokens of
        steps 0..t."""
        values = np.array([float(v) for step in step_logprobs for v in step], dtype=float)
        if np.isnan(values).any():
            raise ValueError(
                "the backend returned no log-probability for some tokens (NaN); self-certainty needs a "
                "backend that reports the log-probability of every generated token"
            )
        if (values > 1e-4).any():
            raise ValueError(f"log-probabilities must be <= 0, got {values[values > 1e-4][:3].tolist()}")
        ends = np.cumsum([len(step) for step in step_logprobs])
        # A token the model deemed impossible makes every statistic that
        # covers it -inf (a zero likelihood); the sums below skip it so that
        # -inf - -inf never turns into NaN.
        impossible = np.isneginf(values)
        first_impossible = int(np.argmax(impossible)) if impossible.any() else len(values)
        finite = np.where(impossible, 0.0, values)
        sums = np.concatenate([[0.0], np.cumsum(finite)])
        if self.statistic == "group" and len(values) >= self.window:
            # Mean of tokens [j, j + window) for every j, then the lowest of
            # those that end by each position.
            window_means = (sums[self.window :] - sums[: -self.window]) / self.window
            lowest_by_end = np.minimum.accumulate(window_means)
        scores = []
        for end in ends.tolist():
            if end == 0:
                scores.append(0.0)
            elif end > first_impossible:
                scores.append(-math.inf)
            elif self.statistic == "group" and end >= self.window:
                scores.append(float(lowest_by_end[end - self.window]))
            else:
                # ``mean``, or a partial answer shorter than one group.
                scores.append(float(sums[end] / end))
        return scores


async def step_logprobs(
    lm: LanguageModel, question: str, trajectories: Sequence[Sequence[str]], system: str | None = None
) -> list[list[list[float]]]:
    """The policy's log-probability of every token of every step of answers
    it wrote earlier (``result[i][t]`` for step ``trajectories[i][t]``), read in
    one batch of ``lm.score``, for answers stored without them. Each step is
    encoded alone, as the policy produced it step by step, so that the tokens
    split at the step boundaries; an answer sampled whole is one step."""
    prompt = lm.prompt_ids(question, system=system)
    encoded = [[lm.encode(step) for step in steps] for steps in trajectories]
    outputs = await lm.score([prompt] * len(encoded), [sum(steps, []) for steps in encoded])
    result = []
    for steps, output in zip(encoded, outputs):
        ends = np.cumsum([0] + [len(step) for step in steps])
        result.append([list(output.logprobs[start:end]) for start, end in zip(ends[:-1], ends[1:])])
    return result
