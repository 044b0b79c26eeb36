"""train_and_evaluate(config, workdir): the loop shared by the entrypoints.

Data -> sharded init (or exact resume from the last checkpoint) -> jitted steps with periodic
evaluation, metrics (metrics.jsonl, TensorBoard, tqdm) and checkpoints -> samples at the end.
"""

import functools
import math
import os
import time

import jax
import tqdm

from data.pipeline import Loader, prepare_lm_data
from model import decode
from model.config import ConfigError, ModelConfig
from model.transformer import build_model
from train import mesh as mesh_lib
from train import state as state_lib
from train.checkpoint import Checkpointer
from train.metrics import MetricWriter
from train.step import eval_step, train_step
from train.workdir import prepare_workdir


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


def evaluate(eval_fn, params, val_rows, config, sharding) -> dict:
  """Loss, perplexity and accuracy over the first eval_batches validation batches (fixed order)."""
  loader = Loader(val_rows, config.train.batch_size, seed=0, shuffle=False,
                  process_index=jax.process_index(), process_count=jax.process_count())
  num_rows = len(next(iter(val_rows.values())))
  num_batches = min(config.train.eval_batches, max(1, math.ceil(num_rows / config.train.batch_size)))
  totals = None
  for _ in range(num_batches):
    sums = eval_fn(params, _to_device(next(loader), sharding))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  loss = float(totals["loss_sum"] / max(totals["weight_sum"], 1.0))
  return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)),
          "eval/accuracy": float(totals["correct_sum"] / max(totals["weight_sum"], 1.0))}


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
  """Trains (or resumes) the run in `workdir`; returns the last metrics logged."""
  mesh = mesh_lib.make_mesh(config.mesh)
  check_train_config(config, mesh)
  prepare_workdir(config, workdir)
  train = config.train

  tokenizer, train_rows, val_rows = prepare_lm_data(config.data, train.seq_len, workdir)
  model_cfg = ModelConfig.from_config(config.model, tokenizer.vocab_size)
  model = build_model(model_cfg)
  tx = state_lib.make_optimizer(train)
  rules = tuple(tuple(rule) for rule in config.mesh.rules)
  state, state_shardings = state_lib.init_state(model, tx, train.seed, mesh, rules, train.seq_len)
  loader = Loader(train_rows, train.batch_size, seed=train.seed,
                  process_index=jax.process_index(), process_count=jax.process_count())

  checkpointer = Checkpointer(workdir, train.keep_checkpoints)
  start_step = checkpointer.latest_step() or 0
  if start_step:
    state, data_state = checkpointer.restore(start_step, state, state_shardings)
    loader.set_state(data_state)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f"ablax: {num_params / 1e6:.2f}M parameters, mesh {dict(mesh.shape)}, "
        f"{len(train_rows['inputs'])} train rows x {train.seq_len} tokens, "
        f"vocab {tokenizer.vocab_size}, step {start_step}/{train.steps}")

  batch_sharding = mesh_lib.batch_sharding(mesh)
  train_fn = jax.jit(functools.partial(train_step, model=model, tx=tx, grad_accum=train.grad_accum),
                     in_shardings=(state_shardings, batch_sharding),
                     out_shardings=(state_shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))
  eval_fn = jax.jit(functools.partial(eval_step, model=model),
                    in_shardings=(state_shardings.params, batch_sharding))
  schedule = state_lib.learning_rate_schedule(train)

  writer = MetricWriter(workdir, resume_step=start_step)
  last = {}
  tokens_per_step = train.batch_size * train.seq_len
  interval = {"loss_sum": 0.0, "weight_sum": 0.0, "steps": 0, "start": time.time()}
  progress = tqdm.tqdm(total=train.steps, initial=start_step, desc="train", dynamic_ncols=True,
                       mininterval=1.0, disable=jax.process_index() != 0)
  pending = None  # (step, metrics) of the step before, fetched after the next one is dispatched
  with writer:
    for step in range(start_step + 1, train.steps + 1):
      state, metrics = train_fn(state, _to_device(next(loader), batch_sharding))
      done = [pending] if pending else []
      pending = (step, metrics)
      if step == train.steps or step % train.eval_every == 0 or step % train.checkpoint_every == 0:
        done.append(pending)
        pending = None
      for done_step, done_metrics in done:
        done_metrics = jax.device_get(done_metrics)
        loss = float(done_metrics["loss_sum"] / max(done_metrics["weight_sum"], 1.0))
        if not math.isfinite(loss):
          raise FloatingPointError(f"train/loss is {loss} at step {done_step}; the last checkpoint is kept "
                                   "(lower config.train.learning_rate or enable config.train.grad_clip)")
        interval["loss_sum"] += float(done_metrics["loss_sum"])
        interval["weight_sum"] += float(done_metrics["weight_sum"])
        interval["steps"] += 1
        if done_step % train.log_every == 0 or done_step == train.steps or done_step % train.eval_every == 0:
          elapsed = time.time() - interval["start"]
          last = {"step": done_step,
                  "train/loss": interval["loss_sum"] / max(interval["weight_sum"], 1.0),
                  "train/grad_norm": float(done_metrics["grad_norm"]),
                  "train/learning_rate": float(schedule(done_step - 1)),
                  "train/tokens_per_sec": interval["steps"] * tokens_per_step / max(elapsed, 1e-9)}
          if done_step % train.eval_every == 0 or done_step == train.steps:
            last.update(evaluate(eval_fn, state.params, val_rows, config, batch_sharding))
          writer.write(last)
          progress.set_postfix(loss=f"{last['train/loss']:.3f}",
                               tok_s=f"{last['train/tokens_per_sec']:.0f}", refresh=False)
          interval = {"loss_sum": 0.0, "weight_sum": 0.0, "steps": 0, "start": time.time()}
      if step % train.checkpoint_every == 0 or step == train.steps:
        checkpointer.save(step, state, loader.get_state())
      progress.update(1)
  progress.close()
  checkpointer.close()
  if jax.process_index() == 0:
    write_samples(model, state.params, tokenizer, config, workdir)
  return last
