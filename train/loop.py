"""fit(): the training loop shared by the entrypoints, and train_and_evaluate(config, workdir) for pretraining.

Data -> sharded init (or exact resume from the last checkpoint) -> jitted steps with periodic
evaluation, metrics (metrics.jsonl, TensorBoard, tqdm) and checkpoints -> samples at the end.
"""

import functools
import math
import os
import time

import jax
import numpy as np
import tqdm

from data.pipeline import Loader, prepare_lm_data
from model import decode
from model.config import ConfigError, ModelConfig
from model.transformer import build_model
from train import mesh as mesh_lib
from train import state as state_lib
from train.checkpoint import Checkpointer
from train.metrics import MetricWriter
from train.step import eval_step, pretraining_loss, train_step
from train.workdir import prepare_workdir


OBJECTIVES = {"decoder": "causal_lm", "encoder": "masked_lm", "encoder_decoder": "span_corruption"}


def check_train_config(config, mesh) -> None:
  """Cross-section checks that need the mesh; one ConfigError naming the key."""
  train = config.train
  for key in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "checkpoint_every", "log_every"):
    if train[key] <= 0:
      raise ConfigError(f"config.train.{key}: expected a positive integer, got {train[key]}")
  if train.batch_size % train.grad_accum:
    raise ConfigError(f"config.train.batch_size: {train.batch_size} must divide by "
                      f"config.train.grad_accum={train.grad_accum}")
  micro_batch, parallel = train.batch_size // train.grad_accum, mesh_lib.data_parallel_size(mesh)
  if micro_batch % parallel:
    raise ConfigError(f"config.train.batch_size: the microbatch of {micro_batch} rows must divide by the "
                      f"{parallel} data-parallel devices (config.mesh.data x config.mesh.fsdp)")
  if config.model.position == "learned" and train.seq_len > config.model.max_len:
    raise ConfigError(f"config.train.seq_len: {train.seq_len} exceeds config.model.max_len="
                      f"{config.model.max_len} of the learned position table")


def _to_device(batch, sharding):
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def summarize(sums: dict, prefix: str) -> dict:
  """Metrics from summed statistics: loss (+ perplexity for token losses), accuracy, macro-F1 (if labels)."""
  weight = max(float(sums["weight_sum"]), 1.0)
  loss = float(sums["loss_sum"]) / weight
  metrics = {f"{prefix}/loss": loss, f"{prefix}/accuracy": float(sums["correct_sum"]) / weight}
  if "confusion" in sums:  # [true class, predicted class] counts
    confusion = np.asarray(sums["confusion"], np.float64)
    true_positive = np.diag(confusion)
    f1 = 2 * true_positive / np.maximum(confusion.sum(0) + confusion.sum(1), 1e-9)
    metrics[f"{prefix}/macro_f1"] = float(np.mean(f1))
  else:
    metrics[f"{prefix}/perplexity"] = math.exp(min(loss, 50.0))
  return metrics


def eval_batches(rows: dict, batch_size: int, max_batches: int):
  """The first max_batches batches of `rows` in order, each row once; the last batch is filled up with
  copies of row 0 whose weights are 0, so every batch has the compiled shape and no row counts twice."""
  num_rows = min(len(next(iter(rows.values()))), batch_size * max_batches)
  per_process = batch_size // jax.process_count()
  for start in range(0, num_rows, batch_size):
    index = np.arange(start, start + batch_size)
    valid = index < num_rows
    batch = {k: v[np.where(valid, index, 0)] for k, v in rows.items()}
    for key in [k for k in batch if k.endswith("weights")]:  # weights, decoder_weights
      batch[key] = batch[key] * valid[:, None]
    local = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    yield {k: v[local] for k, v in batch.items()}


def evaluate(eval_fn, params, frozen, val_rows, config, sharding) -> dict:
  """Eval metrics over the first eval_batches validation batches (fixed order, the same every time)."""
  totals = None
  for batch in eval_batches(val_rows, config.train.batch_size, config.train.eval_batches):
    sums = eval_fn(params, _to_device(batch, sharding), frozen)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  return summarize(jax.device_get(totals), "eval")


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
                                       max_new_tokens=max_new_tokens, sampling=sampling, seed=train.seed)
  texts = [train.sample_prompt + text for text in continuations]
  with open(os.path.join(workdir, "samples.txt"), "w") as f:
    for i, text in enumerate(texts):
      f.write(f"--- sample {i}\n{text}\n")
  for i, text in enumerate(texts):
    print(f"--- sample {i}\n{text}")
  return texts


