"""The statistics of an ablation: how sure a mean is, whether a variant differs from the baseline, by how much,
and how many seeds it would take to tell.

Offers `t_interval` and `mean_interval` (a mean's interval: Student t; a percentile bootstrap only on request and
from BOOTSTRAP_MIN_N values, labelled), `bootstrap_interval`, `Comparison` and `compare` (a variant against the
baseline over the seeds both ran: a paired t-test, Welch's when the runs do not pair, no test for a deterministic
difference; the t interval that agrees with the p-value, the effect size and the equivalence test), `tost`,
`holm`, and `paired_power` / `power_seeds` (a paired t-test's power, from the noncentral t).

A comparison can be made after sequential looks (ablate/sequential.py): `looks` then turns each naive p-value into
one that keeps its error rate over every look planned, and widens the interval to match.
"""

import dataclasses
import math
import warnings

import numpy as np
from scipy import stats

BOOTSTRAP_MIN_N = 20  # below this, a percentile bootstrap of the mean covers far less than its level


def t_interval(values, confidence: float = 0.95) -> tuple | None:
  """(low, high) Student-t interval of the mean of `values` (last axis; arrays of lows and highs for a batch);
  None for fewer than 2 values. Constant values give (value, value)."""
  values = np.asarray(values, np.float64)
  if values.shape[-1] < 2:
    return None
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # constant values: replaced below
    low, high = stats.ttest_1samp(values, 0.0, axis=-1).confidence_interval(confidence)
  constant = np.ptp(values, axis=-1) == 0
  low, high = np.where(constant, values[..., 0], low), np.where(constant, values[..., 0], high)
  return (float(low), float(high)) if values.ndim == 1 else (low, high)


