"""The one-run audit's bound against an independent computation: binomial tails summed term by term, a closed
form derived by hand, and randomised response, whose epsilon is known."""

import math

import numpy as np
import pytest

from common.dp.audit import audit, epsilon_lower_bound, p_value


def direct_tail(r, v, p):
    """P[Binomial(r, p) >= v], term by term."""
    return math.fsum(math.comb(r, k) * p ** k * (1 - p) ** (r - k) for k in range(max(v, 0), r + 1))


def direct_p_value(m, r, v, epsilon, delta):
    p = math.exp(epsilon) / (1 + math.exp(epsilon))
    tail = direct_tail(r, v, p)
    correction = max((direct_tail(r, v - i, p) - tail) / i for i in range(1, m + 1))
    return min(tail + 2 * m * delta * correction, 1.0)


@pytest.mark.parametrize("m, r, v, epsilon, delta", [(100, 40, 35, 1.0, 0.0), (100, 40, 35, 1.0, 1e-5),
                                                     (300, 200, 150, 0.5, 1e-3), (50, 50, 50, 3.0, 0.0),
                                                     (30, 10, 0, 2.0, 1e-2)])
def test_p_value_is_the_binomial_tail_with_its_delta_term(m, r, v, epsilon, delta):
    expected = direct_p_value(m, r, v, epsilon, delta)
    assert p_value(m, r, v, epsilon, delta) == pytest.approx(expected, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("guesses", [10, 100, 1000])
def test_all_guesses_right_give_the_closed_form(guesses):
    """Every guess right at delta 0: p_value = p^r, so the bound solves p^r = 0.05, epsilon = log(c / (1 - c)) with
    c = 0.05^(1/r); r = 100 gives 3.49 (the paper's sanity value)."""
    c = 0.05 ** (1 / guesses)
    assert epsilon_lower_bound(guesses, guesses, guesses) == pytest.approx(math.log(c / (1 - c)), abs=1e-6)
    if guesses == 100:
        assert epsilon_lower_bound(100, 100, 100) == pytest.approx(3.49, abs=0.01)


def test_no_better_than_chance_gives_zero_and_delta_only_lowers_the_bound():
    assert epsilon_lower_bound(1000, 1000, 500) == 0.0
    assert epsilon_lower_bound(1000, 200, 190, delta=1e-5) < epsilon_lower_bound(1000, 200, 190)


def randomised_response_scores(epsilon, m, generator):
    """Canaries' scores from epsilon-DP randomised response on their inclusion coins."""
    included = generator.random(m) < 0.5
    truthful = generator.random(m) < math.exp(epsilon) / (1 + math.exp(epsilon))
    reported = np.where(truthful, included, ~included)
    return reported + 1e-3 * generator.random(m), included  # ties broken at random


def test_the_audit_of_randomised_response_is_valid_and_close():
    """Over 100 runs of an epsilon-DP mechanism the bound exceeds epsilon in at most about 5% (its confidence)."""
    generator = np.random.default_rng(0)
    bounds = []
    for _ in range(100):
        scores, included = randomised_response_scores(2.0, 1000, generator)
        bounds.append(audit(scores, included, delta=0.0).epsilon_lower_bound)
    bounds = np.array(bounds)
    assert (bounds > 2.0).mean() <= 0.1
    assert 1.5 < np.median(bounds) <= 2.0  # 1,000 canaries of randomised response: a tight audit


def test_a_mechanism_without_privacy_is_caught():
    generator = np.random.default_rng(1)
    scores, included = randomised_response_scores(30.0, 1000, generator)  # (almost) always the truth
    result = audit(scores, included, delta=1e-5)
    assert result.correct == result.guesses and result.epsilon_lower_bound > 4


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="correct <= guesses <= m"):
        p_value(10, 20, 5, 1.0)
    with pytest.raises(ValueError, match="at least 2 canaries"):
        audit([0.1], [True], delta=0.0)
