"""Mixture of experts (config.model.mlp = "moe"): a router sends each token to experts_per_token of num_experts
expert MLPs and adds their outputs weighted by its gates; shared experts (a dense MLP) read every token.

Routers (config.model.router):
  softmax_topk  Mixtral: softmax over the experts' logits, the top X, their probabilities renormalised to sum to 1
  sigmoid_topk  DeepSeek-V3: a sigmoid affinity per expert, the top X, their affinities normalised to sum to 1
A top-1 router keeps its expert's probability (affinity) as the gate, as the Switch Transformer does: a gate of 1
would teach the router nothing.
Auxiliary-loss-free balancing (DeepSeek-V3, config.model.moe_bias_update_rate > 0): a bias per expert, `router_bias`
[E], is added to the scores that choose the experts, never to the gates, and no gradient reaches it; the train step
moves it towards balance (train/moe.py).

How the experts compute (every pair (token, chosen expert) of the batch, sorted by expert):
  dropless (moe_capacity_factor 0): one grouped matmul per kernel over the sorted pairs: `jax.lax.ragged_dot` on
           TPU and GPU; on CPUs, whose lowering of ragged_dot multiplies every pair by every expert, `tiled`: the
           pairs in tiles of Q rows padded so that a tile holds one expert's rows, one batched product. Under a
           mesh each device sorts and computes its own rows' pairs with every expert's kernels gathered to it
           (model/sharding.by_rows): tokens stay, kernels travel
  capacity (moe_capacity_factor c > 0): each row's pairs in [E, C] slots, C = ceil(c * L * X / E) (at most L); a pair
           past its expert's C slots is dropped (counted) and the token keeps its other experts and the residual. One
           einsum over [B, E, C, D]: the layout expert parallelism moves by all-to-all (the E axis constrained to the
           mesh's expert axis, GSPMD places the collective; docs/accelerators.md)
A dropless layer routes every token alike however the batch is ordered, padded or sharded; padding tokens (segment
id 0) are routed nowhere and counted nowhere.

The layer sows its statistics into the "moe" collection as sums over the batch's tokens (`STATS`); the trainer
applies the model with mutable=["moe"] and reads them (auxiliary losses, balancing, metrics: train/moe.py);
elsewhere nothing is sown.

Letters (with model/layers.py's): T tokens (B * L), E experts, X experts a token, P pairs (T * X, or L * X a row),
C capacity slots an expert, N tiles of Q rows.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import parametrization
from model.config import ModelConfig
from model.layers import Mlp, activate, normal, param, residual_init
from model.precision import einsum, on_cpu
from model.sharding import by_rows, constrain

# What a layer sows (sums over its valid tokens): tokens, pairs per expert before drops [E], dropped pairs, the
# Switch load-balancing loss times the tokens, the sum of log(Z)^2 of the router's logits, the sum of the router's
# entropies (nats).
STATS = ("tokens", "load", "dropped", "aux_loss", "z_loss", "entropy")
EXPERT_AXES = {"wi_gate": ("expert", "embed", "mlp"), "wi_up": ("expert", "embed", "mlp"),
               "wi": ("expert", "embed", "mlp"), "wo": ("expert", "mlp", "embed")}


def route(cfg: ModelConfig, logits_TxE, bias_E, valid_T):
  """(experts_TxX int32, gates_TxX float32, probs_TxE): the chosen experts (padding tokens: E, no expert), their
  gates (0 for padding) and the router's distribution (softmax, or sigmoid affinities normalised) of each token."""
  x = cfg.experts_per_token
  if cfg.router == "softmax_topk":
    scores_TxE = jax.nn.softmax(logits_TxE, axis=-1)
    probs_TxE = scores_TxE
  else:
    scores_TxE = jax.nn.sigmoid(logits_TxE)
    probs_TxE = scores_TxE / jnp.sum(scores_TxE, axis=-1, keepdims=True)
  choice_TxE = scores_TxE if bias_E is None else scores_TxE + jax.lax.stop_gradient(bias_E)[None]
  _, experts_TxX = jax.lax.top_k(choice_TxE, x)
  chosen_TxX = jnp.take_along_axis(scores_TxE, experts_TxX, axis=-1)
  if x > 1:
    chosen_TxX = chosen_TxX / jnp.sum(chosen_TxX, axis=-1, keepdims=True)
  experts_TxX = jnp.where(valid_T[:, None], experts_TxX, cfg.num_experts).astype(jnp.int32)
  return experts_TxX, jnp.where(valid_T[:, None], chosen_TxX, 0.0), probs_TxE


