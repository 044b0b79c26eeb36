"""How much sooner a variant reaches what the baseline ends at (the speedrun view: modded-nanogpt's records, "Muon
is Scalable"): seed by seed, the x (step, tokens, FLOPs) at which the variant's curve first reaches the baseline's
final curve value of the same seed, linearly interpolated between evaluations, and the speedup
baseline x / variant x, summarised by its geometric mean with the Student t interval of the mean log.

Offers `first_reach` and `speedups` (the per-variant table) and `table` (its results.md section).
"""

import math

import numpy as np

from ablate import stats


def first_reach(curve: list, target: float, lower_is_better: bool = True) -> float | None:
  """The first x of `curve` [(x, value)] at which the value reaches `target`, interpolated between the two
  evaluations around the crossing; None if it never does."""
  sign = 1.0 if lower_is_better else -1.0
  previous = None
  for x, value in curve:
    if sign * (value - target) <= 0:
      if previous is None or previous[1] == value:
        return float(x)
      x0, v0 = previous
      return float(x0 + (x - x0) * (v0 - target) / (v0 - value))
    previous = (x, value)
  return None


def speedups(curves: dict, baseline: str, confidence: float = 0.95, lower_is_better: bool = True) -> dict:
  """{variant: {"ratios": {seed: baseline x / variant x or None}, "mean": geometric mean, "interval": (low, high)
  or None, "reached": k, "n": seeds}} over the seeds each variant shares with the baseline; a variant that never
  reaches the target on a seed has ratio None there, and its summary is over the seeds that did."""
  found = {}
  for variant, by_seed in curves.items():
    if variant == baseline:
      continue
    ratios = {}
    for seed, curve in sorted(by_seed.items()):
      reference = curves[baseline].get(seed)
      if not curve or not reference:
        continue
      end_x, target = reference[-1]
      reached = first_reach(curve, target, lower_is_better)
      ratios[seed] = end_x / reached if reached else None
    logs = [math.log(r) for r in ratios.values() if r]
    interval = stats.t_interval(logs, confidence)
    found[variant] = {"ratios": ratios, "mean": math.exp(np.mean(logs)) if logs else None,
                      "interval": tuple(math.exp(v) for v in interval) if interval else None,
                      "reached": len(logs), "n": len(ratios)}
  return found


def table(found: dict, baseline: str, curve_key: str, x_axis: str, confidence: float) -> str:
  """The results.md section of `speedups`."""
  lines = [f"**Speedup to the baseline's final {curve_key}** ({baseline}'s last {x_axis} / the first {x_axis} at "
           f"which the variant's {curve_key} reaches the baseline's final value, seed by seed; geometric mean and "
           f"{confidence:.0%} t interval of the mean log; above 1: sooner)\n",
           f"| variant | speedup | {confidence:.0%} interval | reached | per seed |", "|---|---|---|---|---|"]
  for variant, cell in found.items():
    mean = f"{cell['mean']:.3f}" if cell["mean"] else "-"
    interval = f"[{cell['interval'][0]:.3f}, {cell['interval'][1]:.3f}]" if cell["interval"] else "-"
    seeds = ", ".join(f"{seed}: {ratio:.3f}" if ratio else f"{seed}: not reached"
                      for seed, ratio in cell["ratios"].items())
    lines.append(f"| {variant} | {mean} | {interval} | {cell['reached']}/{cell['n']} | {seeds} |")
  return "\n".join(lines) + "\n"
