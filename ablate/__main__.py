"""Ablation command line: run an ablation config (configs/ablations/*.py), or rebuild its report from disk.

  python -m ablate --config=configs/ablations/heads.py --workdir=runs/ablate_heads [--parallel=2]
  python -m ablate --config=configs/ablations/heads.py --workdir=runs/ablate_heads --dry_run
  python -m ablate report runs/ablate_heads [--x_axis=train/flops --out=runs/ablate_heads/equal_flops]
  python -m ablate expert_load runs/ablate_moe/runs/flops_8e_top2_seed0 --out=expert_load.png   # a mixture's load
  python -m ablate --config=... --workdir=... --until_significant [--max_runs=30 --max_hours=4]
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from ablate.figures import expert_load_plot
from ablate.plan import load_ablation
from ablate.report import write_report
from ablate.runner import run_ablation, run_until_significant
from train.cli import fail, parse_flags, run_reporting_errors


def main(argv):
  f = flags.FLAGS
  if len(argv) == 3 and argv[1] == "report":
    if not os.path.exists(os.path.join(argv[2], "ablation.json")):
      fail(f"{argv[2]}: no ablation.json; not an ablation workdir")
    print(run_reporting_errors(write_report, argv[2], f.out, f.x_axis))
    return
  if len(argv) == 3 and argv[1] == "expert_load":
    out = f.out or os.path.join(argv[2], "expert_load.png")
    run_reporting_errors(expert_load_plot, argv[2], out)
    print(out)
    return
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; usage: --config=FILE --workdir=DIR, or: report DIR, or: expert_load RUN")
  if f.config is None or f.workdir is None:
    fail("--config and --workdir are required (or: python -m ablate report DIR)")
  ablation = run_reporting_errors(load_ablation, f.config)
  if f.until_significant and not f.dry_run:
    still = run_reporting_errors(run_until_significant, ablation, os.path.abspath(f.workdir), f.max_runs,
                                 f.max_hours, f.parallel)
    print(open(os.path.join(f.workdir, "results.md")).read())
    sys.exit(1 if still else 0)
  failed = run_reporting_errors(run_ablation, ablation, os.path.abspath(f.workdir), f.dry_run, f.parallel)
  if not f.dry_run:
    print(open(os.path.join(f.workdir, "results.md")).read())
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Ablation config file (configs/ablations/*.py).")
  flags.DEFINE_string("workdir", None, "Ablation directory: runs/, logs/, results.csv, results.md, figures.")
  flags.DEFINE_bool("dry_run", False, "List the runs and their commands; run nothing.")
  flags.DEFINE_integer("parallel", None, "Runs at a time (default: config.parallel).")
  flags.DEFINE_string("x_axis", None, "report: compare the runs at step, train/tokens, train/flops or time "
                      "(default: the ablation's).")
  flags.DEFINE_string("out", None, "report: the directory of the report (default: the ablation's workdir); "
                      "expert_load: the figure's file (default: RUN/expert_load.png).")
  flags.DEFINE_bool("until_significant", False, "Add seeds to the variants whose primary comparisons are undecided "
                    "(not significant, equivalent or futile) up to config.max_seeds, with thresholds adjusted for the "
                    "looks (ablate/sequential.py), or until the budget is spent.")
  flags.DEFINE_integer("max_runs", 30, "--until_significant: at most this many added runs.")
  flags.DEFINE_float("max_hours", 4.0, "--until_significant: stop adding runs after this many hours.")
  app.run(main, flags_parser=parse_flags)
