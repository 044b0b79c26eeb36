"""Orbax CheckpointManager around the TrainState and the loader position (JSON); loading a trained run."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from data.tokenizer import load_tokenizer
from model.config import ModelConfig
from model.transformer import build_model
from train.state import TrainState, make_optimizer


class Checkpointer:
  """Saves {state, data} under WORKDIR/checkpoints/<step>; restores into given shardings."""

  def __init__(self, workdir: str, keep: int):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                         options=options, item_names=("state", "data"))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict) -> None:
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(data_state)))
    self.manager.wait_until_finished()

  def restore(self, step: int, state_like, shardings):
    """Returns (state, data_state) of `step`, laid out with `shardings`."""
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            state_like, shardings)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def close(self) -> None:
    self.manager.close()


def load_trained(workdir: str, step: int | None = None):
  """(config, model, params, tokenizer, step) of a run's checkpoint (default: the latest), on one device."""
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path}: no such file; --workdir must be a run directory")
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  tokenizer = load_tokenizer(workdir)
  model = build_model(ModelConfig.from_config(config.model, tokenizer.vocab_size))
  checkpointer = Checkpointer(workdir, keep=config.train.keep_checkpoints)
  steps = checkpointer.manager.all_steps()
  step = checkpointer.latest_step() if step is None else step
  if step is None or step not in steps:
    raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint for step {step} (have: {sorted(steps)})")
  tx = make_optimizer(config.train)

  def init(rng):
    params = nn.meta.unbox(model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)

  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state, _ = checkpointer.restore(step, abstract, jax.tree.map(lambda _: device, abstract))
  checkpointer.close()
  return config, model, state.params, tokenizer, step
