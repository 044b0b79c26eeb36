"""The statistics of an ablation: how sure a mean is, and whether a variant differs from the baseline.

Offers `bootstrap_interval` (a percentile bootstrap interval of a mean), `Comparison` and `compare` (the
difference of a variant's mean to the baseline's, its bootstrap interval and a p-value: a paired t-test when
the runs pair up by seed, Welch's otherwise) and `holm` (Holm's step-down adjustment over the comparisons of one
metric). Resampling is seeded, so a report is the same every time it is written.
"""

import dataclasses

import numpy as np
from scipy import stats


def bootstrap_interval(values, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0):
  """(low, high) percentile bootstrap interval of the mean of `values`; None for fewer than 2 values."""
  values = np.asarray(values, np.float64)
  if len(values) < 2:
    return None
  means = np.random.default_rng(seed).choice(values, (resamples, len(values))).mean(axis=1)
  tail = (1 - confidence) / 2 * 100
  return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A variant against the baseline on one metric."""
  difference: float            # variant mean - baseline mean (of the paired differences when paired)
  interval: tuple | None       # its bootstrap interval
  p: float | None              # two-sided p-value of "no difference"
  test: str                    # "paired t" | "Welch t" | "" (too few runs)
  n: int                       # pairs (paired) or the smaller sample


def compare(variant: dict, baseline: dict, confidence: float = 0.95, resamples: int = 10_000,
            seed: int = 0) -> Comparison:
  """Compares {seed: value} of a variant with the baseline's: paired over the seeds both have when there are at
  least 2 (the runs of a seed share the data order), else Welch's test over all values."""
  shared = sorted(set(variant) & set(baseline))
  if len(shared) >= 2:
    a, b = np.array([variant[s] for s in shared]), np.array([baseline[s] for s in shared])
    differences = a - b
    p = float(stats.ttest_rel(a, b).pvalue) if np.any(differences != differences[0]) else \
        (1.0 if differences[0] == 0 else 0.0)  # constant differences: t is 0/0 or infinite
    return Comparison(float(differences.mean()), bootstrap_interval(differences, confidence, resamples, seed), p,
                      "paired t", len(shared))
  a, b = np.array(list(variant.values()), np.float64), np.array(list(baseline.values()), np.float64)
  if min(len(a), len(b)) < 2:
    return Comparison(float(a.mean() - b.mean()) if len(a) and len(b) else float("nan"), None, None, "",
                      min(len(a), len(b)))
  rng = np.random.default_rng(seed)
  resampled = rng.choice(a, (resamples, len(a))).mean(1) - rng.choice(b, (resamples, len(b))).mean(1)
  tail = (1 - confidence) / 2 * 100
  interval = float(np.percentile(resampled, tail)), float(np.percentile(resampled, 100 - tail))
  p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
  return Comparison(float(a.mean() - b.mean()), interval, None if np.isnan(p) else p, "Welch t", min(len(a), len(b)))


def holm(p_values: list) -> list:
  """Holm-adjusted p-values (None stays None): the k-th smallest of m is multiplied by m - k + 1, then made
  non-decreasing, so rejecting adjusted p < alpha controls the family-wise error rate at alpha."""
  known = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
  adjusted, running = [None] * len(p_values), 0.0
  for k, (p, i) in enumerate(known):
    running = max(running, min(1.0, (len(known) - k) * p))
    adjusted[i] = running
  return adjusted
