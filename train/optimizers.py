"""The optimizer of a run (`config.train.optimizer`), built from optax's transforms, with its weight-decay mask and
µP's per-parameter update scales.

Every optimizer is one form, update = -lr(t) * (direction * f + weight_decay * param): global-norm clipping of
the gradient (train.grad_clip), the optimizer's direction, the parameter's factor f (model/parametrization.py's
update_scale: µP's 1 / m_in on hidden matrices, the base model's rate multipliers; 1 by default) *before* the
decoupled weight decay (so per-step decay does not fade with width), then the schedule (train/schedules.py). The
directions:

  adamw                Adam's moments (train.b1, b2, eps): optax.adamw
  lion                 the sign of interpolated momentum (train.lion_b1, lion_b2): optax.lion; its updates are
                       +-1 a coordinate, so its rates are some 3-10x below AdamW's
  adafactor            factored second moments (optax.adafactor's pieces: train.adafactor_*); update clipping,
                       optional momentum and the relative step (parameter scale) as optax builds them; the decay
                       is train.weight_decay times the learning rate, as AdamW's (optax's weight_decay_rate
                       given lr(t) * weight_decay)
  muon                 hidden matrices (attention and MLP kernels, model/parametrization.is_hidden): Nesterov
                       momentum orthogonalised by Newton-Schulz (optax.contrib.scale_by_muon); q, k, v and the
                       output projection each as one matrix ([D, H*K], [H*K, D], as Muon's reference code and
                       Moonlight do; train.muon_per_head orthogonalises each head's [D, K] instead), scaled by
                       train.muon_rms * sqrt(max(fan_in, fan_out)) (Moonlight's rule, optax's consistent_rms): the
                       update's RMS matches AdamW's typical 0.2, so one train.learning_rate serves both parts.
                       Everything else (embeddings, the output head, norms, biases) takes AdamW's direction.
                       Under µP the orthogonalised matrices take sqrt of their factor (sqrt(1 / m_in)), which
                       cancels the sqrt(m) growth of sqrt(max(fan_in, fan_out)) when both dims grow by m: their
                       update's spectral norm stays at its base-width value (the spectral condition of Yang, Simon
                       & Bernstein 2023); the AdamW part keeps its factors
  schedule_free_adamw  schedule-free AdamW (Defazio et al. 2024; optax.contrib.schedule_free around AdamW's
                       second moment, train.b1 the interpolation): the state holds z and the parameters are y;
                       evaluation, samples, export and fine-tuning read `eval_params` (x)

Weight decay (train.decay_exclude) skips the classes `param_class` reads off logical axes (µP's classes): norms
and biases, optionally embeddings. Offers `OPTIMIZERS`, `DECAY_EXCLUDE`, `param_class`, `decay_mask`,
`muon_dimension_numbers`, `make_optimizer`, `eval_params` and `check_config`.
"""

import math

import jax
import optax
from jax.sharding import PartitionSpec
from optax import contrib

from model import parametrization
from model.config import ConfigError
from train import schedules

OPTIMIZERS = ("adamw", "lion", "adafactor", "muon", "schedule_free_adamw")
DECAY_EXCLUDE = ("norms_biases", "norms_biases_embeddings", "none")
HEAD_AXES = ("heads", "kv_heads")
# Parameters µP counts as vector-like that weight decay treats as matrices unless they are one of these: the per-head
# biases of q / k / v (and IA3's scales) [H, K], T5's relative position bias table [buckets, H].
BIAS_AXES = (("heads", "kv"), ("kv_heads", "kv"), (None, "heads"))


def _is_axes(x) -> bool:
  return isinstance(x, PartitionSpec)


def param_class(axes) -> str:
  """µP's class (model/parametrization.param_class: hidden | embedding | vector), with the vector-like leaves of
  two or more dims that are no bias split off as "matrix" (LoRA factors, a classifier's kernel, prompt vectors)."""
  axes = tuple(axes)
  kind = parametrization.param_class(axes)
  if kind == "vector" and len(axes) >= 2 and axes not in BIAS_AXES:
    return "matrix"
  return kind


def decay_mask(param_axes, exclude: str):
  """True for the leaves weight decay acts on: all but those `exclude` names (norms and biases are µP's vector
  class; embeddings its embedding class: token and position tables, the untied output head)."""
  excluded = {"norms_biases": ("vector",), "norms_biases_embeddings": ("vector", "embedding"), "none": ()}[exclude]
  return jax.tree.map(lambda axes: param_class(axes) not in excluded, param_axes, is_leaf=_is_axes)


