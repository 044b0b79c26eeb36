"""An ablation's report from its files on disk: runs.csv (one row per run), results.csv and results.md (per
variant and metric: mean ± std and a t interval; against the baseline, over the seeds both ran: the difference Δ
with the t interval that agrees with its test, the effect size, a p-value Holm-adjusted over variants x primary
metrics, an equivalence test where a min_effect is given, and a verdict; a ladder's fits, ablate/scaling.py; a
sweep's best values, ablate/sweep.py) and the figures (ablate/figures.py).

Offers `run_metrics` (one finished run's metrics and curve), `summarize` (mean, std, n per variant),
`lower_is_better`, `significance` (the comparisons of every metric), `verdict`, `undecided`, `collect` (every
run of a workdir), `markdown_table`, `statistics_table` and `write_report`.
"""

import csv
import io
import json
import math
import os
import statistics as pystats

import ml_collections

from ablate import figures
from ablate import scaling
from ablate import sequential
from ablate import speedup
from ablate import stats
from ablate import sweep
from ablate.plan import (AGGREGATES, DATA, baseline, direction, expand, extra_seeds, grid_cells, is_cost,
                         ladder_groups, load_ablation, min_effect, parse_metric, primary_metrics, read_status,
                         references, value_name)
from train.metrics import read_metrics
from train.workdir import write_atomic

SEQUENTIAL = "sequential.json"  # WORKDIR/sequential.json: the looks --until_significant planned
NOT_EQUAL_COST = "final checkpoint, not equal cost"


def run_metrics(run_dir: str, specs, curve_key: str, x_axis: str = "step", budget: float | None = None
                ) -> tuple[dict, list]:
  """({spec: value or None}, [(x, curve value)]) of a finished run, read from its files; with a `budget`, only
  what the run logged up to x_axis = budget counts (key@L and key@data evaluations are of the final checkpoint)."""
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


def lower_is_better(spec: str, directions=None) -> bool:
  """Whether smaller values of a metric are better (plan.direction: config.directions, else the default table;
  min:eval/accuracy is still an accuracy). A metric of unknown direction counts as higher-is-better here;
  load_ablation refuses one in an ablation config."""
  return direction(spec, directions) == "lower"


def summarize(rows: list[dict], specs) -> dict:
  """{variant: {spec: (mean, std, n)}} over the finished runs' seeds; std is the sample std (0 for n=1)."""
  table = {}
  for row in rows:
    table.setdefault(row["variant"], {spec: [] for spec in specs})
    for spec in specs:
      if row.get(spec) is not None:
        table[row["variant"]][spec].append(row[spec])
  def described(v):
    if not all(math.isfinite(x) for x in v):
      return math.nan, math.nan, len(v)  # a diverged run: no mean to speak of
    return pystats.fmean(v) if v else None, pystats.stdev(v) if len(v) > 1 else 0.0, len(v)
  return {variant: {spec: described(v) for spec, v in cells.items()} for variant, cells in table.items()}


def significance(rows: list[dict], specs, reference_of: dict, confidence: float = 0.95, primary=None,
                 min_effects: dict | None = None, looks=None, alpha: float = 0.05, interval: str = "t") -> dict:
  """{spec: {variant: cell}}: each variant's interval of the mean and, but for a baseline, its comparison with its
  reference (plan.references). A cell holds "interval", "interval_method", "comparison", "primary", "p_holm" and
  "p_equivalent_holm" (Holm over every variant x primary metric; None for exploratory metrics and untested
  comparisons) and "futile" (sequential looks only: not worth more seeds). `primary` defaults to the first spec."""
  primary = list(primary if primary is not None else specs[:1])
  min_effects = min_effects or {}
  out, family = {}, []
  for spec in specs:
    by_variant = {}
    for row in rows:
      if row.get(spec) is not None:
        by_variant.setdefault(row["variant"], {})[row["seed"]] = row[spec]
    cells = {}
    for variant, values in by_variant.items():
      found, method = stats.mean_interval(list(values.values()), confidence, interval)
      cells[variant] = {"interval": found, "interval_method": method, "comparison": None, "primary": spec in primary,
                        "p_holm": None, "p_equivalent_holm": None, "futile": False}
    for variant in [v for v in by_variant if reference_of.get(v) in by_variant]:
      reference = by_variant[reference_of[variant]]
      comparison = stats.compare(by_variant[variant], reference, confidence, min_effects.get(spec), looks)
      if is_cost(spec) and comparison.test:
        comparison = stats.Comparison(comparison.difference, None, confidence, None, "cost counter", comparison.n,
                                      None, comparison.variant_mean, comparison.baseline_mean, comparison.seeds,
                                      comparison.dropped)
      cells[variant]["comparison"] = comparison
      if looks and comparison.seeds and comparison.p is not None:
        cells[variant]["futile"] = bool(sequential.futile(
            [by_variant[variant][s] - reference[s] for s in comparison.seeds], looks, alpha))
      if spec in primary:
        family.append(cells[variant])
    out[spec] = cells
  for key, source in (("p_holm", "p"), ("p_equivalent_holm", "p_equivalent")):
    for cell, adjusted in zip(family, stats.holm([getattr(cell["comparison"], source) for cell in family])):
      cell[key] = adjusted
  return out


