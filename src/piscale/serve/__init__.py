"""``piscale serve``: an OpenAI-compatible server with inference-time scaling.

Clients speak the OpenAI API (chat and text completions, streaming, usage);
a request chooses a search with extra body fields or a model-name preset::

    client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "What is 12 * 7?"}],
        extra_body={"piscale": {"algorithm": "pf", "budget": 8, "reward": "judge"}},
    )
    client.chat.completions.create(model="smollm2-135m-instruct:pf-8", messages=...)

Without them (budget 1, no reward) the server is an ordinary completion
server over the backend protocol. Modules: ``config`` (settings, presets),
``schema`` (request bodies), ``plan`` (requests checked into plans),
``service`` (running plans), ``render`` (OpenAI-format responses),
``generation`` (plain generation, streaming, search), ``kept`` (sequences
kept for continuation), ``metered`` (per-request accounting), ``rewards``,
``metrics``, ``app`` (routes). See docs/serving.md.
"""

from __future__ import annotations

from piscale.serve.config import Preset, ServerConfig, load_config

__all__ = ["Preset", "ServerConfig", "create_app", "load_config"]


def create_app(config: ServerConfig, lm=None):
    """The FastAPI app (``piscale.serve.app.create_app``), imported on use."""
    from piscale.serve.app import create_app as build

    return build(config, lm)
