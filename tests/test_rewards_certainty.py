"""Self-certainty: the policy's own token log-probabilities as a reward.

The toy model's next-token probabilities are known exactly, so the mean (or
lowest group mean) token log-probability of any answer it writes can be
computed here from its rule and the answer's text alone, without the
log-probabilities the backend returned, and compared with what the searches
scored. Hand-sized cases check the statistics, the aggregations and the
final particle-filter weights number by number.
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict

import numpy as np
import pytest

from piscale.grading import extract_answer
from piscale.lm.base import StepOutput
from piscale.lm.toy import EOS, STEP, ToyLM
from piscale.rewards import from_spec, score_trajectories
from piscale.rewards.base import Reward
from piscale.rewards.certainty import DEFAULT_WINDOW, SelfCertaintyReward, step_logprobs
from piscale.search import ALGORITHMS, Settings, run, split_steps
from piscale.search.driver import Driver

QUESTION = "Count something."

# Every answer has two steps: a letter, then a boxed digit whose odds depend
# on the letter. Four answers, each of six tokens:
#   "A" "\n\n" | "\boxed{" DIGIT "}" EOS
LETTER = {"A": 0.7, "B": 0.3}
DIGIT = {"A": {"1": 0.9, "2": 0.1}, "B": {"1": 0.5, "2": 0.5}}


def two_step_rule(prompt: str, generated: tuple[str, ...]) -> dict[str, float]:
    if not generated:
        return dict(LETTER)
    last = generated[-1]
    if last in LETTER:
        return {STEP: 1.0}
    if last == STEP:
        return {"\\boxed{": 1.0}
    if last == "\\boxed{":
        return dict(DIGIT[generated[0]])
    if last in ("1", "2"):
        return {"}": 1.0}
    return {EOS: 1.0}


def two_step_lm() -> ToyLM:
    return ToyLM(two_step_rule, words=("\\boxed{",))


def exact_token_logprobs(lm: ToyLM, text: str, finished: bool = True) -> list[float]:
    """log p(token | prefix) of each token of ``text`` (then EOS when it is
    finished), read off the toy rule, not off any backend output."""
    prompt_text = lm.prompt_text(lm.prompt_ids(QUESTION, None))
    tokens = [lm.vocabulary[i] for i in lm.encode(text)] + ([EOS] if finished else [])
    return [math.log(lm.rule(prompt_text, tuple(tokens[:k]))[token]) for k, token in enumerate(tokens)]


def exact_mean(lm: ToyLM, text: str) -> float:
    values = exact_token_logprobs(lm, text)
    return sum(values) / len(values)


def lowest_group_mean(values: list[float], window: int) -> float:
    """Brute force: every window of consecutive tokens, its mean, the lowest."""
    if len(values) < window:
        return sum(values) / len(values)
    return min(sum(values[j : j + window]) / window for j in range(len(values) - window + 1))


def solve(lm, reward, algorithm, budget, seed=0, **options):
    return asyncio.run(run(lm, reward, QUESTION, algorithm, budget=budget, seed=seed, system=None, **options))


# -- the statistics, by hand ------------------------------------------------


def test_mean_of_each_partial_answer():
    reward = SelfCertaintyReward()
    steps = [[-1.0, -3.0], [], [-2.0, 0.0, -4.0]]
    # prefixes hold 2, 2 and 5 tokens: -4/2, -4/2, -10/5
    assert reward.prefix_scores(steps) == pytest.approx([-2.0, -2.0, -2.0])
    assert reward.prefix_scores([[-0.5], [-1.5, -1.0]]) == pytest.approx([-0.5, -1.0])
    # no tokens yet: no evidence, certainty 1
    assert reward.prefix_scores([[], [-1.0]]) == [0.0, -1.0]


def test_lowest_group_mean_slides_across_steps():
    reward = SelfCertaintyReward("group", window=2)
    steps = [[-0.2], [-0.4, -3.0], [-0.1, -0.1, -0.3]]
    # prefix 1: one token, shorter than a group: its mean
    # prefix 2: windows (-0.2, -0.4) -0.3, (-0.4, -3.0) -1.7
    # prefix 3: adds (-3.0, -0.1) -1.55, (-0.1, -0.1) -0.1, (-0.1, -0.3) -0.2
    assert reward.prefix_scores(steps) == pytest.approx([-0.2, -1.7, -1.7])
    long = SelfCertaintyReward("group", window=3)
    assert long.prefix_scores([[-0.1, -0.2], [-0.9, -0.9, -0.9, -0.1]]) == pytest.approx([-0.15, -0.9])
    values = [-0.3, -0.1, -2.0, -0.05, -0.6, -0.2, -0.9, -0.01]
    assert long.prefix_scores([values]) == pytest.approx([lowest_group_mean(values, 3)])


def test_an_impossible_token_zeroes_every_prefix_that_covers_it():
    for reward in (SelfCertaintyReward(), SelfCertaintyReward("group", window=2)):
        scores = reward.prefix_scores([[-0.5], [-0.2, -math.inf], [-0.1, -0.1, -0.1]])
        assert scores[0] == pytest.approx(-0.5)
        assert scores[1] == -math.inf and scores[2] == -math.inf


def test_aggregations_join_the_logprobs_with_the_steps():
    reward = SelfCertaintyReward()
    steps = ["Add 1\n\n", "Add 2\n\n", "\\boxed{3}"]
    logprobs = [[-1.0, -1.0], [-0.5, -0.5, -2.0], [-0.2]]
    # running means: -2/2, -5/5, -5.2/6
    running = [-1.0, -1.0, -5.2 / 6]

    async def aggregated(how):
        [value] = await score_trajectories(reward, ["q"], [steps], how, logprobs=[logprobs])
        return value

    assert asyncio.run(aggregated("model")) == pytest.approx(-5.2 / 6)
    assert asyncio.run(aggregated("last")) == pytest.approx(-5.2 / 6)
    assert asyncio.run(aggregated("min")) == pytest.approx(-1.0)
    assert asyncio.run(aggregated("prod")) == pytest.approx(sum(running))  # a sum on the log scale
    assert reward.scale == "log"


def test_score_trajectories_checks_the_logprobs_shape():
    reward = SelfCertaintyReward()
    with pytest.raises(ValueError, match="2 steps but log-probabilities for 1"):
        asyncio.run(score_trajectories(reward, ["q"], [["a", "b"]], "prod", logprobs=[[[-1.0]]]))
    with pytest.raises(ValueError, match="log-probabilities for 2 trajectories but 1"):
        asyncio.run(score_trajectories(reward, ["q"], [["a"]], "model", logprobs=[[[-1.0]], [[-1.0]]]))
    with pytest.raises(ValueError, match="pair up"):
        asyncio.run(reward.score_with_logprobs(["q", "r"], [["a"]], [[[-1.0]]]))


# -- errors for callers without log-probabilities ---------------------------


def test_texts_alone_get_a_clear_error():
    reward = SelfCertaintyReward()
    with pytest.raises(ValueError, match="policy's own token log-probabilities"):
        asyncio.run(reward.score(["q"], [["Add 1\n\n"]]))
    with pytest.raises(ValueError, match="policy's own token log-probabilities"):
        asyncio.run(score_trajectories(reward, ["q"], [["Add 1\n\n"]], "model"))


def test_piscale_score_reports_that_it_needs_a_search():
    from typer.testing import CliRunner

    from piscale.cli import app

    result = CliRunner().invoke(app, ["score", "q", "Add 1", "--reward", "certainty"])
    assert result.exit_code == 2  # a usage error, not a traceback
    assert "reads the policy's token log-probabilities, which only a search has" in result.stderr


def test_bad_values_and_statistics():
    with pytest.raises(ValueError, match="NaN"):
        SelfCertaintyReward().prefix_scores([[-0.1, float("nan")]])
    with pytest.raises(ValueError, match="must be <= 0"):
        SelfCertaintyReward().prefix_scores([[0.7]])  # a probability passed for a log-probability
    with pytest.raises(ValueError, match="unknown self-certainty statistic 'median'"):
        SelfCertaintyReward("median")
    with pytest.raises(ValueError, match="positive number of tokens"):
        SelfCertaintyReward("group", window=0)


def test_specs():
    mean = from_spec("certainty")
    assert isinstance(mean, SelfCertaintyReward) and mean.statistic == "mean" and mean.needs_logprobs
    assert from_spec("certainty:mean").statistic == "mean"
    group = from_spec("certainty:group")
    assert (group.statistic, group.window, group.name) == ("group", DEFAULT_WINDOW, f"certainty:group:{DEFAULT_WINDOW}")
    assert from_spec("certainty:group:8").window == 8
    for spec, message in [
        ("certainty:median", "unknown self-certainty statistic 'median'"),
        ("certainty:mean:4", "only 'certainty:group' takes a window"),
        ("certainty:group:0", "positive number of tokens"),
        ("certainty:group:x", "positive number of tokens"),
    ]:
        with pytest.raises(ValueError, match=message):
            from_spec(spec)


# -- inside searches, against the toy model's exact probabilities ------------


def test_backend_logprobs_are_the_exact_ones_and_the_score_is_their_mean():
    lm = ToyLM()
    result = solve(lm, from_spec("certainty"), "pf", budget=6, seed=3, temperature=1.0)
    for candidate in result.candidates:
        assert candidate.finished
        assert candidate.score == pytest.approx(exact_mean(lm, candidate.text), abs=1e-12)
    # The statistic is a per-token mean, not a total: answers of different
    # lengths make the two differ, so this is not a check of log p(x).
    totals = {c.text: sum(exact_token_logprobs(lm, c.text)) for c in result.candidates}
    assert any(c.score != pytest.approx(totals[c.text]) for c in result.candidates)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_scores_its_answers_by_their_mean_logprob(algorithm):
    lm = ToyLM()
    result = solve(lm, from_spec("certainty"), algorithm, budget=8, seed=1, temperature=1.0)
    assert result.candidates
    for candidate in result.candidates:
        assert candidate.score == pytest.approx(exact_mean(lm, candidate.text), abs=1e-12)
    assert lm.live_sequences == 0


def test_composed_rewards_pass_the_logprobs_to_the_term_that_reads_them():
    """0.5 * certainty + 2 * log(arith) in a search, and certainty at T = 0.5:
    each answer's score is the hand combination of its exact mean log-probability."""
    from piscale.rewards import ArithmeticReward, Transformed, WeightedSum

    lm = ToyLM()
    arith = ArithmeticReward()
    summed = WeightedSum([(0.5, from_spec("certainty")), (2.0, arith)])
    sharper = Transformed(from_spec("certainty"), temperature=0.5)
    assert summed.needs_logprobs and sharper.needs_logprobs
    assert not WeightedSum([(1.0, arith)]).needs_logprobs
    for candidate in solve(lm, summed, "bon", budget=4, seed=2, temperature=1.0).candidates:
        [[checked]] = asyncio.run(arith.score([QUESTION], [[candidate.text]]))
        expected = 0.5 * exact_mean(lm, candidate.text) + 2.0 * math.log(checked)
        assert candidate.score == pytest.approx(expected, abs=1e-9)
    for candidate in solve(lm, sharper, "bon", budget=4, seed=2, temperature=1.0).candidates:
        assert candidate.score == pytest.approx(exact_mean(lm, candidate.text) / 0.5, abs=1e-9)


