"""What accelerators rely on, checked on CPU: remat policies that act in bfloat16, the CPU-only reduction workarounds
equal to the plain forms, a loss that never holds [B, L, V], activation sharding constraints, the mesh, and (with
libtpu installed) the train step compiled for a TPU topology by train.compile."""

import contextlib
import dataclasses
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import base
from data.batch import rows
from model import precision
from model.config import ModelConfig
from model.families import build_model, init_params
from model.sharding import constrain
from train import hardware
from train import mesh as mesh_lib
from train import step as step_lib

TINY = ModelConfig(vocab_size=37, num_layers=2, d_model=32, num_heads=4, num_kv_heads=4, head_dim=8, mlp_dim=64,
                   max_len=16)


def saved_names(cfg: ModelConfig) -> list:
  """The checkpoint names of what a rematerialised decoder keeps for its backward pass (jax's own report)."""
  model = build_model(cfg)
  tokens_BxL = jnp.zeros((2, 16), jnp.int32)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens_BxL)["params"])
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # traced only: no values needed
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(lambda p: model.apply({"params": p}, tokens_BxL).sum(), params)
  return [line.split("named '")[1].split("'")[0] for line in out.getvalue().splitlines() if " named '" in line]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_remat_policies_keep_what_they_name(dtype):
  cfg = dataclasses.replace(TINY, dtype=dtype, remat=True)
  assert saved_names(dataclasses.replace(cfg, remat_policy="full")) == []
  dots = saved_names(dataclasses.replace(cfg, remat_policy="dots"))
  # query, key, value and out of each layer (the last MLP product is the block's output, saved anyway), never
  # the attention scores
  assert len(dots) >= 4 * cfg.num_layers and set(dots) == {"dense"}
  dots_all = saved_names(dataclasses.replace(cfg, remat_policy="dots_all"))
  assert {"attention_logits", "attention_out"} <= set(dots_all) and dots_all.count("dense") == len(dots)


@pytest.mark.parametrize("fn", ["add_bias", "softmax", "gelu"])
def test_cpu_workarounds_equal_the_plain_forms(fn, monkeypatch):
  """The ones-vector sums (CPU) and the plain float32 reductions (GPU / TPU) give the same values and gradients."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 16, 32)), jnp.bfloat16)
  bias = jnp.asarray(rng.standard_normal((32,)), jnp.float32)
  logits = jnp.asarray(3 * rng.standard_normal((4, 16, 32)), jnp.float32)
  calls = {"add_bias": (lambda x, b, l: precision.add_bias(x, b).astype(jnp.float32) ** 2, (x, bias, logits)),
           "softmax": (lambda x, b, l: precision.softmax(l) * jnp.arange(32.0)[None, None], (x, bias, logits)),
           "gelu": (lambda x, b, l: precision.gelu(x, approximate=False).astype(jnp.float32) ** 2, (x, bias, logits))}
  f, args = calls[fn]
  loss = lambda *a: f(*a).sum()

  def run(cpu: bool):
    monkeypatch.setattr(precision, "on_cpu", lambda: cpu)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*args)

  (value_cpu, grads_cpu), (value_plain, grads_plain) = run(True), run(False)
  np.testing.assert_allclose(value_cpu, value_plain, rtol=1e-2)  # the bf16 GELU rounds its output once either way
  for a, b in zip(grads_cpu, grads_plain):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=1e-2)


def random_params(model) -> dict:
  """The model's parameter tree (from eval_shape: nothing compiled) filled with N(0, 0.1^2), norm scales near 1."""
  shapes = nn.meta.unbox(jax.eval_shape(lambda: init_params(model, jax.random.key(0), 16)))
  rng = np.random.default_rng(0)
  fill = lambda path, s: jnp.asarray(0.1 * rng.standard_normal(s.shape) + jax.tree_util.keystr(path).endswith(
      "['scale']"), s.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def lm_batch(cfg: ModelConfig, length: int = 16) -> dict:
  """Two rows of 16 tokens, each packed with two documents (random targets, every token weighted)."""
  rng = np.random.default_rng(1)
  docs = [list(rng.integers(3, cfg.vocab_size, size=n)) for n in (7, 9, 6, 10)]
  fields = lambda docs: {"targets": [list(rng.integers(3, cfg.vocab_size, size=len(d))) for d in docs],
                         "weights": [[1.0] * len(d) for d in docs], "row_of": [0, 0, 1, 1]}
  batch = rows(docs, length, **fields(docs))
  if cfg.family == "encoder_decoder":
    batch.update(rows(docs[::-1], length, prefix="decoder_", **fields(docs[::-1])))
  return {key: jnp.asarray(value) for key, value in batch.items()}


@pytest.mark.parametrize("family,dtype", [("decoder", "float32"), ("decoder", "bfloat16"),
                                          ("encoder_decoder", "float32")])
def test_chunked_loss_equals_whole(family, dtype, monkeypatch):
  changes = {"decoder": {}, "encoder": {"family": "encoder"},
             "encoder_decoder": {"family": "encoder_decoder", "position": "relative", "scale_attention": False}}
  cfg = dataclasses.replace(TINY, dtype=dtype, **changes[family])
  model = build_model(cfg)
  params = random_params(model)
  batch = lm_batch(cfg)
  if family == "encoder":  # a masked-LM batch: every position a target, half of them weighted
    batch["weights_BxL"] = batch["weights_BxL"] * (jnp.arange(16) % 2)[None]

  def loss_and_grads(limit):
    monkeypatch.setattr(step_lib, "LOGITS_PER_ROW", limit)
    loss_fn = step_lib.token_loss(model)
    sums = lambda p: (lambda s: (s["loss_sum"], s))(loss_fn(p, {}, batch, jax.random.key(0), True))
    (_, sums), grads = jax.jit(jax.value_and_grad(sums, has_aux=True))(params)
    return sums, grads

  whole_sums, whole_grads = loss_and_grads(2**30)
  assert step_lib.loss_chunks(16, cfg.vocab_size) == 1
  chunked_sums, chunked_grads = loss_and_grads(4 * cfg.vocab_size)  # 4 pieces of 4 positions
  assert step_lib.loss_chunks(16, cfg.vocab_size) == 4
  tol = 1e-5 if dtype == "float32" else 1e-2  # bf16: the two programs round their bf16 products differently
  np.testing.assert_allclose(chunked_sums["loss_sum"], whole_sums["loss_sum"], rtol=tol)
  for key in ("weight_sum", "correct_sum"):
    assert float(chunked_sums[key]) == float(whole_sums[key])
  for a, b in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(whole_grads)):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(jnp.max(jnp.abs(b))))


