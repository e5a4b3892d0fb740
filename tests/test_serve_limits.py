"""What no request can do to a server: fail the requests beside it, stall
the event loop, make it hold unbounded work, or get an internal error's text.
Each test sends the hostile input next to good requests and checks that the
good ones get exactly what they get alone."""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time

import httpx
import pytest

from piscale.lm.toy import EOS, ToyLM
from piscale.serve import ServerConfig, create_app
from test_serve_support import metrics, serve_in_thread, serve_subprocess


STALLING = "10^{10^{10}}"
"""An answer math-verify spends seconds parsing (5 s, its own limit, on this machine)."""

GRADING_LIMIT = 3.0
"""The time limit of the tests' grading: under the stalling answer's 5 s, and
far over an ordinary comparison's 0.1 s even on a heavily shared CPU (at a
load average of 6 to 10, limits of 1 and 2 s failed these tests)."""


@pytest.fixture(scope="module")
def base():
    with serve_subprocess(
        "--model", "toy", "--max-budget", "16", "--max-body-bytes", "65536", "--max-request-sequences", "64"
    ) as url:
        yield url


def chat_body(question: str, **fields) -> dict:
    return {"model": "toy", "messages": [{"role": "user", "content": question}], **fields}


def post_raw(base: str, path: str, content: bytes | str) -> httpx.Response:
    return httpx.post(base + path, content=content, headers={"content-type": "application/json"}, timeout=60)


# -- one bad request among good ones ------------------------------------------------------


GOOD = [
    chat_body("What is 1 + 1?", seed=1, max_tokens=20),
    chat_body("What is 2 + 2?", seed=2, max_tokens=20),
    chat_body("What is 3 + 3?", piscale={"algorithm": "pf", "budget": 4, "reward": "judge", "seed": 3}),
]


async def test_a_nan_request_beside_three_good_ones(base):
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        alone = [(await client.post("/v1/chat/completions", json=body)).json() for body in GOOD]
        nan_options = json.dumps(chat_body("What is 4 + 4?", budget=4, reward="judge")).replace(
            '"reward"', '"options": {"temperature": NaN}, "reward"'
        )
        nan_top = json.dumps(chat_body("What is 5 + 5?", seed=5)).replace('"seed"', '"temperature": NaN, "seed"')
        headers = {"content-type": "application/json"}
        outcomes = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body) for body in GOOD),
            client.post("/v1/chat/completions", content=nan_options, headers=headers),
            client.post("/v1/chat/completions", content=nan_top, headers=headers),
        )
    assert [o.status_code for o in outcomes] == [200, 200, 200, 400, 400]
    contents = [o.json()["choices"][0]["message"]["content"] for o in outcomes[:3]]
    assert contents == [a["choices"][0]["message"]["content"] for a in alone]
    for bad in outcomes[3:]:
        assert "NaN" in bad.json()["error"]["message"]


