"""One home for a run: what it trains, what stays frozen, where each leaf lives, and how a saved one is loaded.

Offers `Run` (a model, its optimizer and the layout of its TrainState on a mesh), `for_model` / `pretraining` /
`finetuning` (the Run of a pretraining or fine-tuning config), `resolve_base` (a fine-tuning config pinned to its
base run), `run_tokenizer`, `load_run(workdir, step, mesh)` (used by generation, evaluation, export and
fine-tuning) and `write_initial_checkpoint` (an imported model as step 0). Every state, pretraining or
fine-tuning, is initialised straight into its shardings, which come from logical axis names: the model's for
its parameters, the PEFT method's for adapters, the task's for a classification head.
"""

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from data.sources import DataError
from data.tokenizer import Tokenizer, load_tokenizer
from model import parametrization
from model.config import EXECUTION_KEYS, ConfigError, ModelConfig
from model.families import build_model, init_params
from train import mesh as mesh_lib
from train import peft
from train import tasks
from train.checkpoint import Checkpointer, read_run_config, resolve_step
from train.cli import RunError
from train.optimizers import eval_params, make_optimizer
from train.state import TrainState, fresh_state, state_shardings

RUN_INFO = "run_info.json"  # a fine-tuning run's method, task, parameter counts and label vocabulary


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
  """A model, its optimizer and the layout of its TrainState on a mesh.

  `init_params(rng, base)` makes the trainable parameters (unboxed); `param_axes` names their logical axes.
  Fine-tuning passes `base`, the trainable base parameters read from the base run; `frozen` holds the rest, an
  input of every step that is never saved. `method` is the PEFT method (None: pretraining).
  """
  model: nn.Module
  tx: optax.GradientTransformation
  mesh: Mesh
  rules: tuple
  param_axes: Any
  init_params: Callable
  seed: int
  tokenizer: Tokenizer | None = None
  config: ml_collections.ConfigDict | None = None
  base: dict = dataclasses.field(default_factory=dict)
  frozen: dict = dataclasses.field(default_factory=dict)
  frozen_shardings: dict = dataclasses.field(default_factory=dict)
  method: peft.Method | None = None
  labels: list | None = None
  base_fingerprint: str | None = None  # fine-tuning: the base parameters' fingerprint (see `fingerprint`)

  def _fresh_state(self, rng, base) -> TrainState:
    return fresh_state(self.init_params(rng, base), self.tx, rng)

  @functools.cached_property
  def shardings(self) -> TrainState:
    """A NamedSharding for every leaf of the TrainState."""
    abstract = jax.eval_shape(self._fresh_state, jax.random.PRNGKey(self.seed), self.base)
    params = mesh_lib.logical_shardings(self.param_axes, abstract.params, self.mesh, self.rules)
    return state_shardings(abstract, params, self.mesh)

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the TrainState, nothing allocated (what a checkpoint restores into)."""
    abstract = jax.eval_shape(self._fresh_state, jax.random.PRNGKey(self.seed), self.base)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, self.shardings)

  def init_state(self) -> TrainState:
    """The step-0 TrainState, initialised directly into its shardings."""
    return jax.jit(self._fresh_state, out_shardings=self.shardings)(jax.random.PRNGKey(self.seed), self.base)

  def model_params(self, params, frozen, rng=None, deterministic: bool = True):
    """(the model.apply variables, extra model kwargs) from the trainable and frozen trees (the losses' view)."""
    if self.method is None:
      return {"params": params}, {}
    return self.method.effective(peft.combine(params["base"], frozen["base"]), params["adapters"], rng,
                                 deterministic)

  def merge(self, params) -> dict:
    """Plain model parameters with any adapters folded in (generation, evaluation, export)."""
    if self.method is None:
      return params
    return self.method.merge(peft.combine(params["base"], self.frozen["base"]), params["adapters"])


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A run restored from its checkpoint at `step`."""
  run: Run
  state: TrainState
  step: int

  @property
  def trainable(self) -> dict:
    """The trained parameters as evaluation reads them (train/optimizers.eval_params: schedule-free's x)."""
    return eval_params(self.state.params, self.state.opt_state)

  @property
  def params(self) -> dict:
    """The model's parameters, adapters merged."""
    return self.run.merge(self.trainable)


def logical_axes(model: nn.Module):
  """The logical axis names (a PartitionSpec) of every parameter of `model`."""
  return nn.get_partition_spec(jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0))))


