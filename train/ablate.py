"""Ablation runner: every variant x seed of one experiment as its own run, then a table and figures.

  python -m train.ablate --config=configs/ablations/heads.py --workdir=runs/ablate_heads [--parallel=2]
  python -m train.ablate --config=configs/ablations/heads.py --workdir=runs/ablate_heads --dry_run
  python -m train.ablate report runs/ablate_heads

An ablation config (configs/ablations/*.py) names the entrypoint (pretrain | finetune) and its config file,
overrides shared by all runs, named variants and/or a grid, seeds and metrics (see ablation_defaults()).
Run `<variant>_seed<seed>` trains in WORKDIR/runs/<name> (its log in WORKDIR/logs/<name>.log). Re-running
the command skips finished runs, resumes interrupted ones (the entrypoints resume from their last
checkpoint) and retries failed ones; a failing run is reported and the others go on.

Metrics are `[final|min|max|mean|median:]key` over the run's metrics.jsonl (final by default), or
`key@L`, the value `key` (loss, perplexity, bits_per_byte) of `python -m train.evaluate` at length L.
"""

import concurrent.futures
import csv
import io
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time

import ml_collections
from absl import app, flags

from model.config import ConfigError
from train.cli import fail, parse_flags, run_reporting_errors

AGGREGATES = {"final": lambda v: v[-1], "min": min, "max": max, "mean": statistics.fmean,
              "median": statistics.median}
LOWER_IS_BETTER = ("loss", "perplexity", "bits_per_byte", "_ms", "wall")


def ablation_defaults() -> ml_collections.ConfigDict:
  """Every key of an ablation config with its default."""
  c = ml_collections.ConfigDict()
  c.entrypoint = "pretrain"          # pretrain | finetune (python -m train.<entrypoint>)
  c.config = ""                      # the experiment's config file, e.g. configs/shakespeare_char.py
  c.overrides = ()                   # "key=value" for every run, as --config.key=value
  c.variants = {}                    # name -> tuple of "key=value" overrides; or ((name, overrides), ...) in order
  c.grid = {}                        # axis name -> (key, (values...)): a variant per combination
  c.seeds = (0, 1, 2)
  c.seed_key = "train.seed"
  c.metrics = ("eval/loss",)         # see the module docstring; the first one is the bar chart's
  c.curve = "eval/loss"              # metrics.jsonl key plotted against the step
  c.eval_lengths = ()                # lengths for `key@L` metrics (python -m train.evaluate --seq_len)
  c.eval_data = "run:validation"     # what train.evaluate scores (default: each run's held-out split)
  c.eval_stride = 0                  # 0: disjoint windows; else tokens between window starts
  c.eval_max_bytes = 0               # evaluate at most this many bytes of eval_data (0: all)
  c.parallel = 1                     # runs at a time, each a subprocess
  return c


def load_ablation(config) -> ml_collections.ConfigDict:
  """The ablation config filled with defaults; a key that is not an ablation key is a ConfigError."""
  values = ablation_defaults().to_dict()
  given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  for key in given:
    if key not in values:
      raise ConfigError(f"config.{key}: not an ablation key (known: {', '.join(values)})")
  merged = ml_collections.ConfigDict(dict(values, **given))
  if merged.entrypoint not in ("pretrain", "finetune"):
    raise ConfigError(f"config.entrypoint: expected pretrain or finetune, got {merged.entrypoint!r}")
  if not merged.config:
    raise ConfigError("config.config: name the experiment's config file, e.g. configs/shakespeare_char.py")
  if not merged.variants and not merged.grid:
    raise ConfigError("config.variants / config.grid: the ablation has no variants")
  for spec in merged.metrics:
    aggregate, _, length = _parse_metric(spec)
    if aggregate not in AGGREGATES:
      raise ConfigError(f"config.metrics: {spec!r}: expected one of {', '.join(AGGREGATES)} before ':'")
    if length is not None and length not in tuple(merged.eval_lengths):
      raise ConfigError(f"config.metrics: {spec!r} needs {length} in config.eval_lengths "
                        f"{tuple(merged.eval_lengths)}")
  return merged


def _parse_metric(spec: str) -> tuple[str, str, int | None]:
  """(aggregate, key, evaluation length or None) of a metric spec such as "min:eval/loss" or "loss@256"."""
  if "@" in spec and spec.rsplit("@", 1)[1].isdigit():
    key, length = spec.rsplit("@", 1)
    return "final", key, int(length)
  aggregate, _, key = spec.rpartition(":")
  return aggregate or "final", key, None


def _format(value) -> str:
  """A value as --config.key=value reads it."""
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return str(value)


def expand(ablation) -> list[dict]:
  """Runs in order: variants (named, then the grid product) x seeds; each {name, variant, seed, overrides}."""
  variants = [(name, tuple(overrides)) for name, overrides in dict(ablation.variants).items()]  # pairs keep order
  axes = [(axis, key, tuple(values)) for axis, (key, values) in dict(ablation.grid).items()]
  for combination in itertools.product(*[[(axis, key, v) for v in values] for axis, key, values in axes]):
    if combination:
      name = ",".join(f"{axis}={_format(v)}" for axis, _, v in combination)
      variants.append((name, tuple(f"{key}={_format(v)}" for _, key, v in combination)))
  names = [name for name, _ in variants]
  if len(set(names)) != len(names):
    raise ConfigError(f"config.variants / config.grid: duplicate variant names {names}")
  return [{"name": f"{name}_seed{seed}", "variant": name, "seed": seed,
           "overrides": (*ablation.overrides, *overrides, f"{ablation.seed_key}={seed}")}
          for name, overrides in variants for seed in ablation.seeds]