def muon_dimension_numbers(axes, per_head: bool = False) -> contrib.MuonDimensionNumbers:
  """Which axes of a hidden kernel Muon orthogonalises over: its input axes against its output axes
  (model/parametrization.fan_axes: [H, K, D] kernels contract over H and K). `per_head` makes the head axis a
  batch axis: one matrix a head."""
  axes = tuple(axes)
  n_in = len(parametrization.fan_axes(axes)[0])
  matrix = [i for i, axis in enumerate(axes) if axis != "expert"]  # an expert's kernel is a matrix of its own
  reduction, output = tuple(matrix[:n_in]), tuple(matrix[n_in:])
  if per_head:  # an axis in neither is a batch axis
    reduction = tuple(i for i in reduction if axes[i] not in HEAD_AXES)
    output = tuple(i for i in output if axes[i] not in HEAD_AXES)
  return contrib.MuonDimensionNumbers(reduction_axis=reduction, output_axis=output)


def scale_then_decay(scales, weight_decay: float, mask) -> optax.GradientTransformation:
  """Multiplies each update by its factor in `scales` (None: by 1), then adds weight_decay * param where `mask`
  is True. Its state is optax.add_decayed_weights', so AdamW's state keeps the layout of optax.adamw's."""
  decay = optax.add_decayed_weights(weight_decay, mask)

  def update(updates, state, params=None):
    if scales is not None:
      updates = jax.tree.map(lambda u, factor: u * factor, updates, scales)
    return decay.update(updates, state, params)
  return optax.GradientTransformation(decay.init, update)


def _masked_dimension_numbers(dimension_numbers):
  """Muon's dimension numbers as its partition sees the tree: optax's MaskedNode where AdamW's leaves are."""
  masked = lambda d: optax.MaskedNode() if d is None else d
  return lambda updates: jax.tree.map(masked, dimension_numbers, is_leaf=lambda d: d is None or
                                      isinstance(d, contrib.MuonDimensionNumbers))


def scale_by_consistent_rms(dimension_numbers_fn, rms: float) -> optax.GradientTransformation:
  """Multiplies each orthogonalised update by rms * sqrt(max(fan_in, fan_out)) (Moonlight's rule): an orthogonal
  [fan_in, fan_out] matrix has RMS 1 / sqrt(max(fan_in, fan_out)), so its RMS becomes `rms`."""
  def update(updates, state, params=None):
    def scale(u, numbers):
      fan_in = math.prod(u.shape[i] for i in numbers.reduction_axis)
      fan_out = math.prod(u.shape[i] for i in numbers.output_axis)
      return u * (rms * math.sqrt(max(fan_in, fan_out)))
    is_numbers = lambda x: isinstance(x, contrib.MuonDimensionNumbers)
    return jax.tree.map(scale, updates, dimension_numbers_fn(updates), is_leaf=is_numbers), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _muon_direction(train_cfg, param_axes):
  hidden = lambda axes: parametrization.is_hidden(tuple(axes))
  labels = jax.tree.map(lambda axes: "muon" if hidden(axes) else "adam", param_axes, is_leaf=_is_axes)
  numbers = jax.tree.map(lambda axes: muon_dimension_numbers(axes, train_cfg.muon_per_head) if hidden(axes)
                         else None, param_axes, is_leaf=_is_axes)
  numbers_fn = _masked_dimension_numbers(numbers)
  muon = optax.chain(
      contrib.scale_by_muon(ns_steps=train_cfg.muon_ns_steps, beta=train_cfg.muon_beta, eps=train_cfg.eps,
                            nesterov=True, weight_dimension_numbers=numbers_fn),
      scale_by_consistent_rms(numbers_fn, train_cfg.muon_rms))
  adam = optax.scale_by_adam(b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps)
  return [optax.partition({"muon": muon, "adam": adam}, labels)]