def test_loss_chunks():
  assert step_lib.loss_chunks(1024, 50304) == 4  # GPT-2: pieces of 256 positions
  assert step_lib.loss_chunks(256, 4096) == 1  # the CPU configs keep the whole-row loss
  assert step_lib.loss_chunks(7, 2**30) == 7  # never fewer than one position a piece


def test_chunked_loss_never_holds_whole_logits(monkeypatch):
  """Neither the loss nor its gradient has an array of [B, L, V] in its program (pieces of [B, L / 4, V] only)."""
  monkeypatch.setattr(step_lib, "LOGITS_PER_ROW", 4 * TINY.vocab_size)
  model = build_model(TINY)
  params = random_params(model)
  batch = lm_batch(TINY)
  loss_fn = step_lib.token_loss(model)
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss_fn(p, {}, batch, jax.random.key(0), True)["loss_sum"]))(params)

  def shapes(jaxpr):
    for eqn in jaxpr.eqns:
      yield from (v.aval.shape for v in eqn.outvars if hasattr(v.aval, "shape"))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from shapes(sub)

  found = set(shapes(jaxpr.jaxpr))
  assert (2, 16, TINY.vocab_size) not in found and (2, 4, TINY.vocab_size) in found


def test_constrain_follows_the_rules_in_context():
  mesh = mesh_lib.make_mesh(_mesh_cfg(data=2, fsdp=2, tensor=2))
  rules = mesh_lib.config_rules(base.get_config().mesh)
  x = jnp.ones((8, 6, 4, 3))

  def run(axes):
    def f(x):
      with mesh_lib.sharding_context(mesh, rules):
        return constrain(x, axes) * 2
    spec = jax.jit(f, in_shardings=mesh_lib.replicated(mesh))(x).sharding.spec  # a program on the mesh's devices
    return P(*spec, *(None,) * (x.ndim - len(spec)))

  assert run(("batch", "length", "heads", "kv")) == P(("data", "fsdp"), None, "tensor", None)
  assert run(("batch", "length", "mlp", "mlp")) == P(("data", "fsdp"), None, "tensor", None)  # tensor used once
  assert run(("batch", "activation_embed", "heads", "heads")) == P(("data", "fsdp"), None, "tensor", None)
  assert run((None, None, None, "heads")) == P(None, None, None, None)  # 3 does not divide by tensor=2
  assert constrain(x, ("batch", None, None, None)) is x  # no mesh in context: nothing to do


