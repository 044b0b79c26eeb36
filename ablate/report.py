"""An ablation's report from its files on disk: runs.csv (one row per run), results.csv and results.md (per
variant and metric: mean ± std, a bootstrap interval, the difference to the baseline with its interval, a
p-value, Holm-adjusted over the variants, and whether it is significant; a ladder's fits, ablate/scaling.py; a
sweep's best values, ablate/sweep.py) and the figures (ablate/figures.py).

Offers `run_metrics` (one finished run's metrics and curve), `summarize` (mean, std, n per variant),
`lower_is_better`, `significance` (the comparisons of every metric), `collect` (every run of a workdir),
`markdown_table`, `statistics_table`, `undecided` and `write_report`.
"""

import csv
import io
import json
import os
import statistics as pystats

import ml_collections

from ablate import figures
from ablate import scaling
from ablate import stats
from ablate import sweep
from ablate.plan import (AGGREGATES, DATA, baseline, expand, extra_seeds, grid_cells, ladder_groups,
                         load_ablation, parse_metric, read_status, references, value_name)
from train.metrics import read_metrics
from train.workdir import write_atomic

LOWER_IS_BETTER = ("loss", "perplexity", "bits_per_byte", "_ms", "wall", "time")


def run_metrics(run_dir: str, specs, curve_key: str, x_axis: str = "step", budget: float | None = None
                ) -> tuple[dict, list]:
  """({spec: value or None}, [(x, curve value)]) of a finished run, read from its files; with a `budget`, only
  what the run logged up to x_axis = budget counts (key@L evaluations are of the final checkpoint)."""
  records = []
  if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
  if budget is not None:
    records = [r for r in records if r.get(x_axis, float("inf")) <= budget]
  values = {}
  for spec in specs:
    aggregate, key, length = parse_metric(spec)
    if length is not None:
      suffix = "eval_data.json" if length == DATA else f"_L{length}.json"  # RUN/eval_data.json, eval_<data>_L<L>.json
      path = next((os.path.join(run_dir, n) for n in sorted(os.listdir(run_dir))
                   if n.startswith("eval_") and n.endswith(suffix)), None)
      with open(path) if path else io.StringIO("{}") as f:
        values[spec] = json.load(f).get(key)
    else:
      series = [r[key] for r in records if key in r]
      values[spec] = AGGREGATES[aggregate](series) if series else None
  return values, [(r[x_axis], r[curve_key]) for r in records if curve_key in r and x_axis in r]


def lower_is_better(spec: str) -> bool:
  """Whether smaller values of a metric are better: decided by its key (min:eval/accuracy is still an accuracy)."""
  return any(word in parse_metric(spec)[1] for word in LOWER_IS_BETTER)


def summarize(rows: list[dict], specs) -> dict:
  """{variant: {spec: (mean, std, n)}} over the finished runs' seeds; std is the sample std (0 for n=1)."""
  table = {}
  for row in rows:
    table.setdefault(row["variant"], {spec: [] for spec in specs})
    for spec in specs:
      if row.get(spec) is not None:
        table[row["variant"]][spec].append(row[spec])
  return {variant: {spec: (pystats.fmean(v) if v else None, pystats.stdev(v) if len(v) > 1 else 0.0,
                           len(v)) for spec, v in cells.items()} for variant, cells in table.items()}


def significance(rows: list[dict], specs, reference_of: dict, confidence: float = 0.95) -> dict:
  """{spec: {variant: {"interval", "comparison", "p_holm"}}}: each variant's bootstrap interval of the mean and,
  but for a baseline, its comparison with its reference (plan.references; Holm-adjusted over the variants of the
  metric)."""
  out = {}
  for spec in specs:
    by_variant = {}
    for row in rows:
      if row.get(spec) is not None:
        by_variant.setdefault(row["variant"], {})[row["seed"]] = row[spec]
    cells = {variant: {"interval": stats.bootstrap_interval(list(values.values()), confidence), "comparison": None,
                       "p_holm": None} for variant, values in by_variant.items()}
    others = [v for v in by_variant if reference_of.get(v) in by_variant]
    for variant in others:
      cells[variant]["comparison"] = stats.compare(by_variant[variant], by_variant[reference_of[variant]], confidence)
    for variant, adjusted in zip(others, stats.holm([cells[v]["comparison"].p for v in others])):
      cells[variant]["p_holm"] = adjusted
    out[spec] = cells
  return out


def undecided(table: dict, spec: str, reference_of: dict, alpha: float) -> list[str]:
  """The variants whose difference to their reference on `spec` is not significant (yet)."""
  return [variant for variant, cell in table[spec].items()
          if reference_of.get(variant) and (cell["p_holm"] is None or cell["p_holm"] >= alpha)]