def test_an_exponent_in_a_spec_weighs_its_term():
    """certainty^20*arith: 20 x the exact mean log-probability + log(arith);
    certainty^1 is certainty itself; a verifier's answer keeps its '^'."""
    from piscale.rewards import ArithmeticReward, WeightedSum
    from piscale.rewards.spec import product_terms, split_exponent

    lm = ToyLM()
    weighed = from_spec("certainty^20*arith")
    assert isinstance(weighed, WeightedSum) and [w for w, _ in weighed.terms] == [20.0, 1.0]
    assert weighed.needs_logprobs
    for candidate in solve(lm, weighed, "bon", budget=4, seed=2, temperature=1.0).candidates:
        [[checked]] = asyncio.run(ArithmeticReward().score([QUESTION], [[candidate.text]]))
        assert candidate.score == pytest.approx(20 * exact_mean(lm, candidate.text) + math.log(checked), abs=1e-9)
    assert isinstance(from_spec("certainty^1"), SelfCertaintyReward)
    assert isinstance(from_spec("certainty ^ 0.5"), WeightedSum)
    assert product_terms("value*certainty^20") == ["value", "certainty^20"]
    assert split_exponent("verify:2^10") == ("verify:2^10", 1.0)
    assert split_exponent("value:heads/a.safetensors^2") == ("value:heads/a.safetensors", 2.0)
    from piscale.rewards.verify import VerifierReward

    assert isinstance(from_spec("verify:2^10"), VerifierReward)
    for bad, message in [("certainty^0", "positive"), ("arith^-1", "positive"), ("arith^x", "must be a number"),
                         ("certainty^inf", "finite")]:
        with pytest.raises(ValueError, match=message):
            from_spec(bad)


