"""The figures of an ablation report: curves.png (the curve over steps, mean and std band per variant),
bars.png (the first metric: means with their t intervals, the baseline marked, differences significant after
Holm starred), lengths_<key>.png (key@L metrics by evaluation length), scaling.png (a size ladder's points and
fitted laws) and sweep.png (a hyperparameter sweep across another axis); of one run, the expert load of a mixture
of experts. Offers `plot`, `scaling_plot`, `sweep_plot`, `expert_load_plot` and `label`."""

import json
import os
import re

import matplotlib
import numpy as np

from ablate.plan import parse_metric
from train.cli import RunError
from train.metrics import read_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)

UNITS = {"loss": "nats per token", "bits_per_byte": "bits per byte", "perplexity": "per token",
         "tokens_per_sec": "tokens / s", "accuracy": "fraction", "macro_f1": "fraction", "wall_s": "s",
         "train/flops": "FLOPs", "train/tokens": "tokens", "time": "s"}


def label(spec: str) -> str:
  """An axis label: the metric and its unit."""
  unit = next((u for key, u in UNITS.items() if key in spec), "")
  return f"{spec} ({unit})" if unit else spec


def seed_band(curves) -> tuple:
  """(x_T, mean_T, std_T) over seeds' curves of (x, value): at every x any seed logged within the range all seeds
  cover, each curve interpolated linearly there (seeds share their steps and FLOPs, not their seconds)."""
  curves = [sorted(curve) for curve in curves if curve]
  if not curves:
    return np.array([]), np.array([]), np.array([])
  low, high = max(curve[0][0] for curve in curves), min(curve[-1][0] for curve in curves)
  x_T = np.array(sorted({x for curve in curves for x, _ in curve if low <= x <= high}))
  values_SxT = np.array([np.interp(x_T, [x for x, _ in curve], [v for _, v in curve]) for curve in curves])
  return x_T, values_SxT.mean(0), values_SxT.std(0)


def plot(workdir: str, ablation, summary: dict, table: dict, curves: dict, baselines: set) -> None:
  """Writes curves.png, bars.png and one lengths_<key>.png per key@L metric; `baselines` are drawn apart."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for variant, by_seed in curves.items():
    steps, mean_T, std_T = seed_band(by_seed.values())
    if not len(steps):
      continue
    baseline = variant in baselines
    ax.plot(steps, mean_T, label=f"{variant} (baseline)" if baseline else variant, color="black" if baseline else None,
            linewidth=2.2 if baseline else 1.4)
    ax.fill_between(steps, mean_T - std_T, mean_T + std_T, alpha=0.15, color="black" if baseline else None)
  ax.set(xlabel=label(ablation.x_axis), ylabel=label(ablation.curve),
         title=f"{ablation.curve}: mean and std over seeds")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "curves.png"), dpi=120)
  plt.close(fig)

  primary = ablation.metrics[0]
  names = [v for v in table.get(primary, {}) if summary[v][primary][0] is not None
           and np.isfinite(summary[v][primary][0])]  # a diverged variant has no bar
  fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(names) + 2), 4.2))
  means = np.array([summary[v][primary][0] for v in names])
  intervals = [table[primary][v]["interval"] or (m, m) for v, m in zip(names, means)]
  errors = np.array([[m - low for m, (low, _) in zip(means, intervals)], [high - m for m, (_, high) in
                                                                          zip(means, intervals)]]).reshape(2, -1)
  colors = ["0.35" if v in baselines else "tab:blue" for v in names]
  bars = ax.bar(range(len(names)), means, yerr=errors, capsize=4, color=colors)
  marks = []
  for v, m in zip(names, means):
    cell = table[primary][v]
    significant = cell["p_holm"] is not None and cell["p_holm"] < ablation.alpha
    marks.append(f"{m:.4g}" + (" *" if significant else "") + (" (base)" if v in baselines else ""))
  ax.bar_label(bars, labels=marks, fontsize=7, padding=2)
  if len(baselines & set(names)) == 1:
    ax.axhline(means[names.index(next(iter(baselines & set(names))))], color="0.35", linestyle="--", linewidth=1)
  if len(names):  # zoom on the differences: the axis starts near the smallest interval, not at 0
    low, high = float((means - errors[0]).min()), float((means + errors[1]).max())
    margin = max(high - low, 1e-3 * abs(high)) * 0.6
    ax.set_ylim(max(low - margin, 0.0) if low >= 0 else low - margin, high + margin)
  ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
  methods = "/".join(sorted({table[primary][v]["interval_method"] for v in names})) or "t"
  ax.set(ylabel=label(primary), title=f"{primary}: mean and {ablation.confidence:.0%} {methods} interval;\n"
                                      f"* = differs from the baseline (Holm p < {ablation.alpha}); axis not from 0")
  ax.title.set_fontsize(8)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "bars.png"), dpi=120)
  plt.close(fig)

  by_length = {}  # key -> [(length, spec)]
  for spec in ablation.metrics:
    _, key, length = parse_metric(spec)
    if isinstance(length, int):
      by_length.setdefault(key, []).append((length, spec))
  for key, points in by_length.items():
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, cells in summary.items():
      known = [(length, spec) for length, spec in sorted(points) if cells[spec][0] is not None
               and np.isfinite(cells[spec][0])]
      means = np.array([cells[spec][0] for _, spec in known])
      intervals = [table[spec][variant]["interval"] or (m, m) for (_, spec), m in zip(known, means)]
      errors = np.array([[m - lo for m, (lo, _) in zip(means, intervals)], [hi - m for m, (_, hi) in
                                                                            zip(means, intervals)]]).reshape(2, -1)
      ax.errorbar([length for length, _ in known], means, yerr=errors, marker="o", capsize=3,
                  label=f"{variant} (baseline)" if variant in baselines else variant,
                  color="black" if variant in baselines else None)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="evaluation length (tokens)", ylabel=label(key),
           title=f"{key} by evaluation length: mean and {ablation.confidence:.0%} interval of the mean")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, f"lengths_{key.replace('/', '_')}.png"), dpi=120)
    plt.close(fig)


def scaling_plot(workdir: str, rows: list[dict], spec: str, fits: dict, groups: dict) -> None:
  """scaling.png: each group's runs (final metric against compute), its fitted law, and the projection."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for group, found in fits.items():
    points = [(row["final:train/flops"], row[spec]) for row in rows
              if groups.get(row["variant"]) == group and row.get(spec) is not None and row.get("final:train/flops")]
    c_N = np.array([c for c, _ in points])
    line = ax.plot(c_N, [value for _, value in points], "o", alpha=0.6, label=group)[0]
    grid = np.geomspace(c_N.min(), found.projected_compute, 100)
    params = (found.params["a"], found.params["b"], found.params["c"])
    ax.plot(grid, params[0] * grid ** -params[1] + params[2], color=line.get_color())
    if found.projection_interval:
      low, high = found.projection_interval
      ax.errorbar([found.projected_compute], [found.projection],
                  yerr=[[found.projection - low], [high - found.projection]], fmt="s", color=line.get_color(),
                  capsize=4)
  ax.set_xscale("log")
  ax.set(xlabel="training compute (FLOPs)", ylabel=label(spec),
         title=f"{spec} against compute: runs, fitted laws, projection (square: interval)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "scaling.png"), dpi=120)
  plt.close(fig)


def sweep_plot(workdir: str, points: dict, spec: str, x_axis: str, line_axis: str, lower_is_better: bool) -> None:
  """sweep.png: spec against the x axis (log scale), a line per line-axis value and a panel per `points` key
  (ablate/sweep.py), each line's best point starred; the panels share the y axis."""
  fig, axes = plt.subplots(1, len(points), figsize=(5 * len(points), 4.2), sharey=True, squeeze=False)
  for ax, (panel, lines) in zip(axes[0], points.items()):
    for line, xs in lines.items():
      drawn = ax.plot([x for x, _ in xs], [v for _, v in xs], "o-", markersize=3, label=f"{line_axis}={line}")[0]
      best_x, best = (min if lower_is_better else max)(xs, key=lambda point: point[1])
      ax.plot([best_x], [best], "*", markersize=12, color=drawn.get_color())
    ax.set_xscale("log", base=2)
    ax.set(xlabel=x_axis, title=panel)
    ax.legend(fontsize=7)
  axes[0][0].set_ylabel(label(spec))
  fig.suptitle(f"{spec} against {x_axis}, a line per {line_axis} (star: each line's best)", fontsize=9)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "sweep.png"), dpi=120)
  plt.close(fig)


