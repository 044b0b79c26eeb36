"""Learning-rate schedules (`config.train.schedule`), built from optax's: every one warms up linearly from 0 to
train.learning_rate over train.warmup_steps, then

  cosine    decays along a half cosine to train.min_learning_rate at train.decay_steps (optax's warmup cosine)
  linear    decays linearly to train.min_learning_rate at train.decay_steps
  constant  stays at train.learning_rate
  wsd       warmup-stable-decay (Hägele et al. 2024): stays at train.learning_rate, then cools down to
            train.min_learning_rate over the last train.decay_fraction of train.decay_steps, linearly or along
            1 - sqrt(t) (train.decay_shape)

and stays at its final value after train.decay_steps. train.decay_steps counts from step 0 (warmup included);
0 means the run's steps, pinned at its first start (train/workdir.py), so extending a run keeps its schedule.

A schedule is a function of the optimizer step and the config alone: a run branched from another run's
checkpoint at step S (train.branch_from) takes the branch's schedule from S on, e.g. a WSD cooldown that starts
at S. Offers `SCHEDULES`, `DECAY_SHAPES`, `learning_rate_schedule`, `decay_start` and `check_config`.
"""

import jax.numpy as jnp
import optax

from model.config import ConfigError

SCHEDULES = ("cosine", "wsd", "constant", "linear")
DECAY_SHAPES = ("linear", "sqrt")


def decay_steps(train_cfg) -> int:
  """The step at which the schedule reaches its final value (0 = the run's steps)."""
  return max(train_cfg.decay_steps or train_cfg.steps, train_cfg.warmup_steps + 1)


def decay_start(train_cfg) -> int:
  """The first step of WSD's cooldown: decay_steps minus decay_fraction of them (never inside the warmup)."""
  end = decay_steps(train_cfg)
  return max(min(end - round(train_cfg.decay_fraction * end), end - 1), train_cfg.warmup_steps)


def _cooldown(peak: float, end: float, steps: int, shape: str) -> optax.Schedule:
  """From `peak` at count 0 to `end` at count `steps`, then flat: linear, or 1 - sqrt of the progress."""
  if shape == "linear":
    return optax.linear_schedule(peak, end, steps)
  def sqrt_cooldown(count):
    progress = jnp.clip(count / max(steps, 1), 0.0, 1.0)
    return end + (peak - end) * (1.0 - jnp.sqrt(progress))
  return sqrt_cooldown


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """The learning rate of each optimizer step (optax counts from 0: the update of step s uses schedule(s - 1))."""
  check_config(train_cfg)
  peak, low, warmup, end = (train_cfg.learning_rate, train_cfg.min_learning_rate, train_cfg.warmup_steps,
                            decay_steps(train_cfg))
  name = train_cfg.get("schedule", "cosine")
  if name == "cosine":  # the schedule of runs made before train.schedule existed, unchanged
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak, warmup_steps=warmup,
                                              decay_steps=end, end_value=low)
  warm = optax.linear_schedule(0.0, peak, warmup)
  if name == "constant":
    return optax.join_schedules([warm, optax.constant_schedule(peak)], [warmup])
  if name == "linear":
    return optax.join_schedules([warm, optax.linear_schedule(peak, low, end - warmup)], [warmup])
  start = decay_start(train_cfg)
  return optax.join_schedules(
      [warm, optax.constant_schedule(peak), _cooldown(peak, low, end - start, train_cfg.decay_shape)],
      [warmup, start])


def check_config(train_cfg) -> None:
  """A ConfigError naming the first schedule key out of its range."""
  name = train_cfg.get("schedule", "cosine")
  if name not in SCHEDULES:
    raise ConfigError(f"config.train.schedule: expected one of {', '.join(SCHEDULES)}, got {name!r}")
  if name == "wsd":
    if not 0 < train_cfg.decay_fraction <= 1:
      raise ConfigError(f"config.train.decay_fraction: expected a share of the steps in (0, 1], got "
                        f"{train_cfg.decay_fraction!r}")
    if train_cfg.decay_shape not in DECAY_SHAPES:
      raise ConfigError(f"config.train.decay_shape: expected one of {', '.join(DECAY_SHAPES)}, got "
                        f"{train_cfg.decay_shape!r}")