@pytest.mark.parametrize(
    "spec",
    ["arith", "certainty", "certainty:group:16", "arith*certainty", "arith^2", "certainty^1", "final:arith",
     "final:certainty^10", "arith*final:certainty^10", "verify:2*3", "verify:2^10", " Final: Certainty", "ARITH"],
)
def test_spec_scale_is_the_built_rewards_scale(spec):
    from piscale.rewards.spec import spec_scale

    assert spec_scale(spec) == from_spec(spec).scale


def test_a_final_certainty_term_weighs_in_on_the_answer_only():
    """arith*final:certainty^10 in a filter: every answer scores 10 x its
    exact mean log-probability + log(arith), and only the certainty part is
    the terminal one."""
    from piscale.rewards import ArithmeticReward, Terminal, WeightedSum
    from piscale.rewards.spec import term_kind

    lm = ToyLM()
    reward = from_spec("arith*final:certainty^10")
    assert isinstance(reward, WeightedSum) and reward.needs_logprobs
    assert [w for w, _ in reward.terms] == [1.0, 10.0] and isinstance(reward.terms[1][1], Terminal)
    result = solve(lm, reward, "pf", budget=6, seed=3, temperature=1.0, potential="incremental")
    for candidate in result.candidates:
        assert "\\boxed{" in candidate.text
        [[checked]] = asyncio.run(ArithmeticReward().score([QUESTION], [[candidate.text]]))
        assert candidate.score == pytest.approx(10 * exact_mean(lm, candidate.text) + math.log(checked), abs=1e-9)
    # Called directly, the product judges what it is given as an answer.
    [[partial]] = asyncio.run(reward.score_with_logprobs([QUESTION], [["Add 2\n\n"]], [[[-0.7, -0.2]]]))
    [[checked]] = asyncio.run(ArithmeticReward().score([QUESTION], [["Add 2\n\n"]]))
    assert partial == pytest.approx(math.log(checked) + 10 * (-0.45), abs=1e-12)
    # The wrapped kind is what a server or a product sees.
    assert term_kind("final:certainty^10") == "certainty"
    assert from_spec("final:verify:2^10").reward.reference == "2^10"
    with pytest.raises(ValueError, match="final:SPEC"):
        from_spec("final:")