def _direction(train_cfg, param_axes) -> list:
  """The optimizer's transforms before µP's factor and the weight decay."""
  name = train_cfg.optimizer
  if name in ("adamw", "schedule_free_adamw"):
    if name == "schedule_free_adamw":  # no first moment: schedule-free's interpolation replaces it
      return [optax.scale_by_rms(decay=train_cfg.b2, eps=train_cfg.eps, eps_in_sqrt=False, bias_correction=True)]
    return [optax.scale_by_adam(b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps)]
  if name == "lion":
    return [optax.scale_by_lion(b1=train_cfg.lion_b1, b2=train_cfg.lion_b2)]
  if name == "adafactor":
    parts = [optax.scale_by_factored_rms(factored=train_cfg.adafactor_factored,
                                         decay_rate=train_cfg.adafactor_decay_rate)]
    if train_cfg.adafactor_clipping > 0:
      parts.append(optax.clip_by_block_rms(train_cfg.adafactor_clipping))
    if train_cfg.adafactor_parameter_scale:
      parts.append(optax.scale_by_param_block_rms())
    if train_cfg.adafactor_momentum > 0:
      parts.append(optax.ema(train_cfg.adafactor_momentum, debias=False))
    return parts
  return _muon_direction(train_cfg, param_axes)


def _scales(train_cfg, param_axes, update_scales):
  """µP's factors as each leaf's optimizer takes them: Muon's matrices the square root (see the docstring)."""
  if update_scales is None or train_cfg.optimizer != "muon":
    return update_scales
  return jax.tree.map(lambda axes, factor: math.sqrt(factor) if parametrization.is_hidden(tuple(axes)) else factor,
                      param_axes, update_scales, is_leaf=_is_axes)


def make_optimizer(train_cfg, param_axes, update_scales=None) -> optax.GradientTransformation:
  """The optimizer of `train_cfg` for parameters with logical axes `param_axes` (PartitionSpecs), times
  µP's per-parameter `update_scales` (a tree of floats like the parameters; None: none)."""
  check_config(train_cfg)
  schedule = schedules.learning_rate_schedule(train_cfg)
  mask = decay_mask(param_axes, train_cfg.decay_exclude)
  descent = optax.chain(*_direction(train_cfg, param_axes),
                        scale_then_decay(_scales(train_cfg, param_axes, update_scales), train_cfg.weight_decay, mask),
                        optax.scale_by_learning_rate(schedule))
  if train_cfg.optimizer == "schedule_free_adamw":
    descent = contrib.schedule_free(descent, learning_rate=schedule, b1=train_cfg.b1,
                                    weight_lr_power=train_cfg.schedule_free_weight_lr_power)
  if train_cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), descent)
  return descent


def eval_params(params, opt_state):
  """The parameters to evaluate, sample, export or fine-tune: schedule-free's x (from y and its z), else
  `params` themselves."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, contrib.ScheduleFreeState))
           if isinstance(s, contrib.ScheduleFreeState)]
  return contrib.schedule_free_eval_params(found[0], params) if found else params


def check_config(train_cfg) -> None:
  """A ConfigError naming the first optimizer or schedule key out of its range."""
  def expect(key, valid, expected):
    if not valid(train_cfg[key]):
      raise ConfigError(f"config.train.{key}: expected {expected}, got {train_cfg[key]!r}")
  expect("optimizer", lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}")
  expect("decay_exclude", lambda v: v in DECAY_EXCLUDE, f"one of {', '.join(DECAY_EXCLUDE)}")
  schedules.check_config(train_cfg)
  unit = lambda v: 0 <= v < 1
  name = train_cfg.optimizer
  if name == "lion":
    expect("lion_b1", unit, "a number in [0, 1)")
    expect("lion_b2", unit, "a number in [0, 1)")
  if name == "adafactor":
    expect("adafactor_decay_rate", lambda v: 0 < v <= 1, "a number in (0, 1]")
    expect("adafactor_clipping", lambda v: v >= 0, "a number >= 0 (0 = off)")
    expect("adafactor_momentum", unit, "a number in [0, 1) (0 = none)")
  if name == "muon":
    expect("muon_beta", unit, "a number in [0, 1)")
    expect("muon_ns_steps", lambda v: isinstance(v, int) and v >= 1, "a whole number >= 1")
    expect("muon_rms", lambda v: v > 0, "a number > 0")
  if name == "schedule_free_adamw":
    expect("b1", lambda v: 0 < v < 1, "a number in (0, 1) (schedule-free interpolates with it)")
    expect("schedule_free_weight_lr_power", lambda v: v >= 0, "a number >= 0")
    if train_cfg.get("schedule", "cosine") != "constant":
      raise ConfigError(f"config.train.schedule: schedule_free_adamw (config.train.optimizer) takes 'constant' "
                        f"(warmup, then flat: it needs no decay), got {train_cfg.schedule!r}")
