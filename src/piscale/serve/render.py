"""Rendering in the OpenAI format: the response body of a finished request,
the chunks of a streamed one (choices, deltas, log-probabilities in the chat
and the completions shapes, piscale's search summaries), and JSON without
the non-finite numbers JSON cannot hold."""

from __future__ import annotations

import json
import math
from typing import Any

from piscale.lm.base import LanguageModel
from piscale.serve.generation import Delta, SearchOutput
from piscale.serve.plan import Plan
from piscale.lm.openai import LOGPROB_FLOOR  # the wire format's -inf, read and written alike

class Renderer:
    """Response bodies and stream chunks for requests to one backend (which
    decodes token ids into the text the responses show)."""

    def __init__(self, lm: LanguageModel):
        self.lm = lm

    def _token_label(self, token: int, as_id: bool) -> str:
        return f"token_id:{token}" if as_id else self.lm.decode([token])

    def _chat_logprobs(self, token_ids: list[int], logprobs: list[float], as_ids: bool) -> dict[str, Any]:
        content = []
        for token, logprob in zip(token_ids, logprobs):
            label = self._token_label(token, as_ids)
            content.append({"token": label, "logprob": logprob, "bytes": list(label.encode()), "top_logprobs": []})
        return {"content": content}

    def _completion_logprobs(
        self, token_ids: list[int], logprobs: list[float | None], as_ids: bool, offset: int = 0
    ) -> dict[str, Any]:
        tokens, offsets, position = [], [], offset
        for token in token_ids:
            label = self._token_label(token, as_ids)
            tokens.append(label)
            offsets.append(position)
            position += len(self.lm.decode([token]))
        return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": None, "text_offset": offsets}

    def body(self, plan: Plan, results: list, prompt_lps: list | None, usage: dict[str, Any]) -> dict[str, Any]:
        choices = []
        searches = []
        for p, (prompt, result) in enumerate(zip(plan.prompts, results)):
            outputs = [result] if isinstance(result, SearchOutput) else result
            for j, output in enumerate(outputs):
                index = p * plan.n + j
                if isinstance(output, SearchOutput):
                    choice_text, finish, stop_reason, token_ids, logprobs = output.text, output.finish_reason, None, None, None
                    searches.append(self.search_summary(output, plan))
                else:
                    choice_text, finish, stop_reason = output.text, output.finish_reason, output.stop_reason
                    token_ids, logprobs = output.token_ids, output.logprobs
                choices.append(
                    self._choice(plan, index, prompt, choice_text, finish, stop_reason, token_ids, logprobs,
                                 prompt_lps[p] if prompt_lps else None)
                )
        body: dict[str, Any] = {
            "id": f"{'chatcmpl' if plan.endpoint == 'chat' else 'cmpl'}-{plan.request_id}",
            "object": "chat.completion" if plan.endpoint == "chat" else "text_completion",
            "created": plan.created,
            "model": plan.model,
            "choices": choices,
            "usage": usage,
        }
        if plan.return_token_ids and plan.endpoint == "completion" and len(plan.prompts) == 1:
            body["prompt_token_ids"] = plan.prompts[0].ids
        if plan.search is not None:
            body["piscale"] = {"searches": searches}
        return body

    def _choice(self, plan, index, prompt, text, finish, stop_reason, token_ids, logprobs, prompt_lps) -> dict[str, Any]:
        if plan.endpoint == "chat":
            choice: dict[str, Any] = {
                "index": index,
                "message": {"role": "assistant", "content": plan.echo_text + text},
                "logprobs": self._chat_logprobs(token_ids, logprobs, plan.tokens_as_ids) if plan.logprobs and token_ids is not None else None,
                "finish_reason": finish,
                "stop_reason": stop_reason,
            }
        else:
            shown = (prompt.text + text) if plan.echo else text
            lp = None
            if plan.logprobs:
                ids: list[int] = []
                values: list[float | None] = []
                if plan.echo:
                    ids, values = list(prompt.ids), list(prompt_lps or [None] * len(prompt.ids))
                if token_ids is not None:
                    ids, values = ids + list(token_ids), values + list(logprobs)
                lp = self._completion_logprobs(ids, values, plan.tokens_as_ids)
            choice = {"index": index, "text": shown, "logprobs": lp, "finish_reason": finish, "stop_reason": stop_reason}
            if prompt_lps is not None:
                choice["prompt_logprobs"] = [
                    None if v is None else {str(t): {"logprob": v, "rank": None, "decoded_token": self.lm.decode([t])}}
                    for t, v in zip(prompt.ids, prompt_lps)
                ]
        if plan.return_token_ids and token_ids is not None:
            choice["token_ids"] = list(token_ids)
        return choice

    def search_summary(self, output: SearchOutput, plan: Plan) -> dict[str, Any]:
        assert plan.search is not None
        summary: dict[str, Any] = {
            "algorithm": plan.search.algorithm,
            "budget": plan.search.budget,
            "seed": plan.search.seed,
            "reward": plan.search.reward,
            "answer": output.answer,
            "score": output.score,
            "settings": output.settings,
            "steps": len(output.steps),
            "search_usage": output.search_usage,
            "failures": output.failures,
        }
        if plan.candidates:
            summary["candidates"] = output.candidates
        return summary

    def delta_choice(self, plan: Plan, index: int, text: str, delta: Delta) -> dict[str, Any]:
        if plan.endpoint == "chat":
            choice: dict[str, Any] = {
                "index": index,
                "delta": {"content": text} if text else {},
                "logprobs": self._chat_logprobs(delta.token_ids, delta.logprobs, plan.tokens_as_ids) if plan.logprobs else None,
                "finish_reason": delta.finish_reason,
            }
        else:
            choice = {
                "index": index,
                "text": text,
                "logprobs": self._completion_logprobs(delta.token_ids, delta.logprobs, plan.tokens_as_ids) if plan.logprobs else None,
                "finish_reason": delta.finish_reason,
            }
        if delta.finish_reason is not None:
            choice["stop_reason"] = delta.stop_reason
        if plan.return_token_ids:
            choice["token_ids"] = delta.token_ids
        return choice

    def chunk(self, plan: Plan, choices: list[dict[str, Any]], usage: dict | None = None, progress: dict | None = None, **extra) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": f"{'chatcmpl' if plan.endpoint == 'chat' else 'cmpl'}-{plan.request_id}",
            "object": "chat.completion.chunk" if plan.endpoint == "chat" else "text_completion",
            "created": plan.created,
            "model": plan.model,
            "choices": choices,
        }
        if usage is not None:
            chunk["usage"] = usage
        if progress is not None:
            chunk["piscale_progress"] = progress
        chunk.update(extra)
        return chunk


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced: -inf by
    ``LOGPROB_FLOOR``, +inf by its negation, NaN by None."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return LOGPROB_FLOOR if value < 0 else -LOGPROB_FLOOR
        return value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(json_safe(data), separators=(',', ':'))}\n\n"