def test_sampling_temperature_does_not_change_the_scores():
    # Backends report log-probabilities at temperature 1, so answers drawn
    # at 0.5 are scored by the model's own probabilities all the same.
    lm = ToyLM()
    result = solve(lm, from_spec("certainty"), "bon", budget=8, seed=0, temperature=0.5)
    for candidate in result.candidates:
        assert candidate.score == pytest.approx(exact_mean(lm, candidate.text), abs=1e-12)


def test_group_statistic_in_a_search_matches_brute_force():
    lm = ToyLM()
    result = solve(lm, from_spec("certainty:group:4"), "pf", budget=6, seed=2, temperature=1.0)
    for candidate in result.candidates:
        values = exact_token_logprobs(lm, candidate.text)
        assert candidate.score == pytest.approx(lowest_group_mean(values, 4), abs=1e-12)
    assert any(len(exact_token_logprobs(lm, c.text)) > 4 for c in result.candidates)


def test_sampled_answers_keep_logprobs_with_their_tokens():
    lm = ToyLM()
    driver = Driver(lm, SelfCertaintyReward(), QUESTION, lm.prompt_ids(QUESTION, None), Settings(temperature=1.0))
    answers = asyncio.run(driver.sample(6, np.random.default_rng(0)))
    for node in answers:
        lineage = node.lineage()
        assert all(step.logprobs == () and step.token_ids == () for step in lineage[:-1])
        assert len(node.logprobs) == len(node.token_ids) == node.total_tokens
        assert sum(node.logprobs) == pytest.approx(sum(exact_token_logprobs(lm, node.response())))
    assert any(len(node.lineage()) > 1 for node in answers)
    # Only the last step holds tokens, so earlier prefixes score 0 (never the
    # lowest, nothing added to a sum): every aggregation gives the whole
    # answer's mean.
    for how in ("prod", "min", "last"):
        driver = Driver(
            lm, SelfCertaintyReward(), QUESTION, lm.prompt_ids(QUESTION, None), Settings(temperature=1.0, aggregation=how)
        )
        for node in asyncio.run(driver.sample(4, np.random.default_rng(5))):
            assert node.score == pytest.approx(exact_mean(lm, node.response()), abs=1e-12)


