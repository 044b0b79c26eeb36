"""The fused attention kernels of model/flash.py against the einsum path: values and gradients of Pallas's splash
(TPU) and Triton (GPU, the cudnn path's packed rows) kernels, run in Pallas's interpreter on CPU, on packed rows
with several segments across tile boundaries, causal and bidirectional, GQA and MQA, float32 and bfloat16, with
and without a mesh; a whole decoder's loss and gradients; which path each case takes (config refusals, cached
decoding, cuDNN for rows of one sequence); and the TPU compile of splash (libtpu: Mosaic call, memory).

Tiny sizes: interpreted kernels are slow. L = 256 in 128-token tiles (200 in the decoder: padded to 256).

`python tests/test_flash.py LENGTH HEADS HEAD_DIM` prints the TPU compile figures of one attention layer's forward
and backward, einsum against splash, on v5e:2x2 (one row of LENGTH a chip), when libtpu is installed.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from model import flash
from model.attention import Attention, attention_mask, einsum_attention
from model.config import ConfigError, ModelConfig
from model.transformer import Decoder, init_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = (("batch", ("data", "fsdp")), ("heads", "tensor"), ("kv_heads", "tensor"), ("kv", None), ("length", None))


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
  """128-token splash tiles, so that L = 256 crosses a tile boundary inside a segment."""
  monkeypatch.setattr(flash, "SPLASH_BLOCKS", (128,))


def packed_segments(length: int = 256):
  """A row of three documents, the second crossing the tile boundary at 128, then padding (segment 0). [1, L]"""
  segment_ids_L = np.zeros(length, np.int32)
  for segment, (start, end) in enumerate([(0, 90), (90, 180), (180, length - 16)], start=1):
    segment_ids_L[start:end] = segment
  return jnp.asarray(segment_ids_L[None])


def qkv(seed, batch, length, h, g, k, dtype):
  keys = jax.random.split(jax.random.key(seed), 3)
  shapes = ((batch, length, h, k), (batch, length, g, k), (batch, length, g, k))
  return tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype) for key, shape in zip(keys, shapes))


def einsum_reference(q, k, v, segment_ids_BxL, causal, divisor):
  mask_BxLxS = attention_mask(segment_ids_BxL, segment_ids_BxL, causal)
  return einsum_attention(q, k, v, mask_BxLxS, None, divisor, lambda p: p)


def value_and_vjp(attend, q, k, v, cotangent):
  out, pullback = jax.vjp(attend, q, k, v)
  return (out, *pullback(cotangent.astype(out.dtype)))


def errors(results, reference, real_rows_BxLx1x1):
  """Largest error of each of (out, dq, dk, dv) relative to the reference's largest entry, over real tokens (the
  kernels let padding attend padding: its output differs; its gradients are 0 either way, its cotangent being 0)."""
  def error(x, ref):
    x, ref = np.asarray(x, np.float32) * real_rows_BxLx1x1, np.asarray(ref, np.float32) * real_rows_BxLx1x1
    return float(np.abs(x - ref).max() / np.abs(ref).max())
  return [error(x, ref) for x, ref in zip(results, reference)]


KERNELS = {"splash": flash.splash_attention, "triton": flash.cudnn_attention}
CASES = [  # kernel, dtype, causal, H, G
    ("splash", "float32", True, 4, 2),
    ("splash", "bfloat16", True, 2, 1),
    ("splash", "float32", False, 2, 1),
    ("triton", "float32", True, 4, 2),
    ("triton", "bfloat16", True, 2, 1),
]


@pytest.mark.parametrize("kernel,dtype,causal,h,g", CASES, ids=["-".join(map(str, case)) for case in CASES])
def test_kernel_matches_einsum(kernel, dtype, causal, h, g):
  """Output and gradients of q, k, v on a packed row (padding included). Float32: within 2e-5 of einsum. Bfloat16:
  no further from einsum in float32 (of the same bfloat16 inputs) than einsum in bfloat16 is (x 1.5, + 1e-3 of
  the largest entry)."""
  segment_ids_BxL = packed_segments()
  divisor = 8.0
  q, k, v = qkv(0, 1, 256, h, g, 64, dtype)
  q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)  # bf16 inputs: no rounding in truth
  real_rows_BxLx1x1 = np.asarray(segment_ids_BxL != 0, np.float32)[:, :, None, None]
  cotangent = jax.random.normal(jax.random.key(1), q.shape) * real_rows_BxLx1x1  # padding's output is unread
  fused = lambda q, k, v: KERNELS[kernel](q, k, v, segment_ids_BxL, causal, divisor)
  plain = lambda q, k, v: einsum_reference(q, k, v, segment_ids_BxL, causal, divisor)
  truth = value_and_vjp(plain, q, k, v, cotangent)
  cast = lambda x: x.astype(dtype)
  fused_errors = errors(value_and_vjp(fused, cast(q), cast(k), cast(v), cotangent), truth, real_rows_BxLx1x1)
  print(kernel, dtype, "errors of out, dq, dk, dv:", fused_errors)
  if dtype == "float32":
    assert max(fused_errors) < 2e-5
  else:
    plain_errors = errors(value_and_vjp(plain, cast(q), cast(k), cast(v), cotangent), truth, real_rows_BxLx1x1)
    print("einsum in bfloat16:", plain_errors)
    for fused_error, plain_error in zip(fused_errors, plain_errors):
      assert fused_error < 1.5 * plain_error + 1e-3


def mesh_of_8():
  return Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"),
              axis_types=(AxisType.Auto,) * 3)


@pytest.mark.parametrize("h,g", [(4, 2), (2, 1)], ids=["kv-heads-split", "mqa-heads-split"])
def test_splash_under_a_mesh(h, g):
  """Under a mesh and logical rules in context (as the train step enters them) splash runs under shard_map, rows
  over data x fsdp and heads over tensor (the key/value groups, or with G = 1 the heads of the group): its
  values and gradients equal einsum's. The compiled program holds the kernel once a device, not gathered rows."""
  mesh = mesh_of_8()
  segment_ids_BxL = jnp.concatenate([packed_segments(), jnp.ones((1, 256), jnp.int32)] * 2)  # a row a shard
  q, k, v = qkv(2, 4, 256, h, g, 64, jnp.float32)
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  q, k, v, segment_ids_BxL = jax.device_put((q, k, v, segment_ids_BxL), rows)
  cotangent = jax.random.normal(jax.random.key(3), q.shape) * (segment_ids_BxL != 0)[:, :, None, None]

  @jax.jit
  def fused(q, k, v, cotangent):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(RULES):
      return value_and_vjp(lambda q, k, v: flash.splash_attention(q, k, v, segment_ids_BxL, True, 8.0),
                           q, k, v, cotangent)

  plain = lambda q, k, v: einsum_reference(q, k, v, segment_ids_BxL, True, 8.0)
  hlo = fused.lower(q, k, v, cotangent).as_text()
  assert "shard_map" in hlo or "sdy.manual_computation" in hlo
  real_rows = np.asarray(segment_ids_BxL != 0, np.float32)[:, :, None, None]
  fused_errors = errors(fused(q, k, v, cotangent), value_and_vjp(plain, q, k, v, cotangent), real_rows)
  print("errors of out, dq, dk, dv:", fused_errors)
  assert max(fused_errors) < 2e-5


