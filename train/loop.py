"""fit(): the training loop shared by the entrypoints, for any Run (train/runs.py) and loss.

Sharded init (or exact resume from the last checkpoint) -> jitted steps with periodic evaluation, metrics
(metrics.jsonl, TensorBoard, tqdm, a line at each evaluation) and checkpoints; SIGTERM and Ctrl-C save a checkpoint
and stop. Offers `check_train_config`, `summarize`, `eval_batches`,
`evaluate`, `check_memory`, `jit_train_step` and `fit`.
"""

import functools
import math
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from data import batch as batch_lib
from data.loader import Loader
from model.config import ConfigError
from train import distributed
from train import hardware
from train import mesh as mesh_lib
from train import moe
from train import optimizers
from train import schedules
from train import terminal
from train.checkpoint import Checkpointer, read_checkpoint
from train.cli import Preempted, RunError
from train.metrics import MetricWriter
from train.step import eval_step, train_step


_POSITIVE, _NATURAL, _UNIT = (lambda v: v > 0, "a positive number"), (lambda v: v >= 0, "a number >= 0"), \
    (lambda v: 0 <= v < 1, "a number in [0, 1)")
# The range of every train and data key a run reads (the model's keys: model/config.py; the mesh: train/mesh.py).
RANGES = {
    **{f"train.{key}": _POSITIVE for key in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every",
                                             "eval_batches", "checkpoint_every", "keep_checkpoints", "log_every",
                                             "learning_rate", "eps")},
    **{f"train.{key}": _NATURAL for key in ("min_learning_rate", "warmup_steps", "decay_steps", "weight_decay",
                                            "grad_clip", "seed", "num_samples", "sample_tokens",
                                            "sample_temperature", "sample_top_k")},
    "train.b1": _UNIT, "train.b2": _UNIT, "train.restore_step": (lambda v: v >= -1, "-1 or a step"),
    "train.nonfinite": (lambda v: v in ("stop", "skip"), "stop or skip"),
    "train.z_loss": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf,
                     "a number >= 0"),
    **{f"data.{key}": _NATURAL for key in ("max_bytes", "target_len", "max_records")},
    "data.seed": (lambda v: v >= -1, "-1 (train.seed) or a seed"),
    "data.val_fraction": _UNIT, "data.vocab_size": _POSITIVE, "data.tokenizer_train_chars": _POSITIVE,
    "data.encoding_errors": (lambda v: v in ("strict", "replace", "ignore"), "strict, replace or ignore"),
}


def check_train_config(config, mesh) -> None:
  """Every train / data value in its range, and the checks across sections that need the mesh; one ConfigError
  naming the key."""
  for name, (valid, expected) in RANGES.items():
    section, key = name.split(".")
    if key in config[section] and not valid(config[section][key]):
      raise ConfigError(f"config.{name}: expected {expected}, got {config[section][key]!r}")
  train = config.train
  optimizers.check_config(train)
  moe.check_config(config)
  if train.min_learning_rate > train.learning_rate:
    raise ConfigError(f"config.train.min_learning_rate: {train.min_learning_rate} exceeds config.train.learning_rate="
                      f"{train.learning_rate}")
  if train.batch_size % train.grad_accum:
    raise ConfigError(f"config.train.batch_size: {train.batch_size} must divide by "
                      f"config.train.grad_accum={train.grad_accum}")
  micro_batch, parallel = train.batch_size // train.grad_accum, mesh_lib.data_parallel_size(mesh)
  if micro_batch % parallel:
    raise ConfigError(f"config.train.batch_size: the microbatch of {micro_batch} rows must divide by the "
                      f"{parallel} data-parallel devices (config.mesh.data x fsdp x expert)")
  if config.model.position == "learned":
    for name, length in (("train.seq_len", train.seq_len), ("data.target_len", config.data.get("target_len", 0))):
      if length > config.model.max_len:
        raise ConfigError(f"config.{name}: {length} exceeds config.model.max_len={config.model.max_len} of the "
                          "learned position table")


