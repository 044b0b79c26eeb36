"""Orbax CheckpointManager around the TrainState and the loader position (JSON); loading a trained run;
writing a step-0 checkpoint of given parameters (an imported model)."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from data.sources import DataError
from data.tokenizer import load_tokenizer
from model.config import ModelConfig
from model.transformer import build_model, init_params
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


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config.json of a run directory."""
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path}: no such file; the workdir must be a run directory")
  with open(config_path) as f:
    return ml_collections.ConfigDict(json.load(f))


def resolve_step(workdir: str, step: int | None) -> int:
  """`step` if a checkpoint of it exists in workdir, the latest one for None (or -1)."""
  directory = os.path.join(workdir, "checkpoints")
  steps = sorted(int(name) for name in (os.listdir(directory) if os.path.isdir(directory) else [])
                 if name.isdigit())  # orbax names each finished checkpoint by its step
  chosen = steps[-1] if steps and step in (None, -1) else step
  if chosen not in steps:
    raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint for step {step} (have: {steps})")
  return chosen


def restore_state(workdir: str, step: int, abstract_state, shardings=None):
  """The TrainState saved at `step`, shaped like `abstract_state`; on the first device by default."""
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract_state)
  checkpointer = Checkpointer(workdir, keep=1 << 30)
  state, _ = checkpointer.restore(step, abstract_state, shardings)
  checkpointer.close()
  return state


def pretrained_params(workdir: str, step: int, config, model, param_shardings=None):
  """Parameters of a pretraining run's checkpoint (its optimizer state is read and dropped)."""
  tx = make_optimizer(config.train)

  def init(rng):
    params = nn.meta.unbox(init_params(model, rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)

  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = None
  if param_shardings is not None:
    replicated = jax.sharding.NamedSharding(jax.tree.leaves(param_shardings)[0].mesh, jax.sharding.PartitionSpec())
    shardings = jax.tree.map(lambda _: replicated, abstract).replace(params=param_shardings)
  return restore_state(workdir, step, abstract, shardings).params


def save_params(workdir: str, config, model, params) -> None:
  """Writes `params` as the step-0 checkpoint of a new run (fresh optimizer state, no data position), which
  every loader reads and pretraining continues from."""
  tx = make_optimizer(config.train)
  params = jax.tree.map(jnp.asarray, params)
  expected = jax.eval_shape(lambda: nn.meta.unbox(init_params(model, jax.random.PRNGKey(0))))
  if jax.tree.structure(params) != jax.tree.structure(expected):
    raise ValueError(f"{workdir}: the parameter tree does not match the model's")
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(config.train.seed))
  checkpointer = Checkpointer(workdir, keep=config.train.keep_checkpoints)
  checkpointer.save(0, state, {})
  checkpointer.close()


def run_tokenizer(workdir: str, config, required: bool = True):
  """(tokenizer, vocab size) of a run. A run imported without a tokenizer (data.tokenizer "none", e.g.
  GPT-2, whose byte-level BPE ablax does not read) records its vocab size in data.vocab_size; its
  tokenizer is None, or a DataError when `required`."""
  if config.data.get("tokenizer") != "none":
    tokenizer = load_tokenizer(workdir)
    return tokenizer, tokenizer.vocab_size
  if required:
    raise DataError(f"workdir '{workdir}': this run has no tokenizer (data.tokenizer 'none', an imported "
                    "checkpoint); feed it token ids with model.decode.generate")
  return None, config.data.vocab_size


def load_trained(workdir: str, step: int | None = None, require_tokenizer: bool = True):
  """(config, model, params, tokenizer, step) of a run's checkpoint (default: the latest), on one device.

  For a fine-tuning run the parameters are the base model's with the adapters merged in (prompt tuning
  and classification heads are not folded into a plain language model). The tokenizer is None for a run
  without one when not `require_tokenizer` (see run_tokenizer).
  """
  config = read_run_config(workdir)
  if config.get("init_from"):
    from train.finetune import load_finetuned  # finetune imports this module
    return load_finetuned(workdir, step)
  tokenizer, vocab_size = run_tokenizer(workdir, config, require_tokenizer)
  model = build_model(ModelConfig.from_config(config.model, vocab_size))
  step = resolve_step(workdir, step)
  return config, model, pretrained_params(workdir, step, config, model), tokenizer, step
