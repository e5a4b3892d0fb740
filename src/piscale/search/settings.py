"""Search options: one validated record shared by every algorithm.

Defaults reproduce Puri et al. (2025): steps end at a blank line, the model
samples at temperature 0.8, rewards are aggregated by ``model``, the weight of
a particle is the logit of its current score, multinomial resampling at every
step, the answer is the particle with the largest final weight.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, fields
from typing import Any

from piscale.rewards.base import AGGREGATIONS
from piscale.smc import POTENTIALS, RESAMPLERS

SELECTIONS: tuple[str, ...] = ("max-weight", "weighted-vote")


@dataclass(frozen=True)
class Settings:
    """Every option of every algorithm; each algorithm accepts its own subset.

    Four different temperatures meet in a search, and the option names are
    kept as stored in result databases, so here is which is which:

    * ``temperature``: the language model's sampling temperature, dividing
      its logits when it writes a step (``StepParams.temperature``);
    * ``softmax_temperature`` τ: divides every particle's log-potential, so
      its weights are a softmax of Φ / τ (``Driver.potentials``); below 1
      sharpens resampling toward high scores;
    * ``temperatures``: parallel tempering's chain temperatures T_1 < ... <
      T_M, read through ``chain_temperatures``; chain k divides its
      potentials by T_k on top of τ;
    * the SMC kernel's ``tempering`` argument (``piscale.search.kernel``) is
      where a chain temperature enters a sweep (1 for pf and pg).
    """

    # generation
    temperature: float = 0.8
    """the LM's sampling temperature."""
    top_p: float = 1.0
    max_steps: int = 40
    """a particle stops after this many steps."""
    max_step_tokens: int = 256
    """token cap of one step."""
    max_tokens: int = 2048
    """token cap of a whole response (every algorithm, so budgets compare)."""
    step_delimiter: str = "\n\n"
    # reward
    aggregation: str = "model"
    """how step scores become one score: model, prod, min or last."""
    # sequential Monte Carlo
    potential: str = "paper"
    """``paper`` (weight = logit of the current score) or ``incremental``
    (weight *= r_t / r_{t-1}: targets p(x|c) r(x))."""
    softmax_temperature: float = 1.0
    """τ, dividing the log-potentials of the particle weights."""
    resampler: str = "multinomial"
    ess_threshold: float | None = None
    """resample only when ESS / N falls under this; None resamples every step."""
    selection: str = "max-weight"
    """``max-weight`` or ``weighted-vote`` (final weights summed per answer)."""
    iterations: int = 1
    """particle Gibbs / parallel tempering sweeps."""
    chains: int = 1
    """parallel tempering chains."""
    temperatures: tuple[float, ...] | None = None
    """parallel tempering's chain temperatures T_1 < ... < T_M (default 1,
    2, 4, ...; see ``chain_temperatures``)."""
    # tree search
    beam_width: int = 4
    """beam search / DVTS: expansions per kept partial answer (M)."""

    def __post_init__(self) -> None:
        _number(self, "temperature", low=0.0)
        _number(self, "top_p", low=0.0, low_open=True, high=1.0)
        _number(self, "softmax_temperature", low=0.0, low_open=True)
        for name in ("max_steps", "max_step_tokens", "max_tokens", "iterations", "chains", "beam_width"):
            _integer(self, name)
        if not isinstance(self.step_delimiter, str) or not self.step_delimiter:
            raise ValueError("step_delimiter must be a non-empty string")
        _choice(self, "aggregation", AGGREGATIONS)
        _choice(self, "potential", POTENTIALS)
        _choice(self, "resampler", tuple(RESAMPLERS))
        _choice(self, "selection", SELECTIONS)
        if self.ess_threshold is not None:
            _number(self, "ess_threshold", low=0.0, low_open=True, high=1.0)
        if self.temperatures is not None:
            if isinstance(self.temperatures, (str, bytes)) or any(
                isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) for t in self.temperatures
            ):
                raise ValueError(f"temperatures must be finite numbers, got {self.temperatures!r}")
            ladder = tuple(float(t) for t in self.temperatures)
            object.__setattr__(self, "temperatures", ladder)
            if len(ladder) != self.chains:
                raise ValueError(f"temperatures has {len(ladder)} entries for chains={self.chains}")
            if any(t <= 0 for t in ladder) or any(b <= a for a, b in zip(ladder, ladder[1:])):
                raise ValueError(f"temperatures must be positive and strictly increasing, got {list(ladder)}")

    @property
    def chain_temperatures(self) -> tuple[float, ...]:
        """Parallel tempering's chain temperatures, 1, 2, 4, ... unless given."""
        return self.temperatures or tuple(2.0**k for k in range(self.chains))


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Settings))


def build_settings(algorithm: str, allowed: tuple[str, ...], defaults: dict[str, Any], options: dict[str, Any]) -> Settings:
    """Settings for ``algorithm`` from user ``options``: names outside
    ``allowed`` are an error; ``defaults`` are the algorithm's own."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for algorithm {algorithm!r}; "
            f"it takes: {', '.join(allowed)}"
        )
    return Settings(**{**defaults, **options})


def _number(settings: Settings, name: str, low: float, low_open: bool = False, high: float | None = None) -> None:
    value = getattr(settings, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}{']' if high is not None else ')'}"
        raise ValueError(f"{name} must be in {bounds}, got {value}")


def _integer(settings: Settings, name: str) -> None:
    value = getattr(settings, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _choice(settings: Settings, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(settings, name)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
