"""Sampling a token from one row of logits in numpy, for the llama.cpp
engine: greedy at temperature 0, otherwise an inverse-CDF draw from the
tempered softmax, restricted to the top-p nucleus, with one uniform number
from a per-sequence generator; and the log-softmax of chosen tokens that
scoring reads. (The transformers engine samples with torch on its own
tensors: ``piscale.lm.hf``.)"""

from __future__ import annotations

import numpy as np

# Sampling draws a block of the vocabulary first, then a token inside it.
_SAMPLING_BLOCK = 1024

# Weight floors (relative to the most likely token) tried in turn to find a
# small set of tokens that contains the top-p nucleus.
_NUCLEUS_FLOORS = (np.float32(1e-2), np.float32(1e-4), np.float32(1e-6), np.float32(1e-8), np.float32(0))


def sample_token(
    logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator | None
) -> tuple[int, float]:
    """Choose the next token from one row of logits.

    Returns the token and its log-probability under the model at temperature
    1. ``temperature == 0`` is greedy (the first maximum); otherwise the token
    is drawn from softmax(logits / temperature), restricted to the smallest set
    of most likely tokens whose probability reaches ``top_p``, with one
    uniform draw from ``rng`` (inverse-CDF sampling).

    Exponentials are taken in float32 and sums in float64: with vocabularies
    of 150k tokens this is the engine's main cost per token, so the draws
    below avoid sorting or accumulating the whole vocabulary when they can,
    without changing the distribution.
    """
    x = np.asarray(logits, dtype=np.float32)
    top = x.max()
    shifted = x - top
    unnormalised = np.exp(shifted)
    log_normaliser = float(np.log(unnormalised.sum(dtype=np.float64)))
    if temperature == 0:
        token = int(np.argmax(x))
        return token, float(shifted[token]) - log_normaliser
    if rng is None:
        raise ValueError("sampling at temperature > 0 needs a random generator")
    weights = unnormalised if temperature == 1 else np.exp(shifted * np.float32(1.0 / temperature))
    if top_p < 1.0:
        token = _sample_nucleus(weights, top_p, rng)
    else:
        token = _sample_all(weights, rng)
    return token, float(shifted[token]) - log_normaliser


def _sample_all(weights: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF draw over the vocabulary in two levels: find the block of
    ``_SAMPLING_BLOCK`` tokens holding the draw from the block sums, then the
    token inside that block."""
    starts = np.arange(0, len(weights), _SAMPLING_BLOCK)
    block_cumulative = np.cumsum(np.add.reduceat(weights, starts, dtype=np.float64))
    target = rng.random() * block_cumulative[-1]
    block = min(int(np.searchsorted(block_cumulative, target, side="right")), len(starts) - 1)
    before = block_cumulative[block - 1] if block else 0.0
    inside = before + np.cumsum(weights[starts[block] : starts[block] + _SAMPLING_BLOCK], dtype=np.float64)
    index = min(int(np.searchsorted(inside, target, side="right")), len(inside) - 1)
    while weights[starts[block] + index] == 0 and index > 0:  # rounding at the block's end
        index -= 1
    return int(starts[block] + index)


def _sample_nucleus(weights: np.ndarray, top_p: float, rng: np.random.Generator) -> int:
    """Inverse-CDF draw from the top-p nucleus of unnormalised ``weights``.

    The nucleus is a prefix of the tokens sorted by weight, so once the tokens
    above some weight floor hold ``top_p`` of the mass, it lies among them and
    only they need sorting. Floors fall until that holds (the last is 0)."""
    threshold = top_p * float(weights.sum(dtype=np.float64))
    for floor in _NUCLEUS_FLOORS:
        candidates = np.flatnonzero(weights >= floor)
        if weights[candidates].sum(dtype=np.float64) >= threshold:
            break
    order = candidates[np.argsort(-weights[candidates], kind="stable")]
    sorted_weights = weights[order].astype(np.float64)
    mass_before = np.cumsum(sorted_weights) - sorted_weights
    keep = max(int(np.count_nonzero(mass_before < threshold)), 1)
    kept = np.cumsum(sorted_weights[:keep])
    index = int(np.searchsorted(kept, rng.random() * kept[-1], side="right"))
    return int(order[min(index, keep - 1)])


def log_softmax_at(rows: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log softmax(rows[i])[targets[i]] for every row, in float64."""
    x = rows.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    log_normaliser = np.log(np.exp(x - top).sum(axis=1)) + top[:, 0]
    return x[np.arange(len(targets)), targets] - log_normaliser
