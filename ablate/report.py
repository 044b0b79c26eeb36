"""An ablation's report from its files on disk: results.csv, results.md (mean ± std over seeds) and figures.

Offers `run_metrics` (one finished run's metrics and curve), `summarize` (mean, std, n per variant over seeds),
`collect` (every run of a workdir), `markdown_table`, `write_report` and `plot` (curves, bars, lengths).
"""

import csv
import io
import json
import os
import statistics

import matplotlib
import ml_collections
import numpy as np

from ablate.plan import AGGREGATES, expand, load_ablation, parse_metric, read_status
from train.metrics import read_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)

LOWER_IS_BETTER = ("loss", "perplexity", "bits_per_byte", "_ms", "wall")


def run_metrics(run_dir: str, specs, curve_key: str) -> tuple[dict, list]:
  """({spec: value or None}, [(step, curve value)]) of a finished run, read from its files."""
  records = []
  if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
  values = {}
  for spec in specs:
    aggregate, key, length = parse_metric(spec)
    if length is not None:
      path = next((os.path.join(run_dir, n) for n in sorted(os.listdir(run_dir))
                   if n.startswith("eval_") and n.endswith(f"_L{length}.json")), None)
      with open(path) if path else io.StringIO("{}") as f:
        values[spec] = json.load(f).get(key)
    else:
      series = [r[key] for r in records if key in r]
      values[spec] = AGGREGATES[aggregate](series) if series else None
  return values, [(r["step"], r[curve_key]) for r in records if curve_key in r]


def _lower_is_better(spec: str) -> bool:
  return spec.startswith("min:") or any(word in spec for word in LOWER_IS_BETTER)


def summarize(rows: list[dict], specs) -> dict:
  """{variant: {spec: (mean, std, n)}} over the finished runs' seeds; std is the sample std (0 for n=1)."""
  table = {}
  for row in rows:
    table.setdefault(row["variant"], {spec: [] for spec in specs})
    for spec in specs:
      if row.get(spec) is not None:
        table[row["variant"]][spec].append(row[spec])
  return {variant: {spec: (statistics.fmean(v) if v else None, statistics.stdev(v) if len(v) > 1 else 0.0,
                           len(v)) for spec, v in cells.items()} for variant, cells in table.items()}


def collect(workdir: str):
  """(ablation, rows: one per run with status/metrics, curves: {variant: {seed: [(step, value)]}})."""
  with open(os.path.join(workdir, "ablation.json")) as f:
    ablation = load_ablation(ml_collections.ConfigDict(json.load(f)))
  rows, curves = [], {}
  for run in expand(ablation):
    status = read_status(workdir, run["name"]) or {"status": "not run"}
    row = {"run": run["name"], "variant": run["variant"], "seed": run["seed"], "status": status["status"],
           "wall_s": status.get("wall_s")}
    if status["status"] == "done":
      values, curve = run_metrics(os.path.join(workdir, "runs", run["name"]), ablation.metrics, ablation.curve)
      row.update(values)
      curves.setdefault(run["variant"], {})[run["seed"]] = curve
    rows.append(row)
  return ablation, rows, curves


def _cell(value) -> str:
  return "" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def markdown_table(summary: dict, specs) -> str:
  """Variants x metrics, `mean ± std (n)`; the best mean of each metric in bold."""
  best = {}
  for spec in specs:
    means = [(cells[spec][0], variant) for variant, cells in summary.items() if cells[spec][0] is not None]
    if means:
      best[spec] = (min if _lower_is_better(spec) else max)(means)[1]
  lines = ["| variant | " + " | ".join(specs) + " |", "|---" * (len(specs) + 1) + "|"]
  for variant, cells in summary.items():
    out = []
    for spec in specs:
      mean, std, n = cells[spec]
      text = "" if mean is None else f"{mean:.4f} ± {std:.4f} (n={n})"
      out.append(f"**{text}**" if best.get(spec) == variant else text)
    lines.append(f"| {variant} | " + " | ".join(out) + " |")
  return "\n".join(lines) + "\n"


