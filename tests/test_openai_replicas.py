"""``OpenAILM``'s usage counters and its routing over several replicas, against
scripted servers (httpx mock transports) and ``piscale serve --model toy``.

Routing must be prefix-affine: every request that continues a sequence goes to
the replica that served the sequence's earlier steps (its prefix is cached
there), forks follow their parent, and new copies of a prompt spread over the
replicas. A search over two replicas gives exactly the answer of one replica
under the same seed, since every request carries its own seed."""

from __future__ import annotations

import json

import httpx
import pytest

from piscale import search
from piscale.lm.base import StepParams
from piscale.lm.openai import OpenAILM
from piscale.lm.server_pool import parse_metrics
from piscale.lm.toy import ToyLM
from test_openai_backend import FavourTwos
from test_serve_support import serve_subprocess

STEP = StepParams(max_tokens=2, stop=())


class ScriptedReplicas:
    """Servers at http://a, http://b, ...: each completion appends the tokens
    [host number, seed] to the prompt, and each server remembers the token
    lists it has seen (what its prefix cache would hold)."""

    def __init__(self, hosts: list[str], metrics: bool = False, cached: int = 0, next_tokens: bool = False):
        self.hosts = hosts
        self.seen: dict[str, list[list[int]]] = {host: [] for host in hosts}
        self.passes = dict.fromkeys(hosts, 0)
        self.metrics = metrics
        self.cached = cached
        self.next_tokens = next_tokens
        """whether the servers answer vLLM's logprob_token_ids (token t gets
        log-probability -t/10), or ignore the field"""

    def handler(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if request.url.path == "/metrics":
            if not self.metrics:
                return httpx.Response(404, text="not found")
            return httpx.Response(200, text=f"# TYPE x counter\nvllm:iteration_tokens_total_count{{a=\"1\"}} {self.passes[host]}\n")
        body = json.loads(request.content)
        prompt = list(body["prompt"])
        if body.get("echo"):
            self.seen[host].append(prompt)
            values = [None] + [-0.5] * (len(prompt) - 1)
            return httpx.Response(200, json={"choices": [{"index": 0, "text": "", "finish_reason": "length",
                                                          "logprobs": {"token_logprobs": values}}],
                                             "usage": {"prompt_tokens": len(prompt), "completion_tokens": 0}})
        if self.next_tokens and body.get("logprob_token_ids"):
            self.seen[host].append(prompt)
            table = {f"token_id:{t}": -t / 10 for t in body["logprob_token_ids"]}
            return httpx.Response(200, json={
                "choices": [{"index": 0, "text": "x", "finish_reason": "length",
                             "logprobs": {"token_logprobs": [-0.1], "top_logprobs": [table]}}],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": 1,
                          "prompt_tokens_details": {"cached_tokens": min(self.cached, len(prompt))}},
            })
        new = [self.hosts.index(host) + 100, int(body.get("seed", 0))][: body["max_tokens"]]
        self.seen[host].append(prompt + new)
        self.passes[host] += 1 + len(new)
        usage = {"prompt_tokens": len(prompt), "completion_tokens": len(new),
                 "prompt_tokens_details": {"cached_tokens": min(self.cached, len(prompt))}}
        return httpx.Response(200, json={
            "choices": [{"index": 0, "text": "xy"[: len(new)], "token_ids": new,
                         "logprobs": {"token_logprobs": [-1.0] * len(new)}, "finish_reason": "length", "stop_reason": None}],
            "usage": usage,
        })

    def lm(self, **options) -> OpenAILM:
        urls = [f"http://{host}/v1" for host in self.hosts]
        return OpenAILM("m", urls if len(urls) > 1 else urls[0], context_length=1000,
                        transport=httpx.MockTransport(self.handler), **options)

    def holder(self, tokens: list[int]) -> set[str]:
        """The servers that have seen a token list starting with ``tokens``."""
        return {host for host, lists in self.seen.items() if any(s[: len(tokens)] == tokens for s in lists)}


# -- usage ----------------------------------------------------------------------------


