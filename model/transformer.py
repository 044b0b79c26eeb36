"""Transformer blocks and the three families: decoder-only (GPT / Llama), encoder (BERT), encoder-decoder (T5).

Shape letters as in model/layers.py. Inputs follow the batch format of data/batch.py: token ids, positions
(restarting at 0 in every packed segment), segment ids (0 = padding; attention never crosses segments) and, for a
prefix LM, the prefix flags (a decoder attends bidirectionally within each segment's prefix, causally after it).
A stack reads embed -> blocks -> head; `forward` and `features` take a whole batch.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from data.batch import Batch
from model import parametrization
from model.attention import Attention, attention_mask, relative_bias, sinusoidal_embedding
from model.config import FUSED_ATTENTION_IMPLS, ConfigError, ModelConfig
from model.layers import Embed, Head, Mlp, Norm, normal, param
from model.moe import Moe
from model.sharding import constrain


# What a rematerialised block keeps for the backward pass (config.model.remat_policy), by the names the model gives
# its products (checkpoint_name, outside the mixed-precision custom VJP that hides dot_general from jax's own
# dots_saveable policies): "dense" = every kernel product, "attention_*" = the [L, S] scores and their product with v.
REMAT_POLICIES = {"full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.save_only_these_names("dense"),
                  "dots_all": jax.checkpoint_policies.save_only_these_names("dense", "attention_logits",
                                                                          "attention_out")}


class Block(nn.Module):
  """Attention, optional cross-attention, then MLP (or a mixture of experts): residual branches with pre- or
  post-normalisation."""
  cfg: ModelConfig
  cross: bool = False  # attend an encoder's output (encoder-decoder)
  deterministic: bool = True  # no dropout (an attribute, not an argument: nn.remat needs no static arguments)
  causal: bool = True  # the self-attention mask's kind, for a fused kernel (model/flash.py)
  moe: bool = False  # its MLP is a mixture of experts (model/moe.py)

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask_BxLxS, cache=None, context_BxSxD=None, context_mask_BxLxS=None,
               bias_BxHxLxS=None, segment_ids_BxL=None, valid_BxL=None):
    """Returns (x_BxLxD, this layer's updated cache or None); `cache`, the self-attention's `bias_BxHxLxS` and
    `segment_ids_BxL` (None: one sequence a row) as in Attention; `valid_BxL` (False on padding) tells a mixture of
    experts which tokens to route."""
    cfg, deterministic = self.cfg, self.deterministic
    drop = lambda y: nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
    pre = cfg.norm_position == "pre"

    def residual(name, branch):
      """x + branch(norm(x)) (pre-norm) or norm(x + branch(x)) (post-norm)."""
      norm = Norm(cfg, name=f"{name}_norm")
      return x_BxLxD + drop(branch(norm(x_BxLxD))) if pre else norm(x_BxLxD + drop(branch(x_BxLxD)))

    def self_attention(h_BxLxD):
      nonlocal cache
      y_BxLxD, cache = Attention(cfg, name="attention")(h_BxLxD, positions_BxL, mask_BxLxS, deterministic, cache,
                                                        bias_BxHxLxS=bias_BxHxLxS, segment_ids_BxL=segment_ids_BxL,
                                                        causal=self.causal)
      return y_BxLxD

    x_BxLxD = residual("attention", self_attention)
    if self.cross:
      cross_attention = Attention(cfg, name="cross_attention")
      x_BxLxD = residual("cross_attention", lambda h: cross_attention(
          h, positions_BxL, context_mask_BxLxS, deterministic, context_BxSxD=context_BxSxD)[0])
    if self.moe:
      moe = Moe(cfg, name="mlp")
      x_BxLxD = residual("mlp", lambda h_BxLxD: moe(h_BxLxD, valid_BxL))
    else:
      x_BxLxD = residual("mlp", Mlp(cfg, name="mlp"))
    return constrain(x_BxLxD, ("batch", "length", "activation_embed")), cache


class Transformer(nn.Module):
  """A stack of blocks over token embeddings: tokens [B, L] -> logits [B, L, V] (float32).

  causal=True is a GPT/Llama decoder, causal=False a BERT-style encoder (masked-LM logits). Inside an
  encoder-decoder, `shared_embed` is the common embedding and cross=True adds cross-attention to a
  context (the encoder's output, with its segment ids).
  """
  cfg: ModelConfig
  causal: bool = True
  cross: bool = False
  shared_embed: nn.Module | None = None

  @nn.compact
  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, deterministic: bool = True,
               cache=None, prefix_NxD=None, return_hidden: bool = False, context_BxSxD=None,
               context_segment_ids_BxS=None, prefix_BxL=None, hidden_BxLxD=None):
    """Logits [B, L, V]; with a `cache` (see init_cache) returns (logits, updated cache).

    With a cache the L tokens are written at slots [end, end + L) and attend every filled slot of
    their own segment: L = prompt length to prefill, then L = 1 per decoded token.
    `prefix_BxL` (a prefix LM; non-zero on a segment's leading tokens) makes a causal stack attend
    bidirectionally among those tokens; with a cache it is recorded per slot, so a prefix is written in one call.
    `prefix_NxD` (prompt tuning) prepends N embeddings to every row, in the segment of the row's first
    token, at positions 0..N-1 (the tokens' positions shift by N); the outputs cover the L tokens only.
    `return_hidden` returns the final hidden states [B, L, D] instead of logits (classification heads);
    `hidden_BxLxD` (no tokens) runs the output head alone on such states.
    """
    if hidden_BxLxD is not None:
      return Head(self.cfg, self.shared_embed or Embed(self.cfg, name="embed"))(hidden_BxLxD)
    batch, length = tokens_BxL.shape
    packed = segment_ids_BxL is not None  # else one sequence a row, which a fused kernel needs no segment ids for
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(length), (batch, length))
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones((batch, length), jnp.int32)
    num_prefix = 0 if prefix_NxD is None else prefix_NxD.shape[0]
    if num_prefix:  # the prefix joins the segment of each row's first token, at positions 0..N-1
      positions_BxL = jnp.concatenate([jnp.broadcast_to(jnp.arange(num_prefix), (batch, num_prefix)),
                                       positions_BxL + num_prefix], axis=1)
      segment_ids_BxL = jnp.concatenate([jnp.repeat(segment_ids_BxL[:, :1], num_prefix, axis=1), segment_ids_BxL],
                                        axis=1)
      if prefix_BxL is not None:  # in the bidirectional prefix when the row's first token is
        prefix_BxL = jnp.concatenate([jnp.repeat(prefix_BxL[:, :1], num_prefix, axis=1), prefix_BxL], axis=1)
    embed = self.shared_embed or Embed(self.cfg, name="embed")
    x_BxLxD = self.embed_tokens(embed, tokens_BxL, positions_BxL, prefix_NxD, deterministic)
    x_BxLxD, cache = self.blocks(x_BxLxD, positions_BxL, segment_ids_BxL, deterministic, cache, context_BxSxD,
                                 context_segment_ids_BxS, prefix_BxL, segment_ids_BxL if packed else None)
    x_BxLxD = x_BxLxD[:, num_prefix:]
    if return_hidden:
      return x_BxLxD
    logits_BxLxV = Head(self.cfg, embed)(x_BxLxD)
    return logits_BxLxV if cache is None else (logits_BxLxV, cache)

  def embed_tokens(self, embed, tokens_BxL, positions_BxL, prefix_NxD, deterministic):
    """Token embeddings (after the prompt-tuning prefix, if any) plus the position scheme's, normed and dropped."""
    cfg = self.cfg
    x_BxLxD = embed(tokens_BxL)
    if prefix_NxD is not None:
      prefix_BxNxD = jnp.broadcast_to(prefix_NxD.astype(x_BxLxD.dtype), (x_BxLxD.shape[0], *prefix_NxD.shape))
      x_BxLxD = jnp.concatenate([prefix_BxNxD, x_BxLxD], axis=1)
    if cfg.position == "learned":
      table_LxD = param(self, "position_embedding", normal(0.02), (cfg.max_len, cfg.d_model),
                        ("length", "embed"), cfg.weight_dtype)
      x_BxLxD += jnp.take(table_LxD, positions_BxL, axis=0).astype(cfg.compute_dtype)
    elif cfg.position == "sinusoidal":
      # As in "Attention Is All You Need", tokens are scaled by sqrt(D): the signal's entries are O(1) and
      # would otherwise drown the 0.02-scale token embeddings. Under µP the base's D: an input must not grow.
      x_BxLxD = x_BxLxD * jnp.sqrt(parametrization.constant_width(cfg)).astype(x_BxLxD.dtype)
      x_BxLxD += sinusoidal_embedding(positions_BxL, cfg.d_model).astype(cfg.compute_dtype)
    if cfg.embed_norm:  # BERT normalises the embedding sum
      x_BxLxD = Norm(cfg, name="embed_norm")(x_BxLxD)
    x_BxLxD = nn.Dropout(cfg.dropout)(x_BxLxD, deterministic=deterministic)
    return constrain(x_BxLxD, ("batch", "length", "activation_embed"))

  def blocks(self, x_BxLxD, positions_BxL, segment_ids_BxL, deterministic, cache, context_BxSxD,
             context_segment_ids_BxS, prefix_BxL=None, kernel_segment_ids_BxL=None):
    """The layers, with their masks and T5's relative bias; returns (x_BxLxD, updated cache or None).
    `kernel_segment_ids_BxL`: the segment ids a fused attention kernel reads (None: one sequence a row)."""
    cfg = self.cfg
    if cfg.attention_impl in FUSED_ATTENTION_IMPLS and prefix_BxL is not None and cache is None:
      raise ConfigError(f"config.model.attention_impl: {cfg.attention_impl} has no prefix-LM mask (the batch has "
                        f"prefix_BxL: objective prefix_lm or a prompt read as a prefix); use einsum")
    context_mask_BxLxS = None
    if self.cross:
      context_mask_BxLxS = attention_mask(segment_ids_BxL, context_segment_ids_BxS, causal=False)
    if cache is None:
      mask_BxLxS = attention_mask(segment_ids_BxL, segment_ids_BxL, self.causal, 0, prefix_BxL, prefix_BxL)
    else:
      end = cache["end"]
      if prefix_BxL is None:
        prefix_BxL = jnp.zeros_like(segment_ids_BxL)
      update = lambda key, new_BxL: jax.lax.dynamic_update_slice(cache[key], new_BxL.astype(jnp.int32), (0, end))
      cache = dict(cache, end=end + x_BxLxD.shape[1], segment_ids=update("segment_ids", segment_ids_BxL),
                   positions=update("positions", positions_BxL), prefix=update("prefix", prefix_BxL))
      mask_BxLxS = attention_mask(segment_ids_BxL, cache["segment_ids"], True, end, prefix_BxL, cache["prefix"])
    bias_BxHxLxS = None
    if cfg.position == "relative":  # T5: one table for the whole stack (Hugging Face keeps it in layer 0)
      table_NxH = param(self, "relative_bias", normal(0.02), (cfg.relative_buckets, cfg.num_heads),
                        (None, "heads"), cfg.weight_dtype)
      key_positions_BxS = positions_BxL if cache is None else cache["positions"]
      bias_BxHxLxS = relative_bias(table_NxH, positions_BxL, key_positions_BxS, not self.causal,
                                   cfg.relative_max_distance)
    valid_BxL = segment_ids_BxL != 0
    if cfg.scan_layers and cache is None and not self.is_initializing() and self.layers_alike():
      x_BxLxD = self.scan_blocks(x_BxLxD, positions_BxL, mask_BxLxS, deterministic, context_BxSxD,
                                 context_mask_BxLxS, bias_BxHxLxS, kernel_segment_ids_BxL, valid_BxL)
      return (Norm(cfg, name="final_norm")(x_BxLxD) if cfg.norm_position == "pre" else x_BxLxD), None
    block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy]) if cfg.remat else Block
    new_layers = []
    for i in range(cfg.num_layers):
      layer_cache = None if cache is None else dict(cache["layers"][i], end=end, positions=cache["positions"])
      x_BxLxD, layer_cache = block(cfg, self.cross, deterministic, self.causal, cfg.moe_layer(i), name=f"layer_{i}")(
          x_BxLxD, positions_BxL, mask_BxLxS, layer_cache, context_BxSxD, context_mask_BxLxS, bias_BxHxLxS,
          kernel_segment_ids_BxL, valid_BxL)
      new_layers.append(layer_cache)
    if cfg.norm_position == "pre":
      x_BxLxD = Norm(cfg, name="final_norm")(x_BxLxD)
    return x_BxLxD, None if cache is None else dict(cache, layers=tuple(new_layers))

  def layers_alike(self) -> bool:
    """Whether every collection holding layer variables holds them for every layer (LoRA on some layers only
    does not stack: those stacks run as the loop)."""
    layers = {f"layer_{i}" for i in range(self.cfg.num_layers)}
    trees = [tree for tree in self.variables.values() if layers & set(tree)]
    return all(layers <= set(tree) and len({jax.tree.structure(tree[name]) for name in layers}) == 1
               for tree in trees)

  def scan_blocks(self, x_BxLxD, positions_BxL, mask_BxLxS, deterministic, context_BxSxD, context_mask_BxLxS,
                  bias_BxHxLxS, kernel_segment_ids_BxL=None, valid_BxL=None):
    """The layers as one lax.scan over their variables stacked on the fly: the block is traced and compiled once,
    while the parameter tree keeps its `layer_i` entries (checkpoints, PEFT paths, Hugging Face maps are
    unchanged). Without dropout it equals the loop to float rounding; dropout masks differ from the loop's. A
    mixture of experts' statistics come out of the scan stacked and go into the "moe" collection by layer, as the
    loop sows them."""
    cfg = self.cfg
    stacked = {name: jax.tree.map(lambda *xs: jnp.stack(xs), *(tree[f"layer_{i}"] for i in range(cfg.num_layers)))
               for name, tree in self.variables.items() if "layer_0" in tree}
    block = Block(cfg, self.cross, deterministic, self.causal, cfg.moe_layer(0), parent=None)
    rng = None if deterministic or cfg.dropout == 0 else self.make_rng("dropout")
    sown = ["moe"] if cfg.moe_layer(0) and self.is_mutable_collection("moe") else []

    def layer(x_BxLxD, variables_and_index):
      variables, index = variables_and_index
      rngs = {} if rng is None else {"dropout": jax.random.fold_in(rng, index)}
      (x_BxLxD, _), state = block.apply(variables, x_BxLxD, positions_BxL, mask_BxLxS, None, context_BxSxD,
                                        context_mask_BxLxS, bias_BxHxLxS, kernel_segment_ids_BxL, valid_BxL,
                                        rngs=rngs, mutable=sown)
      return x_BxLxD, state.get("moe")

    if cfg.remat:
      layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    x_BxLxD, stats = jax.lax.scan(layer, x_BxLxD, (stacked, jnp.arange(cfg.num_layers)))
    for i in range(cfg.num_layers if sown else 0):
      self.put_variable("moe", f"layer_{i}", jax.tree.map(lambda x: x[i], stats))
    return x_BxLxD

  def forward(self, batch: Batch, deterministic: bool = True, prefix_NxD=None):
    """Logits [B, L, V] of a batch, for its targets_BxL."""
    return self(batch["inputs_BxL"], batch["positions_BxL"], batch["segment_ids_BxL"], deterministic,
                prefix_NxD=prefix_NxD, prefix_BxL=batch.get("prefix_BxL"))

  def features(self, batch: Batch, deterministic: bool = True, prefix_NxD=None):
    """Final hidden states [B, L, D] of a batch's inputs (what a classification head pools)."""
    return self(batch["inputs_BxL"], batch["positions_BxL"], batch["segment_ids_BxL"], deterministic,
                prefix_NxD=prefix_NxD, return_hidden=True, prefix_BxL=batch.get("prefix_BxL"))

  def forward_hidden(self, batch: Batch, deterministic: bool = True, prefix_NxD=None):
    """The final hidden states [B, L, D] that `forward` turns into logits (`head` does the rest)."""
    return self.features(batch, deterministic, prefix_NxD)

  def head(self, hidden_BxLxD):
    """Logits [B, L, V] of final hidden states: the output head alone (a loss that takes logits a piece at a time)."""
    return self(None, hidden_BxLxD=hidden_BxLxD)


class Decoder(Transformer):
  """Decoder-only language model: causal, or a prefix LM given prefix_BxL."""


class Encoder(Transformer):
  """BERT-style encoder: bidirectional attention within each packed segment."""
  causal: bool = False


class EncoderDecoder(nn.Module):
  """T5-style encoder-decoder sharing one embedding (and, if tied, the output head).

  `encode` maps inputs [B, S] to hidden states [B, S, D]; `decode` maps decoder tokens [B, L] and those
  states to logits [B, L, V] (with a `cache`, as the decoder-only model does); __call__ does both.
  """
  cfg: ModelConfig

  def setup(self):
    self.embed = Embed(self.cfg, name="embed")
    self.encoder = Encoder(self.cfg, shared_embed=self.embed, name="encoder")
    self.decoder = Decoder(self.cfg, cross=True, shared_embed=self.embed, name="decoder")

  def encode(self, inputs_BxS, positions_BxS=None, segment_ids_BxS=None, deterministic: bool = True):
    return self.encoder(inputs_BxS, positions_BxS, segment_ids_BxS, deterministic, return_hidden=True)

  def decode(self, decoder_inputs_BxL, encoded_BxSxD, segment_ids_BxS, decoder_positions_BxL=None,
             decoder_segment_ids_BxL=None, deterministic: bool = True, cache=None, return_hidden: bool = False):
    return self.decoder(decoder_inputs_BxL, decoder_positions_BxL, decoder_segment_ids_BxL, deterministic, cache,
                        context_BxSxD=encoded_BxSxD, context_segment_ids_BxS=segment_ids_BxS,
                        return_hidden=return_hidden)

  def __call__(self, inputs_BxS, positions_BxS, segment_ids_BxS, decoder_inputs_BxL, decoder_positions_BxL=None,
               decoder_segment_ids_BxL=None, deterministic: bool = True):
    if segment_ids_BxS is None:
      segment_ids_BxS = jnp.ones(inputs_BxS.shape, jnp.int32)
    encoded_BxSxD = self.encode(inputs_BxS, positions_BxS, segment_ids_BxS, deterministic)
    return self.decode(decoder_inputs_BxL, encoded_BxSxD, segment_ids_BxS, decoder_positions_BxL,
                       decoder_segment_ids_BxL, deterministic)

  def forward(self, batch: Batch, deterministic: bool = True):
    """Logits [B, L, V] of a batch's decoder stream, for its decoder_targets_BxL."""
    return self(batch["inputs_BxL"], batch["positions_BxL"], batch["segment_ids_BxL"], batch["decoder_inputs_BxL"],
                batch["decoder_positions_BxL"], batch["decoder_segment_ids_BxL"], deterministic)

  def features(self, batch: Batch, deterministic: bool = True):
    """The encoder's hidden states [B, S, D] of a batch's inputs (what a classification head pools)."""
    return self.encode(batch["inputs_BxL"], batch["positions_BxL"], batch["segment_ids_BxL"], deterministic)

  def forward_hidden(self, batch: Batch, deterministic: bool = True):
    """The decoder's final hidden states [B, L, D] that `forward` turns into logits (`head` does the rest)."""
    segment_ids_BxS = batch["segment_ids_BxL"]
    encoded_BxSxD = self.encode(batch["inputs_BxL"], batch["positions_BxL"], segment_ids_BxS, deterministic)
    return self.decode(batch["decoder_inputs_BxL"], encoded_BxSxD, segment_ids_BxS, batch["decoder_positions_BxL"],
                       batch["decoder_segment_ids_BxL"], deterministic, return_hidden=True)

  def head(self, hidden_BxLxD):
    """The decoder's output head alone: logits [B, L, V] of its final hidden states."""
    return self.decoder(None, hidden_BxLxD=hidden_BxLxD)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
  """An empty key/value cache of `max_len` slots for `batch` rows (slots with segment id 0 are empty); each slot
  also records its token's segment id, position and prefix flag."""
  kv_shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  dtype = dtype or cfg.compute_dtype
  layer = lambda: {"key": jnp.zeros(kv_shape, dtype), "value": jnp.zeros(kv_shape, dtype)}
  slots = lambda: jnp.zeros((batch, max_len), jnp.int32)
  return {"end": jnp.zeros((), jnp.int32), "segment_ids": slots(), "positions": slots(), "prefix": slots(),
          "layers": tuple(layer() for _ in range(cfg.num_layers))}
