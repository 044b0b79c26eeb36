"""Size ladders: a power law of a final metric against training compute per variant, bootstrap intervals, and its
projection to a larger compute ("does the gain hold as the model grows?").

L(C) = a * C^-b + c. The floor c is fitted only from MIN_SIZES_FOR_FLOOR sizes; with fewer it is held at a given
value (config.ladder_floor, default 0) and the report says so: 4 sizes over a decade or so cannot tell c from b
(the fit puts c at its bound 0 in about one fit in six and b anywhere in a factor of 4). Holding c at 0 below a
true floor biases b and the projection low (simulated, 4 sizes x 3 seeds over 1.3 decades, true c = 1.5: the
projection 4 of its sds low, its interval covering 43%): give a floor known from elsewhere (config.ladder_floor)
or run 5 sizes over 2 decades (there: unbiased, the interval covering). The intervals come from a
two-stage bootstrap: the sizes with replacement, then each drawn size's seeds with replacement; resamples that
cannot be fitted (too few distinct sizes, the optimiser failing) are counted and reported, not hidden. Exponents
are not compared between variants (b trades off against c and a); projections are, each resample pairing the
variants' same sizes and seeds.

Offers `power_law`, `Fit`, `fit`, `ladder_fits` and `projection_differences`. Compute C is in FLOPs (train/flops,
ModelConfig.train_flops summed over the run).
"""

import dataclasses

import numpy as np
from scipy import optimize

MIN_SIZES_FOR_FLOOR = 5
MAX_EXPONENT = 5.0


def power_law(c, a, b, irreducible):
  return a * np.power(c, -b) + irreducible


@dataclasses.dataclass(frozen=True, eq=False)
class Fit:
  """A fitted law, its bootstrap intervals and the projection."""
  form: str                   # "a*C^-b+c" (c fitted) | "a*C^-b+c, c fixed" (fewer than MIN_SIZES_FOR_FLOOR sizes)
  params: dict                # a, b, c
  fixed_floor: float | None   # the value c was held at; None when fitted
  intervals: dict             # name -> (low, high); only fitted parameters
  projected_compute: float
  projection: float
  projection_interval: tuple | None
  points: int
  sizes: int
  failed: float               # share of the bootstrap resamples that could not be fitted
  warnings: tuple             # e.g. "c at its bound 0"
  projection_samples: np.ndarray  # one per resample (NaN: failed), paired across groups of the same design


def _floor_fit(x_N, loss_N, b_B):
  """(sse_B, a_B, c_B): for each exponent b, the least-squares a >= 0 and 0 <= c <= min(loss) (two linear
  parameters: the unconstrained solution when it is feasible, else the best on the constraints' edges)."""
  u_BxN = np.power(x_N[None, :], -b_B[:, None])
  n, top = len(x_N), loss_N.min()
  uu, u1, uy, y1 = (u_BxN ** 2).sum(1), u_BxN.sum(1), u_BxN @ loss_N, loss_N.sum()
  determinant = uu * n - u1 ** 2
  with np.errstate(divide="ignore", invalid="ignore"):
    candidates = [((uy * n - u1 * y1) / determinant, (uu * y1 - u1 * uy) / determinant),  # unconstrained
                  (np.maximum(uy / uu, 0), np.zeros_like(uu)),                           # c = 0
                  (np.maximum((uy - top * u1) / uu, 0), np.full_like(uu, top)),          # c = min(loss)
                  (np.zeros_like(uu), np.full_like(uu, np.clip(y1 / n, 0, top)))]        # a = 0
  best = (np.full_like(uu, np.inf), np.zeros_like(uu), np.zeros_like(uu))
  for a_B, c_B in candidates:
    feasible = np.isfinite(a_B) & np.isfinite(c_B) & (a_B >= 0) & (c_B >= 0) & (c_B <= top)
    a_B, c_B = np.where(feasible, a_B, 0.0), np.where(feasible, c_B, 0.0)
    sse_B = np.where(feasible, ((loss_N[None, :] - a_B[:, None] * u_BxN - c_B[:, None]) ** 2).sum(1), np.inf)
    better = sse_B < best[0]
    best = tuple(np.where(better, new, old) for new, old in zip((sse_B, a_B, c_B), best))
  return best


def _fit_once(c_N, loss_N, floor: float | None):
  """(a, b, c) by least squares on compute scaled to its smallest value; None when it cannot be fitted. With the
  floor fitted: for each b, a and c are linear (solved exactly), so b is searched on a grid, then refined; a
  fixed floor makes it a straight line in log-log of L - floor."""
  x_N = c_N / c_N.min()  # scaled: the fit sees numbers near 1
  if floor is None:
    grid_B = np.linspace(0.0, MAX_EXPONENT, 201)
    sse_B = _floor_fit(x_N, loss_N, grid_B)[0]
    if not np.isfinite(sse_B).any():
      return None
    i = int(np.argmin(sse_B))
    found = optimize.minimize_scalar(lambda b: float(_floor_fit(x_N, loss_N, np.array([b]))[0][0]),
                                     bounds=(grid_B[max(i - 1, 0)], grid_B[min(i + 1, len(grid_B) - 1)]),
                                     method="bounded", options={"xatol": 1e-7})
    b = float(found.x) if found.fun <= sse_B[i] else float(grid_B[i])
    _, a_B, c_B = _floor_fit(x_N, loss_N, np.array([b]))
    a, c = float(a_B[0]), float(c_B[0])
  else:
    if np.any(loss_N <= floor):
      return None
    slope, intercept = np.polyfit(np.log(x_N), np.log(loss_N - floor), 1)
    a, b, c = np.exp(intercept), -slope, floor
  if not np.all(np.isfinite((a, b, c))):
    return None
  return a * c_N.min() ** b, b, c  # back to unscaled compute


