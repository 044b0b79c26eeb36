"""Building blocks: parameter helper with logical axes, token embedding, norms, MLPs.

Shape legend (all of model/): B batch, L query length, S key length, D d_model, H query heads,
G key/value heads, R = H // G heads per group, K head dim, F mlp width, V vocab.
Logical axis names: vocab, embed, mlp, heads, kv_heads, kv, length.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig


def param(module: nn.Module, name: str, init, shape, axes, dtype):
  """Declares a parameter annotated with logical axis names (used to derive its sharding)."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def normal(stddev: float):
  return nn.initializers.normal(stddev=stddev)


def residual_init(cfg: ModelConfig):
  """GPT-2's scaled init for projections that write into the residual stream."""
  return normal(0.02 / math.sqrt(2 * cfg.num_layers))


class Embed(nn.Module):
  """Token embedding table [V, D]; `attend` reuses it as the tied output head."""
  cfg: ModelConfig

  def setup(self):
    self.table_VxD = param(self, "embedding", normal(0.02), (self.cfg.vocab_size, self.cfg.d_model),
                           ("vocab", "embed"), self.cfg.weight_dtype)

  def __call__(self, tokens_BxL):
    return jnp.take(self.table_VxD, tokens_BxL, axis=0).astype(self.cfg.compute_dtype)

  def attend(self, x_BxLxD):
    table_VxD = self.table_VxD.astype(self.cfg.compute_dtype)
    return jnp.einsum("bld,vd->blv", x_BxLxD, table_VxD)


class Norm(nn.Module):
  """LayerNorm or RMSNorm over D, computed in float32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    x = x_BxLxD.astype(jnp.float32)
    if cfg.norm == "layernorm":
      x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + cfg.norm_eps)
    x = x * param(self, "scale", nn.initializers.ones, (cfg.d_model,), ("embed",), cfg.weight_dtype)[None, None]
    if cfg.norm == "layernorm" and cfg.use_bias:
      x = x + param(self, "bias", nn.initializers.zeros, (cfg.d_model,), ("embed",), cfg.weight_dtype)[None, None]
    return x.astype(cfg.compute_dtype)


def activate(activation: str, x):
  """The pointwise non-linearity of `activation`; a gated one (swiglu, geglu) gives its gate's function."""
  if activation in ("gelu", "gelu_tanh", "geglu"):
    return nn.gelu(x, approximate=activation != "gelu")
  return nn.relu(x) if activation == "relu" else nn.silu(x)


class Mlp(nn.Module):
  """Position-wise feed-forward: GELU (exact or tanh), ReLU, or gated: SwiGLU, GeGLU (tanh GELU gate)."""
  cfg: ModelConfig

  def dense(self, name, x, shape, axes, init, spec):
    cfg = self.cfg
    w = param(self, name, init, shape, axes, cfg.weight_dtype).astype(cfg.compute_dtype)
    y = jnp.einsum(spec, x, w)
    if cfg.use_bias:
      y = y + param(self, name + "_bias", nn.initializers.zeros, shape[-1:], axes[-1:],
                    cfg.weight_dtype).astype(cfg.compute_dtype)[None, None]
    return y

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    d, f = cfg.d_model, cfg.mlp_dim
    up = ("embed", "mlp")
    if cfg.gated:
      gate_BxLxF = self.dense("wi_gate", x_BxLxD, (d, f), up, normal(0.02), "bld,df->blf")
      up_BxLxF = self.dense("wi_up", x_BxLxD, (d, f), up, normal(0.02), "bld,df->blf")
      h_BxLxF = activate(cfg.activation, gate_BxLxF) * up_BxLxF
    else:
      h_BxLxF = activate(cfg.activation, self.dense("wi", x_BxLxD, (d, f), up, normal(0.02), "bld,df->blf"))
    return self.dense("wo", h_BxLxF, (f, d), ("mlp", "embed"), residual_init(cfg), "blf,fd->bld")
