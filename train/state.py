"""TrainState, a fresh state and the shardings of a state (the optimizer: train/optimizers.py; its schedule:
train/schedules.py)."""

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


def fresh_state(params, tx: optax.GradientTransformation, rng) -> TrainState:
  """Step 0: `params` with a new optimizer state."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)


def state_shardings(abstract_state: TrainState, param_shardings, mesh) -> TrainState:
  """Shardings of a whole TrainState from those of its parameters."""
  replicated = mesh_lib.replicated(mesh)
  return TrainState(step=replicated, params=param_shardings, rng=replicated,
                    opt_state=opt_state_shardings(abstract_state.opt_state, abstract_state.params, param_shardings,
                                                  mesh))


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, mesh):
  """A state leaf shaped like a parameter and reached by that parameter's path (a moment estimate, schedule-free's
  z) shards like it; everything else is replicated: counts, Adafactor's factored row and column moments (small)."""
  replicated = mesh_lib.replicated(mesh)
  key = lambda path: tuple(str(k) for k in path)
  params = {key(path): (x.shape, sharding) for (path, x), sharding in
            zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0], jax.tree.leaves(param_shardings))}

  def sharding(path, leaf):
    path = key(path)
    for start in range(len(path)):
      shape, found = params.get(path[start:], (None, None))
      if found is not None and shape == leaf.shape:
        return found
    return replicated
  return jax.tree_util.tree_map_with_path(sharding, abstract_opt_state)