def _mesh_cfg(**sizes):
  cfg = base.get_config().mesh.copy_and_resolve_references()
  cfg.unlock()
  cfg.update(sizes)
  return cfg


def test_make_mesh_shapes_and_errors():
  mesh = mesh_lib.make_mesh(_mesh_cfg(data=-1, fsdp=2, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
  assert dict(mesh_lib.make_mesh(_mesh_cfg(data=1, fsdp=4, tensor=1)).shape) == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 1}
  with pytest.raises(Exception, match="config.mesh.slices"):
    mesh_lib.make_mesh(_mesh_cfg(data=3, fsdp=2, tensor=1, slices=2))


# --- the TPU compiler on this host (libtpu from `pip install -e ".[tpu]"`) ---

def _libtpu_reason() -> str | None:
  try:
    import libtpu  # noqa: F401
  except ImportError as e:
    return f"libtpu is not installed ({e}); `pip install -e \".[tpu]\"` brings the TPU compiler"
  return None


needs_libtpu = pytest.mark.skipif(_libtpu_reason() is not None, reason=str(_libtpu_reason()))


def tiny_tpu_config(**train):
  config = base.get_config()
  config.model.update(num_layers=2, d_model=128, num_heads=2, mlp_dim=512, max_len=2048, dtype="bfloat16")
  config.data.vocab_size = 1024
  config.train.update({"batch_size": 8, "seq_len": 128, **train})
  config.mesh.update(data=1, fsdp=4)
  return config


@needs_libtpu
def test_tpu_compile_reports_what_the_compiler_planned():
  from train import compile as tpu_compile
  figures, compiled = tpu_compile.compile_for_tpu(tiny_tpu_config(), "v5e:2x2")
  memory = compiled.memory_analysis()
  assert figures["fits"] and figures["chips"] == 4 and figures["mesh"] == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 1}
  assert figures["total_bytes"] == hardware.compiled_memory_bytes(compiled) > 0
  assert figures["temp_bytes"] == memory.temp_size_in_bytes and figures["alias_bytes"] == memory.alias_size_in_bytes
  cfg = ModelConfig.from_config(tiny_tpu_config().model, 1024)
  # float32 parameters split four ways (every sharded dim divides by 4), AdamW's two moments twice that
  assert abs(figures["params_bytes_per_chip"] - 4 * cfg.num_params() / 4) < 0.02 * 4 * cfg.num_params() / 4
  assert figures["opt_state_bytes_per_chip"] >= 1.9 * figures["params_bytes_per_chip"]
  assert figures["collectives"]["all-gather"]["count"] > 0  # fsdp gathers the parameters it shards
  assert figures["xla_flops"] == hardware.compiled_cost(compiled)["flops"] > 0
  assert figures["mfu"] > 0 and figures["step_s"] == max(figures[k] for k in ("compute_s", "memory_s",
                                                                               "collective_s"))
  assert tpu_compile.report(figures).splitlines()[-1].startswith("fits: ")
  tpu_mesh = mesh_lib.make_mesh(tiny_tpu_config().mesh, tpu_compile.tpu_devices("v5e:2x2"))
  with mesh_lib.sharding_context(tpu_mesh, ()):
    assert not precision.on_cpu()  # a TPU program traced on this CPU host takes the plain reductions


@needs_libtpu
def test_tpu_compile_says_what_does_not_fit():
  from train import compile as tpu_compile
  figures, compiled = tpu_compile.compile_for_tpu(tiny_tpu_config(batch_size=4096, seq_len=2048), "v5e:2x2")
  assert compiled is None and not figures["fits"] and "HBM" in figures["reason"]
  last = tpu_compile.report(figures).splitlines()[-1]
  assert last.startswith("does not fit") and "remat" in last and "batch_size" in last


@needs_libtpu
def test_hybrid_mesh_keeps_fsdp_within_a_slice():
  from train import compile as tpu_compile
  devices = tpu_compile.tpu_devices("v5e:2x2", num_slices=2)
  mesh = mesh_lib.make_mesh(_mesh_cfg(data=2, fsdp=4, tensor=1, slices=2), devices)
  for row in range(2):
    assert {d.slice_index for d in mesh.devices[row].flat} == {row}
