"""Training a mixture of experts (train/moe.py): the Switch and z losses equal their formulas on the router's
logits, values and gradients, and reach the train step's gradient; bias balancing moves each bias by the rate
against its expert's load and evens an overloaded router out without a gradient; a run logs the expert load,
drops, router losses and entropy; the same losses on one device and on expert-parallel meshes.
"""

import dataclasses
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ablate.figures import expert_load_plot
from configs import base
from model.config import ModelConfig
from model.families import build_model, init_params
from model.moe import Moe
from test_moe import inputs, layer_params, moe_cfg, perturbed
from test_train import tiny_config
from train import estimate as estimate_lib
from train.compile import collectives
from train import loop, moe, runs
from train import mesh as mesh_lib
from train.pretrain import train_and_evaluate
from train.state import fresh_state
from train.step import token_loss, train_step


def switch_and_z(cfg, params, x_BxLxD, valid_BxL):
  """The Switch loss E * sum_e f_e p_e and the mean log(Z)^2 of the router, from its logits (top X by a sort)."""
  valid_T = valid_BxL.reshape(-1)
  logits_TxE = (x_BxLxD.reshape(-1, cfg.d_model) @ params["router"])[valid_T]
  probs_TxE = jax.nn.softmax(logits_TxE)
  top_TxX = jnp.argsort(-jax.lax.stop_gradient(logits_TxE), axis=-1)[:, :cfg.experts_per_token]
  share_E = jnp.bincount(top_TxX.ravel(), length=cfg.num_experts) / top_TxX.size
  switch = cfg.num_experts * jnp.sum(share_E * probs_TxE.mean(0))
  return switch, jnp.mean(jax.nn.logsumexp(logits_TxE, axis=-1) ** 2)


def test_aux_and_z_losses_are_their_formulas_in_value_and_gradient():
  cfg = moe_cfg(moe_aux_loss=0.3, router_z_loss=0.2)
  params = layer_params(cfg, seed=4)
  x_BxLxD, valid_BxL = inputs(cfg)

  def penalty(p):
    _, state = Moe(cfg).apply({"params": p}, x_BxLxD, valid_BxL, mutable=["moe"])
    return moe.loss_terms(cfg, {"layer_0": {"mlp": state["moe"]}}, 1.0)["moe_loss_sum"]

  def expected(p):
    switch, z = switch_and_z(cfg, p, x_BxLxD, valid_BxL)
    return 0.3 * switch + 0.2 * z

  np.testing.assert_allclose(jax.jit(penalty)(params), expected(params), rtol=1e-5)
  got, want = jax.jit(jax.grad(penalty))(params), jax.grad(expected)(params)
  np.testing.assert_allclose(got["router"], want["router"], rtol=1e-4, atol=1e-7)
  assert not np.any(np.asarray(got["wo"]))  # the losses see the router only


def tiny_moe(**changes):
  cfg = moe_cfg(num_layers=2, vocab_size=41, **changes)
  model = build_model(cfg)
  params = perturbed(nn.meta.unbox(init_params(model, jax.random.key(0), 8)), scale=0.05)
  tokens = jax.random.randint(jax.random.key(3), (4, 9), 1, 41)
  batch = {"inputs_BxL": tokens, "targets_BxL": jnp.roll(tokens, -1, axis=1), "weights_BxL": jnp.ones((4, 9)),
           "positions_BxL": jnp.broadcast_to(jnp.arange(9), (4, 9)), "segment_ids_BxL": jnp.ones((4, 9), jnp.int32)}
  return cfg, model, params, batch


