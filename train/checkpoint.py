"""Checkpoints: orbax around the TrainState and the loader position (JSON), kept whole through kills, full disks
and corrupt files; a run's config.json and steps.

Offers `Checkpointer` (save with rotation that spares pinned steps, restore with fallback to the previous
readable step), `read_checkpoint` (another run's step, read only), `pin` (keep a step for a fine-tuning run
built on it), `pinned_steps`, `read_run_config` and `resolve_step`.
"""

import glob
import hashlib
import json
import os
import shutil

import ml_collections
import orbax.checkpoint as ocp
from flax import traverse_util

from configs import base
from data.sources import DataError
from train import distributed
from train.cli import RunError

PINS = "pins"  # WORKDIR/pins/<hash>.json: {"step": s, "by": fine-tuning workdir}, steps rotation must keep

class Checkpointer:
  """Saves {state, data} under WORKDIR/checkpoints/<step>; restores into an abstract state's shardings.

  Orbax writes a step into a temporary directory and renames it when complete, so a killed save leaves the
  previous steps whole; the temporary directories a kill leaves are removed when a writer opens the workdir.
  """

  def __init__(self, workdir: str, keep: int, writer: bool = False, async_save: bool = False):
    self.workdir, self.keep, self.async_save = os.path.abspath(workdir), keep, async_save
    self.in_flight = None  # the step an asynchronous save is still writing
    self.directory = os.path.join(self.workdir, "checkpoints")
    if writer and distributed.is_writer():
      for stale in glob.glob(os.path.join(self.directory, "*.orbax-checkpoint-tmp*")):
        print(f"ablax: removing {stale}, a save that was interrupted")
        shutil.rmtree(stale, ignore_errors=True)
    distributed.barrier("checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
        "state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict) -> None:
    """Writes `step` (once), then deletes the oldest steps beyond `keep` that no fine-tuning run pins. With
    async_save the write goes on in the background (orbax copies the arrays first, so the next step may donate
    them); it is finished, checked and counted for `keep` at the next save or at close."""
    if step in self.manager.all_steps():
      return
    self.wait()
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      data=ocp.args.JsonSave(data_state)))
    except Exception as e:  # orbax wraps the OSError of a full disk in its own errors
      raise self._failed(step, e) from None
    self.in_flight = step
    if not self.async_save:
      self.wait()

  def wait(self) -> None:
    """Finishes the save in flight (a RunError if it failed), then applies `keep`."""
    if self.in_flight is None:
      return
    step, self.in_flight = self.in_flight, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._failed(step, e) from None
    pinned = pinned_steps(self.workdir)
    for old in self.steps()[:-self.keep]:
      if old not in pinned:
        self.manager.delete(old)

  def _failed(self, step: int, error: Exception) -> RunError:
    previous = [s for s in self.steps() if s < step]
    return RunError(f"{self.directory}: saving step {step} failed ({_reason(error)}); the checkpoints up to step "
                    f"{previous[-1] if previous else '-'} and metrics.jsonl are intact: free the space and run "
                    "the same command to resume")

  def restore(self, step: int, abstract_state):
    """Returns (state, data_state) of `step`, laid out as `abstract_state` (ShapeDtypeStructs with shardings)."""
    self._check_params(step, abstract_state.params)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # a missing file, torn JSON, another model's tree: orbax raises many kinds
      raise RunError(f"{self.directory}/{step}: unreadable ({_reason(e)})") from None
    return restored.state, restored.data

  def _check_params(self, step: int, abstract_params) -> None:
    """A RunError naming the first parameter whose saved shape is not the model's (another model config or
    tokenizer), before orbax is asked to restore it."""
    try:
      saved = self.manager.item_metadata(step)["state"]
      saved = traverse_util.flatten_dict(dict(getattr(saved, "tree", saved))["params"], sep="/")
    except Exception:  # unreadable metadata: restore says why
      return
    for path, expected in traverse_util.flatten_dict(abstract_params, sep="/").items():
      found = tuple(saved[path].shape) if path in saved else "nothing"
      if found != tuple(expected.shape):
        raise RunError(f"{self.directory}/{step}: holds {found} for {path}, the model needs {tuple(expected.shape)} "
                       "(a checkpoint of another model config or tokenizer)")

  def resume(self, abstract_state, restore_step: int = -1):
    """(state, data_state, step) of the latest readable checkpoint, or of `restore_step` when >= 0; None if there
    is none. Unreadable steps after the one restored are moved aside to checkpoints/corrupt-<step>; with
    `restore_step`, the later steps are moved aside to checkpoints/replaced-<step> (kept, never deleted)."""
    steps = self.steps()
    if restore_step >= 0:
      if restore_step not in steps:
        raise RunError(f"config.train.restore_step={restore_step}: {self.directory} has steps {steps}")
      state, data_state = self.restore(restore_step, abstract_state)
      for later in (s for s in steps if s > restore_step):
        self._move_aside(later, "replaced")
      return state, data_state, restore_step
    failed = []
    for step in reversed(steps):
      try:
        state, data_state = self.restore(step, abstract_state)
      except RunError as e:
        failed.append((step, e))
        continue
      for bad, error in failed:
        print(f"ablax: {error}; moved to {self._move_aside(bad, 'corrupt')}; resuming from step {step}")
      return state, data_state, step
    if failed:  # nothing readable: keep every file as it is and say why
      raise RunError(f"no checkpoint in {self.directory} is readable; the latest: {failed[0][1]}")
    return None

  def _move_aside(self, step: int, why: str) -> str:
    target = os.path.join(self.directory, f"{why}-{step}")
    suffix = 0
    while os.path.exists(target + (f".{suffix}" if suffix else "")):
      suffix += 1
    target += f".{suffix}" if suffix else ""
    if distributed.is_writer():
      os.rename(os.path.join(self.directory, str(step)), target)
    distributed.barrier(f"moved {step}")
    self.manager.reload()
    return target

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()