async def test_usage_counts_time_requests_tokens_and_the_servers_passes():
    servers = ScriptedReplicas(["a"], metrics=True, cached=2)
    lm = servers.lm()
    [handles] = await lm.open([[1, 2, 3]], copies=3)
    await lm.extend(handles, STEP, seeds=[1, 2, 3])
    await lm.extend(handles, STEP, seeds=[4, 5, 6])
    assert lm.usage.wall_time > 0
    assert lm.server_usage.requests == 6 and lm.server_usage.requests_by_replica == [6]
    assert lm.server_usage.prompt_tokens == 3 * 3 + 3 * 5
    assert lm.server_usage.completion_tokens == lm.usage.generated_tokens == 12
    assert lm.server_usage.cached_tokens == 6 * 2
    assert lm.usage.prefill_tokens == lm.server_usage.prompt_tokens - lm.server_usage.cached_tokens
    assert lm.usage.forward_passes == servers.passes["a"] == 6 * 3  # read from the server, not estimated


async def test_forward_passes_are_estimated_where_the_server_has_no_counter():
    servers = ScriptedReplicas(["a"], metrics=False)
    lm = servers.lm()
    [handles] = await lm.open([[1, 2, 3]], copies=3)
    await lm.extend(handles, STEP, seeds=[1, 2, 3])
    assert lm.usage.forward_passes == 1 + 2  # the prompts read together, then two tokens
    assert lm.usage.prefill_tokens == 9  # no cache reported: every prompt token counts


