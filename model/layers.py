"""Building blocks: parameter helper with logical axes, `linear` (every kernel product, with an optional
low-rank LoRA branch from the "lora" collection), token embedding, norms, MLPs, the output head.

Shape legend (all of model/): B batch, L query length, S key length, D d_model, H query heads,
G key/value heads, R = H // G heads per group, K head dim, F mlp width, V vocab.
Logical axis names: vocab, embed, mlp, heads, kv_heads, kv, length; embed_out (the second D of BERT's head transform:
no rule shards it, so its two dims never shard alike).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax.ad_checkpoint import checkpoint_name

from model import parametrization
from model.config import ModelConfig
from model.precision import add_bias, einsum, gelu
from model.sharding import constrain


def param(module: nn.Module, name: str, init, shape, axes, dtype):
  """Declares a parameter annotated with logical axis names (used to derive its sharding)."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def linear(module: nn.Module, name: str, x, shape, axes, spec: str, init, contracted: int = 1, bias: bool = True,
           out_dtype=None):
  """x times the kernel `name` of `shape` (its first `contracted` dims are the inputs; `spec` is the einsum of x
  and the kernel), plus a bias over the output dims if the config has biases. Every adaptable kernel goes through
  here: when the module holds a "lora" variable `name` = {"a": [in..., r], "b": [r, out...]}, the low-rank
  branch (x A) B is added beside the frozen kernel (LoRA's scale and dropout are already folded into A).
  Products accumulate in float32 (model/precision.py); the result is `out_dtype` (default: the compute dtype)."""
  cfg = module.cfg
  init = parametrization.scale_init(cfg, init, axes)
  kernel = param(module, name, init, shape, axes, cfg.weight_dtype).astype(cfg.compute_dtype)
  # Named outside precision.einsum's custom VJP, where remat policies can see it (model/transformer.REMAT_POLICIES).
  y = checkpoint_name(einsum(spec, x, kernel, out_dtype), "dense")
  if module.has_variable("lora", name):
    ab = module.get_variable("lora", name)
    a, b = ab["a"].astype(cfg.compute_dtype), ab["b"].astype(cfg.compute_dtype)  # [in..., r], [r, out...]
    # Never A B [in..., out...]: the branch costs O(r) per token and its gradients stay low-rank. Its products are
    # plain matrices, T tokens x (in, out flattened): contracting (batch, length) in the backward pass made XLA:CPU
    # copy every output gradient transposed (slower than the dense delta this replaces), and several output dims
    # sent bfloat16 products to a CPU kernel without float32 accumulation.
    x_TxI = x.reshape(-1, math.prod(a.shape[:-1]))
    xa_TxR = einsum("ti,ir->tr", x_TxI, a.reshape(-1, a.shape[-1]))
    y = y + einsum("tr,ro->to", xa_TxR, b.reshape(b.shape[0], -1), y.dtype).reshape(y.shape)
  if bias and cfg.use_bias:
    y = add_bias(y, param(module, name + "_bias", nn.initializers.zeros, shape[contracted:], axes[contracted:],
                          cfg.weight_dtype))
  return y


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
    return einsum("bld,vd->blv", x_BxLxD, table_VxD, jnp.float32)


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