def verdict(cell: dict, spec: str, alpha: float, directions=None, margin: float | None = None) -> str:
  """What a comparison says, in words that a non-significant test cannot turn into "no effect"."""
  comparison = cell["comparison"]
  if comparison is None:
    return ""
  way = lambda: "better" if (comparison.difference < 0) == lower_is_better(spec, directions) else "worse"
  if comparison.test == "":
    return "too few runs"
  if comparison.test in ("deterministic", "cost counter"):
    return f"{comparison.test}, no test: {way()}" if comparison.difference else f"{comparison.test}, no test: equal"
  if comparison.p is None:
    return "n/a (not finite)"
  if not cell["primary"]:
    return f"exploratory (unadjusted p < {alpha:g}: {way()})" if comparison.p < alpha else "exploratory"
  if cell["p_holm"] < alpha:
    return f"significant, {way()}"
  if cell["p_equivalent_holm"] is not None and cell["p_equivalent_holm"] < alpha:
    return f"equivalent within ±{margin:g}"
  return "inconclusive" + (" (stopped: futile)" if cell["futile"] else "")


def undecided(table: dict, specs, reference_of: dict, alpha: float) -> list[str]:
  """The variants with a primary comparison that is neither significant, nor equivalent, nor futile (yet)."""
  open_ = set()
  for spec in specs:
    for variant, cell in table[spec].items():
      comparison = cell["comparison"]
      if not reference_of.get(variant) or not cell["primary"]:
        continue
      if comparison is not None and comparison.test in ("deterministic", "cost counter"):
        continue
      tested = comparison is not None and comparison.p is not None
      decided = tested and (cell["p_holm"] < alpha or cell["futile"] or
                            (cell["p_equivalent_holm"] is not None and cell["p_equivalent_holm"] < alpha))
      if not decided:
        open_.add(variant)
  return sorted(open_)


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


def looks_of(workdir: str):
  """The sequential plan --until_significant recorded (sequential.Looks), or None for a fixed set of seeds."""
  path = os.path.join(workdir, SEQUENTIAL)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    saved = json.load(f)
  return sequential.calibrate(saved["first"], saved["last"])


def _cell(value) -> str:
  return "" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def _heading(spec: str, budget: dict) -> str:
  """A metric's name; a key@L / key@data metric in an equal-cost report says it is not at equal cost."""
  return f"{spec} ({NOT_EQUAL_COST})" if budget and parse_metric(spec)[2] is not None else spec


def markdown_table(summary: dict, specs, directions=None, budget: dict | None = None) -> str:
  """Variants x metrics, `mean ± std (n)`; the best mean of each metric in bold."""
  best = {}
  for spec in specs:
    means = [(cells[spec][0], variant) for variant, cells in summary.items() if cells[spec][0] is not None]
    if means:
      best[spec] = (min if lower_is_better(spec, directions) else max)(means)[1]
  lines = ["| variant | " + " | ".join(_heading(spec, budget) for spec in specs) + " |",
           "|---" * (len(specs) + 1) + "|"]
  for variant, cells in summary.items():
    out = []
    for spec in specs:
      mean, std, n = cells[spec]
      text = "" if mean is None else f"{_number(mean)} ± {_number(std)} (n={n})"
      out.append(f"**{text}**" if best.get(spec) == variant else text)
    lines.append(f"| {variant} | " + " | ".join(out) + " |")
  return "\n".join(lines) + "\n"


def _number(x: float, sign: str = "") -> str:
  """4 decimals, or 4 significant digits for a large value (a FLOP count)."""
  return f"{x:{sign}.4g}" if math.isfinite(x) and abs(x) >= 1e5 else f"{x:{sign}.4f}"


def _interval(interval) -> str:
  return "" if interval is None else f"[{_number(interval[0])}, {_number(interval[1])}]"


