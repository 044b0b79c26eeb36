"""Runs an ablation: every variant x seed as its own entrypoint subprocess, then the report.

Offers `commands` (a run's training, then evaluation, command), `execute` (one run) and `run_ablation`.
Run `<variant>_seed<seed>` trains in WORKDIR/runs/<name> (its log in WORKDIR/logs/<name>.log). Re-running
skips finished runs, resumes interrupted ones (the entrypoints resume from their last checkpoint) and
retries failed ones; a failing run is reported and the others go on.
"""

import concurrent.futures
import json
import math
import os
import statistics
import subprocess
import sys
import time

from ablate import sequential
from ablate.cost import describe
from ablate.plan import (DATA, expand, extra_seeds, min_effect, parse_metric, primary_metrics, read_status,
                         references, status_path)
from ablate.report import SEQUENTIAL, collect, significance, undecided, write_report
from train.workdir import check_directory, write_atomic


def commands(run: dict, ablation, workdir: str) -> list[list[str]]:
  """The training command of a run, then its evaluation commands: at the ablation's lengths, and on eval_data at the
  run's settings when a metric reads `key@data`."""
  run_dir = os.path.join(workdir, "runs", run["name"])
  train = [sys.executable, "-m", f"train.{ablation.entrypoint}", f"--config={ablation.config}",
           f"--workdir={run_dir}", *[f"--config.{override}" for override in run["overrides"]]]
  evaluate = [sys.executable, "-m", "train.evaluate", f"--workdir={run_dir}", f"--data={ablation.eval_data}",
              f"--stride={ablation.eval_stride}", f"--max_bytes={ablation.eval_max_bytes}"]
  found = [train]
  if ablation.eval_lengths:
    found.append([*evaluate, *[f"--seq_len={length}" for length in ablation.eval_lengths]])
  if any(parse_metric(spec)[2] == DATA for spec in ablation.metrics):
    found.append([*evaluate, f"--output={os.path.join(run_dir, 'eval_data.json')}"])
  return found


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
  write_atomic(status_path(workdir, run["name"]), json.dumps(status, indent=2))
  return status


def _duration(seconds: float) -> str:
  return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def run_ablation(ablation, workdir: str, dry_run: bool = False, parallel: int | None = None,
                 report: bool = True) -> int:
  """Runs what is not finished, writes the report; returns the number of failed runs."""
  check_directory(workdir, create=not dry_run)
  runs = expand(ablation, extra_seeds(workdir))
  if dry_run:
    for run in runs:
      print(f"{run['name']}: {' '.join(run['overrides'])}")
      for command in commands(run, ablation, workdir):
        print("  " + " ".join(command[1:]))
    for line in describe(ablation, runs):
      print(line, flush=True)
    return 0
  for sub in ("runs", "logs", "status"):
    os.makedirs(os.path.join(workdir, sub), exist_ok=True)
  write_atomic(os.path.join(workdir, "ablation.json"), json.dumps(ablation.to_dict(), indent=2))
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
  if report:
    write_report(workdir)
  if failed:
    print(f"{len(failed)} run(s) failed: {', '.join(failed)}")
  return len(failed)


def run_until_significant(ablation, workdir: str, max_runs: int, max_hours: float,
                          parallel: int | None = None) -> list[str]:
  """Runs the ablation, then adds a seed at a time to the variants with a primary comparison still undecided (not
  significant, not equivalent, not futile; and to their reference, so the runs stay paired), with the looks
  planned and the thresholds adjusted for them (ablate/sequential.py), until none is undecided, the variants reach
  config.max_seeds, `max_runs` more runs were started or `max_hours` passed; returns the variants still undecided."""
  start, added = time.time(), 0
  first = len(ablation.seeds)
  os.makedirs(workdir, exist_ok=True)
  write_atomic(os.path.join(workdir, SEQUENTIAL), json.dumps({"first": first, "last": ablation.max_seeds}))
  looks = sequential.calibrate(first, ablation.max_seeds)
  failed = run_ablation(ablation, workdir, parallel=parallel, report=False)
  reference_of, primary = references(ablation), primary_metrics(ablation)
  margins = {spec: min_effect(ablation, spec) for spec in primary}
  while True:
    _, rows, _, _ = collect(workdir)
    done = [row for row in rows if row["status"] == "done"]
    table = significance(done, primary, reference_of, ablation.confidence, primary, margins, looks, ablation.alpha)
    open_ = undecided(table, primary, reference_of, ablation.alpha)
    hours = (time.time() - start) / 3600
    extra = extra_seeds(workdir)
    seeds_now = first + max((len(extra.get(v, [])) for v in open_), default=0)
    if (not open_ or failed or added + 2 * len(open_) > max_runs or hours >= max_hours
        or seeds_now >= ablation.max_seeds):
      break
    seed = 1 + max([*ablation.seeds, *[s for seeds in extra.values() for s in seeds]])
    grow = sorted(set(open_) | {reference_of[v] for v in open_})  # a reference too, so the runs stay paired
    for variant in grow:
      extra.setdefault(variant, []).append(seed)
    write_atomic(os.path.join(workdir, "extra_seeds.json"), json.dumps(extra, indent=2))
    print(f"undecided on {', '.join(primary)}: {', '.join(open_)}; adding seed {seed} to {', '.join(grow)}")
    added += len(grow)
    failed = run_ablation(ablation, workdir, parallel=parallel, report=False)
  write_report(workdir)
  print(f"{', '.join(primary)}: " + (f"still undecided after {added} added runs: {', '.join(open_)}" if open_ else
                                    "every primary comparison is decided (significant, equivalent or futile)"))
  return open_