def tiny_decoder_cfg(**changes) -> ModelConfig:
  cfg = ModelConfig(vocab_size=61, num_layers=2, d_model=128, num_heads=2, num_kv_heads=1, head_dim=64,
                    mlp_dim=256, position="rope", max_len=256)
  cfg = dataclasses.replace(cfg, **changes)
  cfg.validate()
  return cfg


def test_decoder_loss_and_gradients_with_splash_equal_einsum():
  """A 2-layer GQA decoder (RoPE, float32) on packed rows of 200 tokens (padded to two tiles inside the kernel),
  its blocks as a rematerialised scan: loss and every parameter's gradient as with einsum."""
  rng = np.random.default_rng(0)
  segment_ids_BxL = jnp.concatenate([packed_segments(200), jnp.ones((1, 200), jnp.int32)])  # and a whole row
  positions_BxL = np.zeros((2, 200), np.int32)
  for row in range(2):
    for segment in np.unique(segment_ids_BxL[row]):
      where = np.nonzero(np.asarray(segment_ids_BxL[row]) == segment)[0]
      positions_BxL[row, where] = np.arange(len(where))
  tokens_BxL = jnp.asarray(rng.integers(0, 61, (2, 200)), jnp.int32)
  weights_BxL = jnp.asarray(segment_ids_BxL != 0, jnp.float32)

  def loss_and_grads(cfg, params):
    def loss(params):
      logits_BxLxV = Decoder(cfg).apply({"params": params}, tokens_BxL, positions_BxL, segment_ids_BxL)
      log_probs_BxLxV = jax.nn.log_softmax(logits_BxLxV)
      picked_BxL = jnp.take_along_axis(log_probs_BxLxV, tokens_BxL[..., None], axis=-1)[..., 0]
      return -(picked_BxL * weights_BxL).sum() / weights_BxL.sum()
    return jax.jit(jax.value_and_grad(loss))(params)

  einsum_cfg = tiny_decoder_cfg()
  params = nn.meta.unbox(Decoder(einsum_cfg).init(jax.random.key(0), tokens_BxL[:, :8])["params"])
  loss, grads = loss_and_grads(einsum_cfg, params)
  splash_cfg = tiny_decoder_cfg(attention_impl="splash", scan_layers=True, remat=True, remat_policy="dots_all")
  splash_loss, splash_grads = loss_and_grads(splash_cfg, params)
  np.testing.assert_allclose(splash_loss, loss, rtol=1e-6)
  worst = max(float(jnp.abs(a - b).max() / jnp.abs(a).max()) for a, b in zip(jax.tree.leaves(grads),
                                                                              jax.tree.leaves(splash_grads)))
  print("loss", float(loss), float(splash_loss), "largest relative gradient error", worst)
  assert worst < 1e-4