def _p(p) -> str:
  return "n/a" if p is None else f"{p:.3g}"


def statistics_table(summary: dict, table: dict, spec: str, reference_of: dict, alpha: float, confidence: float,
                     described: str, directions=None, margin: float | None = None, budget: dict | None = None
                     ) -> str:
  """One metric: each variant's mean and interval; against the baseline over the seeds both ran, the means
  compared, Δ with its interval, the effect size, p, Holm's p, the equivalence test's and the verdict."""
  better = "lower" if lower_is_better(spec, directions) else "higher"
  kind = "cost counter, not tested" if is_cost(spec) else \
      "primary" if any(cell["primary"] for cell in table[spec].values()) else "exploratory"
  methods = sorted({cell["interval_method"] for cell in table[spec].values()})
  equivalence = f" p equiv. (±{margin:g}) |" if margin else ""
  lines = [f"**{_heading(spec, budget)}** ({better} is better; {kind}; baseline {described})\n",
           f"| variant | mean ± std (n) | {confidence:.0%} CI ({', '.join(methods)}) | means compared | "
           f"Δ [CI] | d | p (test, n) | p Holm |{equivalence} verdict |",
           "|---" * (9 + bool(margin)) + "|"]
  for variant, cell in table[spec].items():
    mean, std, n = summary[variant][spec]
    comparison = cell["comparison"]
    compared = delta = effect = p = p_holm = p_equivalent = ""
    if reference_of.get(variant) is None:
      delta = "baseline"
    elif comparison is not None:
      compared = f"{_number(comparison.variant_mean)} vs {_number(comparison.baseline_mean)}"
      level = "" if comparison.level == confidence or comparison.interval is None else \
          f" ({comparison.level:.1%})"
      delta = f"{_number(comparison.difference, '+')} {_interval(comparison.interval)}{level}".strip()
      effect = "" if comparison.effect is None else f"{comparison.effect:+.2f}"
      untested = comparison.test in ("deterministic", "cost counter")
      p = "" if not comparison.test else f"no test ({comparison.test}, n={comparison.n})" if untested else \
          f"{_p(comparison.p)} ({comparison.test}, n={comparison.n})"
      p_holm = _p(cell["p_holm"]) if cell["primary"] and comparison.p is not None else ""
      p_equivalent = _p(cell["p_equivalent_holm"]) if comparison.p_equivalent is not None else ""
    row = (f"| {variant} | {_number(mean)} ± {_number(std)} (n={n}) | {_interval(cell['interval'])} | {compared} | "
           f"{delta} | "
           f"{effect} | {p} | {p_holm} |" + (f" {p_equivalent} |" if margin else "") +
           f" {verdict(cell, spec, alpha, directions, margin)} |")
    lines.append(row)
  dropped = [f"{variant} vs {reference_of[variant]}: " + ", ".join(
      f"{variant if side == 'variant' else reference_of[variant]} seed {seed}" for side, seed in cell["comparison"].dropped)
      for variant, cell in table[spec].items() if cell["comparison"] is not None and cell["comparison"].dropped]
  if dropped:
    lines.append(f"\nLeft out of Δ and the means compared (no run of the same seed to pair with): "
                 f"{'; '.join(dropped)}.")
  return "\n".join(lines) + "\n"


def scaling_table(fits: dict, spec: str, confidence: float, reference: str | None = None) -> str:
  """One row per group: the fitted law, its parameters with intervals, the projection, and the projection's
  difference to the reference group's; failed resamples and parameters at a bound are said."""
  if not fits:
    return f"**Scaling of {spec}**: too few sizes to fit.\n"
  target = next(iter(fits.values())).projected_compute
  sizes = min(found.sizes for found in fits.values())
  floor = next((f.fixed_floor for f in fits.values() if f.fixed_floor is not None), None)
  how = (f"the floor c held at {floor:g}: {sizes} sizes, fewer than the {scaling.MIN_SIZES_FOR_FLOOR} a fitted "
         "floor needs (config.ladder_floor sets it); if the true floor is higher, b comes out low and the projection "
         "too low by more than its interval shows"
         if floor is not None else f"c fitted ({sizes} sizes)")
  differences = scaling.projection_differences(fits, reference, confidence) if reference else {}
  lines = [f"**Scaling of {spec} with training compute C (FLOPs)**: L(C) = a·C^-b + c per group over its sizes and "
           f"seeds, {how}; {confidence:.0%} intervals from a bootstrap of sizes, then seeds within each size; "
           f"projection to C = {target:.3g}, 10x the largest run. Exponents are not compared between groups (b "
           "trades off against a and c); projections are, each resample pairing the groups' sizes and seeds.\n",
           f"| group | law | a | b | c | L at projected C | Δ projection vs {reference or 'reference'} | points "
           "(sizes) | failed resamples | warnings |", "|---" * 10 + "|"]
  for group, found in fits.items():
    cell = lambda name: f"{found.params[name]:.4g} {_interval(found.intervals.get(name))}".strip()
    delta = differences.get(group)
    delta = "reference" if group == reference else "" if delta is None else \
        f"{delta[0]:+.4f} {_interval(delta[1])}"
    lines.append(f"| {group} | {found.form} | {cell('a')} | {cell('b')} | {cell('c')} | {found.projection:.4f} "
                 f"{_interval(found.projection_interval)} | {delta} | {found.points} ({found.sizes}) | "
                 f"{found.failed:.0%} | {'; '.join(found.warnings)} |")
  return "\n".join(lines) + "\n"


