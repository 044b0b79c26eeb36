"""Mixture of experts (model/moe.py, train/moe.py): the dropless layer (ragged_dot, and the tiled form CPUs run)
equals a reference that runs every expert on every token and masks, in values and gradients; permuting the
tokens or adding padding changes no token's output; capacity drops are the pairs past C, counted, and a large
capacity equals dropless; the routers' gates; parameter and FLOP counts; scan == loop; cached == full.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ConfigError, ModelConfig
from model.families import build_model, init_params
from model.layers import Mlp, activate
from model.moe import Moe, route
from test_generate import cached_logits


def moe_cfg(**changes):
  cfg = ModelConfig(vocab_size=41, num_layers=2, d_model=16, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=12,
                    max_len=64, position="rope", mlp="moe", num_experts=4, experts_per_token=2)
  cfg = dataclasses.replace(cfg, **changes)
  cfg.validate()
  return cfg


def perturbed(params, seed=0, scale=0.3):
  """Parameters moved off their init (biases non-zero, a router that prefers some experts)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def layer_params(cfg, seed=0):
  x_BxLxD = jnp.zeros((1, 4, cfg.d_model))
  return perturbed(nn.meta.unbox(Moe(cfg).init(jax.random.key(seed), x_BxLxD)["params"]), seed)


def reference(cfg, params, x_BxLxD, valid_BxL):
  """Every expert on every token ([E, T, F]), weighted by a gate that is 0 off the token's top X: the experts
  chosen by a full sort of the scores (+ the balancing bias), the gates renormalised over them (top-1: the
  probability)."""
  x_TxD = x_BxLxD.reshape(-1, cfg.d_model)
  logits_TxE = x_TxD @ params["router"]
  scores_TxE = jax.nn.softmax(logits_TxE) if cfg.router == "softmax_topk" else jax.nn.sigmoid(logits_TxE)
  choice_TxE = scores_TxE + jax.lax.stop_gradient(params.get("router_bias", jnp.zeros(cfg.num_experts)))[None]
  rank_TxE = jnp.argsort(jnp.argsort(-choice_TxE, axis=-1), axis=-1)
  chosen_TxE = jnp.where(rank_TxE < cfg.experts_per_token, scores_TxE, 0.0)
  if cfg.experts_per_token > 1:
    chosen_TxE = chosen_TxE / jnp.sum(chosen_TxE, axis=-1, keepdims=True)
  gates_TxE = chosen_TxE * valid_BxL.reshape(-1, 1)
  bias = lambda name: params.get(name + "_bias", jnp.zeros(params[name].shape[::2]))[:, None]
  up = lambda name: jnp.einsum("td,edf->etf", x_TxD, params[name]) + bias(name)
  if cfg.gated:
    h_ExTxF = activate(cfg.activation, up("wi_gate")) * up("wi_up")
  else:
    h_ExTxF = activate(cfg.activation, up("wi"))
  y_ExTxD = jnp.einsum("etf,efd->etd", h_ExTxF, params["wo"]) + bias("wo")
  y_TxD = jnp.einsum("etd,te->td", y_ExTxD, gates_TxE)
  if cfg.shared_experts:
    shared = Mlp(cfg, mlp_dim=cfg.shared_experts * cfg.mlp_dim)
    y_TxD += shared.apply({"params": params["shared"]}, x_TxD[None])[0]
  return y_TxD.reshape(x_BxLxD.shape)


def inputs(cfg, batch=3, length=10, seed=1, padding=True):
  x_BxLxD = jax.random.normal(jax.random.key(seed), (batch, length, cfg.d_model))
  valid_BxL = jnp.ones((batch, length), bool)
  if padding:
    valid_BxL = valid_BxL.at[1, 7:].set(False)
  return x_BxLxD, valid_BxL


CASES = [dict(), dict(activation="swiglu", use_bias=False, experts_per_token=1),
         dict(router="sigmoid_topk", activation="geglu", moe_bias_update_rate=0.01),
         dict(shared_experts=1, num_experts=8, experts_per_token=3)]


def _name(case):
  return case if isinstance(case, str) else ",".join(f"{k}={v}" for k, v in case.items()) or "plain"


@pytest.mark.parametrize("impl, changes", [("tiled", c) for c in CASES] + [("ragged", CASES[0]), ("ragged", CASES[2])],
                         ids=_name)
