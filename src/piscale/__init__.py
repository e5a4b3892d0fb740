"""piscale: probabilistic inference-time scaling of language models.

>>> import piscale
>>> result = piscale.solve("What is 12 * 7?", model="smollm2-135m-instruct", reward="arith", budget=4)
>>> result.answer, result.usage["generated_tokens"]

The names below are the public API; they are imported when first used, so
``import piscale`` stays cheap (no torch until a model is loaded).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "solve": "piscale.api",
    "solve_many": "piscale.api",
    "asolve": "piscale.api",
    "asolve_many": "piscale.api",
    "sample": "piscale.api",
    "load_lm": "piscale.api",
    "load_reward": "piscale.api",
    "DEFAULT_MODEL": "piscale.api",
    "DEFAULT_REWARD": "piscale.api",
    "ALGORITHMS": "piscale.search",
    "SearchResult": "piscale.search",
    "Candidate": "piscale.search",
    "Settings": "piscale.search",
    "LanguageModel": "piscale.lm.base",
    "StepParams": "piscale.lm.base",
    "Reward": "piscale.rewards.base",
    "load_task": "piscale.tasks",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'piscale' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