@pytest.mark.parametrize("impl,changes,says", [
    ("splash", {"position": "alibi"}, "position=alibi"),
    ("cudnn", {"position": "relative", "dtype": "bfloat16"}, "position=relative"),
    ("splash", {"dropout": 0.1}, "dropout=0.1"),
    ("cudnn", {"dtype": "float32"}, "bfloat16 or float16"),
])
def test_config_refuses_what_a_kernel_cannot_compute(impl, changes, says):
  cfg = dataclasses.replace(tiny_decoder_cfg(), attention_impl=impl, **changes)
  with pytest.raises(ConfigError, match=f"^config.model.attention_impl: {impl} .*{says}") as raised:
    cfg.validate()
  assert "\n" not in str(raised.value)
  dataclasses.replace(cfg, attention_impl="einsum").validate()  # einsum computes them all


def test_prefix_lm_is_refused_with_a_kernel():
  cfg = tiny_decoder_cfg(attention_impl="splash")
  tokens_BxL = jnp.zeros((2, 16), jnp.int32)
  params = jax.eval_shape(Decoder(cfg).init, jax.random.key(0), tokens_BxL)["params"]
  with pytest.raises(ConfigError, match="^config.model.attention_impl: splash has no prefix-LM mask"):
    jax.eval_shape(lambda p: Decoder(cfg).apply({"params": p}, tokens_BxL, prefix_BxL=jnp.ones_like(tokens_BxL)),
                   params)


def test_cached_decoding_keeps_einsum(monkeypatch):
  """With a cache (a prompt, then one token a step) the kernel is never called and the logits are einsum's."""
  def no_kernel(*args):
    raise AssertionError("a fused kernel was called with a cache")
  monkeypatch.setattr(flash, "splash_attention", no_kernel)
  tokens_BxL = jnp.asarray(np.random.default_rng(1).integers(0, 61, (2, 6)), jnp.int32)
  params = nn.meta.unbox(Decoder(tiny_decoder_cfg(num_layers=1)).init(jax.random.key(0), tokens_BxL)["params"])
  outputs = {}
  positions_BxL = jnp.broadcast_to(jnp.arange(6), (2, 6))
  for impl in ("einsum", "splash"):
    cfg = tiny_decoder_cfg(attention_impl=impl, num_layers=1)

    @jax.jit
    def prompt_then_token(params):
      logits_BxLxV, cache = Decoder(cfg).apply({"params": params}, tokens_BxL[:, :5], positions_BxL[:, :5],
                                               cache=init_cache(cfg, 2, 8))
      return logits_BxLxV, Decoder(cfg).apply({"params": params}, tokens_BxL[:, 5:], positions_BxL[:, 5:],
                                              cache=cache)[0]
    outputs[impl] = prompt_then_token(params)
  for ours, theirs in zip(outputs["splash"], outputs["einsum"]):
    np.testing.assert_array_equal(ours, theirs)


def test_cudnn_takes_cudnn_for_one_sequence_a_row_and_triton_for_segments(monkeypatch):
  """On a GPU (interpretation off): without segment ids jax.nn.dot_product_attention with implementation="cudnn",
  is_causal and no mask or bias; with them Pallas's Triton kernel, given the segment ids. Traced, not run."""
  calls = []

  def fake_cudnn(q, k, v, **kwargs):
    calls.append(("cudnn", kwargs))
    return jnp.zeros(q.shape, q.dtype)

  def fake_triton(q, k, v, segment_ids, **kwargs):
    calls.append(("triton", dict(kwargs, segment_ids=segment_ids)))
    return jnp.zeros(q.shape, q.dtype)

  monkeypatch.setattr(flash, "interpret", lambda: False)
  monkeypatch.setattr(jax.nn, "dot_product_attention", fake_cudnn)
  monkeypatch.setattr(flash.triton_attention, "mha", fake_triton)
  cfg = tiny_decoder_cfg(attention_impl="cudnn", dtype="bfloat16", num_layers=1)
  tokens_BxL = jnp.zeros((2, 200), jnp.int32)
  params = jax.eval_shape(Decoder(cfg).init, jax.random.key(0), tokens_BxL)["params"]
  calls.clear()
  jax.eval_shape(lambda p: Decoder(cfg).apply({"params": p}, tokens_BxL), params)
  (kind, kwargs), = calls
  assert kind == "cudnn" and kwargs == {"scale": 1 / 8, "is_causal": True, "implementation": "cudnn"}
  calls.clear()
  segment_ids_BxL = jnp.concatenate([packed_segments(200)] * 2)
  jax.eval_shape(lambda p: Decoder(cfg).apply({"params": p}, tokens_BxL, segment_ids_BxL=segment_ids_BxL), params)
  (kind, kwargs), = calls
  assert kind == "triton" and kwargs["causal"] and kwargs["sm_scale"] == 1 / 8
  assert kwargs["segment_ids"].shape == (2, 256)  # padded to the Triton tile, the padding in segment 0