def test_dropless_equals_every_expert_on_every_token_masked(impl, changes):
  """Values and gradients (every parameter, the input) within float32 rounding; padding outputs 0. (ragged_dot,
  TPU and GPU's path, on two settings: on CPU jax lowers it to every pair times every expert.)"""
  cfg = moe_cfg(**changes)
  params = layer_params(cfg)
  if "router_bias" in params:  # a bias that changes the choice: expert 0 nearly always, expert 2 nearly never
    params["router_bias"] = jnp.asarray([1.0, 0.0, -1.0, 0.0])
  x_BxLxD, valid_BxL = inputs(cfg)
  layer = lambda p, x: Moe(cfg, impl=impl).apply({"params": p}, x, valid_BxL)
  ours, expected = jax.jit(layer)(params, x_BxLxD), reference(cfg, params, x_BxLxD, valid_BxL)
  np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=1e-5)
  if not cfg.shared_experts:  # (a shared expert is a dense MLP: it reads padding as a dense model does)
    assert np.all(np.asarray(ours)[1, 7:] == 0)
  cotangent = jax.random.normal(jax.random.key(5), x_BxLxD.shape)
  loss = lambda f: jax.jit(jax.grad(lambda p, x: jnp.sum(f(p, x) * cotangent), argnums=(0, 1)))
  grads = loss(layer)(params, x_BxLxD)
  expected_grads = loss(lambda p, x: reference(cfg, p, x, valid_BxL))(params, x_BxLxD)
  for (path, g), e in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(g, e, atol=5e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
  if "router_bias" in params:
    assert not np.any(np.asarray(grads[0]["router_bias"]))


@pytest.mark.parametrize("impl", ["ragged", "tiled"])
def test_dropless_outputs_do_not_depend_on_token_order_or_padding(impl):
  cfg = moe_cfg(activation="swiglu")
  params = layer_params(cfg, seed=2)
  x_BxLxD, _ = inputs(cfg, batch=4, length=8, padding=False)
  layer = jax.jit(lambda x, valid: Moe(cfg, impl=impl).apply({"params": params}, x, valid))
  base = layer(x_BxLxD, jnp.ones((4, 8), bool))
  permutation = np.random.default_rng(0).permutation(32)
  shuffled = layer(x_BxLxD.reshape(32, -1)[permutation].reshape(4, 8, -1), jnp.ones((4, 8), bool))
  np.testing.assert_allclose(shuffled.reshape(32, -1), np.asarray(base).reshape(32, -1)[permutation], atol=1e-6)
  # Padding: 5 more tokens a row (random, so a router would pick experts for them) and 2 padding rows.
  padded_x = jax.random.normal(jax.random.key(9), (6, 13, cfg.d_model)).at[:4, :8].set(x_BxLxD)
  padded_valid = jnp.zeros((6, 13), bool).at[:4, :8].set(True)
  np.testing.assert_allclose(np.asarray(layer(padded_x, padded_valid))[:4, :8], base, atol=1e-6)


def test_a_dropless_decoder_is_invariant_to_row_order_and_padding():
  """The whole model: rows permuted, or packed after padding rows and padding columns, give the same logits."""
  cfg = moe_cfg(num_layers=1)
  model = build_model(cfg)
  params = perturbed(nn.meta.unbox(init_params(model, jax.random.key(0), 8)), scale=0.05)
  tokens_BxL = jax.random.randint(jax.random.key(3), (4, 9), 1, 41)
  forward = jax.jit(lambda t, s: model.apply({"params": params}, t, None, s))
  base = np.asarray(forward(tokens_BxL, jnp.ones((4, 9), jnp.int32)))
  order = np.array([2, 0, 3, 1])
  np.testing.assert_allclose(forward(tokens_BxL[order], jnp.ones((4, 9), jnp.int32)), base[order], atol=1e-5)
  padded = jnp.zeros((5, 12), jnp.int32).at[1:, :9].set(tokens_BxL)
  segments = jnp.zeros((5, 12), jnp.int32).at[1:, :9].set(1)
  np.testing.assert_allclose(np.asarray(forward(padded, segments))[1:, :9], base, atol=1e-5)


def test_capacity_drops_the_pairs_past_c_and_counts_them():
  """Each row's pairs, first choices before second and earlier tokens first, fill C slots an expert; the others
  are dropped: the layer equals the reference with those pairs' gates zeroed, and "dropped" counts them."""
  cfg = moe_cfg(moe_capacity_factor=0.5, activation="swiglu", use_bias=False)
  params = layer_params(cfg, seed=3)
  params["router"] = params["router"].at[:, 0].add(1.0)  # expert 0 overloaded
  x_BxLxD, valid_BxL = inputs(cfg, batch=2, length=12)
  y, state = jax.jit(lambda p, x: Moe(cfg).apply({"params": p}, x, valid_BxL, mutable=["moe"]))(params, x_BxLxD)
  stats = state["moe"]["stats"]
  capacity = int(np.ceil(0.5 * 12 * 2 / 4))
  logits = np.asarray(x_BxLxD.reshape(-1, cfg.d_model) @ params["router"]).reshape(2, 12, 4)
  experts = np.argsort(-logits, axis=-1)[..., :2]  # softmax keeps the order of the logits
  kept, dropped = np.zeros((2, 12, 2), bool), 0
  for b in range(2):
    used = np.zeros(4, int)
    for choice in range(2):
      for t in range(12):
        if not valid_BxL[b, t]:
          continue
        e = experts[b, t, choice]
        kept[b, t, choice] = used[e] < capacity
        dropped += used[e] >= capacity
        used[e] += 1
  assert dropped > 0 and float(stats["dropped"]) == dropped
  assert float(stats["tokens"]) == int(valid_BxL.sum())
  np.testing.assert_array_equal(stats["load"], np.bincount(experts[np.asarray(valid_BxL)].ravel(), minlength=4))
  # The reference with the dropped pairs' gates at 0 (and the kept gates as the router gave them).
  probs = jax.nn.softmax(jnp.asarray(logits), axis=-1)
  chosen = np.take_along_axis(np.asarray(probs), experts, axis=-1)
  gates = chosen / chosen.sum(-1, keepdims=True) * kept
  gates_TxE = np.zeros((24, 4))
  np.put_along_axis(gates_TxE, experts.reshape(24, 2), gates.reshape(24, 2), axis=-1)
  expected = _masked_reference(cfg, params, x_BxLxD, gates_TxE)
  np.testing.assert_allclose(y, expected, atol=2e-5)
  apply = lambda factor: jax.jit(Moe(dataclasses.replace(cfg, moe_capacity_factor=factor)).apply)(
      {"params": params}, x_BxLxD, valid_BxL)
  np.testing.assert_allclose(apply(4.0), apply(0.0), atol=1e-5)


def _masked_reference(cfg, params, x_BxLxD, gates_TxE):
  x_TxD = x_BxLxD.reshape(-1, cfg.d_model)
  h = jax.nn.silu(jnp.einsum("td,edf->etf", x_TxD, params["wi_gate"])) * jnp.einsum("td,edf->etf", x_TxD,
                                                                                   params["wi_up"])
  y_ExTxD = jnp.einsum("etf,efd->etd", h, params["wo"])
  return jnp.einsum("etd,te->td", y_ExTxD, gates_TxE).reshape(x_BxLxD.shape)


def test_routers_gates():
  """softmax_topk: the top X probabilities renormalised; sigmoid_topk: the top X affinities normalised; top-1
  keeps its probability; the bias moves the choice, not the gate; padding goes nowhere."""
  logits_TxE = jnp.asarray([[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 3.0, 0.1]])
  valid_T = jnp.asarray([True, False])
  cfg = moe_cfg()
  experts, gates, probs = route(cfg, logits_TxE, None, valid_T)
  p = np.exp([2.0, 1.0]) / np.exp([2.0, 1.0]).sum()
  np.testing.assert_array_equal(experts, [[0, 1], [4, 4]])
  np.testing.assert_allclose(gates, [p, [0, 0]], rtol=1e-6)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  experts, gates, _ = route(moe_cfg(router="sigmoid_topk"), logits_TxE, jnp.asarray([0.0, 0.0, 0.9, 0.0]),
                            jnp.ones(2, bool))
  s = 1 / (1 + np.exp(-np.asarray(logits_TxE)))
  np.testing.assert_array_equal(experts, [[2, 0], [2, 1]])  # sigmoid(0) + 0.9 outranks sigmoid(2)
  np.testing.assert_allclose(gates[0], s[0, [2, 0]] / s[0, [2, 0]].sum(), rtol=1e-6)
  _, gates, probs = route(moe_cfg(experts_per_token=1), logits_TxE, None, jnp.ones(2, bool))
  np.testing.assert_allclose(gates[:, 0], probs.max(-1), rtol=1e-6)


@pytest.mark.parametrize("changes", [dict(), dict(moe_every=2, shared_experts=2, moe_bias_update_rate=0.1),
                                     dict(family="encoder_decoder", position="relative", activation="swiglu")])
def test_num_params_and_flops_count_total_and_active_experts(changes):
  cfg = moe_cfg(num_layers=3, **changes)
  shapes = jax.eval_shape(lambda: init_params(build_model(cfg), jax.random.key(0), 4))
  assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(nn.meta.unbox(shapes)))
  e, x, s = cfg.num_experts, cfg.experts_per_token, cfg.shared_experts
  per_expert = cfg.expert_params()
  stacks = 2 if cfg.family == "encoder_decoder" else 1
  assert cfg.num_params() - cfg.num_params(active=True) == stacks * cfg.num_moe_layers * (e - x) * per_expert
  dense = dataclasses.replace(cfg, mlp="dense")
  mlp_matmul = cfg.d_model * cfg.mlp_dim * (3 if cfg.gated else 2)
  extra = cfg.num_moe_layers * ((x + s - 1) * mlp_matmul + cfg.d_model * e)  # a dense MLP's width -> X + S experts
  length = 8
  if cfg.family == "encoder_decoder":
    assert cfg.train_flops(length, 4) - dense.train_flops(length, 4) == 6 * extra * (length + 4)
  else:
    assert cfg.train_flops(length) - dense.train_flops(length) == 6 * extra * length


