"""its_hub's particle filtering or best-of-N on a vLLM server, for
bench/bench_itshub.py (which starts the server, runs piscale on it too, and
grades both). Runs in its_hub's own venv (``.venv-itshub``: ``its_hub[lm]``
only), reads one JSON job from stdin and writes one JSON line of results.

its_hub drives the server through its ``OpenAICompatibleLanguageModel``
(chat completions; a partial answer is continued with
``continue_final_message``). Its algorithms need a reward model; the one
used here is the judge piscale's ``LLMJudge`` computes, the same model
judging itself: the job's judge template filled with the problem and the
solution so far, rendered by the server's chat template (``/tokenize``), and
score = P(Yes) / (P(Yes) + P(No)) of the judge's next token, read from the
server with vLLM's ``logprob_token_ids``. It serves as its_hub's process
reward model (particle filtering) and as its outcome reward model
(best-of-N).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time

import aiohttp
import numpy as np
from its_hub.api import AbstractOutcomeRewardModel, AbstractProcessRewardModel
from its_hub.core.algorithms.bon import BestOfN
from its_hub.core.algorithms.particle_gibbs import ParticleFiltering
from its_hub.core.lms.openai_lm import OpenAICompatibleLanguageModel
from its_hub.core.lms.step_generation import StepGeneration


class YesNoJudge(AbstractProcessRewardModel, AbstractOutcomeRewardModel):
    """P(Yes) / (P(Yes) + P(No)) of the served model asked the judge question."""

    def __init__(self, root: str, model: str, template: str, yes_id: int, no_id: int, delimiter: str):
        self.root = root
        self.model = model
        self.template = template
        self.tokens = [yes_id, no_id]
        self.delimiter = delimiter
        self.requests = 0
        self._session: aiohttp.ClientSession | None = None

    async def _post(self, path: str, body: dict) -> dict:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600))
        async with self._session.post(self.root + path, json=body) as response:
            response.raise_for_status()
            return await response.json()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _solution(self, text: str) -> str:
        # piscale's judge sees the steps stripped and joined by a blank line
        return self.delimiter.join(step.strip() for step in text.split(self.delimiter)).strip()

    async def judge(self, problem: str, solution: str) -> float:
        content = self.template.replace("{problem}", problem).replace("{solution}", self._solution(solution))
        rendered = await self._post(
            "/tokenize",
            {"model": self.model, "messages": [{"role": "user", "content": content}], "add_generation_prompt": True},
        )
        answer = await self._post(
            "/v1/completions",
            {
                "model": self.model, "prompt": rendered["tokens"], "max_tokens": 1, "temperature": 0.0,
                "logprobs": 2, "logprob_token_ids": self.tokens, "return_tokens_as_token_ids": True,
            },
        )
        self.requests += 1
        table = answer["choices"][0]["logprobs"]["top_logprobs"][0]
        values = {int(key.split(":", 1)[1]): value for key, value in table.items()}
        log_yes, log_no = values[self.tokens[0]], values[self.tokens[1]]
        return 1.0 / (1.0 + math.exp(log_no - log_yes))

    # its_hub's process reward model: the problem, then the partial answers
    async def _score_process(self, prompt, responses) -> list[float]:
        problem = prompt if isinstance(prompt, str) else prompt.to_prompt()
        batch = [responses] if isinstance(responses, str) else responses
        return list(await asyncio.gather(*(self.judge(problem, r) for r in batch)))

    # its_hub's outcome reward model: conversations ending in the answer
    async def _score_outcome(self, conversations) -> list[float]:
        def parts(conversation):
            user = [m.content for m in conversation if m.role == "user"][-1]
            return user, conversation[-1].content or ""

        return list(await asyncio.gather(*(self.judge(*parts(c)) for c in conversations)))

    async def ascore(self, first, second=None, orchestrator=None, **kwargs):
        if second is not None:
            return await self._score_process(first, second)
        batch = first and isinstance(first[0], list)
        scores = await self._score_outcome(first if batch else [first])
        return scores if batch else scores[0]

    def score(self, *args, **kwargs):
        raise NotImplementedError("use ascore")


async def main() -> None:
    job = json.loads(sys.stdin.read())
    random.seed(job["seed"])
    np.random.seed(job["seed"])
    judge = YesNoJudge(job["root"], job["model"], job["judge_template"], job["yes_id"], job["no_id"], job["step_delimiter"])
    common = dict(endpoint=job["root"] + "/v1", api_key="none", model_name=job["model"], system_prompt=job["system"])
    if job["algorithm"] == "pf":
        # a step ends at a blank line (at most max_step_tokens tokens); a
        # particle stops at the step that writes \boxed, or after max_steps
        # steps (StepGeneration stops a particle once it already had
        # max_steps steps before the one it writes, hence the - 1)
        lm = OpenAICompatibleLanguageModel(**common, max_completion_tokens=job["max_step_tokens"])
        step = StepGeneration(
            max_steps=job["max_steps"] - 1, step_token=job["step_delimiter"], stop_token="\\boxed",
            temperature=job["temperature"],
        )
        algorithm = ParticleFiltering(step, judge)
    else:
        lm = OpenAICompatibleLanguageModel(**common, max_completion_tokens=job["max_tokens"], temperature=job["temperature"])
        algorithm = BestOfN(judge)
    results = []
    started = time.perf_counter()
    for problem in job["problems"]:
        t0 = time.perf_counter()
        result = await algorithm.ainfer(lm, problem["question"], job["budget"], return_response_only=False)
        results.append({
            "id": problem["id"], "text": result.the_one.get("content") or "",
            "wall_s": round(time.perf_counter() - t0, 2),
        })
        print(json.dumps({"progress": problem["id"], "wall_s": results[-1]["wall_s"]}), file=sys.stderr, flush=True)
    wall = time.perf_counter() - started
    await judge.close()
    await lm.close()
    print(json.dumps({"wall_s": round(wall, 2), "judge_requests": judge.requests, "results": results}))


if __name__ == "__main__":
    asyncio.run(main())
