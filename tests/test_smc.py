"""piscale.smc: weights, ESS, resampling schemes, potentials, swap moves."""

from __future__ import annotations

import math

import numpy as np
import pytest

from piscale import smc

WEIGHTS = np.array([0.31, 0.02, 0.0, 0.17, 0.25, 0.05, 0.2])
N = 10
DRAWS = 4000


def counts_of(scheme, weights=WEIGHTS, n=N, draws=DRAWS, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([np.bincount(scheme(weights, n, rng), minlength=len(weights)) for _ in range(draws)])


# -- weights ------------------------------------------------------------------


def test_normalize_matches_softmax_and_survives_large_values():
    log_weights = np.array([1000.0, 1001.0, 999.0, -np.inf])
    expected = np.exp([0.0, 1.0, -1.0]) / np.exp([0.0, 1.0, -1.0]).sum()
    weights = smc.normalize(log_weights)
    np.testing.assert_allclose(weights[:3], expected, rtol=1e-12)
    assert weights[3] == 0.0


@pytest.mark.parametrize("bad", [[-np.inf, -np.inf], [0.0, np.nan], [0.0, np.inf], []])
def test_normalize_rejects_degenerate_input(bad):
    with pytest.raises(ValueError):
        smc.normalize(np.array(bad))


def test_log_mean_exp():
    values = np.array([-2.0, 0.5, 3.0])
    assert smc.log_mean_exp(values) == pytest.approx(math.log(np.mean(np.exp(values))))
    assert smc.log_mean_exp(np.array([-np.inf, -np.inf])) == -np.inf


def test_effective_sample_size_known_values():
    assert smc.effective_sample_size(np.full(8, 1 / 8)) == pytest.approx(8.0)
    assert smc.effective_sample_size(np.array([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert smc.effective_sample_size(np.array([0.5, 0.25, 0.25])) == pytest.approx(1 / 0.375)
    with pytest.raises(ValueError, match="sum to 1"):
        smc.effective_sample_size(np.array([0.5, 0.6]))


# -- resampling ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(smc.RESAMPLERS))
def test_resampling_is_unbiased(name):
    counts = counts_of(smc.RESAMPLERS[name])
    assert counts.shape == (DRAWS, len(WEIGHTS))
    assert (counts.sum(axis=1) == N).all()
    assert (counts[:, 2] == 0).all(), "a zero-weight particle was picked"
    # The mean count of particle i must be N w_i up to Monte Carlo error:
    # five standard errors of the mean, from the larger of the empirical and
    # the multinomial variance (a floor for the schemes whose counts barely vary).
    variance = np.maximum(counts.var(axis=0), N * WEIGHTS * (1 - WEIGHTS))
    tolerance = 5 * np.sqrt(variance / DRAWS) + 1e-12
    np.testing.assert_array_less(np.abs(counts.mean(axis=0) - N * WEIGHTS), tolerance)


def test_multinomial_variance_matches_theory():
    counts = counts_of(smc.multinomial)
    theory = N * WEIGHTS * (1 - WEIGHTS)
    assert counts.var(axis=0).sum() == pytest.approx(theory.sum(), rel=0.1)


@pytest.mark.parametrize("name", ["systematic", "stratified", "residual"])
def test_low_variance_schemes_beat_multinomial(name):
    variance = counts_of(smc.RESAMPLERS[name]).var(axis=0).sum()
    multinomial = (N * WEIGHTS * (1 - WEIGHTS)).sum()
    assert variance < 0.6 * multinomial


def test_systematic_and_residual_counts_respect_the_floor():
    expected = N * WEIGHTS
    systematic = counts_of(smc.systematic, draws=500)
    assert ((systematic >= np.floor(expected) - 1e-9) & (systematic <= np.ceil(expected) + 1e-9)).all()
    residual = counts_of(smc.residual, draws=500)
    assert (residual >= np.floor(expected)).all()


def test_resampling_edge_cases():
    rng = np.random.default_rng(1)
    for scheme in smc.RESAMPLERS.values():
        assert len(scheme(np.array([1.0]), 5, rng)) == 5
        assert list(scheme(np.array([0.0, 1.0, 0.0]), 3, rng)) == [1, 1, 1]
        assert len(scheme(WEIGHTS, 0, rng)) == 0
    with pytest.raises(ValueError, match="unknown resampling scheme"):
        smc.resampler("bogus")
    with pytest.raises(ValueError, match="non-negative integer"):
        smc.multinomial(WEIGHTS, -1, rng)


def test_conditional_resampling_keeps_the_reference():
    rng = np.random.default_rng(2)
    others = []
    for _ in range(DRAWS):
        ancestors = smc.conditional_multinomial(WEIGHTS, N, rng, reference=3)
        assert ancestors[3] == 3
        others.append(np.bincount(np.delete(ancestors, 3), minlength=len(WEIGHTS)))
    counts = np.array(others)
    # The free slots are N - 1 multinomial draws.
    expected = (N - 1) * WEIGHTS
    tolerance = 5 * np.sqrt((N - 1) * WEIGHTS * (1 - WEIGHTS) / DRAWS) + 1e-12
    np.testing.assert_array_less(np.abs(counts.mean(axis=0) - expected), tolerance)
    with pytest.raises(ValueError, match="reference slot"):
        smc.conditional_multinomial(WEIGHTS, N, rng, reference=N)


# -- potentials ---------------------------------------------------------------


def test_potentials_by_scale():
    scores = np.array([0.8, 0.5, 1.0, 0.0])
    paper = smc.log_potential(scores, "probability", "paper")
    assert paper[0] == pytest.approx(math.log(4.0))
    assert paper[1] == pytest.approx(0.0)
    assert np.isfinite(paper).all(), "a verifier's 0 or 1 must not give an infinite logit"
    incremental = smc.log_potential(scores, "probability", "incremental")
    assert incremental[0] == pytest.approx(math.log(0.8))
    assert incremental[3] == -np.inf
    log_scores = np.array([-3.0, 2.5])
    for kind in smc.POTENTIALS:
        np.testing.assert_array_equal(smc.log_potential(log_scores, "log", kind), log_scores)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        smc.log_potential(np.array([1.5]), "probability", "paper")
    with pytest.raises(ValueError, match="unknown potential"):
        smc.log_potential(scores, "probability", "cumulative")
    with pytest.raises(ValueError, match="unknown reward scale"):
        smc.log_potential(scores, "odds", "paper")


def test_incremental_weights_telescope_to_the_final_reward():
    rewards = [0.3, 0.9, 0.5, 0.7]  # one particle's rewards at steps 1..4
    log_weights, previous = np.zeros(1), np.zeros(1)
    for reward in rewards:
        current = smc.log_potential(np.array([reward]), "probability", "incremental")
        log_weights = smc.incremental_log_weights(log_weights, current, previous, temperature=2.0)
        previous = current
    assert log_weights[0] == pytest.approx(math.log(rewards[-1]) / 2.0)


def test_paper_weights_are_the_current_logit():
    current = smc.log_potential(np.array([0.9, 0.6]), "probability", "paper")
    np.testing.assert_allclose(smc.paper_log_weights(current, 0.5), [2 * math.log(9), 2 * math.log(1.5)])
    with pytest.raises(ValueError, match="temperature"):
        smc.paper_log_weights(current, 0.0)


def test_a_zero_weight_stays_zero():
    log_weights = smc.incremental_log_weights(np.zeros(2), np.array([-np.inf, -1.0]), np.zeros(2))
    assert log_weights[0] == -np.inf
    again = smc.incremental_log_weights(log_weights, np.array([-np.inf, -2.0]), np.array([-np.inf, -1.0]))
    assert again[0] == -np.inf and again[1] == pytest.approx(-2.0)


def test_swap_probability_matches_the_tempered_targets():
    # pi_k(x) = p(x) exp(phi(x) / T_k), with explicit p to check it cancels.
    p = {"x": 0.03, "y": 0.4}
    phi = {"x": 2.0, "y": -1.0}
    temperatures = (1.0, 3.0)

    def pi(state: str, k: int) -> float:
        return p[state] * math.exp(phi[state] / temperatures[k])

    for cold, hot in (("x", "y"), ("y", "x")):
        direct = min(1.0, pi(cold, 1) * pi(hot, 0) / (pi(cold, 0) * pi(hot, 1)))
        assert smc.swap_probability(phi[cold], phi[hot], *temperatures) == pytest.approx(direct)
    # The better state moving to the cold chain is always accepted.
    assert smc.swap_probability(phi["y"], phi["x"], *temperatures) == 1.0
    assert smc.swap_probability(phi["x"], phi["y"], *temperatures) == pytest.approx(math.exp(-2.0))


# -- the weights record and the evidence ---------------------------------------


def test_weights_record_properties():
    weights = smc.Weights.equal(4)
    assert weights.log_z == 0.0 and weights.ess == pytest.approx(4.0)
    np.testing.assert_allclose(weights.normalized, np.full(4, 0.25))
    step = weights.reweighted(np.log([0.1, 0.2, 0.3, 0.4]))
    assert step.log_z == pytest.approx(math.log(0.25))  # mean of the increments
    np.testing.assert_allclose(step.normalized, [0.1, 0.2, 0.3, 0.4])
    assert step.ess == pytest.approx(1 / (0.01 + 0.04 + 0.09 + 0.16))
    assert weights.log_z == 0.0, "records are immutable: reweighting returns a new one"
    with pytest.raises(ValueError):
        step.log_weights[0] = 0.0
    with pytest.raises(AttributeError):
        step.banked_log_z = 1.0  # type: ignore[misc]


def test_evidence_multiplies_the_mean_weight_of_each_resampled_step():
    g1, g2 = np.log([0.5, 0.1, 0.9]), np.log([0.3, 0.6, 0.2])
    # Resampling between the steps: Ẑ = mean(G1) · mean(G2).
    resampled = smc.Weights.equal(3).reweighted(g1).resampled().reweighted(g2)
    assert resampled.log_z == pytest.approx(math.log(np.mean(np.exp(g1)) * np.mean(np.exp(g2))))
    # No resampling: the weights carry over, Ẑ = mean(G1 · G2), which is
    # mean(G1) · Σ_i W1_i G2_i (the step's average under the carried weights).
    carried = smc.Weights.equal(3).reweighted(g1).reweighted(g2)
    expected = np.mean(np.exp(g1 + g2))
    assert carried.log_z == pytest.approx(math.log(expected))
    w1 = np.exp(g1) / np.exp(g1).sum()
    assert carried.log_z == pytest.approx(math.log(np.mean(np.exp(g1)) * np.sum(w1 * np.exp(g2))))


def test_set_weights_carry_no_estimate_and_zero_weights_give_zero_evidence():
    replaced = smc.Weights.equal(2).reweighted(np.log([0.5, 0.5])).replaced(np.array([1.0, 2.0]))
    assert replaced.log_z is None and replaced.resampled().log_z is None
    dead = smc.Weights.equal(2).reweighted(np.array([-np.inf, -np.inf]))
    assert dead.log_z == -np.inf
    restarted = dead.restarted(np.zeros(2))
    assert restarted.log_z == -np.inf and restarted.ess == pytest.approx(2.0)


def test_evidence_estimate_is_unbiased_on_a_two_step_model():
    # A Feynman-Kac model small enough to sum: x1 ~ P1, x2 | x1 ~ P2[x1],
    # potentials G1(x1), G2(x1, x2). Z = Σ P1 G1 Σ P2 G2. A particle filter's
    # Ẑ is unbiased for every N, even N = 3: the mean over many runs must
    # lie within four standard errors of Z, with or without resampling.
    p1, g1 = np.array([0.3, 0.7]), np.array([0.2, 0.9])
    p2, g2 = np.array([[0.5, 0.5], [0.1, 0.9]]), np.array([[1.0, 0.1], [0.4, 0.8]])
    z = float(np.sum(p1 * g1 * np.sum(p2 * g2, axis=1)))
    rng = np.random.default_rng(7)
    for resample in (True, False):
        estimates = []
        for _ in range(4000):
            x1 = rng.choice(2, size=3, p=p1)
            weights = smc.Weights.equal(3).reweighted(np.log(g1[x1]))
            if resample:
                x1 = x1[smc.multinomial(weights.normalized, 3, rng)]
                weights = weights.resampled()
            x2 = (rng.random(3) < p2[x1, 1]).astype(int)
            estimates.append(np.exp(weights.reweighted(np.log(g2[x1, x2])).log_z))
        estimates = np.array(estimates)
        standard_error = estimates.std(ddof=1) / math.sqrt(len(estimates))
        assert abs(estimates.mean() - z) < 4 * standard_error, (resample, estimates.mean(), z, standard_error)
