"""µP, the maximal-update parametrization for Adam (Yang et al., Tensor Programs V, 2021, table 3), beside the
standard one (`config.model.parametrization = "sp" | "mup"`).

Under µP a model of width D is described relative to a base width (`config.model.base_width`, 0 = D itself): with
m = D / base_width,
- hidden matrices (both their fan-in and fan-out grow with width: attention and MLP kernels) start at the base
  init's standard deviation / sqrt(m) and take Adam steps of learning rate / m;
- the output logits are multiplied by 1 / m (the tied embedding, or the output matrix, keeps its init and rate);
- attention logits are divided by sqrt(K) * sqrt(m), which is K / sqrt(K_base) when the head width K grows with
  D at a fixed head count (the paper's 1/K attention, equal to 1/sqrt(K) at the base);
- everything else (embeddings, biases, norms) is unchanged.
At m = 1 every factor is exactly 1: a µP model at its base width is the standard model, bit for bit. A learning
rate tuned at the base width then transfers to wider models (docs/ablations.md, section 4).
"""

import math

from model.config import ModelConfig

# Logical axes whose size grows with the model's width (a fixed head count: the head width "kv" grows). BERT's head
# transform, axes ("embed", None) so that its two dims never shard alike, counts as vector-like.
WIDTH_AXES = ("embed", "mlp", "kv")


def is_hidden(axes) -> bool:
  """A kernel whose fan-in and fan-out both grow with width ("matrix-like" in µP's terms)."""
  return sum(axis in WIDTH_AXES for axis in axes) >= 2


def scale_init(cfg: ModelConfig, init, axes):
  """The initializer of a parameter with logical `axes` whose base-width initializer is `init`."""
  if not is_hidden(axes) or cfg.width_mult == 1.0:
    return init
  factor = 1.0 / math.sqrt(cfg.width_mult)
  return lambda key, shape, dtype: init(key, shape, dtype) * factor


def update_scale(cfg: ModelConfig, axes) -> float:
  """The factor on the Adam update of a parameter with logical `axes` (1 / m for hidden matrices)."""
  return 1.0 / cfg.width_mult if is_hidden(axes) else 1.0


def output_multiplier(cfg: ModelConfig) -> float:
  """The factor on the output logits."""
  return 1.0 / cfg.width_mult


def attention_divisor(cfg: ModelConfig) -> float | None:
  """What attention logits are divided by (None: not scaled, as T5)."""
  if not cfg.scale_attention:
    return None
  return math.sqrt(cfg.head_dim) * math.sqrt(cfg.width_mult)
