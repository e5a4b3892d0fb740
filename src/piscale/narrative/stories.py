"""Where stories come from: the packaged fairy tales, files, or text.

A source is read by ``read_stories``:

- ``fairytales`` (the packaged corpus, 278 FairytaleQA stories), or one of
  its stories by id (``Snow-man`` or ``fairytales:Snow-man``);
- a ``.jsonl`` file, one story per line as an object with ``id`` and either
  ``text`` or ``sections`` (a list of strings, joined by blank lines), and
  optionally ``origin``;
- a ``.json`` file holding one such object or a list of them;
- any other file: its whole text is one story, named after the file.

Files must be UTF-8. An empty file gives an empty list; a file that is not
UTF-8 or not valid JSON gives a ``NarrativeError`` that says where.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from piscale.narrative.resources import NarrativeError

__all__ = ["CORPUS", "StoryText", "read_stories"]

CORPUS = "fairytales"


@dataclass(frozen=True)
class StoryText:
    id: str
    text: str
    origin: str = ""


def _from_record(record: Any, where: str) -> StoryText:
    if not isinstance(record, dict):
        raise NarrativeError(f"{where}: expected a JSON object with id and text or sections")
    story_id = str(record.get("id") or "").strip()
    if not story_id:
        raise NarrativeError(f"{where}: the story has no id")
    if isinstance(record.get("text"), str):
        text = record["text"]
    elif isinstance(record.get("sections"), list) and all(isinstance(s, str) for s in record["sections"]):
        text = "\n\n".join(s.strip() for s in record["sections"])
    else:
        raise NarrativeError(f"{where}: story {story_id!r} has neither a text string nor a list of sections")
    return StoryText(story_id, text, str(record.get("origin") or ""))


def _corpus() -> list[StoryText]:
    from piscale.data import read_text

    lines = read_text(CORPUS).splitlines()
    return [_from_record(json.loads(line), f"{CORPUS} line {n}") for n, line in enumerate(lines, 1) if line.strip()]


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise NarrativeError(
            f"{path} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
            "convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None


def read_stories(source: str | Path) -> list[StoryText]:
    """The stories of ``source`` (see the module docstring)."""
    text_source = str(source)
    path = Path(text_source)
    if path.is_dir():
        raise NarrativeError(f"{path} is a folder; give a story file, a .jsonl file or a story id")
    if path.is_file():
        text = _read_utf8(path)
        if not text.strip():
            return []
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            stories = []
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise NarrativeError(f"{path} line {number}: not JSON ({error.msg})") from None
                stories.append(_from_record(record, f"{path} line {number}"))
            return stories
        if suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                raise NarrativeError(f"{path}: not JSON ({error.msg} at line {error.lineno})") from None
            records = data if isinstance(data, list) else [data]
            return [_from_record(r, f"{path} item {i}") for i, r in enumerate(records)]
        return [StoryText(path.stem, text, "")]
    name = text_source.removeprefix(f"{CORPUS}:")
    if text_source == CORPUS:
        return _corpus()
    matches = [story for story in _corpus() if story.id == name]
    if not matches:
        raise NarrativeError(
            f"{text_source!r} is neither a file nor a story of the {CORPUS} corpus "
            f"(ids look like 'Snow-man'; `piscale narrative stories` lists them)"
        )
    return matches
