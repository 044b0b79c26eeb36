"""Size ladders: a power law of a final metric against training compute per variant, with bootstrap intervals,
and its projection to a larger compute ("does the gain hold as the model grows?").

Offers `power_law`, `Fit`, `fit` (L(C) = a * C^-b + c, or a * C^-b when the points do not support three
parameters) and `ladder_fits` (one fit per group of an ablation's runs that differ only in the ladder axis).
Compute C is in FLOPs (train/flops, ModelConfig.train_flops summed over the run).
"""

import dataclasses

import numpy as np
from scipy import optimize


def power_law(c, a, b, irreducible):
  return a * np.power(c, -b) + irreducible


@dataclasses.dataclass(frozen=True)
class Fit:
  """A fitted law, its bootstrap intervals and the projection."""
  form: str              # "a*C^-b+c" | "a*C^-b"
  params: dict           # a, b (and c)
  intervals: dict        # name -> (low, high)
  projected_compute: float
  projection: float
  projection_interval: tuple | None
  points: int


def _fit_once(c_N, loss_N, with_floor: bool):
  """(a, b, c) by least squares in log-compute units; None when the optimiser fails."""
  x_N = c_N / c_N.min()  # scaled: the fit sees numbers near 1
  try:
    if with_floor:
      p0 = (loss_N.max() - loss_N.min() + 1e-3, 0.3, max(loss_N.min() - 0.1, 0.0))
      (a, b, floor), _ = optimize.curve_fit(power_law, x_N, loss_N, p0=p0, bounds=([0, 0, 0], [np.inf, 5, np.inf]),
                                            maxfev=20_000)
    else:  # a straight line in log-log
      slope, intercept = np.polyfit(np.log(x_N), np.log(loss_N), 1)
      a, b, floor = np.exp(intercept), -slope, 0.0
  except (RuntimeError, ValueError):
    return None
  return a * c_N.min() ** b, b, floor  # back to unscaled compute


def fit(c_N, loss_N, project_to: float, resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> Fit:
  """Fits L(C) = a*C^-b + c when there are at least 4 points at 3 or more computes, else a*C^-b; resamples the
  points with replacement for the intervals of the parameters and of L(project_to)."""
  c_N, loss_N = np.asarray(c_N, np.float64), np.asarray(loss_N, np.float64)
  with_floor = len(c_N) >= 4 and len(np.unique(c_N)) >= 3
  best = _fit_once(c_N, loss_N, with_floor)
  if best is None and with_floor:
    with_floor, best = False, _fit_once(c_N, loss_N, False)
  names = ("a", "b", "c") if with_floor else ("a", "b")
  rng, samples = np.random.default_rng(seed), []
  for _ in range(resamples):
    index = rng.integers(0, len(c_N), len(c_N))
    if len(np.unique(c_N[index])) >= (3 if with_floor else 2):
      params = _fit_once(c_N[index], loss_N[index], with_floor)
      if params is not None:
        samples.append(params)
  samples = np.array(samples)
  tail = (1 - confidence) / 2 * 100
  intervals, projection_interval = {}, None
  if len(samples) >= 20:
    intervals = {n: (float(np.percentile(samples[:, i], tail)), float(np.percentile(samples[:, i], 100 - tail)))
                 for i, n in enumerate(names)}
    projected = power_law(project_to, samples[:, 0], samples[:, 1], samples[:, 2])
    projection_interval = float(np.percentile(projected, tail)), float(np.percentile(projected, 100 - tail))
  return Fit("a*C^-b+c" if with_floor else "a*C^-b", dict(zip(names, map(float, best))), intervals,
             float(project_to), float(power_law(project_to, *best)), projection_interval, len(c_N))


def ladder_fits(rows: list[dict], spec: str, groups: dict, project_factor: float = 10.0, confidence: float = 0.95
                ) -> dict:
  """{group: Fit} of `spec` against the runs' final train/flops; `groups` maps a variant to its group (the variant
  name without the ladder axis). All groups project to the same compute: project_factor x the largest one."""
  points = {}
  for row in rows:
    if row.get(spec) is not None and row.get("final:train/flops"):
      points.setdefault(groups[row["variant"]], []).append((row["final:train/flops"], row[spec]))
  if not points:
    return {}
  target = project_factor * max(c for group in points.values() for c, _ in group)
  return {name: fit([c for c, _ in pts], [value for _, value in pts], project_to=target, confidence=confidence)
          for name, pts in points.items() if len({c for c, _ in pts}) >= 2}