def for_model(model: nn.Module, tx, mesh: Mesh, rules, seq_len: int = 1, seed: int = 0, **fields) -> Run:
  """The Run that trains every parameter of `model` from a fresh initialisation."""
  fresh = lambda rng, base: nn.meta.unbox(init_params(model, jax.random.fold_in(rng, 1), seq_len))
  return Run(model=model, tx=tx, mesh=mesh, rules=tuple(rules), param_axes=logical_axes(model),
             init_params=fresh, seed=seed, **fields)


def pretraining(config, mesh: Mesh, vocab_size: int, tokenizer: Tokenizer | None = None) -> Run:
  """The Run of a pretraining config (its optimizer scales updates as model/parametrization.py says: µP's hidden
  matrices, the base model's rate multipliers)."""
  model_cfg = ModelConfig.from_config(config.model, vocab_size)
  model = build_model(model_cfg)
  axes = logical_axes(model)
  scales = parametrization.update_scales(model_cfg, axes)
  return for_model(model, make_optimizer(config.train, axes, scales), mesh, mesh_lib.config_rules(config.mesh),
                   config.train.seq_len, config.train.seed, tokenizer=tokenizer, config=config)


def resolve_base(config, workdir: str | None = None) -> ml_collections.ConfigDict:
  """Reads a fine-tuning config's base run: copies its model section into config.model but for the keys of how
  the model is computed (model.config.EXECUTION_KEYS: dtype, remat, ...), which stay the fine-tuning config's; pins
  config.init_step (init_step -1: the step this run in `workdir` was built on, else the base's latest)."""
  if not config.init_from:
    raise ConfigError("config.init_from: the workdir of a pretrained run is required")
  if config.init_step < 0 and workdir and os.path.exists(os.path.join(workdir, "config.json")):
    saved = read_run_config(workdir)
    if saved.get("init_from") == config.init_from:  # else a start on another base, which may start over
      config.init_step = saved.get("init_step", -1)
  base_config = read_run_config(config.init_from)
  if base_config.get("init_from"):
    raise ConfigError(f"config.init_from: {config.init_from} is itself a fine-tuning run; give its base")
  execution = {key: config.model[key] for key in EXECUTION_KEYS if key in config.model}
  config.model.update(dict(base_config.model))
  config.model.update(execution)
  config.init_step = resolve_step(config.init_from, None if config.init_step < 0 else config.init_step)
  return base_config


