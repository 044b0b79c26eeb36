"""LoRA computed beside the frozen kernel (x W + s (x A) B, the "lora" collection) against the merged kernel
W + s A B and against the former dense-delta formulation: logits, gradients, dropout, the step's jaxpr, a few
optimizer steps on a frozen base.

Tiny dims, all distinct (V=41, D=24, H=4, G=2, K=6, F=40, B=3, L=7), so a kernel-shaped array is recognisable.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs.finetune import common
from data.batch import rows
from model.config import ModelConfig
from model.families import build_model, family, init_params
from train import peft
from train.state import fresh_state
from train.step import token_loss, train_step, weighted_cross_entropy

DECODER = ModelConfig(vocab_size=41, num_layers=2, d_model=24, num_heads=4, num_kv_heads=2, head_dim=6, mlp_dim=40,
                      max_len=16, position="rope", activation="swiglu", tie_embeddings=False, head_transform=True)
CONFIGS = {
    "decoder_gqa_untied_swiglu": DECODER,
    "encoder_decoder_untied_gelu": dataclasses.replace(DECODER, family="encoder_decoder", position="relative",
                                                       activation="gelu", norm="rmsnorm", use_bias=False),
    "decoder_scan_layers": dataclasses.replace(DECODER, scan_layers=True),  # the lora tree stacked with params
}
# Every kernel `linear` multiplies by: self- and cross-attention, all MLP kernels, the output head and its transform.
TARGETS = (r"attention/(query|key|value|out)$", r"mlp/w", r"lm_head$", r"head_transform$")
B, L = 3, 7


def _batch(cfg, seed=0) -> dict:
  """Two packed segments per row (3 + 4 tokens, the last row padded), random tokens and targets."""
  rng = np.random.default_rng(seed)
  lengths = [3, 4, 3, 4, 3, 2]

  def stream(prefix):
    tokens = [rng.integers(1, cfg.vocab_size, n).tolist() for n in lengths]
    targets = [rng.integers(1, cfg.vocab_size, n).tolist() for n in lengths]
    return rows(tokens, L, targets=targets, weights=[[1.0] * n for n in lengths], row_of=[0, 0, 1, 1, 2, 2],
                prefix=prefix)
  batch = stream("")
  if family(cfg).seq2seq:
    batch.update(stream("decoder_"))
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _method(cfg, **peft_overrides):
  config = common.get_config()
  config.peft.update(method="lora", lora_rank=3, lora_alpha=6.0, lora_targets=TARGETS)
  config.peft.update(**peft_overrides)
  return peft.Method(config.peft, cfg)


@functools.cache
def _base(name) -> dict:
  model = build_model(CONFIGS[name])
  return jax.jit(lambda rng: nn.meta.unbox(init_params(model, rng)))(jax.random.PRNGKey(0))


def _setup(name, **peft_overrides):
  """(model, base params, trained-looking adapters: random A and B, the method, a batch)."""
  cfg = CONFIGS[name]
  model, base = build_model(cfg), _base(name)
  method = _method(cfg, **peft_overrides)
  adapters = method.init_adapters(jax.random.PRNGKey(1), base)
  for i, ab in enumerate(adapters.values()):
    ab["b"] = 0.1 * jax.random.normal(jax.random.PRNGKey(100 + i), ab["b"].shape)
  return model, base, adapters, method, _batch(cfg)


def dense_delta(method, base, adapters, rng=None, deterministic=True) -> dict:
  """The former LoRA path, the reference here: each adapted kernel becomes W + s A' B (a dense [in..., out...]
  delta every step), A' = A with rows dropped by fold_in(rng, 7919 + i), i the adapter's sorted index."""
  cfg = method.cfg
  flat = traverse_util.flatten_dict(base)
  for i, (name, ab) in enumerate(sorted(adapters.items())):
    key, a = tuple(name.split(".")), ab["a"]
    if cfg.lora_dropout > 0 and not deterministic:
      keep = jax.random.bernoulli(jax.random.fold_in(rng, 7919 + i), 1 - cfg.lora_dropout, a.shape[:-1] + (1,))
      a = jnp.where(keep, a / (1 - cfg.lora_dropout), 0.0)
    flat[key] = flat[key] + jnp.tensordot(a, ab["b"], axes=1) * (cfg.lora_alpha / cfg.lora_rank)
  return {"params": traverse_util.unflatten_dict(flat)}, {}


def _loss(model, variables_of, base, batch, deterministic):
  """Mean token cross entropy as a function of (adapters, rng); `variables_of` builds the model's variables."""
  targets_key, weights_key = family(model.cfg).targets

  def loss(adapters, rng):
    variables, extra = variables_of(base, adapters, rng, deterministic)
    logits_BxLxV = model.apply(variables, batch, deterministic, rngs={"dropout": rng}, method="forward", **extra)
    loss_sum, weight_sum, _ = weighted_cross_entropy(logits_BxLxV, batch[targets_key], batch[weights_key])
    return loss_sum / weight_sum
  return loss


