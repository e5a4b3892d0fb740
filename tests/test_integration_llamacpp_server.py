"""The OpenAI backend against a real third-party server: llama-cpp-python's
OpenAI-compatible server running the default GGUF model in a subprocess.

This server takes text prompts only (no token ids), tokenizes at
``/extras/tokenize``, and returns token strings rather than ids, so
``OpenAILM`` runs with ``prompt_format="text"`` and the model's own tokenizer
read from the GGUF file. Its greedy steps are checked against the native
llama.cpp engine on the same file. Scoring is not tested here: this server's
echoed prompt log-probabilities score each token with the logits of its own
position instead of the previous one (one position late), so rewards that
score continuations need another server (llama.cpp's ``llama-server``, vLLM,
SGLang, ``piscale serve``). Run with ``make test-integration``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator

import pytest

from piscale.lm.base import StepParams
from test_serve_support import free_port, server_subprocess

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("sse_starlette") is None,
        reason="llama-cpp-python[server] is not installed (make test-integration installs it)",
    ),
]

QUESTION = "What is 12 times 7? Answer in one short sentence."


@contextlib.contextmanager
def llama_cpp_server(model_path: str, alias: str, startup_s: float = 180.0) -> Iterator[str]:
    """``python -m llama_cpp.server`` on a free loopback port; yields its /v1 URL."""
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", model_path, "--model_alias", alias,
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--logits_all", "true",
        "--flash_attn", "true", "--n_threads", str(min(2, os.cpu_count() or 1)),
    ]
    with server_subprocess(command, f"http://127.0.0.1:{port}/v1", probe="/models", startup_s=startup_s) as base:
        yield base


@pytest.fixture(scope="module")
def server(small_model_path) -> Iterator[str]:
    with llama_cpp_server(str(small_model_path), "smollm2") as base:
        yield base


@pytest.fixture
def remote(server, small_model_path):
    from piscale.lm.openai import OpenAILM

    return OpenAILM(
        "smollm2", server, tokenizer=str(small_model_path), prompt_format="text", context_length=2048, max_retries=1
    )


@pytest.fixture(scope="module")
def local(small_model_path):
    from piscale.lm.llamacpp import LlamaCppLM

    # The server reads a prompt in one batch; so does this engine with a large
    # prefill chunk, so both take the same kernels and agree to rounding.
    engine = LlamaCppLM(small_model_path, context_length=2048, max_sequences=8, prefill_chunk=512)
    yield engine
    asyncio.run(engine.close())


async def test_greedy_steps_through_the_server_equal_the_native_engine(remote, local):
    prompt = local.chat([{"role": "user", "content": QUESTION}])
    assert remote.chat([{"role": "user", "content": QUESTION}]) == prompt
    greedy = StepParams(max_tokens=24, stop=("\n\n",), temperature=0.0)
    [[here]] = await local.open([prompt])
    [[there]] = await remote.open([prompt])
    for _ in range(2):  # two steps: the second continues a prefix the server has cached
        [mine] = await local.extend([here], greedy)
        [theirs] = await remote.extend([there], greedy)
        assert theirs.text == mine.text
        assert theirs.finish_reason == mine.finish_reason
        assert len(theirs.logprobs) == len(theirs.token_ids) > 0
        gaps = [abs(a - b) for a, b in zip(theirs.logprobs, mine.logprobs)]
        assert max(gaps) < 1e-3, [(round(a, 3), round(b, 3)) for a, b in zip(theirs.logprobs, mine.logprobs)]
        if mine.finish_reason != "stop":
            break
    local.release([here])
    remote.release([there])


async def test_particle_filtering_runs_end_to_end_against_the_server(remote):
    from piscale.rewards import from_spec
    from piscale.search import run

    reward = from_spec("arith", policy=remote, policy_spec="smollm2")
    result = await run(remote, reward, QUESTION, "pf", budget=4, seed=0, max_tokens=64, max_step_tokens=32)
    assert len(result.candidates) == 4
    assert all(candidate["text"] for candidate in result.to_dict()["candidates"])
    assert result.usage["generated_tokens"] > 0
    assert remote.failures == []
