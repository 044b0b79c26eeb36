"""Stability knobs: QK-norm (model.qk_norm, per head or over the whole projection) and PaLM's z-loss
(train.z_loss).

QK-norm: the normalised queries and keys equal a numpy RMSNorm and have unit RMS per head (or per projection) before
the scale; attention depends on q and k only through them; cached decoding equals the full forward; a sharded
forward equals the plain one; its scale is vector-like under µP; Qwen3 imports with transformers' logits and exports
to what transformers loads. z-loss: the sum equals a numpy formula, chunked equals whole, the gradient is that of
the cross entropy plus that of the z term, z_loss=0 leaves the step bit for bit as a plain cross-entropy loss, the
reported and evaluated losses stay the cross entropy. Wrong values are one error line naming the key.
"""

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import base
from model import parametrization
from model.config import ConfigError, ModelConfig
from model.families import build_model, init_params
from model.hf import common as hf_common
from model.decode import Sampling, generate
from model.layers import QKNorm
from test_accelerators import lm_batch, random_params
from test_generate import cached_logits
from test_train import REPO, tiny_config
from train import loop, runs, tasks
from train import mesh as mesh_lib
from train import step as step_lib
from train.state import TrainState


def qk_cfg(scope="head", **changes):
  cfg = ModelConfig(vocab_size=41, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                    max_len=64, position="rope", qk_norm=True, qk_norm_scope=scope)
  cfg = dataclasses.replace(cfg, **changes)
  cfg.validate()
  return cfg


def numpy_rms_norm(x, scale, eps, axes):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x * x, axis=axes, keepdims=True) + eps) * scale


@pytest.mark.parametrize("scope", ["head", "projection"])
def test_qk_norm_is_an_rms_norm_over_each_head_or_the_projection(scope):
  cfg = qk_cfg(scope)
  rng = np.random.default_rng(0)
  x_BxLxNxK = jnp.asarray(3.0 * rng.standard_normal((2, 5, 4, 8)) + 0.5, jnp.float32)
  module = QKNorm(cfg)
  params = nn.meta.unbox(module.init(jax.random.key(0), x_BxLxNxK)["params"])
  width = 8 if scope == "head" else 4 * 8
  assert params["scale"].shape == (width,)
  unit = np.asarray(module.apply({"params": params}, x_BxLxNxK))  # scale 1: the normalised vectors themselves
  groups = unit.reshape(2, 5, -1, width)
  np.testing.assert_allclose(np.sqrt(np.mean(groups ** 2, axis=-1)), 1.0, rtol=1e-5)
  if scope == "projection":  # one group of all heads: single heads are not normalised
    assert np.abs(np.sqrt(np.mean(unit ** 2, axis=-1)) - 1.0).max() > 0.05
  scale = rng.standard_normal(width).astype(np.float32)
  out = np.asarray(module.apply({"params": {"scale": jnp.asarray(scale)}}, x_BxLxNxK))
  x_groups = np.asarray(x_BxLxNxK).reshape(2, 5, -1, width)
  expected = numpy_rms_norm(x_groups, scale, cfg.norm_eps, axes=-1).reshape(x_BxLxNxK.shape)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scope", ["head", "projection"])
def test_attention_sees_queries_and_keys_only_through_their_norm(scope):
  """Scaling the query and key kernels (and biases) by 50 leaves a QK-normed model's logits as they were; without
  QK-norm they change."""
  tokens_BxL = jax.random.randint(jax.random.key(3), (2, 12), 0, 41)

  def logits(cfg, factor):
    model = build_model(cfg)
    params = random_params(model)
    scaled = jax.tree_util.tree_map_with_path(
        lambda path, x: x * factor if any(getattr(k, "key", "") in ("query", "key", "query_bias", "key_bias")
                                          for k in path) else x, params)
    return np.asarray(model.apply({"params": scaled}, tokens_BxL))

  cfg = qk_cfg(scope, norm_eps=1e-12)
  np.testing.assert_allclose(logits(cfg, 50.0), logits(cfg, 1.0), rtol=1e-4, atol=1e-4)
  plain = dataclasses.replace(cfg, qk_norm=False)
  assert np.abs(logits(plain, 50.0) - logits(plain, 1.0)).max() > 1e-2


