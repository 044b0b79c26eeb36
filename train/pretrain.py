"""Pretraining entrypoint.

  python -m train.pretrain --config=configs/quickstart.py --workdir=runs/quickstart [--config.a.b=v ...]

Running the same command again resumes from the last checkpoint in the workdir.
"""

from absl import app, flags
from ml_collections import config_flags

from train.cli import parse_flags, run_reporting_errors
from train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  run_reporting_errors(train_and_evaluate, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