def test_best_of_n_picks_the_highest_mean_logprob():
    lm = ToyLM()
    result = solve(lm, from_spec("certainty"), "bon", budget=16, seed=4, temperature=1.0)
    means = [exact_mean(lm, c.text) for c in result.candidates]
    assert result.chosen == int(np.argmax(means))
    assert result.candidates[result.chosen].score == pytest.approx(max(means))
    # Ranking by log p(x) instead would choose another answer here, so the
    # check above tells a mean from a total.
    totals = [sum(exact_token_logprobs(lm, c.text)) for c in result.candidates]
    assert means[int(np.argmax(totals))] < max(means)


def test_weighted_best_of_n_pools_geometric_mean_probabilities():
    lm = ToyLM()
    result = solve(lm, from_spec("certainty"), "wbon", budget=16, seed=0, temperature=1.0)
    means = np.array([exact_mean(lm, c.text) for c in result.candidates])
    mass: dict[str, float] = defaultdict(float)
    for candidate, value in zip(result.candidates, means):
        mass[extract_answer(candidate.text)] += math.exp(value - means.max())
    winner = max(mass, key=mass.get)
    assert result.answer == winner
    # Here pooling matters: the single most confident sample gives another answer.
    assert extract_answer(result.candidates[int(np.argmax(means))].text) != winner
    members = [i for i, c in enumerate(result.candidates) if extract_answer(c.text) == winner]
    assert result.chosen == max(members, key=lambda i: means[i])


# -- particle filtering with the incremental potential, by hand ---------------