@pytest.mark.parametrize("scope", ["head", "projection"])
@pytest.mark.parametrize("family", ["decoder", "encoder_decoder"])
def test_num_params_counts_the_qk_norm_scales(scope, family):
  """ModelConfig.num_params against the parameter tree (shapes only), cross-attention's scales included."""
  changes = {} if family == "decoder" else {"family": family, "position": "relative"}
  cfg = qk_cfg(scope, **changes)
  shapes = jax.eval_shape(lambda: init_params(build_model(cfg), jax.random.key(0), 4))
  assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(nn.meta.unbox(shapes)))
  assert cfg.num_params() > dataclasses.replace(cfg, qk_norm=False).num_params()


@pytest.mark.parametrize("scope", ["head", "projection"])
def test_cached_decoding_equals_full_forward_with_qk_norm(scope):
  model = build_model(qk_cfg(scope))
  params = random_params(model)
  tokens_BxL = jax.random.randint(jax.random.key(7), (3, 14), 0, 41)
  full_BxLxV = jax.jit(model.apply)({"params": params}, tokens_BxL)
  np.testing.assert_allclose(cached_logits(model, params, tokens_BxL), full_BxLxV, atol=1e-5, rtol=0)


def test_qk_norm_under_a_mesh_equals_one_device():
  """Data x fsdp x tensor = 2 x 2 x 2 with the default rules (heads over tensor): the RMS over all heads of a
  projection (qk_norm_scope "projection") reduces across the tensor axis, the flat scale is replicated, and the
  sharded forward gives the unsharded logits. (A per-head scale's axis "kv" maps to None: replicated too.)"""
  config = base.get_config()
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = mesh_lib.make_mesh(config.mesh)
  model = build_model(qk_cfg("projection"))
  run = runs.for_model(model, optax.sgd(0.1), mesh, mesh_lib.config_rules(config.mesh), seq_len=16)
  state = run.init_state()
  attention = run.shardings.params["layer_0"]["attention"]
  for name in ("query_norm", "key_norm"):
    assert tuple(attention[name]["scale"].spec) in ((), (None,))
  params = jax.device_get(state.params)
  params = jax.tree.map(lambda x: x + 0.1 * np.random.default_rng(0).standard_normal(x.shape).astype(x.dtype), params)
  tokens_BxL = jax.random.randint(jax.random.key(1), (4, 16), 0, 41)
  forward = lambda p, t: model.apply({"params": p}, t)
  sharded = jax.jit(loop.in_sharding_context(run, forward))(jax.device_put(params, run.shardings.params), tokens_BxL)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(jax.jit(forward)(params, tokens_BxL)), atol=1e-5)


def test_qk_norm_scales_are_vector_like_under_mup():
  """At twice the base width the scales start at 1 and take the rate of the block norms' scales, not 1/m."""
  section = dict(num_layers=1, d_model=32, num_heads=4, mlp_dim=0, head_dim=0, num_kv_heads=0, position="rope",
                 qk_norm=True, parametrization="mup", base_width=16)
  cfg = ModelConfig.from_config(section, 41)
  assert cfg.width_mult == 2.0
  model = build_model(cfg)
  boxed = init_params(model, jax.random.key(0), 4)
  attention = boxed["layer_0"]["attention"]
  norm_axes = boxed["layer_0"]["attention_norm"]["scale"].names
  for name in ("query_norm", "key_norm"):
    scale = attention[name]["scale"]
    assert np.array_equal(np.asarray(scale.value), np.ones(cfg.head_dim))
    assert not parametrization.is_hidden(scale.names)
    assert parametrization.update_scale(cfg, scale.names) == parametrization.update_scale(cfg, norm_axes)
  assert parametrization.update_scale(cfg, attention["query"].names) != 1.0  # the hidden kernels' differs


