"""SFT examples: read the JSON-lines layouts TRL reads, tokenise them with
the model's chat template, mark which tokens carry the loss, and order them.

Layouts (one JSON object a line):

* ``{"messages": [{"role": ..., "content": ...}, ...]}``: a conversation;
  the loss falls on the tokens of every assistant message.
* ``{"prompt": ..., "completion": ...}``: the prompt as a list of messages
  (system, user...) or a string (the user's message; an optional
  ``"system"`` field gives the system message), and the completion as an
  assistant message list or a string (the assistant's answer). Strings are
  formatted with the chat template too, because piscale always prompts a
  model through its chat template: the fine-tuned model sees at training
  time exactly the tokens ``LanguageModel.prompt_ids`` gives it at inference.

**Completion-only loss.** An assistant turn's tokens are those the chat
template adds between the conversation before it (with the generation
prompt, ``<|im_start|>assistant\\n`` and the like) and the conversation
including it: the answer and its end-of-turn token, which the model must
learn to emit to stop. Every other token gets the label -100, which the loss
ignores. The template must render a conversation's beginning the same way
whatever follows (every common template does); a template that does not is
refused rather than mislabelled.

**Order.** *Stacked* (the recipe's default): every example of every file in
one pool, reshuffled each epoch. *Phased*: each file is a phase, trained for
all its epochs, shuffled within, before the next phase begins. The whole
order is drawn up front from the seed, so a resumed run sees the same
examples at the same steps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IGNORE = -100
"""The label of a token that carries no loss (PyTorch's cross-entropy default)."""


class DataError(ValueError):
    """Unusable SFT data; the message says which line and why."""


@dataclass(frozen=True)
class Example:
    """One conversation, ready for the chat template."""

    messages: tuple[dict, ...]
    """the whole conversation, prompt messages first."""
    where: str
    """file and line, for error messages."""


@dataclass(frozen=True)
class Tokenised:
    input_ids: list[int]
    labels: list[int]
    """the token id where it carries loss, ``IGNORE`` elsewhere."""


_ROLES = ("system", "user", "assistant", "tool")


def read_examples(path: str | os.PathLike) -> list[Example]:
    """The examples of one JSON-lines file, in either layout."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no data file at {path}")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error})") from error
        if not isinstance(record, dict):
            raise DataError(f"{where}: each line must be a JSON object")
        examples.append(Example(messages=tuple(_messages(record, where)), where=where))
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def _messages(record: dict, where: str) -> list[dict]:
    if "messages" in record:
        messages = _checked(record["messages"], where, "messages")
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str):
            system = record.get("system")
            prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        prompt, completion = _checked(prompt, where, "prompt"), _checked(completion, where, "completion")
        if any(m["role"] != "assistant" for m in completion):
            raise DataError(f"{where}: the completion must be assistant messages only")
        messages = prompt + completion
    else:
        raise DataError(f"{where}: expected a 'messages' list, or 'prompt' and 'completion' (found {sorted(record)})")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message: nothing to learn")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: the conversation starts with the assistant; give the prompt first")
    return messages


def _checked(messages: object, where: str, field: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{field}' must be a non-empty list of messages or a string")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in _ROLES or not isinstance(
            message.get("content"), str
        ):
            raise DataError(
                f"{where}: each message of '{field}' needs a role ({', '.join(_ROLES)}) and string content; got {message!r}"
            )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def tokenise(example: Example, tokenizer, max_length: int | None = None) -> Tokenised:
    """Token ids of the conversation and its completion-only labels."""
    messages = list(example.messages)
    ids = _chat(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _chat(tokenizer, messages[:i], generation_prompt=True)
        through = _chat(tokenizer, messages[: i + 1], generation_prompt=False)
        if ids[: len(through)] != through or through[: len(before)] != before:
            raise DataError(
                f"{example.where}: the chat template renders the start of this conversation differently "
                "depending on what follows, so the assistant's tokens cannot be told apart"
            )
        labels[len(before) : len(through)] = through[len(before) :]
    if max_length is not None and len(ids) > max_length:
        raise DataError(
            f"{example.where}: {len(ids)} tokens, more than max_length {max_length}; "
            "shorten the example or raise max_length (examples are never silently cut)"
        )
    if all(label == IGNORE for label in labels):
        raise DataError(f"{example.where}: the assistant's answer has no tokens")
    return Tokenised(input_ids=ids, labels=labels)


def _chat(tokenizer, messages: Sequence[dict], generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    encoded = tokenizer.apply_chat_template(
        list(messages), tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
    )
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):  # some versions return a BatchEncoding
        encoded = encoded["input_ids"]
    return list(encoded)


def training_order(phase_sizes: Sequence[int], epochs: int, seed: int, phased: bool = False) -> list[tuple[int, int]]:
    """(phase, index within the phase) of every example the run trains on,
    in order: all epochs of every phase. Stacked pools the phases and
    shuffles the pool each epoch; phased runs each phase's epochs, shuffled
    within the phase, before the next."""
    if epochs < 1:
        raise DataError(f"epochs must be >= 1, got {epochs}")
    rng = np.random.default_rng(seed)
    pool = [(p, i) for p, size in enumerate(phase_sizes) for i in range(size)]
    if not pool:
        raise DataError("no examples to train on")
    order: list[tuple[int, int]] = []
    if not phased:
        for _ in range(epochs):
            order += [pool[j] for j in rng.permutation(len(pool))]
        return order
    for phase, size in enumerate(phase_sizes):
        for _ in range(epochs):
            order += [(phase, int(j)) for j in rng.permutation(size)]
    return order
