"""The files ``piscale narrative extract`` writes, and reading them back.

Layout of ``--out DIR``::

    DIR/index.json                 one entry per story: id, origin, folder,
                                   counts, notes; plus the run's settings
    DIR/events.csv                 every story's events, one row each,
                                   with the story id and the character's
                                   name, gender and importance
    DIR/characters.csv             every story's characters
    DIR/<story>/story.json         everything about the story (the
                                   ``StoryResult`` as JSON: text, sentences,
                                   characters, mentions, events)
    DIR/<story>/characters.csv     id, name, gender, gender_certainty,
                                   female_evidence, male_evidence, number,
                                   importance, animacy, mentions,
                                   first_mention, aliases (joined by "|")
    DIR/<story>/events.csv         id, character, character_name, gender,
                                   importance, role, verb, text, category,
                                   sentence, start, end, temporal_rank,
                                   salience, salient, in_quote
    DIR/<story>/mentions.csv       id, character, kind, text, sentence,
                                   start, end, role, ambiguous

``<story>`` is the story id with anything but letters, digits, ``-``, ``_``
and ``.`` replaced by ``_``.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from piscale.narrative.resources import NarrativeError
from piscale.narrative.schema import StoryResult

__all__ = [
    "CHARACTER_COLUMNS",
    "EVENT_COLUMNS",
    "MENTION_COLUMNS",
    "character_rows",
    "event_rows",
    "load_results",
    "story_folder",
    "write_results",
]

CHARACTER_COLUMNS = (
    "id", "name", "gender", "gender_certainty", "female_evidence", "male_evidence", "number",
    "importance", "animacy", "mentions", "first_mention", "aliases",
)  # fmt: skip
EVENT_COLUMNS = (
    "id", "character", "character_name", "gender", "importance", "role", "verb", "text", "category",
    "sentence", "start", "end", "temporal_rank", "salience", "salient", "in_quote",
)  # fmt: skip
MENTION_COLUMNS = ("id", "character", "kind", "text", "sentence", "start", "end", "role", "ambiguous")


def story_folder(story_id: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", story_id).strip(".") or "story"
    return name


def character_rows(result: StoryResult) -> list[dict[str, Any]]:
    return [
        {**{k: getattr(c, k) for k in CHARACTER_COLUMNS if k != "aliases"}, "aliases": "|".join(c.aliases)}
        for c in result.characters
    ]


def event_rows(result: StoryResult) -> list[dict[str, Any]]:
    characters = {c.id: c for c in result.characters}
    rows = []
    for e in result.events:
        c = characters[e.character]
        rows.append(
            {
                **{k: getattr(e, k) for k in EVENT_COLUMNS if hasattr(e, k)},
                "character_name": c.name,
                "gender": c.gender,
                "importance": c.importance,
                "category": e.category or "",
            }
        )
    return rows


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def write_results(results: Sequence[StoryResult], out: Path, settings: dict[str, Any] | None = None) -> Path:
    """Write ``results`` under ``out`` (created) as laid out in the module
    docstring; return the index file."""
    out.mkdir(parents=True, exist_ok=True)
    index = []
    folders: set[str] = set()
    all_events: list[dict[str, Any]] = []
    all_characters: list[dict[str, Any]] = []
    for result in results:
        folder = story_folder(result.id)
        base, n = folder, 1
        while folder in folders:
            n += 1
            folder = f"{base}-{n}"
        folders.add(folder)
        target = out / folder
        target.mkdir(parents=True, exist_ok=True)
        (target / "story.json").write_text(json.dumps(result.to_dict(), ensure_ascii=False), encoding="utf-8")
        characters = character_rows(result)
        events = event_rows(result)
        _write_csv(target / "characters.csv", CHARACTER_COLUMNS, characters)
        _write_csv(target / "events.csv", EVENT_COLUMNS, events)
        _write_csv(
            target / "mentions.csv",
            MENTION_COLUMNS,
            ({k: getattr(m, k) for k in MENTION_COLUMNS} for m in result.mentions),
        )
        all_characters.extend({"story": result.id, **row} for row in characters)
        all_events.extend({"story": result.id, **row} for row in events)
        index.append(
            {
                "id": result.id,
                "origin": result.origin,
                "folder": folder,
                "sentences": len(result.sentences),
                "characters": len(result.characters),
                "events": len(result.events),
                "notes": result.notes,
            }
        )
    _write_csv(out / "characters.csv", ("story", *CHARACTER_COLUMNS), all_characters)
    _write_csv(out / "events.csv", ("story", *EVENT_COLUMNS), all_events)
    path = out / "index.json"
    path.write_text(json.dumps({"settings": settings or {}, "stories": index}, indent=1), encoding="utf-8")
    return path


def load_results(folder: Path) -> list[StoryResult]:
    """The results ``write_results`` wrote under ``folder``."""
    index_path = folder / "index.json"
    if not index_path.is_file():
        raise NarrativeError(f"{folder} has no index.json; run `piscale narrative extract ... --out {folder}` first")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise NarrativeError(f"{index_path} is not a valid index ({error})") from None
    results = []
    for entry in index.get("stories", []):
        path = folder / entry["folder"] / "story.json"
        try:
            results.append(StoryResult.from_dict(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise NarrativeError(f"{path} cannot be read ({error})") from None
    return results
