"""An instruct LM as a judge of partial answers.

The judge model reads a prompt built from an editable template (the problem
and the solution so far) that asks whether the reasoning so far is correct and
tells it to answer Yes or No. Nothing is generated: the score is read from the
model's distribution over its first answer tokens,

    score = P(Yes) / (P(Yes) + P(No)) = sigmoid(log P(Yes) - log P(No)),

where P(w) = p(tokens of w | judge prompt) from ``LanguageModel.score`` (for a
one-token word that is its next-token probability). Renormalising over the two
answers removes the mass the model puts on anything else ("Sure", "The", ...),
so the score is a probability of "correct" even for a chatty model. Every
partial answer is judged once (``PrefixReward`` remembers the scores).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from piscale.lm.base import LanguageModel
from piscale.rewards.aggregate import join_steps
from piscale.rewards.prefix import PrefixKey, PrefixReward
from piscale.rewards.templates import fill, require_fields

DEFAULT_TEMPLATE = (
    "Here is a math problem and a solution that may be unfinished.\n\n"
    "Problem:\n{problem}\n\n"
    "Solution so far:\n{solution}\n\n"
    "Is every step of the solution so far correct? Answer with Yes or No."
)
"""The judge's question; ``{problem}`` and ``{solution}`` are filled in."""

class LLMJudge(PrefixReward):
    """score = P(yes) / (P(yes) + P(no)) of the judge's first answer tokens."""

    scale = "probability"
    outcome_only = False

    def __init__(
        self,
        lm: LanguageModel,
        *,
        template: str = DEFAULT_TEMPLATE,
        system_prompt: str | None = None,
        yes: str = "Yes",
        no: str = "No",
        memo_size: int = 4096,
    ):
        super().__init__(memo_size)
        require_fields(template, "problem", "solution", what="the judge template")
        self.lm = lm
        self.template = template
        self.system_prompt = system_prompt
        self.yes_ids = list(lm.encode(yes))
        self.no_ids = list(lm.encode(no))
        if not self.yes_ids or not self.no_ids:
            raise ValueError("the yes and no answers must be non-empty text")
        if self.yes_ids == self.no_ids:
            raise ValueError(f"yes {yes!r} and no {no!r} encode to the same tokens")
        self.name = f"judge:{lm.name}"

    def prompt_ids(self, problem: str, steps: Sequence[str]) -> list[int]:
        """The judge prompt for ``steps``. When it does not fit the judge's
        context window, middle steps give way to an "[N steps omitted]" line:
        the first step (how the solution set out) and as many of the latest
        steps as fit stay, since the latest step is the one being judged."""
        ids = self._render(problem, steps)
        room = self.lm.context_length - max(len(self.yes_ids), len(self.no_ids))
        if len(ids) <= room:
            return ids
        for kept in range(len(steps) - 2, -1, -1):
            omitted = len(steps) - 1 - kept
            shown = [steps[0], f"[{omitted} steps omitted]", *steps[len(steps) - kept :]] if kept else [
                f"[{len(steps) - 1} steps omitted]", steps[-1]
            ]
            ids = self._render(problem, shown)
            if len(ids) <= room:
                return ids
        raise ValueError(
            f"the judge prompt takes {len(ids)} tokens even with only the latest step, more than the "
            f"{room} that the judge's context window leaves; use a judge with a longer context"
        )

    def _render(self, problem: str, steps: Sequence[str]) -> list[int]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": fill(self.template, problem=problem, solution=join_steps(steps))})
        return self.lm.chat(messages)

    async def score_prefixes(self, items: Sequence[PrefixKey]) -> list[float]:
        prompts = [self.prompt_ids(problem, steps) for problem, steps in items]
        outputs = await self.lm.score(prompts + prompts, [self.yes_ids] * len(items) + [self.no_ids] * len(items))
        scores = []
        for yes, no in zip(outputs[: len(items)], outputs[len(items) :]):
            scores.append(_two_way(yes.total, no.total))
        return scores


def _two_way(log_yes: float, log_no: float) -> float:
    """exp(a) / (exp(a) + exp(b)), stable, with both -inf giving 1/2."""
    if log_yes == -math.inf and log_no == -math.inf:
        return 0.5
    difference = log_yes - log_no
    if difference >= 0:
        return 1.0 / (1.0 + math.exp(-difference))
    z = math.exp(difference)
    return z / (1.0 + z)
