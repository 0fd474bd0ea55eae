"""Sequential tests a rollout decides with: each may be looked at after every request and stops as
soon as the evidence decides, with error rates that hold however often it was looked at.

Two tests, each chosen for what it observes:

* **Bernoulli SPRT** (Wald's sequential probability ratio test) for rates of events per request:
  errors, and requests slower than a latency limit. A rate is one number per request (0 or 1), so
  its exact likelihood is known and the SPRT is the test that stops soonest on average (Wald and
  Wolfowitz, 1948). The thresholds are the conservative ones of Ville's inequality (roll back when
  the likelihood ratio reaches ``1/alpha``, pass when it falls to ``beta``), not Wald's
  approximations: the ratio is a nonnegative martingale under either hypothesis, so the error
  rates are bounds, for any schedule of looks and for composite hypotheses (rate at most ``p0``,
  at least ``p1``: the binomial has a monotone likelihood ratio).
* **Normal-mixture confidence sequence** (Robbins' mixture martingale; the "mixture SPRT" of
  always-valid A/B testing, Johari et al. 2017; boundary as in Howard et al. 2021) for means of
  bounded observations, such as the pairwise judge's preference (0, 1/2 or 1 per prompt). Bounded
  observations are sub-Gaussian with ``sigma = range / 2`` (Hoeffding), which is all the mixture
  needs: no distribution is assumed. Two sequences decide: one at ``alpha`` rolls back when the
  mean is credibly worse than no difference, one at ``beta`` passes when it is credibly better than
  the harm; once their half-widths add up to less than the harm one of them must have fired, so
  the sample size is known before the first observation.

``required_*`` functions give the sample size a test needs (with its power ``1 - beta`` against
the stated harm), which the policy states up front. Pure functions of counts and sums.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Literal

Verdict = Literal["harm", "no_harm", "undecided", "untested"]
MAX_SAMPLE_SIZE = 200_000


@dataclass(frozen=True)
class TestOutcome:
    """One sequential test's state: what it saw, its statistic and bounds, what it says and why."""

    name: str
    verdict: Verdict
    n: int
    statistic: float | None  # None (never NaN: it crosses XCom as JSON) before any observation
    lower: float | None
    upper: float | None
    rule: str

    def to_dict(self) -> dict:
        return asdict(self)


def _check_rates(alpha: float, beta: float) -> None:
    if not (0 < alpha < 1 and 0 < beta < 1):
        raise ValueError(f"alpha and beta must lie in (0, 1), got alpha {alpha} and beta {beta}")


def sprt_thresholds(alpha: float, beta: float) -> tuple[float, float]:
    """(lower, upper) bounds of the log likelihood ratio: pass at or below ``log beta``, roll back at
    or above ``log 1/alpha`` (Ville's inequality makes both error rates bounds)."""
    _check_rates(alpha, beta)
    return math.log(beta), math.log(1 / alpha)


def bernoulli_llr(n: int, k: int, p0: float, p1: float) -> float:
    """Log likelihood ratio of rate ``p1`` against ``p0`` after ``k`` events in ``n`` trials."""
    if not 0 <= k <= n:
        raise ValueError(f"events must be between 0 and the trials ({n}), got {k}")
    if not 0 < p0 < p1 < 1:
        raise ValueError(f"the rates must satisfy 0 < p0 < p1 < 1, got p0 {p0} and p1 {p1}")
    return k * math.log(p1 / p0) + (n - k) * math.log((1 - p1) / (1 - p0))


def bernoulli_sprt(
    name: str, n: int, k: int, p0: float, p1: float, alpha: float, beta: float, horizon: int | None = None
) -> TestOutcome:
    """The SPRT of "rate at most ``p0``" (no harm) against "rate at least ``p1``" (harm) after ``k``
    events in ``n`` trials. With a ``horizon`` (the stated sample size), a test still undecided there
    stays undecided: the caller applies the policy's default for an inconclusive test."""
    lower, upper = sprt_thresholds(alpha, beta)
    llr = bernoulli_llr(n, k, p0, p1)
    seen = f"{k} of {n} ({k / n:.1%})" if n else "0 of 0"
    if llr >= upper:
        verdict, rule = "harm", f"SPRT: log LR {llr:.2f} >= log(1/alpha) {upper:.2f}"
    elif llr <= lower:
        verdict, rule = "no_harm", f"SPRT: log LR {llr:.2f} <= log(beta) {lower:.2f}"
    else:
        verdict, rule = "undecided", f"SPRT: log LR {llr:.2f} within ({lower:.2f}, {upper:.2f})"
        if horizon is not None and n >= horizon:
            rule += f", past the stated sample size {horizon}"
    return TestOutcome(name, verdict, n, round(llr, 4), round(lower, 4), round(upper, 4), f"{seen}; {rule}")


