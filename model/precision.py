"""Matrix products in mixed precision: bfloat16 (or float16) operands, float32 accumulation, forward and backward;
and the reductions whose XLA:CPU lowering needs a workaround.

A plain `jnp.einsum` of two bfloat16 arrays returns bfloat16, and on CPUs with AMX / AVX-512 BF16 XLA only takes
its fast bf16 kernels when the product accumulates into float32 (`preferred_element_type`). JAX's own derivative
of such a product multiplies the float32 cotangent by the bfloat16 operand, which falls back to a float32 product
(on every backend); `einsum` here keeps both backward products in bfloat16 x bfloat16 -> float32 too. Float32
operands take the plain path, so float32 models are unchanged.

The CPU workarounds (`add_bias`'s gradient and `softmax`'s derivative as products with a vector of ones, the exact
GELU's fused derivative) act only where the computation runs on CPUs (`on_cpu`): on a GPU such a product is a TF32
one and on a TPU a single bfloat16 pass, which loses accuracy where the terms nearly cancel, so there the plain
reductions run, accumulated in float32. Tests check that both forms agree.
"""

import functools

import jax
import jax.numpy as jnp


def on_cpu() -> bool:
  """Whether the program being traced runs on CPUs: the platform of the mesh in context (a TPU topology compiled
  on a CPU host is not), else JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform == "cpu"
  return jax.default_backend() == "cpu"


def einsum(spec: str, x, w, out_dtype=None):
  """jnp.einsum(spec, x, w) accumulated in float32, returned as `out_dtype` (default x's dtype).

  `spec` has two operands; every contracted letter appears in both (true of every product in model/)."""
  out_dtype = out_dtype or x.dtype
  if x.dtype == jnp.float32 and w.dtype == jnp.float32:
    return jnp.einsum(spec, x, w).astype(out_dtype)
  return _mixed_einsum(spec, jnp.dtype(out_dtype).name, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _mixed_einsum(spec, out_dtype, x, w):
  return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(out_dtype)


def _forward(spec, out_dtype, x, w):
  return _mixed_einsum(spec, out_dtype, x, w), (x, w)


def _backward(spec, out_dtype, residuals, g):
  x, w = residuals
  inputs, out = spec.split("->")
  x_spec, w_spec = inputs.split(",")
  g = g.astype(x.dtype)
  grad_x = jnp.einsum(f"{out},{w_spec}->{x_spec}", g, w, preferred_element_type=jnp.float32)
  grad_w = jnp.einsum(f"{x_spec},{out}->{w_spec}", x, g, preferred_element_type=jnp.float32)
  return grad_x.astype(x.dtype), grad_w.astype(w.dtype)


_mixed_einsum.defvjp(_forward, _backward)


def add_bias(y, bias):
  """y [..., *bias.shape] + bias (cast to y's dtype). In bfloat16 the bias gradient (a sum over every token) is
  accumulated in float32; on CPUs as a product with a vector of ones: XLA:CPU otherwise lowers that sum of a
  converted bf16 tensor as a slow reduce-window (a fifth of a bf16 step of the wide shakespeare config)."""
  if y.dtype == jnp.float32:
    return _plus(y, bias)
  return _add_bias_cpu(y, bias) if on_cpu() else _add_bias(y, bias)


def _plus(y, bias):
  return y + bias.astype(y.dtype).reshape((1,) * (y.ndim - bias.ndim) + bias.shape)


def _bias_vjp(sum_rows):
  """y + bias whose bias gradient is `sum_rows(g_TxO)` [O...] (float32) over every token T."""
  @jax.custom_vjp
  def plus(y, bias):
    return _plus(y, bias)

  def forward(y, bias):
    return _plus(y, bias), jnp.zeros((0,) + bias.shape, bias.dtype)  # only the bias's shape and dtype

  def backward(empty, g):
    grad_bias = sum_rows(g.reshape(-1, *empty.shape[1:]))
    return g, grad_bias.astype(empty.dtype)

  plus.defvjp(forward, backward)
  return plus


_add_bias = _bias_vjp(lambda g_TxO: jnp.sum(g_TxO, axis=0, dtype=jnp.float32))
_add_bias_cpu = _bias_vjp(lambda g_TxO: jnp.tensordot(jnp.ones((g_TxO.shape[0],), g_TxO.dtype), g_TxO, axes=1,
                                                      preferred_element_type=jnp.float32))


def gelu(x, approximate: bool):
  """GELU of x (exact: x Φ(x); or its tanh approximation). In bfloat16 the exact one is computed in float32 and its
  derivative Φ(x) + x φ(x) is one elementwise pass over the saved input: JAX's own derivative of erf on a bfloat16
  input runs as four unfused bf16 <-> f32 passes on XLA:CPU (a fifth of the wide config's MLP time)."""
  if x.dtype == jnp.float32 or approximate or not on_cpu():
    return jax.nn.gelu(x, approximate=approximate)
  return _exact_gelu(x)


@jax.custom_vjp
def _exact_gelu(x):
  return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


def _exact_gelu_forward(x):
  return _exact_gelu(x), x


def _exact_gelu_backward(x, g):
  x32 = x.astype(jnp.float32)
  cdf = 0.5 * (1.0 + jax.lax.erf(x32 * (1 / 2 ** 0.5)))
  pdf = jnp.exp(-0.5 * x32 * x32) * (1 / (2 * jnp.pi) ** 0.5)
  return ((g.astype(jnp.float32) * (cdf + x32 * pdf)).astype(x.dtype),)


_exact_gelu.defvjp(_exact_gelu_forward, _exact_gelu_backward)


def softmax(logits):
  """jax.nn.softmax over the last axis. On CPUs its derivative y (g - Σ g y) takes the row sum as a product with a
  vector of ones: XLA:CPU lowers JAX's own sum there as a reduce-window (an eighth of a bf16 step of the wide
  config). Elsewhere JAX's own derivative (a float32 sum: the logits are float32)."""
  return _softmax_cpu(logits) if on_cpu() else jax.nn.softmax(logits, axis=-1)


@jax.custom_vjp
def _softmax_cpu(logits):
  return jax.nn.softmax(logits, axis=-1)


def _softmax_forward(logits):
  y = _softmax_cpu(logits)
  return y, y


def _softmax_backward(y, g):
  ones_S = jnp.ones((y.shape[-1],), y.dtype)
  row_sums = jnp.einsum("...s,s->...", g * y, ones_S)
  return (y * (g - row_sums[..., None]),)


_softmax_cpu.defvjp(_softmax_forward, _softmax_backward)
