"""µP (model/parametrization.py): the coordinate check, equality with the standard model at the base width, and the
init and update scales it promises, each measured on a real model and its pretraining optimizer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from model.config import ConfigError, ModelConfig
from model.hf.common import ConversionError, export_tensors
from train import runs

VOCAB, LENGTH, BATCH = 64, 32, 8


def make_run(width: int, parametrization: str, base_width: int = 64, lr: float = 1e-2, **model):
  """The pretraining Run of a 2-layer decoder of `width` with 4 heads (the head width grows with the model),
  constant learning rate, no weight decay or clipping."""
  config = base.get_config()
  config.model.update(num_layers=2, d_model=width, num_heads=4, max_len=LENGTH, parametrization=parametrization,
                      base_width=base_width, **model)
  config.train.update(learning_rate=lr, min_learning_rate=lr, warmup_steps=0, weight_decay=0.0, grad_clip=0.0)
  return runs.pretraining(config, None, VOCAB)


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


@pytest.mark.parametrize("model", [{}, dict(attention_impl="dot_product", tie_embeddings=False)])
def test_mup_at_its_base_width_is_the_standard_model_exactly(model):
  sp_run, mup_run = make_run(96, "sp", **model), make_run(96, "mup", base_width=96, **model)
  assert mup_run.model.cfg.width_mult == 1.0
  (sp_init, sp_trained, inputs), (mup_init, mup_trained, _) = train(sp_run), train(mup_run)
  for a, b in ((sp_init, mup_init), (sp_trained, mup_trained)):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  np.testing.assert_array_equal(sp_run.model.apply({"params": sp_trained}, inputs),
                                mup_run.model.apply({"params": mup_trained}, inputs))


def test_mup_init_and_first_update_scale_hidden_matrices_only():
  # Adam's first step moves every entry by about the learning rate (|g| >> eps): µP makes that lr / m for hidden
  # matrices and leaves the embedding's at lr; hidden inits shrink by 1 / sqrt(m).
  lr, m = 1e-2, 4
  narrow_init, _, _ = train(make_run(64, "mup", lr=lr), steps=0)
  run = make_run(256, "mup", lr=lr)
  params, stepped, _ = train(run, steps=1)
  leaf = lambda tree, path: np.asarray(functools.reduce(lambda t, key: t[key], path, tree))
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
  wide = ModelConfig.from_config({"parametrization": "mup", "base_width": 64, "d_model": 128}, 16)
  with pytest.raises(ConversionError, match="config.model.parametrization"):
    export_tensors(wide, {})