def _at_bounds(params: dict, loss_N, fitted_floor: bool) -> tuple:
  found = []
  if params["b"] <= 1e-3:
    found.append("b at its bound 0")
  if params["b"] >= MAX_EXPONENT - 1e-3:
    found.append(f"b at its bound {MAX_EXPONENT:g}")
  if fitted_floor and params["c"] <= 1e-6 * float(np.abs(loss_N).max()):
    found.append("c at its bound 0")
  if fitted_floor and params["c"] >= float(loss_N.min()) * (1 - 1e-6):
    found.append("c at its bound (the smallest loss)")
  return tuple(found)


def fit(c_N, loss_N, project_to: float, size_N=None, resamples: int = 1000, confidence: float = 0.95,
        seed: int = 0, floor: float = 0.0) -> Fit | None:
  """Fits L(C) = a*C^-b + c over points (compute, loss), grouped into sizes by `size_N` (default: the compute);
  c is fitted from MIN_SIZES_FOR_FLOOR sizes, else held at `floor`. None when the points cannot be fitted."""
  c_N, loss_N = np.asarray(c_N, np.float64), np.asarray(loss_N, np.float64)
  size_N = c_N if size_N is None else np.asarray(size_N)
  sizes = sorted(set(size_N.tolist()))
  fixed = None if len(sizes) >= MIN_SIZES_FOR_FLOOR else float(floor)
  best = _fit_once(c_N, loss_N, fixed)
  if best is None or len(sizes) < 2:
    return None
  members = [np.nonzero(size_N == s)[0] for s in sizes]  # the points of each size, in order
  rng, samples = np.random.default_rng(seed), np.full((resamples, 4), np.nan)
  for r in range(resamples):
    chosen = rng.integers(0, len(sizes), len(sizes))
    index = np.concatenate([members[j][rng.integers(0, len(members[j]), len(members[j]))] for j in chosen])
    if len(set(chosen.tolist())) >= (3 if fixed is None else 2):
      params = _fit_once(c_N[index], loss_N[index], fixed)
      if params is not None:
        samples[r] = (*params, power_law(project_to, *params))
  ok = ~np.isnan(samples[:, 0])
  tail = (1 - confidence) / 2 * 100
  intervals, projection_interval = {}, None
  if ok.sum() >= 20:
    names = ("a", "b") if fixed is not None else ("a", "b", "c")
    intervals = {n: (float(np.percentile(samples[ok, i], tail)), float(np.percentile(samples[ok, i], 100 - tail)))
                 for i, n in enumerate(names)}
    projection_interval = (float(np.percentile(samples[ok, 3], tail)),
                           float(np.percentile(samples[ok, 3], 100 - tail)))
  params = dict(zip(("a", "b", "c"), map(float, best)))
  return Fit("a*C^-b+c" if fixed is None else "a*C^-b+c, c fixed", params, fixed, intervals, float(project_to),
             float(power_law(project_to, *best)), projection_interval, len(c_N), len(sizes),
             float(1 - ok.mean()), _at_bounds(params, loss_N, fixed is None), samples[:, 3])


def ladder_fits(rows: list[dict], spec: str, groups: dict, size_of: dict, project_factor: float = 10.0,
                confidence: float = 0.95, floor: float = 0.0) -> dict:
  """{group: Fit} of `spec` against the runs' final train/flops; `groups` maps a variant to its group (the variant
  name without the ladder axis) and `size_of` to its size. All groups project to the same compute: project_factor
  x the largest one."""
  points = {}
  for row in sorted(rows, key=lambda r: (str(size_of[r["variant"]]), r["seed"])):  # same order in every group
    if row.get(spec) is not None and row.get("final:train/flops"):
      points.setdefault(groups[row["variant"]], []).append((row["final:train/flops"], row[spec],
                                                            size_of[row["variant"]]))
  if not points:
    return {}
  target = project_factor * max(c for group in points.values() for c, _, _ in group)
  found = {name: fit([c for c, _, _ in pts], [v for _, v, _ in pts], project_to=target,
                     size_N=[s for _, _, s in pts], confidence=confidence, floor=floor)
           for name, pts in points.items()}
  return {name: f for name, f in found.items() if f is not None}


def projection_differences(fits: dict, reference: str, confidence: float = 0.95) -> dict:
  """{group: (projection - the reference group's, interval)} over the resamples both fitted (paired: the same
  draw of sizes and seeds in each group, when the groups ran the same sizes and seeds)."""
  if reference not in fits:
    return {}
  out, tail = {}, (1 - confidence) / 2 * 100
  for group, found in fits.items():
    if group == reference:
      continue
    delta = found.projection_samples - fits[reference].projection_samples
    delta = delta[~np.isnan(delta)]
    interval = (float(np.percentile(delta, tail)), float(np.percentile(delta, 100 - tail))) if len(delta) >= 20 \
        else None
    out[group] = (found.projection - fits[reference].projection, interval)
  return out