def two_step_scores(text: str) -> tuple[float, float]:
    """(score after step 1, score after step 2) of a two-step answer: step 1
    holds the letter and the delimiter (log 1), step 2 "\\boxed{", the digit,
    "}" and EOS (all log 1 but the digit's)."""
    letter, digit = text[0], extract_answer(text)
    first = math.log(LETTER[letter])
    return first / 2, (first + math.log(DIGIT[letter][digit])) / 6


def test_incremental_pf_weights_by_hand_resampling_every_step():
    tau = 0.5
    result = solve(two_step_lm(), from_spec("certainty"), "pf", budget=8, seed=0, temperature=1.0,
                   potential="incremental", softmax_temperature=tau)
    assert len({c.text for c in result.candidates}) > 1
    for candidate in result.candidates:
        first, second = two_step_scores(candidate.text)
        assert candidate.score == pytest.approx(second, abs=1e-12)
        # Weights are reset by the resampling after step 1; step 2 adds the
        # change of the log-potential over the temperature.
        assert candidate.log_weight == pytest.approx((second - first) / tau, abs=1e-12)


def test_incremental_pf_weights_by_hand_without_resampling():
    tau = 0.25
    # ESS / N never falls under 1e-6 (it is at least 1 / N), so the weights
    # accumulate from the start: the root's potential is 0, so they telescope
    # to the final score over the temperature.
    result = solve(two_step_lm(), from_spec("certainty"), "pf", budget=8, seed=0, temperature=1.0,
                   potential="incremental", softmax_temperature=tau, ess_threshold=1e-6)
    for candidate in result.candidates:
        _, second = two_step_scores(candidate.text)
        assert candidate.log_weight == pytest.approx(second / tau, abs=1e-12)


def test_incremental_pf_targets_the_model_tilted_by_its_confidence():
    tau = 0.2
    exact = {}
    for letter in LETTER:
        for digit in DIGIT[letter]:
            text = f"{letter}\n\n\\boxed{{{digit}}}"
            exact[text] = LETTER[letter] * DIGIT[letter][digit] * math.exp(two_step_scores(text)[1] / tau)
    total = sum(exact.values())
    exact = {text: mass / total for text, mass in exact.items()}
    result = solve(two_step_lm(), from_spec("certainty"), "pf", budget=2048, seed=7, temperature=1.0,
                   potential="incremental", softmax_temperature=tau)
    log_weights = np.array([c.log_weight for c in result.candidates])
    weights = np.exp(log_weights - log_weights.max())
    weights /= weights.sum()
    estimate: dict[str, float] = defaultdict(float)
    for candidate, weight in zip(result.candidates, weights):
        estimate[candidate.text] += weight
    distance = 0.5 * sum(abs(estimate.get(t, 0.0) - exact[t]) for t in exact)
    untilted = {t: LETTER[t[0]] * DIGIT[t[0]][extract_answer(t)] for t in exact}
    assert 0.5 * sum(abs(untilted[t] - exact[t]) for t in exact) > 0.2  # the tilt matters
    assert distance < 0.03


# -- backends that do not return usable log-probabilities --------------------


class DroppingLM(ToyLM):
    """Returns each step's tokens with ``replace(logprobs)`` instead of theirs."""

    def __init__(self, replace, **options):
        super().__init__(**options)
        self.replace = replace

    async def extend(self, handles, params, seeds=None):
        outputs = await super().extend(handles, params, seeds)
        return [StepOutput(o.token_ids, o.text, self.replace(o.logprobs), o.finish_reason, o.error) for o in outputs]


def test_a_backend_without_logprobs_is_an_error_in_a_search():
    with pytest.raises(RuntimeError, match="returned 0 log-probabilities for .* tokens; reward 'certainty'"):
        solve(DroppingLM(lambda values: []), from_spec("certainty"), "pf", budget=2)
    with pytest.raises(ValueError, match="no log-probability for some tokens"):
        solve(DroppingLM(lambda values: [float("nan")] * len(values)), from_spec("certainty"), "bon", budget=2)


