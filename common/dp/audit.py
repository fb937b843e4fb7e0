"""An empirical lower bound on epsilon from one training run (Steinke, Nasr and Jagielski, "Privacy Auditing with
One (1) Training Run", NeurIPS 2023): the audit beside the accountant's upper bound (docs/privacy.md, "Auditing").

m canaries are each included in the training data independently with probability 1/2 (secret coins). After the
run the auditor scores every canary, guesses "in" for the highest scores and "out" for the lowest, and counts its
correct guesses. For an (epsilon, delta)-DP mechanism the number of correct guesses W among r guesses satisfies
(their Theorem 3.1)

    P[W >= v] <= f(v) + 2 m delta max_{i = 1..m} (f(v - i) - f(v)) / i,   f(v) = P[Binomial(r, p) >= v],
    p = e^epsilon / (1 + e^epsilon),

so an observed count whose tail probability is below the significance level rejects epsilon: the lower bound is
the largest epsilon so rejected. Several guess counts tried on one run share the significance level (Bonferroni),
so the best of them is still a valid bound at the stated confidence.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats


def p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float = 0.0) -> float:
    """Upper bound on the probability that an (epsilon, delta)-DP mechanism lets `correct` or more of `guesses`
    guesses on `m` canaries be right."""
    if not 0 <= correct <= guesses <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= m, got {correct}, {guesses}, {m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    p = 1 / (1 + math.exp(-epsilon))  # the accuracy of epsilon-DP randomised response

    bound = float(stats.binom.sf(correct - 1, guesses, p))  # P[Binomial(guesses, p) >= correct]
    if delta > 0 and correct > 0:
        # the maximum over i = 1..m is reached for i <= correct: beyond, f(v - i) stays 1 while i grows
        steps = np.arange(1, correct + 1)
        widths = stats.binom.sf(correct - steps - 1, guesses, p) - bound
        bound += 2 * m * delta * float(np.max(widths / steps))
    return min(bound, 1.0)


def epsilon_lower_bound(m: int, guesses: int, correct: int, delta: float = 0.0, significance: float = 0.05,
                        epsilon_max: float = 100.0) -> float:
    """The largest epsilon that `correct` of `guesses` guesses reject at `significance` (0 if none)."""
    if p_value(m, guesses, correct, 0.0, delta) > significance:
        return 0.0
    low, high = 0.0, epsilon_max
    if p_value(m, guesses, correct, high, delta) <= significance:
        return high
    for _ in range(60):  # p_value grows with epsilon: bisect its crossing of the significance level
        middle = (low + high) / 2
        low, high = (middle, high) if p_value(m, guesses, correct, middle, delta) <= significance else (low, middle)
    return low


@dataclass
class AuditResult:
    """What audit.json holds besides the accountant's epsilon."""

    canaries: int
    guesses: int
    correct: int
    guesses_in: int
    guesses_out: int
    delta: float
    confidence: float
    epsilon_lower_bound: float


def audit(scores, included, delta: float, confidence: float = 0.95, guess_counts=None) -> AuditResult:
    """Guess from canary `scores` (higher: more likely included) against the true inclusion coins `included`,
    for each (k in, k out) guess count in `guess_counts` (default: k in {m/100, m/50, m/20, m/10, m/4, m/2} for both
    ends); return the best bound, each tried at significance (1 - confidence) / number of counts tried."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    m = len(scores)
    if m < 2 or included.shape != (m,):
        raise ValueError(f"need at least 2 canaries with one inclusion coin each, got {m} and {included.shape}")
    if guess_counts is None:
        guess_counts = sorted({max(1, m // d) for d in (100, 50, 20, 10, 4)} | {m // 2})
        guess_counts = [(k, k) for k in guess_counts if 2 * k <= m]
    significance = (1 - confidence) / len(guess_counts)
    order = np.argsort(-scores, kind="stable")
    best = None
    for k_in, k_out in guess_counts:
        correct = int(included[order[:k_in]].sum() + (~included[order[m - k_out:]]).sum())
        bound = epsilon_lower_bound(m, k_in + k_out, correct, delta, significance)
        if best is None or bound > best.epsilon_lower_bound:
            best = AuditResult(m, k_in + k_out, correct, k_in, k_out, delta, confidence, bound)
    return best


class GradientCanaries:
    """White-box canaries of the DP loop (Dirac canaries): canary i is a gradient of norm C on one coordinate of the
    flattened trainable parameters, included in the training data with probability 1/2 (a secret coin). An included
    canary joins each step's Poisson draw at the private examples' rate q and adds C to its coordinate of the clipped
    sum before the noise, exactly as a private example whose clipped gradient it were; the noise, the sum over
    processes and the optimiser treat it like the rest. Its score is the sum over steps of the privatised sum at its
    coordinate: what one who sees every noisy update (the accountant's threat model) can read."""

    def __init__(self, count: int, num_parameters: int, seed: int, sample_rate: float, max_grad_norm: float):
        generator = torch.Generator().manual_seed(seed)
        self.included = torch.rand(count, generator=generator) < 0.5
        self.coordinates = torch.randperm(num_parameters, generator=generator)[:count]
        self.seed, self.sample_rate, self.max_grad_norm = seed, sample_rate, max_grad_norm
        self.scores = torch.zeros(count, dtype=torch.float64)

    def add_to(self, flat: torch.Tensor, step: int) -> None:
        """Add the included canaries that step `step` draws to the clipped sum `flat` (before the noise)."""
        generator = torch.Generator().manual_seed(self.seed + 1 + step)
        drawn = (torch.rand(len(self.included), generator=generator) < self.sample_rate) & self.included
        flat[self.coordinates[drawn].to(flat.device)] += self.max_grad_norm

    def observe(self, privatised_sum: torch.Tensor) -> None:
        """Add one step's privatised sum (noise added, summed over processes) at each canary's coordinate."""
        self.scores += privatised_sum.detach()[self.coordinates.to(privatised_sum.device)].double().cpu()

    def state_dict(self) -> dict:
        return {"scores": self.scores}

    def load_state_dict(self, state: dict) -> None:
        self.scores = state["scores"]

    def result(self, delta: float, confidence: float = 0.95) -> AuditResult:
        return audit(self.scores.numpy(), self.included.numpy(), delta, confidence)
