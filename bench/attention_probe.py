"""Causal attention through `jax.nn.dot_product_attention`, cuDNN's fused kernel against XLA's: forward and backward
time, and the error of each against a float32 XLA reference on the same inputs.

  python bench/attention_probe.py [--sizes=8x1024,8x4096] [--heads=12] [--head_dim=64] [--impls=xla,cudnn]
      [--calls=10] [--reps=5] [--json_out=PATH]

Inputs are random bfloat16 q, k, v [B, T, H, K]; the backward pass is the gradient of sum(out * dout) for a random
float32 dout, so every output element weighs on it. The reference takes the same bfloat16 values in float32 with
float32 matmuls at full precision. An implementation that this backend lacks (cuDNN without a GPU) is skipped with
its reason; one that raises is recorded with its error and the others go on (exit status 1 then).
FLOPs count the causal half: forward 2 B H T^2 K, forward + backward 3.5 times that (FlashAttention's convention).
"""

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

_SIZES = flags.DEFINE_list("sizes", ["8x1024", "8x4096"], "Cases as BATCHxSEQ_LEN.")
_HEADS = flags.DEFINE_integer("heads", 12, "Attention heads.", lower_bound=1)
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension.", lower_bound=1)
_IMPLS = flags.DEFINE_list("impls", ["xla", "cudnn"], "implementation= values of jax.nn.dot_product_attention.")
_CALLS = flags.DEFINE_integer("calls", 10, "Back-to-back calls per timing.", lower_bound=1)
_REPS = flags.DEFINE_integer("reps", 5, "Timings per case; the median is reported.", lower_bound=1)
_JSON_OUT = flags.DEFINE_string("json_out", "", "Also write the figures to this JSON file.")


def attention(impl: str):
  """out_BxTxHxK of causal attention through `impl`."""
  return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)


def forward_backward(impl: str):
  """(out, (dq, dk, dv)) of sum(out * dout): the output and its gradients in one call."""
  def loss(q, k, v, dout):
    out = attention(impl)(q, k, v)
    return jnp.sum(out.astype(jnp.float32) * dout), out
  grads = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
  return lambda q, k, v, dout: tuple(reversed(grads(q, k, v, dout)))


def median_ms(fn, *args) -> float:
  """Median over reps of `calls` back-to-back calls, per call, after a compiling call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_REPS.value):
    start = time.perf_counter()
    for _ in range(_CALLS.value):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / _CALLS.value)
  return 1e3 * statistics.median(times)


def errors(got, want) -> dict:
  """Max absolute error, and it over the reference's max magnitude."""
  got, want = got.astype(jnp.float32), want.astype(jnp.float32)
  abs_err = float(jnp.max(jnp.abs(got - want)))
  return {"max_abs": abs_err, "max_rel": abs_err / max(float(jnp.max(jnp.abs(want))), 1e-30)}


def probe(impl: str, batch: int, seq_len: int, heads: int, head_dim: int) -> dict:
  """One implementation on one size: times and errors (or the reason it was skipped)."""
  case = {"impl": impl, "batch": batch, "seq_len": seq_len, "heads": heads, "head_dim": head_dim}
  if impl == "cudnn" and jax.default_backend() != "gpu":
    return {**case, "skipped": f"no GPU (backend {jax.default_backend()})"}
  keys = jax.random.split(jax.random.PRNGKey(seq_len), 4)
  shape = (batch, seq_len, heads, head_dim)
  q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16) for key in keys[:3])
  dout = jax.random.normal(keys[3], shape, jnp.float32)
  with jax.default_matmul_precision("highest"):
    ref_out, ref_grads = jax.jit(forward_backward("xla"))(*(x.astype(jnp.float32) for x in (q, k, v)), dout)
  fwd, fwd_bwd = jax.jit(attention(impl)), jax.jit(forward_backward(impl))
  out, grads = fwd_bwd(q, k, v, dout)
  fwd_ms, fwd_bwd_ms = median_ms(fwd, q, k, v), median_ms(fwd_bwd, q, k, v, dout)
  flops = 2 * batch * heads * seq_len**2 * head_dim
  return {**case, "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms,
          "fwd_tflops_per_s": flops / fwd_ms / 1e9, "fwd_bwd_tflops_per_s": 3.5 * flops / fwd_bwd_ms / 1e9,
          "out_error": errors(out, ref_out),
          "grad_error": {name: errors(g, r) for name, g, r in zip("qkv", grads, ref_grads)},
          "grad_max_rel_error": max(errors(g, r)["max_rel"] for g, r in zip(grads, ref_grads))}


def row(result: dict) -> str:
  head = f"{result['impl']:<6} B={result['batch']} T={result['seq_len']:<5}"
  if "skipped" in result:
    return f"{head} skipped: {result['skipped']}"
  if "error" in result:
    return f"{head} FAILED: {result['error']}"
  return (f"{head} fwd {result['fwd_ms']:8.3f} ms ({result['fwd_tflops_per_s']:6.1f} TFLOP/s)  fwd+bwd "
          f"{result['fwd_bwd_ms']:8.3f} ms ({result['fwd_bwd_tflops_per_s']:6.1f} TFLOP/s)  max rel error: out "
          f"{result['out_error']['max_rel']:.2e}, grads {result['grad_max_rel_error']:.2e}")


def main(argv):
  del argv
  results = []
  print(f"attention probe on {jax.devices()[0].device_kind} ({jax.default_backend()}): causal, bf16, "
        f"H={_HEADS.value} K={_HEAD_DIM.value}; errors against float32 XLA", flush=True)
  for size in _SIZES.value:
    batch, _, seq_len = size.partition("x")
    for impl in _IMPLS.value:
      try:
        result = probe(impl, int(batch), int(seq_len), _HEADS.value, _HEAD_DIM.value)
      except Exception as e:  # noqa: BLE001  (a kernel this device refuses is a finding, not a stop)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        result = {"impl": impl, "batch": int(batch), "seq_len": int(seq_len), "error": first[:300]}
      results.append(result)
      print(row(result), flush=True)
  figures = {"device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend(),
             "jax": jax.__version__, "results": results}
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(figures, f, indent=2)
  sys.exit(1 if any("error" in r for r in results) else 0)


if __name__ == "__main__":
  app.run(main)
