"""Aggregation, score_trajectories, weighted sums and transforms."""

from __future__ import annotations

import math

import pytest

from piscale.rewards import (
    PrefixReward,
    Reward,
    Terminal,
    Transformed,
    WeightedSum,
    aggregate,
    answer_steps,
    join_steps,
    score_trajectories,
    split_terminal,
)


class TableReward(Reward):
    """Scores looked up in a table keyed by (prompt, partial answer text);
    records what it was asked."""

    def __init__(self, table: dict[tuple[str, tuple[str, ...]], float], scale="probability", outcome_only=False):
        self.table = table
        self.scale = scale
        self.outcome_only = outcome_only
        self.calls: list[tuple[list[str], list[list[str]]]] = []
        self.name = "table"

    async def score(self, prompts, trajectories):
        self.calls.append((list(prompts), [list(s) for s in trajectories]))
        return [
            [self.table[(p, tuple(steps[: t + 1]))] for t in range(len(steps))]
            for p, steps in zip(prompts, trajectories)
        ]


def test_aggregate_known_values():
    scores = [0.9, 0.5, 0.8]
    assert aggregate(scores, "prod") == pytest.approx(0.36)
    assert aggregate(scores, "min") == 0.5
    assert aggregate(scores, "last") == 0.8
    assert aggregate([0.7], "model") == 0.7
    # On the log scale the product of potentials is the sum of log-potentials.
    assert aggregate([-1.0, 2.5, -0.25], "prod", scale="log") == pytest.approx(1.25)
    assert aggregate([-1.0, 2.5, -0.25], "min", scale="log") == -1.0


def test_aggregate_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown aggregation 'mean'"):
        aggregate([0.5], "mean")
    with pytest.raises(ValueError, match="no steps"):
        aggregate([], "prod")
    with pytest.raises(ValueError, match="single step, got 2 scores"):
        aggregate([0.5, 0.6], "model")


def test_answer_steps_cut_a_written_answer_at_its_blank_lines():
    text = "Half of 8 is 4.\n\n\n\n4 + 3 = 7.\n\nSo \\boxed{7}\n\n"
    # Blank parts (a doubled blank line, the trailing one) are not steps.
    assert answer_steps(text) == ["Half of 8 is 4.", "4 + 3 = 7.", "So \\boxed{7}"]
    assert join_steps(answer_steps(text)) == text.replace("\n\n\n\n", "\n\n").strip()
    # A single line is one step; an answer with nothing in it stays as written.
    assert answer_steps("7") == ["7"]
    assert answer_steps("\n\n") == ["\n\n"]


async def test_a_terminal_term_scores_what_it_is_given_on_the_log_scale():
    box = "So \\boxed{7}."
    table = {
        ("q", ("Half is 4.",)): 0.25,
        ("q", ("Half is 4.", box)): 0.8,
    }
    inner = TableReward(table)
    final = Terminal(inner)
    assert final.scale == "log" and final.name == "final:table"
    scores = await final.score(["q"], [["Half is 4.", box]])
    assert scores == [[pytest.approx(math.log(0.25)), pytest.approx(math.log(0.8))]]
    # A zero probability stays an exact zero likelihood.
    table[("q", ("Half is 4.", box))] = 0.0
    [[_, last]] = await final.score(["q"], [["Half is 4.", box]])
    assert last == -math.inf
    with pytest.raises(ValueError, match="already terminal"):
        Terminal(final)


def test_split_terminal_separates_the_factors_of_a_product():
    a, b, c = TableReward({}), TableReward({}), TableReward({})
    steering, terminal = split_terminal(WeightedSum([(1.0, a), (2.0, Terminal(b)), (0.5, c)]))
    assert isinstance(steering, WeightedSum) and steering.terms == [(1.0, a), (0.5, c)]
    assert isinstance(terminal, WeightedSum) and terminal.terms == [(2.0, b)]
    assert split_terminal(Terminal(b)) == (None, b)
    assert split_terminal(a) == (a, None)
    assert split_terminal(None) == (None, None)
    plain = WeightedSum([(1.0, a), (1.0, b)])
    assert split_terminal(plain) == (plain, None)
    # Inside a transform or a mixture a terminal factor has no meaning apart.
    for nested in [
        Transformed(WeightedSum([(1.0, a), (1.0, Terminal(b))]), temperature=2.0),
        WeightedSum([(1.0, a), (1.0, WeightedSum([(1.0, Terminal(b))]))]),
        WeightedSum([(0.5, Terminal(a)), (0.5, Terminal(b))], combine="linear"),
    ]:
        with pytest.raises(ValueError, match="top-level product"):
            split_terminal(nested)


async def test_score_trajectories_model_sends_the_joined_answer_as_one_step():
    steps = ["First step.\n\n", "Second step.\n\n"]
    table = {
        ("q", ("First step.\n\nSecond step.",)): 0.25,
        ("q", ("First step.\n\n",)): 0.5,
        ("q", ("First step.\n\n", "Second step.\n\n")): 0.4,
    }
    reward = TableReward(table)
    assert await score_trajectories(reward, ["q"], [steps], "model") == [0.25]
    assert reward.calls[-1] == (["q"], [["First step.\n\nSecond step."]])
    assert await score_trajectories(reward, ["q"], [steps], "prod") == [pytest.approx(0.2)]
    assert await score_trajectories(reward, ["q"], [steps], "min") == [0.4]
    assert await score_trajectories(reward, ["q"], [steps], "last") == [0.4]
    assert reward.calls[-1] == (["q"], [steps])