def write_report(workdir: str) -> str:
  """Writes results.csv, results.md and the figures from the finished runs on disk; returns results.md."""
  ablation, rows, curves = collect(workdir)
  specs = list(ablation.metrics)
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["run", "variant", "seed", "status", "wall_s", *specs])
    for row in rows:
      writer.writerow([_cell(row.get(k)) for k in ("run", "variant", "seed", "status", "wall_s", *specs)])
  summary = summarize([row for row in rows if row["status"] == "done"], specs)
  done = [row for row in rows if row["status"] == "done"]
  text = (f"# Ablation: {ablation.entrypoint} {ablation.config}\n\n"
          f"{len(done)} of {len(rows)} runs finished; seeds {tuple(ablation.seeds)}; mean ± sample std over "
          f"seeds, best in bold.\n\n" + markdown_table(summary, specs))
  unfinished = [f"{row['run']} ({row['status']})" for row in rows if row["status"] != "done"]
  if unfinished:
    text += "\nNot finished: " + ", ".join(unfinished) + "\n"
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(text)
  plot(workdir, ablation, summary, curves)
  return text


def plot(workdir: str, ablation, summary: dict, curves: dict) -> None:
  """curves.png (mean ± std band per variant over seeds), bars.png (first metric), lengths.png (key@L)."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for variant, by_seed in curves.items():
    steps = sorted(set.intersection(*[{s for s, _ in curve} for curve in by_seed.values()]))
    if not steps:
      continue
    values_SxT = np.array([[dict(curve)[s] for s in steps] for curve in by_seed.values()])
    mean_T, std_T = values_SxT.mean(0), values_SxT.std(0)
    ax.plot(steps, mean_T, label=variant)
    ax.fill_between(steps, mean_T - std_T, mean_T + std_T, alpha=0.2)
  ax.set(xlabel="step", ylabel=ablation.curve, title=f"{ablation.curve} (mean ± std over seeds)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "curves.png"), dpi=120)
  plt.close(fig)

  primary = ablation.metrics[0]
  names = [v for v in summary if summary[v][primary][0] is not None]
  fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(names) + 2), 4))
  means = np.array([summary[v][primary][0] for v in names])
  stds = np.array([summary[v][primary][1] for v in names])
  bars = ax.bar(range(len(names)), means, yerr=stds, capsize=4)
  ax.bar_label(bars, labels=[f"{m:.4g}" for m in means], fontsize=7, padding=2)
  if len(names):  # zoom on the differences: the axis starts near the smallest bar, not at 0
    low, high = float((means - stds).min()), float((means + stds).max())
    margin = max(high - low, 1e-3 * abs(high)) * 0.6
    ax.set_ylim(max(low - margin, 0.0) if low >= 0 else low - margin, high + margin)
  ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
  ax.set(ylabel=primary, title=f"{primary} (mean ± std over seeds; axis not from 0)")
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "bars.png"), dpi=120)
  plt.close(fig)

  by_length = {}  # key -> [(length, spec)]
  for spec in ablation.metrics:
    if "@" in spec:
      key, length = spec.rsplit("@", 1)
      by_length.setdefault(key, []).append((int(length), spec))
  for key, points in by_length.items():
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, cells in summary.items():
      xs = [length for length, spec in sorted(points) if cells[spec][0] is not None]
      means = np.array([cells[spec][0] for _, spec in sorted(points) if cells[spec][0] is not None])
      stds = np.array([cells[spec][1] for _, spec in sorted(points) if cells[spec][0] is not None])
      ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=variant)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="evaluation length", ylabel=key, title=f"{key} by evaluation length (mean ± std)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, f"lengths_{key.replace('/', '_')}.png"), dpi=120)
    plt.close(fig)