def _logits(model, variables, batch):
  return np.asarray(jax.jit(lambda v: model.apply(v, batch, method="forward"))(variables))


@pytest.mark.parametrize("name", CONFIGS)
def test_lora_branch_logits_equal_the_merged_kernel(name):
  model, base, adapters, method, batch = _setup(name)
  paths = {n.replace(".", "/") for n in adapters}
  kinds = {p.split("/")[-1] for p in paths}
  assert kinds >= {"query", "key", "value", "out", "lm_head", "head_transform"} and kinds & {"wi", "wi_gate"}
  if family(model.cfg).seq2seq:
    assert any("/cross_attention/" in p for p in paths)
  variables, extra = method.effective(base, adapters)
  assert extra == {} and variables["params"] is base
  lora = traverse_util.flatten_dict(variables["lora"], is_leaf=lambda _, v: set(v) == {"a", "b"})
  assert {"/".join(k) for k in lora} == paths  # nested like params ("layer_0" -> "attention" -> "query")
  unmerged = _logits(model, variables, batch)
  merged = _logits(model, {"params": method.merge(base, adapters)}, batch)
  np.testing.assert_allclose(unmerged, merged, atol=1e-5, rtol=0)
  assert np.abs(unmerged - _logits(model, {"params": base}, batch)).max() > 1e-2  # the adapters matter


def test_lora_on_some_layers_only_under_scan_layers():
  """Adapters on layer 1 alone do not stack with layer 0's: that stack runs as the loop, adapters applied."""
  model, base, adapters, method, batch = _setup("decoder_scan_layers", lora_targets=(r"layer_1/mlp/wo$",))
  assert list(adapters) == ["layer_1.mlp.wo"]
  variables, _ = method.effective(base, adapters)
  merged = _logits(model, {"params": method.merge(base, adapters)}, batch)
  np.testing.assert_allclose(_logits(model, variables, batch), merged, atol=1e-5, rtol=0)
  assert np.abs(merged - _logits(model, {"params": base}, batch)).max() > 1e-3


@pytest.mark.parametrize("name", ["decoder_gqa_untied_swiglu", "encoder_decoder_untied_gelu"])
def test_loss_and_gradients_equal_the_dense_delta(name):
  """Same loss and gradients w.r.t. A and B as W + s A B in training, dropout included: one mask of A's rows
  (x's input features) per step, from the same rng, shared by the whole batch."""
  model, base, adapters, method, batch = _setup(name, lora_dropout=0.4)
  rng = jax.random.PRNGKey(7)
  new = jax.jit(jax.value_and_grad(_loss(model, method.effective, base, batch, False)))
  old = jax.jit(jax.value_and_grad(_loss(model, functools.partial(dense_delta, method), base, batch, False)))
  (new_loss, new_grads), (old_loss, old_grads) = new(adapters, rng), old(adapters, rng)
  np.testing.assert_allclose(new_loss, old_loss, rtol=1e-6)
  for path, g in traverse_util.flatten_dict(old_grads).items():
    g_new = traverse_util.flatten_dict(new_grads)[path]
    assert np.abs(g).max() > 1e-4, path  # every A and B gets a gradient (B is non-zero, so A does too)
    # Float rounding of sums over the batch's tokens, relative to the largest entry; a wrong mask or scale is O(1).
    np.testing.assert_allclose(g_new, g, atol=1e-4 * np.abs(g).max(), rtol=1e-4, err_msg="/".join(path))
  # The mask does something, and is drawn from the step's rng.
  deterministic = jax.jit(_loss(model, method.effective, base, batch, True))(adapters, rng)
  other_rng, _ = new(adapters, jax.random.PRNGKey(8))
  assert abs(float(new_loss) - float(deterministic)) > 1e-4 and abs(float(new_loss) - float(other_rng)) > 1e-4