async def test_score_trajectories_rejects_bad_input():
    reward = TableReward({})
    with pytest.raises(ValueError, match="2 prompts but 1 trajectories"):
        await score_trajectories(reward, ["a", "b"], [["x"]], "last")
    with pytest.raises(TypeError, match="is a string"):
        await score_trajectories(reward, ["a"], ["x"], "last")
    with pytest.raises(ValueError, match="has no steps"):
        await score_trajectories(reward, ["a"], [[]], "last")


async def test_weighted_sum_in_log_space_mixes_scales():
    prob = TableReward({("q", ("a",)): 0.5, ("q", ("a", "b")): 0.25})
    logs = TableReward({("q", ("a",)): 1.0, ("q", ("a", "b")): -2.0}, scale="log")
    mixed = WeightedSum([(2.0, prob), (0.5, logs)])
    assert mixed.scale == "log"
    scores = await mixed.score(["q"], [["a", "b"]])
    assert scores[0] == pytest.approx([2 * math.log(0.5) + 0.5, 2 * math.log(0.25) - 1.0])
    # A zero probability is an exact zero likelihood; a zero weight drops a term.
    zero = TableReward({("q", ("a",)): 0.0})
    assert (await WeightedSum([(1.0, zero), (1.0, logs)]).score(["q"], [["a"]])) == [[-math.inf]]
    assert (await WeightedSum([(0.0, zero), (1.0, logs)]).score(["q"], [["a"]])) == [[1.0]]
    with pytest.raises(ValueError, match="negative weight"):
        WeightedSum([(-1.0, zero)])


async def test_weighted_sum_linear_mixture_of_probabilities():
    first = TableReward({("q", ("a",)): 0.2}, outcome_only=True)
    second = TableReward({("q", ("a",)): 0.6})
    mixture = WeightedSum([(0.25, first), (0.75, second)], combine="linear")
    assert mixture.scale == "probability"
    assert not mixture.outcome_only
    assert (await mixture.score(["q"], [["a"]]))[0] == pytest.approx([0.5])
    with pytest.raises(ValueError, match="summing to 1"):
        WeightedSum([(0.5, first), (0.75, second)], combine="linear")
    with pytest.raises(ValueError, match="same scale"):
        WeightedSum([(0.5, first), (0.5, TableReward({}, scale="log"))], combine="linear")
    with pytest.raises(TypeError, match="term 0"):
        WeightedSum([(first, 0.5)])


async def test_transformed_logit_temperature_clip():
    base = TableReward({("q", ("a",)): 0.8, ("q", ("a", "b")): 1.0})
    tempered = Transformed(base, logit=True, temperature=2.0)
    assert tempered.scale == "log"
    scores = (await tempered.score(["q"], [["a", "b"]]))[0]
    assert scores[0] == pytest.approx(math.log(4.0) / 2)
    # p = 1 is clipped to 1 - eps before the logit, so the result is finite.
    assert scores[1] == pytest.approx(math.log((1 - 1e-6) / 1e-6) / 2)
    clipped = Transformed(base, logit=True, clip=(-1.0, 1.0))
    assert (await clipped.score(["q"], [["a", "b"]]))[0] == [1.0, 1.0]
    # On the probability scale a temperature tempers the likelihood: p^(1/T).
    sharp = Transformed(base, temperature=0.5)
    assert sharp.scale == "probability"
    assert (await sharp.score(["q"], [["a"]]))[0] == [pytest.approx(0.64)]
    with pytest.raises(ValueError, match="probability-scale"):
        Transformed(TableReward({}, scale="log"), logit=True)
    with pytest.raises(ValueError, match="temperature"):
        Transformed(base, temperature=0.0)


class CountingReward(PrefixReward):
    name = "count"

    def __init__(self):
        super().__init__(memo_size=3)
        self.asked: list = []

    async def score_prefixes(self, items):
        self.asked.extend(items)
        return [len(steps) + len(prompt) / 100 for prompt, steps in items]


async def test_prefix_reward_computes_each_prefix_once():
    reward = CountingReward()
    first = await reward.score(["ab", "ab"], [["x"], ["x", "y"]])
    assert first == [[1.02], [1.02, 2.02]]
    assert reward.asked == [("ab", ("x",)), ("ab", ("x", "y"))]
    await reward.score(["ab"], [["x", "y", "z"]])
    assert reward.asked[2:] == [("ab", ("x", "y", "z"))]
    assert reward.computed == 3
    # The memo holds 3 entries; a fourth pushes out the least recently used.
    await reward.score(["cd"], [["x"]])
    await reward.score(["ab"], [["x"]])
    assert reward.asked[-1] == ("ab", ("x",))