@pytest.mark.parametrize(
    "field,value",
    [("budget", "8"), ("budget", True), ("stream", "yes"), ("seed", "1"), ("temperature", "0.5"), ("n", 1.5), ("max_tokens", False)],
)
def test_fields_of_the_wrong_type_are_rejected_not_converted(base, field, value):
    response = httpx.post(base + "/v1/chat/completions", json=chat_body("hi", **{field: value}), timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


def test_search_options_must_be_finite(base):
    for options in ('{"temperature": Infinity}', '{"softmax_temperature": -Infinity}', '{"ess_threshold": NaN}'):
        body = json.dumps(chat_body("hi", budget=4, reward="judge")).replace('"reward"', f'"options": {options}, "reward"')
        response = post_raw(base, "/v1/chat/completions", body)
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


# -- malformed bodies ---------------------------------------------------------------------


def test_malformed_bodies_get_clean_400s(base):
    deep = "[" * 5000 + "]" * 5000
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"):
        for body in (deep, "[1]", '"text"', "1e999999", '{"model": "toy", "options": ' + "{\"a\": " * 100 + "1" + "}" * 101):
            response = post_raw(base, path, body)
            assert response.status_code == 400, (path, body[:20], response.text[:200])
            assert response.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(base + "/health").status_code == 200


def test_an_internal_failure_tells_the_client_nothing_of_it():
    class Broken(ToyLM):
        async def extend(self, handles, params, seeds=None):
            raise RuntimeError("secret internal detail at /srv/piscale/engine.py line 12")

    with serve_in_thread(create_app(ServerConfig(model="toy"), Broken())) as url:
        plain = httpx.post(url + "/v1/chat/completions", json=chat_body("hi", seed=1), timeout=30)
        assert plain.status_code == 500
        assert "secret" not in plain.text and "RuntimeError" not in plain.text
        assert plain.json()["error"]["type"] == "server_error" and "see the server log" in plain.json()["error"]["message"]
        streamed = httpx.post(url + "/v1/chat/completions", json=chat_body("hi", seed=1, stream=True), timeout=30)
        assert "secret" not in streamed.text and "RuntimeError" not in streamed.text
        assert '"server_error"' in streamed.text


# -- limits ---------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_refused_with_413(base):
    big = json.dumps(chat_body("x" * 70_000))
    response = post_raw(base, "/v1/chat/completions", big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"

    def chunks():  # no content-length: the limit holds on the bytes read
        for _ in range(20):
            yield b" " * 8192
        yield b"{}"

    streamed = httpx.post(base + "/v1/chat/completions", content=chunks(), timeout=30)
    assert streamed.status_code == 413
    assert metrics(base)["piscale_requests_turned_away_total"] >= 2


def test_prompts_times_n_over_the_limit_is_refused_before_tokenising(base):
    many = {"model": "toy", "prompt": ["What is 1?"] * 2000, "n": 128, "max_tokens": 1}
    response = httpx.post(base + "/v1/completions", json=many, timeout=30)
    assert response.status_code == 413
    error = response.json()["error"]
    assert "256000 sequences" in error["message"] and error["param"] == "n"
    wide = httpx.post(base + "/v1/completions", json={"model": "toy", "prompt": ["What is 1?"] * 5, "budget": 16, "reward": "judge"})
    assert wide.status_code == 413 and wide.json()["error"]["param"] == "budget"  # 5 x 16 > 64
    fits = httpx.post(base + "/v1/completions", json={"model": "toy", "prompt": ["What is 1?"] * 4, "n": 16, "max_tokens": 2})
    assert fits.status_code == 200 and len(fits.json()["choices"]) == 64


class HeldToy(ToyLM):
    """The toy model that holds every step until ``go`` is set (a
    threading event: the server runs in another thread)."""

    def __init__(self):
        super().__init__()
        self.go = threading.Event()

    async def extend(self, handles, params, seeds=None):
        while not self.go.is_set():
            await asyncio.sleep(0.01)
        return await super().extend(handles, params, seeds)


def wait_until(condition, deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the server never reached the expected state")
        time.sleep(0.02)


def in_background(function, *args) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(function(*args)), daemon=True)
    thread.start()
    return thread, result


def test_the_queue_and_the_concurrency_are_bounded_with_429():
    toy = HeldToy()
    config = ServerConfig(model="toy", max_sequences=2, max_request_sequences=2, max_queue=1, max_concurrency=3)
    with serve_in_thread(create_app(config, toy)) as url:
        post = lambda seed: httpx.post(url + "/v1/chat/completions", json=chat_body("What is 1?", seed=seed, n=2), timeout=60)  # noqa: E731
        first, first_result = in_background(post, 1)
        wait_until(lambda: metrics(url)["piscale_sequences_admitted"] == 2)
        second, second_result = in_background(post, 2)
        wait_until(lambda: metrics(url)["piscale_requests_waiting"] == 1)
        queued_out = post(3)  # would wait behind a full queue
        assert queued_out.status_code == 429 and queued_out.json()["error"]["code"] == "server_full"
        streamed_out = httpx.post(url + "/v1/chat/completions", json=chat_body("hi", seed=4, stream=True), timeout=60)
        assert streamed_out.status_code == 429  # refused before the stream starts, not inside it
        health = httpx.get(url + "/health", timeout=30)
        assert health.status_code == 200
        toy.go.set()
        first.join()
        second.join()
        assert [first_result[0].status_code, second_result[0].status_code] == [200, 200]
        assert metrics(url)["piscale_requests_turned_away_total"] == 2


def test_concurrent_requests_over_the_limit_get_429():
    toy = HeldToy()
    config = ServerConfig(model="toy", max_concurrency=2)
    with serve_in_thread(create_app(config, toy)) as url:
        post = lambda seed: httpx.post(url + "/v1/chat/completions", json=chat_body("What is 1?", seed=seed), timeout=60)  # noqa: E731
        held = [in_background(post, seed) for seed in (1, 2)]
        wait_until(lambda: metrics(url)["piscale_requests_in_flight"] == 2)
        refused = post(3)
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
        assert httpx.get(url + "/health", timeout=30).status_code == 200  # probes are never limited
        assert httpx.get(url + "/metrics", timeout=30).status_code == 200
        toy.go.set()
        for thread, result in held:
            thread.join()
            assert result[0].status_code == 200
        assert post(4).status_code == 200


# -- CPU-bound work off the event loop ------------------------------------------------------


def test_an_adversarial_verify_answer_does_not_stall_the_server():
    """math-verify spends seconds on 10^{10^{10}}; the grading runs in a
    worker process that the time limit kills, while /health, /metrics and
    plain requests are answered."""
    with serve_subprocess("--model", "toy", "--grading-timeout", str(GRADING_LIMIT)) as url:
        scaled = {"algorithm": "bon", "budget": 2, "reward": "verify:10^{10^{10}}", "seed": 0}
        slow, slow_result = in_background(
            lambda: httpx.post(url + "/v1/chat/completions", json=chat_body("What is 2 + 2?", piscale=scaled), timeout=120)
        )
        wait_until(lambda: metrics(url)["piscale_grading_in_progress"] >= 1)
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        plain = httpx.post(url + "/v1/chat/completions", json=chat_body("What is 1 + 1?", seed=1, max_tokens=8), timeout=30)
        assert plain.status_code == 200
        assert slow.is_alive()  # both answered while the grading was still under way
        slow.join()
        answer = slow_result[0]
        assert answer.status_code == 200
        assert answer.json()["piscale"]["searches"][0]["score"] == 0.0  # an answer it could not grade is not right
        assert metrics(url)["piscale_grading_timed_out_total"] >= 1


async def test_the_grading_pool_kills_an_overrunning_comparison_and_goes_on():
    from piscale.grading import GradingPool

    pool = GradingPool(workers=1, timeout=GRADING_LIMIT)
    try:
        assert await pool.equal("\\frac{1}{2}", "0.5")
        assert not await pool.equal("3", STALLING)  # seconds of work: stopped after one
        assert pool.timed_out == 1
        assert await pool.equal("2/4", "1/2")  # a fresh worker answers
        assert not await pool.equal("1/3", "0.5")
    finally:
        pool.close()


async def test_a_reward_grades_an_answer_that_ran_out_of_time_once():
    from piscale.grading import GradingPool, install_pool
    from piscale.rewards.verify import VerifierReward

    pool = GradingPool(workers=1, timeout=GRADING_LIMIT)
    previous = install_pool(pool)
    try:
        reward = VerifierReward(STALLING)
        answers = [["\\boxed{3}"], ["\\boxed{4}"], ["\\boxed{10^{10^{10}}}"]]
        assert await reward.score(["q"] * 3, answers) == [[0.0], [0.0], [1.0]]
        assert pool.timed_out == 1  # the first comparison ran out of time; the next one was not tried
        fresh = VerifierReward("4")  # another request's reward: nothing it does depends on the first one's
        assert await fresh.score(["q"], [["\\boxed{2+2}"]]) == [[1.0]]
    finally:
        install_pool(previous)
        pool.close()




async def test_a_vote_groups_alike_in_the_grading_pool_and_pays_a_stalling_answer_once():
    from piscale.grading import GradingPool, install_pool
    from piscale.search.select import group_answers, group_answers_async

    easy = ["\\frac{1}{2}", "0.5", None, "3", "6/2", "x+1", "1+x", "7"]
    assert group_answers(easy) == [0, 0, None, 1, 1, 2, 2, 3]
    assert await group_answers_async(easy) == [0, 0, None, 1, 1, 2, 2, 3]  # no pool: graded here
    pool = GradingPool(workers=1, timeout=GRADING_LIMIT)
    previous = install_pool(pool)
    try:
        assert await group_answers_async(easy) == [0, 0, None, 1, 1, 2, 2, 3]
        grouping = asyncio.ensure_future(group_answers_async(["3", STALLING, "3", STALLING, "4", "2+2"]))
        while pool.busy == 0 and not grouping.done():
            await asyncio.sleep(0.01)
        assert not grouping.done()  # this coroutine ran while the grouping waited on a worker
        assert await grouping == [0, 1, 0, 1, 2, 2]
        assert pool.timed_out == 1  # comparing the stalling answer ran out of time once; its repeat was not graded
    finally:
        install_pool(previous)
        pool.close()


ANSWERS = ("\\boxed{3}", f"\\boxed{{{STALLING}}}")


def stalling_rule(prompt: str, generated: tuple[str, ...]) -> dict[str, float]:
    """The toy model answering 3 or the stalling answer, as often."""
    return {EOS: 1.0} if generated else dict.fromkeys(ANSWERS, 0.5)


def test_a_vote_over_a_stalling_answer_does_not_stall_the_server():
    """Self-consistency and particle filtering's weighted vote key every
    answer with math-verify: in the grading workers, under their time limit,
    while /health is answered."""
    toy = ToyLM(stalling_rule, words=ANSWERS)
    config = ServerConfig(model="toy", grading_timeout=GRADING_LIMIT)
    with serve_in_thread(create_app(config, toy)) as url:
        searches = [
            {"algorithm": "sc", "budget": 4, "reward": "none", "seed": 0, "candidates": True},
            {"algorithm": "pf", "budget": 4, "reward": "arith", "seed": 0, "candidates": True,
             "options": {"selection": "weighted-vote"}},
        ]
        for count, scaled in enumerate(searches, start=1):
            body = chat_body("What is 2 + 2?", piscale=scaled)
            post = functools.partial(httpx.post, url + "/v1/chat/completions", json=body, timeout=120)
            voting, result = in_background(post)
            wait_until(lambda: metrics(url)["piscale_grading_in_progress"] >= 1)
            assert httpx.get(url + "/health", timeout=30).status_code == 200
            assert voting.is_alive()  # answered while the vote was still grading
            voting.join()
            assert result[0].status_code == 200
            answer = result[0].json()
            samples = [c["text"] for c in answer["piscale"]["searches"][0]["candidates"]]
            assert set(samples) == set(ANSWERS)  # both answers were voted on
            assert answer["choices"][0]["message"]["content"] in ANSWERS
            assert metrics(url)["piscale_grading_timed_out_total"] == count  # once per request, not per sample


class Held:
    """Holds forward passes, once ``armed``, until ``go``; ``entered`` says
    that one is being held (threading events: passes run off the loop)."""

    def __init__(self):
        self.armed = False
        self.entered = threading.Event()
        self.go = threading.Event()

    def hold(self) -> None:
        if self.armed:
            self.entered.set()
            self.go.wait(120)


class HeldForwardToy(ToyLM):
    def __init__(self, held: Held):
        super().__init__()
        self.held = held

    def _decode(self, requests):
        self.held.hold()
        return super()._decode(requests)


def held_engine(engine: str, held: Held):
    if engine == "toy":
        return HeldForwardToy(held)
    from piscale.lm.hf import TransformersLM
    from tiny_models import tiny_causal_lm

    model, tokenizer = tiny_causal_lm("llama")
    model.register_forward_pre_hook(lambda module, args: held.hold())
    return TransformersLM(model, tokenizer, name="tiny")


@pytest.mark.parametrize("engine", ["toy", "hf"])
def test_health_answers_while_a_forward_pass_runs(engine):
    held = Held()
    with serve_in_thread(create_app(ServerConfig(model=engine), held_engine(engine, held))) as url:
        body = chat_body("What is 1 + 1?", seed=1, max_tokens=8, model=engine)
        alone = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        held.armed = True
        try:
            request, result = in_background(lambda: httpx.post(url + "/v1/chat/completions", json=body, timeout=120))
            assert held.entered.wait(60)
            assert httpx.get(url + "/health", timeout=30).status_code == 200  # on the loop, while the pass is held
            assert request.is_alive()
        finally:
            held.go.set()
        request.join()
        assert result[0].status_code == alone.status_code == 200
        assert result[0].json()["choices"] == alone.json()["choices"]


# -- the API key ------------------------------------------------------------------------------


def test_the_api_key_can_come_from_a_file(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("  sesame-from-a-file\n")
    with serve_subprocess("--model", "toy", "--api-key-file", str(key_file)) as url:
        body = chat_body("hi", seed=1, max_tokens=4)
        assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 401
        bearer = {"authorization": "Bearer sesame-from-a-file"}
        assert httpx.post(url + "/v1/chat/completions", json=body, headers=bearer).status_code == 200
        header = {"x-api-key": "sesame-from-a-file"}
        assert httpx.post(url + "/v1/chat/completions", json=body, headers=header).status_code == 200


def test_api_key_options_and_the_exposed_host_warning(tmp_path):
    from piscale.cli.serve import is_loopback, read_api_key

    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "::", "192.168.1.4", "example.org")] == [
        True, True, True, False, False, False, False,
    ]
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_api_key(empty)
    with pytest.raises(ValueError, match="cannot read the API key file"):
        read_api_key(tmp_path / "missing")


def test_serving_beyond_loopback_without_a_key_warns():
    import subprocess
    import sys

    from piscale.serve.process import free_port, wait_until_answering

    port = free_port()
    command = [sys.executable, "-c", "from piscale.cli import app; app()", "serve", "--model", "toy",
               "--host", "0.0.0.0", "--port", str(port), "--log-level", "warning"]  # fmt: skip
    env = {k: v for k, v in __import__("os").environ.items() if k != "PISCALE_API_KEY"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        wait_until_answering(f"http://127.0.0.1:{port}/health", 120, process)
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    assert "without an API key" in " ".join(err.split())


def test_limits_are_settings_checked_when_the_server_starts():
    from piscale.serve.config import config_from_mapping

    config = config_from_mapping({"max-concurrency": 64, "max_body_bytes": 262144, "max_queue": 0})
    assert (config.max_concurrency, config.max_body_bytes, config.max_queue) == (64, 262144, 0)
    for bad, message in (
        ({"max_queue": -1}, "max_queue must be a non-negative integer"),
        ({"max_request_sequences": 600}, "could never be admitted"),
        ({"grading_timeout": float("nan")}, "grading_timeout must be a positive number"),
        ({"max_body_bytes": True}, "max_body_bytes must be a positive integer"),
        ({"request_timeout": float("inf")}, "request_timeout must be a positive number"),
    ):
        with pytest.raises(ValueError, match=message):
            config_from_mapping(bad)
