"""Faults injected into real runs: kills (inside a checkpoint save too), SIGTERM, a second copy of a command, a
corrupt or partial checkpoint, a full disk, NaNs, a torn metrics line, a moved base run. Nothing a run wrote is
lost or poisoned, and the resumed run equals the uninterrupted one bit for bit."""

import errno
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from model.config import ConfigError
from test_train import REPO, TEXT, logged, tiny_config
from train import pretrain as pretrain_lib
from train import runs
from train.checkpoint import Checkpointer
from train.cli import RunError, run_reporting_errors
from train.pretrain import train_and_evaluate
from train.schedules import learning_rate_schedule
from train.step import token_loss

CONFIG = """
from configs import base

def get_config():
  config = base.get_config()
  config.data.update(train_path={corpus!r}, tokenizer="char")
  config.model.update(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, max_len=32, dropout=0.1)
  config.train.update(steps=24, batch_size=8, seq_len=16, warmup_steps=2, decay_steps=24, eval_every=4,
                      eval_batches=2, checkpoint_every=2, keep_checkpoints=2, log_every=1, num_samples=0)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  return config
"""


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
  """A config file, and a function that returns the workdir of its uninterrupted run (a subprocess, as every run
  below) once that run is done: it runs beside the first test, which starts one run after another."""
  root = tmp_path_factory.mktemp("faults")
  (root / "corpus.txt").write_text(TEXT)
  (root / "experiment.py").write_text(CONFIG.format(corpus=str(root / "corpus.txt")))
  reference = str(root / "reference")
  with open(root / "reference.log", "w") as log:
    process = start(root, reference, log=log)

  def finished():
    assert process.wait(timeout=300) == 0, open(root / "reference.log").read()[-3000:]
    return reference
  yield root, finished
  process.kill()
  process.wait()


