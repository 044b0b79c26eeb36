"""End-to-end training invariants: mesh independence, exact resume, overfitting, accumulation, errors."""

import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from configs import base
from data import loader as loader_lib
from data.packing import pack_documents
from data.tokenizer import CharTokenizer
from model.config import ConfigError, ModelConfig
from model.families import build_model
from train import mesh as mesh_lib
from train import optimizers
from train import runs
from train.pretrain import train_and_evaluate
from train.step import token_loss, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The seed of every training run in the tests. ABLAX_TEST_SEED=N runs them with another one: a test that asserts
# what a short run learned must pass with a few seeds, as it must on other machines (XLA's CPU code differs).
SEED = int(os.environ.get("ABLAX_TEST_SEED", "0"))
TEXT = "".join(f"line {i}: the {w} fox jumps over {i % 7} lazy dogs.\n"
               for i, w in enumerate(["quick", "slow", "red", "brown"] * 60))


def tiny_config(tmp_path, **train_overrides):
  """A 2-layer char model on a generated text file; every step logged, no final samples."""
  corpus = tmp_path / "corpus.txt"
  corpus.write_text(TEXT)
  config = base.get_config()
  config.data.train_path = str(corpus)
  config.data.tokenizer = "char"
  config.model.update(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, max_len=32, dropout=0.1)
  config.train.update(steps=5, batch_size=8, seq_len=16, warmup_steps=2, decay_steps=10, eval_every=5,
                      eval_batches=2, checkpoint_every=5, log_every=1, num_samples=0, seed=SEED)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  config.train.update(**train_overrides)
  return config


def load_parts(workdir, step=None, require_tokenizer=True):
  """(config, model, merged params, tokenizer, step) of a run, through train.runs.load_run."""
  loaded = runs.load_run(workdir, step, require_tokenizer=require_tokenizer)
  return loaded.run.config, loaded.run.model, loaded.params, loaded.run.tokenizer, loaded.step


