"""Pretraining entrypoint: train_and_evaluate(config, workdir) and the command line.

  python -m train.pretrain --config=configs/quickstart.py --workdir=runs/quickstart [--config.a.b=v ...]

Data -> a Run (train/runs.py) -> the shared loop (train/loop.py) -> samples at the end (decoders). Running the
same command again resumes from the last checkpoint in the workdir.
"""

import os

import jax
from absl import app, flags
from ml_collections import config_flags

from data.loader import as_source
from data.pipeline import check_sources, prepare_lm_data, prepared_data
from data.sources import DataError
from model import decode
from model.config import ConfigError, ModelConfig
from model.families import FAMILIES
from train import distributed
from train import mesh as mesh_lib
from train import optimizers
from train import runs
from train import tasks
from train import terminal
from train.cli import parse_flags, run_reporting_errors
from train.loop import check_train_config, fit
from train.step import token_loss
from train import workdir as workdir_lib


def write_samples(model, params, tokenizer, config, workdir) -> list:
  """Samples a few continuations of config.train.sample_prompt with the KV-cache decoder; prints and saves them."""
  train = config.train
  if train.num_samples <= 0:
    return []
  sampling = decode.Sampling(temperature=train.sample_temperature, top_k=train.sample_top_k)
  max_new_tokens = train.sample_tokens
  if model.cfg.position == "learned":  # the learned table has max_len rows
    max_new_tokens = min(max_new_tokens, model.cfg.max_len - 1 - len(tokenizer.encode(train.sample_prompt)))
  continuations = decode.generate_text(model, jax.device_get(params), tokenizer,
                                       [train.sample_prompt] * train.num_samples,
                                       max_new_tokens=max_new_tokens, sampling=sampling, seed=train.seed,
                                       prompt_as_prefix=tasks.prompt_as_prefix(config))
  texts = [train.sample_prompt + text for text in continuations]
  workdir_lib.write_atomic(os.path.join(workdir, "samples.txt"),
                           "".join(f"--- sample {i}\n{text}\n" for i, text in enumerate(texts)))
  for i, text in enumerate(texts):
    print(f"--- sample {i}\n{text}")
  return texts


def train_and_evaluate(config, workdir: str) -> dict:
  """Pretrains (or resumes) the run in `workdir`, which it holds locked; returns the last metrics logged."""
  with workdir_lib.lock(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config, workdir: str) -> dict:
  mesh = mesh_lib.make_mesh(config.mesh)
  check_train_config(config, mesh)
  ModelConfig.from_config(config.model, vocab_size=1)  # every model key checked before anything is written
  family = FAMILIES.get(config.model.family)
  if family is None:
    raise ConfigError(f"config.model.family: expected one of {', '.join(FAMILIES)}, got {config.model.family!r}")
  if config.objective not in family.objectives:
    raise ConfigError(f"config.objective: {config.objective!r} does not pretrain a {config.model.family} "
                      f"(config.model.family); expected {' or '.join(map(repr, family.objectives))}")
  if config.data.prepared and config.objective != "causal_lm":
    raise ConfigError(f"config.data.prepared: a prepared corpus serves causal_lm, not {config.objective!r} (which "
                      "reads data.train_path)")
  check_sources(config.data)  # what can fail on a fresh workdir fails before anything is written in it
  workdir_lib.check_branch(config, workdir)
  distributed.writer_first("config", lambda: workdir_lib.prepare_workdir(config, workdir))
  train = config.train
  if config.data.prepared:
    tokenizer, train_rows, val_rows = distributed.writer_first("data", lambda: prepared_data(
        config.data, train.seq_len, workdir if distributed.is_writer() else None, train.batch_size * train.eval_batches))
  else:  # the others load process 0's tokenizer
    tokenizer, train_rows, val_rows = distributed.writer_first(
        "data", lambda: prepare_lm_data(config.data, train.seq_len, workdir, config.objective))
  samples = family.generates and not family.seq2seq and train.num_samples > 0  # a decoder: causal or prefix LM
  if samples:  # a prompt the tokenizer cannot read fails now, not after training
    try:
      tokenizer.encode(train.sample_prompt)
    except DataError as e:
      raise DataError(f"config.train.sample_prompt={train.sample_prompt!r}: {e}") from None
  run = runs.pretraining(config, mesh, tokenizer.vocab_size, tokenizer)
  print(f"ablax: vocab {tokenizer.vocab_size}, train: {as_source(train_rows).identity} x {train.seq_len} tokens")
  loss_fn = token_loss(run.model, z_loss=config.train.z_loss)
  state, last = fit(config, workdir, run, loss_fn, train_rows, val_rows)
  if samples:
    params = distributed.gather(optimizers.eval_params(state.params, state.opt_state))
    if distributed.is_writer():
      write_samples(run.model, params, tokenizer, config, workdir)
  if distributed.is_writer():
    print(terminal.summary(workdir, train.steps))
  return last


def main(argv):
  del argv
  distributed.initialize()
  run_reporting_errors(train_and_evaluate, flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":  # flags only here: tests and other entrypoints import this module
  distributed.define_flags()
  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, samples.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)
