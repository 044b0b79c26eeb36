"""MetricWriter: one JSON object per line in WORKDIR/metrics.jsonl, mirrored as TensorBoard scalars; `read_metrics`
reads such a file, skipping a line a kill or a full disk tore."""

import json
import os
import time

import jax

from train.cli import RunError
from train.workdir import write_atomic


def read_metrics(path: str) -> list[dict]:
  """The records of a metrics.jsonl; a line that is not a JSON object (torn by a kill) is skipped and named."""
  records = []
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError:
        record = None
      if not isinstance(record, dict) or "step" not in record:
        print(f"ablax: {path}:{number}: skipping a torn line ({len(line)} bytes)")
        continue
      records.append(record)
  return records


class MetricWriter:
  """Appends metrics; on resume drops lines past the restored step (and torn ones) and continues the clock."""

  def __init__(self, workdir: str, resume_step: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = jax.process_index() == 0
    previous_time = 0.0
    if self.enabled and os.path.exists(self.path):
      kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
      write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
      previous_time = kept[-1].get("time", 0.0) if kept else 0.0
    self.start = time.time() - previous_time
    self.tensorboard = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # imported lazily: only the logging process needs it
      self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, metrics: dict) -> None:
    if not self.enabled:
      return
    record = dict(metrics, time=round(time.time() - self.start, 3))
    try:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
    except OSError as e:
      raise RunError(f"{self.path}: cannot append step {record['step']} ({e.strerror or e}); the checkpoints "
                     "are intact: free the space and run the same command to resume") from None
    for key, value in record.items():
      if key not in ("step", "time"):
        self.tensorboard.add_scalar(key, value, record["step"])

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self.tensorboard is not None:
      self.tensorboard.close()
