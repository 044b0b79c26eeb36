"""The config of an existing run (e.g. one imported with `python -m train.hf import`), to continue it:

  python -m train.pretrain --config=configs/from_run.py:runs/llama --workdir=runs/llama --config.train.steps=200

Only the keys a resume may change (train.steps, eval/checkpoint/log cadence, samples, mesh) should be overridden.
"""

import json
import os

import ml_collections

from configs import base


def get_config(workdir: str) -> ml_collections.ConfigDict:
  with open(os.path.join(workdir, "config.json")) as f:
    return base.with_defaults(json.load(f))