def fingerprint(params) -> str:
  """SHA-256 of every parameter's path, dtype, shape and bytes: equal only for the same weights."""
  digest = hashlib.sha256()
  for path, value in sorted(traverse_util.flatten_dict(params, sep="/").items()):
    array = multihost_utils.process_allgather(value, tiled=True)
    digest.update(f"{path}:{array.dtype}:{array.shape}".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def finetuning(config, mesh: Mesh, labels: list | None, require_tokenizer: bool = True,
               base_fingerprint: str | None = None) -> Run:
  """The Run of a fine-tuning config (resolved, see resolve_base): trainable base parameters, adapters and a
  classification head (when there are `labels`) train; the base run's other parameters are frozen. A run built
  before passes the `base_fingerprint` it recorded: a base whose parameters changed since is refused."""
  base = load_run(config.init_from, config.init_step, mesh, require_tokenizer)
  found = fingerprint(base.params)  # a schedule-free base: its evaluation parameters
  if base_fingerprint is not None and found != base_fingerprint:
    raise RunError(f"config.init_from={config.init_from} step {config.init_step}: its parameters are not those "
                   f"this run was built on (fingerprint {found[:12]}, recorded {base_fingerprint[:12]}); restore "
                   "that base run, or fine-tune anew in another workdir")
  model, rules = base.run.model, base.run.rules
  method = peft.Method(config.peft, model.cfg)
  trainable_base, frozen_base = peft.split(base.params, method.base_trainable)
  trainable_axes, _ = peft.split(base.run.param_axes, method.base_trainable)
  _, frozen_shardings = peft.split(base.run.shardings.params, method.base_trainable)
  abstract_frozen = jax.eval_shape(lambda: frozen_base)
  adapters = jax.eval_shape(method.init_adapters, jax.random.PRNGKey(0), abstract_frozen)
  # Regexes that match no base parameter are a typo even when a classification head trains (a linear
  # probe is trainable=()).
  no_match = method.name == "freeze" and len(config.peft.trainable) > 0 and not jax.tree.leaves(trainable_base)
  if no_match or (method.name != "full" and not jax.tree.leaves((trainable_base, adapters)) and labels is None):
    raise ConfigError(f"config.peft.trainable: {list(config.peft.trainable)} match no parameter")
  param_axes = {"base": trainable_axes, "adapters": method.adapter_axes(base.run.param_axes)}
  if labels is not None:
    param_axes["head"] = tasks.HEAD_AXES

  def fresh(rng, trainable):
    params = {"base": trainable, "adapters": method.init_adapters(jax.random.fold_in(rng, 1), abstract_frozen)}
    if labels is not None:
      params["head"] = tasks.init_head(jax.random.fold_in(rng, 2), model.cfg.d_model, len(labels))
    return params

  return Run(model=model, tx=make_optimizer(config.train, param_axes), mesh=mesh, rules=rules, param_axes=param_axes,
             init_params=fresh, seed=config.train.seed, tokenizer=base.run.tokenizer, config=config,
             base=trainable_base, frozen={"base": frozen_base}, frozen_shardings={"base": frozen_shardings},
             method=method, labels=labels, base_fingerprint=found)


def read_run_info(workdir: str) -> dict:
  """A fine-tuning run's run_info.json: method, task, parameter counts, labels, the base's fingerprint."""
  path = os.path.join(workdir, RUN_INFO)
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise RunError(f"{path}: unreadable ({e}); a fine-tuning run needs it") from None


def run_tokenizer(workdir: str, config, required: bool = True):
  """(tokenizer, vocab size) of a run, framing texts as config.data.framing says. A run imported without a
  tokenizer (data.tokenizer "none": its Hugging Face
  directory had neither tokenizer.json nor a sentencepiece model) records its vocab size in data.vocab_size; its
  tokenizer is None, or a DataError when `required`."""
  if config.data.get("tokenizer") != "none":
    tokenizer = load_tokenizer(workdir, config.data.get("framing", ""))
    return tokenizer, tokenizer.vocab_size
  if required:
    raise DataError(f"workdir '{workdir}': this run has no tokenizer (data.tokenizer 'none', an imported "
                    "checkpoint); feed it token ids with model.decode.generate")
  return None, config.data.vocab_size


def load_run(workdir: str, step: int | None = None, mesh: Mesh | None = None, require_tokenizer: bool = True
             ) -> Loaded:
  """The run in `workdir` at `step` (default: the latest checkpoint), restored into its layout on `mesh`
  (default: the first device). A fine-tuning run brings its base run's frozen parameters."""
  config = read_run_config(workdir)
  mesh = mesh or mesh_lib.one_device_mesh()
  if config.get("init_from"):
    info = read_run_info(workdir)
    run = finetuning(config, mesh, info["labels"], require_tokenizer, info.get("base_fingerprint"))
  else:
    tokenizer, vocab_size = run_tokenizer(workdir, config, require_tokenizer)
    run = pretraining(config, mesh, vocab_size, tokenizer)
  step = resolve_step(workdir, step)
  checkpointer = Checkpointer(workdir, keep=1 << 30)
  try:
    state, _ = checkpointer.restore(step, run.abstract_state())
  finally:
    checkpointer.close()
  return Loaded(run, state, step)


def write_initial_checkpoint(workdir: str, config, params) -> None:
  """Writes `params` as the step-0 checkpoint of a new pretraining run (fresh optimizer state, no data
  position), which every loader reads and pretraining continues from."""
  run = pretraining(config, mesh_lib.one_device_mesh(), config.data.vocab_size)
  params = jax.tree.map(jnp.asarray, params)
  if jax.tree.structure(params) != jax.tree.structure(run.abstract_state().params):
    raise ValueError(f"{workdir}: the parameter tree does not match the model's")
  checkpointer = Checkpointer(workdir, keep=config.train.keep_checkpoints)
  checkpointer.save(0, fresh_state(params, run.tx, jax.random.PRNGKey(config.train.seed)), {})
  checkpointer.close()
