"""Privacy accounting for DP training, from established accountant libraries.

A DP training run is one `Mechanism`: `steps` releases of a Gaussian-noised clipped
sum (noise std = noise_multiplier x clip). With Poisson sampling each example joins a
step with probability `sample_rate` (amplification by subsampling applies). With
shuffled fixed-size batches each example is in exactly one batch per epoch, and no
amplification is claimed: the run is `epochs` compositions of the plain Gaussian
mechanism, a valid bound for shuffling but far above the Poisson figure.

Accountants: PRV (`prv-accountant`, the paper's; upper bound and estimate), PLD and
RDP (`dp-accounting`). Several mechanisms on the same private data (the domain
classifier and the fine-tuning) compose with the same libraries.
"""

import functools
import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Optional

import dp_accounting
from absl import logging as absl_logging
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from prv_accountant import GaussianMechanism, PoissonSubsampledGaussianMechanism, PRVAccountant
from prv_accountant.other_accountants import RDP as PrvRdp

# dp-accounting logs every RDP order it has to drop (low noise, large q) at WARNING; the orders it keeps
# still give a valid bound.
absl_logging.set_verbosity(absl_logging.ERROR)

SAMPLINGS = ("poisson", "shuffle")
PRV_EPS_ERROR = 0.01
# Orders for the PRV domain's RDP bound: the integer orders of prv-accountant's default grid (which adds 99
# fractional orders below 11, the slow part of its pure-Python RDP: up to about 0.5 s per accountant).
SAFE_DOMAIN_ORDERS = tuple(range(2, 64))


@dataclass(frozen=True)
class Mechanism:
    noise_multiplier: float
    sample_rate: float
    steps: int
    sampling: str = "poisson"
    steps_per_epoch: Optional[int] = None  # shuffle: the loop's steps per permutation

    def __post_init__(self):
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if self.sampling == "shuffle" and not (self.steps_per_epoch or 0) >= 1:
            raise ValueError(f"shuffle sampling needs steps_per_epoch >= 1, got {self.steps_per_epoch}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.noise_multiplier < 0 or self.steps < 0:
            raise ValueError(f"noise_multiplier and steps must be non-negative, got {self.noise_multiplier}, "
                             f"{self.steps}")

    @property
    def compositions(self):
        """How many times the mechanism composes: steps (Poisson) or epochs begun (shuffle)."""
        if self.sampling == "poisson":
            return self.steps
        return math.ceil(self.steps / self.steps_per_epoch)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> "Mechanism":
        """The mechanism of a ledger entry or privacy report (other keys are ignored)."""
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})


def _dp_event(mechanism):
    gaussian = dp_accounting.GaussianDpEvent(mechanism.noise_multiplier)
    if mechanism.sampling == "poisson":
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(mechanism.sample_rate, gaussian), mechanism.steps)
    return dp_accounting.SelfComposedDpEvent(gaussian, mechanism.compositions)


def _accountant_epsilon(accountant, mechanisms, delta):
    for mechanism in mechanisms:
        accountant.compose(_dp_event(mechanism))
    return float(accountant.get_epsilon(delta))


def epsilon_rdp(mechanisms: list, delta: float) -> float:
    return _accountant_epsilon(RdpAccountant(), mechanisms, delta)


def epsilon_pld(mechanisms: list, delta: float) -> float:
    return _accountant_epsilon(PLDAccountant(value_discretization_interval=1e-3), mechanisms, delta)


def safe_domain_size(prvs, counts, eps_error, delta_error):
    """The half-width of the PRV discretisation domain: remark 5.6 of Gopi et al. (2021), the rule of
    prv-accountant's own `compute_safe_domain_size`, with the RDP bounds taken over `SAFE_DOMAIN_ORDERS`, a
    subset of that function's orders. A minimum over fewer orders is never smaller, so the domain is at least
    as wide as the library's choice and its error bounds hold; the figures agree to 1e-4 (tests)."""
    rdp = PrvRdp(prvs=prvs, orders=SAFE_DOMAIN_ORDERS)
    total = sum(counts)
    width = rdp.compute_epsilon(delta=delta_error / 4, num_self_compositions=counts)[2]
    for index in range(len(prvs)):
        alone = [int(other == index) for other in range(len(prvs))]
        width = max(width, rdp.compute_epsilon(delta=delta_error / 8 / total, num_self_compositions=alone)[2])
    return max(width, eps_error) + 3


