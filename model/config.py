"""ModelConfig: the model's hyperparameters as a frozen, validated dataclass built from `config.model`."""

import dataclasses
from typing import Any

import jax.numpy as jnp

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu", "geglu")
GATED = ("swiglu", "geglu")
NORMS = ("layernorm", "rmsnorm")
REMAT_POLICIES = ("full", "dots", "dots_all")
ATTENTION_IMPLS = ("einsum", "dot_product", "splash", "cudnn")
FUSED_ATTENTION_IMPLS = ("splash", "cudnn")  # model/flash.py: no attention bias, dropout or prefix-LM mask
NORM_POSITIONS = ("pre", "post")
POSITIONS = ("sinusoidal", "learned", "rope", "alibi", "relative", "none")
FAMILIES = ("decoder", "encoder", "encoder_decoder")
PARAMETRIZATIONS = ("sp", "mup")
QK_NORM_SCOPES = ("head", "projection")
MLPS = ("dense", "moe")
ROUTERS = ("softmax_topk", "sigmoid_topk")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
  """A config value a user can fix; the message names the key and what was expected."""


# How a model is computed, not what it is: a fine-tuning run takes these from its own config, the rest from its base.
EXECUTION_KEYS = ("dtype", "remat", "remat_policy", "scan_layers", "attention_impl")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of a transformer; see configs/base.py for what each one means."""
  vocab_size: int
  num_layers: int = 4
  d_model: int = 256
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 64
  mlp_dim: int = 1024
  activation: str = "gelu"
  norm: str = "layernorm"
  norm_position: str = "pre"
  norm_eps: float = 1e-5
  position: str = "learned"
  max_len: int = 1024
  rope_theta: float = 10_000.0
  relative_buckets: int = 32
  relative_max_distance: int = 128
  scale_attention: bool = True
  qk_norm: bool = False
  qk_norm_scope: str = "head"
  attention_impl: str = "einsum"
  embed_norm: bool = False
  tie_embeddings: bool = True
  scale_tied_logits: bool = False
  head_transform: bool = False
  head_bias: bool = False
  use_bias: bool = True
  dropout: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  remat_policy: str = "full"
  scan_layers: bool = False
  family: str = "decoder"
  parametrization: str = "sp"
  base_width: int = 0
  mup_output_mult: float = 1.0
  mup_init_mult: float = 1.0
  mup_attn_mult: float = 1.0
  mup_embed_lr_mult: float = 1.0
  mup_vector_lr_mult: float = 1.0
  mup_zero_query: bool = False
  mlp: str = "dense"
  num_experts: int = 8
  experts_per_token: int = 2
  moe_every: int = 1
  shared_experts: int = 0
  router: str = "softmax_topk"
  moe_capacity_factor: float = 0.0
  moe_aux_loss: float = 0.01
  router_z_loss: float = 0.0
  moe_bias_update_rate: float = 0.0
  # µP's base model (model/parametrization.py): this config at d_model = base_width with head_dim and mlp_dim derived
  # again where they were derived; set by from_config, None = the model is its own base. Not a config key.
  base_model: "ModelConfig | None" = None

  @property
  def width_mult(self) -> float:
    """µP's width multiplier m = d_model / base_width (1.0 under the standard parametrization)."""
    if self.parametrization == "sp" or not self.base_width:
      return 1.0
    return self.d_model / self.base_width

  @property
  def gated(self) -> bool:
    """A gated MLP (two input projections)."""
    return self.activation in GATED

  def moe_layer(self, index: int) -> bool:
    """Whether layer `index` (from 0) of a stack is a mixture of experts: every moe_every-th layer, the last of each
    moe_every (moe_every 2: layers 1, 3, ...)."""
    return self.mlp == "moe" and (index + 1) % self.moe_every == 0

  @property
  def num_moe_layers(self) -> int:
    """Mixture-of-experts layers a stack holds."""
    return sum(self.moe_layer(i) for i in range(self.num_layers))

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  @classmethod
  def from_config(cls, model_cfg: Any, vocab_size: int) -> "ModelConfig":
    """Builds from an ml-collections `config.model`; 0 for head_dim / num_kv_heads / mlp_dim means 'derive'."""
    known = {f.name for f in dataclasses.fields(cls)} - {"vocab_size", "base_model"}
    values = {k: v for k, v in dict(model_cfg).items() if k in known}
    unknown = sorted(set(dict(model_cfg)) - known)
    if unknown:
      raise ConfigError(f"config.model.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    cfg = cls(vocab_size=vocab_size, **cls.derive(values))
    cfg.validate()
    if cfg.width_mult != 1.0:
      base_values = cls.derive(dict(values, d_model=cfg.base_width), "config.model.base_width")
      cfg = dataclasses.replace(cfg, base_model=cls(vocab_size=vocab_size, **base_values))
    return cfg

  @classmethod
  def derive(cls, values: dict, key: str = "") -> dict:
    """`values` with head_dim / num_kv_heads / mlp_dim that are 0 (or absent) derived from d_model and num_heads;
    `key` names the config key a d_model that num_heads does not divide came from (default: d_model's)."""
    values = dict(values)
    d_model, num_heads = values.get("d_model", cls.d_model), values.get("num_heads", cls.num_heads)
    if not values.get("head_dim"):
      if num_heads <= 0 or d_model % num_heads:
        if key:
          raise ConfigError(f"{key}: num_heads={num_heads} must divide it (head_dim is derived), got {d_model}")
        raise ConfigError(f"config.model.num_heads: must divide d_model={d_model}, got {num_heads}")
      values["head_dim"] = d_model // num_heads
    if not values.get("num_kv_heads"):
      values["num_kv_heads"] = num_heads
    if not values.get("mlp_dim"):
      values["mlp_dim"] = 4 * d_model
    return values

  def validate(self) -> None:
    """Raises ConfigError naming the first inconsistent key."""
    choices = {"activation": ACTIVATIONS, "norm": NORMS, "norm_position": NORM_POSITIONS,
               "position": POSITIONS, "family": FAMILIES, "dtype": tuple(DTYPES),
               "param_dtype": tuple(DTYPES), "remat_policy": REMAT_POLICIES,
               "attention_impl": ATTENTION_IMPLS, "parametrization": PARAMETRIZATIONS,
               "qk_norm_scope": QK_NORM_SCOPES, "mlp": MLPS, "router": ROUTERS}
    for key, allowed in choices.items():
      if getattr(self, key) not in allowed:
        raise ConfigError(f"config.model.{key}: expected one of {', '.join(allowed)}, "
                          f"got {getattr(self, key)!r}")
    if not isinstance(self.qk_norm, bool):
      raise ConfigError(f"config.model.qk_norm: expected True or False, got {self.qk_norm!r}")
    for key in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim",
                "mlp_dim", "max_len", "relative_buckets", "relative_max_distance"):
      if getattr(self, key) <= 0:
        raise ConfigError(f"config.model.{key}: expected a positive integer, got {getattr(self, key)}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"config.model.num_kv_heads: must divide num_heads={self.num_heads}, "
                        f"got {self.num_kv_heads}")
    if self.position == "rope" and self.head_dim % 2:
      raise ConfigError(f"config.model.head_dim: rope needs an even head_dim, got {self.head_dim}")
    if self.position == "relative" and self.relative_buckets < 4:
      raise ConfigError(f"config.model.relative_buckets: expected at least 4, got {self.relative_buckets}")
    if self.position == "relative" and self.relative_max_distance <= self.relative_buckets // 2:
      raise ConfigError(f"config.model.relative_max_distance: must exceed relative_buckets // 2 = "
                        f"{self.relative_buckets // 2}, got {self.relative_max_distance}")
    if self.scale_tied_logits and not self.tie_embeddings:
      raise ConfigError("config.model.scale_tied_logits: needs tie_embeddings=True")
    if self.base_width < 0:
      raise ConfigError(f"config.model.base_width: expected 0 (= d_model) or a positive width, got {self.base_width}")
    for key in ("mup_output_mult", "mup_init_mult", "mup_attn_mult", "mup_embed_lr_mult", "mup_vector_lr_mult"):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ConfigError(f"config.model.{key}: expected a positive number, got {value!r}")
    if not isinstance(self.mup_zero_query, bool):
      raise ConfigError(f"config.model.mup_zero_query: expected True or False, got {self.mup_zero_query!r}")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"config.model.dropout: expected a value in [0, 1), got {self.dropout}")
    if self.attention_impl in FUSED_ATTENTION_IMPLS:
      self.validate_fused_attention()
    self.validate_experts()

  def validate_experts(self) -> None:
    """The mixture-of-experts keys (checked whatever config.model.mlp is: a typo waits for no switch)."""
    for key, low in (("num_experts", 2), ("experts_per_token", 1), ("moe_every", 1), ("shared_experts", 0)):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"config.model.{key}: expected a whole number >= {low}, got {value!r}")
    if self.experts_per_token > self.num_experts:
      raise ConfigError(f"config.model.experts_per_token: at most num_experts={self.num_experts}, "
                        f"got {self.experts_per_token}")
    for key in ("moe_capacity_factor", "moe_aux_loss", "router_z_loss", "moe_bias_update_rate"):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ConfigError(f"config.model.{key}: expected a number >= 0, got {value!r}")

  def validate_fused_attention(self) -> None:
    """A fused kernel adds no bias to the scores and drops no probabilities: those models keep einsum."""
    impl = f"config.model.attention_impl: {self.attention_impl}"
    if self.position in ("alibi", "relative"):
      raise ConfigError(f"{impl} adds no attention bias, which position={self.position} needs; use einsum")
    if self.dropout > 0:
      raise ConfigError(f"{impl} has no attention dropout (dropout={self.dropout}); use einsum or dropout=0")
    if self.attention_impl == "cudnn" and self.dtype == "float32":
      raise ConfigError(f"{impl} needs dtype bfloat16 or float16 (cuDNN's flash attention has no float32)")

  def expert_params(self, width: int = 0) -> int:
    """Parameters of one MLP of `width` (0: mlp_dim), biases included: a dense MLP, an expert or the shared one."""
    d, f = self.d_model, width or self.mlp_dim
    return d * f * (3 if self.gated else 2) + (f * (2 if self.gated else 1) + d if self.use_bias else 0)

  def mlp_params(self, index: int, active: bool = False) -> int:
    """Parameters of layer `index`'s MLP: dense, or the router, its bias, the experts (`active`: only the
    experts_per_token a token uses) and the shared experts."""
    if not self.moe_layer(index):
      return self.expert_params()
    experts = self.experts_per_token if active else self.num_experts
    router = self.d_model * self.num_experts + (self.num_experts if self.moe_bias_update_rate > 0 else 0)
    shared = self.expert_params(self.shared_experts * self.mlp_dim) if self.shared_experts else 0
    return router + experts * self.expert_params() + shared

  def num_params(self, include_embeddings: bool = True, active: bool = False) -> int:
    """Parameter count computed from the shapes (checked against the real tree in tests); `active`: a mixture of
    experts counts the experts a token uses, not all."""
    d, k = self.d_model, self.head_dim
    attn = d * k * (self.num_heads * 2 + self.num_kv_heads * 2)
    attn_bias = k * (self.num_heads + 2 * self.num_kv_heads) + d if self.use_bias else 0
    norm_size = d * (2 if self.norm == "layernorm" and self.use_bias else 1)
    if self.qk_norm:  # the scales of every attention: [K] for queries and [K] for keys, or [H * K] and [G * K]
      attn_bias += 2 * k if self.qk_norm_scope == "head" else k * (self.num_heads + self.num_kv_heads)
    layer = attn + attn_bias + 2 * norm_size
    mlps = sum(self.mlp_params(i, active) for i in range(self.num_layers))
    final_norm = norm_size if self.norm_position == "pre" else 0
    stacks = 2 if self.family == "encoder_decoder" else 1
    total = stacks * (self.num_layers * layer + mlps + final_norm)
    if self.family == "encoder_decoder":  # the decoder's cross-attention
      total += self.num_layers * (attn + attn_bias + norm_size)
    embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    if self.position == "learned":
      embeddings += stacks * self.max_len * d
    if self.position == "relative":  # one bias table per stack
      total += stacks * self.relative_buckets * self.num_heads
    if self.embed_norm:
      total += stacks * norm_size
    if self.head_transform:  # dense D -> D (+ bias) and a norm before the output projection
      total += d * d + (d if self.use_bias else 0) + norm_size
    if self.head_bias:
      total += self.vocab_size
    return total + (embeddings if include_embeddings else 0)

  def train_flops(self, length: int, target_length: int = 0) -> float:
    """Training FLOPs of one example, PaLM appendix B: 6 per weight of a matmul per token it reads (the output head
    included; biases and norms left out) plus 12 * heads * head_dim per query-key pair of every attention. A
    decoder or encoder reads `length` tokens; an encoder-decoder's encoder reads `length`, its decoder
    `target_length`, and the decoder's cross-attention projects the encoder's tokens to keys and values."""
    d, h, g, k = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim
    query_out, key_value = 2 * d * h * k, 2 * d * g * k
    # A mixture of experts counts its router and the experts a token uses (active, shared included): the FLOPs of
    # a token, whichever experts it picks.
    mlp_width = sum((self.experts_per_token + self.shared_experts) * self.mlp_dim if self.moe_layer(i)
                    else self.mlp_dim for i in range(self.num_layers))
    routers = self.num_moe_layers * d * self.num_experts
    stack = self.num_layers * (query_out + key_value) + d * mlp_width * (3 if self.gated else 2) + routers
    head = self.vocab_size * d + (d * d if self.head_transform else 0)
    pair = 12 * h * k  # scores q.k and the weighted sum of values, forward and backward
    layers = self.num_layers
    if self.family != "encoder_decoder":
      return 6 * (stack + head) * length + layers * pair * length * length
    source, target = length, target_length
    encoder = 6 * stack * source + layers * pair * source * source
    decoder = (6 * (stack + layers * query_out + head) * target + 6 * layers * key_value * source +
               layers * pair * (target * target + target * source))
    return encoder + decoder

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token of a decoder or encoder reading rows of seq_len (train_flops / seq_len)."""
    return self.train_flops(seq_len) / seq_len
