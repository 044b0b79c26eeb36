"""Attention: masks (causal, bidirectional, prefix LM), positional schemes (sinusoidal, RoPE, ALiBi, T5's
relative bias) and multi-head / grouped-query attention, its core computed by explicit products (`einsum`), by
`jax.nn.dot_product_attention` (`dot_product`) or by a fused kernel of model/flash.py (`splash` on TPU, `cudnn` on
GPU), as config.model.attention_impl says.

Shape letters as in model/layers.py. Masks are booleans (True = may attend) applied with `where`;
softmax runs in float32.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from model import flash
from model.config import FUSED_ATTENTION_IMPLS, ModelConfig
from model.layers import QKNorm, linear, normal, residual_init
from model.parametrization import attention_divisor
from model.precision import einsum, softmax
from model.sharding import constrain


def attention_mask(q_segment_BxL, k_segment_BxS, causal: bool, q_offset=0, q_prefix_BxL=None, k_prefix_BxS=None):
  """True where query l may attend key s: same non-zero segment and, if causal, s <= q_offset + l or both
  l and s in the prefix (non-zero q_prefix / k_prefix: a prefix LM, bidirectional within a segment's prefix).

  q_offset is the slot of the first query among the keys (non-zero when decoding into a cache).
  """
  mask_BxLxS = (q_segment_BxL[:, :, None] == k_segment_BxS[:, None, :]) & (k_segment_BxS[:, None, :] != 0)
  if causal:
    length, keys = q_segment_BxL.shape[1], k_segment_BxS.shape[1]
    allowed_BxLxS = (q_offset + jnp.arange(length)[:, None] >= jnp.arange(keys)[None, :])[None]
    if q_prefix_BxL is not None:
      allowed_BxLxS = allowed_BxLxS | ((q_prefix_BxL[:, :, None] != 0) & (k_prefix_BxS[:, None, :] != 0))
    mask_BxLxS &= allowed_BxLxS
  return mask_BxLxS


def sinusoidal_embedding(positions_BxL, d_model: int, max_timescale: float = 10_000.0):
  """Fixed sin/cos position embedding of 'Attention Is All You Need' [B, L, D] (sin half, then cos half)."""
  half = d_model // 2
  inv_freq_half = jnp.exp(-math.log(max_timescale) * jnp.arange(half) / max(half - 1, 1))
  angles_BxLxhalf = positions_BxL[..., None].astype(jnp.float32) * inv_freq_half[None, None]
  emb = jnp.concatenate([jnp.sin(angles_BxLxhalf), jnp.cos(angles_BxLxhalf)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, 0), (0, d_model - 2 * half)))


def apply_rope(x_BxLxNxK, positions_BxL, theta: float):
  """Rotary embedding, rotate-half convention (as in Hugging Face Llama)."""
  half = x_BxLxNxK.shape[-1] // 2
  inv_freq_half = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_BxLx1xhalf = (positions_BxL[..., None].astype(jnp.float32) * inv_freq_half[None, None])[:, :, None, :]
  sin, cos = jnp.sin(angles_BxLx1xhalf), jnp.cos(angles_BxLx1xhalf)
  x = x_BxLxNxK.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxLxNxK.dtype)


def alibi_slopes(num_heads: int):
  """Per-head ALiBi slopes (Press et al. 2022), including the non-power-of-two rule. [H]"""
  def powers(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]
  closest = 2 ** math.floor(math.log2(num_heads))
  slopes = powers(closest)
  if closest < num_heads:
    slopes += powers(2 * closest)[0::2][: num_heads - closest]
  return jnp.asarray(slopes, jnp.float32)


def alibi_bias(num_heads: int, q_positions_BxL, k_positions_BxS):
  """ALiBi's additive attention bias [B, H, L, S]: minus each head's slope times |query - key position|."""
  distance_BxLxS = jnp.abs(q_positions_BxL[:, :, None] - k_positions_BxS[:, None, :]).astype(jnp.float32)
  return -alibi_slopes(num_heads)[None, :, None, None] * distance_BxLxS[:, None]


def relative_position_bucket(relative, bidirectional: bool, num_buckets: int, max_distance: int):
  """T5's bucket of each key - query offset: one bucket per distance below half the buckets, then
  logarithmically wider ones up to max_distance (farther offsets share the last bucket).

  Bidirectional (encoder): keys after the query get the upper half of the buckets. Causal (decoder): keys
  after the query, never attended, fall into bucket 0.
  """
  bucket = jnp.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    bucket = jnp.where(relative > 0, num_buckets, 0)
    distance = jnp.abs(relative)
  else:
    distance = jnp.maximum(-relative, 0)
  exact = num_buckets // 2
  # Float32 as in T5 (Mesh TensorFlow, Hugging Face): the bucket edges at 16, 32, 64 stay exact.
  log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact) / math.log(max_distance / exact)
  far = exact + (log_ratio * (num_buckets - exact)).astype(relative.dtype)
  return bucket + jnp.where(distance < exact, distance, jnp.minimum(far, num_buckets - 1))


def relative_bias(table_NxH, q_positions_BxL, k_positions_BxS, bidirectional: bool, max_distance: int):
  """Additive attention bias [B, H, L, S] looked up from a table of N buckets by key - query position."""
  relative_BxLxS = k_positions_BxS[:, None, :] - q_positions_BxL[:, :, None]
  bucket_BxLxS = relative_position_bucket(relative_BxLxS, bidirectional, table_NxH.shape[0], max_distance)
  return jnp.take(table_NxH.astype(jnp.float32), bucket_BxLxS, axis=0).transpose(0, 3, 1, 2)


def einsum_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxLxS, bias_BxHxLxS, divisor: float | None, dropout):
  """Attention of L queries to S keys as explicit products: float32 logits (bf16 products accumulated in
  float32) divided by `divisor` (None: not scaled) and softmax; `dropout` acts on the probabilities.
  Returns [B, L, H, K]."""
  batch, length, h, k = q_BxLxHxK.shape
  g = k_BxSxGxK.shape[2]
  q_BxLxGxRxK = q_BxLxHxK.reshape(batch, length, g, h // g, k)
  logits_BxGxRxLxS = checkpoint_name(einsum("blgrk,bsgk->bgrls", q_BxLxGxRxK, k_BxSxGxK, jnp.float32),
                                     "attention_logits")
  if divisor is not None:
    logits_BxGxRxLxS /= divisor
  if bias_BxHxLxS is not None:
    logits_BxGxRxLxS += bias_BxHxLxS.reshape(batch, g, h // g, *bias_BxHxLxS.shape[2:])
  logits_BxGxRxLxS = jnp.where(mask_BxLxS[:, None, None], logits_BxGxRxLxS, jnp.finfo(jnp.float32).min)
  probs_BxGxRxLxS = dropout(softmax(logits_BxGxRxLxS).astype(q_BxLxHxK.dtype))
  out_BxLxGxRxK = checkpoint_name(einsum("bgrls,bsgk->blgrk", probs_BxGxRxLxS, v_BxSxGxK), "attention_out")
  return out_BxLxGxRxK.reshape(batch, length, h, k)


def dot_product_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxLxS, bias_BxHxLxS, divisor: float | None):
  """The same through jax.nn.dot_product_attention, without dropout: float32 logits and softmax, bf16 q/k/v passed
  as they are. `implementation=None` leaves the kernel to JAX (jax 0.10 takes its XLA path on every backend)."""
  return jax.nn.dot_product_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, bias=bias_BxHxLxS,
                                      mask=mask_BxLxS[:, None], scale=1.0 / (divisor or 1.0),
                                      implementation=None)


class Attention(nn.Module):
  """Multi-head attention with G <= H key/value heads (G == H: MHA, G == 1: MQA)."""
  cfg: ModelConfig

  def project(self, name, x, shape, axes, spec, init, contracted: int = 1):
    return linear(self, name, x, shape, axes, spec, init, contracted)

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask_BxLxS, deterministic: bool = True, cache=None,
               context_BxSxD=None, bias_BxHxLxS=None, segment_ids_BxL=None, causal: bool | None = None):
    """Attends the L queries to S keys: the L new ones, or with `cache` the S slots of the cache.

    `cache` holds this layer's "key" / "value" [B, S, G, K], the write offset "end" and the
    key "positions" [B, S] (already holding the new ones). Returns (y_BxLxD, updated cache or None).
    With `context_BxSxD` (cross-attention) keys and values come from the context, without positions.
    `bias_BxHxLxS` (T5's relative position bias) is added to the attention logits.
    `causal` (True / False) says that `mask_BxLxS` is just the segment mask of `segment_ids_BxL` (None: one
    sequence a row), causal or not: then a fused kernel may compute it from those (config.model.attention_impl).
    """
    cfg = self.cfg
    d, h, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    init = normal(0.02)
    source_BxSxD = x_BxLxD if context_BxSxD is None else context_BxSxD
    # mup_zero_query: every query 0 at init, so attention starts uniform (Tensor Programs V's suggestion under µP).
    query_init = nn.initializers.zeros if cfg.mup_zero_query else init
    q_BxLxHxK = self.project("query", x_BxLxD, (d, h, k), ("embed", "heads", "kv"), "bld,dhk->blhk", query_init)
    k_BxLxGxK = self.project("key", source_BxSxD, (d, g, k), ("embed", "kv_heads", "kv"), "bld,dgk->blgk", init)
    v_BxLxGxK = self.project("value", source_BxSxD, (d, g, k), ("embed", "kv_heads", "kv"), "bld,dgk->blgk", init)
    q_BxLxHxK = constrain(q_BxLxHxK, ("batch", "length", "heads", "kv"))
    k_BxLxGxK = constrain(k_BxLxGxK, ("batch", "length", "kv_heads", "kv"))
    v_BxLxGxK = constrain(v_BxLxGxK, ("batch", "length", "kv_heads", "kv"))
    if cfg.qk_norm:  # before RoPE, as Qwen3 and OLMo-2; the cache holds normalised keys
      q_BxLxHxK = QKNorm(cfg, name="query_norm")(q_BxLxHxK)
      k_BxLxGxK = QKNorm(cfg, name="key_norm")(k_BxLxGxK)
    positioned = context_BxSxD is None  # cross-attention: no positional scheme, no self-attention cache
    if positioned and cfg.position == "rope":
      q_BxLxHxK = apply_rope(q_BxLxHxK, positions_BxL, cfg.rope_theta)
      k_BxLxGxK = apply_rope(k_BxLxGxK, positions_BxL, cfg.rope_theta)

    key_positions_BxS = positions_BxL
    k_BxSxGxK, v_BxSxGxK = k_BxLxGxK, v_BxLxGxK
    if cache is not None:
      start = (0, cache["end"], 0, 0)
      k_BxSxGxK = jax.lax.dynamic_update_slice(cache["key"], k_BxLxGxK.astype(cache["key"].dtype), start)
      v_BxSxGxK = jax.lax.dynamic_update_slice(cache["value"], v_BxLxGxK.astype(cache["value"].dtype), start)
      key_positions_BxS = cache["positions"]
      cache = {"key": k_BxSxGxK, "value": v_BxSxGxK}
      k_BxSxGxK, v_BxSxGxK = k_BxSxGxK.astype(cfg.compute_dtype), v_BxSxGxK.astype(cfg.compute_dtype)

    if positioned and cfg.position == "alibi":  # never with T5's bias: a model has one positional scheme
      bias_BxHxLxS = alibi_bias(h, positions_BxL, key_positions_BxS)
    # A fused kernel computes self-attention without a cache: decoding writes L = 1 query a step (or a prompt) into
    # the cache, whose [L, S] scores are small, and its mask covers only the filled slots. Cross-attention, a
    # bias, a prefix LM (refused in model/transformer.py) and dropout (refused by ModelConfig) take einsum.
    fused = causal is not None and cache is None and positioned and bias_BxHxLxS is None
    if fused and cfg.attention_impl in FUSED_ATTENTION_IMPLS:
      kernel = flash.splash_attention if cfg.attention_impl == "splash" else flash.cudnn_attention
      out_BxLxHxK = kernel(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, segment_ids_BxL, causal, attention_divisor(cfg))
    # jax.nn.dot_product_attention has no dropout: training with attention dropout takes the einsum path.
    elif cfg.attention_impl == "dot_product" and (deterministic or cfg.dropout == 0.0):
      out_BxLxHxK = dot_product_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxLxS, bias_BxHxLxS,
                                          attention_divisor(cfg))
    else:
      dropout = functools.partial(nn.Dropout(cfg.dropout), deterministic=deterministic)
      out_BxLxHxK = einsum_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxLxS, bias_BxHxLxS,
                                     attention_divisor(cfg), dropout)
    y_BxLxD = self.project("out", out_BxLxHxK, (h, k, d), ("heads", "kv", "embed"), "blhk,hkd->bld",
                           residual_init(cfg), contracted=2)
    return y_BxLxD, cache
