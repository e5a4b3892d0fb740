"""Evaluation tasks: problems with reference answers, and the prompt around them.

A task is a list of :class:`Problem` (an id, the question, the reference final
answer). Tasks come from

* a built-in name (``math500``, ``gsm8k``, ``gsm8k_train``, ``aime24``,
  ``amc23``): the data set shipped inside the package (``piscale.data``,
  hash-checked), unless a data directory (``--data-dir``, else
  ``$PISCALE_DATA``) holds a file of that name, which then takes its place;
* any JSON-lines (or JSON array) file of the same shapes: the question in
  ``problem`` or ``question``; the reference in ``answer`` (GSM8K's
  ``... #### 42`` solutions and numbers such as ``27.0`` are normalised) or,
  failing that, the last ``\\boxed{}`` of ``solution`` (the MATH format);
* a Hugging Face dataset, written ``hf:NAME[:CONFIG][@SPLIT]``, when the
  ``datasets`` package is installed.

Every task has a *fingerprint*, a hash of all its problems (before any
``limit``), so stored results are tied to the exact data they were run on.

The prompt follows Puri et al. (2025), who used the Qwen2.5-Math instruction
("reason step by step, and put your final answer within \\boxed{}") as the
system message and the bare problem as the user message; both are editable.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from piscale import data as packaged_data
from piscale.grading import extract_boxed, gsm8k_reference
from piscale.search import DEFAULT_SYSTEM_PROMPT as SEARCH_SYSTEM_PROMPT

DEFAULT_SYSTEM_PROMPT = SEARCH_SYSTEM_PROMPT
"""The system message of the paper's runs (the Qwen2.5-Math instruction), as
the search uses it by default."""

DEFAULT_PROMPT_TEMPLATE = "{question}"
"""The user message: the problem itself. ``{question}`` is replaced by it."""

BUILTIN_FILES: Mapping[str, str] = {
    name: packaged_data.manifest()[name]["file"].removesuffix(".gz") for name in packaged_data.names("task")
}
"""Built-in task name -> the file name looked for in a data directory."""

QUESTION_FIELDS = ("problem", "question")
ID_FIELDS = ("unique_id", "id", "idx")


class TaskError(ValueError):
    """A task could not be found or read; the message says what and where."""


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    reference: str
    """The reference final answer, as a string math-verify can parse."""


@dataclass(frozen=True)
class Task:
    name: str
    """How the user named it (``gsm8k``, a path, ``hf:...``)."""
    source: str
    """Where it was read from (a resolved file path or the hub id)."""
    fingerprint: str
    """sha256 over every problem's id, question and reference, in order."""
    problems: tuple[Problem, ...]

    @property
    def label(self) -> str:
        """A short name for tables and file names: the built-in name or hub
        id as given, a file's stem."""
        if self.name in BUILTIN_FILES or self.name.startswith("hf:"):
            return self.name
        return Path(self.name).stem

    def head(self, limit: int | None, skip: int = 0) -> tuple[Problem, ...]:
        """The first ``limit`` problems after the first ``skip`` (all the
        rest when ``limit`` is None). ``skip`` keeps apart problems that
        something was trained or tuned on, e.g. the training problems a
        learned reward saw."""
        if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
            raise TaskError(f"skip must be a whole number >= 0, got {skip!r}")
        if skip >= len(self.problems):
            raise TaskError(f"skip={skip} leaves none of the {len(self.problems)} problems of {self.name}")
        if limit is not None and limit < 1:
            raise TaskError(f"limit must be >= 1, got {limit}")
        rest = self.problems[skip:]
        return rest if limit is None else rest[:limit]


def format_prompt(template: str, question: str) -> str:
    """The user message for ``question``. Plain substitution rather than
    ``str.format``: templates often contain ``\\boxed{}``, whose braces would
    otherwise be taken for fields."""
    check_template(template)
    return template.replace("{question}", question)


def check_template(template: str) -> None:
    if "{question}" not in template:
        raise TaskError(f"a prompt template must contain {{question}}; got {template!r}")


def data_dirs(explicit: str | os.PathLike | None = None) -> list[Path]:
    """The directories whose files override the packaged built-in tasks, in
    order: ``explicit`` alone when given, else ``$PISCALE_DATA`` if set."""
    if explicit is not None:
        return [Path(explicit)]
    if os.environ.get("PISCALE_DATA"):
        return [Path(os.environ["PISCALE_DATA"])]
    return []


def load_task(name: str, data_dir: str | os.PathLike | None = None) -> Task:
    """A task by built-in name, file path or ``hf:`` id (see the module docstring)."""
    if not name:
        raise TaskError("no dataset given: name a built-in task, a JSONL file or hf:ID")
    if name.startswith("hf:"):
        return _load_hub(name)
    if name in BUILTIN_FILES:
        tried = [d / BUILTIN_FILES[name] for d in data_dirs(data_dir)]
        for path in tried:
            if path.is_file():
                return _task_from_records(name, str(path), read_records(path), name)
        if data_dir is not None:
            raise TaskError(f"data file for {name!r} not found: {tried[0]} does not exist")
        text = packaged_data.read_text(name)
        return _task_from_records(name, f"piscale.data:{name}", parse_records(text, name), name)
    path = Path(name)
    if path.is_file():
        return _task_from_records(name, str(path.resolve()), read_records(path), path.stem)
    raise TaskError(
        f"unknown dataset {name!r}: not a built-in task ({', '.join(BUILTIN_FILES)}), "
        "not an existing file, and not hf:NAME[:CONFIG][@SPLIT]"
    )


