"""MetricWriter: one JSON object per line in WORKDIR/metrics.jsonl, mirrored as TensorBoard scalars."""

import json
import os
import time

import jax


class MetricWriter:
  """Appends metrics; on resume drops lines past the restored step and continues the clock."""

  def __init__(self, workdir: str, resume_step: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = jax.process_index() == 0
    previous_time = 0.0
    if self.enabled and os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(kept)
      previous_time = json.loads(kept[-1]).get("time", 0.0) if kept else 0.0
    self.start = time.time() - previous_time
    self.tensorboard = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # imported lazily: only the logging process needs it
      self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, metrics: dict) -> None:
    if not self.enabled:
      return
    record = dict(metrics, time=round(time.time() - self.start, 3))
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key not in ("step", "time"):
        self.tensorboard.add_scalar(key, value, record["step"])

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self.tensorboard is not None:
      self.tensorboard.close()