# ---- Hugging Face: Qwen3 (per-head q_norm / k_norm [head_dim]) ----

def _qwen3(vocab_size=97, tie=False):
  """A tiny Qwen3ForCausalLM (grouped-query, head_dim != d_model / heads) with every weight perturbed."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  config = transformers.Qwen3Config(vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=500.0,
                                    tie_word_embeddings=tie)
  model = transformers.Qwen3ForCausalLM(config)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _hf_logits(hf_model, tokens, mask, positions):
  import torch
  with torch.no_grad():
    return hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions)).logits.numpy()


def _max_diff(model, params, hf_model):
  from test_hf import _padded_batch
  tokens, mask, positions = _padded_batch(model.cfg.vocab_size)
  logits = model.apply({"params": params}, tokens, positions, mask.astype(np.int32))
  return float(np.abs(np.asarray(logits) - _hf_logits(hf_model, tokens, mask, positions))[mask == 1].max())


@pytest.mark.parametrize("tie", [False, True])
def test_qwen3_imports_with_transformers_logits_and_exports_back(tmp_path, tie):
  import torch
  import transformers
  hf_model = _qwen3(tie=tie)
  hf_model.save_pretrained(tmp_path / "qwen3", safe_serialization=True)
  _, section, cfg, params = hf_common.import_params(str(tmp_path / "qwen3"))
  assert section["qk_norm"] is True and cfg.qk_norm_scope == "head" and cfg.tie_embeddings == tie
  assert params["layer_1"]["attention"]["key_norm"]["scale"].shape == (16,)
  model = build_model(cfg)
  diff = _max_diff(model, params, hf_model)
  print(f"qwen3 tie={tie}: max |logits ablax - transformers| = {diff:.2e}")
  assert diff <= 1e-4
  if not tie:  # 20 greedy tokens of left-padded prompts, ablax's KV cache against transformers' generate
    prompts = [[5, 17, 9, 33, 2, 41, 8], [12, 60, 7]]
    ours = generate(model, params, prompts, max_new_tokens=20, sampling=Sampling(temperature=0.0))
    ids = torch.tensor([[0] * (7 - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (7 - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
      theirs = hf_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20, pad_token_id=0,
                                 eos_token_id=None)
    assert ours == theirs[:, 7:].tolist()
  hf_config, tensors = hf_common.export_tensors(cfg, params)
  assert hf_config["model_type"] == "qwen3"
  out = tmp_path / "export"
  out.mkdir()
  hf_common.write_json(hf_config, str(out / "config.json"))
  hf_common.write_safetensors(tensors, str(out / "model.safetensors"))
  again, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert type(again).__name__ == "Qwen3ForCausalLM"
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  for name, tensor in hf_model.state_dict().items():
    assert torch.equal(again.state_dict()[name], tensor), name


def test_a_native_qk_norm_model_exports_as_qwen3_with_its_logits(tmp_path):
  """ablax's own init (random weights) -> Qwen3 files -> transformers gives ablax's logits; Llama refuses it."""
  transformers = pytest.importorskip("transformers")
  cfg = qk_cfg("head", activation="swiglu", norm="rmsnorm", use_bias=False, tie_embeddings=False, rope_theta=500.0)
  model = build_model(cfg)
  params = jax.device_get(random_params(model))
  hf_config, tensors = hf_common.export_tensors(cfg, params)
  assert hf_config["architectures"] == ["Qwen3ForCausalLM"]
  hf_common.write_json(hf_config, str(tmp_path / "config.json"))
  hf_common.write_safetensors(tensors, str(tmp_path / "model.safetensors"))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert _max_diff(model, params, hf_model) <= 1e-4
  with pytest.raises(hf_common.ConversionError, match="qk_norm=True, Llama needs False"):
    hf_common.export_tensors(cfg, params, model_type="llama")
  projection = dataclasses.replace(cfg, qk_norm_scope="projection")
  with pytest.raises(hf_common.ConversionError, match="qk_norm_scope='projection', Qwen3 needs 'head'"):
    hf_common.export_tensors(projection, jax.device_get(random_params(build_model(projection))))


def test_qwen3_settings_ablax_lacks_are_refused(tmp_path):
  from model.hf import qwen3
  base_config = {"model_type": "qwen3", "hidden_size": 48, "num_attention_heads": 4, "num_hidden_layers": 2,
                 "intermediate_size": 96, "vocab_size": 97}
  assert qwen3.model_section(base_config)["head_dim"] == 128  # Qwen3's default, not d_model / heads
  for change, says in (({"attention_bias": True}, "attention_bias"),
                       ({"use_sliding_window": True}, "sliding-window"),
                       ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding-window")):
    with pytest.raises(hf_common.ConversionError, match=says):
      qwen3.model_section({**base_config, **change})


# ---- z-loss ----

ZCFG = ModelConfig(vocab_size=37, num_layers=1, d_model=32, num_heads=4, num_kv_heads=4, head_dim=8, mlp_dim=64,
                   max_len=16, tie_embeddings=False, head_bias=True)
Z = 0.3  # large, so that the z term's part of every gradient is far above float rounding


def z_setup():
  model = build_model(ZCFG)
  params = random_params(model)
  params = jax.tree_util.tree_map_with_path(  # a head bias far from 0: log Z far from log V
      lambda path, x: x + 2.0 if "head_bias" in jax.tree_util.keystr(path) else x, params)
  batch = lm_batch(ZCFG)
  batch["weights_BxL"] = batch["weights_BxL"] * (jnp.arange(16) % 3 != 0)[None]  # some unweighted: sums skip them
  return model, params, batch


def sums_and_grads(loss_fn, params, batch):
  def objective(p):
    sums = loss_fn(p, {}, batch, jax.random.key(0), True)
    return sums["loss_sum"] + sums.get("z_loss_sum", 0.0), sums
  (_, sums), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
  return sums, grads


def test_z_loss_sum_is_the_weighted_sum_of_log_z_squared():
  model, params, batch = z_setup()
  logits = np.asarray(jax.jit(lambda p: model.apply({"params": p}, batch, True, method="forward"))(params),
                      np.float64)
  top = logits.max(-1, keepdims=True)
  log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
  weights = np.asarray(batch["weights_BxL"], np.float64)
  expected = Z * np.sum(weights * log_z ** 2)
  assert np.abs(log_z).min() > 3.0 and weights.min() == 0.0
  sums, _ = sums_and_grads(step_lib.token_loss(model, z_loss=Z), params, batch)
  np.testing.assert_allclose(float(sums["z_loss_sum"]), expected, rtol=1e-5)
  plain, _ = sums_and_grads(step_lib.token_loss(model), params, batch)
  assert "z_loss_sum" not in plain
  for key in ("loss_sum", "weight_sum", "correct_sum"):  # the cross entropy's sums are unchanged
    np.testing.assert_allclose(float(sums[key]), float(plain[key]), rtol=1e-6)


def test_chunked_z_loss_equals_whole(monkeypatch):
  model, params, batch = z_setup()

  def run(limit):
    monkeypatch.setattr(step_lib, "LOGITS_PER_ROW", limit)
    return sums_and_grads(step_lib.token_loss(model, z_loss=Z), params, batch)

  (whole, whole_grads), (chunked, chunked_grads) = run(2**30), run(4 * ZCFG.vocab_size)
  assert step_lib.loss_chunks(16, ZCFG.vocab_size) == 4
  np.testing.assert_allclose(float(chunked["z_loss_sum"]), float(whole["z_loss_sum"]), rtol=1e-5)
  np.testing.assert_allclose(float(chunked["loss_sum"]), float(whole["loss_sum"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(whole_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_the_gradient_is_the_cross_entropy_s_plus_the_z_term_s():
  """train_step with SGD(1): the update is -(grad CE + grad z_loss * sum w log Z^2) / sum w, the z term's gradient
  taken directly of the model's logits (not through token_loss; chunked = whole is tested above)."""
  model, params, batch = z_setup()
  _, ce_grads = sums_and_grads(step_lib.token_loss(model), params, batch)

  def z_term(p):
    logits_BxLxV = model.apply({"params": p}, batch, True, method="forward")
    return Z * step_lib.weighted_z_loss(logits_BxLxV, batch["weights_BxL"])
  z_grads = jax.jit(jax.grad(z_term))(params)
  weight = float(jnp.sum(batch["weights_BxL"]))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optax.sgd(1.0).init(params),
                     rng=jax.random.PRNGKey(0))
  new, metrics = jax.jit(lambda s, b: step_lib.train_step(s, b, loss_fn=step_lib.token_loss(model, z_loss=Z),
                                                          tx=optax.sgd(1.0)))(state, batch)
  z_share = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(z_grads)) / max(
      float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ce_grads))
  assert z_share > 0.1  # the z term moves the parameters visibly
  expected = jax.tree.map(lambda g_ce, g_z: -(g_ce + g_z) / weight, ce_grads, z_grads)
  largest = max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(expected))
  for before, after, update in zip(*map(jax.tree.leaves, (params, new.params, expected))):
    # rtol: the rounding of parameters near 1 (norm scales) that take updates far below their ulp
    np.testing.assert_allclose(after, before + update, rtol=3e-7, atol=1e-4 * largest)
  assert float(metrics["z_loss_sum"]) > 0