def read_records(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed value) for a JSON-lines file or a JSON array."""
    return parse_records(path.read_text(encoding="utf-8"), path)


def parse_records(text: str, path: object) -> list[tuple[int, object]]:
    """``read_records`` on text already read; ``path`` names it in errors."""
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise TaskError(f"{path}: not valid JSON: {error}") from error
        return list(enumerate(values, start=1))
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise TaskError(f"{path}:{number}: not valid JSON: {error}") from error
    return records


def _load_hub(name: str) -> Task:
    spec = name[len("hf:") :]
    spec, _, split = spec.partition("@")
    dataset_id, _, config = spec.partition(":")
    if not dataset_id:
        raise TaskError(f"{name!r}: write hf:NAME[:CONFIG][@SPLIT], e.g. hf:openai/gsm8k:main@test")
    try:
        import datasets
    except ImportError as error:
        raise TaskError(
            f"{name!r} needs the 'datasets' package (pip install datasets); "
            "or download the data and pass the JSONL file"
        ) from error
    split = split or "test"
    try:
        rows = datasets.load_dataset(dataset_id, config or None, split=split)
    except Exception as error:  # the hub client raises many kinds; report them all the same way
        raise TaskError(f"could not load {name!r} (split {split!r}): {error}") from error
    label = dataset_id.replace("/", "_")
    return _task_from_records(name, f"hf:{dataset_id}:{config}@{split}", list(enumerate(rows, start=1)), label)


def identified_records(
    records: Iterable[tuple[int, object]], source: str, default_id: Callable[[int, int], str]
) -> Iterator[tuple[str, str, Mapping]]:
    """(where, id, record) for each record of a file read by ``read_records``:
    every record must be a JSON object; its id is the first of ``ID_FIELDS``
    it has, else ``default_id(index, line number)``; an id used twice is
    refused, naming both places. ``where`` is ``source:line`` for messages."""
    seen: dict[str, int] = {}
    for index, (number, record) in enumerate(records):
        where = f"{source}:{number}"
        if not isinstance(record, Mapping):
            raise TaskError(f"{where}: expected a JSON object, got {type(record).__name__}")
        raw_id = next((record[f] for f in ID_FIELDS if record.get(f) is not None), None)
        record_id = default_id(index, number) if raw_id is None else str(raw_id)
        if record_id in seen:
            raise TaskError(f"{where}: id {record_id!r} already used at {source}:{seen[record_id]}")
        seen[record_id] = number
        yield where, record_id, record


def _task_from_records(name: str, source: str, records: Iterable[tuple[int, object]], label: str) -> Task:
    problems = [
        _problem_from_record(record, problem_id, where)
        for where, problem_id, record in identified_records(records, source, lambda index, _: f"{label}-{index}")
    ]
    if not problems:
        raise TaskError(f"{source}: no problems in it")
    digest = hashlib.sha256()
    for problem in problems:
        digest.update(json.dumps([problem.id, problem.question, problem.reference]).encode())
    return Task(name=name, source=source, fingerprint=digest.hexdigest(), problems=tuple(problems))


def _problem_from_record(record: Mapping, problem_id: str, where: str) -> Problem:
    question = next((record[f] for f in QUESTION_FIELDS if isinstance(record.get(f), str) and record[f].strip()), None)
    if question is None:
        raise TaskError(f"{where}: no question; expected a non-empty string in one of {QUESTION_FIELDS}")
    return Problem(id=problem_id, question=question, reference=_reference(record, where))


def _reference(record: Mapping, where: str) -> str:
    answer = record.get("answer")
    if isinstance(answer, bool):
        raise TaskError(f"{where}: answer is a boolean ({answer}); expected a number or a string")
    if isinstance(answer, (int, float)):
        return normalize_number(answer, where)
    if isinstance(answer, str) and answer.strip():
        if "####" in answer:
            return gsm8k_reference(answer)
        return answer.strip()
    solution = record.get("solution")
    if isinstance(solution, str):
        boxed = extract_boxed(solution)
        if boxed:
            return boxed
    raise TaskError(
        f"{where}: no reference answer; expected 'answer' (a number, a string, or a GSM8K "
        "solution ending in '#### N') or a 'solution' with a \\boxed{} answer"
    )


def normalize_number(value: int | float, where: str = "answer") -> str:
    """A numeric reference as text: ``27.0`` becomes ``27``, ``0.5`` stays ``0.5``."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TaskError(f"{where}: answer {value} is not a finite number")
        if value.is_integer():
            return str(int(value))
        return repr(value)
    return str(value)