def _to_device(batch, sharding):
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def summarize(sums: dict, prefix: str) -> dict:
  """Metrics from summed statistics: loss (+ perplexity for token losses), accuracy, macro-F1 (if labels), the
  z-loss term (if the loss has one: z_loss times the mean log(Z)^2, beside the loss, which stays the cross
  entropy); a loss without "correct_sum" (preference) gives every other "<name>_sum" as the mean <name>."""
  weight = max(float(sums["weight_sum"]), 1.0)
  loss = float(sums["loss_sum"]) / weight
  metrics = {f"{prefix}/loss": loss}
  if "correct_sum" not in sums:
    metrics.update({f"{prefix}/{key[:-len('_sum')]}": float(value) / weight for key, value in sums.items()
                    if key.endswith("_sum") and key not in ("loss_sum", "weight_sum")})
    return metrics
  metrics[f"{prefix}/accuracy"] = float(sums["correct_sum"]) / weight
  if "z_loss_sum" in sums:
    metrics[f"{prefix}/z_loss"] = float(sums["z_loss_sum"]) / weight
  if "moe" in sums:  # a mixture of experts: expert load, drops, router losses (train/moe.py)
    metrics.update(moe.summarize(sums["moe"], prefix))
  if "confusion" in sums:  # [true class, predicted class] counts
    confusion = np.asarray(sums["confusion"], np.float64)
    true_positive = np.diag(confusion)
    f1 = 2 * true_positive / np.maximum(confusion.sum(0) + confusion.sum(1), 1e-9)
    metrics[f"{prefix}/macro_f1"] = float(np.mean(f1))
  else:
    metrics[f"{prefix}/perplexity"] = math.exp(min(loss, 50.0))
  return metrics


def eval_batches(rows: batch_lib.Batch, batch_size: int, max_batches: int):
  """The first max_batches batches of `rows` in order, each row once; the last batch is filled up with
  copies of row 0 whose weights are 0, so every batch has the compiled shape and no row counts twice."""
  num_rows = min(batch_lib.num_rows(rows), batch_size * max_batches)
  per_process = batch_size // jax.process_count()
  for start in range(0, num_rows, batch_size):
    index = np.arange(start, start + batch_size)
    valid = index < num_rows
    batch = batch_lib.take(rows, np.where(valid, index, 0))
    for key in set(batch_lib.WEIGHT_KEYS) & set(batch):
      batch[key] = batch[key] * valid[:, None]
    yield batch_lib.take(batch, slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process))


def evaluate(eval_fn, params, frozen, rows, batch_size: int, max_batches: int, sharding) -> dict:
  """Eval metrics over the first max_batches batches of `rows` (fixed order, the same every time)."""
  totals = None
  for batch in eval_batches(rows, batch_size, max_batches):
    sums = eval_fn(params, _to_device(batch, sharding), frozen)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  return summarize(jax.device_get(totals), "eval")


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def check_memory(compiled, mesh, limit: int | None = None) -> None:
  """A RunError naming the knobs when a compiled step needs more memory per device than a device has (GPU/TPU:
  its limit; CPU: the host's available memory shared by its devices; or `limit` bytes)."""
  need, device = hardware.compiled_memory_bytes(compiled), jax.local_devices()[0]
  if need is None:
    return
  limit = limit or hardware.device_memory_bytes()
  if limit and need > limit:
    temporaries = compiled.memory_analysis().temp_size_in_bytes / 2**30
    raise RunError(f"a train step needs about {need / 2**30:.1f} GiB per device ({temporaries:.1f} GiB of it "
                   f"temporaries), more than the {limit / 2**30:.1f} GiB a {device.platform} device has: "
                   "lower config.train.batch_size or seq_len, raise config.train.grad_accum, set config.model.remat="
                   "True, or shard over more devices (config.mesh.fsdp, config.mesh.tensor)")


def in_sharding_context(run, fn):
  """fn traced under the run's mesh and logical rules, so the model's activation constraints act."""
  def traced(*args):
    with mesh_lib.sharding_context(run.mesh, run.rules):
      return fn(*args)
  traced.__name__ = getattr(fn, "func", fn).__name__  # the jit keeps the step's name (train_step, eval_step)
  return traced


def jit_train_step(run, loss_fn, train_cfg):
  """The train step of a run jitted as every run compiles it: state and batch in their shardings, state donated
  (the loop, train/estimate.py and bench/ share it)."""
  step = in_sharding_context(run, functools.partial(train_step, loss_fn=loss_fn, tx=run.tx,
                                                    grad_accum=train_cfg.grad_accum,
                                                    skip_nonfinite=train_cfg.nonfinite == "skip",
                                                    rebalance=moe.rebalancer(run)))
  return jax.jit(step, in_shardings=(run.shardings, mesh_lib.batch_sharding(run.mesh), run.frozen_shardings),
                 out_shardings=(run.shardings, mesh_lib.replicated(run.mesh)), donate_argnums=(0,))


