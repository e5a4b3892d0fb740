"""``piscale serve --model toy`` in a subprocess, driven by the official
``openai`` client: every answer is checked against the exact toy model (or
the search library) run directly with the same seeds, and every usage count
against the engine's own counters."""

from __future__ import annotations

import asyncio
import json
import sys

import httpx
import openai
import pytest

from piscale import search
from piscale.lm.toy import ToyLM
from piscale.rewards.judge import LLMJudge
from piscale.search import DEFAULT_SYSTEM_PROMPT
from test_serve_support import metrics, serve_subprocess, toy_plain

MAX_BUDGET = 32


@pytest.fixture(scope="module")
def base():
    with serve_subprocess("--model", "toy", "--max-budget", str(MAX_BUDGET)) as url:
        yield url


@pytest.fixture
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def chat(question: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]


def first_seed(prompt: list[int], finish: str, **kwargs) -> tuple[int, object]:
    """The smallest seed whose toy step ends with ``finish``."""
    for seed in range(200):
        output = toy_plain(prompt, seed, **kwargs)
        if output.finish_reason == finish:
            return seed, output
    raise AssertionError(f"no seed below 200 ends with {finish}")


# -- plain generation ------------------------------------------------------------


def test_chat_is_the_engine_step_with_the_same_seed(client):
    messages = chat("What is 2 + 2?")
    prompt = ToyLM().chat(messages)
    expected = toy_plain(prompt, 7, max_tokens=30)
    response = client.chat.completions.create(model="toy", messages=messages, seed=7, max_tokens=30)
    [choice] = response.choices
    assert choice.message.content == expected.text
    assert choice.finish_reason == ("stop" if expected.finish_reason == "eos" else "length")
    assert response.usage.prompt_tokens == len(prompt)
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.usage.total_tokens == len(prompt) + len(expected.token_ids)


def test_completion_stop_strings_and_logprobs(client):
    text = "<|user|>\nWhat is 5?<|end|>\n<|assistant|>\n"
    prompt = ToyLM().encode(text)
    seed, expected = first_seed(prompt, "stop", max_tokens=16, stop=("\n\n",))
    assert expected.text.endswith("\n\n")
    cut = client.completions.create(model="toy", prompt=text, seed=seed, max_tokens=16, stop=["\n\n"], logprobs=1)
    [choice] = cut.choices
    assert choice.text == expected.text[:-2]
    assert choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == "\n\n"
    assert choice.logprobs.token_logprobs == pytest.approx(expected.logprobs)
    kept = client.completions.create(
        model="toy", prompt=text, seed=seed, max_tokens=16, stop=["\n\n"],
        extra_body={"include_stop_str_in_output": True, "return_token_ids": True},
    )
    assert kept.choices[0].text == expected.text
    assert kept.choices[0].model_extra["token_ids"] == expected.token_ids


def test_token_id_prompts_echo_and_prompt_logprobs(client):
    toy = ToyLM()
    context = toy.chat(chat("What is 1 + 1?"))
    answer = toy.encode("Add 2\n\nAdd 1\n\n")
    response = client.completions.create(
        model="toy", prompt=context + answer, max_tokens=0, echo=True, logprobs=1,
        extra_body={"logprob_start_len": len(context)},
    )
    [choice] = response.choices
    assert choice.text == toy.decode(context + answer)
    [exact] = asyncio.run(toy.score([context], [answer]))
    values = choice.logprobs.token_logprobs
    assert values[: len(context)] == [None] * len(context)
    assert values[len(context) :] == pytest.approx(exact.logprobs)
    assert response.usage.completion_tokens == 0
    assert response.usage.prompt_tokens == len(context) + len(answer)