def expert_load_plot(run_dir: str, out: str) -> None:
  """`out` (a .png): the expert load a mixture-of-experts run logged (train/moe/LAYER/load_min, load_max, load_entropy:
  train/moe.py) against its steps, a line per layer: the shares of pairs of its busiest and idlest expert beside the
  uniform 1/E, and the load's entropy over log E (1 = uniform). A RunError when the run logged none."""
  records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
  pattern = re.compile(r"^train/moe/(.+)/load_max$")
  layers = sorted({m.group(1) for r in records for m in map(pattern.match, r) if m},
                  key=lambda name: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)])
  if not layers:
    raise RunError(f"{run_dir}/metrics.jsonl: no train/moe/*/load_max: not a mixture-of-experts run")
  fig, (shares, entropy) = plt.subplots(1, 2, figsize=(11, 4.2))
  for layer in layers:
    key = f"train/moe/{layer}/"
    logged = [r for r in records if key + "load_max" in r]
    steps = [r["step"] for r in logged]
    line = shares.plot(steps, [r[key + "load_max"] for r in logged], label=f"{layer} busiest")[0]
    shares.plot(steps, [r[key + "load_min"] for r in logged], "--", color=line.get_color(), label=f"{layer} idlest")
    entropy.plot(steps, [r[key + "load_entropy"] for r in logged], color=line.get_color(), label=layer)
  config_path = os.path.join(run_dir, "config.json")
  experts = None
  if os.path.exists(config_path):
    with open(config_path) as f:
      experts = json.load(f).get("model", {}).get("num_experts")
  if experts:
    shares.axhline(1 / experts, color="black", linewidth=0.8, linestyle=":", label=f"uniform 1/{experts}")
  shares.set(xlabel="step", ylabel="share of the layer's (token, expert) pairs", title="busiest and idlest expert")
  entropy.set(xlabel="step", ylabel="entropy / log E", title="load entropy (1 = uniform)")
  shares.legend(fontsize=7)
  entropy.legend(fontsize=7)
  fig.suptitle(os.path.basename(os.path.normpath(run_dir)), fontsize=9)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)
