"""Passing a key/value cache to a transformers model, across versions.

transformers 5 renamed the cache argument of ``forward`` from
``past_key_values`` to ``cache`` (and the output field with it), keeping the
old name as a deprecated alias for a while. A caller that tests for one name
in the signature and quietly runs without a cache when it is absent turns an
incremental computation into a quadratic one with no visible sign. These
helpers find the name a model takes, and say clearly when there is none.
"""

from __future__ import annotations

import inspect

CACHE_ARGUMENTS = ("cache", "past_key_values")
"""Names a ``forward`` may take its key/value cache under, newest first."""


def cache_argument(model) -> str | None:
    """The keyword under which ``model.forward`` takes a key/value cache, or
    None when it takes none (a custom model without caching)."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in CACHE_ARGUMENTS if name in parameters), None)


def require_cache_argument(model) -> str:
    """``cache_argument``, or a clear error for a model that takes none."""
    name = cache_argument(model)
    if name is None:
        raise TypeError(
            f"{type(model).__name__}.forward takes no key/value cache (looked for "
            f"{' or '.join(CACHE_ARGUMENTS)}); this engine needs a model that does"
        )
    return name


def output_cache(output):
    """The key/value cache a forward pass returned, under either name."""
    for name in CACHE_ARGUMENTS:
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise RuntimeError("the model returned no key/value cache although one was asked for (use_cache=True)")


def check_cache_filled(cache, expected_length: int) -> None:
    """Raise unless ``cache`` now holds ``expected_length`` positions: a model
    that ignored the cache it was given would otherwise make every later
    read start from nothing without anyone noticing."""
    length = cache.get_seq_length()
    if length != expected_length:
        raise RuntimeError(
            f"the key/value cache holds {length} positions after the forward pass, expected "
            f"{expected_length}: this transformers version or model did not use the cache it was given"
        )