def epsilon_prv(mechanisms: list, delta: float) -> dict:
    """(estimate, upper bound) of epsilon from prv-accountant."""
    used = [m for m in mechanisms if m.compositions > 0]
    if not used:
        return 0.0, 0.0
    prvs = [PoissonSubsampledGaussianMechanism(m.sample_rate, m.noise_multiplier) if m.sampling == "poisson"
            else GaussianMechanism(m.noise_multiplier) for m in used]
    counts = [m.compositions for m in used]
    delta_error = delta / 1000
    with warnings.catch_warnings():  # eps_max given: the library warns that it trusts it, and only that is hidden
        warnings.filterwarnings("ignore", message="Assuming that true epsilon", category=UserWarning)
        accountant = PRVAccountant(prvs=prvs, max_self_compositions=counts, eps_error=PRV_EPS_ERROR,
                                   delta_error=delta_error,
                                   eps_max=safe_domain_size(prvs, counts, PRV_EPS_ERROR, delta_error))
    _, estimate, upper = accountant.compute_epsilon(delta=delta, num_self_compositions=counts)
    return float(estimate), float(upper)


def compute_epsilons(mechanisms: list, delta: float) -> dict:
    """Epsilon at `delta` of the composition of `mechanisms`, per accountant.

    "epsilon" is the headline figure: the PRV upper bound, or PLD where the PRV
    discretisation fails (very little noise, epsilon in the tens).
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return dict(_cached_epsilons(tuple(mechanisms), delta))


@functools.lru_cache(maxsize=64)
def _cached_epsilons(mechanisms, delta):
    """compute_epsilons' figures, once per composition: a run asks for the same one after each epoch, in its
    report and in the ledger's."""
    if any(m.noise_multiplier == 0 and m.steps > 0 for m in mechanisms):
        return dict.fromkeys(("epsilon", "prv", "prv_estimate", "pld", "rdp"), math.inf)
    pld = epsilon_pld(mechanisms, delta)
    try:
        prv_estimate, prv = epsilon_prv(mechanisms, delta)
    except RuntimeError:  # prv-accountant: "Discrete mean differs from continuous mean significantly"
        prv_estimate = prv = None
    return {"epsilon": pld if prv is None else prv, "prv": prv, "prv_estimate": prv_estimate, "pld": pld,
            "rdp": epsilon_rdp(mechanisms, delta)}


def calibrate_noise_multiplier(target_epsilon: float, sample_rate: float, steps: int, delta: float,
                               sampling: str = "poisson", tolerance: float = 1e-3, earlier=(),
                               steps_per_epoch: Optional[int] = None) -> float:
    """Smallest noise multiplier (to `tolerance` relative) whose PRV upper bound is <= target_epsilon.

    `earlier`: mechanisms already run on the same data; the target then bounds their composition
    with this one.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be positive, got {target_epsilon}")
    earlier = list(earlier)

    def headline(mechanisms):
        try:
            return epsilon_prv(mechanisms, delta)[1]
        except RuntimeError:  # the PRV discretisation fails with little noise: the headline's PLD, as reported
            return epsilon_pld(mechanisms, delta)

    if earlier and headline(earlier) >= target_epsilon:
        raise ValueError(f"the earlier stages already spend epsilon {headline(earlier):.3f} >= the target "
                         f"{target_epsilon}")

    def epsilon(noise_multiplier):
        return headline(earlier + [Mechanism(noise_multiplier, sample_rate, steps, sampling, steps_per_epoch)])

    low, high = 0.05, 1.0
    while epsilon(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon} with {steps} steps at sample "
                             f"rate {sample_rate:.4g} and delta {delta:.3g}")
    while high - low > tolerance * high:
        middle = (low + high) / 2
        low, high = (middle, high) if epsilon(middle) > target_epsilon else (low, middle)
    return high


def default_delta(num_examples: int) -> float:
    """1 / (10 n): well below 1/n, so no single example's release is allowed."""
    return 1.0 / (10 * num_examples)
