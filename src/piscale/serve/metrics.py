"""Counters for ``GET /metrics``, in the Prometheus text exposition format.

The server's own counters (requests by endpoint and status, tokens by kind,
latency, cancellations, timeouts) live in a ``Metrics`` object on the app;
the engine's counters (``piscale.lm.base.Usage`` of the shared backend) and
the kept-sequence store are read when the page is scraped. Every counter only
grows, so rates and per-request differences can be taken by the scraper.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from piscale.lm.base import LanguageModel

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass
class Metrics:
    requests: dict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))
    """(endpoint, status) -> count."""
    searches: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """algorithm -> scaled requests."""
    in_flight: int = 0
    cancelled: int = 0
    timed_out: int = 0
    turned_away: int = 0
    """requests answered 413 or 429 by a limit."""
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    reward_tokens: int = 0
    latency_buckets: dict[str, list[int]] = field(default_factory=dict)
    latency_sum: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    latency_count: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[(endpoint, status)] += 1
        buckets = self.latency_buckets.setdefault(endpoint, [0] * len(LATENCY_BUCKETS))
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                buckets[i] += 1
        self.latency_sum[endpoint] += seconds
        self.latency_count[endpoint] += 1

    def count_usage(self, usage: dict) -> None:
        self.prompt_tokens += int(usage.get("prompt_tokens", 0))
        self.cached_prompt_tokens += int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
        self.completion_tokens += int(usage.get("completion_tokens", 0))
        self.reward_tokens += int(usage.get("reward_tokens", 0))

    def render(self, lm: LanguageModel, extra: list[tuple[str, str, str, float]] = ()) -> str:  # type: ignore[assignment]
        """The page; ``extra`` adds (name, type, help, value) samples."""
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{labels} {_number(value)}")

        metric(
            "piscale_requests_total", "counter", "HTTP requests answered, by endpoint and status.",
            [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())],
        )
        metric("piscale_requests_in_flight", "gauge", "Requests being worked on.", [("", self.in_flight)])
        metric("piscale_requests_cancelled_total", "counter", "Requests stopped because the client went away.", [("", self.cancelled)])
        metric("piscale_requests_timed_out_total", "counter", "Requests stopped by their timeout.", [("", self.timed_out)])
        metric("piscale_requests_turned_away_total", "counter", "Requests refused by a limit (413 or 429).", [("", self.turned_away)])
        metric(
            "piscale_search_requests_total", "counter", "Requests answered by a search, by algorithm.",
            [(f'{{algorithm="{a}"}}', n) for a, n in sorted(self.searches.items())],
        )
        metric("piscale_prompt_tokens_total", "counter", "Prompt tokens of all requests (usage.prompt_tokens).", [("", self.prompt_tokens)])
        metric("piscale_cached_prompt_tokens_total", "counter", "Prompt tokens served from kept sequences.", [("", self.cached_prompt_tokens)])
        metric("piscale_completion_tokens_total", "counter", "Tokens generated for all particles of all requests.", [("", self.completion_tokens)])
        metric("piscale_reward_tokens_total", "counter", "Tokens read or written by reward models.", [("", self.reward_tokens)])
        lines.append("# HELP piscale_request_duration_seconds Request latency, by endpoint.")
        lines.append("# TYPE piscale_request_duration_seconds histogram")
        for endpoint, buckets in sorted(self.latency_buckets.items()):
            for bound, count in zip(LATENCY_BUCKETS, buckets):
                lines.append(f'piscale_request_duration_seconds_bucket{{endpoint="{endpoint}",le="{bound}"}} {count}')
            lines.append(f'piscale_request_duration_seconds_bucket{{endpoint="{endpoint}",le="+Inf"}} {self.latency_count[endpoint]}')
            lines.append(f'piscale_request_duration_seconds_sum{{endpoint="{endpoint}"}} {_number(self.latency_sum[endpoint])}')
            lines.append(f'piscale_request_duration_seconds_count{{endpoint="{endpoint}"}} {self.latency_count[endpoint]}')
        usage = lm.usage
        for name, help_text, value in (
            ("prefill_tokens", "Tokens the engine read in prefill passes.", usage.prefill_tokens),
            ("generated_tokens", "Tokens the engine generated.", usage.generated_tokens),
            ("scored_tokens", "Tokens the engine read to score continuations.", usage.scored_tokens),
            ("forward_passes", "Engine forward passes (shared by every sequence in a batch).", usage.forward_passes),
            ("calls", "Calls into the engine.", usage.calls),
        ):
            metric(f"piscale_engine_{name}_total", "counter", help_text, [("", value)])
        metric("piscale_engine_compute_seconds_total", "counter", "Seconds spent in engine compute.", [("", usage.wall_time)])
        live = lm.live_sequences
        if live is not None:
            metric("piscale_engine_live_sequences", "gauge", "Sequences the engine holds (kept ones included).", [("", live)])
        for name, kind, help_text, value in extra:
            metric(name, kind, help_text, [("", value)])
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def parse_metrics(text: str) -> dict[str, float]:
    """``{"name{labels}": value}`` of a metrics page (for tests and benchmarks)."""
    values = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        values[name] = float(value)
    return values
