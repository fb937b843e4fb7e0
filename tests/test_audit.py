"""The one-run audit's bound against an independent computation: binomial tails summed term by term, a closed
form derived by hand, and randomised response, whose epsilon is known."""

import json
import math
import os

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


def audited_trainer(tmp_path, seed, noise_multiplier, canaries=400, extra=()):
    """The DP loop on a tiny task with white-box canaries; deterministic DP seeds so the test is repeatable."""
    from common.dp.training import DPTrainer, sequence_classification_losses
    from tests.tiny_task import collate, parse_dp_args, tiny_dataset, tiny_model
    config = parse_dp_args(["--output_dir", str(tmp_path / "run" / f"out{seed}"), "--per_device_train_batch_size", "64",
                            "--num_train_epochs", "10", "--noise_multiplier", str(noise_multiplier), "--learning_rate",
                            "0.01", "--audit_canaries", str(canaries), "--deterministic_dp", "--seed", str(seed),
                            *extra])
    return DPTrainer(tiny_model(), tiny_dataset(256), collate, sequence_classification_losses, config, stage="test",
                     private_data="tiny")


@pytest.mark.slow
def test_the_white_box_audit_of_the_dp_loop_stays_under_the_accountant(tmp_path):
    for seed in range(3):
        trainer = audited_trainer(tmp_path, seed, noise_multiplier=2.7)  # epsilon 2
        trainer.train()
        bound = trainer.canaries.result(trainer.delta).epsilon_lower_bound
        assert 0 <= bound <= trainer.epsilons()["epsilon"] < 2.1


@pytest.mark.slow
def test_the_audit_catches_a_mechanism_with_a_tenth_of_its_noise(tmp_path):
    """The accountant is told sigma, the loop adds sigma / 10: the audit's bound exceeds the claimed epsilon (it
    fails if the canaries stop passing through the noise as the data do)."""
    from common.dp.accounting import Mechanism, compute_epsilons
    trainer = audited_trainer(tmp_path, 0, noise_multiplier=4.7)
    claimed = compute_epsilons([Mechanism(trainer.noise_multiplier, trainer.sample_rate, trainer.total_steps)],
                               trainer.delta)["epsilon"]
    trainer.noise_multiplier /= 10
    trainer.train()
    assert trainer.canaries.result(trainer.delta).epsilon_lower_bound > claimed > 0.8


def test_audit_json_sits_beside_privacy_json_and_the_release_holds_no_canary(tmp_path):
    trainer = audited_trainer(tmp_path, 0, noise_multiplier=1.5, canaries=100)
    trainer.train()
    release = tmp_path / "run" / "release"
    report = trainer.release(lambda directory: None, str(release))
    audit_json = json.loads((release / "audit.json").read_text())
    assert audit_json["canaries"] == 100 and audit_json["accountant_epsilon"] == report["epsilon"]["epsilon"]
    assert audit_json["epsilon_lower_bound"] <= audit_json["accountant_epsilon"]
    assert set(audit_json) >= {"kind", "guesses", "correct", "delta", "confidence", "ratio"}
    assert sorted(os.listdir(release)) == ["audit.json", "privacy.json"]  # no coin, coordinate or score
    assert report["sample_rate"] == 64 / 256  # the canaries leave the mechanism's q as it was


@pytest.mark.parametrize("canaries, extra, message", [
    (1, (), "--audit_canaries 1: between 2 and"),
    (600, (), "--audit_canaries 600: between 2 and .* 512"),
    (100, ("--sampling", "shuffle"), "use --sampling poisson")])
def test_canaries_that_make_no_sense_are_refused(tmp_path, canaries, extra, message):
    from common.stage import DataError
    with pytest.raises(DataError, match=message):
        audited_trainer(tmp_path, 0, noise_multiplier=1.5, canaries=canaries, extra=extra)
