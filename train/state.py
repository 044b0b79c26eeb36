"""TrainState, the optimizer (AdamW + warmup/cosine + clipping), a fresh state and the shardings of a state."""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from train import mesh as mesh_lib


class TrainState(struct.PyTreeNode):
  """Everything a step changes; saved whole in checkpoints."""
  step: jax.Array       # int32 scalar: optimizer steps taken
  params: Any           # parameter pytree (unboxed arrays)
  opt_state: Any        # optax state for the trainable parameters
  rng: jax.Array        # base PRNG key; step s uses fold_in(rng, s) for dropout


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup from 0 to learning_rate, cosine decay to min_learning_rate at decay_steps, then flat."""
  decay_steps = train_cfg.decay_steps or train_cfg.steps
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_cfg.learning_rate, warmup_steps=train_cfg.warmup_steps,
      decay_steps=max(decay_steps, train_cfg.warmup_steps + 1), end_value=train_cfg.min_learning_rate)


def weight_decay_mask(params):
  """Decay matrices (embeddings included, as nanoGPT does), not biases or norm scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def scale_updates(scales) -> optax.GradientTransformation:
  """Multiplies each parameter's update by its factor in `scales` (a tree of floats shaped like the parameters)."""
  def update(updates, state, params=None):
    return jax.tree.map(lambda u, factor: u * factor, updates, scales), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(train_cfg, update_scales=None) -> optax.GradientTransformation:
  """AdamW with the config's schedule, global-norm clipping, and per-parameter factors on its updates (µP's 1/m for
  hidden matrices; None: none)."""
  adamw = optax.adamw(learning_rate_schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2,
                      eps=train_cfg.eps, weight_decay=train_cfg.weight_decay, mask=weight_decay_mask)
  parts = [optax.clip_by_global_norm(train_cfg.grad_clip)] if train_cfg.grad_clip > 0 else []
  parts.append(adamw)
  if update_scales is not None:
    parts.append(scale_updates(update_scales))
  return optax.chain(*parts) if len(parts) > 1 else adamw


def fresh_state(params, tx: optax.GradientTransformation, rng) -> TrainState:
  """Step 0: `params` with a new optimizer state."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)


def state_shardings(abstract_state: TrainState, param_shardings, tx, mesh) -> TrainState:
  """Shardings of a whole TrainState from those of its parameters."""
  replicated = mesh_lib.replicated(mesh)
  return TrainState(step=replicated, params=param_shardings, rng=replicated,
                    opt_state=opt_state_shardings(tx, abstract_state.opt_state, param_shardings, mesh))


def opt_state_shardings(tx, abstract_opt_state, param_shardings, mesh):
  """Moment estimates shard like their parameters; everything else (counts) is replicated."""
  replicated = mesh_lib.replicated(mesh)
  return optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_opt_state, param_shardings,
                               transform_non_params=lambda _: replicated)
