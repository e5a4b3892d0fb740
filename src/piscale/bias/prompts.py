"""Prompt sets that differ only in the value of a sensitive attribute.

An attribute (gender, location, topic) is a set of templates with one slot
``{}`` and, for each attribute value, a list of words to put in it; the lists
are aligned, so that word j of "male" ("my father") and word j of "female"
("my mother") make prompts identical but for the attribute. A ``neutral``
list, aligned the same way, names no value ("my parent"): continuations of
the neutral prompts define the attribute-neutral target of debiasing.

A prompt is identified by its *slot* (template i, word j): the same slot
across values is a matched pair, which the bootstrap of
``piscale.bias.measures`` resamples as one unit.

The defaults ship in ``attributes.json`` beside this module; a user file has
the same layout (``{"instruction": ..., "attributes": {NAME: {...}}}``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_FILE = Path(__file__).with_name("attributes.json")
NEUTRAL = "neutral"


class PromptSetError(ValueError):
    """A prompt-set file that cannot be used, with what is wrong in it."""


@dataclass(frozen=True)
class Prompt:
    attribute: str
    value: str
    """an attribute value, or ``"neutral"``."""
    slot: str
    """``t{i}w{j}``: template i, word j; equal across values."""
    word: str
    text: str
    """the text to continue."""


@dataclass(frozen=True)
class Attribute:
    name: str
    templates: tuple[str, ...]
    values: dict[str, tuple[str, ...]]
    """attribute value -> its words, aligned across values."""
    neutral: tuple[str, ...]
    instruction: str

    def prompts(self, value: str, limit: int | None = None) -> list[Prompt]:
        """The prompts of one value (or ``"neutral"``): every template with
        every word, template-major, at most ``limit`` of them."""
        words = self.neutral if value == NEUTRAL else self.values.get(value)
        if words is None:
            raise PromptSetError(
                f"attribute {self.name!r} has no value {value!r}; it has {', '.join([*self.values, NEUTRAL])}"
            )
        prompts = [
            Prompt(self.name, value, f"t{i}w{j}", word, _fill(template, word))
            for i, template in enumerate(self.templates)
            for j, word in enumerate(words)
        ]
        return prompts if limit is None else prompts[:limit]

    @property
    def all_values(self) -> list[str]:
        return [*self.values, NEUTRAL]


def _fill(template: str, word: str) -> str:
    text = template.format(word)
    # A word that opens the sentence starts with a capital ("My father said ...").
    return text[0].upper() + text[1:] if template.startswith("{}") else text


def load_attributes(path: str | Path | None = None) -> dict[str, Attribute]:
    """The attributes of a prompt-set file (the shipped defaults when None)."""
    source = Path(path) if path is not None else DEFAULT_FILE
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromptSetError(f"no prompt-set file at {source}") from None
    except json.JSONDecodeError as error:
        raise PromptSetError(f"{source} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("attributes"), dict) or not data["attributes"]:
        raise PromptSetError(f"{source}: expected an object with a non-empty 'attributes' object")
    instruction = data.get("instruction", "")
    if not isinstance(instruction, str):
        raise PromptSetError(f"{source}: 'instruction' must be a string")
    return {name: _attribute(source, name, spec, instruction) for name, spec in data["attributes"].items()}


def _attribute(source: Path, name: str, spec: Any, instruction: str) -> Attribute:
    where = f"{source}: attribute {name!r}"
    if not isinstance(spec, dict):
        raise PromptSetError(f"{where} must be an object")
    templates = spec.get("templates")
    if not _strings(templates) or not templates:
        raise PromptSetError(f"{where}: 'templates' must be a non-empty list of strings")
    for template in templates:
        if template.count("{}") != 1 or template.replace("{}", "").count("{") or template.replace("{}", "").count("}"):
            raise PromptSetError(f"{where}: template {template!r} must hold exactly one '{{}}' slot and no other braces")
    values = spec.get("values")
    if not isinstance(values, dict) or len(values) < 2:
        raise PromptSetError(f"{where}: 'values' must map at least two attribute values to lists of words")
    if NEUTRAL in values:
        raise PromptSetError(f"{where}: {NEUTRAL!r} is reserved for the 'neutral' list")
    neutral: list[str] = spec.get("neutral") or []
    lists = {**values, NEUTRAL: neutral}
    sizes = set()
    for value, words in lists.items():
        if not _strings(words) or not words or not all(w.strip() for w in words):
            raise PromptSetError(f"{where}: the words of {value!r} must be a non-empty list of non-empty strings")
        sizes.add(len(words))
    if len(sizes) != 1:
        counts = ", ".join(f"{value} {len(words)}" for value, words in lists.items())
        raise PromptSetError(f"{where}: every value needs the same number of aligned words; got {counts}")
    return Attribute(
        name, tuple(templates), {v: tuple(w) for v, w in values.items()}, tuple(neutral),
        spec.get("instruction", instruction),
    )


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)