def test_continue_final_message_and_chat_echo(client):
    messages = chat("What is 3 + 3?") + [{"role": "assistant", "content": "Add 2\n\n"}]
    prompt = ToyLM().chat(messages, add_generation_prompt=False, continue_final_message=True)
    expected = toy_plain(prompt, 4, max_tokens=30)
    response = client.chat.completions.create(
        model="toy", messages=messages, seed=4, max_tokens=30,
        extra_body={"continue_final_message": True, "add_generation_prompt": False, "echo": True},
    )
    assert response.choices[0].message.content == "Add 2\n\n" + expected.text
    assert response.usage.prompt_tokens == len(prompt)


def test_n_choices_use_derived_seeds(client):
    from piscale.serve.generation import derive_seed

    messages = chat("What is 4 + 4?")
    prompt = ToyLM().chat(messages)
    response = client.chat.completions.create(model="toy", messages=messages, seed=21, n=3, max_tokens=20)
    assert [c.index for c in response.choices] == [0, 1, 2]
    for j, choice in enumerate(response.choices):
        assert choice.message.content == toy_plain(prompt, derive_seed(21, j), max_tokens=20).text


def test_streamed_chat_equals_the_unstreamed_answer(client):
    messages = chat("What is 6 + 1?")
    whole = client.chat.completions.create(model="toy", messages=messages, seed=5, max_tokens=40)
    chunks = list(
        client.chat.completions.create(
            model="toy", messages=messages, seed=5, max_tokens=40, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


# -- search ------------------------------------------------------------------------


def test_particle_filtering_equals_the_library_run(client):
    question = "What is 3 + 4?"
    response = client.chat.completions.create(
        model="toy", messages=chat(question, DEFAULT_SYSTEM_PROMPT),
        extra_body={"piscale": {"algorithm": "pf", "budget": 6, "reward": "judge", "seed": 11, "candidates": True}},
    )
    local = ToyLM()
    before = local.usage.snapshot()
    result = asyncio.run(search.run(local, LLMJudge(local), question, "pf", 6, 11))
    scored = local.usage.since(before).scored_tokens
    assert response.choices[0].message.content == result.text
    assert response.usage.completion_tokens == result.usage["generated_tokens"]
    assert response.usage.prompt_tokens == result.usage["prompt_tokens"]
    assert response.usage.model_extra["reward_tokens"] == scored > 0
    [summary] = response.model_extra["piscale"]["searches"]
    assert summary["answer"] == result.answer
    assert [c["text"] for c in summary["candidates"]] == [c.text for c in result.candidates]


def test_preset_model_name_is_the_same_search(client):
    messages = chat("What is 9 + 0?")
    by_name = client.chat.completions.create(model="toy:pf-4", messages=messages, extra_body={"piscale": {"seed": 3}})
    by_fields = client.chat.completions.create(
        model="toy", messages=messages, extra_body={"algorithm": "pf", "budget": 4, "piscale": {"seed": 3}}
    )
    assert by_name.choices[0].message.content == by_fields.choices[0].message.content
    assert by_name.usage.completion_tokens == by_fields.usage.completion_tokens
    assert by_name.model_extra["piscale"]["searches"][0]["budget"] == 4


def test_streamed_search_sends_progress_then_the_answer(client):
    messages = chat("What is 2 + 5?")
    scaled = {"piscale": {"algorithm": "pf", "budget": 5, "reward": "judge", "seed": 8, "progress": True}}
    whole = client.chat.completions.create(model="toy", messages=messages, extra_body=scaled)
    chunks = list(
        client.chat.completions.create(
            model="toy", messages=messages, extra_body=scaled, stream=True, stream_options={"include_usage": True}
        )
    )
    progress = [c.model_extra["piscale_progress"] for c in chunks if "piscale_progress" in (c.model_extra or {})]
    steps = [p["step"] for p in progress]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 1
    assert all(p["particles"] == 5 and 0 < p["ess"] <= 5 for p in progress)
    assert progress[-1]["finished"] == 5
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_self_consistency_needs_no_reward(client):
    response = client.chat.completions.create(
        model="toy", messages=chat("What is 1 + 4?"), extra_body={"algorithm": "sc", "budget": 6, "piscale": {"seed": 1}}
    )
    summary = response.model_extra["piscale"]["searches"][0]
    assert summary["reward"] is None
    assert response.usage.model_extra["reward_tokens"] == 0
    assert response.usage.completion_tokens > 0


def test_usage_equals_what_the_engine_counted(base, client):
    before = metrics(base)
    response = client.chat.completions.create(
        model="toy", messages=chat("What is 7 + 7?"),
        extra_body={"piscale": {"algorithm": "pf", "budget": 8, "reward": "judge", "seed": 2}},
    )
    after = metrics(base)

    def grew(name: str) -> float:
        return after[name] - before[name]

    usage = response.usage
    assert grew("piscale_engine_generated_tokens_total") == usage.completion_tokens
    assert grew("piscale_engine_prefill_tokens_total") == usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens
    assert grew("piscale_engine_scored_tokens_total") == usage.model_extra["reward_tokens"]
    assert grew("piscale_completion_tokens_total") == usage.completion_tokens
    assert grew('piscale_search_requests_total{algorithm="pf"}') == 1
    assert after["piscale_engine_live_sequences"] == after["piscale_kept_sequences"]


# -- bad input -------------------------------------------------------------------------


GOOD = {"model": "toy", "messages": [{"role": "user", "content": "What is 1 + 2?"}]}

BAD_CHAT = [
    ("unknown model", {**GOOD, "model": "gpt-4"}, 404),
    ("unknown preset", {**GOOD, "model": "toy:fastest"}, 404),
    ("unknown algorithm", {**GOOD, "algorithm": "magic", "budget": 4}, 400),
    ("budget zero", {**GOOD, "budget": 0}, 400),
    ("budget over the maximum", {**GOOD, "budget": MAX_BUDGET + 1}, 400),
    ("budget not a number", {**GOOD, "piscale": {"budget": "many"}}, 400),
    ("negative max_tokens", {**GOOD, "max_tokens": -1}, 400),
    ("max_tokens over the maximum", {**GOOD, "max_tokens": 100_000}, 400),
    ("prompt longer than the context", {**GOOD, "messages": [{"role": "user", "content": "a" * 5000}]}, 400),
    ("unknown option", {**GOOD, "budget": 4, "options": {"bogus": 1}}, 400),
    ("reward not enabled", {**GOOD, "budget": 4, "reward": "prm:some/model"}, 400),
    ("stop with a search", {**GOOD, "budget": 4, "stop": ["x"]}, 400),
    ("temperature out of range", {**GOOD, "temperature": 7}, 400),
    ("no messages", {"model": "toy", "messages": []}, 400),
    ("unknown role", {**GOOD, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("conflicting budgets", {**GOOD, "budget": 4, "piscale": {"budget": 8}}, 400),
]


@pytest.mark.parametrize("case,body,status", BAD_CHAT, ids=[c[0] for c in BAD_CHAT])
def test_bad_chat_requests_get_openai_errors(base, case, body, status):
    response = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]


def test_bad_completion_requests(base):
    post = lambda body: httpx.post(base + "/v1/completions", json={"model": "toy", **body}, timeout=30)  # noqa: E731
    assert post({"prompt": [1, 2, 10**9]}).status_code == 400  # token id outside the vocabulary
    assert post({"prompt": [5] * 5000}).json()["error"]["code"] == "context_length_exceeded"
    assert post({"prompt": "hi", "max_tokens": 0}).status_code == 400  # 0 only with echo
    assert post({"prompt": []}).status_code == 400


def test_malformed_json_and_unknown_routes(base):
    broken = httpx.post(
        base + "/v1/chat/completions", content=b'{"model": "toy", "messages": [', headers={"content-type": "application/json"}
    )
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]["message"]
    assert httpx.post(base + "/v1/completions", content=b"[1, 2]").status_code == 400
    missing = httpx.get(base + "/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["type"]
    assert httpx.get(base + "/v1/chat/completions").status_code == 405


def test_the_openai_client_raises_the_matching_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=chat("hi"))
    with pytest.raises(openai.BadRequestError, match="budget"):
        client.chat.completions.create(model="toy", messages=chat("hi"), extra_body={"budget": 10_000})


def test_timeout_returns_408_and_frees_everything(base, client):
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(
            model="toy", messages=chat("What is 8 + 8?"),
            extra_body={"piscale": {"algorithm": "pf", "budget": MAX_BUDGET, "reward": "judge", "timeout": 1e-6}},
        )
    assert raised.value.status_code == 408
    after = metrics(base)
    assert after["piscale_requests_timed_out_total"] >= 1
    assert after["piscale_engine_live_sequences"] == after["piscale_kept_sequences"]


async def test_bad_requests_do_not_disturb_requests_in_flight(base):
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    good = [
        dict(model="toy", messages=chat(f"What is {i} + 1?"), seed=i, max_tokens=30) for i in range(4)
    ] + [
        dict(model="toy", messages=chat(f"What is {i} + 2?"), extra_body={"piscale": {"budget": 6, "reward": "judge", "seed": i}})
        for i in range(4)
    ]
    alone = [(await client.chat.completions.create(**kwargs)).choices[0].message.content for kwargs in good]
    bad = [
        dict(model="toy", messages=chat("x"), extra_body={"budget": 0}),
        dict(model="missing", messages=chat("x")),
        dict(model="toy", messages=chat("a" * 5000)),
        dict(model="toy", messages=chat("x"), max_tokens=-5),
    ]
    outcomes = await asyncio.gather(
        *(client.chat.completions.create(**kwargs) for kwargs in [*good, *bad]), return_exceptions=True
    )
    assert [o.choices[0].message.content for o in outcomes[: len(good)]] == alone
    assert [o.status_code for o in outcomes[len(good) :]] == [400, 404, 400, 400]
    assert httpx.get(base + "/health").status_code == 200
    await client.close()


def test_models_and_health(base, client):
    [model] = client.models.list().data
    assert model.id == "toy" and model.model_extra["max_model_len"] == 4096
    assert httpx.get(base + "/health").json()["status"] == "ok"
    text = httpx.get(base + "/metrics").text
    assert "# TYPE piscale_requests_total counter" in text


# -- authentication --------------------------------------------------------------------


def test_api_key_and_config_file(tmp_path):
    config = tmp_path / "serve.toml"
    config.write_text('model = "toy"\nmax_budget = 6\n[presets.wide]\nalgorithm = "bon"\nbudget = 6\nreward = "verify:6"\n')
    with serve_subprocess("--config", str(config), env={"PISCALE_API_KEY": "sesame"}) as url:
        messages = chat("What is 2 + 3?")
        anonymous = httpx.post(url + "/v1/chat/completions", json={"model": "toy", "messages": messages})
        assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "missing_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
                model="toy", messages=messages
            )
        allowed = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        assert allowed.chat.completions.create(model="toy", messages=messages, seed=1).choices[0].message.content
        assert [m.id for m in allowed.models.list().data] == ["toy", "toy:wide"]
        wide = allowed.chat.completions.create(model="toy:wide", messages=messages, extra_body={"piscale": {"seed": 0}})
        summary = wide.model_extra["piscale"]["searches"][0]
        assert (summary["algorithm"], summary["budget"], summary["reward"]) == ("bon", 6, "verify:6")
        with pytest.raises(openai.BadRequestError, match="maximum of 6"):
            allowed.chat.completions.create(model="toy", messages=messages, extra_body={"budget": 7})
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/metrics").status_code == 200
        assert json.loads(httpx.post(url + "/tokenize", json={"prompt": "hi"}).text)["error"]["code"] == "missing_api_key"


def test_a_server_that_exits_at_startup_fails_with_its_log():
    from piscale.serve.process import free_port, server_process

    command = [sys.executable, "-c", "import sys; sys.stderr.write('no model here'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match=r"status 3:\nno model here"):
        with server_process(command, f"http://127.0.0.1:{free_port()}/health", startup_s=30):
            pass