def test_scan_equals_loop_and_sows_alike():
  cfg = moe_cfg(num_layers=3, moe_bias_update_rate=0.1)
  model, scanned = build_model(cfg), build_model(dataclasses.replace(cfg, scan_layers=True))
  params = perturbed(nn.meta.unbox(init_params(model, jax.random.key(0), 8)), scale=0.05)
  tokens_BxL = jax.random.randint(jax.random.key(3), (2, 9), 1, 41)
  sown = lambda m: jax.jit(lambda p, t: m.apply({"params": p}, t, mutable=["moe"]))
  loop_logits, loop_state = sown(model)(params, tokens_BxL)
  scan_logits, scan_state = sown(scanned)(params, tokens_BxL)
  np.testing.assert_allclose(scan_logits, loop_logits, atol=1e-5)
  assert jax.tree.structure(scan_state) == jax.tree.structure(loop_state)
  for a, b in zip(jax.tree.leaves(scan_state), jax.tree.leaves(loop_state)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert jax.eval_shape(scanned.apply, {"params": params}, tokens_BxL).shape == loop_logits.shape  # none asked


def test_remat_and_cached_decoding():
  cfg = moe_cfg(activation="swiglu", use_bias=False)
  model = build_model(cfg)
  params = perturbed(nn.meta.unbox(init_params(model, jax.random.key(0), 8)), scale=0.05)
  tokens_BxL = jax.random.randint(jax.random.key(7), (3, 9), 0, 41)
  full_BxLxV = jax.jit(model.apply)({"params": params}, tokens_BxL)
  np.testing.assert_allclose(cached_logits(model, params, tokens_BxL, capacity=12), full_BxLxV, atol=1e-5, rtol=0)
  remat = build_model(dataclasses.replace(cfg, remat=True))
  grad = lambda m: jax.jit(jax.grad(lambda p: jnp.sum(m.apply({"params": p}, tokens_BxL, mutable=["moe"])[0] ** 2)))
  for a, b in zip(jax.tree.leaves(grad(remat)(params)), jax.tree.leaves(grad(model)(params))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("key, value, message", [
    ("mlp", "sparse", "config.model.mlp: expected one of dense, moe"),
    ("router", "top2", "config.model.router: expected one of softmax_topk, sigmoid_topk"),
    ("num_experts", 1, "config.model.num_experts: expected a whole number >= 2"),
    ("experts_per_token", 9, "config.model.experts_per_token: at most num_experts=8"),
    ("moe_every", 0, "config.model.moe_every: expected a whole number >= 1"),
    ("moe_capacity_factor", -1.0, "config.model.moe_capacity_factor: expected a number >= 0"),
    ("moe_bias_update_rate", "fast", "config.model.moe_bias_update_rate: expected a number >= 0")])
def test_config_errors_name_the_key(key, value, message):
  section = {"mlp": "moe", "num_experts": 8, key: value}
  with pytest.raises(ConfigError, match=message):
    ModelConfig.from_config(section, 41)
