"""Model invariants and independent references: causality (values and gradients), packed segments,
every config axis forward+backward, parameter/FLOP counts, a numpy forward pass, GQA == repeated-kv MHA,
RoPE relativity, ALiBi slopes, T5 relative-position buckets, remat == no remat, dot_product attention == einsum,
dropout, config errors, full-size shapes via eval_shape.

Tiny dims throughout (V=37, D=32, 2 layers, H=4, K=8, L=16).
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.attention import alibi_slopes, apply_rope, relative_position_bucket, sinusoidal_embedding
from model.config import POSITIONS, ConfigError, ModelConfig
from model.layers import Embed
from model.precision import add_bias, gelu, softmax
from model.precision import einsum as mixed_einsum
from model.families import build_model
from model.transformer import Decoder

BASE = ModelConfig(vocab_size=37, num_layers=2, d_model=32, num_heads=4, num_kv_heads=4, head_dim=8,
                   mlp_dim=64, max_len=16)
B, L = 4, 16  # every model call uses these shapes, so eager primitives compile once


def make_cfg(**changes) -> ModelConfig:
  cfg = dataclasses.replace(BASE, **changes)
  cfg.validate()
  return cfg


@functools.cache
def init_params(cfg: ModelConfig, seed: int = 0):
  """Plain params with the real tree (from `eval_shape` of init, so nothing is compiled): scales near 1,
  everything else N(0, 0.1^2), so zero-initialised biases and unit scales matter too."""
  tokens_BxL = jax.ShapeDtypeStruct((1, L), jnp.int32)
  shapes = nn.meta.unbox(jax.eval_shape(Decoder(cfg).init, jax.random.key(0), tokens_BxL)["params"])
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    value = 0.1 * rng.standard_normal(leaf.shape)
    if jax.tree_util.keystr(path).endswith("['scale']"):
      value += 1.0
    return jnp.asarray(value, leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


# Model functions run eagerly: XLA compiles each primitive once and the cache is shared by every config,
# which on CPU is several times cheaper than compiling a whole graph for each of ~20 configs.
def forward_fn(cfg: ModelConfig):
  """(params, tokens, positions, segments) -> float32 logits, deterministic."""
  def forward(params, tokens_BxL, positions_BxL, segment_ids_BxL):
    return Decoder(cfg).apply({"params": params}, tokens_BxL, positions_BxL, segment_ids_BxL,
                              deterministic=True)
  return forward


def default_positions(batch: int = B, length: int = L):
  return jnp.broadcast_to(jnp.arange(length), (batch, length))


def one_segment(batch: int = B, length: int = L):
  return jnp.ones((batch, length), jnp.int32)


def random_tokens(seed: int, batch: int = B, length: int = L, vocab: int = BASE.vocab_size):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)), jnp.int32)


def case_id(changes):
  return "-".join(f"{k}={v}" for k, v in changes.items()) or "default"


# ----------------------------------------------------------------------------------------------------------
# 1. Causality
# ----------------------------------------------------------------------------------------------------------

CAUSAL_CASES = [dict(position=p) for p in POSITIONS] + [
    dict(position="rope", num_kv_heads=2), dict(position="alibi", num_kv_heads=1)]


@pytest.mark.parametrize("changes", CAUSAL_CASES, ids=case_id)
def test_causality_values(changes):
  cfg = make_cfg(**changes)
  base_L = np.asarray(random_tokens(0, 1)[0])
  rows = [base_L]
  cut_points = [0, 9]
  for t in cut_points:  # change every token after t
    row = base_L.copy()
    row[t + 1:] = (row[t + 1:] + 1 + np.arange(L - t - 1)) % cfg.vocab_size
    rows.append(row)
  earlier = base_L.copy()
  earlier[3] = (earlier[3] + 5) % cfg.vocab_size  # change one token before t=9
  rows.append(earlier)
  tokens_BxL = jnp.asarray(np.stack(rows), jnp.int32)
  logits_BxLxV = np.asarray(forward_fn(cfg)(init_params(cfg), tokens_BxL, default_positions(), one_segment()))
  for i, t in enumerate(cut_points, start=1):
    np.testing.assert_allclose(logits_BxLxV[i, :t + 1], logits_BxLxV[0, :t + 1], atol=1e-6, rtol=0)
    assert np.abs(logits_BxLxV[i, t + 1:] - logits_BxLxV[0, t + 1:]).max() > 1e-4  # later ones do move
  np.testing.assert_allclose(logits_BxLxV[3, :3], logits_BxLxV[0, :3], atol=1e-6, rtol=0)
  assert np.abs(logits_BxLxV[3, 9] - logits_BxLxV[0, 9]).max() > 1e-4  # an earlier token reaches t=9


def embedding_grad_fn(cfg: ModelConfig):
  """(params, tokens, cotangent_BxLxV) -> d <logits, cotangent> / d input embeddings [B, L, D].

  The input embeddings are perturbed by a zero `delta` added to the output of the token embedding
  (Embed.__call__, by method interception), i.e. before positions, dropout and the blocks.
  """
  def grad(params, tokens_BxL, cotangent_BxLxV):
    def logits_from(delta_BxLxD):
      def add_delta(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, Embed) and context.method_name == "__call__":
          out = out + delta_BxLxD.astype(out.dtype)
        return out
      with nn.intercept_methods(add_delta):
        return Decoder(cfg).apply({"params": params}, tokens_BxL, deterministic=True)
    _, vjp = jax.vjp(logits_from, jnp.zeros(tokens_BxL.shape + (cfg.d_model,), jnp.float32))
    return vjp(cotangent_BxLxV)[0]
  return grad


@pytest.mark.parametrize("changes", CAUSAL_CASES, ids=case_id)
def test_causality_gradients(changes):
  cfg = make_cfg(**changes)
  # Batch rows are independent, so row b can probe one query position t_b with a single backward pass:
  # the cotangent is a random vector on logits[b, t_b] and zero elsewhere.
  query_positions = [0, 6, 11, 15]
  cotangent_BxLxV = np.zeros((B, L, cfg.vocab_size), np.float32)
  for b, t in enumerate(query_positions):
    cotangent_BxLxV[b, t] = np.random.default_rng(b).standard_normal(cfg.vocab_size)
  grad_BxLxD = np.asarray(embedding_grad_fn(cfg)(init_params(cfg), random_tokens(1), jnp.asarray(cotangent_BxLxV)))
  influence_BxL = np.abs(grad_BxLxD).max(axis=-1)
  for b, t in enumerate(query_positions):
    assert np.all(influence_BxL[b, t + 1:] == 0.0), f"logits at {t} depend on embeddings after {t}"
    assert np.all(influence_BxL[b, :t + 1] > 0.0), f"some position <= {t} has no influence on logits at {t}"


# ----------------------------------------------------------------------------------------------------------
# 2. Packed segments are independent
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes", [dict(position=p) for p in POSITIONS] + [dict(position="rope", num_kv_heads=2)],
                         ids=case_id)
def test_packed_segments_match_separate_rows(changes):
  cfg = make_cfg(**changes)
  a, b = 6, 7  # row 0: segment A, segment B, then L - a - b = 3 padding tokens
  pad = L - a - b
  seg_a, seg_b = np.asarray(random_tokens(5, 1, a)[0]), np.asarray(random_tokens(6, 1, b)[0])
  zeros = lambda n: np.zeros(n, np.int64)
  packed_tokens = np.concatenate([seg_a, seg_b, zeros(pad)])
  packed_positions = np.concatenate([np.arange(a), np.arange(b), zeros(pad)])
  packed_segments = np.concatenate([np.full(a, 1), np.full(b, 2), zeros(pad)])
  tokens_BxL = np.stack([packed_tokens,
                         np.concatenate([seg_a, zeros(L - a)]),   # row 1: A alone
                         np.concatenate([seg_b, zeros(L - b)]),   # row 2: B alone
                         packed_tokens])                          # row 3: A and B wrongly as one segment
  positions_BxL = np.stack([packed_positions,
                            np.concatenate([np.arange(a), zeros(L - a)]),
                            np.concatenate([np.arange(b), zeros(L - b)]),
                            packed_positions])
  segments_BxL = np.stack([packed_segments,
                           np.concatenate([np.full(a, 1), zeros(L - a)]),
                           np.concatenate([np.full(b, 1), zeros(L - b)]),
                           np.minimum(packed_segments, 1)])
  as_int = lambda x: jnp.asarray(x, jnp.int32)
  logits_BxLxV = np.asarray(forward_fn(cfg)(init_params(cfg), as_int(tokens_BxL), as_int(positions_BxL),
                                            as_int(segments_BxL)))
  assert np.all(np.isfinite(logits_BxLxV))  # padding queries (fully masked rows) must not produce NaN
  np.testing.assert_allclose(logits_BxLxV[0, :a], logits_BxLxV[1, :a], atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits_BxLxV[0, a:a + b], logits_BxLxV[2, :b], atol=1e-5, rtol=0)
  # Row 3 lets B attend to A: different logits, so the comparison above can fail.
  assert np.abs(logits_BxLxV[3, a:a + b] - logits_BxLxV[2, :b]).max() > 1e-4


# ----------------------------------------------------------------------------------------------------------
# 3. Every config axis: forward and backward, finite, every leaf gets a gradient
# ----------------------------------------------------------------------------------------------------------

AXES = ([dict(position=p) for p in POSITIONS if p != BASE.position]
        + [dict(norm="rmsnorm"), dict(norm_position="post"), dict(activation="gelu_tanh"),
           dict(activation="swiglu"), dict(num_kv_heads=2), dict(num_kv_heads=1), dict(tie_embeddings=False),
           dict(use_bias=False), dict(remat=True), dict(dtype="bfloat16"), dict(activation="relu"),
           dict(activation="geglu"), dict(scale_attention=False), dict(embed_norm=True), dict(head_transform=True),
           dict(head_bias=True), dict(scale_tied_logits=True)])


def loss_and_grad_fn(cfg: ModelConfig):
  """(params, tokens) -> ((mean next-token cross entropy, logits), grads)."""
  def loss_fn(params, tokens_BxL):
    logits_BxLxV = Decoder(cfg).apply({"params": params}, tokens_BxL, deterministic=True)
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV[:, :-1], axis=-1)
    targets_BxL = tokens_BxL[:, 1:]
    nll = -jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)
    return jnp.mean(nll), logits_BxLxV
  return jax.value_and_grad(loss_fn, has_aux=True)


@pytest.mark.parametrize("changes", [{}] + AXES, ids=case_id)
def test_every_axis_forward_backward(changes):
  cfg = make_cfg(**changes)
  params = init_params(cfg)
  tokens_BxL = random_tokens(7)
  (loss, logits_BxLxV), grads = loss_and_grad_fn(cfg)(params, tokens_BxL)
  assert logits_BxLxV.shape == (B, L, cfg.vocab_size) and logits_BxLxV.dtype == jnp.float32
  assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(logits_BxLxV)))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    name = jax.tree_util.keystr(path)
    assert g.dtype == jnp.float32, name  # params (and so grads) stay float32 even with bf16 compute
    assert np.all(np.isfinite(np.asarray(g))), name
    assert np.any(np.asarray(g) != 0), f"zero gradient for {name}"
  if cfg.dtype == "bfloat16":  # bf16 compute should still be close to the float32 model
    _, logits32 = loss_and_grad_fn(make_cfg())(params, tokens_BxL)[0]
    np.testing.assert_allclose(logits_BxLxV, logits32, atol=0.05)


# ----------------------------------------------------------------------------------------------------------
# 4. Parameter and FLOP counts
# ----------------------------------------------------------------------------------------------------------

def real_param_count(cfg: ModelConfig) -> int:
  shapes = jax.eval_shape(Decoder(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes)))


@pytest.mark.parametrize("changes", [{}] + AXES + [
    dict(activation="swiglu", norm="rmsnorm", use_bias=False, position="rope", num_kv_heads=2,
         tie_embeddings=False),
    dict(norm_position="post", use_bias=False, num_layers=3, mlp_dim=48, head_dim=12),
    dict(head_transform=True, use_bias=False, norm="rmsnorm", embed_norm=True, relative_buckets=8,
         position="relative")], ids=case_id)
def test_num_params_matches_tree(changes):
  cfg = make_cfg(**changes)
  assert cfg.num_params() == real_param_count(cfg)


@pytest.mark.parametrize("changes", [
    dict(family="encoder", norm_position="post", embed_norm=True, head_transform=True, head_bias=True),  # BERT
    dict(family="encoder_decoder", position="relative", relative_buckets=8, norm="rmsnorm", use_bias=False,
         activation="relu", scale_attention=False, scale_tied_logits=True),                         # T5 v1.0
    dict(family="encoder_decoder", position="relative", norm="rmsnorm", use_bias=False, activation="geglu",
         tie_embeddings=False, embed_norm=True, head_transform=True, head_bias=True)], ids=case_id)
def test_num_params_matches_tree_for_every_family(changes):
  cfg = make_cfg(**changes)
  tokens = jnp.zeros((1, 4), jnp.int32)
  args = (tokens, None, None, tokens) if cfg.family == "encoder_decoder" else (tokens,)
  shapes = jax.eval_shape(build_model(cfg).init, jax.random.key(0), *args)["params"]
  assert cfg.num_params() == sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes)))


def test_num_params_without_embeddings():
  cfg = make_cfg(tie_embeddings=False)  # learned positions, untied head
  embeddings = 37 * 32 * 2 + 16 * 32
  assert cfg.num_params(include_embeddings=False) == real_param_count(cfg) - embeddings


def test_non_embedding_params_by_hand():
  """(FLOPs are checked against XLA's own count in tests/test_flops.py.)"""
  cfg = make_cfg()  # V=37 D=32 2 layers H=G=4 K=8 F=64, layernorm with bias, gelu, learned, tied
  per_layer = (32 * 8 * 4 * 4          # q, k, v, out kernels
               + 8 * 4 * 3 + 32        # q, k, v biases [H, K] and out bias [D]
               + 32 * 64 * 2 + 64 + 32  # mlp kernels and biases
               + 2 * 2 * 32)           # two layernorms, scale and bias
  non_embedding = 2 * per_layer + 2 * 32  # + final norm
  assert cfg.num_params(include_embeddings=False) == non_embedding


# ----------------------------------------------------------------------------------------------------------
# 5. Independent references
# ----------------------------------------------------------------------------------------------------------

def np_layernorm(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_gelu(x):
  erf = np.vectorize(math.erf)
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def np_decoder_1layer(p, tokens, eps):
  """Plain numpy GPT-2 style forward: learned positions, pre-LN, MHA with causal mask, exact GELU, tied head."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  table = p["embed"]["embedding"]
  batch, length = tokens.shape
  x = table[tokens] + p["position_embedding"][np.arange(length)][None]
  lp = p["layer_0"]
  att = lp["attention"]
  h = np_layernorm(x, lp["attention_norm"]["scale"], lp["attention_norm"]["bias"], eps)
  heads, head_dim = att["query"].shape[1:]
  q = np.einsum("bld,dhk->bhlk", h, att["query"]) + att["query_bias"][None, :, None, :]
  k = np.einsum("bld,dhk->bhlk", h, att["key"]) + att["key_bias"][None, :, None, :]
  v = np.einsum("bld,dhk->bhlk", h, att["value"]) + att["value_bias"][None, :, None, :]
  out = np.zeros((batch, heads, length, head_dim))
  for bi in range(batch):
    for hi in range(heads):
      scores = q[bi, hi] @ k[bi, hi].T / math.sqrt(head_dim)
      scores[np.triu_indices(length, k=1)] = -np.inf
      weights = np.exp(scores - scores.max(-1, keepdims=True))
      weights /= weights.sum(-1, keepdims=True)
      out[bi, hi] = weights @ v[bi, hi]
  x = x + np.einsum("bhlk,hkd->bld", out, att["out"]) + att["out_bias"]
  mlp = lp["mlp"]
  h = np_layernorm(x, lp["mlp_norm"]["scale"], lp["mlp_norm"]["bias"], eps)
  x = x + np_gelu(h @ mlp["wi"] + mlp["wi_bias"]) @ mlp["wo"] + mlp["wo_bias"]
  x = np_layernorm(x, p["final_norm"]["scale"], p["final_norm"]["bias"], eps)
  return x @ table.T


def test_decoder_matches_numpy_reference():
  cfg = make_cfg(num_layers=1, position="learned", activation="gelu", norm="layernorm",
                 norm_position="pre", tie_embeddings=True, use_bias=True)
  params = init_params(cfg)
  tokens_BxL = random_tokens(11)
  logits = np.asarray(forward_fn(cfg)(params, tokens_BxL, default_positions(), one_segment()))
  expected = np_decoder_1layer(params, np.asarray(tokens_BxL), cfg.norm_eps)
  assert np.abs(expected).max() > 1.0  # the comparison is not between two near-zero tensors
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_gqa_equals_mha_with_repeated_kv(kv_heads):
  gqa_cfg = make_cfg(position="rope", num_kv_heads=kv_heads)
  mha_cfg = make_cfg(position="rope", num_kv_heads=4)
  gqa = init_params(gqa_cfg)
  repeats = 4 // kv_heads  # head h reads kv head h // repeats (q is reshaped [G, R])
  mha = jax.tree.map(lambda a: a, gqa)
  for i in range(gqa_cfg.num_layers):
    att = dict(gqa[f"layer_{i}"]["attention"])
    for name in ("key", "value"):
      att[name] = jnp.repeat(att[name], repeats, axis=1)                  # [D, G, K] -> [D, H, K]
      att[name + "_bias"] = jnp.repeat(att[name + "_bias"], repeats, axis=0)  # [G, K] -> [H, K]
    mha[f"layer_{i}"] = {**gqa[f"layer_{i}"], "attention": att}
  args = (random_tokens(12), default_positions(), one_segment())
  logits_gqa = np.asarray(forward_fn(gqa_cfg)(gqa, *args))
  logits_mha = np.asarray(forward_fn(mha_cfg)(mha, *args))
  np.testing.assert_allclose(logits_gqa, logits_mha, atol=1e-5, rtol=0)
  # The MHA model's own (non-repeated) kv weights give something else: the comparison can fail.
  logits_other = np.asarray(forward_fn(mha_cfg)(init_params(mha_cfg), *args))
  assert np.abs(logits_other - logits_gqa).max() > 1e-3


def test_rope_dot_product_depends_only_on_offset():
  head_dim = 16
  q_K, k_K = np.random.default_rng(0).normal(size=(2, head_dim)).astype(np.float32)

  def rotate(vec_K, position):
    x_1x1x1xK = jnp.asarray(vec_K)[None, None, None, :]
    return np.asarray(apply_rope(x_1x1x1xK, jnp.full((1, 1), position), 10_000.0))[0, 0, 0]

  def score(m, n):
    return float(rotate(q_K, m) @ rotate(k_K, n))

  for offset in (0, 1, 5):
    scores = [score(n + offset, n) for n in (0, 3, 11, 40)]
    np.testing.assert_allclose(scores, scores[0], atol=1e-4)
  assert abs(score(5, 0) - score(6, 0)) > 1e-3  # the score does depend on the offset
  np.testing.assert_allclose(rotate(q_K, 0), q_K, atol=1e-6)  # position 0 is the identity
  np.testing.assert_allclose(np.linalg.norm(rotate(q_K, 7)), np.linalg.norm(q_K), rtol=1e-5)  # a rotation


def test_alibi_slopes():
  np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -i for i in range(1, 9)], rtol=1e-6)
  # Non-power-of-two rule (Press et al.): the 4 slopes of the nearest power of two, 2^-2, 2^-4, 2^-6, 2^-8,
  # then every other slope of the 8-head sequence, 2^-1, 2^-3, ..., until 6 heads are filled.
  expected_6 = [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
  np.testing.assert_allclose(alibi_slopes(6), expected_6, rtol=1e-6)
  np.testing.assert_allclose(alibi_slopes(4), [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8], rtol=1e-6)


def test_relative_position_buckets_by_hand():
  """T5's 32 buckets, max distance 128. Bidirectional: 16 per direction, exact below 8, then
  8 + floor(2 * log2(d / 8)) up to 15; keys after the query add 16. Causal: 32 for earlier keys only,
  exact below 16, then 16 + floor(16 * log2(d / 16) / 3) up to 31; later keys share bucket 0."""
  offsets = jnp.asarray([0, -1, -7, -8, -11, -12, -15, -16, -22, -23, -32, -45, -46, -64, -90, -91, -128, -1000,
                         1, 7, 8, 16, 91, 1000])
  bidirectional = [0, 1, 7, 8, 8, 9, 9, 10, 10, 11, 12, 12, 13, 14, 14, 15, 15, 15,
                   17, 23, 24, 26, 31, 31]
  causal = [0, 1, 7, 8, 11, 12, 15, 16, 18, 18, 21, 23, 24, 26, 29, 29, 31, 31,
            0, 0, 0, 0, 0, 0]
  np.testing.assert_array_equal(relative_position_bucket(offsets, True, 32, 128), bidirectional)
  np.testing.assert_array_equal(relative_position_bucket(offsets, False, 32, 128), causal)
  distances = np.arange(300)
  by_formula = np.where(distances < 8, distances,
                        np.minimum(8 + np.floor(2 * np.log2(np.maximum(distances, 1) / 8)), 15))
  np.testing.assert_array_equal(relative_position_bucket(jnp.asarray(-distances), True, 32, 128), by_formula)
  np.testing.assert_array_equal(relative_position_bucket(jnp.asarray(distances[1:]), True, 32, 128),
                                16 + by_formula[1:])
  by_formula = np.where(distances < 16, distances,
                        np.minimum(16 + np.floor(16 * np.log2(np.maximum(distances, 1) / 16) / 3), 31))
  np.testing.assert_array_equal(relative_position_bucket(jnp.asarray(-distances), False, 32, 128), by_formula)


def test_sinusoidal_embedding():
  emb = np.asarray(sinusoidal_embedding(jnp.array([[0, 3]]), 10))
  assert emb.shape == (1, 2, 10)
  np.testing.assert_array_equal(emb[0, 0], [0.0] * 5 + [1.0] * 5)
  # Position 3: sin then cos of 3 / 10000^(i / (half - 1)), i = 0..4.
  angles = 3.0 / 10_000.0 ** (np.arange(5) / 4)
  np.testing.assert_allclose(emb[0, 1], np.concatenate([np.sin(angles), np.cos(angles)]), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# 6. remat == no remat; scan over layers == the loop
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("position", ["learned", "rope", "relative"])
def test_remat_matches_no_remat(position):
  plain_cfg, remat_cfg = make_cfg(position=position), make_cfg(position=position, remat=True)
  params = init_params(plain_cfg)
  assert jax.tree.structure(params) == jax.tree.structure(init_params(remat_cfg))
  tokens_BxL = random_tokens(13)
  (loss_a, logits_a), grads_a = loss_and_grad_fn(plain_cfg)(params, tokens_BxL)
  (loss_b, logits_b), grads_b = loss_and_grad_fn(remat_cfg)(params, tokens_BxL)
  np.testing.assert_allclose(logits_b, logits_a, atol=1e-6, rtol=0)
  np.testing.assert_allclose(loss_b, loss_a, atol=1e-6, rtol=0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-6, rtol=0), grads_a, grads_b)


@pytest.mark.parametrize("changes", [dict(scan_layers=True), dict(scan_layers=True, position="relative"),
                                     dict(scan_layers=True, remat=True, remat_policy="dots", num_kv_heads=2),
                                     dict(remat=True, remat_policy="dots_all", position="rope")], ids=case_id)
def test_scan_and_remat_policies_match_the_plain_loop(changes):
  """How the blocks are computed (a lax.scan over stacked layers, what remat saves) changes neither the parameter
  tree nor the numbers."""
  plain_cfg = make_cfg(num_layers=3, position=changes.get("position", "learned"),
                       num_kv_heads=changes.get("num_kv_heads", 4))
  cfg = dataclasses.replace(plain_cfg, **changes)
  params = init_params(plain_cfg)
  assert jax.tree.structure(params) == jax.tree.structure(init_params(cfg))
  tokens_BxL = random_tokens(15)
  (loss_a, logits_a), grads_a = jax.jit(loss_and_grad_fn(plain_cfg))(params, tokens_BxL)
  (loss_b, logits_b), grads_b = jax.jit(loss_and_grad_fn(cfg))(params, tokens_BxL)
  np.testing.assert_allclose(logits_b, logits_a, atol=2e-5, rtol=0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-5), grads_a, grads_b)


def test_scanned_encoder_decoder_matches_the_loop():
  plain_cfg = make_cfg(family="encoder_decoder", position="relative", tie_embeddings=False)
  scan_cfg = dataclasses.replace(plain_cfg, scan_layers=True)
  tokens_BxS, tokens_BxL = random_tokens(16), random_tokens(17)[:, :5]
  model = build_model(plain_cfg)
  params = model.init(jax.random.key(0), tokens_BxS, None, None, tokens_BxL)["params"]
  logits = lambda cfg: build_model(cfg).apply({"params": params}, tokens_BxS, None, None, tokens_BxL)
  np.testing.assert_allclose(logits(scan_cfg), logits(plain_cfg), atol=2e-5, rtol=0)


ATTENTION_IMPL_CASES = [dict(position="learned"), dict(position="rope"), dict(position="rope", num_kv_heads=2),
                        dict(position="alibi", num_kv_heads=2), dict(position="relative", scale_attention=False)]


@pytest.mark.parametrize("changes", ATTENTION_IMPL_CASES, ids=case_id)
def test_dot_product_attention_matches_einsum(changes):
  """jax.nn.dot_product_attention gives the einsum path's logits and gradients: GQA, ALiBi and T5's bias (passed
  as its bias), unscaled logits."""
  einsum_cfg = make_cfg(**changes)
  params = init_params(einsum_cfg)
  tokens_BxL = random_tokens(16)
  (_, logits_a), grads_a = loss_and_grad_fn(einsum_cfg)(params, tokens_BxL)
  (_, logits_b), grads_b = loss_and_grad_fn(dataclasses.replace(einsum_cfg, attention_impl="dot_product"))(
      params, tokens_BxL)
  np.testing.assert_allclose(logits_b, logits_a, atol=2e-5, rtol=0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-5), grads_a, grads_b)


def test_dot_product_attention_matches_einsum_on_packed_segments():
  """Two packed segments and padding (fully masked query rows) in one row; a bf16 model too."""
  a, b = 6, 7
  segments_L = np.concatenate([np.full(a, 1), np.full(b, 2), np.zeros(L - a - b, np.int64)])
  positions_L = np.concatenate([np.arange(a), np.arange(b), np.zeros(L - a - b, np.int64)])
  segments_BxL = jnp.asarray(np.broadcast_to(segments_L, (B, L)), jnp.int32)
  positions_BxL = jnp.asarray(np.broadcast_to(positions_L, (B, L)), jnp.int32)
  tokens_BxL = random_tokens(17)
  for dtype, atol in [("float32", 2e-5), ("bfloat16", 0.05)]:
    cfg = make_cfg(position="rope", num_kv_heads=2, dtype=dtype)
    params = init_params(cfg)
    logits = lambda impl: np.asarray(forward_fn(dataclasses.replace(cfg, attention_impl=impl))(
        params, tokens_BxL, positions_BxL, segments_BxL))
    np.testing.assert_allclose(logits("dot_product"), logits("einsum"), atol=atol, rtol=0)


@pytest.mark.parametrize("spec, x_shape, w_shape", [("bld,dhk->blhk", (2, 5, 8), (8, 3, 4)),
                                                    ("blgrk,bsgk->bgrls", (2, 5, 2, 3, 4), (2, 6, 2, 4)),
                                                    ("blhk,hkd->bld", (2, 5, 3, 4), (3, 4, 8))])
def test_mixed_precision_products_accumulate_in_float32_forward_and_backward(spec, x_shape, w_shape):
  """bf16 operands: value and gradients close to float32's, and all three products (forward, both backward) are
  bf16 x bf16 -> f32 (XLA's fast path on CPUs with AMX / AVX-512 BF16), never a float32 product."""
  x, w = (jax.random.normal(jax.random.key(i), shape) for i, shape in enumerate((x_shape, w_shape)))
  loss = lambda product: lambda x, w: jnp.sum(jnp.sin(product(spec, x, w).astype(jnp.float32)))
  reference = jax.value_and_grad(loss(jnp.einsum), (0, 1))(x, w)
  mixed_args = (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  mixed = jax.value_and_grad(loss(mixed_einsum), (0, 1))(*mixed_args)
  for want, got in zip(jax.tree.leaves(reference), jax.tree.leaves(mixed)):
    assert got.dtype == (jnp.float32 if got.ndim == 0 else jnp.bfloat16)
    np.testing.assert_allclose(np.float32(got), want, atol=0.03 * float(jnp.max(jnp.abs(want))), rtol=0)
  jaxpr = jax.make_jaxpr(jax.grad(loss(mixed_einsum), (0, 1)))(*mixed_args)
  products = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
  assert len(products) == 3
  for e in products:
    assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16, jnp.bfloat16] and e.outvars[0].aval.dtype == jnp.float32
  np.testing.assert_array_equal(mixed_einsum(spec, x, w), jnp.einsum(spec, x, w))  # float32 takes the plain path


@pytest.mark.parametrize("bias_shape", [(6,), (3, 4)])
def test_bias_gradients_in_bfloat16_sum_every_token(bias_shape):
  y = jax.random.normal(jax.random.key(0), (2, 5, *bias_shape))
  bias = jax.random.normal(jax.random.key(1), bias_shape)
  loss = lambda y, b: jnp.sum(jnp.sin(add_bias(y, b).astype(jnp.float32)))
  want = jax.grad(loss, (0, 1))(y, bias)
  got = jax.grad(loss, (0, 1))(y.astype(jnp.bfloat16), bias)
  assert got[1].dtype == jnp.float32 and got[1].shape == bias_shape
  for w, g in zip(want, got):
    np.testing.assert_allclose(np.float32(g), w, atol=0.03 * float(jnp.max(jnp.abs(w))), rtol=0)


def test_exact_gelu_in_bfloat16_matches_float32_value_and_derivative():
  """The bf16 exact GELU (float32 inside, derivative Φ(x) + x φ(x) written out) against JAX's float32 GELU and its
  automatic derivative at the same (bf16-rounded) inputs, where the derivative changes sign and saturates."""
  x16 = jnp.linspace(-6.0, 6.0, 2001).astype(jnp.bfloat16)
  got, got_grad = jax.vmap(jax.value_and_grad(lambda v: gelu(v, approximate=False).astype(jnp.float32)))(x16)
  want, want_grad = jax.vmap(jax.value_and_grad(lambda v: jax.nn.gelu(v, approximate=False)))(np.float32(x16))
  assert got.dtype == jnp.float32 and got_grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(got, want, atol=0.02, rtol=0.01)  # the output is rounded to bf16
  np.testing.assert_allclose(np.float32(got_grad), want_grad, atol=0.01)
  x = np.float32(x16)
  np.testing.assert_array_equal(gelu(x, approximate=False), jax.nn.gelu(x, approximate=False))  # float32: unchanged


def test_softmax_derivative_equals_jax_softmax_derivative():
  """The softmax whose backward sums rows by a product with ones: value and vector-Jacobian product equal JAX's, with
  masked (float32 min) entries as attention has them."""
  logits = jax.random.normal(jax.random.key(0), (2, 3, 5, 7)) * 4
  logits = jnp.where(jnp.arange(7) < 5, logits, jnp.finfo(jnp.float32).min)
  g = jax.random.normal(jax.random.key(1), logits.shape)
  got, got_vjp = jax.vjp(softmax, logits)
  want, want_vjp = jax.vjp(lambda x: jax.nn.softmax(x, axis=-1), logits)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(got_vjp(g)[0], want_vjp(g)[0], atol=1e-6, rtol=1e-5)


def _all_eqns(jaxpr):
  """Equations of a jaxpr and of the jaxprs nested in its equations (custom_vjp, pjit)."""
  for e in jaxpr.eqns:
    yield e
    for value in e.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _all_eqns(inner)


# ----------------------------------------------------------------------------------------------------------
# 7. Dropout
# ----------------------------------------------------------------------------------------------------------

def train_forward_fn(cfg: ModelConfig):
  def forward(params, tokens_BxL, key):
    return Decoder(cfg).apply({"params": params}, tokens_BxL, deterministic=False, rngs={"dropout": key})
  return forward


def test_dropout():
  tokens_BxL = random_tokens(14)
  cfg = make_cfg(dropout=0.2)
  params = init_params(cfg)
  eval_logits = np.asarray(forward_fn(cfg)(params, tokens_BxL, default_positions(), one_segment()))
  drop_0 = np.asarray(train_forward_fn(cfg)(params, tokens_BxL, jax.random.key(0)))
  drop_0_again = np.asarray(train_forward_fn(cfg)(params, tokens_BxL, jax.random.key(0)))
  drop_1 = np.asarray(train_forward_fn(cfg)(params, tokens_BxL, jax.random.key(1)))
  assert np.all(np.isfinite(drop_0))
  assert np.abs(drop_0 - eval_logits).max() > 1e-3
  assert np.abs(drop_0 - drop_1).max() > 1e-3
  np.testing.assert_array_equal(drop_0, drop_0_again)

  no_drop_cfg = make_cfg(dropout=0.0)
  train_logits = np.asarray(train_forward_fn(no_drop_cfg)(params, tokens_BxL, jax.random.key(0)))
  eval_logits = np.asarray(forward_fn(no_drop_cfg)(params, tokens_BxL, default_positions(), one_segment()))
  np.testing.assert_allclose(train_logits, eval_logits, atol=1e-6, rtol=0)


def test_dot_product_attention_trains_with_dropout_on_the_einsum_path():
  tokens_BxL = random_tokens(14)
  cfg = make_cfg(dropout=0.2)
  dot_cfg = dataclasses.replace(cfg, attention_impl="dot_product")
  params = init_params(cfg)
  np.testing.assert_array_equal(train_forward_fn(dot_cfg)(params, tokens_BxL, jax.random.key(0)),
                                train_forward_fn(cfg)(params, tokens_BxL, jax.random.key(0)))


# ----------------------------------------------------------------------------------------------------------
# 8. Config errors name the key
# ----------------------------------------------------------------------------------------------------------

GOOD = dict(d_model=32, num_heads=4, num_layers=2)


@pytest.mark.parametrize("changes, key", [
    (dict(activation="tanh"), "activation"),
    (dict(num_heads=5), "num_heads"),               # 5 does not divide d_model=32 (head_dim derived)
    (dict(num_kv_heads=3), "num_kv_heads"),         # 3 does not divide num_heads=4
    (dict(num_layer=2), "num_layer"),               # typo: unknown key
    (dict(position="absolute"), "position"),
    (dict(norm="batchnorm"), "norm"),
    (dict(dropout=1.0), "dropout"),
    (dict(num_layers=0), "num_layers"),
    (dict(position="rope", head_dim=7), "head_dim"),
    (dict(position="relative", relative_buckets=2), "relative_buckets"),
    (dict(position="relative", relative_max_distance=16), "relative_max_distance"),  # <= 32 // 2
    (dict(scale_tied_logits=True, tie_embeddings=False), "scale_tied_logits"),
    (dict(attention_impl="flash"), "attention_impl"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_from_config_errors_name_the_key(changes, key):
  with pytest.raises(ConfigError) as info:
    ModelConfig.from_config({**GOOD, **changes}, vocab_size=37)
  message = str(info.value)
  assert message.startswith(f"config.model.{key}:"), message
  assert "\n" not in message


def test_from_config_derives_dims():
  cfg = ModelConfig.from_config({**GOOD, "head_dim": 0, "num_kv_heads": 0, "mlp_dim": 0}, vocab_size=37)
  assert (cfg.head_dim, cfg.num_kv_heads, cfg.mlp_dim, cfg.vocab_size) == (8, 4, 128, 37)


# ----------------------------------------------------------------------------------------------------------
# 9. Full-size shapes without materialising
# ----------------------------------------------------------------------------------------------------------

def test_gpt2_small_shapes_via_eval_shape():
  cfg = ModelConfig(vocab_size=50304, num_layers=12, d_model=768, num_heads=12, num_kv_heads=12, head_dim=64,
                    mlp_dim=3072, max_len=1024)
  model = Decoder(cfg)
  tokens = jax.ShapeDtypeStruct((2, 1024), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
  params = nn.meta.unbox(variables["params"])
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  assert count == cfg.num_params() == 124_475_904  # nanoGPT's GPT-2 small with the padded 50304 vocab
  assert params["embed"]["embedding"].shape == (50304, 768)
  assert params["layer_11"]["attention"]["query"].shape == (768, 12, 64)
  logits = jax.eval_shape(lambda v, t: model.apply(v, t), variables, tokens)
  assert logits.shape == (2, 1024, 50304) and logits.dtype == jnp.float32