def read_checkpoint(workdir: str, step: int, abstract_state):
  """(state, data_state, step) of the run in `workdir` at `step` (-1: its latest), laid out as `abstract_state`;
  nothing in that workdir is written."""
  step = resolve_step(workdir, None if step < 0 else step)
  checkpointer = Checkpointer(workdir, keep=1 << 30)
  try:
    state, data_state = checkpointer.restore(step, abstract_state)
  finally:
    checkpointer.close()
  return state, data_state, step


def _reason(error: BaseException) -> str:
  """The innermost cause of an exception, as one line."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def pin(base_workdir: str, step: int, by: str) -> bool:
  """Asks the run in `base_workdir` to keep `step` for the run in `by`; False if its directory is not writable."""
  path = os.path.join(base_workdir, PINS, hashlib.sha256(os.path.abspath(by).encode()).hexdigest()[:16] + ".json")
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump({"step": step, "by": os.path.abspath(by)}, f)
    os.replace(path + ".tmp", path)
  except OSError:
    return False
  return True


def pinned_steps(workdir: str) -> set[int]:
  """The steps of `workdir` that fine-tuning runs still on disk are built on."""
  steps = set()
  for path in glob.glob(os.path.join(workdir, PINS, "*.json")):
    try:
      with open(path) as f:
        record = json.load(f)
    except (OSError, ValueError):
      continue
    if os.path.isdir(record.get("by", "")):
      steps.add(int(record["step"]))
  return steps


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config.json of a run directory, with the defaults of configs/base.py for keys added since it was written."""
  config_path = os.path.join(workdir, "config.json")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise FileNotFoundError(f"{workdir}: a file, not a directory; the workdir must be a run directory")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path}: no such file; the workdir must be a run directory")
  try:
    with open(config_path) as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError("not a JSON object")
  except ValueError as e:
    raise DataError(f"{config_path}: not a run's config ({e})") from None
  return base.with_defaults(saved)


def resolve_step(workdir: str, step: int | None) -> int:
  """`step` if a checkpoint of it exists in workdir, the latest one for None (or -1)."""
  directory = os.path.join(workdir, "checkpoints")
  steps = sorted(int(name) for name in (os.listdir(directory) if os.path.isdir(directory) else [])
                 if name.isdigit())  # orbax names each finished checkpoint by its step
  chosen = steps[-1] if steps and step in (None, -1) else step
  if chosen not in steps:
    raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint for step {step} (have: {steps})")
  return chosen