def test_the_train_step_takes_the_gradient_of_cross_entropy_plus_the_auxiliary_losses():
  """One SGD step (rate 1) moves the parameters by -(grad CE + grad penalty) / weights; the reported loss is the
  cross entropy; the penalty is the weight sum times the mean over layers of the coefficients' terms."""
  cfg, model, params, batch = tiny_moe(moe_aux_loss=0.5, router_z_loss=0.1)
  loss_fn = token_loss(model)
  sums = jax.jit(lambda p: loss_fn(p, {}, batch, jax.random.key(0), True))(params)
  plain = token_loss(build_model(dataclasses.replace(cfg, moe_aux_loss=0.0, router_z_loss=0.0)))
  plain_sums = plain(params, {}, batch, jax.random.key(0), True)
  assert sums["loss_sum"] == pytest.approx(float(plain_sums["loss_sum"]), rel=1e-6)
  assert float(plain_sums["moe_loss_sum"]) == 0.0
  layers = sums["moe"]
  assert sorted(layers) == ["layer_0", "layer_1"]
  mean = lambda name: np.mean([float(s[name] / s["tokens"]) for s in layers.values()])
  expected = float(sums["weight_sum"]) * (0.5 * mean("aux_loss") + 0.1 * mean("z_loss"))
  assert float(sums["moe_loss_sum"]) == pytest.approx(expected, rel=1e-5)
  tx = optax.sgd(1.0)
  state = fresh_state(params, tx, jax.random.key(0))
  new_state, metrics = jax.jit(lambda s: train_step(s, batch, loss_fn=loss_fn, tx=tx))(state)
  total = lambda sums: sums["loss_sum"] + sums["moe_loss_sum"]
  grads = jax.grad(lambda p: total(loss_fn(p, {}, batch, jax.random.key(0), False)))(params)
  for new, old, g in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(params), jax.tree.leaves(grads)):
    np.testing.assert_allclose(new - old, -g / 36.0, atol=1e-6)
  assert "moe" in metrics and float(metrics["loss_sum"]) == pytest.approx(float(sums["loss_sum"]), rel=1e-5)


def test_bias_balancing_moves_each_bias_by_the_rate_against_its_load():
  """The biases move by rate * sign(mean load - load) of the step's batch whatever the optimizer does to them (here
  one that adds 0.1 x every parameter); over steps with no other update an overloaded router evens out."""
  cfg, model, params, batch = tiny_moe(moe_bias_update_rate=0.02, num_experts=8, experts_per_token=1)
  for layer in ("layer_0", "layer_1"):
    params[layer]["mlp"]["router"] = params[layer]["mlp"]["router"].at[:, 0].add(0.5)  # expert 0 overloaded
  loss_fn = token_loss(model)
  bias = lambda state: np.asarray(state.params["layer_0"]["mlp"]["router_bias"])

  def steps(tx, count):
    run = runs.for_model(model, tx, mesh_lib.one_device_mesh(), base.get_config().mesh.rules)
    step = jax.jit(lambda s: train_step(s, batch, loss_fn=loss_fn, tx=tx, rebalance=moe.rebalancer(run)))
    state, loads = fresh_state(params, tx, jax.random.key(0)), []
    for _ in range(count):
      new_state, metrics = step(state)
      loads.append(np.asarray(metrics["moe"]["layer_0"]["load"]))
      np.testing.assert_allclose(bias(new_state) - bias(state), 0.02 * np.sign(loads[-1].mean() - loads[-1]),
                                 atol=1e-7)
      state = new_state
    return state, loads

  state, _ = steps(optax.chain(optax.scale(0.0), optax.add_decayed_weights(0.1)), 1)
  np.testing.assert_allclose(state.params["layer_0"]["mlp"]["router"], 1.1 * params["layer_0"]["mlp"]["router"],
                             rtol=1e-6)
  state, loads = steps(optax.sgd(0.0), 30)
  share = [load.max() / load.sum() for load in loads]  # the busiest expert's share (balanced: 1/8)
  assert share[0] > 0.9 and np.mean(share[-5:]) < 0.5  # (a sign rule overshoots and swings back)
  for (path, value), old in zip(jax.tree_util.tree_flatten_with_path(state.params)[0], jax.tree.leaves(params)):
    if "router_bias" not in jax.tree_util.keystr(path):
      np.testing.assert_array_equal(value, old)


def test_a_run_logs_expert_load_drops_and_router_metrics(tmp_path):
  config = tiny_config(tmp_path, steps=3, eval_every=3)
  config.model.update(mlp="moe", num_experts=4, experts_per_token=2, moe_every=2, moe_capacity_factor=1.0,
                      moe_bias_update_rate=0.01, router_z_loss=1e-3)
  workdir = str(tmp_path / "run")
  train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  last = records[-1]
  for prefix in ("train", "eval"):
    layer = f"{prefix}/moe/layer_1"
    assert f"{prefix}/moe/layer_0/load_min" not in last  # moe_every=2: layer 0 is dense
    assert 0 <= last[f"{layer}/load_min"] <= 0.25 <= last[f"{layer}/load_max"] <= 1
    assert 0 < last[f"{layer}/load_entropy"] <= 1 + 1e-9
    assert 0 <= last[f"{layer}/dropped"] == last[f"{prefix}/moe/dropped"] < 1
    assert 0.5 < last[f"{prefix}/moe/aux_loss"] < 2  # 1 when balanced
    assert 0 < last[f"{prefix}/moe/router_entropy"] <= math.log(4) + 1e-6
    assert last[f"{prefix}/moe/router_z_loss"] > 0
  loaded = runs.load_run(workdir)
  assert np.any(np.asarray(loaded.params["layer_1"]["mlp"]["router_bias"]) != 0)  # balanced, and saved
  expert_load_plot(workdir, str(tmp_path / "load.png"))  # the ablation's expert-load figure
  assert (tmp_path / "load.png").stat().st_size > 10_000