def test_zero_z_loss_leaves_the_step_bit_for_bit():
  """train.z_loss = 0 computes nothing: the step equals, bit for bit, one whose loss is the plain cross entropy
  written here (the loss before z-loss existed), parameters, AdamW state and metrics."""
  model, params, batch = z_setup()

  def plain_cross_entropy(p, frozen, batch, rng, deterministic):
    logits_BxLxV = model.apply({"params": p}, batch, deterministic, rngs={"dropout": rng}, method="forward")
    loss_sum, weight_sum, correct_sum = step_lib.weighted_cross_entropy(logits_BxLxV, batch["targets_BxL"],
                                                                        batch["weights_BxL"])
    return {"loss_sum": loss_sum, "weight_sum": weight_sum, "correct_sum": correct_sum}

  tx = optax.adamw(1e-2, weight_decay=0.1)

  def two_steps(loss_fn):
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(0))
    step = jax.jit(lambda s, b: step_lib.train_step(s, b, loss_fn=loss_fn, tx=tx))
    state, _ = step(state, batch)
    return step(state, batch)

  ours, reference = two_steps(step_lib.token_loss(model, z_loss=0.0)), two_steps(plain_cross_entropy)
  assert set(ours[1]) == set(reference[1])
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_evaluation_and_reported_losses_stay_the_cross_entropy():
  model, params, batch = z_setup()
  with_z = step_lib.eval_step(params, batch, loss_fn=step_lib.token_loss(model, z_loss=Z))
  plain = step_lib.eval_step(params, batch, loss_fn=step_lib.token_loss(model))
  np.testing.assert_allclose(float(with_z["loss_sum"]), float(plain["loss_sum"]), rtol=1e-6)
  metrics, plain_metrics = loop.summarize(jax.device_get(with_z), "eval"), loop.summarize(jax.device_get(plain), "eval")
  weight = float(with_z["weight_sum"])
  assert metrics["eval/z_loss"] == pytest.approx(float(with_z["z_loss_sum"]) / weight)
  assert metrics["eval/loss"] == pytest.approx(plain_metrics["eval/loss"], rel=1e-6)
  assert "eval/z_loss" not in plain_metrics


