"""Every search algorithm end to end on the exact toy model."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import numpy as np
import pytest
from typer.testing import CliRunner

from piscale.grading import extract_answer, normalize_answer
from piscale.lm.toy import ToyLM
from piscale.rewards.base import Reward
from piscale.search import ALGORITHMS, DEFAULT_SYSTEM_PROMPT, run, run_many, split_steps
from piscale.search.select import group_answers, heaviest_group, max_weight, tied_answers, weighted_vote
from piscale.tracepage import render_html

QUESTION = "Count up from where you start."


class BoxReward(Reward):
    """Prefers larger boxed answers; an unanswered partial answer scores 0.5.
    Counts its calls and the step strings it reads."""

    scale = "probability"

    def __init__(self, outcome_only: bool = False):
        self.outcome_only = outcome_only
        self.calls = 0
        self.steps = 0

    async def score(self, prompts, trajectories):
        self.calls += 1
        self.steps += sum(len(t) for t in trajectories)
        scores = []
        for steps in trajectories:
            row = []
            for t in range(len(steps)):
                answer = extract_answer("".join(steps[: t + 1]))
                row.append(0.5 if answer is None else (int(answer) + 1) / 11)
            scores.append(row)
        return scores


EXPECTED_CANDIDATES = {"pf": 8, "pg": 2, "pt": 2, "bon": 8, "wbon": 8, "sc": 8, "beam": 2, "dvts": 2}


@pytest.mark.parametrize("name", list(ALGORITHMS))
@pytest.mark.parametrize("aggregation", ["model", "prod"])
def test_every_algorithm_runs_and_counts_its_work(name, aggregation):
    lm, reward = ToyLM(), BoxReward()
    result = asyncio.run(run(lm, reward, QUESTION, name, budget=8, seed=4, aggregation=aggregation))
    assert result.algorithm == name and result.budget == 8 and result.seed == 4
    # Usage agrees with the backend's and the reward's own counters.
    assert result.usage["generated_tokens"] == lm.usage.generated_tokens > 0
    assert result.usage["prompt_tokens"] == lm.usage.prefill_tokens > 0
    assert result.usage["reward_calls"] == reward.calls > 0
    assert result.usage["reward_steps"] == reward.steps
    assert result.usage["wall_time"] > 0
    assert lm.live_sequences == 0, "a search left backend sequences behind"
    # Candidates are real answers of the model, reconstructed step by step.
    possible = {a.text for a in lm.enumerate_answers(lm.prompt_ids(QUESTION, DEFAULT_SYSTEM_PROMPT))}
    assert len(result.candidates) == EXPECTED_CANDIDATES[name]
    for candidate in result.candidates:
        assert candidate.text in possible
        assert candidate.answer == extract_answer(candidate.text)
        assert candidate.finished
        final = (int(candidate.answer) + 1) / 11
        unanswered_steps = len(split_steps(candidate.text, "\n\n")) - 1
        expected = final * 0.5**unanswered_steps if aggregation == "prod" else final
        assert candidate.score == pytest.approx(expected)
    assert result.text in [c.text for c in result.candidates]
    assert result.answer == extract_answer(result.text)
    json.dumps(result.to_dict(), allow_nan=False)


def test_best_of_n_picks_the_best_score_and_weighted_bon_the_best_total():
    lm, reward = ToyLM(), BoxReward()
    best = asyncio.run(run(lm, reward, QUESTION, "bon", budget=16, seed=2))
    assert max(c.score for c in best.candidates) == pytest.approx((int(best.answer) + 1) / 11)
    weighted = asyncio.run(run(ToyLM(), reward, QUESTION, "wbon", budget=16, seed=2))
    assert [c.text for c in weighted.candidates] == [c.text for c in best.candidates]  # same samples
    totals = Counter()
    for c in weighted.candidates:
        totals[normalize_answer(c.answer)] += c.score
    assert normalize_answer(weighted.answer) == max(totals, key=totals.get)


def test_self_consistency_is_the_majority_and_needs_no_reward():
    lm = ToyLM()
    result = asyncio.run(run(lm, None, QUESTION, "sc", budget=16, seed=5))
    votes = Counter(c.answer for c in result.candidates)
    assert votes[result.answer] == max(votes.values())
    assert result.usage["reward_calls"] == 0 and all(c.score is None for c in result.candidates)
    plain = asyncio.run(run(ToyLM(), None, QUESTION, "bon", budget=1, seed=5))
    assert plain.text == result.candidates[0].text  # same seed, same first sample


def test_particle_filter_answer_has_the_largest_final_weight():
    result = asyncio.run(run(ToyLM(), BoxReward(), QUESTION, "pf", budget=16, seed=1))
    weights = [c.log_weight for c in result.candidates]
    assert result.text == result.candidates[int(np.argmax(weights))].text


def test_weighted_vote_picks_the_heaviest_answer():
    result = asyncio.run(
        run(ToyLM(), BoxReward(), QUESTION, "pf", budget=16, seed=1, selection="weighted-vote", potential="incremental")
    )
    log_weights = np.array([c.log_weight for c in result.candidates])
    weights = np.exp(log_weights - log_weights.max())
    totals = Counter()
    for c, w in zip(result.candidates, weights):
        totals[c.answer] += w
    assert result.answer == max(totals, key=totals.get)


def test_tied_answers_flags_a_largest_weight_shared_by_different_answers():
    assert tied_answers(["1", "2"], [0.0, 0.0])
    assert tied_answers(["1", None], [0.0, 0.0])  # no answer differs from an answer
    assert tied_answers(["3", "1", "2"], [0.0, 2.0, 2.0])
    assert not tied_answers(["1", "1.0"], [0.0, 0.0])  # equivalent answers: any pick gives the same
    assert not tied_answers(["1", "2"], [1.0, 0.0])
    assert not tied_answers(["1", "2", "2"], [0.0, 1.0, 1.0])
    assert not tied_answers(["1", "2"], [-np.inf, -np.inf])  # nothing has weight
    assert not tied_answers(["1"], [0.0])


def test_ess_threshold_resamples_only_when_the_ess_is_low():
    result = asyncio.run(
        run(ToyLM(), BoxReward(), QUESTION, "pf", budget=16, seed=3, trace=True,
            potential="incremental", ess_threshold=0.7, resampler="systematic")
    )
    steps = result.trace["steps"]
    for record in steps[:-1]:
        assert record["resampled"] == (record["ess"] < 0.7 * 16)
        assert (record["ancestors"] is not None) == record["resampled"]
    assert not steps[-1]["resampled"]
    assert any(not r["resampled"] for r in steps[:-1]) or all(r["ess"] < 0.7 * 16 for r in steps[:-1])


def test_outcome_only_rewards_score_finished_answers_only():
    reward = BoxReward(outcome_only=True)
    result = asyncio.run(run(ToyLM(), reward, QUESTION, "pf", budget=8, seed=0, trace=True))
    for record in result.trace["steps"]:
        for particle in record["particles"]:
            assert (particle["score"] is None) == (not particle["finished"])


@pytest.mark.parametrize("name", ["pf", "pt", "dvts", "bon"])
def test_run_many_equals_separate_runs_and_shares_batches(name):
    questions = [f"Question number {i}" for i in range(8)]
    together_lm = ToyLM()
    together = asyncio.run(run_many(together_lm, BoxReward(), questions, name, budget=8, seed=7, trace=True))
    separate_passes = 0
    for question, joint in zip(questions, together):
        alone_lm = ToyLM()
        alone = asyncio.run(run(alone_lm, BoxReward(), question, name, budget=8, seed=7, trace=True))
        separate_passes += alone_lm.usage.forward_passes
        a, b = alone.to_dict(), joint.to_dict()
        a["usage"].pop("wall_time"), b["usage"].pop("wall_time")
        assert a == b
    assert len({r.text for r in together}) > 1, "the questions should not all give the same answer"
    assert together_lm.usage.forward_passes < separate_passes


def test_option_validation():
    lm, reward = ToyLM(), BoxReward()

    def fails(match: str, *args, **kwargs):
        with pytest.raises(ValueError, match=match):
            asyncio.run(run(lm, *args, **kwargs))

    fails("unknown algorithm", reward, QUESTION, "mcts")
    fails("unknown option beam_width for algorithm 'pf'", reward, QUESTION, "pf", beam_width=2)
    fails("budget must be a positive integer", reward, QUESTION, "pf", budget=0)
    fails("seed must be a non-negative integer", reward, QUESTION, "pf", seed=-1)
    fails("needs a reward", None, QUESTION, "pf")
    fails("needs a reward", None, QUESTION, "bon", budget=4)
    fails("multiple of iterations=4", reward, QUESTION, "pg", budget=6)
    fails("chains >= 2", reward, QUESTION, "pt", budget=8, chains=1)
    fails("temperatures has 3 entries", reward, QUESTION, "pt", temperatures=[1, 2, 3])
    fails("strictly increasing", reward, QUESTION, "pt", temperatures=[2, 1])
    fails("multiple of beam_width=4", reward, QUESTION, "beam", budget=6)
    fails("temperature must be in", reward, QUESTION, "pf", temperature=-1)
    fails("unknown resampler", reward, QUESTION, "pf", resampler="bogus")
    fails("unknown potential", reward, QUESTION, "pf", potential="bogus")
    fails("unknown selection", reward, QUESTION, "pf", selection="mode")
    fails("unknown aggregation", reward, QUESTION, "pf", aggregation="mean")
    fails("ess_threshold must be in", reward, QUESTION, "pf", ess_threshold=1.5)
    fails("max_steps must be a positive integer", reward, QUESTION, "pf", max_steps=0)
    fails("non-empty string", reward, "  ", "pf")
    fails("temperature must be a finite number", reward, QUESTION, "pf", temperature=float("nan"))
    fails("softmax_temperature must be a finite number", reward, QUESTION, "pf", softmax_temperature=float("inf"))
    fails("ess_threshold must be a finite number", reward, QUESTION, "pf", ess_threshold=float("nan"))
    fails("temperatures must be finite numbers", reward, QUESTION, "pt", budget=8, chains=2, temperatures=[1, float("nan")])
    fails("top_p must be a number", reward, QUESTION, "pf", top_p="0.5")
    assert lm.usage.calls == 0, "validation must fail before any backend work"


def test_step_and_token_caps_stop_particles():
    result = asyncio.run(run(ToyLM(), BoxReward(), QUESTION, "pf", budget=8, seed=0, max_steps=1))
    assert all(len(split_steps(c.text, "\n\n")) == 1 for c in result.candidates)
    capped = asyncio.run(run(ToyLM(), BoxReward(), QUESTION, "pf", budget=8, seed=0, max_tokens=2))
    assert result.settings["max_steps"] == 1 and capped.settings["max_tokens"] == 2
    assert capped.usage["generated_tokens"] <= 8 * 2
    assert not all(c.finished for c in capped.candidates)


# -- answer selection -----------------------------------------------------------


def test_group_answers_pools_equivalent_answers():
    groups = group_answers(["1/2", "0.5", "\\frac{1}{2}", "3", None, "3.0"])
    assert groups[:3] == [0, 0, 0] and groups[3] == groups[5] == 1 and groups[4] is None


def test_selection_helpers():
    assert max_weight([0.1, 2.0, 2.0, -np.inf]) == 1
    assert heaviest_group([0, 1, 1, None, 0], [0.5, 0.2, 0.2, 9.0, 0.1]) == 0
    assert heaviest_group([None, None], [1.0, 1.0]) is None
    # "2" has two light particles whose total beats the single heaviest "5".
    assert weighted_vote(["5", "2", "2"], np.log([0.4, 0.3, 0.3])) == 1
    assert weighted_vote([None, None], [0.0, 1.0]) == 1


def test_split_steps_round_trips():
    for text in ["a\n\nb\n\nc", "a\n\n", "", "\n\n\n\nx"]:
        pieces = split_steps(text, "\n\n")
        assert "".join(pieces) == text
        assert all(p.endswith("\n\n") for p in pieces[:-1])


# -- traces ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_trace_round_trips_and_draws_a_node_per_particle(name):
    result = asyncio.run(run(ToyLM(), BoxReward(), QUESTION, name, budget=8, seed=6, trace=True))
    trace = result.trace
    assert json.loads(json.dumps(trace, allow_nan=False)) == trace
    nodes = {n["id"]: n for n in trace["nodes"]}
    for previous, record in zip(trace["steps"], trace["steps"][1:]):
        if (previous["iteration"], previous["chain"]) != (record["iteration"], record["chain"]):
            continue
        for particle in record["particles"]:
            origin = previous["particles"][particle["ancestor"]]
            # A particle grew from its ancestor, or is the ancestor carried over (finished).
            assert nodes[particle["node"]]["parent"] == origin["node"] or (
                particle["node"] == origin["node"] and origin["finished"]
            )
    answer_node = nodes[trace["answer"]["node"]]
    lineage = []
    while answer_node["parent"] is not None:
        lineage.append(answer_node["text"])
        answer_node = nodes[answer_node["parent"]]
    assert "".join(reversed(lineage)) == result.text
    page = render_html(result.to_dict())
    assert page.count('class="particle') == sum(len(r["particles"]) for r in trace["steps"])
    assert "http://" not in page.replace("http://www.w3.org", "") and "src=" not in page


def test_trace_cli(tmp_path):
    from piscale.cli import app

    result = asyncio.run(run(ToyLM(), BoxReward(), QUESTION, "pf", budget=4, seed=0, trace=True))
    saved = tmp_path / "result.json"
    saved.write_text(json.dumps(result.to_dict()))
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(result.trace))
    runner = CliRunner()
    for source in (saved, bare):
        target = tmp_path / f"{source.stem}.html"
        outcome = runner.invoke(app, ["trace", str(source), "-o", str(target)])
        assert outcome.exit_code == 0, outcome.output
        assert target.read_text().count('class="particle') == sum(len(r["particles"]) for r in result.trace["steps"])
    untraced = tmp_path / "untraced.json"
    untraced.write_text(json.dumps({**result.to_dict(), "trace": None}))
    outcome = runner.invoke(app, ["trace", str(untraced)])
    assert outcome.exit_code == 2 and "holds no trace" in outcome.output


class FailingLM(ToyLM):
    """A toy whose backend fails to write chosen steps: the ``fail_at``-th
    sequence of the ``on_call``-th extend call (None: every sequence), as a
    remote backend reports a request that failed after its retries."""

    def __init__(self, on_call: int, fail_at: int | None):
        super().__init__()
        self.on_call, self.fail_at, self.extend_calls = on_call, fail_at, 0

    async def extend(self, handles, params, seeds=None):
        from piscale.lm.base import StepOutput

        outputs = await super().extend(handles, params, seeds)
        self.extend_calls += 1
        if self.extend_calls == self.on_call:
            for i in range(len(outputs)) if self.fail_at is None else [self.fail_at]:
                outputs[i] = StepOutput([], "", [], "error", error=f"HTTP 503 for sequence {i}")
        return outputs


@pytest.mark.parametrize("name", ["pf", "bon", "dvts"])
def test_a_failed_step_drops_its_particle_and_is_recorded(name):
    lm = FailingLM(on_call=2 if name in ("pf", "dvts") else 1, fail_at=1)
    result = asyncio.run(run(lm, BoxReward(), QUESTION, name, budget=8, seed=3, beam_width=4) if name == "dvts"
                         else run(lm, BoxReward(), QUESTION, name, budget=8, seed=3))
    assert result.failures == [{"depth": 2 if name in ("pf", "dvts") else 1, "reason": "HTTP 503 for sequence 1"}]
    # the failed particle has zero weight: it is never the answer
    assert result.answer is not None and result.text
    healthy = asyncio.run(run(ToyLM(), BoxReward(), QUESTION, name, budget=8, seed=3, beam_width=4) if name == "dvts"
                          else run(ToyLM(), BoxReward(), QUESTION, name, budget=8, seed=3))
    assert healthy.failures == []
    if name == "bon":  # the other seven samples are the healthy run's, so is the pick unless it was sample 1
        assert result.candidates[1].text == "" and result.candidates[1].log_weight is None
        kept = [c for i, c in enumerate(healthy.candidates) if i != 1]
        assert result.answer == max(kept, key=lambda c: c.score).answer


def test_a_search_whose_every_particle_failed_raises_with_the_reasons():
    lm = FailingLM(on_call=1, fail_at=None)
    with pytest.raises(RuntimeError, match="every particle failed.*HTTP 503"):
        asyncio.run(run(lm, BoxReward(), QUESTION, "pf", budget=4, seed=0))


def test_solve_command_on_the_toy_model_and_a_bad_engine_option():
    from piscale.cli import app

    runner = CliRunner()
    done = runner.invoke(app, ["solve", QUESTION, "--model", "toy", "--reward", "none", "--algorithm", "sc",
                               "--budget", "4", "--seed", "2", "--json"])
    assert done.exit_code == 0, done.output
    data = json.loads(done.stdout[done.stdout.index("{"):])
    assert data["algorithm"] == "sc" and len(data["candidates"]) == 4
    expected = asyncio.run(run(ToyLM(), None, QUESTION, "sc", budget=4, seed=2))
    assert data["answer"] == expected.answer
    shown = runner.invoke(app, ["solve", QUESTION, "--model", "toy", "--reward", "none", "--algorithm", "sc",
                                "--budget", "4", "--seed", "2"])
    assert shown.exit_code == 0 and f"answer: {expected.answer}" in shown.stdout
    cut = runner.invoke(app, ["solve", QUESTION, "--model", "toy", "--reward", "none", "--algorithm", "sc",
                              "--budget", "1", "--option", "max_tokens=1"])
    assert cut.exit_code == 0 and "answer: none (the chosen response has no \\boxed{} answer)" in cut.stdout
    bad = runner.invoke(app, ["solve", QUESTION, "--model", "toy", "--reward", "none", "--algorithm", "sc",
                              "--engine-option", "no_such_option=1"])
    assert bad.exit_code == 2 and "no_such_option" in bad.output


def test_solve_prints_model_text_and_answers_as_text_not_markup(monkeypatch):
    from piscale.cli import app
    from piscale.search.result import SearchResult

    # Model output is arbitrary text: "[/INST]" is a closing markup tag to rich,
    # and "[0, 1]" or "[bold]" would be eaten or restyled.
    text = "[INST] think [/INST] the set is [bold]closed[/bold], so \\boxed{[0, 1]}"
    result = SearchResult(QUESTION, "pf", 2, 0, {}, "[0, 1]", text, 0, [], {"generated_tokens": 7})

    async def fake_solve(*args, **kwargs):
        return result

    monkeypatch.setattr("piscale.api.asolve", fake_solve)
    shown = CliRunner().invoke(app, ["solve", QUESTION, "--model", "toy", "--reward", "none"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert text in shown.stdout and "answer: [0, 1]" in shown.stdout


def test_llamacpp_slots_are_sized_for_the_search_unless_given():
    from piscale.api import MAX_AUTOMATIC_SLOTS, engine_options_for

    spec = "qwen2.5-coder-0.5b-instruct"
    assert engine_options_for(spec, "llamacpp", None, None, 32) == {"max_sequences": 34}
    assert engine_options_for(spec, "llamacpp", None, {"n_threads": 1}, 4) == {"n_threads": 1, "max_sequences": 16}
    assert engine_options_for(spec, "llamacpp", None, None, 10_000) == {"max_sequences": MAX_AUTOMATIC_SLOTS}
    assert engine_options_for(spec, "llamacpp", None, {"max_sequences": 5}, 64) == {"max_sequences": 5}
    assert engine_options_for(spec, "hf", None, {"dtype": "float32"}, 64) == {"dtype": "float32"}
