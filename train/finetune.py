"""Fine-tuning entrypoint: a pretrained run + a PEFT method + a task, trained with the shared loop.

  python -m train.finetune --config=configs/finetune/sst2_lora.py --workdir=runs/sst2_lora \\
      --config.init_from=runs/wiki_small [--config.peft.lora_rank=4 ...]

The model (config.model; but for how it is computed: dtype, remat, scan_layers, attention_impl) and tokenizer
are the pretrained run's. The TrainState holds only what trains:
{"base": trainable base parameters, "adapters": new parameters, "head": classification head}; the
frozen base parameters are re-read from `init_from` (its step recorded as `init_step`), so checkpoints
of adapter methods are small (train/runs.py). Running the same command again resumes exactly.
"""

import json
import os
import shutil

import jax
from absl import app, flags
from ml_collections import config_flags

from model.config import ConfigError
from train import checkpoint
from train import distributed
from train import mesh as mesh_lib
from train import preference_eval
from train import runs
from train import tasks
from train import terminal
from train.cli import parse_flags, run_reporting_errors
from train.loop import check_train_config, fit
from train import workdir as workdir_lib


def finetune(config, workdir: str) -> dict:
  """Fine-tunes (or resumes) the run in `workdir`, which it holds locked; returns the last metrics logged."""
  with workdir_lib.lock(workdir):
    return _finetune(config, workdir)


def _finetune(config, workdir: str) -> dict:
  base_config = runs.resolve_base(config, workdir)
  mesh = mesh_lib.make_mesh(config.mesh)
  check_train_config(config, mesh)
  if config.peft.method == "prompt" and config.model.position == "learned" and \
      config.train.seq_len + config.peft.num_prompt_tokens > config.model.max_len:
    raise ConfigError(f"config.peft.num_prompt_tokens: {config.peft.num_prompt_tokens} virtual tokens + seq_len "
                      f"{config.train.seq_len} exceed the learned positions (max_len {config.model.max_len})")
  tokenizer, _ = runs.run_tokenizer(config.init_from, base_config)
  tasks.check_sources(config)  # what can fail on a fresh workdir fails before anything is written in it
  workdir_lib.check_branch(config, workdir)
  def prepare():
    workdir_lib.prepare_workdir(config, workdir)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
      source = os.path.join(config.init_from, name)
      if distributed.is_writer() and os.path.exists(source) and not os.path.exists(os.path.join(workdir, name)):
        shutil.copy(source, workdir)
  distributed.writer_first("config", prepare)
  train_rows, val_rows, labels = tasks.build_rows(config, tokenizer)
  resumed = os.path.exists(os.path.join(workdir, runs.RUN_INFO))
  run = runs.finetuning(config, mesh, labels,
                        base_fingerprint=runs.read_run_info(workdir).get("base_fingerprint") if resumed else None)
  if distributed.is_writer() and not checkpoint.pin(config.init_from, config.init_step, workdir):
    print(f"ablax: warning: cannot pin step {config.init_step} in {config.init_from} (not writable): if that run "
          "goes on and rotates it away, this one cannot load")

  trainable = sum(x.size for x in jax.tree.leaves(run.abstract_state().params))
  total = trainable + sum(x.size for x in jax.tree.leaves(run.frozen))
  if distributed.is_writer():
    workdir_lib.write_atomic(os.path.join(workdir, runs.RUN_INFO), json.dumps({
        "method": run.method.name, "task": config.task, "trainable_params": int(trainable),
        "total_params": int(total), "trainable_share": trainable / total,
        "labels": labels if labels is None else [str(x) for x in labels],
        "base": {"workdir": os.path.abspath(config.init_from), "step": config.init_step},
        "base_fingerprint": run.base_fingerprint}, indent=2))
  extra_eval = None
  if config.task == "preference":
    run, train_rows, val_rows, extra_eval = preference_eval.prepare(config, workdir, run, train_rows, val_rows)
  loss_fn = tasks.make_loss(config.task, run, config.train.z_loss)
  _, last = fit(config, workdir, run, loss_fn, train_rows, val_rows, extra_eval)
  if distributed.is_writer():
    print(terminal.summary(workdir, config.train.steps))
  return last


def main(argv):
  del argv
  distributed.initialize()
  run_reporting_errors(finetune, flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":  # flags only here: tests import this module beside other entrypoints
  distributed.define_flags()
  config_flags.DEFINE_config_file("config", None, "Fine-tuning config (configs/finetune/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)