def test_a_run_with_qk_norm_and_z_loss_logs_the_z_term(tmp_path):
  from train.pretrain import train_and_evaluate
  config = tiny_config(tmp_path, steps=3, eval_every=3, checkpoint_every=3, z_loss=1e-2)
  config.model.update(qk_norm=True, dropout=0.0)
  workdir = str(tmp_path / "run")
  train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [1, 2, 3]
  for record in records:  # log Z of a fresh model is near log V: the term is about z_loss * log(V)^2
    assert 0.1 < record["train/z_loss"] / 1e-2 < 100 and np.isfinite(record["train/loss"])
  assert "eval/z_loss" in records[-1] and records[-1]["eval/loss"] > 0


# ---- config validation ----

def test_wrong_values_name_the_key():
  with pytest.raises(ConfigError, match=r"^config.model.qk_norm: expected True or False, got 'yes'$"):
    ModelConfig.from_config({"qk_norm": "yes"}, 41)
  with pytest.raises(ConfigError, match=r"^config.model.qk_norm_scope: expected one of head, projection"):
    ModelConfig.from_config({"qk_norm": True, "qk_norm_scope": "heads"}, 41)
  mesh_cfg = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1, "slices": 1})
  mesh = mesh_lib.make_mesh(mesh_cfg)
  for value in ("0.1", -1e-4, float("nan"), True):  # a hand-edited config.json keeps the type it was given
    config = base.with_defaults({"train": {"z_loss": value}})
    with pytest.raises(ConfigError, match=r"^config.train.z_loss: expected a number >= 0, got "):
      loop.check_train_config(config, mesh)
  loop.check_train_config(base.with_defaults({"train": {"z_loss": 1e-4}}), mesh)
  with pytest.raises(ConfigError, match=r"^config.train.z_loss: 0.0001 acts on token logits"):
    tasks.make_loss("classify", None, 1e-4)  # a classifier's loss has no token logits: refused, not ignored


