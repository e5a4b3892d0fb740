"""Customizable density ratio (CDR) rewards (Xu et al., 2024).

A strong and a weak language model read the same chat-formatted prompt x and
response y; the reward is the log density ratio over the response tokens,

    r(x, y) = sum_t log p_strong(y_t | x, y_<t) - sum_t log p_weak(y_t | x, y_<t),

or, with ``mean=True``, that difference divided by the number of response
tokens. A response the strong model finds much likelier than the weak one
gets a high reward; the larger the quality gap between the two models, the
better the reward. It needs no training and works on partial answers (y the
steps so far), so a search can use it as a log-potential (scale ``"log"``).

The two models must share a tokenizer, since the ratio compares the
probabilities of the *same* token sequence; the constructor checks that both
encode a set of probe texts and a chat identically.

Customisation, applied to both models alike:

* **criteria**: a system prompt stating what a good answer is. With a mapping
  domain -> criteria, a **router** picks the domain of each prompt: by default
  ``KeywordRouter`` (keyword rules for ``safety``, ``reasoning``, else
  ``chat``), or ``JudgeRouter`` (an LM scores each domain name as the answer
  to "which kind of request is this?");
* **exemplars**: (user, good answer, bad answer, explanation) examples,
  prepended as chat turns: the user turn shows the request with the bad answer
  and why it is bad, and the assistant turn is the good answer.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from piscale.lm.base import LanguageModel
from piscale.rewards.aggregate import join_steps
from piscale.rewards.prefix import PrefixKey, PrefixReward
from piscale.rewards.templates import fill

DEFAULT_CRITERIA: dict[str, str] = {
    "safety": (
        "You are a careful and harmless assistant. A good response never helps with anything that "
        "could hurt people; it declines a harmful request briefly, says why, and offers a safe "
        "alternative, while still helping fully with requests that are safe."
    ),
    "reasoning": (
        "You are an expert in mathematics and programming. A good response reasons step by step, "
        "every calculation and every line of code in it is correct, and it states the final "
        "answer clearly."
    ),
    "chat": (
        "You are a helpful and honest assistant. A good response follows the user's instructions, "
        "is accurate, answers the question directly and is clear and well organised."
    ),
}
"""Criteria per domain, used as the system prompt of both models."""

DEFAULT_KEYWORDS: dict[str, tuple[str, ...]] = {
    "safety": (
        "kill", "murder", "weapon", "gun", "bomb", "explosive", "poison", "hack", "malware",
        "steal", "illegal", "drugs", "suicide", "self-harm", "hurt someone", "attack", "violence",
        "terrorist", "scam", "fraud", "racist", "abuse", "kidnap",
    ),
    "reasoning": (
        "calculate", "compute", "solve", "prove", "equation", "how many", "how much", "math",
        "probability", "integer", "sum of", "product of", "percent", "average", "algorithm",
        "code", "function", "python", "program", "debug", "\\frac", "\\boxed", "=", "+",
    ),
}
"""Keywords per domain. Safety is checked first: a harmful request phrased as
a puzzle is still a safety question."""


class Router(Protocol):
    async def route(self, prompts: Sequence[str]) -> list[str]:
        """The domain of each prompt."""
        ...


class KeywordRouter:
    """The first domain (in the mapping's order) with a keyword in the
    prompt, else ``default``. Keywords made of word characters match whole
    words, case-insensitively; others match as substrings."""

    def __init__(self, keywords: Mapping[str, Sequence[str]] | None = None, default: str = "chat"):
        self.keywords = dict(keywords if keywords is not None else DEFAULT_KEYWORDS)
        self.default = default
        self._patterns = {
            domain: [
                re.compile(rf"\b{re.escape(word.lower())}\b") if re.fullmatch(r"[\w\s-]+", word) else None
                for word in words
            ]
            for domain, words in self.keywords.items()
        }

    def domain(self, prompt: str) -> str:
        text = prompt.lower()
        for domain, words in self.keywords.items():
            for word, pattern in zip(words, self._patterns[domain]):
                if (pattern.search(text) if pattern else word.lower() in text):
                    return domain
        return self.default

    async def route(self, prompts: Sequence[str]) -> list[str]:
        return [self.domain(prompt) for prompt in prompts]


ROUTER_TEMPLATE = (
    "Which kind of request is this?\n{domains}\n\nRequest:\n{prompt}\n\n"
    "Answer with one word: {names}."
)


class JudgeRouter:
    """An LM picks the domain: each domain name is scored as the answer to
    ``ROUTER_TEMPLATE`` and the likeliest wins (no sampling)."""

    def __init__(self, lm: LanguageModel, descriptions: Mapping[str, str] | None = None):
        self.lm = lm
        self.descriptions = dict(
            descriptions
            or {
                "safety": "a request that could lead to harm, danger or illegal activity",
                "reasoning": "mathematics, logic or programming",
                "chat": "anything else: conversation, writing, advice, knowledge",
            }
        )
        if not self.descriptions:
            raise ValueError("JudgeRouter needs at least one domain")

    async def route(self, prompts: Sequence[str]) -> list[str]:
        names = list(self.descriptions)
        listing = "\n".join(f"- {name}: {text}" for name, text in self.descriptions.items())
        contexts, answers = [], []
        for prompt in prompts:
            question = fill(ROUTER_TEMPLATE, domains=listing, names=", ".join(names), prompt=prompt)
            ids = self.lm.chat([{"role": "user", "content": question}])
            for name in names:
                contexts.append(ids)
                answers.append(self.lm.encode(name))
        outputs = await self.lm.score(contexts, answers)
        chosen = []
        for i in range(len(prompts)):
            totals = [outputs[i * len(names) + k].total for k in range(len(names))]
            chosen.append(names[max(range(len(names)), key=totals.__getitem__)])
        return chosen


@dataclass(frozen=True)
class Exemplar:
    """An in-context example: a request, a good and a bad answer, and why."""

    user: str
    good: str
    bad: str
    explanation: str = ""

    def messages(self) -> list[dict]:
        note = f"\n\nA poor answer would be:\n{self.bad}"
        if self.explanation:
            note += f"\n\nWhy it is poor: {self.explanation}"
        return [
            {"role": "user", "content": self.user + note},
            {"role": "assistant", "content": self.good},
        ]


_PROBES = (
    "The quick brown fox jumps over the lazy dog.",
    "12 * 7 = 84, so \\boxed{\\frac{1}{2}} and x^2 + y^2 = z^2.",
    "  Indented\n\n\tcode: def f(x):\n    return x + 1",
    "Ünïcödé, 数学, ✓ and emoji 🙂.",
)


def check_same_tokenizer(first: LanguageModel, second: LanguageModel) -> None:
    """Raise ``ValueError`` unless both backends tokenize and chat-format a set
    of probe texts identically."""
    for probe in _PROBES:
        a, b = first.encode(probe), second.encode(probe)
        if a != b:
            raise ValueError(
                f"a density ratio needs two models with the same tokenizer, but {first.name!r} and "
                f"{second.name!r} encode {probe[:30]!r} differently ({len(a)} vs {len(b)} tokens)"
            )
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": _PROBES[0]}]
    if first.chat(messages) != second.chat(messages):
        raise ValueError(
            f"{first.name!r} and {second.name!r} format chats differently (different chat "
            "templates); a density ratio needs both models to read the same text"
        )


class DensityRatioReward(PrefixReward):
    """log p_strong(y | x) - log p_weak(y | x) over the response tokens (see
    the module doc). ``criteria`` is one system prompt for every prompt, or a
    mapping domain -> system prompt chosen by ``router``; ``exemplars`` is one
    list for every prompt or a mapping domain -> list."""

    scale = "log"
    outcome_only = False

    def __init__(
        self,
        strong: LanguageModel,
        weak: LanguageModel,
        *,
        mean: bool = False,
        criteria: str | Mapping[str, str] | None = None,
        router: Router | None = None,
        exemplars: Sequence[Exemplar] | Mapping[str, Sequence[Exemplar]] = (),
        check_tokenizers: bool = True,
        memo_size: int = 4096,
    ):
        super().__init__(memo_size)
        if check_tokenizers and strong is not weak:
            check_same_tokenizer(strong, weak)
        self.strong, self.weak = strong, weak
        self.mean = mean
        self.criteria = criteria
        by_domain = isinstance(criteria, Mapping) or isinstance(exemplars, Mapping)
        self.router = router if router is not None else (KeywordRouter() if by_domain else None)
        if isinstance(criteria, Mapping) and isinstance(self.router, KeywordRouter):
            unknown = {*self.router.keywords, self.router.default} - set(criteria)
            if unknown:
                raise ValueError(
                    f"the router can choose {sorted(unknown)} but criteria has no entry for them"
                )
        for exemplar in exemplars.values() if isinstance(exemplars, Mapping) else [exemplars]:
            for item in exemplar:
                if not isinstance(item, Exemplar):
                    raise TypeError(f"exemplars must be Exemplar objects, got {type(item).__name__}")
        self.exemplars = exemplars
        self.name = f"cdr:{strong.name}/{weak.name}"

    def messages(self, prompt: str, domain: str | None) -> list[dict]:
        """The chat both models read before the response."""
        messages: list[dict] = []
        if isinstance(self.criteria, Mapping):
            if domain not in self.criteria:
                raise KeyError(f"no criteria for the domain {domain!r}; known: {sorted(self.criteria)}")
            messages.append({"role": "system", "content": self.criteria[domain]})
        elif self.criteria:
            messages.append({"role": "system", "content": self.criteria})
        exemplars = self.exemplars.get(domain, ()) if isinstance(self.exemplars, Mapping) else self.exemplars
        for exemplar in exemplars:
            messages.extend(exemplar.messages())
        messages.append({"role": "user", "content": prompt})
        return messages

    async def domains(self, prompts: Sequence[str]) -> list[str | None]:
        if self.router is None:
            return [None] * len(prompts)
        distinct = list(dict.fromkeys(prompts))
        chosen = dict(zip(distinct, await self.router.route(distinct)))
        return [chosen[p] for p in prompts]

    async def score_prefixes(self, items: Sequence[PrefixKey]) -> list[float]:
        domains = await self.domains([prompt for prompt, _ in items])
        contexts: dict[tuple[str, str | None], tuple[list[int], list[int]]] = {}
        strong_prompts, weak_prompts, responses = [], [], []
        for (prompt, steps), domain in zip(items, domains):
            key = (prompt, domain)
            if key not in contexts:
                messages = self.messages(prompt, domain)
                contexts[key] = (self.strong.chat(messages), self.weak.chat(messages))
            strong_prompts.append(contexts[key][0])
            weak_prompts.append(contexts[key][1])
            responses.append(self.strong.encode(join_steps(steps)))
        wanted = [i for i, response in enumerate(responses) if response]
        scores = [0.0] * len(items)  # an empty response has ratio 1
        if not wanted:
            return scores
        strong_out, weak_out = await asyncio.gather(
            self.strong.score([strong_prompts[i] for i in wanted], [responses[i] for i in wanted]),
            self.weak.score([weak_prompts[i] for i in wanted], [responses[i] for i in wanted]),
        )
        for i, s, w in zip(wanted, strong_out, weak_out):
            difference = s.total - w.total
            scores[i] = difference / len(responses[i]) if self.mean else difference
        return scores
