"""Request bodies of the OpenAI API, with the extensions piscale accepts.

Fields follow the OpenAI reference; unknown fields are accepted and ignored
(clients send many that do not change generation). Besides them:

* vLLM's extensions that inference-time-scaling clients use:
  ``add_generation_prompt``, ``continue_final_message``,
  ``include_stop_str_in_output``, ``echo``, ``prompt_logprobs``,
  ``return_tokens_as_token_ids``, ``return_token_ids`` and token-id prompts
  on /v1/completions; SGLang's ``logprob_start_len``;
* piscale's own: ``algorithm``, ``budget``, ``reward``, ``options`` at the
  top level, or the same inside a ``piscale`` object together with ``seed``,
  ``progress`` (stream progress events), ``timeout`` (seconds) and
  ``candidates`` (return every final candidate).

``parse`` validates strictly (no string is read as a number or a boolean,
no boolean as a number) and turns a validation failure into a 400 that says
which field was wrong.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from piscale.serve.errors import bad_request


class ScalingFields(BaseModel):
    """The choice of search, as a request states it."""

    model_config = ConfigDict(extra="forbid")

    algorithm: str | None = None
    budget: int | None = None
    reward: str | None = None
    options: dict[str, Any] | None = None


class PiscaleFields(ScalingFields):
    seed: int | None = Field(default=None, ge=0)
    progress: bool = False
    timeout: float | None = Field(default=None, gt=0)
    candidates: bool = False


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False
    include_progress: bool = False


class CommonRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    echo: bool = False
    # vLLM extensions
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = Field(default=None, ge=0)
    logprob_start_len: int | None = Field(default=None, ge=0)
    """SGLang's: prompt log-probabilities from this position on."""
    return_tokens_as_token_ids: bool = False
    return_token_ids: bool = False
    skip_special_tokens: bool = True
    # piscale extensions
    algorithm: str | None = None
    budget: int | None = None
    reward: str | None = None
    options: dict[str, Any] | None = None
    piscale: PiscaleFields | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        strings = [value] if isinstance(value, str) else value or []
        if any(not s for s in strings):
            raise ValueError("stop strings must be non-empty")
        if len(strings) > 16:
            raise ValueError("at most 16 stop strings")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def scaling(self) -> PiscaleFields:
        """The search choice, merged from the top level and ``piscale``; a
        field given in both places with different values is an error."""
        nested = self.piscale or PiscaleFields()
        merged = nested.model_dump()
        for name in ("algorithm", "budget", "reward", "options"):
            top = getattr(self, name)
            if top is None:
                continue
            if merged[name] is not None and merged[name] != top:
                raise bad_request(f"{name} is given twice with different values (top level and piscale.{name})", param=name)
            merged[name] = top
        return PiscaleFields(**merged)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def wants_progress(self) -> bool:
        return bool((self.piscale and self.piscale.progress) or (self.stream_options and self.stream_options.include_progress))


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[ContentPart] | None = None

    def plain(self, index: int) -> dict[str, str]:
        """The message as {role, content} with its text parts joined."""
        role = "system" if self.role == "developer" else self.role
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            parts = []
            for part in self.content:
                if part.type != "text" or part.text is None:
                    raise bad_request(f"messages[{index}]: only text content parts are supported, got {part.type!r}", param="messages")
                parts.append(part.text)
            text = "".join(parts)
        return {"role": role, "content": text}


class ChatRequest(CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    def token_cap(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(CommonRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: texts or token-id lists."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise bad_request("prompt must not be empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


Model = TypeVar("Model", bound=BaseModel)


def parse(model: type[Model], body: Any) -> Model:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        # Strict: a JSON string or boolean is never read as a number, nor a
        # string as a boolean ("budget": "8", "stream": "yes" are errors).
        return model.model_validate(body, strict=True)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise bad_request(f"{where}: {first['msg']}", param=str(first["loc"][0]) if first["loc"] else None) from None