def start(root, workdir, *overrides, log=None):
  """The run of the experiment in `workdir`; its output piped, or written to the open file `log`."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable, "-m", "train.pretrain", f"--config={root / 'experiment.py'}",
                           f"--workdir={workdir}", *overrides], cwd=REPO, env=env,
                          stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT if log else subprocess.PIPE,
                          text=True)


def final_params(workdir):
  return jax.tree.leaves(jax.device_get(runs.load_run(workdir).params))


def assert_same_run(workdir, reference):
  assert logged(workdir) == logged(reference)  # every step's loss, bit for bit
  for a, b in zip(final_params(workdir), final_params(reference), strict=True):
    np.testing.assert_array_equal(a, b)


def _lines(path) -> int:
  return len(open(path).readlines()) if os.path.exists(path) else 0


def test_killed_anywhere_then_resumed_equals_uninterrupted(experiment):
  """Six SIGKILLs, alternately inside a checkpoint save (a temporary checkpoint directory exists) and a random
  moment after the run logged a new step, then one torn metrics line: the seventh start finishes the run."""
  root, reference = experiment
  workdir, rng = str(root / "killed"), random.Random(0)
  checkpoints, metrics = os.path.join(workdir, "checkpoints"), os.path.join(workdir, "metrics.jsonl")
  kills, output = {"inside a save": 0, "at a random moment": 0}, ""
  for attempt in range(6):
    logged_before, process = _lines(metrics), start(root, workdir)
    while process.poll() is None:
      if attempt % 2 == 0 and glob.glob(os.path.join(checkpoints, "*.orbax-checkpoint-tmp*")):
        break
      if attempt % 2 == 1 and _lines(metrics) > logged_before:
        time.sleep(rng.uniform(0.0, 0.2))
        break
      time.sleep(0.002)
    saving = bool(glob.glob(os.path.join(checkpoints, "*.orbax-checkpoint-tmp*")))
    process.send_signal(signal.SIGKILL)
    output += process.communicate()[0]
    assert process.returncode == -signal.SIGKILL, f"attempt {attempt} ended before it was killed"
    kills["inside a save" if saving else "at a random moment"] += 1
  with open(metrics, "a") as f:
    f.write('{"step": 99, "train/lo')  # an append torn by a kill
  process = start(root, workdir)
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr
  assert kills["inside a save"] >= 2 and kills["at a random moment"] >= 1, kills
  assert "removing" in output + stdout and "skipping a torn line" in stdout
  assert_same_run(workdir, reference())
  assert not glob.glob(os.path.join(checkpoints, "*.orbax-checkpoint-tmp*"))
  assert sorted(os.listdir(checkpoints)) == ["22", "24"]


def test_sigterm_checkpoints_and_exits_0_then_resumes(experiment):
  root, reference = experiment
  workdir = str(root / "preempted")
  process, metrics = start(root, workdir), os.path.join(workdir, "metrics.jsonl")
  while process.poll() is None and _lines(metrics) < 3:
    time.sleep(0.01)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr
  step = int(stderr.split("SIGTERM at step ")[1].split(":")[0])
  assert 3 <= step < 24 and os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))
  assert start(root, workdir).wait(timeout=300) == 0
  assert_same_run(workdir, reference())


@pytest.fixture
def ctrl_c():
  """Runs started here take Ctrl-C as a terminal's foreground command does, also where pytest runs as a shell's
  background job, which ignores SIGINT (and so would the runs it starts)."""
  previous = signal.getsignal(signal.SIGINT)
  if previous is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, previous)


def test_ctrl_c_checkpoints_and_exits_130_then_resumes(experiment, ctrl_c):
  root, reference = experiment
  workdir = str(root / "interrupted")
  process, metrics = start(root, workdir), os.path.join(workdir, "metrics.jsonl")
  while process.poll() is None and _lines(metrics) < 3:
    time.sleep(0.01)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 130 and "Traceback" not in stderr, stderr
  step = int(stderr.split("SIGINT (Ctrl-C) at step ")[1].split(":")[0])
  assert 3 <= step < 24 and os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))
  resumed = start(root, workdir)
  stdout, stderr = resumed.communicate(timeout=300)
  assert resumed.returncode == 0 and f"step {step}/24" in stdout, stderr  # from the step saved, not an older one
  assert_same_run(workdir, reference())


def test_a_second_ctrl_c_stops_at_once(tmp_path, experiment, ctrl_c):
  root, _ = experiment
  workdir, log = str(root / "interrupted_twice"), tmp_path / "output.log"
  with open(log, "w") as output:
    process = start(root, workdir, "--config.train.steps=100000", log=output)
  metrics = os.path.join(workdir, "metrics.jsonl")
  while process.poll() is None and _lines(metrics) < 3:
    time.sleep(0.01)
  process.send_signal(signal.SIGINT)
  while process.poll() is None and "saving a checkpoint at the end of this step" not in log.read_text():
    time.sleep(0.002)
  process.send_signal(signal.SIGINT)  # while the first one's save is under way
  assert process.wait(timeout=60) == 130
  output = log.read_text()
  assert "second Ctrl-C: stopped at once" in output and "Traceback" not in output, output[-3000:]


def test_a_second_copy_is_refused_and_a_dead_ones_lock_is_replaced(experiment):
  root, _ = experiment
  workdir = str(root / "locked")
  first = start(root, workdir, "--config.train.steps=100000")
  while first.poll() is None and not os.path.exists(os.path.join(workdir, "checkpoints", "2")):
    time.sleep(0.01)
  second = start(root, workdir)
  _, stderr = second.communicate(timeout=120)
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert second.returncode == 1 and len(lines) == 1 and "in use by" in lines[0], stderr
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["train"]["steps"] == 100000  # the refused copy wrote nothing
  first.send_signal(signal.SIGKILL)
  first.wait()
  third = start(root, workdir)  # steps 24: resumes (or, if the first got further, has nothing left to do)
  stdout, stderr = third.communicate(timeout=300)
  assert third.returncode == 0 and "removing the stale lock" in stdout, stderr
  assert not os.path.exists(os.path.join(workdir, ".lock"))


def test_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path, uninterrupted, capsys):
  workdir = str(tmp_path / "run")
  train_and_evaluate(tiny_config(tmp_path, steps=6, checkpoint_every=3), workdir)
  for path in glob.glob(os.path.join(workdir, "checkpoints", "6", "state", "**", "*"), recursive=True):
    if os.path.isfile(path):
      with open(path, "r+b") as f:
        f.write(b"\x00garbage")
  capsys.readouterr()
  train_and_evaluate(tiny_config(tmp_path, steps=8, checkpoint_every=3), workdir)
  out = capsys.readouterr().out
  assert "checkpoints/6: unreadable" in out and "resuming from step 3" in out
  assert logged(workdir) == logged(uninterrupted)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6", "8", "corrupt-6"]


def test_restore_step_resumes_an_earlier_checkpoint_and_keeps_the_later_ones(tmp_path):
  workdir = str(tmp_path / "run")
  train_and_evaluate(tiny_config(tmp_path, steps=6, checkpoint_every=2, keep_checkpoints=5), workdir)
  before = logged(workdir)
  train_and_evaluate(tiny_config(tmp_path, steps=6, checkpoint_every=2, keep_checkpoints=5, restore_step=2), workdir)
  assert logged(workdir) == before  # steps 3..6 recomputed identically
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6", "replaced-4", "replaced-6"]
  with pytest.raises(RunError, match="restore_step=5"):
    train_and_evaluate(tiny_config(tmp_path, steps=6, restore_step=5), workdir)


def _poisoned_loss(monkeypatch):
  """Training losses (not eval ones) of about a third of the batches become NaN, their gradients too."""
  def poisoned_token_loss(model, model_params=None, **kwargs):
    loss = token_loss(model, model_params, **kwargs)

    def loss_fn(params, frozen, batch, rng, deterministic):
      sums = loss(params, frozen, batch, rng, deterministic)
      poisoned = not deterministic and jnp.sum(batch["inputs_BxL"]) % 3 == 0
      return dict(sums, loss_sum=sums["loss_sum"] * jnp.where(poisoned, jnp.nan, 1.0))
    return loss_fn
  monkeypatch.setattr(pretrain_lib, "token_loss", poisoned_token_loss)


def _finite_checkpoints(workdir) -> list[int]:
  steps = Checkpointer(workdir, keep=100).steps()
  for step in steps:
    params = jax.tree.leaves(jax.device_get(runs.load_run(workdir, step).state.params))
    assert all(np.isfinite(x).all() for x in params), step
  return steps


def test_a_nan_stops_the_run_before_anything_of_it_is_saved(tmp_path, monkeypatch):
  _poisoned_loss(monkeypatch)
  workdir = str(tmp_path / "run")
  with pytest.raises(FloatingPointError, match=r"train/loss is nan at step (\d+); stopped before saving") as info:
    train_and_evaluate(tiny_config(tmp_path, steps=12, checkpoint_every=1, keep_checkpoints=20), workdir)
  bad = int(re.search(r"at step (\d+)", str(info.value)).group(1))
  assert _finite_checkpoints(workdir) == list(range(1, bad)) and max(logged(workdir)) < bad


def test_a_nan_update_is_skipped_and_counted(tmp_path, monkeypatch):
  _poisoned_loss(monkeypatch)
  workdir = str(tmp_path / "run")
  last = train_and_evaluate(tiny_config(tmp_path, steps=12, checkpoint_every=1, keep_checkpoints=20,
                                        nonfinite="skip"), workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    skipped = [json.loads(line)["train/skipped_updates"] for line in f]
  assert last["step"] == 12 and 1 <= sum(skipped) < 12 and np.isfinite(last["eval/loss"])
  assert _finite_checkpoints(workdir) == list(range(1, 13))


def test_a_nonfinite_parameter_is_never_saved(tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(tmp_path, steps=3, checkpoint_every=1, learning_rate=1e39, min_learning_rate=0.0,
                       warmup_steps=0, grad_clip=0.0)  # the first update overflows float32
  with pytest.raises(FloatingPointError, match="a parameter is nan at step 1"):
    train_and_evaluate(config, workdir)
  assert _finite_checkpoints(workdir) == []


def test_a_full_disk_keeps_the_last_checkpoint_and_the_metrics(tmp_path, uninterrupted, monkeypatch):
  workdir = str(tmp_path / "run")
  save = ocp.CheckpointManager.save

  def full_disk(self, step, *args, **kwargs):
    if step == 4:
      os.makedirs(os.path.join(self.directory, "4.orbax-checkpoint-tmp-1"), exist_ok=True)
      raise OSError(errno.ENOSPC, "No space left on device")
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
  with pytest.raises(RunError, match=r"saving step 4 failed \(OSError: .*No space left.*up to step 2"):
    train_and_evaluate(tiny_config(tmp_path, steps=6, checkpoint_every=2), workdir)
  monkeypatch.undo()
  assert sorted(logged(workdir)) == [1, 2, 3, 4]  # every line whole
  train_and_evaluate(tiny_config(tmp_path, steps=6, checkpoint_every=2), workdir)
  assert logged(workdir) == {step: loss for step, loss in logged(uninterrupted).items() if step <= 6}


def test_extending_a_run_keeps_the_schedule_of_its_past(tmp_path):
  workdir = str(tmp_path / "run")
  train_and_evaluate(tiny_config(tmp_path, steps=4, checkpoint_every=4, decay_steps=0), workdir)
  train_and_evaluate(tiny_config(tmp_path, steps=8, checkpoint_every=4, decay_steps=0), workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    train = json.load(f)["train"]
  assert train["decay_steps"] == 4 and train["steps"] == 8
  four = learning_rate_schedule(tiny_config(tmp_path, steps=8, decay_steps=4).train)
  rates = logged(workdir, "train/learning_rate")
  assert rates == {step: pytest.approx(float(four(step - 1))) for step in range(1, 9)}


@pytest.mark.parametrize("section, key, value, expected", [
    ("train", "keep_checkpoints", 0, "expected a positive number"),
    ("train", "learning_rate", -1e-3, "expected a positive number"),
    ("train", "b2", 1.0, "expected a number in [0, 1)"),
    ("train", "nonfinite", "ignore", "expected stop or skip"),
    ("data", "val_fraction", 1.5, "expected a number in [0, 1)"),
    ("model", "remat_policy", "some", "expected one of full, dots, dots_all"),
    ("model", "dropout", 1.0, "expected a value in [0, 1)"),
])
def test_out_of_range_values_are_refused_before_anything_is_written(tmp_path, section, key, value, expected):
  config = tiny_config(tmp_path)
  config[section][key] = value
  with pytest.raises(ConfigError, match=re.escape(f"config.{section}.{key}: {expected}")):
    train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "config.json")


def test_a_step_that_cannot_fit_is_refused_before_it_runs(tmp_path):
  config = tiny_config(tmp_path, steps=2, batch_size=512, seq_len=4096)
  (tmp_path / "corpus.txt").write_text(TEXT * 40)  # a validation split longer than a row
  config.model.position = "rope"  # attention scores alone: 512 x 4 heads x 4096^2 floats, 128 GiB
  with pytest.raises(RunError, match=r"a train step needs about \d+\.\d GiB per device .* config.model.remat"):
    train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.listdir(tmp_path / "run" / "checkpoints")


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
  """The root (its corpus) and workdir of a 2-step run that checkpoints step 2, for tests to copy and change."""
  root = tmp_path_factory.mktemp("two_steps")
  workdir = str(root / "run")
  train_and_evaluate(tiny_config(root, steps=2, checkpoint_every=2), workdir)
  return root, workdir


def test_an_old_runs_config_gets_the_defaults_of_keys_added_since(tmp_path, two_steps):
  root, workdir = two_steps[0], str(tmp_path / "run")
  shutil.copytree(two_steps[1], workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  for section, key in (("data", "encoding_errors"), ("data", "seed"), ("train", "nonfinite"),
                       ("train", "restore_step")):
    del saved[section][key]
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(saved, f)
  assert runs.load_run(workdir).run.config.data.encoding_errors == "strict"
  assert train_and_evaluate(tiny_config(root, steps=4, checkpoint_every=2), workdir)["step"] == 4


def test_a_tokenizer_or_model_that_does_not_match_the_checkpoint_is_one_line(tmp_path, two_steps):
  workdir = str(tmp_path / "run")
  shutil.copytree(two_steps[1], workdir)
  with open(os.path.join(workdir, "tokenizer.json"), "w") as f:
    json.dump({"kind": "char", "chars": "abc"}, f)  # another vocabulary size than the checkpoint's
  with pytest.raises(RunError, match=r"checkpoints/2: holds \(43, 32\) for embed/embedding, the model needs \(6, 32\)"):
    runs.load_run(workdir)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, "-m", "train.generate", f"--workdir={workdir}", "--prompt=a"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 1 and len(lines) == 1 and "another model config or tokenizer" in lines[0], result.stderr


def test_out_of_memory_at_run_time_is_one_line(capsys):
  def step():
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 58967261584 bytes.\nstack ...")
  with pytest.raises(SystemExit) as info:
    run_reporting_errors(step)
  lines = capsys.readouterr().err.strip().splitlines()
  assert info.value.code == 1 and len(lines) == 1 and "config.model.remat=True" in lines[0], lines