def logged(workdir, key="train/loss"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


def test_meshes_give_the_same_losses(tmp_path, uninterrupted):
  # One device: the first 5 steps of the uninterrupted 8-step run (the schedule is decay_steps', not steps'; the
  # resume tests show the first steps of a shorter run equal them).
  losses = {(1, 1, 1): {step: loss for step, loss in logged(uninterrupted).items() if step <= 5}}
  for shape in [(8, 1, 1), (2, 2, 2)]:
    config = tiny_config(tmp_path)
    config.mesh.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
    workdir = str(tmp_path / "run_{}_{}_{}".format(*shape))
    train_and_evaluate(config, workdir)
    losses[shape] = logged(workdir)
  reference = np.array(list(losses[(1, 1, 1)].values()))
  assert len(reference) == 5 and reference[-1] < reference[0]
  for shape, by_step in losses.items():
    np.testing.assert_allclose(list(by_step.values()), reference, atol=1e-5, rtol=0, err_msg=str(shape))


@pytest.mark.parametrize("async_checkpoints", [False, True])
def test_resume_is_exact(tmp_path, uninterrupted, async_checkpoints):
  """Also with checkpoints written in the background while the next steps donate the state's buffers."""
  resumed = str(tmp_path / "resumed")
  # "Crash" after step 4: the last checkpoint is step 3, so steps 4.. are recomputed on resume.
  train_and_evaluate(tiny_config(tmp_path, steps=4, checkpoint_every=3, async_checkpoints=async_checkpoints),
                     resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  train_and_evaluate(tiny_config(tmp_path, steps=8, checkpoint_every=3, async_checkpoints=async_checkpoints),
                     resumed)
  whole, again = logged(uninterrupted), logged(resumed)
  assert sorted(again) == list(range(1, 9))  # stale step-4 line was replaced, not duplicated
  for step in range(1, 9):
    assert again[step] == whole[step], step  # bit-exact: same params, optimizer, rng and data position


def test_without_restoring_the_data_position_resume_differs(tmp_path, uninterrupted, monkeypatch):
  """Guards the resume test: if the loader restarted from scratch the losses would change."""
  workdir = str(tmp_path / "resumed")
  train_and_evaluate(tiny_config(tmp_path, steps=4, checkpoint_every=4), workdir)
  monkeypatch.setattr(loader_lib.Loader, "set_state", lambda self, state: None)
  train_and_evaluate(tiny_config(tmp_path, steps=8, checkpoint_every=4), workdir)
  assert logged(workdir)[5] != logged(uninterrupted)[5]


def _tiny_model_and_batch(batch_size=8, seq_len=16, **model_overrides):
  tokenizer = CharTokenizer("".join(sorted(set(TEXT))))
  rows = pack_documents([tokenizer.encode(TEXT)], seq_len, tokenizer.bos_id)
  batch = {k: v[:batch_size] for k, v in rows.items()}
  model_cfg = dict(num_layers=2, d_model=64, num_heads=4, num_kv_heads=4, head_dim=16, mlp_dim=128,
                   max_len=seq_len)
  model_cfg.update(model_overrides)
  return build_model(ModelConfig(vocab_size=tokenizer.vocab_size, **model_cfg)), batch


def _single_device_state(model, train_overrides, seq_len=16, tx=None):
  config = base.get_config()
  config.train.update(**train_overrides)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  mesh = mesh_lib.make_mesh(config.mesh)
  tx = tx or optimizers.make_optimizer(config.train, runs.logical_axes(model))
  state = runs.for_model(model, tx, mesh, mesh_lib.config_rules(config.mesh), seq_len, seed=SEED).init_state()
  return state, tx


def test_tiny_model_overfits_one_batch():
  model, batch = _tiny_model_and_batch()
  state, tx = _single_device_state(model, dict(learning_rate=3e-3, warmup_steps=10, steps=300,
                                               weight_decay=0.0))
  step = jax.jit(functools.partial(train_step, loss_fn=token_loss(model), tx=tx))
  losses = []
  for _ in range(300):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss_sum"] / metrics["weight_sum"]))  # before each update
  # The measured first loss is that of an untrained model (about log V), and training drives it near 0.
  assert abs(losses[0] - np.log(model.cfg.vocab_size)) < 0.5 and losses[-1] < 0.05 * losses[0], losses[::50]


def test_gradient_accumulation_equals_one_big_batch():
  model, batch = _tiny_model_and_batch()
  results = []
  for accum in (1, 4):
    # Plain SGD, so the parameter change is the gradient itself (Adam's first step is ~sign(grad)).
    state, tx = _single_device_state(model, {}, tx=optax.sgd(1.0))
    step = jax.jit(functools.partial(train_step, loss_fn=token_loss(model), tx=tx, grad_accum=accum))
    state, metrics = step(state, batch)
    results.append((state.params, metrics))
  (params_1, metrics_1), (params_4, metrics_4) = results
  np.testing.assert_allclose(metrics_1["loss_sum"], metrics_4["loss_sum"], rtol=1e-5)
  np.testing.assert_allclose(metrics_1["grad_norm"], metrics_4["grad_norm"], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params_1, params_4)


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
  """(config, workdir) of a 4-step run that evaluates every 2 steps and keeps the last 2 of its checkpoints, one a
  step: the run that the tests of logging, checkpoint rotation and a changed config look at."""
  root = tmp_path_factory.mktemp("four_steps")
  config = tiny_config(root, steps=4, eval_every=2, checkpoint_every=1, keep_checkpoints=2)
  workdir = str(root / "run")
  train_and_evaluate(config, workdir)
  return config, workdir


def test_changed_config_in_existing_workdir_is_refused(four_steps):
  config, workdir = four_steps
  config = config.copy_and_resolve_references()
  config.model.d_model = 64
  with pytest.raises(ConfigError, match="config.model.d_model"):
    train_and_evaluate(config, workdir)


def test_keeps_the_last_n_checkpoints(four_steps):
  _, workdir = four_steps
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "4"]


def _cli(tmp_path, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "train.pretrain", "--config=configs/quickstart.py",
                         f"--workdir={tmp_path / 'run'}", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("arg, expected", [
    ("--config.train.stpes=3", "--config.train.stpes: unknown config key 'stpes'"),
    ("--config.data.train_path=/nonexistent/corpus.txt", "data path '/nonexistent/corpus.txt': no files match"),
    ("EMPTY", "the corpus is empty"),
])
def test_user_errors_are_one_line(tmp_path, arg, expected):
  if arg == "EMPTY":
    (tmp_path / "empty.txt").write_text("  \n\n")
    arg = f"--config.data.train_path={tmp_path / 'empty.txt'}"
  result = _cli(tmp_path, arg)
  assert result.returncode == 1
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr


def test_train_and_eval_metrics_are_logged(four_steps):
  _, workdir = four_steps
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  assert all({"train/loss", "train/tokens_per_sec", "time"} <= set(r) for r in records)
  assert [("eval/loss" in r) for r in records] == [False, True, False, True]
  assert np.exp(records[-1]["eval/loss"]) == pytest.approx(records[-1]["eval/perplexity"], rel=1e-6)
  assert os.path.exists(os.path.join(workdir, "config.json"))
  assert any(name.startswith("events") for name in os.listdir(os.path.join(workdir, "tensorboard")))