async def test_one_request_per_distinct_prompt_goes_before_the_others():
    servers = ScriptedReplicas(["a"])
    lm = servers.lm(score_mode="echo")
    order = []
    inner = servers.handler

    def recording(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/completions"):
            order.append(json.loads(request.content)["prompt"])
        return inner(request)

    lm.servers.transport = httpx.MockTransport(recording)
    scores = await lm.score([[1, 2], [1, 2], [3, 4], [1, 2]], [[5], [6], [7], [8, 9]])
    assert [s.token_ids for s in scores] == [[5], [6], [7], [8, 9]]
    assert sorted(map(tuple, order[:2])) == [(1, 2, 5), (3, 4, 7)]  # one per prompt first
    assert lm.usage.scored_tokens == 3 + 3 + 3 + 4 and lm.usage.prefill_tokens == 0


async def test_one_token_continuations_come_from_one_ordinary_request_per_prompt():
    """A judge's Yes/No: one request per prompt asks for the tokens'
    log-probabilities at its generated position, and reads the prompt from
    the server's cache; longer continuations still echo."""
    servers = ScriptedReplicas(["a"], cached=2, next_tokens=True)
    lm = servers.lm()
    scores = await lm.score([[1, 2], [1, 2], [3, 4], [1, 2]], [[5], [6], [7], [8, 9]])
    assert [s.logprobs for s in scores[:3]] == [[-0.5], [-0.6], [-0.7]]
    assert scores[3].logprobs == [-0.5, -0.5]  # echoed
    assert sorted(map(tuple, servers.seen["a"])) == [(1, 2), (1, 2, 8, 9), (3, 4)]
    assert lm.server_usage.cached_tokens == 2 + 2
    assert lm.usage.scored_tokens == 0 + 0 + 4  # what the server did not find cached


async def test_a_server_without_token_log_probabilities_is_asked_once():
    servers = ScriptedReplicas(["a"], next_tokens=False)
    lm = servers.lm()
    first = await lm.score([[1, 2], [1, 2]], [[5], [6]])
    assert [s.logprobs for s in first] == [[-0.5], [-0.5]]  # echoed instead
    asked = len(servers.seen["a"])
    await lm.score([[1, 2]], [[5]])
    assert len(servers.seen["a"]) == asked + 1  # no second try of logprob_token_ids


def test_metrics_text_is_summed_over_labels():
    text = '# HELP a b\na_total{x="1"} 2\na_total{x="2"} 3.5\nb 1e3\nbad line\n'
    assert parse_metrics(text) == {"a_total": 5.5, "b": 1000.0}


# -- replicas -----------------------------------------------------------------------


def test_a_spec_names_several_replicas():
    lm = OpenAILM.from_spec("openai:m@http://a:1/v1,http://b:2/v1/")
    assert [r.base_url for r in lm.replicas] == ["http://a:1/v1", "http://b:2/v1"]
    assert lm.base_url == "http://a:1/v1" and lm.name == "openai:m@http://a:1/v1,http://b:2/v1"
    with pytest.raises(ValueError, match="twice"):
        OpenAILM("m", ["http://a/v1", "http://a/v1/"])
    with pytest.raises(ValueError, match="http"):
        OpenAILM("m", ["http://a/v1", "ftp://b"])


async def test_copies_spread_and_every_continuation_goes_where_its_prefix_is():
    servers = ScriptedReplicas(["a", "b"])
    lm = servers.lm()
    [handles] = await lm.open([[1, 2, 3]], copies=4)
    assert sorted(lm.replica_of(h) for h in handles) == ["http://a/v1"] * 2 + ["http://b/v1"] * 2
    seed = 0
    for _ in range(3):
        before = {h: lm.token_ids(h) for h in handles}
        await lm.extend(handles, STEP, seeds=list(range(seed, seed + len(handles))))
        seed += len(handles)
        for h in handles:
            # the server that extended it had seen its whole prefix already, or it was the prompt
            host = lm.replica_of(h).removeprefix("http://").removesuffix("/v1")
            assert host in servers.holder(lm.token_ids(h))
            assert before[h] == [1, 2, 3] or servers.holder(before[h]) == {host}
        # resample: everything descends from the first two particles
        children = lm.fork([handles[0], handles[0], handles[1], handles[1]])
        assert [lm.replica_of(c) for c in children] == [lm.replica_of(handles[0])] * 2 + [lm.replica_of(handles[1])] * 2
        lm.release(handles)
        handles = children
    assert all(count > 0 for count in lm.server_usage.requests_by_replica or [])
    assert [r.live for r in lm.replicas] == [sum(lm.replica_of(h) == r.base_url for h in handles) for r in lm.replicas]


async def test_new_prompts_go_to_the_replica_with_fewer_sequences():
    lm = ScriptedReplicas(["a", "b"]).lm()
    [[first]] = await lm.open([[1]])
    [[second]] = await lm.open([[2]])
    assert {lm.replica_of(first), lm.replica_of(second)} == {"http://a/v1", "http://b/v1"}
    freed = lm.replica_of(first)
    lm.release([first])
    [[third]] = await lm.open([[3]])
    assert lm.replica_of(third) == freed


async def test_scoring_a_prompt_again_goes_where_it_was_scored():
    servers = ScriptedReplicas(["a", "b"])
    lm = servers.lm(score_mode="echo")
    for _ in range(2):
        await lm.score([[1, 2], [1, 2], [7, 8]], [[3], [4], [9]])
    assert len(servers.holder([1, 2])) == 1
    assert sum(len(v) for v in servers.seen.values()) == 6


@pytest.fixture(scope="module")
def two_toys():
    with serve_subprocess("--model", "toy") as first, serve_subprocess("--model", "toy") as second:
        yield first, second


@pytest.mark.parametrize("algorithm,budget", [("pf", 6), ("beam", 4)])
async def test_a_search_over_two_replicas_equals_one_replica(two_toys, algorithm, budget):
    first, second = two_toys
    question = "What is 4 + 1?"
    one = OpenAILM("toy", first + "/v1")
    two = OpenAILM("toy", [first + "/v1", second + "/v1"])
    alone = await search.run(one, FavourTwos(), question, algorithm, budget, seed=5)
    spread = await search.run(two, FavourTwos(), question, algorithm, budget, seed=5)
    local = await search.run(ToyLM(), FavourTwos(), question, algorithm, budget, seed=5)
    assert spread.text == alone.text == local.text
    assert [c.text for c in spread.candidates] == [c.text for c in alone.candidates]
    assert min(two.server_usage.requests_by_replica or [0]) > 0
    assert two.usage.forward_passes > 0 and one.usage.forward_passes > 0 and two.usage.wall_time > 0
    await one.close()
    await two.close()