def _dot_output_shapes(jaxpr) -> list[tuple]:
  """Output shapes of every dot_general in a jaxpr, nested jaxprs (jit, remat, custom_vjp) included."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      shapes.append(tuple(eqn.outvars[0].aval.shape))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          shapes += _dot_output_shapes(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          shapes += _dot_output_shapes(sub)
  return shapes


@pytest.mark.parametrize("name", CONFIGS)
def test_training_never_forms_a_kernel_sized_delta(name):
  """No matmul of the loss's gradient w.r.t. the adapters outputs an adapted kernel's shape: neither A B nor a
  dense weight gradient. The former formulation does both (the check can fail)."""
  model, base, adapters, method, batch = _setup(name, lora_dropout=0.1)
  flat_base = traverse_util.flatten_dict(base)
  kernel_shapes = {tuple(flat_base[tuple(n.split("."))].shape) for n in adapters}
  rng = jax.random.PRNGKey(0)
  new = jax.make_jaxpr(jax.grad(_loss(model, method.effective, base, batch, False)))(adapters, rng)
  old = jax.make_jaxpr(jax.grad(_loss(model, functools.partial(dense_delta, method), base, batch, False)))(
      adapters, rng)
  assert not kernel_shapes & set(_dot_output_shapes(new.jaxpr))
  assert kernel_shapes <= set(_dot_output_shapes(old.jaxpr))


def test_steps_train_the_adapters_only_and_the_base_stays_bit_identical():
  model, base, adapters, method, batch = _setup("decoder_gqa_untied_swiglu", lora_dropout=0.1)
  before = jax.tree.map(np.array, base)
  model_params = lambda params, frozen, rng, deterministic: method.effective(
      frozen["base"], params["adapters"], rng, deterministic)
  tx = optax.adam(1e-2)
  step = jax.jit(lambda state, batch, frozen: train_step(state, batch, frozen, loss_fn=token_loss(model, model_params),
                                                         tx=tx))
  state = fresh_state({"adapters": adapters}, tx, jax.random.PRNGKey(0))
  losses = []
  for _ in range(5):
    state, metrics = step(state, batch, {"base": base})
    losses.append(float(metrics["loss_sum"] / metrics["weight_sum"]))
  assert losses[-1] < losses[0]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, base), before)
  assert all(not np.array_equal(new, old) for new, old in zip(jax.tree.leaves(state.params["adapters"]),
                                                                jax.tree.leaves(adapters)))
  # The trained adapters, merged for export, give the model the training path computes.
  variables, _ = method.effective(base, state.params["adapters"])
  np.testing.assert_allclose(_logits(model, {"params": method.merge(base, state.params["adapters"])}, batch),
                             _logits(model, variables, batch), atol=1e-5, rtol=0)


def test_bfloat16_branch_trains_every_kernel():
  """In bfloat16 (float32 accumulation, model/precision.py) the branch compiles for every adaptable kernel, and its
  gradients stay close to float32's."""
  model, base, adapters, method, batch = _setup("decoder_gqa_untied_swiglu")
  bf16 = build_model(dataclasses.replace(model.cfg, dtype="bfloat16"))
  rng = jax.random.PRNGKey(0)
  grads = {m: jax.jit(jax.grad(_loss(m, method.effective, base, batch, False)))(adapters, rng) for m in (model, bf16)}
  for path, g in traverse_util.flatten_dict(grads[model]).items():
    g_bf16 = np.asarray(traverse_util.flatten_dict(grads[bf16])[path], np.float32)
    assert np.abs(g_bf16 - g).max() < 0.1 * np.abs(g).max(), "/".join(path)
