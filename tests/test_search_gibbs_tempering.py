"""Particle Gibbs keeps its reference; parallel tempering swaps by its formula."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from piscale.grading import extract_answer
from piscale.lm.toy import ToyLM
from piscale.rewards.base import Reward
from piscale.search import DEFAULT_SYSTEM_PROMPT, run

QUESTION = "Count up from where you start."


class SpreadReward(Reward):
    """Scores spread over (0, 1): boxed answers by value, partial answers by length."""

    scale = "probability"

    async def score(self, prompts, trajectories):
        rows = []
        for steps in trajectories:
            row = []
            for t in range(len(steps)):
                text = "".join(steps[: t + 1])
                answer = extract_answer(text)
                row.append((int(answer) + 0.5) / 10.5 if answer is not None else 0.3 + 0.1 * text.count("Add 2"))
            rows.append(row)
        return rows


def check_reference_survives(trace: dict) -> int:
    """Assert that in every sweep that was given a reference, slot 0 holds
    the reference's first t steps at step t. Returns how many steps were checked."""
    references = {(e["iteration"], e["chain"]): e["steps"] for e in trace["events"] if e["kind"] == "reference"}
    nodes = {n["id"]: n for n in trace["nodes"]}
    checked = 0
    sweeps: dict[tuple[int, int], list[dict]] = {}
    for record in trace["steps"]:
        sweeps.setdefault((record["iteration"], record["chain"]), []).append(record)
    for key, records in sweeps.items():
        if key not in references:
            assert key[0] == 0, f"sweep {key} ran without a reference"
            continue
        reference = references[key]
        for t, record in enumerate(records, start=1):
            slot0 = record["particles"][0]
            assert slot0["reference"]
            expected = reference[: min(t, len(reference))]
            # By node pointers...
            node, texts = nodes[slot0["node"]], []
            while node["parent"] is not None:
                texts.append(node["text"])
                node = nodes[node["parent"]]
            assert texts[::-1] == expected, f"reference lost at step {t} of sweep {key}"
            # ...and by the resampling record: slot 0 always descends from slot 0.
            if t > 1:
                assert slot0["ancestor"] == 0
            if record["ancestors"] is not None:
                assert record["ancestors"][0] == 0
            checked += 1
    return checked


def test_particle_gibbs_never_loses_the_reference():
    checked = 0
    for seed in range(25):
        lm = ToyLM()
        result = asyncio.run(
            run(lm, SpreadReward(), QUESTION, "pg", budget=12, seed=seed, trace=True, iterations=4, temperature=1.0)
        )
        assert result.settings["particles"] == 3 and result.settings["iterations"] == 4
        checked += check_reference_survives(result.trace)
        assert lm.live_sequences == 0
    assert checked > 100


def test_particle_gibbs_reference_is_copied_by_reopening():
    """Copies of the reference get backend sequences opened from its tokens,
    and those copies continue exactly where the reference was."""
    copies = 0
    for seed in range(10):
        result = asyncio.run(
            run(ToyLM(), SpreadReward(), QUESTION, "pg", budget=8, seed=seed, trace=True, iterations=2, temperature=1.0)
        )
        later = [r for r in result.trace["steps"] if r["iteration"] == 1]
        for previous, record in zip(later, later[1:]):
            for particle in record["particles"][1:]:
                if particle["ancestor"] == 0 and not previous["particles"][0]["finished"]:
                    copies += 1
        # Candidates are still answers the model can write.
        possible = {a.text for a in ToyLM().enumerate_answers(ToyLM().prompt_ids(QUESTION, DEFAULT_SYSTEM_PROMPT))}
        assert all(c.text in possible for c in result.candidates)
    assert copies > 0


def test_parallel_tempering_swaps_follow_the_acceptance_formula():
    probabilities, accepted = [], []
    checked = 0
    for seed in range(40):
        result = asyncio.run(
            run(
                ToyLM(), SpreadReward(), QUESTION, "pt", budget=24, seed=seed, trace=True,
                chains=3, iterations=4, temperatures=[1.0, 2.0, 5.0], temperature=1.0,
            )
        )
        ladder = result.settings["temperatures"]
        assert ladder == [1.0, 2.0, 5.0] and result.settings["particles"] == 2
        checked += check_reference_survives(result.trace)
        for event in (e for e in result.trace["events"] if e["kind"] == "swap"):
            k = event["chains"][0]
            colder, hotter = event["potentials"]
            # pi_k(x) ∝ p(x) exp(phi(x) / T_k): the ratio of the formula, p cancelling.
            log_ratio = hotter / ladder[k] + colder / ladder[k + 1] - colder / ladder[k] - hotter / ladder[k + 1]
            assert event["probability"] == pytest.approx(min(1.0, math.exp(log_ratio)))
            probabilities.append(event["probability"])
            accepted.append(event["accepted"])
    assert checked > 100
    probabilities, accepted = np.array(probabilities), np.array(accepted, dtype=float)
    assert len(probabilities) == 40 * 3 * 2
    assert 0.05 < probabilities.mean() < 0.95, "the test needs swaps that are neither sure nor hopeless"
    # Empirical acceptance rate vs the mean acceptance probability.
    standard_error = math.sqrt(np.sum(probabilities * (1 - probabilities))) / len(probabilities)
    assert abs(accepted.mean() - probabilities.mean()) < 4 * standard_error


def test_accepted_swaps_exchange_the_references():
    for seed in range(20):
        result = asyncio.run(
            run(ToyLM(), SpreadReward(), QUESTION, "pt", budget=8, seed=seed, trace=True, iterations=2, temperature=1.0)
        )
        events = result.trace["events"]
        [swap] = [e for e in events if e["kind"] == "swap"]
        references = {e["chain"]: e["steps"] for e in events if e["kind"] == "reference"}
        # The potential of the reference each chain now holds, recomputed from its text.
        rewards = asyncio.run(SpreadReward().score([QUESTION] * 2, [["".join(references[0])], ["".join(references[1])]]))
        logits = [math.log(r[0] / (1 - r[0])) for r in rewards]
        now = logits if not swap["accepted"] else logits[::-1]
        assert now == pytest.approx(swap["potentials"])