def commands(run: dict, ablation, workdir: str) -> list[list[str]]:
  """The training command of a run, then its evaluation command if the ablation evaluates lengths."""
  run_dir = os.path.join(workdir, "runs", run["name"])
  train = [sys.executable, "-m", f"train.{ablation.entrypoint}", f"--config={ablation.config}",
           f"--workdir={run_dir}", *[f"--config.{override}" for override in run["overrides"]]]
  if not ablation.eval_lengths:
    return [train]
  evaluate = [sys.executable, "-m", "train.evaluate", f"--workdir={run_dir}", f"--data={ablation.eval_data}",
              f"--stride={ablation.eval_stride}", f"--max_bytes={ablation.eval_max_bytes}",
              *[f"--seq_len={length}" for length in ablation.eval_lengths]]
  return [train, evaluate]


def _status_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, "status", f"{name}.json")


def read_status(workdir: str, name: str) -> dict | None:
  """{"status": done | failed, "wall_s", ...} of a run that ended, None if it never ended."""
  path = _status_path(workdir, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def execute(run: dict, ablation, workdir: str) -> dict:
  """Runs a run's commands one after the other (output to its log); records and returns its status."""
  log_path = os.path.join(workdir, "logs", f"{run['name']}.log")
  start, status = time.time(), {"status": "done"}
  with open(log_path, "a") as log:
    for command in commands(run, ablation, workdir):
      log.write(f"$ {' '.join(command)}\n")
      log.flush()
      returncode = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
      if returncode:
        status = {"status": "failed", "returncode": returncode, "command": " ".join(command)}
        break
  with open(log_path) as log:
    lines = [line.strip() for line in log if line.strip()]
  status.update(wall_s=round(time.time() - start, 1), last_line=lines[-1] if lines else "")
  with open(_status_path(workdir, run["name"]), "w") as f:
    json.dump(status, f, indent=2)
  return status


def _duration(seconds: float) -> str:
  return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def run_ablation(ablation, workdir: str, dry_run: bool = False, parallel: int | None = None) -> int:
  """Runs what is not finished, writes the report; returns the number of failed runs."""
  runs = expand(ablation)
  if dry_run:
    for run in runs:
      print(f"{run['name']}: {' '.join(run['overrides'])}")
      for command in commands(run, ablation, workdir):
        print("  " + " ".join(command[1:]))
    print(f"{len(runs)} runs")
    return 0
  for sub in ("runs", "logs", "status"):
    os.makedirs(os.path.join(workdir, sub), exist_ok=True)
  with open(os.path.join(workdir, "ablation.json"), "w") as f:
    json.dump(ablation.to_dict(), f, indent=2)
  todo = [run for run in runs if (read_status(workdir, run["name"]) or {}).get("status") != "done"]
  print(f"{len(runs) - len(todo)} of {len(runs)} runs finished already; running {len(todo)}")
  start, walls, failed = time.time(), [], []
  with concurrent.futures.ThreadPoolExecutor(max_workers=parallel or ablation.parallel) as pool:
    futures = {pool.submit(execute, run, ablation, workdir): run for run in todo}
    for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
      run, status = futures[future], future.result()
      walls.append(status["wall_s"])
      if status["status"] != "done":
        failed.append(run["name"])
        print(f"FAILED {run['name']} ({status['command']}): {status['last_line']} "
              f"[log: {os.path.join(workdir, 'logs', run['name'] + '.log')}]")
      left = len(todo) - done
      eta = statistics.fmean(walls) * math.ceil(left / (parallel or ablation.parallel))
      print(f"[{len(runs) - left}/{len(runs)}] {run['name']} {status['status']} in {_duration(status['wall_s'])}; "
            f"elapsed {_duration(time.time() - start)}, ETA {_duration(eta)}", flush=True)
  write_report(workdir)
  if failed:
    print(f"{len(failed)} run(s) failed: {', '.join(failed)}")
  return len(failed)


def run_metrics(run_dir: str, specs, curve_key: str) -> tuple[dict, list]:
  """({spec: value or None}, [(step, curve value)]) of a finished run, read from its files."""
  records = []
  if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
      records = [json.loads(line) for line in f if line.strip()]
  values = {}
  for spec in specs:
    aggregate, key, length = _parse_metric(spec)
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
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

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


def main(argv):
  f = flags.FLAGS
  if len(argv) == 3 and argv[1] == "report":
    if not os.path.exists(os.path.join(argv[2], "ablation.json")):
      fail(f"{argv[2]}: no ablation.json; not an ablation workdir")
    print(run_reporting_errors(write_report, argv[2]))
    return
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; usage: --config=FILE --workdir=DIR, or: report DIR")
  if f.config is None or f.workdir is None:
    fail("--config and --workdir are required (or: python -m train.ablate report DIR)")
  ablation = run_reporting_errors(load_ablation, f.config)
  failed = run_reporting_errors(run_ablation, ablation, os.path.abspath(f.workdir), f.dry_run, f.parallel)
  if not f.dry_run:
    print(open(os.path.join(f.workdir, "results.md")).read())
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "Ablation config file (configs/ablations/*.py).")
  flags.DEFINE_string("workdir", None, "Ablation directory: runs/, logs/, results.csv, results.md, figures.")
  flags.DEFINE_bool("dry_run", False, "List the runs and their commands; run nothing.")
  flags.DEFINE_integer("parallel", None, "Runs at a time (default: config.parallel).")
  app.run(main, flags_parser=parse_flags)