class _Preemption:
  """Records a SIGTERM (preemption) or a Ctrl-C (SIGINT) while installed; the loop checkpoints and stops at a step
  every process agrees on (one process asks the others every `every` steps). A second Ctrl-C stops the process at
  once: the run resumes from its last complete checkpoint."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, every: int):
    self.received, self.signum, self.previous, self.every = False, None, {}, every

  def at(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.received
    return step % self.every == 0 and distributed.agree(self.received)

  def _handle(self, signum, _):
    # os.write, not print: a handler may interrupt a print (tqdm's, say), and buffered writes are not reentrant.
    if signum == signal.SIGINT and self.received:
      os.write(2, b"\nablax: second Ctrl-C: stopped at once; the same command resumes from the last complete "
                  b"checkpoint\n")
      os._exit(130)
    if signum == signal.SIGINT:
      os.write(2, b"\nablax: Ctrl-C: saving a checkpoint at the end of this step (Ctrl-C again to stop at once)\n")
    self.received, self.signum = True, self.signum or signum

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      # A process started with SIGINT ignored (a shell's background job) keeps ignoring it, as Python does.
      self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS
                       if signal.getsignal(signum) is not signal.SIG_IGN}
    return self

  def __exit__(self, *exc):
    for signum, handler in self.previous.items():
      signal.signal(signum, handler)


def fit(config, workdir: str, run, loss_fn, train_rows, val_rows, extra_eval=None):
  """The training loop shared by the entrypoints: resume, jitted steps, eval, metrics, checkpoints.

  Returns (final state, last metrics logged). The run's `frozen` parameters are inputs of every step, never saved.
  `extra_eval(params)`, if given, returns more eval metrics at each evaluation (a preference run's samples).
  Nothing non-finite is saved: a NaN/inf loss or gradient stops the run before the next save (or, with
  train.nonfinite = "skip", skips that update), a non-finite eval loss stops it, and the parameters are checked
  before every save. SIGTERM or Ctrl-C saves a checkpoint at the current step and raises Preempted.
  """
  checkpointer = Checkpointer(workdir, config.train.keep_checkpoints, writer=True,
                            async_save=config.train.async_checkpoints)
  try:
    return _fit(config, workdir, run, loss_fn, train_rows, val_rows, checkpointer, extra_eval)
  finally:
    checkpointer.close()


def _fit(config, workdir, run, loss_fn, train_rows, val_rows, checkpointer, extra_eval):
  train, mesh, frozen = config.train, run.mesh, run.frozen
  data_seed = config.data.seed if config.data.seed >= 0 else train.seed  # data.seed -1: the order follows train.seed
  loader = Loader(train_rows, train.batch_size, seed=data_seed, process_index=jax.process_index(),
                  process_count=jax.process_count(), prefetch=2)
  resumed = checkpointer.resume(run.abstract_state(), train.restore_step)
  branched = resumed is None and bool(train.branch_from)
  if branched:  # the first start of a branch: another run's state, step and data position
    resumed = read_checkpoint(train.branch_from, train.branch_step, run.abstract_state())
  if resumed is None:
    state, start_step = run.init_state(), 0
  else:
    state, data_state, start_step = resumed
    if data_state:  # an imported step-0 checkpoint has no data position
      loader.set_state(data_state)
  last_saved = start_step if resumed and not branched else None
  trainable = sum(x.size for x in jax.tree.leaves(state.params))
  total = trainable + sum(x.size for x in jax.tree.leaves(frozen))
  print(f"ablax: {total / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trainable ({100 * trainable / total:.2f}%), "
        f"mesh {dict(mesh.shape)}, step {start_step}/{train.steps}")

  batch_sharding = mesh_lib.batch_sharding(mesh)
  skip = train.nonfinite == "skip"
  train_fn = jit_train_step(run, loss_fn, train)
  eval_fn = jax.jit(in_sharding_context(run, functools.partial(eval_step, loss_fn=loss_fn)),
                    in_shardings=(run.shardings.params, batch_sharding, run.frozen_shardings),
                    out_shardings=mesh_lib.replicated(mesh))
  schedule = schedules.learning_rate_schedule(train)

  def check(step: int, name: str, value: float) -> None:
    if not math.isfinite(value):
      saved = f"step {last_saved}" if last_saved is not None else "none yet"
      raise FloatingPointError(f"{name} is {value} at step {step}; stopped before saving anything of it (the last "
                               f"checkpoint: {saved}): lower config.train.learning_rate, enable "
                               "config.train.grad_clip, or set config.train.nonfinite=skip")

  writer = MetricWriter(workdir, resume_step=start_step)
  last = {}
  tokens_per_step = train.batch_size * train.seq_len
  interval = {"sums": None, "steps": 0, "skipped": 0, "start": time.time()}
  progress = tqdm.tqdm(total=train.steps, initial=start_step, desc="train", dynamic_ncols=True,
                       mininterval=1.0, disable=jax.process_index() != 0)
  pending = None  # (step, metrics) of the step before, fetched after the next one is dispatched
  peak = None  # the devices' matmul peak (MFU), measured at the first evaluation line
  with writer, _Preemption(train.log_every) as preemption:
    for step in range(start_step + 1, train.steps + 1):
      batch = _to_device(next(loader), batch_sharding)
      if step == start_step + 1:  # compile ahead, to say what does not fit before it fails
        train_fn = train_fn.lower(state, batch, frozen).compile()
        check_memory(train_fn, mesh)
        lengths = (batch["inputs_BxL"].shape[1],
                   batch["decoder_inputs_BxL"].shape[1] if "decoder_inputs_BxL" in batch else 0)
        step_tokens = train.batch_size * sum(lengths)
        step_flops = train.batch_size * run.model.cfg.train_flops(*lengths)
      state, metrics = train_fn(state, batch, frozen)
      done = [pending] if pending else []
      pending = (step, metrics)
      preempted = preemption.at(step)
      save = step % train.checkpoint_every == 0 or step == train.steps or preempted
      if save or step % train.eval_every == 0:
        done.append(pending)
        pending = None
      for done_step, done_metrics in done:
        done_metrics = jax.device_get(done_metrics)
        grad_norm, nonfinite = float(done_metrics.pop("grad_norm")), float(done_metrics.pop("nonfinite"))
        if nonfinite and not skip:
          loss = float(done_metrics["loss_sum"] / max(done_metrics["weight_sum"], 1.0))
          check(done_step, "train/loss", loss)
          check(done_step, "train/grad_norm", grad_norm)
        sums = interval["sums"]
        interval["sums"] = done_metrics if sums is None else jax.tree.map(np.add, sums, done_metrics)
        interval["steps"] += 1
        interval["skipped"] += int(nonfinite)
        if done_step % train.log_every == 0 or done_step == train.steps or done_step % train.eval_every == 0:
          elapsed = time.time() - interval["start"]
          last = {"step": done_step, **summarize(interval["sums"], "train"), "train/grad_norm": grad_norm,
                  "train/learning_rate": float(schedule(done_step - 1)),
                  "train/tokens_per_sec": interval["steps"] * tokens_per_step / max(elapsed, 1e-9),
                  "train/tokens": done_step * step_tokens, "train/flops": done_step * step_flops,
                  "memory/peak_bytes": hardware.peak_memory_bytes()}
          if skip:
            last["train/skipped_updates"] = interval["skipped"]
          counts = loader.counts((done_step - interval["steps"]) * train.batch_size, done_step * train.batch_size)
          last.update({f"data/share/{name}": n / max(sum(counts.values()), 1) for name, n in counts.items()})
          if done_step % train.eval_every == 0 or done_step == train.steps:
            params = optimizers.eval_params(state.params, state.opt_state)  # schedule-free: x, not y
            last.update(evaluate(eval_fn, params, frozen, val_rows, train.batch_size, train.eval_batches,
                                 batch_sharding))
            check(done_step, "eval/loss", last["eval/loss"])
            last.update(extra_eval(params) if extra_eval else {})
          writer.write(last)
          if "eval/loss" in last and jax.process_index() == 0:
            peak = terminal.peak_flops(run.model.cfg.dtype) if peak is None else peak
            tqdm.tqdm.write(terminal.eval_line(last, train.steps, step_flops, tokens_per_step, peak))
          progress.set_postfix(loss=f"{last['train/loss']:.3f}",
                               tok_s=f"{last['train/tokens_per_sec']:.0f}", refresh=False)
          interval = {"sums": None, "steps": 0, "skipped": 0, "start": time.time()}
      if save:
        if not bool(_all_finite(state.params)):
          check(step, "a parameter", math.nan)
        checkpointer.save(step, state, loader.get_state())
        last_saved = step
      progress.update(1)
      if preempted and step < train.steps:
        progress.close()
        signum = preemption.signum or signal.SIGTERM  # another process's signal: a preemption
        name = "SIGINT (Ctrl-C)" if signum == signal.SIGINT else "SIGTERM"
        raise Preempted(f"{name} at step {step}: checkpoint saved in {workdir}; run the same command to resume",
                        signum)
  progress.close()
  return state, last
