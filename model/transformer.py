"""Transformer blocks and the decoder-only language model (GPT / Llama style).

Shape letters as in model/layers.py. Inputs follow the batch format of data/: token ids, positions
(restarting at 0 in every packed segment) and segment ids (0 = padding; attention never crosses segments).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.attention import Attention, attention_mask, sinusoidal_embedding
from model.config import ModelConfig
from model.layers import Embed, Mlp, Norm, normal, param


class Block(nn.Module):
  """Attention then MLP, each a residual branch, with pre- or post-normalisation."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask_BxLxS, deterministic: bool = True, cache=None):
    """Returns (x_BxLxD, this layer's updated cache or None); `cache` as in Attention."""
    cfg = self.cfg
    drop = lambda y: nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
    attention = Attention(cfg, name="attention")
    mlp = Mlp(cfg, name="mlp")
    if cfg.norm_position == "pre":
      y_BxLxD, cache = attention(Norm(cfg, name="attention_norm")(x_BxLxD), positions_BxL, mask_BxLxS,
                                 deterministic, cache)
      x_BxLxD = x_BxLxD + drop(y_BxLxD)
      x_BxLxD = x_BxLxD + drop(mlp(Norm(cfg, name="mlp_norm")(x_BxLxD)))
    else:
      y_BxLxD, cache = attention(x_BxLxD, positions_BxL, mask_BxLxS, deterministic, cache)
      x_BxLxD = Norm(cfg, name="attention_norm")(x_BxLxD + drop(y_BxLxD))
      x_BxLxD = Norm(cfg, name="mlp_norm")(x_BxLxD + drop(mlp(x_BxLxD)))
    return x_BxLxD, cache


class Decoder(nn.Module):
  """Decoder-only language model: tokens [B, L] -> next-token logits [B, L, V] (float32)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, deterministic: bool = True,
               cache=None, prefix_NxD=None, return_hidden: bool = False):
    """Logits [B, L, V]; with a `cache` (see init_cache) returns (logits, updated cache).

    With a cache the L tokens are written at slots [end, end + L) and attend every filled slot of
    their own segment: L = prompt length to prefill, then L = 1 per decoded token.
    `prefix_NxD` (prompt tuning) prepends N embeddings to every row, in the segment of the row's first
    token, at positions 0..N-1 (the tokens' positions shift by N); the outputs cover the L tokens only.
    `return_hidden` returns the final hidden states [B, L, D] instead of logits (classification heads).
    """
    cfg = self.cfg
    batch, length = tokens_BxL.shape
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(length), (batch, length))
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones((batch, length), jnp.int32)
    embed = Embed(cfg, name="embed")
    x_BxLxD = embed(tokens_BxL)
    num_prefix = 0
    if prefix_NxD is not None:
      num_prefix = prefix_NxD.shape[0]
      prefix_BxNxD = jnp.broadcast_to(prefix_NxD.astype(x_BxLxD.dtype), (batch, num_prefix, cfg.d_model))
      x_BxLxD = jnp.concatenate([prefix_BxNxD, x_BxLxD], axis=1)
      positions_BxL = jnp.concatenate([jnp.broadcast_to(jnp.arange(num_prefix), (batch, num_prefix)),
                                       positions_BxL + num_prefix], axis=1)
      segment_ids_BxL = jnp.concatenate([jnp.repeat(segment_ids_BxL[:, :1], num_prefix, axis=1),
                                         segment_ids_BxL], axis=1)
      length += num_prefix
    if cfg.position == "learned":
      table_LxD = param(self, "position_embedding", normal(0.02), (cfg.max_len, cfg.d_model),
                        ("length", "embed"), cfg.weight_dtype)
      x_BxLxD += jnp.take(table_LxD, positions_BxL, axis=0).astype(cfg.compute_dtype)
    elif cfg.position == "sinusoidal":
      x_BxLxD += sinusoidal_embedding(positions_BxL, cfg.d_model).astype(cfg.compute_dtype)
    x_BxLxD = nn.Dropout(cfg.dropout)(x_BxLxD, deterministic=deterministic)

    if cache is None:
      mask_BxLxS = attention_mask(segment_ids_BxL, segment_ids_BxL, causal=True)
    else:
      end = cache["end"]
      cache = dict(cache, end=end + length,
                   segment_ids=jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids_BxL, (0, end)),
                   positions=jax.lax.dynamic_update_slice(cache["positions"], positions_BxL, (0, end)))
      mask_BxLxS = attention_mask(segment_ids_BxL, cache["segment_ids"], causal=True, q_offset=end)
    block = nn.remat(Block, static_argnums=(4,)) if cfg.remat else Block
    new_layers = []
    for i in range(cfg.num_layers):
      layer_cache = None if cache is None else dict(cache["layers"][i], end=end, positions=cache["positions"])
      x_BxLxD, layer_cache = block(cfg, name=f"layer_{i}")(x_BxLxD, positions_BxL, mask_BxLxS, deterministic,
                                                           layer_cache)
      new_layers.append(layer_cache)
    if cfg.norm_position == "pre":
      x_BxLxD = Norm(cfg, name="final_norm")(x_BxLxD)
    x_BxLxD = x_BxLxD[:, num_prefix:]
    if return_hidden:
      return x_BxLxD

    if cfg.tie_embeddings:
      logits_BxLxV = embed.attend(x_BxLxD)
    else:
      head_DxV = param(self, "lm_head", normal(0.02), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                       cfg.weight_dtype)
      logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD, head_DxV.astype(cfg.compute_dtype))
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    if cache is None:
      return logits_BxLxV
    return logits_BxLxV, dict(cache, layers=tuple(new_layers))


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
  """An empty key/value cache of `max_len` slots for `batch` rows (slots with segment id 0 are empty)."""
  kv_shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  dtype = dtype or cfg.compute_dtype
  layer = lambda: {"key": jnp.zeros(kv_shape, dtype), "value": jnp.zeros(kv_shape, dtype)}
  return {"end": jnp.zeros((), jnp.int32), "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
          "positions": jnp.zeros((batch, max_len), jnp.int32),
          "layers": tuple(layer() for _ in range(cfg.num_layers))}


def build_model(cfg: ModelConfig) -> nn.Module:
  """The module for `cfg.family` (only the decoder family exists so far)."""
  return Decoder(cfg)