def bootstrap_interval(values, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> tuple | None:
  """(low, high) percentile bootstrap interval of the mean; None for fewer than 2 values. At n = 2-3 it is the
  smallest-to-largest value and covers 50-75% of the time: use it only from BOOTSTRAP_MIN_N values."""
  values = np.asarray(values, np.float64)
  if len(values) < 2:
    return None
  means = np.random.default_rng(seed).choice(values, (resamples, len(values))).mean(axis=1)
  tail = (1 - confidence) / 2 * 100
  return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def mean_interval(values, confidence: float = 0.95, method: str = "t") -> tuple[tuple | None, str]:
  """(interval, its method): "t", or "bootstrap" when asked for and there are at least BOOTSTRAP_MIN_N values."""
  if method == "bootstrap" and len(values) >= BOOTSTRAP_MIN_N:
    return bootstrap_interval(values, confidence), "bootstrap"
  return t_interval(values, confidence), "t"


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A variant against the baseline on one metric."""
  difference: float            # variant mean - baseline mean, over `seeds` when paired
  interval: tuple | None       # t interval of the difference at `level`: excludes 0 exactly when p < 1 - confidence
  level: float                 # the interval's confidence (above the nominal one after sequential looks)
  p: float | None              # two-sided p of "no difference"; None: not tested (deterministic, too few, NaN)
  test: str                    # "paired t" | "Welch t" | "deterministic" | "" (too few runs)
  n: int                       # pairs (paired) or the smaller sample
  effect: float | None         # difference / sd of the paired differences (Welch: / sqrt of the mean variance)
  variant_mean: float          # the means compared: over `seeds` when paired, else over every run
  baseline_mean: float
  seeds: tuple = ()            # the seeds compared (paired)
  dropped: tuple = ()          # (("variant" | "baseline", seed), ...) runs left out: no partner seed
  p_equivalent: float | None = None  # TOST p of "the difference is outside ±min_effect"; None without min_effect


def _constant(values, scale: float) -> bool:
  return bool(np.ptp(values) <= 1e-9 * max(scale, 1e-300))


def compare(variant: dict, baseline: dict, confidence: float = 0.95, min_effect: float | None = None,
            looks=None) -> Comparison:
  """Compares {seed: value} of a variant with the baseline's: paired over the seeds both have when there are at
  least 2 (the runs of a seed share the data order; the others are dropped and named), else Welch's test over all
  values. A difference that is the same at every seed (or two constant samples) is deterministic: not tested.
  `looks` (sequential.Looks) adjusts p and the interval for the looks a sequential run took."""
  shared = sorted(set(variant) & set(baseline))
  paired = len(shared) >= 2
  if paired:
    a = np.array([variant[s] for s in shared], np.float64)
    b = np.array([baseline[s] for s in shared], np.float64)
    dropped = tuple([("variant", s) for s in sorted(set(variant) - set(shared))] +
                    [("baseline", s) for s in sorted(set(baseline) - set(shared))])
  else:
    a, b = np.array(list(variant.values()), np.float64), np.array(list(baseline.values()), np.float64)
    dropped = ()
  base = dict(variant_mean=float(a.mean()) if len(a) else math.nan,
              baseline_mean=float(b.mean()) if len(b) else math.nan, seeds=tuple(shared) if paired else (),
              dropped=dropped)
  difference = base["variant_mean"] - base["baseline_mean"]
  untested = dict(difference=difference, interval=None, level=confidence, p=None, effect=None, **base)
  if min(len(a), len(b)) < 2:
    return Comparison(test="", n=min(len(a), len(b)), **untested)
  scale = float(np.abs(np.concatenate([a, b])).max()) if np.all(np.isfinite(np.concatenate([a, b]))) else 1.0
  if (paired and _constant(a - b, scale)) or (_constant(a, scale) and _constant(b, scale)):
    return Comparison(test="deterministic", n=len(a) if paired else min(len(a), len(b)), **untested)
  level = looks.level(confidence) if looks else confidence
  if paired:
    result = stats.ttest_rel(a, b)
    spread = float(np.std(a - b, ddof=1))
  else:
    result = stats.ttest_ind(a, b, equal_var=False)
    spread = float(np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2))
  p = float(result.pvalue)
  if not math.isfinite(p):
    return Comparison(test="paired t" if paired else "Welch t", n=len(a) if paired else min(len(a), len(b)),
                      **untested)
  interval = tuple(float(x) for x in result.confidence_interval(level))
  p_equivalent = None
  if min_effect:
    p_equivalent = tost(a, b, min_effect, paired)
    p_equivalent = looks.p_one_sided(p_equivalent) if looks else p_equivalent
  return Comparison(difference=float(difference), interval=interval, level=level,
                    p=looks.p(p) if looks else p, test="paired t" if paired else "Welch t",
                    n=len(a) if paired else min(len(a), len(b)), effect=float(difference / spread),
                    p_equivalent=p_equivalent, **base)


def tost(a, b, margin: float, paired: bool = True) -> float:
  """Two one-sided t-tests of equivalence: the p-value of "the mean difference a - b is at or beyond ±margin"
  (the larger of the two one-sided p-values); below alpha, the difference lies within ±margin."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if paired:
    above = stats.ttest_1samp(a - b, -margin, alternative="greater").pvalue
    below = stats.ttest_1samp(a - b, margin, alternative="less").pvalue
  else:
    above = stats.ttest_ind(a + margin, b, equal_var=False, alternative="greater").pvalue
    below = stats.ttest_ind(a - margin, b, equal_var=False, alternative="less").pvalue
  return float(max(above, below))


def holm(p_values: list) -> list:
  """Holm-adjusted p-values over the p-values given; None or NaN (not tested) stays None and is not counted. The
  k-th smallest of m is multiplied by m - k + 1, then made non-decreasing and capped at 1, so rejecting adjusted
  p < alpha keeps the family-wise error rate at alpha."""
  known = sorted((p, i) for i, p in enumerate(p_values) if p is not None and not math.isnan(p))
  adjusted, running = [None] * len(p_values), 0.0
  for k, (p, i) in enumerate(known):
    running = max(running, min(1.0, (len(known) - k) * p))
    adjusted[i] = running
  return adjusted


def paired_power(n, effect: float, sd: float, alpha: float = 0.05, comparisons: int = 1):
  """Power of a two-sided paired t-test over n pairs when the differences have mean `effect` and standard
  deviation `sd`, at level alpha / comparisons (Bonferroni: Holm's first step); n may be an array."""
  n = np.asarray(n, np.float64)
  critical = stats.t.isf(alpha / comparisons / 2, n - 1)
  shift = abs(effect) / sd * np.sqrt(n)
  # The wrong-sign tail as the upper tail of -T (scipy's nct.cdf returns NaN far in the lower tail).
  return stats.nct.sf(critical, n - 1, shift) + stats.nct.sf(critical, n - 1, -shift)


def power_seeds(effect: float, sd: float, alpha: float = 0.05, power: float = 0.8, comparisons: int = 1,
                most: int = 10_000) -> int | None:
  """The fewest seeds (pairs) for which a paired t-test at alpha / comparisons detects a mean difference
  `effect` with probability `power`, when the per-seed differences have standard deviation `sd`; None
  beyond `most`."""
  n = np.arange(2, most + 1)
  enough = np.nonzero(paired_power(n, effect, sd, alpha, comparisons) >= power)[0]
  return int(n[enough[0]]) if len(enough) else None