def train_and_evaluate(config, workdir: str) -> dict:
  """Pretrains (or resumes) the run in `workdir`; returns the last metrics logged."""
  mesh = mesh_lib.make_mesh(config.mesh)
  check_train_config(config, mesh)
  objective = OBJECTIVES.get(config.model.family)
  if config.objective != objective:
    raise ConfigError(f"config.objective: {config.objective!r} does not pretrain a {config.model.family} "
                      f"(config.model.family); expected {objective!r}")
  prepare_workdir(config, workdir)
  train = config.train
  tokenizer, train_rows, val_rows = prepare_lm_data(config.data, train.seq_len, workdir, config.objective)
  model = build_model(ModelConfig.from_config(config.model, tokenizer.vocab_size))
  tx = state_lib.make_optimizer(train)
  rules = tuple(tuple(rule) for rule in config.mesh.rules)
  state, state_shardings = state_lib.init_state(model, tx, train.seed, mesh, rules, train.seq_len)
  print(f"ablax: vocab {tokenizer.vocab_size}, {len(train_rows['inputs'])} train rows x {train.seq_len} tokens")
  state, last = fit(config, workdir, mesh=mesh, state=state, state_shardings=state_shardings, frozen={},
                    frozen_shardings={}, loss_fn=pretraining_loss(model), tx=tx, train_rows=train_rows,
                    val_rows=val_rows)
  if jax.process_index() == 0 and model.cfg.family == "decoder":
    write_samples(model, state.params, tokenizer, config, workdir)
  return last


def fit(config, workdir: str, *, mesh, state, state_shardings, frozen, frozen_shardings, loss_fn, tx,
        train_rows, val_rows):
  """The training loop shared by the entrypoints: resume, jitted steps, eval, metrics, checkpoints.

  Returns (final state, last metrics logged). `frozen` parameters are inputs of every step, never saved.
  """
  train = config.train
  loader = Loader(train_rows, train.batch_size, seed=train.seed,
                  process_index=jax.process_index(), process_count=jax.process_count())
  checkpointer = Checkpointer(workdir, train.keep_checkpoints)
  start_step = checkpointer.latest_step()
  if start_step is not None:
    state, data_state = checkpointer.restore(start_step, state, state_shardings)
    if data_state:  # an imported step-0 checkpoint has no data position
      loader.set_state(data_state)
  start_step = start_step or 0
  trainable = sum(x.size for x in jax.tree.leaves(state.params))
  total = trainable + sum(x.size for x in jax.tree.leaves(frozen))
  print(f"ablax: {total / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trainable ({100 * trainable / total:.2f}%), "
        f"mesh {dict(mesh.shape)}, step {start_step}/{train.steps}")

  batch_sharding = mesh_lib.batch_sharding(mesh)
  train_fn = jax.jit(functools.partial(train_step, loss_fn=loss_fn, tx=tx, grad_accum=train.grad_accum),
                     in_shardings=(state_shardings, batch_sharding, frozen_shardings),
                     out_shardings=(state_shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))
  eval_fn = jax.jit(functools.partial(eval_step, loss_fn=loss_fn),
                    in_shardings=(state_shardings.params, batch_sharding, frozen_shardings))
  schedule = state_lib.learning_rate_schedule(train)

  writer = MetricWriter(workdir, resume_step=start_step)
  last = {}
  tokens_per_step = train.batch_size * train.seq_len
  interval = {"sums": None, "steps": 0, "start": time.time()}
  progress = tqdm.tqdm(total=train.steps, initial=start_step, desc="train", dynamic_ncols=True,
                       mininterval=1.0, disable=jax.process_index() != 0)
  pending = None  # (step, metrics) of the step before, fetched after the next one is dispatched
  with writer:
    for step in range(start_step + 1, train.steps + 1):
      state, metrics = train_fn(state, _to_device(next(loader), batch_sharding), frozen)
      done = [pending] if pending else []
      pending = (step, metrics)
      if step == train.steps or step % train.eval_every == 0 or step % train.checkpoint_every == 0:
        done.append(pending)
        pending = None
      for done_step, done_metrics in done:
        done_metrics = jax.device_get(done_metrics)
        grad_norm = float(done_metrics.pop("grad_norm"))
        loss = float(done_metrics["loss_sum"] / max(done_metrics["weight_sum"], 1.0))
        if not math.isfinite(loss):
          raise FloatingPointError(f"train/loss is {loss} at step {done_step}; the last checkpoint is kept "
                                   "(lower config.train.learning_rate or enable config.train.grad_clip)")
        sums = interval["sums"]
        interval["sums"] = done_metrics if sums is None else jax.tree.map(np.add, sums, done_metrics)
        interval["steps"] += 1
        if done_step % train.log_every == 0 or done_step == train.steps or done_step % train.eval_every == 0:
          elapsed = time.time() - interval["start"]
          last = {"step": done_step, **summarize(interval["sums"], "train"), "train/grad_norm": grad_norm,
                  "train/learning_rate": float(schedule(done_step - 1)),
                  "train/tokens_per_sec": interval["steps"] * tokens_per_step / max(elapsed, 1e-9)}
          if done_step % train.eval_every == 0 or done_step == train.steps:
            last.update(evaluate(eval_fn, state.params, frozen, val_rows, config, batch_sharding))
          writer.write(last)
          progress.set_postfix(loss=f"{last['train/loss']:.3f}",
                               tok_s=f"{last['train/tokens_per_sec']:.0f}", refresh=False)
          interval = {"sums": None, "steps": 0, "start": time.time()}
      if step % train.checkpoint_every == 0 or step == train.steps:
        checkpointer.save(step, state, loader.get_state())
      progress.update(1)
  progress.close()
  checkpointer.close()
  return state, last