def equal_budget(workdir: str, ablation, runs: list[dict]) -> dict:
  """{variant: the largest x_axis value every finished run it is compared with reached}: all runs, or with a ladder
  the runs of its size (a small model's compute says nothing of a large one's); empty for x_axis step."""
  if ablation.x_axis == "step":
    return {}
  rung = lambda variant: grid_cells(ablation)[variant][ablation.ladder] if ablation.ladder else None
  reached = {}
  for run in runs:
    path = os.path.join(workdir, "runs", run["name"], "metrics.jsonl")
    if (read_status(workdir, run["name"]) or {}).get("status") == "done" and os.path.exists(path):
      x = max((r[ablation.x_axis] for r in read_metrics(path) if ablation.x_axis in r), default=0.0)
      key = value_name(rung(run["variant"]))
      reached[key] = min(reached.get(key, x), x)
  return {run["variant"]: reached[value_name(rung(run["variant"]))] for run in runs
          if value_name(rung(run["variant"])) in reached}


def collect(workdir: str, x_axis: str | None = None):
  """(ablation, rows: one per run with status/metrics, curves: {variant: {seed: [(x, value)]}}, budget); `x_axis`
  overrides the ablation's."""
  with open(os.path.join(workdir, "ablation.json")) as f:
    saved = json.load(f)
  ablation = load_ablation(ml_collections.ConfigDict(dict(saved, **({"x_axis": x_axis} if x_axis else {}))))
  runs = expand(ablation, extra_seeds(workdir))
  budget = equal_budget(workdir, ablation, runs)
  rows, curves = [], {}
  for run in runs:
    status = read_status(workdir, run["name"]) or {"status": "not run"}
    row = {"run": run["name"], "variant": run["variant"], "seed": run["seed"], "status": status["status"],
           "wall_s": status.get("wall_s")}
    if status["status"] == "done":
      specs = [*ablation.metrics, *(["final:train/flops"] if ablation.ladder else [])]  # a ladder's compute
      values, curve = run_metrics(os.path.join(workdir, "runs", run["name"]), specs, ablation.curve,
                                  ablation.x_axis, budget.get(run["variant"]))
      row.update(values)
      curves.setdefault(run["variant"], {})[run["seed"]] = curve
    rows.append(row)
  return ablation, rows, curves, budget


def _cell(value) -> str:
  return "" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def markdown_table(summary: dict, specs) -> str:
  """Variants x metrics, `mean ± std (n)`; the best mean of each metric in bold."""
  best = {}
  for spec in specs:
    means = [(cells[spec][0], variant) for variant, cells in summary.items() if cells[spec][0] is not None]
    if means:
      best[spec] = (min if lower_is_better(spec) else max)(means)[1]
  lines = ["| variant | " + " | ".join(specs) + " |", "|---" * (len(specs) + 1) + "|"]
  for variant, cells in summary.items():
    out = []
    for spec in specs:
      mean, std, n = cells[spec]
      text = "" if mean is None else f"{mean:.4f} ± {std:.4f} (n={n})"
      out.append(f"**{text}**" if best.get(spec) == variant else text)
    lines.append(f"| {variant} | " + " | ".join(out) + " |")
  return "\n".join(lines) + "\n"


def _interval(interval) -> str:
  return "" if interval is None else f"[{interval[0]:.4f}, {interval[1]:.4f}]"


def statistics_table(summary: dict, table: dict, spec: str, reference_of: dict, alpha: float,
                     confidence: float, described: str) -> str:
  """One metric: each variant's mean, its interval, and its difference to the baseline with interval and p."""
  better = "lower" if lower_is_better(spec) else "higher"
  lines = [f"**{spec}** ({better} is better; baseline {described})\n",
           f"| variant | mean ± std (n) | {confidence:.0%} CI | Δ vs baseline [{confidence:.0%} CI] | p (test) | "
           "p Holm | |", "|---|---|---|---|---|---|---|"]
  for variant, cell in table[spec].items():
    mean, std, n = summary[variant][spec]
    comparison, mark = cell["comparison"], ""
    if reference_of.get(variant) is None:
      delta, p, p_holm, mark = "baseline", "", "", ""
    elif comparison is None:
      delta, p, p_holm = "", "", ""
    else:
      delta = f"{comparison.difference:+.4f} {_interval(comparison.interval)}"
      p = "" if comparison.p is None else f"{comparison.p:.3g} ({comparison.test}, n={comparison.n})"
      p_holm = "" if cell["p_holm"] is None else f"{cell['p_holm']:.3g}"
      if cell["p_holm"] is not None and cell["p_holm"] < alpha:
        good = (comparison.difference < 0) == lower_is_better(spec)
        mark = f"significant, {'better' if good else 'worse'}"
    lines.append(f"| {variant} | {mean:.4f} ± {std:.4f} (n={n}) | {_interval(cell['interval'])} | {delta} | {p} | "
                 f"{p_holm} | {mark} |")
  return "\n".join(lines) + "\n"


