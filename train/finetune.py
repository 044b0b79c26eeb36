"""Fine-tuning entrypoint: a pretrained run + a PEFT method + a task, trained with the shared loop.

  python -m train.finetune --config=configs/finetune/sst2_lora.py --workdir=runs/sst2_lora \\
      --config.init_from=runs/wiki_small [--config.peft.lora_rank=4 ...]

The model (config.model) and tokenizer are the pretrained run's. The TrainState holds only what trains:
{"base": trainable base parameters, "adapters": new parameters, "head": classification head}; the
frozen base parameters are re-read from `init_from` (its step recorded as `init_step`), so checkpoints
of adapter methods are small. Running the same command again resumes exactly.
"""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from data import objectives
from data.sources import read_records
from data.tokenizer import load_tokenizer
from model.config import ConfigError, ModelConfig
from model.transformer import build_model, init_params
from train import mesh as mesh_lib
from train import peft
from train import state as state_lib
from train import tasks
from train.checkpoint import pretrained_params, read_run_config, resolve_step, restore_state
from train.cli import parse_flags, run_reporting_errors
from train.step import eval_step
from train.loop import check_train_config, eval_batches, fit, summarize
from train.workdir import prepare_workdir


def _resolve_base(config):
  """Reads the pretrained run: copies its model config into config.model, pins config.init_step."""
  if not config.init_from:
    raise ConfigError("config.init_from: the workdir of a pretrained run is required")
  base_config = read_run_config(config.init_from)
  if base_config.get("init_from"):
    raise ConfigError(f"config.init_from: {config.init_from} is itself a fine-tuning run; give its base")
  config.model.update(dict(base_config.model))
  config.init_step = resolve_step(config.init_from, None if config.init_step < 0 else config.init_step)
  return base_config


def build(config, mesh=None):
  """Everything a fine-tuning run needs except data: (model, method, loss factory, state, shardings...)."""
  base_config = _resolve_base(config)
  tokenizer = load_tokenizer(config.init_from)
  model = build_model(ModelConfig.from_config(config.model, tokenizer.vocab_size))
  method = peft.Method(config.peft, model.cfg)
  rules = tuple(tuple(rule) for rule in config.mesh.rules)
  mesh = mesh or mesh_lib.make_mesh(config.mesh)
  boxed = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
  base_shardings = mesh_lib.tree_shardings(boxed, mesh, rules)
  base = pretrained_params(config.init_from, config.init_step, base_config, model, base_shardings)
  trainable_base, frozen_base = peft.split(base, method.base_trainable)
  trainable_shardings, frozen_shardings = peft.split(base_shardings, method.base_trainable)
  return base_config, tokenizer, model, method, mesh, (trainable_base, frozen_base), \
      (trainable_shardings, frozen_shardings)


def finetune(config, workdir: str) -> dict:
  """Fine-tunes (or resumes) the run in `workdir`; returns the last metrics logged."""
  _, tokenizer, model, method, mesh, (trainable_base, frozen_base), (trainable_sh, frozen_sh) = build(config)
  check_train_config(config, mesh)
  if method.name == "prompt" and model.cfg.position == "learned" and \
      config.train.seq_len + config.peft.num_prompt_tokens > model.cfg.max_len:
    raise ConfigError(f"config.peft.num_prompt_tokens: {config.peft.num_prompt_tokens} virtual tokens + "
                      f"seq_len {config.train.seq_len} exceed the learned positions (max_len {model.cfg.max_len})")
  prepare_workdir(config, workdir)
  for name in ("tokenizer.model", "tokenizer.json"):
    source = os.path.join(config.init_from, name)
    if os.path.exists(source) and not os.path.exists(os.path.join(workdir, name)):
      shutil.copy(source, workdir)
  train_rows, val_rows, labels = tasks.build_rows(config, tokenizer)

  rng = jax.random.PRNGKey(config.train.seed)
  replicated = mesh_lib.replicated(mesh)
  params = {"base": trainable_base, "adapters": method.init_adapters(jax.random.fold_in(rng, 1), frozen_base)}
  shardings = {"base": trainable_sh, "adapters": jax.tree.map(lambda _: replicated, params["adapters"])}
  if labels is not None:
    params["head"] = tasks.init_head(jax.random.fold_in(rng, 2), model.cfg.d_model, len(labels))
    shardings["head"] = jax.tree.map(lambda _: replicated, params["head"])
  # Regexes that match no base parameter are a typo even when a classification head trains (a linear
  # probe is trainable=()).
  no_match = method.name == "freeze" and len(config.peft.trainable) > 0 and not jax.tree.leaves(trainable_base)
  if no_match or (method.name != "full" and not jax.tree.leaves(params)):
    raise ConfigError(f"config.peft.trainable: {list(config.peft.trainable)} match no parameter")
  tx = state_lib.make_optimizer(config.train)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)
  state_shardings = state_lib.TrainState(
      step=replicated, params=shardings, opt_state=state_lib.opt_state_shardings(tx, state.opt_state, shardings, mesh),
      rng=replicated)
  state = jax.device_put(state, state_shardings)
  frozen = jax.device_put({"base": frozen_base}, {"base": frozen_sh})

  trainable = sum(x.size for x in jax.tree.leaves(params))
  total = trainable + sum(x.size for x in jax.tree.leaves(frozen))
  with open(os.path.join(workdir, "run_info.json"), "w") as f:
    json.dump({"method": method.name, "task": config.task, "trainable_params": int(trainable),
               "total_params": int(total), "trainable_share": trainable / total,
               "labels": labels if labels is None else [str(x) for x in labels]}, f, indent=2)

  def effective_params(params, frozen, rng, deterministic):
    base = peft.combine(params["base"], frozen["base"])
    return method.effective(base, params["adapters"], rng, deterministic)

  loss_fn = tasks.make_loss(config.task, model, effective_params, 0 if labels is None else len(labels))
  _, last = fit(config, workdir, mesh=mesh, state=state, state_shardings=state_shardings, frozen=frozen,
                frozen_shardings={"base": frozen_sh}, loss_fn=loss_fn, tx=tx, train_rows=train_rows,
                val_rows=val_rows)
  return last


