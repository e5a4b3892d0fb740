"""Server configuration: the model, the defaults of every request, the limits.

A configuration comes from command-line flags, a TOML or JSON file
(``--config``), or both (flags win). Its fields are those of ``ServerConfig``;
in a file, dashes and underscores are interchangeable::

    model = "smollm2-135m-instruct"
    budget = 1                   # plain generation unless a request asks for more
    algorithm = "pf"             # used when a request sets a budget but no algorithm
    reward = "judge"             # used when a request scales without naming a reward
    max_budget = 64
    rewards = ["cdr:qwen2.5-coder-1.5b-instruct,qwen2.5-coder-0.5b-instruct"]
    max_concurrency = 64         # limits (see ServerConfig): over them, 413 or 429
    max_body_bytes = 262144

    [presets.careful]            # model "smollm2-135m-instruct:careful"
    algorithm = "pf"
    budget = 16
    options = { potential = "incremental", ess_threshold = 0.5 }

A model name ``NAME:PRESET`` picks a preset: one from the file, or
``ALGORITHM-BUDGET`` such as ``pf-8`` or ``bon-4``.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from piscale.models import DEFAULT_MODEL


CHEAP_REWARD_KINDS = ("verify", "arith", "certainty")
"""Reward kinds any request may name: they load no model."""

_PRESET = re.compile(r"^(?P<algorithm>[a-z]+)-(?P<budget>[0-9]+)$")


@dataclass(frozen=True)
class Preset:
    """A named choice of algorithm, budget, reward and options."""

    algorithm: str
    budget: int
    reward: str | None = None
    """None: the server's default reward."""
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, name: str, data: Mapping[str, Any]) -> Preset:
        unknown = sorted(set(data) - {"algorithm", "budget", "reward", "options"})
        if unknown:
            raise ValueError(f"preset {name!r}: unknown field(s) {', '.join(unknown)}")
        if "algorithm" not in data or "budget" not in data:
            raise ValueError(f"preset {name!r} needs an algorithm and a budget")
        options = data.get("options") or {}
        if not isinstance(options, Mapping):
            raise ValueError(f"preset {name!r}: options must be a table of option = value")
        return cls(str(data["algorithm"]), _positive_int(data["budget"], f"preset {name!r} budget"), data.get("reward"), dict(options))


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``piscale serve`` needs; see the module doc."""

    model: str = DEFAULT_MODEL
    """the model spec handed to ``piscale.lm.load``."""
    served_model_name: str | None = None
    """the name clients use (default: ``model``)."""
    engine: str = "auto"
    device: str | None = None
    """where the model runs; local reward models follow it unless it is None
    and the model says where its tensors are."""
    trust_remote_code: bool = False
    """let reward checkpoints run their own code (Qwen2.5-Math-PRM needs it)."""
    engine_options: Mapping[str, Any] = field(default_factory=dict)
    """keyword arguments of the engine (``piscale.lm.load``), e.g. llama.cpp's
    ``max_sequences`` and ``context_length``."""
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    """when set, /v1 routes need ``Authorization: Bearer <key>``."""

    algorithm: str = "pf"
    budget: int = 1
    """1 with no reward named is plain generation."""
    reward: str = "judge"
    """the reward of a scaled request that names none (``judge`` = the model judging itself)."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """default algorithm options (``piscale.search.Settings``)."""
    rewards: tuple[str, ...] = ()
    """further reward specs requests may name (besides ``reward``, ``none``
    and the kinds in ``CHEAP_REWARD_KINDS``); they may load models."""
    presets: Mapping[str, Preset] = field(default_factory=dict)

    max_budget: int = 64
    max_tokens: int = 4096
    """cap on a request's max_tokens; also the chat default when it gives none."""
    request_timeout: float = 600.0
    """seconds; a request may ask for less."""
    sequence_cache: int = 32
    """finished sequences kept so that a request continuing one (same token
    ids) forks it instead of prefilling again; 0 turns this off."""
    stream_chunk_tokens: int = 16
    """tokens generated per backend call when plain generation streams."""

    # Limits: what one client can make the server hold or do. A request over
    # a limit is answered 413 (too large) or 429 (the server is full now).
    max_body_bytes: int = 1 << 20
    """largest request body read (413 above it)."""
    max_request_sequences: int = 256
    """most sequences one request may hold at once: prompts x n for plain
    generation, prompts x budget for a search (413 above it)."""
    max_sequences: int = 512
    """most sequences admitted across all running requests; requests wait
    for room in arrival order (an engine with fewer cache slots lowers it)."""
    max_queue: int = 64
    """most requests waiting for room; one more is answered 429."""
    max_concurrency: int = 128
    """most requests handled at once on the /v1 and tokenizer routes,
    streams included, waiting ones included; one more is answered 429.
    /health and /metrics are not counted."""
    grading_workers: int = 1
    """worker processes that grade answers (the ``verify`` reward) off
    the event loop; 0 grades in the server's own process, on the loop."""
    grading_timeout: float = 10.0
    """seconds one grading may take; a worker over it is killed and the
    answer counts as not matching."""

    def __post_init__(self) -> None:
        _positive_int(self.budget, "budget")
        _positive_int(self.max_budget, "max_budget")
        _positive_int(self.max_tokens, "max_tokens")
        _positive_int(self.stream_chunk_tokens, "stream_chunk_tokens")
        for name in ("max_body_bytes", "max_request_sequences", "max_sequences", "max_concurrency"):
            _positive_int(getattr(self, name), name)
        for name in ("max_queue", "grading_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.max_request_sequences > self.max_sequences:
            raise ValueError(
                f"max_request_sequences {self.max_request_sequences} exceeds max_sequences {self.max_sequences}: "
                "such a request could never be admitted"
            )
        for name in ("request_timeout", "grading_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if isinstance(self.sequence_cache, bool) or not isinstance(self.sequence_cache, int) or self.sequence_cache < 0:
            raise ValueError(f"sequence_cache must be a non-negative integer, got {self.sequence_cache!r}")
        if self.budget > self.max_budget:
            raise ValueError(f"the default budget {self.budget} exceeds max_budget {self.max_budget}")
        if not isinstance(self.options, Mapping):
            raise ValueError("options must be a mapping of option name to value")
        if not isinstance(self.engine_options, Mapping):
            raise ValueError("engine_options must be a mapping of option name to value")
        for name, preset in self.presets.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"preset name {name!r} may only hold letters, digits, '.', '_' and '-'")
            if preset.budget > self.max_budget:
                raise ValueError(f"preset {name!r} has budget {preset.budget} over max_budget {self.max_budget}")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def backend_options(self) -> dict[str, Any]:
        """``engine_options`` for loading the served model. An engine with a
        fixed number of cache slots (llama.cpp) that was given none gets
        enough for a request at ``max_budget`` (capped by
        ``piscale.api.MAX_AUTOMATIC_SLOTS``): the engine's own default of 16
        would turn away every request over a budget of 10."""
        from piscale.api import engine_options_for

        return engine_options_for(self.model, self.engine, self.device, self.engine_options, sequences=self.max_budget)

    def preset(self, name: str) -> Preset | None:
        """The preset a model-name suffix names, or None when it names none."""
        if name in self.presets:
            return self.presets[name]
        match = _PRESET.match(name)
        if match is None:
            return None
        return Preset(match["algorithm"], int(match["budget"]))

    def resolve_model(self, requested: str) -> Preset | None:
        """The preset a requested model name carries (None for the bare name);
        KeyError when the name is not served here."""
        if requested == self.model_name:
            return None
        base, colon, suffix = requested.rpartition(":")
        if colon and base == self.model_name:
            preset = self.preset(suffix)
            if preset is not None:
                return preset
        raise KeyError(requested)

    def with_overrides(self, **overrides: Any) -> ServerConfig:
        """A copy with the given fields replaced; None means "keep"."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


FIELD_NAMES = tuple(f.name for f in fields(ServerConfig))


def load_config(path: str | Path) -> ServerConfig:
    """A ``ServerConfig`` from a TOML or JSON file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"cannot read the config file {path}: {error.strerror or error}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"the config file {path} does not parse: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"the config file {path} must hold a table of settings")
    return config_from_mapping(data, where=str(path))


def config_from_mapping(data: Mapping[str, Any], where: str = "config") -> ServerConfig:
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(values) - set(FIELD_NAMES))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(FIELD_NAMES)}")
    presets = values.pop("presets", {}) or {}
    if not isinstance(presets, Mapping):
        raise ValueError(f"{where}: presets must be a table of named presets")
    values["presets"] = {name: Preset.from_mapping(name, p) for name, p in presets.items()}
    if "rewards" in values:
        rewards = values["rewards"]
        if isinstance(rewards, str) or not isinstance(rewards, (list, tuple)):
            raise ValueError(f"{where}: rewards must be a list of reward specs")
        values["rewards"] = tuple(str(r) for r in rewards)
    return ServerConfig(**values)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value