def scaling_table(fits: dict, spec: str, confidence: float) -> str:
  """One row per group: the fitted law, its parameters with intervals, and the projection."""
  if not fits:
    return f"**Scaling of {spec}**: too few sizes to fit.\n"
  target = next(iter(fits.values())).projected_compute
  lines = [f"**Scaling of {spec} with training compute C (FLOPs)**: L(C) = a·C^-b + c (a·C^-b with too few sizes "
           f"for a floor) per group over its sizes and seeds; {confidence:.0%} bootstrap intervals; projection to "
           f"C = {target:.3g}, 10x the largest run.\n",
           "| group | law | a | b | c | L at projected C | points |", "|---|---|---|---|---|---|---|"]
  for group, found in fits.items():
    cell = lambda name: ("" if name not in found.params else
                         f"{found.params[name]:.4g} {_interval(found.intervals.get(name))}")
    lines.append(f"| {group} | {found.form} | {cell('a')} | {cell('b')} | {cell('c')} | {found.projection:.4f} "
                 f"{_interval(found.projection_interval)} | {found.points} |")
  return "\n".join(lines) + "\n"


def write_report(workdir: str, out: str | None = None, x_axis: str | None = None) -> str:
  """Writes runs.csv, results.csv, results.md and the figures from the finished runs on disk into `out` (default:
  workdir), comparing the runs at `x_axis` (default: the ablation's); returns results.md."""
  ablation, rows, curves, budget = collect(workdir, x_axis)
  out = out or workdir
  os.makedirs(out, exist_ok=True)
  specs, reference_of = list(ablation.metrics), references(ablation)
  described = f"{ladder_groups(ablation)[baseline(ablation)]} at each {ablation.ladder}" if ablation.ladder else \
      baseline(ablation)
  done = [row for row in rows if row["status"] == "done"]
  summary = summarize(done, specs)
  table = significance(done, specs, reference_of, ablation.confidence)
  columns = ("run", "variant", "seed", "status", "wall_s", *specs)
  _write_csv(os.path.join(out, "runs.csv"), columns, [[row.get(k) for k in columns] for row in rows])
  results = []
  for spec in specs:
    for variant, cell in table[spec].items():
      mean, std, n = summary[variant][spec]
      comparison = cell["comparison"]
      results.append([spec, variant, mean, std, n, *(cell["interval"] or (None, None)),
                      *((comparison.difference, *(comparison.interval or (None, None)), comparison.p,
                         comparison.test, cell["p_holm"],
                         cell["p_holm"] is not None and cell["p_holm"] < ablation.alpha) if comparison else
                        (None,) * 7)])
  _write_csv(os.path.join(out, "results.csv"),
             ("metric", "variant", "mean", "std", "n", "ci_low", "ci_high", "difference", "difference_low",
              "difference_high", "p", "test", "p_holm", "significant"), results)
  text = (f"# Ablation: {ablation.entrypoint} {ablation.config}\n\n"
          f"{len(done)} of {len(rows)} runs finished; seeds {tuple(ablation.seeds)}"
          + (f" and added {extra_seeds(workdir)}" if extra_seeds(workdir) else "") +
          "; mean ± sample std over seeds, best in bold."
          + _budget_text(ablation, budget) + "\n\n" + markdown_table(summary, specs) +
          f"\nIntervals: {ablation.confidence:.0%} percentile bootstrap of the mean (10,000 resamples). Δ: the mean "
          "difference to the baseline, over the seeds both ran (the runs of a seed share the data order: paired t-test)"
          ", else Welch's t-test. p Holm: adjusted over the variants of a metric; significant when below "
          f"{ablation.alpha}.\n\n" + "\n".join(statistics_table(summary, table, spec, reference_of, ablation.alpha,
                                                                ablation.confidence, described) for spec in specs))
  fits = {}
  if ablation.ladder:
    fits = scaling.ladder_fits(done, specs[0], ladder_groups(ablation), confidence=ablation.confidence)
    text += "\n" + scaling_table(fits, specs[0], ablation.confidence)
  if ablation.sweep:
    text += "\n" + sweep.table(ablation, summary, specs[0], lower_is_better(specs[0]))
  unfinished = [f"{row['run']} ({row['status']})" for row in rows if row["status"] != "done"]
  if unfinished:
    text += "\nNot finished: " + ", ".join(unfinished) + "\n"
  write_atomic(os.path.join(out, "results.md"), text)
  figures.plot(out, ablation, summary, table, curves, {v for v, r in reference_of.items() if r is None})
  if fits:
    figures.scaling_plot(out, done, specs[0], fits, ladder_groups(ablation))
  if ablation.sweep:
    figures.sweep_plot(out, sweep.points(ablation, summary, specs[0]), specs[0], *ablation.sweep,
                       lower_is_better(specs[0]))
  return text


def _budget_text(ablation, budget: dict) -> str:
  if not budget:
    return ""
  if not ablation.ladder:
    return (f" Compared at equal cost: every metric as logged up to {ablation.x_axis} = "
            f"{next(iter(budget.values())):.4g}, the most all runs reached.")
  by_rung = {}
  for variant, value in budget.items():
    by_rung.setdefault(value_name(grid_cells(ablation)[variant][ablation.ladder]), value)
  return (f" Compared at equal cost within each {ablation.ladder}: every metric as logged up to the {ablation.x_axis} "
          "all runs of that size reached (" + ", ".join(f"{rung}: {value:.4g}" for rung, value in by_rung.items())
          + ").")


def _write_csv(path: str, header, rows) -> None:
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(header)
  writer.writerows([[_cell(value) for value in row] for row in rows])
  write_atomic(path, buffer.getvalue())
