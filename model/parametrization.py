"""µP, the maximal-update parametrization for Adam (Yang et al., Tensor Programs V, 2021, tables 3 and 8), beside
the standard one (`config.model.parametrization = "sp" | "mup"`), and the base model's multipliers both share.

A µP model is described against its base model (`base`): the same config at d_model = config.model.base_width
(0 = d_model itself), head_dim and mlp_dim derived again where the config derives them (an explicit one stays, so it
does not grow with width). A tensor's width ratios come from its own dims: m_in = fan-in / the base's fan-in, m_out
likewise. Under µP
- hidden matrices (attention and MLP kernels, BERT's head transform) take Adam updates x 1/m_in; their init std is
  x 1/sqrt(m_in) when the fan-out grows too (table 3's hidden weights) and x 1/m_in when it does not (table 3's
  output weights: e.g. the MLP's first kernel under an explicit mlp_dim); a kernel whose fan-in does not grow is an
  input weight and keeps both;
- the readout (the tied embedding or the untied output matrix) keeps its init and rate, and the logits are
  multiplied by 1/m, m = d_model / base d_model (table 8's output weights);
- attention logits are divided by sqrt(K) * sqrt(K / K_base) = K / sqrt(K_base), the paper's 1/K attention from
  the head width's own growth (1/sqrt(K) at the base; sqrt(K) when head_dim is fixed);
- embeddings (input weights), biases and norms are unchanged, and so is every constant factor of an input or the
  readout: sinusoidal positions scale tokens by sqrt(base d_model), T5's tied logits by base d_model ** -0.5.

The base model's multipliers (config.model.mup_*), tuned at the base width as Tensor Programs V does, act under both
parametrizations (an SP model is its own base): mup_output_mult (alpha_output on the logits), mup_init_mult (the
hidden matrices' init std), mup_attn_mult (the attention logits), mup_embed_lr_mult (the updates of embeddings and
the readout), mup_vector_lr_mult (the updates of vector-like parameters: norm scales, biases), mup_zero_query (the
query kernel starts at 0, model/attention.py). At the base width every width factor is exactly 1: a µP model there
is the standard model with the same multipliers, bit for bit, and a rate tuned there transfers to wider models
(docs/ablations.md, section 5).

Offers `base`, `is_hidden`, `param_class`, `width_ratios`, `scale_init`, `update_scale`, `update_scales`,
`output_multiplier`, `attention_divisor`, `constant_width` and `standard_forward`.
"""

import math

import jax
from jax.sharding import PartitionSpec

from model.config import ModelConfig

# Logical axes whose size grows with the model's width (a fixed head count: the head width "kv" grows). BERT's head
# transform is [embed, embed_out]: two names for D, so that its two dims never shard alike.
WIDTH_AXES = ("embed", "embed_out", "mlp", "kv")
# Axes of an input or output weight's finite side: the token embedding, the position table, the untied readout.
EMBEDDING_AXES = ("vocab", "length")


def base(cfg: ModelConfig) -> ModelConfig:
  """The model at its base width (the model itself under SP or at its base width)."""
  if cfg.width_mult == 1.0:
    return cfg
  if cfg.base_model is None:
    raise ValueError("a µP ModelConfig off its base width needs its base model: build it with ModelConfig.from_config")
  return cfg.base_model


def is_hidden(axes) -> bool:
  """A kernel whose fan-in and fan-out both grow with width at the usual shapes ("matrix-like" in µP's terms)."""
  return sum(axis in WIDTH_AXES for axis in axes) >= 2


def param_class(axes) -> str:
  """µP's class of a parameter with logical `axes`: hidden | embedding (also the untied readout) | vector."""
  if is_hidden(axes):
    return "hidden"
  return "embedding" if len(axes) >= 2 and any(axis in EMBEDDING_AXES for axis in axes) else "vector"