def router_stats(cfg: ModelConfig, logits_TxE, probs_TxE, experts_TxX, valid_T) -> dict:
  """The sums of STATS but "dropped" over the valid tokens. The Switch loss E * sum_e f_e p_e (f_e: the share of
  pairs sent to e, p_e: e's mean probability) is 1 when the load is uniform; it is stored times the tokens, so that
  microbatches add."""
  e = cfg.num_experts
  valid_T1 = valid_T[:, None].astype(jnp.float32)
  tokens = jnp.sum(valid_T1)
  load_E = jnp.sum(jax.nn.one_hot(experts_TxX, e, dtype=jnp.float32), axis=(0, 1))  # padding's E: no column
  share_E = load_E / jnp.maximum(tokens * cfg.experts_per_token, 1.0)
  mean_prob_E = jnp.sum(probs_TxE * valid_T1, axis=0) / jnp.maximum(tokens, 1.0)
  log_z_T = jax.nn.logsumexp(logits_TxE, axis=-1)
  entropy_T = -jnp.sum(probs_TxE * jnp.log(jnp.maximum(probs_TxE, 1e-30)), axis=-1)
  valid = valid_T.astype(jnp.float32)
  return {"tokens": tokens, "load": load_E, "aux_loss": e * jnp.sum(share_E * mean_prob_E) * tokens,
          "z_loss": jnp.sum(jnp.square(log_z_T) * valid), "entropy": jnp.sum(entropy_T * valid)}


def sort_pairs(experts_PxX_flat, num_experts: int):
  """(order_P, sorted experts_P, starts_E, sizes_E) of pairs by expert (stable: a token's first choice before its
  second, earlier tokens first); padding's pairs (expert E) last and in no group."""
  order_P = jnp.argsort(experts_PxX_flat, stable=True)
  sorted_P = experts_PxX_flat[order_P]
  starts_E = jnp.searchsorted(sorted_P, jnp.arange(num_experts), side="left").astype(jnp.int32)
  ends_E = jnp.searchsorted(sorted_P, jnp.arange(num_experts), side="right").astype(jnp.int32)
  return order_P, sorted_P, starts_E, ends_E - starts_E


