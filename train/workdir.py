"""A run's workdir: config.json written once (a rerun must match it, never overwrite it), one writer at a time,
and small files replaced whole.

Offers `prepare_workdir` (config.json; pins the schedule's length; a run that never reached a checkpoint starts
over), `check_branch` (a run branched from another's checkpoint differs from it in its schedule only),
`write_atomic` (temp file + rename), `lock` (one process writes a workdir; a second copy of a command is
refused), `check_directory`, `RESUMABLE_KEYS` and `BRANCH_KEYS`.
"""

import contextlib
import json
import os
import shutil
import socket

import jax

from model.config import ConfigError
from train.checkpoint import read_run_config, resolve_step

# Keys that may differ when a run is resumed: they change how long or how often, not what is trained
# (the mesh may change too: a checkpoint restores into any sharding).
RESUMABLE_KEYS = ("train.steps", "train.eval_every", "train.eval_batches", "train.checkpoint_every",
                  "train.keep_checkpoints", "train.async_checkpoints", "train.log_every", "train.num_samples",
                  "train.sample_tokens", "train.sample_temperature", "train.sample_top_k", "train.sample_prompt", "train.restore_step",
                  "train.nonfinite", "train.decay_steps")
# Keys a run branched from another run's checkpoint (train.branch_from) may set otherwise: the schedule from there
# on (a cooldown), and the branch itself.
BRANCH_KEYS = ("train.schedule", "train.decay_fraction", "train.decay_shape", "train.min_learning_rate",
               "train.branch_from", "train.branch_step")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")
LOCK_FILE = ".lock"
# What a start writes before its first checkpoint: removed when a run that never reached one starts over with other
# settings (a tokenizer trained on other data, the metrics of other steps).
STARTED_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "metrics.jsonl", "run_info.json",
                 "samples.txt")