@pytest.mark.parametrize("arg, expected", [
    ("--config.train.z_loss=-1", "error: config.train.z_loss: expected a number >= 0, got -1.0"),
    ("--config.model.qk_norm_scope=heads", "error: config.model.qk_norm_scope: expected one of head, projection"),
])
def test_cli_errors_are_one_line(tmp_path, arg, expected):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, "-m", "train.pretrain", "--config=configs/quickstart.py",
                           f"--workdir={tmp_path / 'run'}", arg], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith(expected), result.stderr


def test_a_fused_kernel_receives_normalised_queries_and_keys(monkeypatch):
  """attention_impl=splash (Pallas, interpreted on CPU): the kernel is handed q and k of unit RMS per head (scales at
  their init 1; RoPE rotates pairs, which keeps the RMS) and the logits equal einsum's."""
  from model import flash
  monkeypatch.setattr(flash, "SPLASH_BLOCKS", (128,))
  seen, kernel = {}, flash.splash_attention

  def recording(q_BxLxHxK, k_BxSxGxK, *args):
    seen.update(q=q_BxLxHxK, k=k_BxSxGxK)
    return kernel(q_BxLxHxK, k_BxSxGxK, *args)

  monkeypatch.setattr(flash, "splash_attention", recording)
  cfg = qk_cfg("head", num_layers=1, max_len=128)
  model = build_model(cfg)
  params = nn.meta.unbox(init_params(model, jax.random.key(0), 8))
  params = jax.tree.map(lambda x: x if x.ndim == 1 and np.all(np.asarray(x) == 1) else x + 0.2 * jax.random.normal(
      jax.random.key(x.size), x.shape), params)  # every weight but the (unit) norm scales perturbed
  tokens_BxL = jax.random.randint(jax.random.key(2), (1, 128), 0, 41)
  einsum_logits = model.apply({"params": params}, tokens_BxL)
  splash_logits = build_model(dataclasses.replace(cfg, attention_impl="splash")).apply({"params": params}, tokens_BxL)
  for name in ("q", "k"):
    rms_BxLxN = np.sqrt(np.mean(np.square(np.asarray(seen[name], np.float64)), axis=-1))
    np.testing.assert_allclose(rms_BxLxN, 1.0, rtol=1e-3)
  np.testing.assert_allclose(np.asarray(splash_logits), np.asarray(einsum_logits), rtol=1e-5, atol=1e-5)