def _statistics_text(ablation, workdir: str, looks, primary: list) -> str:
  """The paragraph that says how the tables were computed."""
  method = ("Student t" if ablation.interval == "t" else
            f"percentile bootstrap from {stats.BOOTSTRAP_MIN_N} seeds, Student t below (the column says which)")
  text = (f"\nStatistics. Interval of a mean: {ablation.confidence:.0%} {method}. Against the baseline, only the "
          "seeds both ran are compared (the runs of a seed share the data order: paired t-test; Welch's t-test when "
          "the runs do not pair); \"means compared\" are the two means over those seeds, Δ their difference with "
          "the t interval that agrees with its test (it excludes 0 exactly when p < "
          f"{1 - ablation.confidence:.2g}), d = Δ / sd of the paired differences (Welch: / the root mean variance). "
          f"Primary metrics: {', '.join(primary)}; p Holm is adjusted over every variant x primary metric, and a "
          f"difference is significant when it is below {ablation.alpha}. Other metrics are exploratory: unadjusted "
          "p, no verdict. A difference that is the same at every seed (and a cost counter) is shown without a test. "
          "Not significant is not \"no difference\": it is inconclusive, unless a TOST against ±min_effect (p equiv.,"
          " Holm-adjusted) shows the difference lies within it.")
  if looks:
    text += (f" Sequential: --until_significant added seeds to the undecided comparisons, looking at {looks.first} "
             f"to {looks.last} seeds per variant, so the number of seeds depended on the data. p-values and "
             f"intervals are adjusted for those looks (each look rejects at p <= {looks.threshold(ablation.alpha):.4g}"
             f", calibrated by simulation so that the chance of any false \"significant\" over all looks is "
             f"{ablation.alpha}; a Δ's interval is then wider than {ablation.confidence:.0%} per look, its level is "
             "shown); a comparison that stopped early tends to overstate its effect. Futile: at the observed effect, "
             f"a test at {looks.last} seeds would pass with probability below {sequential.FUTILITY_POWER:g}.")
  elif extra_seeds(workdir):
    text += (" Warning: seeds were added by --until_significant without a recorded plan of looks (an older run): "
             "the p-values do not keep their error rate.")
  return text + "\n\n"