STARTED_DIRS = ("tensorboard",)


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def write_atomic(path: str, text: str) -> None:
  """Replaces `path` with `text` whole: a kill or a full disk leaves the old file or the new one, never half."""
  temporary = f"{path}.tmp{os.getpid()}"
  try:
    with open(temporary, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def check_directory(path: str, flag: str = "--workdir", create: bool = True) -> None:
  """A ConfigError naming `flag` when `path` exists and is not a directory, or cannot be created (`create`)."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"{flag}={path}: a file, not a directory; name a new directory or a run's")
  if not create:
    return
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"{flag}={path}: cannot create this directory ({e.strerror or e})") from None


def _has_checkpoint(workdir: str) -> bool:
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def _start_over(workdir: str) -> None:
  """Removes what a start that never reached a checkpoint wrote (STARTED_FILES, STARTED_DIRS)."""
  for name in STARTED_FILES:
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(workdir, name))
  for name in STARTED_DIRS:
    shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)


def prepare_workdir(config, workdir: str) -> None:
  """Creates workdir and saves config.json, or checks that an existing run was made with this config.

  A run that never reached its first checkpoint (a start stopped by a data error, say) starts afresh: what that
  start wrote goes (STARTED_FILES, STARTED_DIRS), and it may start with other settings, said in one line.
  The cosine schedule's length is fixed when a run starts: train.decay_steps = 0 ("the run's steps") is
  replaced by the steps of the first start, so extending a run with a larger train.steps keeps the learning
  rate of every step already taken; give train.decay_steps explicitly to decay over a new length from here on.
  """
  check_directory(workdir)
  path = os.path.join(workdir, "config.json")
  saved = None
  if os.path.exists(path):
    with open(path) as f:
      saved = _flatten(json.load(f))
    if not _has_checkpoint(workdir) and jax.process_index() == 0:  # nothing to resume: start afresh
      differing = _differing(saved, config)
      if differing:
        print(f"ablax: {workdir}: its run never reached a checkpoint; starting over with config.{differing[0]}="
              f"{_flatten(json.loads(config.to_json()))[differing[0]]!r} (was {saved[differing[0]]!r})")
      _start_over(workdir)  # a tokenizer trained on other data, metrics of steps never saved
      saved = None
  if config.train.decay_steps == 0:
    config.train.decay_steps = (saved or {}).get("train.decay_steps") or (saved or {}).get("train.steps") or \
        config.train.steps
  current = json.loads(config.to_json())
  if saved is not None:
    differing = _differing(saved, config)
    if differing:
      key = differing[0]
      raise ConfigError(f"{path}: this workdir holds a run made with config.{key}={saved[key]!r}, "
                        f"not {_flatten(current)[key]!r}; resume with the same config or use another --workdir")
  if jax.process_index() == 0:
    write_atomic(path, json.dumps(current, indent=2))
    for name in TOKENIZER_FILES if config.train.get("branch_from") else ():  # the branch reads the ids its source did
      source = os.path.join(config.train.branch_from, name)
      if os.path.exists(source) and not os.path.exists(os.path.join(workdir, name)):
        shutil.copy(source, workdir)


def check_branch(config, workdir: str) -> None:
  """A ConfigError unless config.train.branch_from ("": no branch) names another run with a checkpoint at
  train.branch_step, made with this config but for the keys a resume or a branch may change (RESUMABLE_KEYS,
  BRANCH_KEYS, the mesh)."""
  source = config.train.get("branch_from", "")
  if not source:
    return
  if os.path.abspath(source) == os.path.abspath(workdir):
    raise ConfigError(f"config.train.branch_from={source}: this run's own workdir; branch into a new --workdir (or "
                      "resume an earlier step here with config.train.restore_step)")
  try:
    saved = _flatten(read_run_config(source).to_dict())
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"config.train.branch_from={source}: {e}") from None
  step = config.train.branch_step
  try:
    resolve_step(source, None if step < 0 else step)
  except FileNotFoundError as e:
    raise ConfigError(f"config.train.branch_step={step}: {e}") from None
  differing = [key for key in _differing(saved, config) if key not in BRANCH_KEYS]
  if differing:
    key = differing[0]
    raise ConfigError(f"config.train.branch_from={source}: that run was made with config.{key}={saved[key]!r}, not "
                      f"{_flatten(json.loads(config.to_json()))[key]!r}; a branch changes only "
                      f"{', '.join(BRANCH_KEYS[:4])} and run-length keys")


def _differing(saved: dict, config) -> list[str]:
  """The keys of `config` that differ from the flat `saved` config and may not change on resume."""
  return [k for k, v in _flatten(json.loads(config.to_json())).items()
          if k not in RESUMABLE_KEYS and not k.startswith("mesh.") and saved.get(k, v) != v]


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


@contextlib.contextmanager
def lock(workdir: str):
  """Holds WORKDIR/.lock ("host:pid") while the block runs (a workdir it created and that stays empty goes after);
  a live holder is refused with one line, a dead one on this host (a killed run) is replaced. A holder on another
  host cannot be checked: remove the file by hand. In a job of several processes, process 0 holds it for all."""
  if jax.process_index() != 0:
    yield
    return
  created = not os.path.exists(workdir)
  check_directory(workdir)
  path, me = os.path.join(workdir, LOCK_FILE), f"{socket.gethostname()}:{os.getpid()}"
  for _ in range(2):
    try:
      descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      break
    except FileExistsError:
      with open(path) as f:
        holder = f.read().strip()
      host, _, pid = holder.rpartition(":")
      if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
        print(f"ablax: {path}: removing the stale lock of process {pid}, which is gone")
        os.remove(path)
        continue
      raise ConfigError(f"{workdir}: in use by {holder or 'a process'} ({path}); run one command per workdir "
                        "(remove the lock file if that process is gone)")
  else:
    raise ConfigError(f"{workdir}: could not take {path}")
  with os.fdopen(descriptor, "w") as f:
    f.write(me)
  try:
    yield
  finally:
    with contextlib.suppress(OSError):
      with open(path) as f:
        mine = f.read().strip() == me
      if mine:
        os.remove(path)
    if created:  # a command refused before it wrote anything leaves no empty directory behind
      with contextlib.suppress(OSError):
        os.rmdir(workdir)
