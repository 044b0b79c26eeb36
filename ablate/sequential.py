"""Sequential seeding that keeps its error rate (`python -m ablate --until_significant`).

Adding a seed at a time until p < alpha rejects a true "no difference" far more often than alpha (0.16 with up to
10 seeds). Here the looks are planned: a paired t-test at every number of seeds n = first, first + 1, ..., last,
each against the same nominal threshold c (a Pocock-like design), with c calibrated by simulation so that under
no difference the chance that p <= c at any of the looks is alpha. The simulation draws normal per-seed
differences (the t-test's own assumption; the distribution of the smallest p over the looks does not depend on
their sd), 200,000 sequences from a fixed seed, so a report is the same every time it is written.

A comparison observed with naive p-value p gets the sequential p-value P_null(smallest p over the planned looks
<= p): below alpha exactly when p <= c, and a valid p-value whenever it stopped, so Holm over a family of them
keeps the family-wise error rate. Its interval is the t interval at 1 - c, which excludes 0 exactly then.

Futility is non-binding (the calibration ignores it, so it can only lower the error rate): a comparison stops
taking seeds when a paired t-test at the last look, were the true difference the one seen so far (its mean and
sd), would pass the threshold with probability below FUTILITY_POWER.

Offers `Looks`, `calibrate` (cached) and `futile`.
"""

import dataclasses
import functools

import numpy as np
from scipy import stats

from ablate.stats import paired_power

FUTILITY_POWER = 0.1
DRAWS = 200_000
_PROBS = np.geomspace(1e-4, 1.0, 401)  # the null distribution is kept as its quantiles at these probabilities


@dataclasses.dataclass(frozen=True, eq=False)
class Looks:
  """A sequential plan: paired t-tests at every number of seeds from `first` to `last`."""
  first: int
  last: int
  two_sided: np.ndarray   # quantiles (at _PROBS) of the smallest two-sided p over the looks, under the null
  one_sided: np.ndarray   # the same for a one-sided p (the equivalence test's)

  def p(self, p):
    """The sequential p-value of a naive two-sided p (or an array of them)."""
    return _cdf(p, self.two_sided)

  def p_one_sided(self, p):
    return _cdf(p, self.one_sided)

  def threshold(self, alpha: float) -> float:
    """The nominal p at or below which a look rejects: P_null(p <= threshold at any look) = alpha."""
    return float(np.exp(np.interp(np.log(alpha), np.log(_PROBS), np.log(self.two_sided))))

  def level(self, confidence: float) -> float:
    """The confidence of the per-look t interval that excludes 0 exactly when the sequential p < 1 - confidence."""
    return 1.0 - self.threshold(1.0 - confidence)


def _cdf(p, quantiles: np.ndarray):
  """P_null(smallest p <= p), log-log interpolated between the stored quantiles (linear in p below them); p may be
  an array."""
  p_ = np.asarray(p, np.float64)
  with np.errstate(divide="ignore"):
    inside = np.exp(np.interp(np.log(np.clip(p_, quantiles[0], quantiles[-1])), np.log(quantiles), np.log(_PROBS)))
  found = np.where(p_ <= quantiles[0], p_ * _PROBS[0] / quantiles[0], np.where(p_ >= quantiles[-1], 1.0, inside))
  return float(found) if found.ndim == 0 else found


@functools.lru_cache(maxsize=16)
def calibrate(first: int, last: int, draws: int = DRAWS, seed: int = 0) -> Looks:
  """The plan for looks at first..last seeds, its null distribution simulated from `draws` sequences."""
  if not 2 <= first <= last:
    raise ValueError(f"looks from {first} to {last} seeds: need 2 <= first <= last")
  d_SxN = np.random.default_rng(seed).standard_normal((draws, last))
  n_N = np.arange(1, last + 1)
  mean_SxN = np.cumsum(d_SxN, axis=1) / n_N
  variance_SxN = (np.cumsum(d_SxN ** 2, axis=1) - n_N * mean_SxN ** 2) / np.maximum(n_N - 1, 1)
  smallest_two, smallest_one = np.ones(draws), np.ones(draws)
  for n in range(first, last + 1):
    t_S = mean_SxN[:, n - 1] / np.sqrt(variance_SxN[:, n - 1] / n)
    smallest_two = np.minimum(smallest_two, 2 * stats.t.sf(np.abs(t_S), n - 1))
    smallest_one = np.minimum(smallest_one, stats.t.sf(t_S, n - 1))
  return Looks(first, last, np.quantile(smallest_two, _PROBS), np.quantile(smallest_one, _PROBS))


def futile(differences, looks: Looks, alpha: float, power_floor: float = FUTILITY_POWER):
  """Whether comparisons with these paired differences (last axis: the seeds so far) are not worth more seeds:
  at the observed mean and sd, a test at the last look would reject with probability below `power_floor`."""
  d = np.asarray(differences, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    chance = paired_power(looks.last, d.mean(-1), d.std(-1, ddof=1), looks.threshold(alpha))
  return np.nan_to_num(chance, nan=1.0) < power_floor