@pytest.mark.parametrize("impl,platform", [("splash", "gpu"), ("cudnn", "tpu")])
def test_a_kernel_on_another_accelerator_is_a_config_error(monkeypatch, impl, platform):
  monkeypatch.setattr(flash, "_platform", lambda: platform)
  q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
  kernel = flash.splash_attention if impl == "splash" else flash.cudnn_attention
  with pytest.raises(ConfigError, match=f"^config.model.attention_impl: {impl} runs on .*not on {platform}"):
    jax.eval_shape(lambda q: kernel(q, q, q, None, True, 8.0), q)


# ----------------------------------------------------------------------------------------------------------
# TPU compile on this host (libtpu): the real Mosaic kernel, and its memory against einsum's.

def has_libtpu() -> bool:
  try:
    import libtpu  # noqa: F401
  except ImportError:
    return False
  return True


def compile_attention(impl: str, length: int, heads: int, head_dim: int, topology: str = "v5e:2x2") -> dict:
  """Compiles one bfloat16 attention layer's forward and backward (projections, RoPE, attention; a causal row of
  `length` a chip, rows over the data axis) for a TPU topology; returns per-chip temporaries, whether the HLO
  calls a Mosaic kernel, and the compile time. Needs libtpu and a process started with TPU_ENV."""
  from jax.experimental import topologies
  devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  mesh = Mesh(np.asarray(devices).reshape(len(devices), 1, 1), ("data", "fsdp", "tensor"),
              axis_types=(AxisType.Auto,) * 3)
  cfg = ModelConfig(vocab_size=8, d_model=heads * head_dim, num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
                    position="rope", dtype="bfloat16", use_bias=False, attention_impl=impl)
  attention, batch = Attention(cfg), len(devices)

  def loss(params, x_BxLxD, segment_ids_BxL):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(RULES):
      positions_BxL = jnp.broadcast_to(jnp.arange(length), (batch, length))
      mask_BxLxS = attention_mask(segment_ids_BxL, segment_ids_BxL, True)
      y_BxLxD, _ = attention.apply({"params": params}, x_BxLxD, positions_BxL, mask_BxLxS,
                                   segment_ids_BxL=segment_ids_BxL, causal=True)
      return jnp.sum(y_BxLxD.astype(jnp.float32) ** 2)

  rows = NamedSharding(mesh, P("data"))
  x = jax.ShapeDtypeStruct((batch, length, cfg.d_model), jnp.bfloat16, sharding=rows)
  segment_ids = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows)
  small = (jnp.zeros((1, 8, cfg.d_model)), jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8, 8), bool))
  params = nn.meta.unbox(jax.eval_shape(lambda: attention.init(jax.random.key(0), *small))["params"])
  params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=NamedSharding(mesh, P())), params)
  start = time.time()
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, segment_ids).compile()
  return {"impl": impl, "length": length, "heads": heads, "head_dim": head_dim, "topology": topology,
          "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
          "mosaic": "tpu_custom_call" in compiled.as_text(), "compile_s": round(time.time() - start, 1)}


TPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


@pytest.mark.skipif(not has_libtpu(), reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_splash_compiles_for_tpu_to_a_mosaic_kernel_with_less_memory():
  """The TPU compiler (v5e:2x2, on this CPU host, in a process of its own) turns splash into Mosaic custom calls,
  and at L = 4096 (2 heads of 128) one attention layer's forward and backward needs under a quarter of einsum's
  temporaries (smaller programs keep theirs in the chip's 128 MiB of VMEM: 0 bytes of HBM either way)."""
  env = dict(os.environ, **TPU_ENV, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  done = subprocess.run([sys.executable, __file__, "4096", "2", "128"], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  einsum, splash = (json.loads(line) for line in done.stdout.splitlines()[-2:])
  print(einsum, splash)
  assert splash["mosaic"] and not einsum["mosaic"]
  assert splash["temp_bytes"] < einsum["temp_bytes"] / 4


if __name__ == "__main__":
  length, heads, head_dim = map(int, sys.argv[1:4])
  for impl in ("einsum", "splash"):
    print(json.dumps(compile_attention(impl, length, heads, head_dim)), flush=True)
