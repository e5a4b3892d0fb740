"""What the extraction produces for one story, as plain dataclasses.

Offsets are character offsets into ``StoryResult.text`` (start inclusive,
end exclusive); ids are indices into the story's own lists. ``to_dict`` and
``from_dict`` give the JSON form that ``piscale narrative extract`` writes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1


@dataclass
class Sentence:
    index: int
    start: int
    end: int
    text: str


@dataclass
class Mention:
    """One reference to a character: a name, a noun phrase or a pronoun."""

    id: int
    character: int | None  # None: a pronoun the resolver could not place
    kind: str  # "name" | "nominal" | "pronoun" | "speaker" (I/me/my in a quote)
    text: str
    sentence: int
    start: int
    end: int
    role: str  # the head's dependency label: nsubj, dobj, poss, ...
    ambiguous: bool = False  # another compatible character was as near


@dataclass
class Character:
    id: int
    name: str
    aliases: list[str]
    mentions: int
    gender: str  # "female" | "male" | "group-or-unknown"
    gender_certainty: float  # the share of gendered evidence that agrees with ``gender``
    female_evidence: int
    male_evidence: int
    number: str  # "singular" | "plural"
    importance: str  # "primary" | "secondary" | "tertiary"
    animacy: str  # "person" | "animal" | "named"
    first_mention: int  # character offset


@dataclass
class Event:
    """A verb with a character as its agent (subject) or patient (object)."""

    id: int
    character: int
    role: str  # "subject" | "object"
    verb: str  # lemma; a phrasal verb keeps its particle: "run_away"
    text: str  # the verb as written
    category: str | None  # WordNet verb supersense ("verb.motion"); None when WordNet lacks the verb
    sentence: int
    start: int
    end: int
    mention: int
    temporal_rank: int  # place in story time, 0 first (events of one verb share it)
    salience: float
    salient: bool  # the most salient event of its sentence
    in_quote: bool  # said inside direct speech


@dataclass
class StoryResult:
    id: str
    origin: str
    text: str
    sentences: list[Sentence] = field(default_factory=list)
    characters: list[Character] = field(default_factory=list)
    mentions: list[Mention] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["schema"] = SCHEMA_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoryResult:
        return cls(
            id=data["id"],
            origin=data.get("origin", ""),
            text=data.get("text", ""),
            sentences=[Sentence(**s) for s in data.get("sentences", [])],
            characters=[Character(**c) for c in data.get("characters", [])],
            mentions=[Mention(**m) for m in data.get("mentions", [])],
            events=[Event(**e) for e in data.get("events", [])],
            notes=list(data.get("notes", [])),
        )

    def chain(self, character: int) -> list[Event]:
        """The character's events in temporal order."""
        return sorted((e for e in self.events if e.character == character), key=lambda e: (e.temporal_rank, e.id))
