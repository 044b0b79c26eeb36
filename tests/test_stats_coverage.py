"""The ablation statistics hold their stated error rates, measured by simulation (fixed seeds): the intervals
cover at their level at n = 3 where the percentile bootstrap does not; the sequential looks of --until_significant
keep the false-positive rate where adding seeds until p < 0.05 does not; Holm over variants x metrics keeps the
family-wise error rate where Holm per metric does not.

Every rate is asserted several binomial standard errors away from its bound: with D draws, SE = sqrt(r (1 - r)
/ D), and the margins below are at least 4 SE."""

import numpy as np
from scipy import stats as scipy_stats

from ablate import sequential, stats

ALPHA = 0.05


def _se(rate: float, draws: int) -> float:
  return float(np.sqrt(rate * (1 - rate) / draws))


def test_t_intervals_cover_at_n_3_and_the_percentile_bootstrap_does_not():
  rng = np.random.default_rng(11)
  for n in (2, 3, 5, 10):
    draws = 20_000
    values_DxN = rng.normal(1.0, 2.0, (draws, n))
    low_D, high_D = stats.t_interval(values_DxN)
    covered = np.mean((low_D <= 1.0) & (1.0 <= high_D))
    assert abs(covered - 0.95) < 4 * _se(0.95, draws), (n, covered)
  # The difference of compare(): paired over shared seed noise plus each run's own, true difference 0.3, n = 3.
  draws = 2000
  seed_DxN = rng.normal(0, 1.0, (draws, 3))
  variant_DxN, baseline_DxN = seed_DxN + 0.3 + rng.normal(0, 0.5, (draws, 3)), seed_DxN + rng.normal(0, 0.5, (draws, 3))
  covered_delta = np.mean([low <= 0.3 <= high for low, high in
                           (stats.compare(dict(enumerate(a)), dict(enumerate(b))).interval
                            for a, b in zip(variant_DxN, baseline_DxN))])
  assert covered_delta >= 0.95 - 4 * _se(0.95, draws) > 0.93 - 1e-3, covered_delta
  draws = 1000  # the percentile bootstrap at n = 3 covers about 0.75: below 0.85 by more than 7 SE
  bootstrap = np.mean([low <= 1.0 <= high for low, high in
                       (stats.bootstrap_interval(v, resamples=2000, seed=i) for i, v in enumerate(values_DxN[:draws, :3]))])
  assert bootstrap < 0.85 - 4 * _se(0.85, draws), bootstrap


def test_welch_intervals_cover_when_the_runs_do_not_pair():
  rng, draws = np.random.default_rng(12), 1000
  covered = np.mean([low <= 0.5 <= high for low, high in
                     (stats.compare(dict(enumerate(rng.normal(0.5, 1.0, 3))),
                                    {k + 10: v for k, v in enumerate(rng.normal(0.0, 2.0, 4))}).interval
                      for _ in range(draws))])
  assert covered >= 0.95 - 4 * _se(0.95, draws), covered


def _sequential_false_positives(looks, d_DxN, adjusted: bool, futility: bool = True) -> float:
  """The share of null sequences declared significant at some look: with the sequential plan's p-values (and
  futility stops), or naively at p < ALPHA every time."""
  open_D, hits_D = np.ones(len(d_DxN), bool), np.zeros(len(d_DxN), bool)
  for n in range(looks.first, looks.last + 1):
    p_D = scipy_stats.ttest_1samp(d_DxN[:, :n], 0.0, axis=1).pvalue
    significant_D = open_D & ((looks.p(p_D) if adjusted else p_D) < ALPHA)
    hits_D |= significant_D
    open_D &= ~significant_D
    if futility:
      open_D &= ~sequential.futile(d_DxN[:, :n], looks, ALPHA)
  return float(hits_D.mean())


def test_sequential_looks_keep_the_false_positive_rate_and_naive_stopping_does_not():
  draws = 40_000
  looks = sequential.calibrate(3, 10)
  d_DxN = np.random.default_rng(13).normal(0.0, 1.0, (draws, 10))  # independent of the calibration's seed
  naive = _sequential_false_positives(looks, d_DxN, adjusted=False, futility=False)
  assert naive > 0.12 + 4 * _se(0.12, draws), naive  # about 0.16: adding seeds until p < 0.05
  planned = _sequential_false_positives(looks, d_DxN, adjusted=True, futility=False)
  assert abs(planned - ALPHA) < 4 * _se(ALPHA, draws), planned  # calibrated: alpha, not less
  with_futility = _sequential_false_positives(looks, d_DxN, adjusted=True)
  assert with_futility <= planned and with_futility <= 0.06 - 4 * _se(0.06, draws), with_futility


def test_sequential_looks_still_find_a_real_difference():
  """At a difference of 1.5 sd of the per-seed differences, the plan (3 to 10 seeds, futility included) detects
  most of the time, and stops early when it does."""
  draws, looks = 5000, sequential.calibrate(3, 10)
  d_DxN = np.random.default_rng(14).normal(1.5, 1.0, (draws, 10))
  found = _sequential_false_positives(looks, d_DxN, adjusted=True)
  assert found > 0.8, found
  assert stats.paired_power(10, 1.5, 1.0, looks.threshold(ALPHA)) > found - 0.1  # futility costs little power


def test_holm_over_variants_times_metrics_keeps_the_family_wise_error_rate():
  """4 null variants x 5 metrics at n = 3, a shared baseline, independent metrics: Holm per metric flags a false
  difference in about a fifth of ablations; Holm over all 20 comparisons in at most alpha."""
  draws, rng = 20_000, np.random.default_rng(15)
  seed_DxSxM = rng.normal(0, 1, (draws, 1, 3, 5))
  runs_DxVxSxM = seed_DxSxM + rng.normal(0, 1, (draws, 5, 3, 5))  # variant 0 is the baseline
  p_DxVxM = scipy_stats.ttest_rel(runs_DxVxSxM[:, 1:], runs_DxVxSxM[:, :1], axis=2).pvalue
  per_metric = np.mean([any(p < ALPHA for m in range(5) for p in stats.holm(list(p_VxM[:, m]))) for p_VxM in p_DxVxM])
  family = np.mean([any(p < ALPHA for p in stats.holm(list(p_VxM.ravel()))) for p_VxM in p_DxVxM])
  assert per_metric > 0.15 + 4 * _se(0.15, draws), per_metric
  assert family <= ALPHA + 4 * _se(ALPHA, draws), family  # Holm keeps alpha; the margin is the simulation's
