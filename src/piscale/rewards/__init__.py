"""Reward models: the likelihood of a search.

Every reward follows ``piscale.rewards.base.Reward``: it scores a batch of
(prompt, steps) pairs with one score per step. ``aggregate`` and
``score_trajectories`` turn step scores into one number per trajectory; the
other modules are the reward sources:

* ``prm``: process reward models through transformers (classification-head
  and language-model PRMs), with incremental scoring over a KV cache;
* ``judge``: an LLM asked Yes or No, scored by P(Yes) / (P(Yes) + P(No));
* ``verify``: a final-answer verifier and an arithmetic step checker;
* ``cdr``: customizable density ratios of a strong over a weak LM;
* ``embed``: cosine similarity to attribute descriptions;
* ``certainty``: the policy's own confidence (mean token log-probability);
* ``compose``: weighted sums and transforms of rewards;
* ``spec``: rewards from a short text spec (``judge:MODEL``, ``prm:MODEL`` ...).

Modules that need torch are imported when first used, so that importing this
package stays cheap.
"""

from __future__ import annotations

import importlib

from piscale.rewards.aggregate import aggregate, answer_steps, join_steps, score_trajectories
from piscale.rewards.base import AGGREGATIONS, Aggregation, Reward, Scale
from piscale.rewards.compose import Terminal, Transformed, WeightedSum, split_terminal
from piscale.rewards.prefix import PrefixReward
from piscale.rewards.verify import ArithmeticReward, VerifierReward, find_equations

_LAZY = {
    "ClassificationPRM": "piscale.rewards.prm",
    "TagPRM": "piscale.rewards.prm",
    "TransformersPRM": "piscale.rewards.prm",
    "load_prm": "piscale.rewards.prm",
    "LLMJudge": "piscale.rewards.judge",
    "DensityRatioReward": "piscale.rewards.cdr",
    "Exemplar": "piscale.rewards.cdr",
    "KeywordRouter": "piscale.rewards.cdr",
    "JudgeRouter": "piscale.rewards.cdr",
    "EmbeddingReward": "piscale.rewards.embed",
    "SelfCertaintyReward": "piscale.rewards.certainty",
    "from_spec": "piscale.rewards.spec",
}

__all__ = [
    "AGGREGATIONS",
    "Aggregation",
    "ArithmeticReward",
    "PrefixReward",
    "Reward",
    "Scale",
    "Terminal",
    "Transformed",
    "VerifierReward",
    "WeightedSum",
    "aggregate",
    "find_equations",
    "answer_steps",
    "join_steps",
    "score_trajectories",
    "split_terminal",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'piscale.rewards' has no attribute {name!r}")