class QKNorm(nn.Module):
  """QK-norm: RMSNorm of queries or keys [B, L, N, K] before RoPE and the scores, computed in float32. Scope "head"
  normalises each head over K with a scale [K] shared by the heads (Qwen3, Gemma 3); "projection" the N * K of
  all heads at once with a scale [N * K] (OLMo-2). A scale is vector-like under µP; "projection"'s is stored flat
  (not [N, K]) so that no rule takes it for a matrix."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxNxK):
    cfg = self.cfg
    batch, length, n, k = x_BxLxNxK.shape
    # The normalised groups [B, L, M, W]: M = N heads of W = K, or M = 1 group of W = N * K.
    groups, width, axis = (n, k, "kv") if cfg.qk_norm_scope == "head" else (1, n * k, None)
    x_BxLxMxW = x_BxLxNxK.astype(jnp.float32).reshape(batch, length, groups, width)
    x_BxLxMxW *= jax.lax.rsqrt(jnp.mean(jnp.square(x_BxLxMxW), axis=-1, keepdims=True) + cfg.norm_eps)
    scale_W = param(self, "scale", nn.initializers.ones, (width,), (axis,), cfg.weight_dtype)
    x_BxLxMxW *= scale_W.astype(jnp.float32)[None, None, None]
    return x_BxLxMxW.reshape(x_BxLxNxK.shape).astype(x_BxLxNxK.dtype)


def activate(activation: str, x):
  """The pointwise non-linearity of `activation`; a gated one (swiglu, geglu) gives its gate's function."""
  if activation in ("gelu", "gelu_tanh", "geglu"):
    return gelu(x, approximate=activation != "gelu")
  return nn.relu(x) if activation == "relu" else nn.silu(x)


class Mlp(nn.Module):
  """Position-wise feed-forward: GELU (exact or tanh), ReLU, or gated: SwiGLU, GeGLU (tanh GELU gate)."""
  cfg: ModelConfig
  mlp_dim: int = 0  # its width F (0: config.model.mlp_dim; a mixture of experts' shared experts are wider)

  def dense(self, name, x, shape, axes, init, spec):
    return linear(self, name, x, shape, axes, spec, init)

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    d, f = cfg.d_model, self.mlp_dim or cfg.mlp_dim
    up = ("embed", "mlp")
    if cfg.gated:
      gate_BxLxF = self.dense("wi_gate", x_BxLxD, (d, f), up, normal(0.02), "bld,df->blf")
      up_BxLxF = self.dense("wi_up", x_BxLxD, (d, f), up, normal(0.02), "bld,df->blf")
      h_BxLxF = activate(cfg.activation, gate_BxLxF) * up_BxLxF
    else:
      h_BxLxF = activate(cfg.activation, self.dense("wi", x_BxLxD, (d, f), up, normal(0.02), "bld,df->blf"))
    h_BxLxF = constrain(h_BxLxF, ("batch", "length", "mlp"))
    return self.dense("wo", h_BxLxF, (f, d), ("mlp", "embed"), residual_init(cfg), "blf,fd->bld")


class Head(nn.Module):
  """Final hidden states [B, L, D] -> float32 logits [B, L, V]: BERT's transform (dense, activation, norm), then
  the tied embedding (T5 v1.0 rescales first) or an output matrix, then an optional vocabulary bias."""
  cfg: ModelConfig
  embed: Embed

  def setup(self):
    nn.share_scope(self, self.parent)  # its parameters keep the stack's paths (checkpoints, Hugging Face maps)

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    if cfg.head_transform:
      x_BxLxD = linear(self, "head_transform", x_BxLxD, (cfg.d_model, cfg.d_model), ("embed", "embed_out"),
                       "bld,de->ble", normal(0.02))
      x_BxLxD = Norm(cfg, name="head_norm")(activate(cfg.activation, x_BxLxD))
    if parametrization.output_multiplier(cfg) != 1.0:
      x_BxLxD *= parametrization.output_multiplier(cfg)
    if cfg.tie_embeddings:
      if cfg.scale_tied_logits:
        x_BxLxD *= parametrization.constant_width(cfg) ** -0.5
      logits_BxLxV = self.embed.attend(x_BxLxD)
    else:
      logits_BxLxV = linear(self, "lm_head", x_BxLxD, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                            "bld,dv->blv", normal(0.02), bias=False, out_dtype=jnp.float32)
    logits_BxLxV = constrain(logits_BxLxV.astype(jnp.float32), ("batch", "length", "vocab"))
    if cfg.head_bias:
      logits_BxLxV += param(self, "head_bias", nn.initializers.zeros, (cfg.vocab_size,), ("vocab",),
                            cfg.weight_dtype).astype(jnp.float32)[None, None]
    return logits_BxLxV