def write_report(workdir: str, out: str | None = None, x_axis: str | None = None) -> str:
  """Writes runs.csv, results.csv, results.md and the figures from the finished runs on disk into `out` (default:
  workdir), comparing the runs at `x_axis` (default: the ablation's); returns results.md."""
  ablation, rows, curves, budget = collect(workdir, x_axis)
  out = out or workdir
  os.makedirs(out, exist_ok=True)
  specs, reference_of, primary = list(ablation.metrics), references(ablation), primary_metrics(ablation)
  directions, looks = ablation.directions, looks_of(workdir)
  margins = {spec: min_effect(ablation, spec) for spec in specs}
  described = f"{ladder_groups(ablation)[baseline(ablation)]} at each {ablation.ladder}" if ablation.ladder else \
      baseline(ablation)
  done = [row for row in rows if row["status"] == "done"]
  summary = summarize(done, specs)
  table = significance(done, specs, reference_of, ablation.confidence, primary, margins, looks, ablation.alpha,
                       ablation.interval)
  columns = ("run", "variant", "seed", "status", "wall_s", *specs)
  _write_csv(os.path.join(out, "runs.csv"), columns, [[row.get(k) for k in columns] for row in rows])
  results = []
  for spec in specs:
    for variant, cell in table[spec].items():
      mean, std, n = summary[variant][spec]
      c = cell["comparison"]
      said = verdict(cell, spec, ablation.alpha, directions, margins[spec])
      results.append([spec, variant, cell["primary"], mean, std, n, *(cell["interval"] or (None, None)),
                      cell["interval_method"],
                      *((c.variant_mean, c.baseline_mean, c.difference, *(c.interval or (None, None)), c.level,
                         c.effect, c.p, c.test, c.n, " ".join(map(str, c.seeds)),
                         " ".join(f"{side}:{seed}" for side, seed in c.dropped), cell["p_holm"], c.p_equivalent,
                         cell["p_equivalent_holm"], said.startswith("significant"), said) if c else (None,) * 17)])
  _write_csv(os.path.join(out, "results.csv"),
             ("metric", "variant", "primary", "mean", "std", "n", "ci_low", "ci_high", "ci_method", "variant_mean",
              "baseline_mean", "difference", "difference_low", "difference_high", "difference_level", "effect", "p",
              "test", "pairs", "seeds", "dropped", "p_holm", "p_equivalent", "p_equivalent_holm", "significant",
              "verdict"), results)
  text = (f"# Ablation: {ablation.entrypoint} {ablation.config}\n\n"
          f"{len(done)} of {len(rows)} runs finished; seeds {tuple(ablation.seeds)}"
          + (f" and added {extra_seeds(workdir)}" if extra_seeds(workdir) else "") +
          "; mean ± sample std over every finished seed, best in bold."
          + _budget_text(ablation, budget) + "\n\n" + markdown_table(summary, specs, directions, budget)
          + _statistics_text(ablation, workdir, looks, primary)
          + "\n".join(statistics_table(summary, table, spec, reference_of, ablation.alpha, ablation.confidence,
                                       described, directions, margins[spec], budget) for spec in specs))
  fits = {}
  if ablation.ladder:
    groups = ladder_groups(ablation)
    size_of = {variant: value_name(cell[ablation.ladder]) for variant, cell in grid_cells(ablation).items()}
    fits = scaling.ladder_fits(done, specs[0], groups, size_of, confidence=ablation.confidence,
                               floor=ablation.ladder_floor)
    text += "\n" + scaling_table(fits, specs[0], ablation.confidence, groups[baseline(ablation)])
  if ablation.speedup:
    text += "\n" + speedup.table(speedup.speedups(curves, baseline(ablation), ablation.confidence,
                                                  lower_is_better(ablation.curve, directions)),
                                  baseline(ablation), ablation.curve, ablation.x_axis, ablation.confidence)
  if ablation.sweep:
    text += "\n" + sweep.table(ablation, summary, specs[0], lower_is_better(specs[0], directions))
  unfinished = [f"{row['run']} ({row['status']})" for row in rows if row["status"] != "done"]
  if unfinished:
    text += "\nNot finished: " + ", ".join(unfinished) + "\n"
  write_atomic(os.path.join(out, "results.md"), text)
  figures.plot(out, ablation, summary, table, curves, {v for v, r in reference_of.items() if r is None})
  if fits:
    figures.scaling_plot(out, done, specs[0], fits, ladder_groups(ablation))
  if ablation.sweep:
    figures.sweep_plot(out, sweep.points(ablation, summary, specs[0]), specs[0], *ablation.sweep,
                       lower_is_better(specs[0], directions))
  return text


def _budget_text(ablation, budget: dict) -> str:
  if not budget:
    return ""
  late = [spec for spec in ablation.metrics if parse_metric(spec)[2] is not None]
  note = (f" {', '.join(late)}: evaluations of the {NOT_EQUAL_COST}." if late else "")
  if not ablation.ladder:
    return (f" Compared at equal cost: every metric as logged up to {ablation.x_axis} = "
            f"{next(iter(budget.values())):.4g}, the most all runs reached." + note)
  by_rung = {}
  for variant, value in budget.items():
    by_rung.setdefault(value_name(grid_cells(ablation)[variant][ablation.ladder]), value)
  return (f" Compared at equal cost within each {ablation.ladder}: every metric as logged up to the {ablation.x_axis} "
          "all runs of that size reached (" + ", ".join(f"{rung}: {value:.4g}" for rung, value in by_rung.items())
          + ")." + note)


def _write_csv(path: str, header, rows) -> None:
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(header)
  writer.writerows([[_cell(value) for value in row] for row in rows])
  write_atomic(path, buffer.getvalue())
