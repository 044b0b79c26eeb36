"""µP (model/parametrization.py): the coordinate check, equality with the standard model at the base width, and the
init and update scales it promises, each measured on a real model and its pretraining optimizer."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from ablate import plan
from configs import base
from configs.ablations import mup_base_tune, mup_transfer
from model import parametrization
from model.attention import sinusoidal_embedding
from model.config import ConfigError, ModelConfig
from model.families import build_model, init_params
from model.hf.common import ConversionError, export_tensors
from train import runs
from train.mesh import config_rules

VOCAB, LENGTH, BATCH = 64, 32, 8
# The base model's multipliers, none at its default, for the tests that they act and that µP keeps them at its base.
MULTIPLIERS = dict(mup_output_mult=4.0, mup_init_mult=2.0, mup_attn_mult=0.5, mup_embed_lr_mult=3.0,
                   mup_vector_lr_mult=0.25, mup_zero_query=True)


def make_run(width: int, parametrization: str, base_width: int = 64, lr: float = 1e-2, **model):
  """The pretraining Run of a 2-layer decoder of `width` with 4 heads (the head width grows with the model),
  constant learning rate, no weight decay or clipping."""
  config = base.get_config()
  config.model.update(num_layers=2, d_model=width, num_heads=4, max_len=LENGTH, parametrization=parametrization,
                      base_width=base_width, **model)
  config.train.update(learning_rate=lr, min_learning_rate=lr, warmup_steps=0, weight_decay=0.0, grad_clip=0.0)
  return runs.pretraining(config, None, VOCAB)


def leaf(tree, path):
  return np.asarray(functools.reduce(lambda t, key: t[key], path, tree))


def first_moves(run, steps: int = 1):
  """(initial params, path -> median |change| of each entry after `steps` Adam steps)."""
  params, stepped, _ = train(run, steps=steps)
  return params, lambda path: float(np.median(np.abs(leaf(stepped, path) - leaf(params, path))))


def train(run, seed: int = 0, steps: int = 4):
  """(initial params, params after `steps` Adam steps on one batch of random tokens, that batch's inputs)."""
  params = run.init_params(jax.random.PRNGKey(seed), {})
  tokens = jax.random.randint(jax.random.PRNGKey(100 + seed), (BATCH, LENGTH + 1), 0, VOCAB)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  def loss(p):
    logits = run.model.apply({"params": p}, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  @jax.jit
  def step(p, opt_state):
    updates, opt_state = run.tx.update(jax.grad(loss)(p), opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  trained, opt_state = params, run.tx.init(params)
  for _ in range(steps):
    trained, opt_state = step(trained, opt_state)
  return params, trained, inputs


def coordinates(run, params, inputs):
  """Mean |entry| of the logits and of the last block's output (the residual stream)."""
  logits, state = run.model.apply({"params": params}, inputs, capture_intermediates=True, mutable=["intermediates"])
  hidden = state["intermediates"]["layer_1"]["__call__"][0][0]
  return float(jnp.abs(logits).mean()), float(jnp.abs(hidden).mean())


def test_coordinate_check_flat_under_mup_growing_under_sp(seed=0):
  # After 4 Adam steps at one learning rate, widths 64 -> 256. Measured over seeds 0-3: SP's residual stream grows
  # 13-20x and its logits 2.0-2.8x; under µP they change by 0.73-0.87x and 0.76-1.09x.
  def trained_coordinates(run):
    _, trained, inputs = train(run, seed)
    return coordinates(run, trained, inputs)

  ratios = {}
  for parametrization in ("sp", "mup"):
    narrow, wide = (trained_coordinates(make_run(width, parametrization)) for width in (64, 256))
    ratios[parametrization] = [w / n for w, n in zip(wide, narrow)]
  (sp_logits, sp_hidden), (mup_logits, mup_hidden) = ratios["sp"], ratios["mup"]
  assert sp_hidden > 4 and sp_logits > 1.5, ratios
  assert 0.4 < mup_hidden < 1.6 and 0.5 < mup_logits < 1.4, ratios


@pytest.mark.parametrize("model", [{}, dict(attention_impl="dot_product", tie_embeddings=False),
                                   dict(MULTIPLIERS, position="sinusoidal", mlp_dim=160, head_dim=16),
                                   dict(MULTIPLIERS, tie_embeddings=False, activation="swiglu")])
def test_mup_at_its_base_width_is_the_standard_model_exactly(model):
  sp_run, mup_run = make_run(96, "sp", **model), make_run(96, "mup", base_width=96, **model)
  assert mup_run.model.cfg.width_mult == 1.0
  (sp_init, sp_trained, inputs), (mup_init, mup_trained, _) = train(sp_run), train(mup_run)
  for a, b in ((sp_init, mup_init), (sp_trained, mup_trained)):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  logits = sp_run.model.apply({"params": sp_trained}, inputs)
  np.testing.assert_array_equal(logits, mup_run.model.apply({"params": mup_trained}, inputs))
  if model.get("mup_output_mult"):  # the multipliers are in force: without them the same model trains otherwise
    plain = make_run(96, "sp", **{k: v for k, v in model.items() if k not in MULTIPLIERS})
    _, plain_trained, _ = train(plain)
    assert np.abs(plain.model.apply({"params": plain_trained}, inputs) - logits).max() > 0.1


def test_base_multipliers_act_as_they_say():
  # Under SP at one width, each multiplier against the model without it, computed another way.
  plain = make_run(64, "sp")
  params, _, inputs = train(plain, steps=0)
  apply = lambda run, p: run.model.apply({"params": p}, inputs)
  flat = traverse_util.flatten_dict(params)
  hidden = [path for path in flat if path[-1] in ("query", "key", "value", "out", "wi", "wo")]

  scaled, _, _ = train(make_run(64, "sp", mup_init_mult=2.0), steps=0)
  for path, value in traverse_util.flatten_dict(scaled).items():
    np.testing.assert_allclose(value, flat[path] * (2.0 if path in hidden else 1.0), rtol=1e-6, err_msg=str(path))
  zero_query, _, _ = train(make_run(64, "sp", mup_zero_query=True), steps=0)
  for path, value in traverse_util.flatten_dict(zero_query).items():
    np.testing.assert_array_equal(value, 0 * flat[path] if path[-1] == "query" else flat[path], err_msg=str(path))

  # alpha_output multiplies the logits (tied, no head bias); alpha_attn equals a query kernel and bias scaled by it.
  np.testing.assert_allclose(apply(make_run(64, "sp", mup_output_mult=4.0), params), 4.0 * apply(plain, params),
                             rtol=1e-5, atol=1e-6)
  query_scaled = {path: value * 0.5 if path[-1] in ("query", "query_bias") else value for path, value in flat.items()}
  np.testing.assert_allclose(apply(make_run(64, "sp", mup_attn_mult=0.5), params),
                             apply(plain, traverse_util.unflatten_dict(query_scaled)), rtol=1e-5, atol=1e-6)

  # Adam's first step moves each entry by about the rate: the class multipliers scale it for their class only.
  lr = 1e-2
  _, move = first_moves(make_run(64, "sp", lr=lr, mup_embed_lr_mult=3.0, mup_vector_lr_mult=0.25))
  assert move(("embed", "embedding")) == pytest.approx(3.0 * lr, rel=0.05)
  assert move(("position_embedding",)) == pytest.approx(3.0 * lr, rel=0.05)
  for path in (("layer_0", "mlp_norm", "scale"), ("layer_1", "attention", "out_bias"), ("final_norm", "bias")):
    assert move(path) == pytest.approx(0.25 * lr, rel=0.05), path
  for path in (("layer_0", "mlp", "wi"), ("layer_1", "attention", "query")):
    assert move(path) == pytest.approx(lr, rel=0.05), path


def test_mup_width_ratios_per_tensor_with_explicit_mlp_and_head_widths():
  # d_model 64 -> 256 with mlp_dim 128 and head_dim 16 fixed (4 heads): the MLP's first kernel and q/k/v grow in
  # fan-in only (output weights: init / m, rate / m), wo and the attention's out in fan-out only (input weights:
  # unchanged), and the head width does not grow (attention divided by sqrt(K), not K / sqrt(K_base)).
  lr, m, fixed = 1e-2, 4, dict(mlp_dim=128, head_dim=16)
  narrow, _, _ = train(make_run(64, "mup", lr=lr, **fixed), steps=0)
  run = make_run(256, "mup", lr=lr, **fixed)
  params, move = first_moves(run)
  std = lambda tree, path: float(np.std(leaf(tree, path)))
  for path, init, rate in ((("layer_0", "mlp", "wi"), 1 / m, 1 / m), (("layer_1", "attention", "query"), 1 / m, 1 / m),
                           (("layer_0", "mlp", "wo"), 1, 1), (("layer_1", "attention", "out"), 1, 1)):
    assert std(params, path) == pytest.approx(std(narrow, path) * init, rel=0.1), path
    assert move(path) == pytest.approx(lr * rate, rel=0.05), path
  assert parametrization.attention_divisor(run.model.cfg) == 4.0
  derived = make_run(256, "mup").model.cfg  # head_dim 64 over the base's 16: 64 / sqrt(16)
  assert (derived.head_dim, parametrization.attention_divisor(derived)) == (64, 16.0)
  t5 = ModelConfig.from_config(dict(parametrization="mup", base_width=64, d_model=256, scale_attention=False), VOCAB)
  assert parametrization.attention_divisor(t5) == 4.0  # µP's 1/K: K / K_base where T5 divides by nothing
  assert parametrization.attention_divisor(dataclasses.replace(t5, parametrization="sp", base_model=None)) is None


def test_head_transform_is_a_hidden_matrix():
  # BERT's masked-LM head transform [D, D]: init / sqrt(m) and rate / m like every hidden matrix, its bias unchanged;
  # its two dims keep distinct mesh axes.
  lr, m, encoder = 1e-2, 4, dict(family="encoder", head_transform=True, head_bias=True, embed_norm=True)
  narrow, _, _ = train(make_run(64, "mup", lr=lr, **encoder), steps=0)
  params, move = first_moves(make_run(256, "mup", lr=lr, **encoder))
  assert np.std(params["head_transform"]) == pytest.approx(np.std(narrow["head_transform"]) / np.sqrt(m), rel=0.1)
  assert move(("head_transform",)) == pytest.approx(lr / m, rel=0.05)
  assert move(("head_transform_bias",)) == pytest.approx(lr, rel=0.05)
  axes = runs.logical_axes(make_run(64, "sp", **encoder).model)["head_transform"]
  assert parametrization.param_class(axes) == "hidden"
  assert tuple(nn.logical_to_mesh_axes(tuple(axes), config_rules(base.get_config().mesh))) == ("fsdp", None)


def test_sinusoidal_tokens_scale_by_the_base_width_under_mup():
  # What the first block reads: token embeddings x sqrt(D) plus the position signal; under µP D is the base's.
  def first_block_input(run):
    params, _, inputs = train(run, steps=0)
    seen = {}

    def record(next_fun, args, kwargs, context):
      if context.module.name == "layer_0" and context.method_name == "__call__":
        seen["x"] = args[0]
      return next_fun(*args, **kwargs)
    with nn.intercept_methods(record):
      run.model.apply({"params": params}, inputs)
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    return seen["x"], params["embed"]["embedding"][inputs], sinusoidal_embedding(positions, run.model.cfg.d_model)

  for parametrization_name, scale in (("mup", math.sqrt(64)), ("sp", math.sqrt(256))):
    x, tokens, signal = first_block_input(make_run(256, parametrization_name, position="sinusoidal"))
    np.testing.assert_allclose(x, tokens * scale + signal, rtol=1e-5, atol=1e-6, err_msg=parametrization_name)
  cfg = make_run(256, "mup", scale_tied_logits=True).model.cfg
  assert parametrization.constant_width(cfg) == 64


def test_untied_readout_keeps_its_init_and_rate_under_mup():
  # Table 8's output weights: the untied output matrix keeps the base's init (std 0.02) and the embeddings' rate
  # (x mup_embed_lr_mult, not / m); the logits are the readout's product x alpha_output / m.
  lr, m, model = 1e-2, 4, dict(tie_embeddings=False, mup_output_mult=2.0, mup_embed_lr_mult=3.0)
  run = make_run(256, "mup", lr=lr, **model)
  params, move = first_moves(run)
  assert np.std(params["lm_head"]) == pytest.approx(0.02, rel=0.05)
  assert move(("lm_head",)) == pytest.approx(3.0 * lr, rel=0.05)
  assert move(("layer_0", "mlp", "wi")) == pytest.approx(lr / m, rel=0.05)
  _, _, inputs = train(run, steps=0)
  hidden_BxLxD = run.model.apply({"params": params}, inputs, return_hidden=True)
  np.testing.assert_allclose(run.model.apply({"params": params}, inputs),
                             np.asarray(hidden_BxLxD) @ params["lm_head"] * (2.0 / m), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model", [dict(family="decoder", tie_embeddings=False, activation="swiglu", num_kv_heads=2),
                                   dict(family="encoder", head_transform=True, mlp_dim=96, head_dim=8),
                                   dict(family="encoder_decoder", position="relative", use_bias=False)])
def test_fan_axes_read_the_kernels_sizes(model):
  # update_scale and scale_init know a kernel by its logical axes alone: the sizes they read off the config for its
  # input and output axes must be the kernel's shape, for every kernel of every family.
  cfg = ModelConfig.from_config(dict(model, d_model=48, num_heads=4, num_layers=1), VOCAB)
  boxed = jax.eval_shape(lambda: init_params(build_model(cfg), jax.random.PRNGKey(0)))
  kernels = 0
  for path, box in traverse_util.flatten_dict(boxed).items():
    if parametrization.is_hidden(box.names):
      inputs, outputs = parametrization.fan_axes(box.names)
      assert [parametrization._axis_size(cfg, axis) for axis in inputs + outputs] == list(box.value.shape), path
      kernels += 1
  assert kernels >= 6


def test_mup_init_and_first_update_scale_hidden_matrices_only():
  # Adam's first step moves every entry by about the learning rate (|g| >> eps): µP makes that lr / m for hidden
  # matrices and leaves the embedding's at lr; hidden inits shrink by 1 / sqrt(m).
  lr, m = 1e-2, 4
  narrow_init, _, _ = train(make_run(64, "mup", lr=lr), steps=0)
  run = make_run(256, "mup", lr=lr)
  params, stepped, _ = train(run, steps=1)
  move = lambda path: float(np.median(np.abs(leaf(stepped, path) - leaf(params, path))))
  assert move(("embed", "embedding")) == pytest.approx(lr, rel=0.05)
  assert np.std(leaf(params, ("embed", "embedding"))) == pytest.approx(0.02, rel=0.1)
  for path in (("layer_0", "mlp", "wi"), ("layer_1", "attention", "query"), ("layer_1", "attention", "out")):
    assert move(path) == pytest.approx(lr / m, rel=0.05), path
    assert np.std(leaf(params, path)) == pytest.approx(np.std(leaf(narrow_init, path)) / np.sqrt(m), rel=0.1), path


def test_mup_config_errors_and_export_refusal():
  with pytest.raises(ConfigError, match="config.model.parametrization"):
    ModelConfig.from_config({"parametrization": "ntk"}, 16)
  with pytest.raises(ConfigError, match="config.model.base_width"):
    ModelConfig.from_config({"parametrization": "mup", "base_width": -1}, 16)
  with pytest.raises(ConfigError, match="config.model.base_width: num_heads=4 must divide it"):
    ModelConfig.from_config({"parametrization": "mup", "base_width": 30, "d_model": 128}, 16)
  ModelConfig.from_config({"parametrization": "mup", "base_width": 30, "d_model": 128, "head_dim": 32}, 16)
  for key, value in (("mup_output_mult", 0.0), ("mup_attn_mult", -1.0), ("mup_init_mult", float("inf")),
                     ("mup_vector_lr_mult", "2")):
    with pytest.raises(ConfigError, match=f"config.model.{key}: expected a positive number"):
      ModelConfig.from_config({key: value}, 16)
  with pytest.raises(ConfigError, match="config.model.mup_zero_query"):
    ModelConfig.from_config({"mup_zero_query": 1}, 16)
  wide = ModelConfig.from_config({"parametrization": "mup", "base_width": 64, "d_model": 128}, 16)
  with pytest.raises(ConversionError, match="config.model.parametrization"):
    export_tensors(wide, {})
  with pytest.raises(ConversionError, match="config.model.mup_output_mult"):
    export_tensors(ModelConfig.from_config({"mup_output_mult": 2.0}, 16), {})


def test_update_scales_only_where_a_factor_is_not_one():
  # None keeps the optimizer exactly the standard one; µP off its base and a rate multiplier under SP need a tree.
  axes = lambda run: runs.logical_axes(run.model)
  for run in (make_run(64, "sp"), make_run(96, "mup", base_width=96), make_run(64, "sp", mup_init_mult=3.0)):
    assert parametrization.update_scales(run.model.cfg, axes(run)) is None
  for run, factor in ((make_run(128, "mup"), 0.5), (make_run(64, "sp", mup_vector_lr_mult=2.0), 1.0)):
    scales = parametrization.update_scales(run.model.cfg, axes(run))
    assert scales["layer_0"]["mlp"]["wi"] == factor and scales["embed"]["embedding"] == 1.0


def test_mup_ablation_configs_take_the_tuned_multipliers():
  # configs/ablations/mup_transfer.py:ARG gives the µP arm the base's multipliers and leaves SP at the defaults;
  # mup_base_tune.py:ARG fixes stage 1's choice and sweeps the class rates.
  transfer = plan.load_ablation(mup_transfer.get_config("output=8,init=2.83"))
  runs_by_arm = {"sp": 0, "mup": 0}
  for name, overrides in plan.variants(transfer):
    arm = "mup" if "model.parametrization=mup" in overrides else "sp"
    runs_by_arm[arm] += 1
    expected = ("8.0", "2.83") if arm == "mup" else ("1.0", "1.0")
    assert (f"model.mup_output_mult={expected[0]}" in overrides and f"model.mup_init_mult={expected[1]}" in overrides
            and not any("mup_attn_mult" in o for o in overrides)), name
  assert runs_by_arm == {"sp": 32, "mup": 32} and tuple(transfer.seeds) == (0, 1, 2)
  stage2 = plan.load_ablation(mup_base_tune.get_config("output=8,init=2.83,attn=2.83"))
  assert "model.mup_attn_mult=2.83" in stage2.overrides and set(dict(stage2.grid)) == {"embed_lr", "vector_lr", "lr"}
  for bad, message in (("outputs=8", "'outputs=8': expected NAME=VALUE"), ("output=x", "'x' is not a number"),
                       ("init=0", "expected a positive number"), ("sp_lr=0.001", "need lr=R")):
    with pytest.raises(ValueError, match=message):
      mup_transfer.get_config(bad)
  # The widest width's selection (seed 0) and the comparison on fresh seeds: µP at the base's rate R (with the
  # multipliers), SP at its own rates without them.
  sweep = plan.load_ablation(mup_transfer.get_config("output=8,lr=0.01,sweep=1"))
  final = plan.load_ablation(mup_transfer.get_config("output=8,lr=0.01,sp_lr=0.0005"))
  for ablation, expected in ((sweep, {"sp": {2.0 ** k for k in range(-13, -9)}, "mup": {0.005, 0.01, 0.02}}),
                             (final, {"sp": {0.0005}, "mup": {0.01}})):
    rates = {"sp": set(), "mup": set()}
    for name, overrides in plan.variants(ablation):
      arm = "mup" if "model.parametrization=mup" in overrides else "sp"
      assert ("model.mup_output_mult=8.0" in overrides) == (arm == "mup"), name
      rates[arm].update(float(o.split("=")[1]) for o in overrides if o.startswith("train.learning_rate="))
    assert rates == expected
  assert tuple(sweep.seeds) == (0,) and tuple(final.seeds) == (1, 2, 3) and final.baseline == "sp_512"
  assert [name for name, _ in plan.variants(final)] == ["sp_512", "mup_64", "mup_128", "mup_256", "mup_512"]
