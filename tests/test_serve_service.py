"""The server's parts without a subprocess: configuration and presets,
batching across concurrent requests, chunked streaming, kept sequences, and
cancellation when a client goes away (a deliberately slow toy model served
in a thread)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from piscale.lm.toy import ToyLM
from piscale.serve import Preset, ServerConfig, create_app, load_config
from piscale.serve.gate import SequenceGate
from piscale.serve.schema import ChatRequest, CompletionRequest
from piscale.serve.service import Service
from test_serve_support import metrics, serve_in_thread


def chat_request(question: str, **fields) -> ChatRequest:
    return ChatRequest(model="toy", messages=[{"role": "user", "content": question}], **fields)


# -- configuration ------------------------------------------------------------------


def test_config_file_with_presets(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text(
        'model = "toy"\nmax-budget = 16\nrewards = ["arith"]\n'
        '[presets.careful]\nalgorithm = "pg"\nbudget = 8\noptions = { iterations = 2 }\n'
    )
    config = load_config(path)
    assert config.max_budget == 16 and config.rewards == ("arith",)
    assert config.resolve_model("toy") is None
    assert config.resolve_model("toy:careful") == Preset("pg", 8, None, {"iterations": 2})
    assert config.resolve_model("toy:bon-4") == Preset("bon", 4)
    for unknown in ("other", "toy:", "toy:careless", "other:pf-8"):
        with pytest.raises(KeyError):
            config.resolve_model(unknown)
    path.write_text('model = "toy"\nmax_budgte = 3\n')
    with pytest.raises(ValueError, match="max_budgte"):
        load_config(path)
    with pytest.raises(ValueError, match="over max_budget"):
        ServerConfig(max_budget=4, presets={"big": Preset("pf", 8)})
    with pytest.raises(ValueError, match="unknown algorithm"):
        Service(ServerConfig(model="toy", presets={"odd": Preset("magic", 2)}), ToyLM())


def test_llamacpp_slots_follow_max_budget_unless_given():
    """llama.cpp's default of 16 slots would leave room for budgets of 10 at
    most; the server sizes the engine for its largest request instead."""
    served = dict(model="model.gguf", engine="llamacpp")
    assert ServerConfig(**served).backend_options == {"max_sequences": 64}
    assert ServerConfig(**served, max_budget=20).backend_options == {"max_sequences": 22}
    assert ServerConfig(**served, max_budget=4).backend_options == {"max_sequences": 16}
    given = {"max_sequences": 128, "context_length": 512}
    assert ServerConfig(**served, engine_options=given).backend_options == given
    assert ServerConfig(model="model.gguf", engine="hf", engine_options={"dtype": "float32"}).backend_options == {
        "dtype": "float32"
    }


# -- batching -----------------------------------------------------------------------


async def test_concurrent_searches_share_engine_passes():
    """Eight particle-filtering requests at once: the same answers as one at
    a time, in fewer engine passes than the sum of theirs."""
    requests = [
        chat_request(f"What is {i} + {i}?", piscale={"algorithm": "pf", "budget": 8, "reward": "judge", "seed": i})
        for i in range(8)
    ]
    alone_texts, alone_passes = [], 0
    for request in requests:
        service = Service(ServerConfig(model="toy"), ToyLM())
        body = await service.complete(service.plan_chat(request))
        alone_texts.append(body["choices"][0]["message"]["content"])
        alone_passes += service.lm.usage.forward_passes
    service = Service(ServerConfig(model="toy"), ToyLM())
    bodies = await asyncio.gather(*(service.complete(service.plan_chat(r)) for r in requests))
    assert [b["choices"][0]["message"]["content"] for b in bodies] == alone_texts
    assert service.lm.usage.forward_passes < alone_passes / 2
    assert service.lm.usage.generated_tokens == sum(b["usage"]["completion_tokens"] for b in bodies)


# -- streaming ------------------------------------------------------------------------


async def collect(service: Service, request) -> list[dict]:
    plan = service.plan_completion(request) if isinstance(request, CompletionRequest) else service.plan_chat(request)
    events = [event async for event in service.stream(plan)]
    assert events[-1] == "data: [DONE]\n\n"
    return [json.loads(e[len("data: ") :]) for e in events[:-1]]


@pytest.mark.parametrize("include_stop", [False, True])
async def test_a_stop_string_split_across_streamed_chunks(include_stop):
    """One token per backend call: the stop string "1\\n\\nA" spans three
    calls; the streamed text is the unstreamed one, and no character of the
    stop string is sent when it is excluded."""
    prompt = "<|user|>\nWhat is 0?<|end|>\n<|assistant|>\n"
    fields = dict(model="toy", prompt=prompt, temperature=0.0, max_tokens=30, stop=["1\n\nA"], include_stop_str_in_output=include_stop)
    service = Service(ServerConfig(model="toy", stream_chunk_tokens=1), ToyLM())
    whole = await service.complete(service.plan_completion(CompletionRequest(**fields)))
    assert whole["choices"][0]["text"] == ("Add 1\n\nA" if include_stop else "Add ")
    chunks = await collect(service, CompletionRequest(**fields, stream=True))
    pieces = [c["choices"][0]["text"] for c in chunks]
    assert "".join(pieces) == whole["choices"][0]["text"]
    assert len(pieces) >= 3  # it did arrive in pieces
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"][0]["stop_reason"] == "1\n\nA"


async def test_streaming_several_choices_in_chunks_matches_greedy():
    service = Service(ServerConfig(model="toy", stream_chunk_tokens=2), ToyLM())
    request = dict(temperature=0.0, n=2, max_tokens=40)
    whole = await service.complete(service.plan_chat(chat_request("What is 2?", **request)))
    chunks = await collect(service, chat_request("What is 2?", **request, stream=True))
    for index in range(2):
        text = "".join(
            choice["delta"].get("content") or "" for c in chunks for choice in c["choices"] if choice["index"] == index
        )
        assert text == whole["choices"][index]["message"]["content"]


# -- kept sequences -----------------------------------------------------------------------


async def test_continuing_a_finished_sequence_forks_it():
    toy = ToyLM()
    service = Service(ServerConfig(model="toy"), toy)
    prompt = toy.prompt_ids("What is 3?")
    first = await service.complete(
        service.plan_completion(CompletionRequest(model="toy", prompt=prompt, seed=1, max_tokens=10, stop=["\n\n"],
                                                  include_stop_str_in_output=True, return_token_ids=True))
    )
    generated = first["choices"][0]["token_ids"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    prefilled = toy.usage.prefill_tokens
    follow = CompletionRequest(model="toy", prompt=prompt + generated, seed=2, max_tokens=10)
    second = await service.complete(service.plan_completion(follow))
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == len(prompt) + len(generated)
    assert toy.usage.prefill_tokens == prefilled  # nothing was read again
    fresh = Service(ServerConfig(model="toy", sequence_cache=0), ToyLM())
    assert (await fresh.complete(fresh.plan_completion(follow)))["choices"][0]["text"] == second["choices"][0]["text"]


async def test_identical_prompts_arriving_together_share_one_prefill():
    toy = ToyLM()
    service = Service(ServerConfig(model="toy"), toy)
    prompt = toy.prompt_ids("What is 5?")
    requests = [CompletionRequest(model="toy", prompt=prompt, seed=s, max_tokens=5) for s in range(6)]
    bodies = await asyncio.gather(*(service.complete(service.plan_completion(r)) for r in requests))
    assert toy.usage.prefill_tokens == len(prompt)
    assert sorted(b["usage"]["prompt_tokens_details"]["cached_tokens"] for b in bodies) == [0] + [len(prompt)] * 5
    assert toy.live_sequences == len(service.kept)


# -- cancellation -------------------------------------------------------------------------


class SlowToy(ToyLM):
    """The toy model with a pause before every step."""

    pause = 0.3

    async def extend(self, handles, params, seeds=None):
        await asyncio.sleep(self.pause)
        return await super().extend(handles, params, seeds)


def wait_for_metric(base: str, name: str, value: float, deadline_s: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + deadline_s
    while True:
        current = metrics(base)
        if current.get(name) == value or time.monotonic() > deadline:
            return current
        time.sleep(0.05)


def test_a_client_that_goes_away_cancels_its_request():
    app = create_app(ServerConfig(model="toy"), SlowToy())
    scaled = {"piscale": {"algorithm": "pf", "budget": 8, "reward": "judge", "seed": 0, "progress": True}}
    body = {"model": "toy", "messages": [{"role": "user", "content": "What is 1?"}], **scaled}
    with serve_in_thread(app) as base:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/chat/completions", json=body, timeout=0.5)
        after = wait_for_metric(base, "piscale_requests_cancelled_total", 1)
        assert after["piscale_requests_cancelled_total"] == 1
        assert after["piscale_engine_live_sequences"] == after["piscale_kept_sequences"]
        with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}, timeout=30) as response:
            for line in response.iter_lines():
                if "piscale_progress" in line:
                    break  # one progress event, then hang up
        after = wait_for_metric(base, "piscale_requests_cancelled_total", 2)
        assert after["piscale_requests_cancelled_total"] == 2
        assert after["piscale_engine_live_sequences"] == after["piscale_kept_sequences"]
        assert after["piscale_requests_in_flight"] == 0
        quick = httpx.post(base + "/v1/chat/completions", json={"model": "toy", "messages": body["messages"], "seed": 1}, timeout=30)
        assert quick.status_code == 200


# -- engine capacity ------------------------------------------------------------------------


async def test_the_gate_admits_in_arrival_order_within_the_limit():
    gate = SequenceGate(5)
    order: list[str] = []

    async def hold(name: str, need: int, seconds: float) -> None:
        async with gate.admitted(need):
            order.append(f"+{name}")
            assert gate.in_use <= 5
            await asyncio.sleep(seconds)
        order.append(f"-{name}")

    big = asyncio.ensure_future(hold("big", 4, 0.05))
    await asyncio.sleep(0)
    waiting = [asyncio.ensure_future(hold("wide", 5, 0.01)), asyncio.ensure_future(hold("small", 1, 0.01))]
    await asyncio.sleep(0)
    assert gate.waiting == 2  # "small" would fit now, but waits its turn behind "wide"
    abandoned = asyncio.ensure_future(hold("abandoned", 2, 0.01))
    await asyncio.sleep(0)
    abandoned.cancel()
    await asyncio.gather(big, *waiting)
    assert order == ["+big", "-big", "+wide", "-wide", "+small", "-small"]
    assert gate.in_use == 0 and gate.waiting == 0
    with pytest.raises(ValueError, match="more than the 5"):
        async with gate.admitted(6):
            pass


class SlottedToy(ToyLM):
    """The toy model declaring a fixed number of cache slots, as llama.cpp
    does, and remembering how many sequences it ever held at once."""

    max_sequences = 16

    def __init__(self):
        super().__init__()
        self.peak = 0

    async def extend(self, handles, params, seeds=None):
        self.peak = max(self.peak, self.live_sequences)
        return await super().extend(handles, params, seeds)


async def test_requests_wait_for_engine_capacity():
    requests = [
        chat_request(f"What is {i} + 3?", piscale={"algorithm": "pf", "budget": 4, "reward": "judge", "seed": i})
        for i in range(5)
    ]
    alone = []
    for request in requests:
        solo = Service(ServerConfig(model="toy"), ToyLM())
        alone.append((await solo.complete(solo.plan_chat(request)))["choices"][0]["message"]["content"])
    toy = SlottedToy()
    service = Service(ServerConfig(model="toy"), toy)
    assert service.gate.limit == 16 - 4 - 2 and service.kept.capacity == 4
    bodies = await asyncio.gather(*(service.complete(service.plan_chat(r)) for r in requests))
    assert [b["choices"][0]["message"]["content"] for b in bodies] == alone
    # Two requests of 4 particles fit under the limit of 10; five at once
    # would have held at least 20 sequences at their first step.
    assert toy.peak <= 2 * (2 * 4 - 1)
    from piscale.serve.errors import APIError

    with pytest.raises(APIError, match="more than the 10"):
        service.plan_chat(chat_request("What is 1?", piscale={"budget": 12, "reward": "judge"}))