@functools.lru_cache(maxsize=256)  # pure, and a DAG's steps ask again
def required_bernoulli_sample_size(p0: float, p1: float, alpha: float, beta: float) -> int:
    """The smallest ``n`` by which the SPRT has rolled back with probability at least ``1 - beta``
    when the rate is ``p1``, and passed with probability at least ``1 - alpha`` when it is ``p0``:
    so a step that stops there, undecided counting as a roll back, still rolls back wrongly at most
    ``alpha`` of the time. Exact: the walk of the log likelihood ratio is followed state by state
    (the undecided states are a narrow band of event counts)."""
    lower, upper = sprt_thresholds(alpha, beta)
    bernoulli_llr(0, 0, p0, p1)  # validates the rates
    up, down = math.log(p1 / p0), math.log((1 - p1) / (1 - p0))
    # Wald's approximate mean sample size under p1 (its drift is the KL divergence): far beyond the
    # limit, no walk need be followed to know the answer.
    drift = p1 * up + (1 - p1) * down
    if ((1 - beta) * upper + beta * lower) / drift > MAX_SAMPLE_SIZE / 4:
        raise ValueError(
            f"no sample size up to {MAX_SAMPLE_SIZE} tells rate {p0} from {p1} at alpha {alpha}, beta {beta}:"
            " state a larger harm or looser error rates"
        )
    open_at = {p: {0: 1.0} for p in (p0, p1)}  # undecided probability mass by event count
    harm_by = {p0: 0.0, p1: 0.0}
    pass_by = {p0: 0.0, p1: 0.0}
    for n in range(1, MAX_SAMPLE_SIZE + 1):
        for p, mass in open_at.items():
            moved: dict[int, float] = {}
            for k, m in mass.items():
                moved[k] = moved.get(k, 0.0) + m * (1 - p)
                moved[k + 1] = moved.get(k + 1, 0.0) + m * p
            still = {}
            for k, m in moved.items():
                llr = k * up + (n - k) * down
                if llr >= upper:
                    harm_by[p] += m
                elif llr <= lower:
                    pass_by[p] += m
                elif m > 1e-15:
                    still[k] = m
            open_at[p] = still
        if harm_by[p1] >= 1 - beta and pass_by[p0] >= 1 - alpha:
            return n
    raise ValueError(
        f"no sample size up to {MAX_SAMPLE_SIZE} tells rate {p0} from {p1} at alpha {alpha}, beta {beta}:"
        " state a larger harm or looser error rates"
    )


def mixture_half_width(n: int, sigma: float, alpha: float, rho: float) -> float:
    """Half-width of the normal-mixture confidence sequence for the mean of ``n`` ``sigma``-sub-Gaussian
    observations: with probability ``1 - alpha`` the running mean stays within it of the true mean at
    every ``n`` at once (Robbins; Howard et al. 2021, eq. (14), two-sided)."""
    if n <= 0:
        return math.inf
    v = n * sigma**2
    return math.sqrt((v + rho) * math.log((v + rho) / (rho * alpha**2))) / n


def _decides_by(n: int, sigma: float, harm: float, alpha: float, beta: float, rho: float) -> bool:
    return mixture_half_width(n, sigma, alpha, rho) + mixture_half_width(n, sigma, beta, rho) < harm


@functools.lru_cache(maxsize=256)
def mixture_rho(sigma: float, harm: float, alpha: float, beta: float) -> float:
    """The mixture's precision, fixed by the policy alone (so before any data): the one of a grid
    that decides soonest for this harm. A data-chosen ``rho`` would void the guarantee."""
    _check_rates(alpha, beta)
    if sigma <= 0 or harm <= 0:
        raise ValueError(f"sigma and harm must be positive, got sigma {sigma} and harm {harm}")
    grid = [sigma**2 * 2**i for i in range(0, 16)]
    return min(grid, key=lambda rho: _required_mean(sigma, harm, alpha, beta, rho))


def _required_mean(sigma: float, harm: float, alpha: float, beta: float, rho: float) -> int:
    n = 1
    while not _decides_by(n, sigma, harm, alpha, beta, rho):
        n *= 2
        if n > MAX_SAMPLE_SIZE:
            return MAX_SAMPLE_SIZE + 1
    low, high = n // 2, n  # the half-widths shrink with n: bisect between the last two doublings
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if _decides_by(mid, sigma, harm, alpha, beta, rho) else (mid, high)
    return high


@functools.lru_cache(maxsize=256)
def required_mean_sample_size(sigma: float, harm: float, alpha: float, beta: float) -> int:
    """Observations after which the mean test has decided for sure (see the module's docstring)."""
    n = _required_mean(sigma, harm, alpha, beta, mixture_rho(sigma, harm, alpha, beta))
    if n > MAX_SAMPLE_SIZE:
        raise ValueError(
            f"no sample size up to {MAX_SAMPLE_SIZE} detects a shift of {harm} with sigma {sigma}:"
            " state a larger harm or looser error rates"
        )
    return n


def mean_shift_test(
    name: str, n: int, total: float, null: float, harm: float, sigma: float, alpha: float, beta: float
) -> TestOutcome:
    """Is the mean of ``n`` observations (summing to ``total``) lower than ``null`` (harm: lower is
    worse)? Rolls back when the ``alpha`` sequence lies wholly below ``null``; passes when the
    ``beta`` sequence lies wholly above ``null - harm``."""
    rho = mixture_rho(sigma, harm, alpha, beta)
    if n == 0:
        return TestOutcome(name, "undecided", 0, None, None, None, "no observations")
    mean = total / n
    upper = mean + mixture_half_width(n, sigma, alpha, rho)
    lower = mean - mixture_half_width(n, sigma, beta, rho)
    seen = f"mean {mean:.3f} of {n}"
    if upper < null:
        verdict, rule = "harm", f"confidence sequence: upper bound {upper:.3f} (alpha {alpha:g}) < {null:g}"
    elif lower > null - harm:
        verdict = "no_harm"
        rule = f"confidence sequence: lower bound {lower:.3f} (beta {beta:g}) > {null - harm:g}"
    else:
        verdict = "undecided"
        rule = f"confidence sequence ({lower:.3f}, {upper:.3f}) holds both {null:g} and {null - harm:g}"
    return TestOutcome(name, verdict, n, round(mean, 4), round(lower, 4), round(upper, 4), f"{seen}; {rule}")