def _restore(workdir: str, step: int | None):
  """A fine-tuning run's pieces on the first device: (config, tokenizer, model, method, trained params,
  frozen base params, labels or None, step)."""
  config = read_run_config(workdir)
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1])
  _, tokenizer, model, method, _, (trainable_base, frozen_base), _ = build(config, mesh)
  step = resolve_step(workdir, step)
  params = {"base": trainable_base, "adapters": method.init_adapters(jax.random.PRNGKey(0), frozen_base)}
  with open(os.path.join(workdir, "run_info.json")) as f:
    labels = json.load(f)["labels"]
  if labels is not None:
    params["head"] = tasks.init_head(jax.random.PRNGKey(0), model.cfg.d_model, len(labels))
  tx = state_lib.make_optimizer(config.train)
  abstract = jax.eval_shape(lambda: state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                                         opt_state=tx.init(params), rng=jax.random.PRNGKey(0)))
  state = restore_state(workdir, step, abstract)
  return config, tokenizer, model, method, state.params, frozen_base, labels, step


def load_finetuned(workdir: str, step: int | None = None):
  """(config, model, merged params, tokenizer, step) of a fine-tuning run, on the first device."""
  config, tokenizer, model, method, params, frozen_base, _, step = _restore(workdir, step)
  merged = method.merge(peft.combine(params["base"], frozen_base), params["adapters"])
  return config, model, merged, tokenizer, step


def evaluate_classifier(workdir: str, data: str, *, step: int | None = None, batch_size: int = 32,
                        max_records: int = 0) -> dict:
  """Loss, accuracy and macro-F1 of a classification run on a JSONL file with the run's text/label fields."""
  config, tokenizer, model, method, params, frozen_base, labels, step = _restore(workdir, step)
  if labels is None:
    raise ConfigError(f"{workdir}: not a classification run (config.task={config.task!r})")
  records = read_records(data, [config.data.text_field, config.data.label_field], max_records)
  rows = objectives.classify_rows(
      tokenizer, [str(r[config.data.text_field]) for r in records],
      objectives.encode_labels([str(r[config.data.label_field]) for r in records], labels), config.train.seq_len)

  def effective_params(params, frozen, rng, deterministic):
    return method.effective(peft.combine(params["base"], frozen["base"]), params["adapters"], rng, deterministic)

  eval_fn = jax.jit(functools.partial(eval_step, loss_fn=tasks.classify_loss(model, effective_params, len(labels))))
  totals = None
  for batch in eval_batches(rows, batch_size, max_batches=len(records)):
    sums = eval_fn(params, batch, {"base": frozen_base})
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  metrics = summarize(jax.device_get(totals), "eval")
  return {"loss": metrics["eval/loss"], "accuracy": metrics["eval/accuracy"], "macro_f1": metrics["eval/macro_f1"],
          "examples": len(records), "step": step}


def main(argv):
  del argv
  run_reporting_errors(finetune, flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":  # flags only here: load_finetuned is imported by other entrypoints
  config_flags.DEFINE_config_file("config", None, "Fine-tuning config (configs/finetune/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)