def _mesh_losses(config, shape, steps=3):
  """Per-step losses (and the last step's summed MoE statistics, the compiled step's HLO) of a run on `shape`."""
  config.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
  config.mesh.update(**shape)
  mesh = mesh_lib.make_mesh(config.mesh)
  run = runs.pretraining(config, mesh, 41)
  state = run.init_state()
  step = loop.jit_train_step(run, token_loss(run.model), config.train)
  rng = np.random.default_rng(0)
  losses = []
  for i in range(steps):
    tokens = rng.integers(1, 41, (8, 17)).astype(np.int32)
    batch = {"inputs_BxL": tokens[:, :-1], "targets_BxL": tokens[:, 1:], "weights_BxL": np.ones((8, 16), np.float32),
             "positions_BxL": np.tile(np.arange(16, dtype=np.int32), (8, 1)),
             "segment_ids_BxL": np.ones((8, 16), np.int32)}
    batch = jax.device_put(batch, mesh_lib.batch_sharding(mesh))
    if i == 0:
      step = step.lower(state, batch, {}).compile()
    state, metrics = step(state, batch, {})
    losses.append(float(metrics["loss_sum"] / metrics["weight_sum"]))
  return losses, jax.device_get(metrics["moe"]), step.as_text(), run.shardings.params


@pytest.mark.parametrize("shape, changes", [({"data": 2, "expert": 4}, {"moe_capacity_factor": 2.0}),
                                            ({"fsdp": 2, "expert": 2, "tensor": 2}, {})],
                         ids=["data2_expert4_capacity", "fsdp2_expert2_tensor2_dropless"])
def test_expert_parallel_meshes_give_one_devices_losses(shape, changes):
  """3 AdamW steps with the Switch and z losses and bias balancing: the losses and the expert loads on the mesh
  equal one device's; the expert kernels are split over the expert axis, and the capacity layout moves tokens by
  all-to-all (GSPMD)."""
  config = base.get_config()
  config.model.update(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=32, max_len=16, mlp="moe",
                      num_experts=8, experts_per_token=2, activation="swiglu", router_z_loss=1e-3,
                      moe_bias_update_rate=0.01, **changes)
  config.train.update(batch_size=8, seq_len=16, warmup_steps=1)
  one, one_stats, _, _ = _mesh_losses(config, {})
  losses, stats, hlo, shardings = _mesh_losses(config, shape)
  np.testing.assert_allclose(losses, one, atol=1e-5, rtol=0)
  for layer in one_stats:
    np.testing.assert_array_equal(stats[layer]["load"], one_stats[layer]["load"])
  assert shardings["layer_0"]["mlp"]["wi_up"].spec[0] == "expert"
  if changes:  # each of 2 layers: its [B, E, C, D] buffer there and back, forward and backward, and nothing else
    rows, capacity = 8 // 8, math.ceil(2.0 * 16 * 2 / 8)  # a device's rows; slots an expert
    assert collectives(hlo)["all-to-all"] == {"count": 8, "bytes": 8 * rows * 8 * capacity * 32 * 4}


def test_the_estimator_counts_total_and_active_parameters(tmp_path):
  config = tiny_config(tmp_path)
  config.model.update(dropout=0.0, mlp="moe", num_experts=8, experts_per_token=2, shared_experts=1)
  figures = estimate_lib.estimate(config, 50, peak_flops=1e11, bandwidth=1e10)
  cfg = ModelConfig.from_config(config.model, 50)
  parameters = figures["parameters"]
  assert parameters["analytic"] == parameters["model"] == cfg.num_params()
  assert parameters["active"] == cfg.num_params(active=True) < parameters["analytic"]
  assert figures["flops"]["per_step"] == pytest.approx(8 * cfg.train_flops(16))
  assert f"{parameters['active']:,} active a token" in estimate_lib.report(figures)