def test_rewards_that_do_not_ask_get_no_logprobs():
    class TextOnly(Reward):
        scale = "probability"

        async def score(self, prompts, trajectories):
            return [[0.5] * len(steps) for steps in trajectories]

        async def score_with_logprobs(self, prompts, trajectories, logprobs):
            raise AssertionError("a text-only reward was sent log-probabilities")

    # Even a backend without log-probabilities is fine for such a reward.
    result = solve(DroppingLM(lambda values: []), TextOnly(), "pf", budget=4, potential="incremental")
    assert all(c.score == 0.5 for c in result.candidates)
    [value] = asyncio.run(score_trajectories(TextOnly(), ["q"], [["a", "b"]], "prod", logprobs=[[[-1.0], [-2.0]]]))
    assert value == pytest.approx(0.25)


def test_split_steps_matches_the_two_step_layout():
    # The hand computations above assume step 1 is "A\n\n" (two tokens).
    lm = two_step_lm()
    assert split_steps("A\n\n\\boxed{1}", STEP) == ["A\n\n", "\\boxed{1}"]
    assert exact_token_logprobs(lm, "A\n\n\\boxed{1}") == pytest.approx(
        [math.log(0.7), 0.0, 0.0, math.log(0.9), 0.0, 0.0]
    )


def test_step_logprobs_reads_stored_answers_step_by_step():
    """Answers stored as text get back the exact log-probabilities of their
    tokens, split at their step boundaries; an answer read as one step gets
    the same numbers in one list, and its certainty is the same."""
    lm = two_step_lm()
    stored = [["A\n\n", "\\boxed{1}"], ["B\n\n", "\\boxed{2}"]]
    by_step = asyncio.run(step_logprobs(lm, QUESTION, stored))
    log = math.log
    assert by_step == [
        [pytest.approx([log(0.7), 0.0]), pytest.approx([0.0, log(0.9), 0.0])],
        [pytest.approx([log(0.3), 0.0]), pytest.approx([0.0, log(0.5), 0.0])],
    ]
    for steps, split in zip(stored, by_step):
        assert sum(split, []) == pytest.approx(exact_token_logprobs(lm, "".join(steps), finished=False))
    whole = asyncio.run(step_logprobs(lm, QUESTION, [["".join(steps)] for steps in stored]))
    reward = SelfCertaintyReward()
    for split, [one] in zip(by_step, whole):
        assert one == pytest.approx(sum(split, []))
        assert reward.prefix_scores(split)[-1] == pytest.approx(reward.prefix_scores([one])[0])


def test_given_the_policy_it_scores_answers_from_text_alone():
    """With the policy that wrote them, stored answers score as the search
    scored them (the exact per-token means of each prefix, here without the
    end-of-sequence token, which a stored text does not hold), questions
    grouped however they come."""
    lm = two_step_lm()
    reward = SelfCertaintyReward(policy=lm)
    stored = [["A\n\n", "\\boxed{1}"], ["B\n\n", "\\boxed{2}"], ["A\n\n"]]
    scores = asyncio.run(reward.score([QUESTION, "Another question.", QUESTION], stored))
    log = math.log
    assert scores[0] == pytest.approx([log(0.7) / 2, log(0.63) / 5])
    assert scores[2] == pytest.approx([log(0.7) / 2])
    # The toy rule ignores the question, so the other one reads the same numbers.
    assert scores[1] == pytest.approx([log(0.3) / 2, log(0.15) / 5])
    # Two-token groups: the weakest pair so far is ("A", "\n\n"), at either prefix.
    group = SelfCertaintyReward("group", 2, policy=lm)
    assert asyncio.run(group.score([QUESTION], stored[:1])) == [pytest.approx([log(0.7) / 2, log(0.7) / 2])]
    with pytest.raises(TypeError, match="trajectory 0 is a string"):
        asyncio.run(reward.score([QUESTION], ["A\n\n"]))