def tile_rows(pairs: int, num_experts: int) -> int:
  """Rows Q of a tile of the CPU path: a power of 2 near pairs / (2 E), within [8, 256] (the padding costs about
  E * Q / 2 rows; more tiles cost a copy of an expert's kernels each)."""
  target = max(pairs // (2 * num_experts), 1)
  return int(min(256, max(8, 2 ** math.floor(math.log2(target)))))


class Moe(nn.Module):
  """The mixture-of-experts MLP: x_BxLxD (and valid_BxL, False on padding) -> y_BxLxD."""
  cfg: ModelConfig
  impl: str = "auto"  # dropless compute: auto (ragged_dot; tiled on CPUs) | ragged | tiled (tests compare them)

  def kernel(self, name, d_in, d_out, init):
    cfg = self.cfg
    axes = EXPERT_AXES[name]
    init = parametrization.scale_init(cfg, init, axes)
    return param(self, name, init, (cfg.num_experts, d_in, d_out), axes, cfg.weight_dtype).astype(cfg.compute_dtype)

  def bias(self, name, width, axes):
    """A bias per expert [E, width] (config.model.use_bias), or None."""
    if not self.cfg.use_bias:
      return None
    return param(self, name + "_bias", nn.initializers.zeros, (self.cfg.num_experts, width), ("expert", axes),
                 self.cfg.weight_dtype).astype(self.cfg.compute_dtype)

  def weights(self) -> dict:
    """The experts' kernels [E, D, F] / [E, F, D] and biases [E, F] / [E, D] (None without biases)."""
    cfg = self.cfg
    d, f = cfg.d_model, cfg.mlp_dim
    names = ("wi_gate", "wi_up") if cfg.gated else ("wi",)
    w = {name: self.kernel(name, d, f, normal(0.02)) for name in names}
    w["wo"] = self.kernel("wo", f, d, residual_init(cfg))
    w.update({name + "_bias": self.bias(name, f, "mlp") for name in names})
    w["wo_bias"] = self.bias("wo", d, "embed")
    return w

  @nn.compact
  def __call__(self, x_BxLxD, valid_BxL=None):
    cfg = self.cfg
    batch, length, d = x_BxLxD.shape
    e = cfg.num_experts
    if valid_BxL is None:
      valid_BxL = jnp.ones((batch, length), bool)
    x_TxD = x_BxLxD.reshape(batch * length, d)
    valid_T = valid_BxL.reshape(-1)
    router_DxE = param(self, "router", normal(0.02), (d, e), ("embed", None), cfg.weight_dtype)
    logits_TxE = einsum("td,de->te", x_TxD, router_DxE.astype(cfg.compute_dtype), jnp.float32)
    bias_E = None
    if cfg.moe_bias_update_rate > 0:
      bias_E = param(self, "router_bias", nn.initializers.zeros, (e,), (None,), jnp.float32)
    experts_TxX, gates_TxX, probs_TxE = route(cfg, logits_TxE, bias_E, valid_T)
    stats = router_stats(cfg, logits_TxE, probs_TxE, experts_TxX, valid_T)
    w = self.weights()
    if cfg.moe_capacity_factor > 0:
      y_BxLxD, dropped = self.capacity(x_BxLxD, experts_TxX.reshape(batch, length, -1),
                                       gates_TxX.reshape(batch, length, -1), w)
    else:  # each device sorts its own rows' pairs; the experts' kernels come to it (docs/accelerators.md)
      local = lambda x_BxLxD, experts_BxLxX, gates_BxLxX, w: self.dropless(
          x_BxLxD.reshape(-1, d), experts_BxLxX.reshape(-1, cfg.experts_per_token),
          gates_BxLxX.reshape(-1, cfg.experts_per_token), w).reshape(x_BxLxD.shape)
      y_BxLxD = by_rows(local, (x_BxLxD, experts_TxX.reshape(batch, length, -1), gates_TxX.reshape(batch, length, -1)),
                        (w,))
      dropped = jnp.zeros(())
    self.sow("moe", "stats", dict(stats, dropped=dropped), init_fn=dict, reduce_fn=lambda _, new: new)
    if cfg.shared_experts:
      y_BxLxD += Mlp(cfg, mlp_dim=cfg.shared_experts * cfg.mlp_dim, name="shared")(x_BxLxD)
    return y_BxLxD

  def expert_mlp(self, x, w, product, select_bias):
    """The experts' MLP on rows x [..., D] grouped as `product(spec_in, x, kernel)` says; `select_bias(b_ExW)` gives
    each row's bias."""
    cfg = self.cfg
    add = lambda y, name: y if w[name + "_bias"] is None else y + select_bias(w[name + "_bias"]).astype(y.dtype)
    if cfg.gated:
      h = activate(cfg.activation, add(product(x, w["wi_gate"]), "wi_gate")) * add(product(x, w["wi_up"]), "wi_up")
    else:
      h = activate(cfg.activation, add(product(x, w["wi"]), "wi"))
    return add(product(h, w["wo"]), "wo")

  def dropless(self, x_TxD, experts_TxX, gates_TxX, w):
    """Every pair of the batch computed: sorted by expert, grouped matmuls, unsorted, gated and summed: y_TxD."""
    cfg = self.cfg
    tokens, x = experts_TxX.shape
    order_P, sorted_P, starts_E, sizes_E = sort_pairs(experts_TxX.T.reshape(-1), cfg.num_experts)  # choice-major
    x_PxD = jnp.take(x_TxD, order_P % tokens, axis=0)
    impl = self.impl if self.impl != "auto" else ("tiled" if on_cpu() else "ragged")
    if impl == "ragged":
      y_PxD = self.expert_mlp(x_PxD, w, lambda rows, kernel: jax.lax.ragged_dot(
          rows, kernel, sizes_E, preferred_element_type=jnp.float32).astype(cfg.compute_dtype),
          lambda b_ExW: jnp.take(b_ExW, jnp.minimum(sorted_P, cfg.num_experts - 1), axis=0))
    else:
      y_PxD = self.tiled(x_PxD, sorted_P, starts_E, sizes_E, w)
    y_PxD = jnp.where((sorted_P < cfg.num_experts)[:, None], y_PxD, 0)  # rows past the groups: padding's pairs
    inverse_P = jnp.zeros_like(order_P).at[order_P].set(jnp.arange(order_P.shape[0], dtype=order_P.dtype))
    y_XxTxD = jnp.take(y_PxD, inverse_P, axis=0).reshape(x, tokens, -1)
    return jnp.einsum("xtd,tx->td", y_XxTxD.astype(jnp.float32), gates_TxX).astype(cfg.compute_dtype)

  def tiled(self, x_PxD, sorted_P, starts_E, sizes_E, w):
    """The grouped matmuls as CPUs run them well: each expert's rows padded to whole tiles of Q rows, every tile
    multiplied by its own expert's kernels (gathered by a one-hot product, [N, D, F]); y_PxD in the sorted order."""
    cfg = self.cfg
    pairs, e = x_PxD.shape[0], cfg.num_experts
    q = tile_rows(pairs, e)
    n = -(-pairs // q) + e  # each expert wastes less than one tile
    tiles_E = -(-sizes_E // q)
    tile_ends_E = jnp.cumsum(tiles_E)
    tile_starts_E = tile_ends_E - tiles_E
    expert_N = jnp.minimum(jnp.searchsorted(tile_ends_E, jnp.arange(n), side="right"), e - 1)
    offset_NxQ = (jnp.arange(n) - tile_starts_E[expert_N])[:, None] * q + jnp.arange(q)[None]
    used_NxQ = (offset_NxQ < sizes_E[expert_N][:, None]) & (jnp.arange(n) < tile_ends_E[-1])[:, None]
    source_NxQ = jnp.where(used_NxQ, starts_E[expert_N][:, None] + offset_NxQ, 0)
    x_NxQxD = jnp.where(used_NxQ[..., None], jnp.take(x_PxD, source_NxQ, axis=0), 0)
    onehot_NxE = jax.nn.one_hot(expert_N, e, dtype=cfg.compute_dtype)
    per_tile = lambda kernel: einsum("ne,eio->nio", onehot_NxE, kernel)
    y_NxQxD = self.expert_mlp(x_NxQxD, w, lambda rows, kernel: einsum("nqi,nio->nqo", rows, per_tile(kernel)),
                              lambda b_ExW: einsum("ne,ew->nw", onehot_NxE, b_ExW)[:, None])
    expert_P = jnp.minimum(sorted_P, e - 1)
    offset_P = jnp.arange(pairs) - starts_E[expert_P]
    row_P = (tile_starts_E[expert_P] + offset_P // q) * q + offset_P % q
    return jnp.take(y_NxQxD.reshape(n * q, -1), jnp.minimum(row_P, n * q - 1), axis=0)

  def capacity(self, x_BxLxD, experts_BxLxX, gates_BxLxX, w):
    """Each row's pairs in C slots an expert ([B, E, C, D]), one einsum per kernel; (y_BxLxD, dropped pairs).
    The slots are filled and read back where the rows are (model/sharding.by_rows: each device its own rows); in
    between, the buffer's E axis moves onto the mesh's expert axis and back (two all-to-alls a direction)."""
    cfg = self.cfg
    batch, length, x = experts_BxLxX.shape
    e = cfg.num_experts
    c = min(length, math.ceil(cfg.moe_capacity_factor * length * x / e))

    def slots(experts_BxLxX):
      """(order_BxP, each sorted pair's slot e * C + rank or -1 if dropped, its row's starts_BxE, sizes_BxE)."""
      # Choice-major: a row's first choices take their slots before its second choices.
      pairs_BxP = jnp.swapaxes(experts_BxLxX, 1, 2).reshape(experts_BxLxX.shape[0], -1)
      order_BxP, sorted_BxP, starts_BxE, sizes_BxE = jax.vmap(lambda p: sort_pairs(p, e))(pairs_BxP)
      expert_BxP = jnp.minimum(sorted_BxP, e - 1)
      rank_BxP = jnp.arange(pairs_BxP.shape[1])[None] - jnp.take_along_axis(starts_BxE, expert_BxP, axis=1)
      slot_BxP = jnp.where((sorted_BxP < e) & (rank_BxP < c), expert_BxP * c + rank_BxP, -1)
      return order_BxP, slot_BxP, starts_BxE, sizes_BxE

    def dispatch(x_BxLxD, experts_BxLxX):
      """A device's rows into their slots: (x_BxExCxD, dropped pairs a row)."""
      rows = x_BxLxD.shape[0]
      order_BxP, _, starts_BxE, sizes_BxE = slots(experts_BxLxX)
      filled_BxExC = jnp.arange(c)[None, None] < sizes_BxE[..., None]
      source_BxExC = jnp.where(filled_BxExC, starts_BxE[..., None] + jnp.arange(c)[None, None], 0)
      token_BxEC = jnp.take_along_axis(order_BxP, source_BxExC.reshape(rows, -1), axis=1) % length
      x_BxExCxD = jnp.take_along_axis(x_BxLxD, token_BxEC[..., None], axis=1).reshape(rows, e, c, -1)
      dropped_B = jnp.sum(jnp.maximum(sizes_BxE - c, 0), axis=1).astype(jnp.float32)
      return jnp.where(filled_BxExC[..., None], x_BxExCxD, 0), dropped_B

    def combine(y_BxExCxD, experts_BxLxX, gates_BxLxX):
      """A device's rows back from their slots, gated and summed over the choices: y_BxLxD."""
      rows = y_BxExCxD.shape[0]
      order_BxP, slot_BxP, _, _ = slots(experts_BxLxX)
      y_sorted_BxPxD = jnp.take_along_axis(y_BxExCxD.reshape(rows, e * c, -1), jnp.maximum(slot_BxP, 0)[..., None],
                                           axis=1)
      y_sorted_BxPxD = jnp.where((slot_BxP >= 0)[..., None], y_sorted_BxPxD, 0)
      y_BxPxD = jnp.take_along_axis(y_sorted_BxPxD, jnp.argsort(order_BxP, axis=1)[..., None], axis=1)
      y_BxXxLxD = y_BxPxD.reshape(rows, x, length, -1).astype(jnp.float32)
      return jnp.einsum("bxld,blx->bld", y_BxXxLxD, gates_BxLxX).astype(cfg.compute_dtype)

    x_BxExCxD, dropped_B = by_rows(dispatch, (x_BxLxD, experts_BxLxX), ())
    buffer_axes = ("batch_no_expert", "expert", None, "activation_embed")
    x_BxExCxD = constrain(x_BxExCxD, buffer_axes)  # rows' slots -> their experts' devices
    y_BxExCxD = self.expert_mlp(x_BxExCxD, w, lambda rows, kernel: constrain(
        einsum("beci,eio->beco", rows, kernel), ("batch_no_expert", "expert", None, None)),
        lambda b_ExW: b_ExW[None, :, None])
    y_BxExCxD = constrain(constrain(y_BxExCxD, buffer_axes), ("batch", None, None, "activation_embed"))  # and back
    y_BxLxD = by_rows(combine, (y_BxExCxD, experts_BxLxX, gates_BxLxX), ())
    return constrain(y_BxLxD, ("batch", "length", "activation_embed")), jnp.sum(dropped_B)
