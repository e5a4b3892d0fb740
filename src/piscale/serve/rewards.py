"""The rewards a server offers, and a fresh instance of one per request.

A request names a reward by its spec (``piscale.rewards.from_spec``). Specs
that load models must be enabled when the server starts (its default reward
and ``ServerConfig.rewards``); specs of the kinds in ``CHEAP_REWARD_KINDS``
(a verifier against a given answer, the arithmetic checker) load nothing, so
any request may name them. ``judge`` alone means the served model judging
its own answers.

Rewards over language-model backends (judges, density ratios) are built anew
for every request over metered views of the shared backends: building one is
cheap, their memo of scores then belongs to one request only, and the tokens
they make a backend read are counted as that request's reward tokens. Rewards
that hold their own models (PRMs, embedding models) are built once and
shared; their tokens are the growth of their own usage counter over the
request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from piscale.lm.base import LanguageModel, Usage
from piscale.rewards.base import Reward
from piscale.serve.config import CHEAP_REWARD_KINDS, ServerConfig
from piscale.serve.errors import bad_request
from piscale.serve.metered import MeteredLM

# Rewards that hold a model of their own, loaded once and shared by all
# requests (a value head reads its own backbone, not the served policy's).
# The cheap kinds hold no model and no state, so a product of them and
# shared ones is shared too.
_SHARED_KINDS = ("prm", "embed", "value")


def term_kinds(spec: str) -> list[str]:
    """The kind of every term of a spec (one for a plain spec, several for a product)."""
    from piscale.rewards.spec import product_terms, term_kind

    return [term_kind(term) for term in product_terms(spec)]


@dataclass
class RequestReward:
    """A reward built for one request, and how to count its tokens."""

    reward: Reward | None
    views: list[MeteredLM] = field(default_factory=list)
    shared_usage: Usage | None = None
    shared_before: Usage | None = None

    @property
    def tokens(self) -> int:
        total = sum(view.tokens for view in self.views)
        if self.shared_usage is not None and self.shared_before is not None:
            spent = self.shared_usage.since(self.shared_before)
            total += spent.prefill_tokens + spent.generated_tokens + spent.scored_tokens
        return total

    def release_all(self) -> list[int]:
        busy: list[int] = []
        for view in self.views:
            busy += view.release_all()
        return busy


class RewardPool:
    def __init__(self, config: ServerConfig, policy: LanguageModel):
        self.config = config
        self.policy = policy
        self._backends: dict[str, LanguageModel] = {config.model: policy}
        self._shared: dict[str, Reward] = {}
        self.enabled = {self.normalize(config.reward), *(self.normalize(r) for r in config.rewards)} - {"none"}

    def normalize(self, spec: str) -> str:
        spec = spec.strip()
        return f"judge:{self.config.model}" if spec == "judge" else spec

    def check(self, spec: str) -> str:
        """The normalised spec; a 400 when this server does not offer it."""
        if not isinstance(spec, str) or not spec.strip():
            raise bad_request("reward must be a non-empty reward spec, or 'none'", param="reward")
        spec = self.normalize(spec)
        if spec == "none" or spec in self.enabled or all(k in CHEAP_REWARD_KINDS for k in term_kinds(spec)):
            return spec
        offered = ", ".join(sorted(self.enabled | {"none", "verify:ANSWER", "arith"}))
        raise bad_request(
            f"reward {spec!r} is not enabled on this server (it may load a model); offered: {offered}. "
            "Start the server with --allow-reward SPEC to offer it.",
            param="reward",
        )

    def preload(self) -> None:
        """Load every enabled reward's models now rather than at first use."""
        for spec in sorted(self.enabled):
            self.build(spec)

    def build(self, spec: str | None) -> RequestReward:
        """A reward for one request (``spec`` already checked)."""
        if spec is None or spec == "none":
            return RequestReward(None)
        from piscale.rewards import from_spec

        kinds = term_kinds(spec)
        if any(k in _SHARED_KINDS for k in kinds) and all(k in _SHARED_KINDS + CHEAP_REWARD_KINDS for k in kinds):
            reward = self._shared.get(spec)
            if reward is None:
                reward = from_spec(
                    spec, device=self._reward_device(), trust_remote_code=self.config.trust_remote_code
                )
                self._shared[spec] = reward
            usage = getattr(reward, "usage", None)
            if isinstance(usage, Usage):
                return RequestReward(reward, shared_usage=usage, shared_before=usage.snapshot())
            return RequestReward(reward)
        views: list[MeteredLM] = []

        def metered(model: str) -> LanguageModel:
            view = MeteredLM(self._backend(model))
            views.append(view)
            return view

        reward = from_spec(
            spec,
            policy=metered(self.config.model),
            policy_spec=self.config.model,
            device=self._reward_device(),
            load_lm=metered,
            trust_remote_code=self.config.trust_remote_code,
        )
        return RequestReward(reward, views)

    def _reward_device(self) -> str:
        """The configured device, else the served model's, else the CPU."""
        from piscale.api import reward_device

        return reward_device(self.config.device, self._backend(self.config.model))

    def _backend(self, spec: str) -> LanguageModel:
        backend = self._backends.get(spec)
        if backend is None:
            from piscale.lm import load

            backend = load(spec, engine=self.config.engine, device=self.config.device)
            self._backends[spec] = backend
        return backend

    async def close(self) -> None:
        for spec, backend in self._backends.items():
            if spec != self.config.model:
                await backend.close()
        for reward in self._shared.values():
            await reward.close()