def _axis_size(cfg: ModelConfig, axis: str) -> int:
  sizes = {"embed": cfg.d_model, "embed_out": cfg.d_model, "mlp": cfg.mlp_dim, "kv": cfg.head_dim,
           "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "vocab": cfg.vocab_size, "length": cfg.max_len}
  return sizes[axis]


def fan_axes(axes) -> tuple[tuple, tuple]:
  """(input axes, output axes) of a kernel stored [inputs..., outputs...]: a projection into the residual stream (last
  axis "embed": attention's out [H, K, D], the MLP's wo [F, D]) reads all its other axes, every other kernel its
  first (q/k/v [D, H, K], wi [D, F], the head transform [D, D]). A mixture of experts' kernels [E, ...] are E kernels:
  the "expert" axis is in neither."""
  axes = tuple(axis for axis in axes if axis != "expert")
  split = len(axes) - 1 if axes[-1] == "embed" else 1
  return axes[:split], axes[split:]


def width_ratios(cfg: ModelConfig, axes) -> tuple[float, float]:
  """(m_in, m_out): a kernel's fan-in and fan-out over its base model's (1.0, 1.0 at the base width)."""
  base_cfg = base(cfg)
  if base_cfg is cfg:
    return 1.0, 1.0
  size = lambda c, names: math.prod(_axis_size(c, name) for name in names)
  inputs, outputs = fan_axes(axes)
  return size(cfg, inputs) / size(base_cfg, inputs), size(cfg, outputs) / size(base_cfg, outputs)


def scale_init(cfg: ModelConfig, init, axes):
  """The initializer of a parameter with logical `axes` whose base-width initializer is `init`."""
  if not is_hidden(axes):
    return init
  m_in, m_out = width_ratios(cfg, axes)
  factor = cfg.mup_init_mult * (1.0 / math.sqrt(m_in) if m_out != 1.0 else 1.0 / m_in)
  if factor == 1.0:
    return init
  return lambda key, shape, dtype: init(key, shape, dtype) * factor


def update_scale(cfg: ModelConfig, axes) -> float:
  """The factor on the optimizer's update of a parameter with logical `axes`: 1 / m_in for hidden matrices, the
  class's rate multiplier for embeddings and vector-like parameters. It multiplies the update before decoupled weight
  decay is added (a per-step decay that does not fade with width, and a multiplier that moves the parameter only)."""
  kind = param_class(axes)
  if kind == "hidden":
    return 1.0 / width_ratios(cfg, axes)[0]
  return cfg.mup_embed_lr_mult if kind == "embedding" else cfg.mup_vector_lr_mult


def update_scales(cfg: ModelConfig, param_axes):
  """`update_scale` of every parameter: a tree of floats shaped like `param_axes` (PartitionSpec leaves, e.g.
  train/runs.logical_axes), or None when every factor is 1 (the optimizer then needs none)."""
  scales = jax.tree.map(lambda axes: update_scale(cfg, axes), param_axes,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))
  return None if all(factor == 1.0 for factor in jax.tree.leaves(scales)) else scales


def output_multiplier(cfg: ModelConfig) -> float:
  """The factor on the readout's input (so on the logits, before any head bias): alpha_output / m."""
  return cfg.mup_output_mult / cfg.width_mult


def attention_divisor(cfg: ModelConfig) -> float | None:
  """What attention logits are divided by (None: nothing, as T5's unscaled attention at its base)."""
  growth = cfg.head_dim / base(cfg).head_dim
  if cfg.scale_attention:
    return math.sqrt(cfg.head_dim) * math.sqrt(growth) / cfg.mup_attn_mult
  divisor = growth / cfg.mup_attn_mult  # T5 folds 1/sqrt(K) into its init: µP's 1/K leaves K / K_base here
  return None if divisor == 1.0 else divisor


def constant_width(cfg: ModelConfig) -> int:
  """The D of the model's constant factors (sinusoidal positions scale tokens by sqrt(D), T5 v1.0's tied logits by
  D ** -0.5): the base's under µP, where an input's scale and the readout's must not grow with width."""
  return base(cfg).d_model


def standard_forward(cfg: ModelConfig) -> bool:
  """Whether the model computes what a standard architecture (Hugging Face's) does with the same weights."""
  return cfg.width_mult == 1.0 and cfg.mup_output_mult == 1.0 and cfg.mup_attn_mult == 1.0
