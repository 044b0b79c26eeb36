"""What this process's devices offer, measured here, and what a compiled program asks of them.

Offers `matmul_peak_flops` and `memory_bandwidth` (measured with jitted programs on the default device),
`compiled_memory_bytes` and `compiled_cost` (XLA's analyses of a compiled program, nothing run),
`device_memory_bytes` (what one device may hold), `peak_memory_bytes` (the most this process has held: device
peak on accelerators, resident set on CPU), `resident_bytes` and `datasheet_bf16_peak` (vendor dense bf16 peaks of
known accelerators). bench/ and train/estimate.py measure through these, train/loop.py checks memory with them.
"""

import dataclasses
import os
import resource
import time

import jax
import jax.numpy as jnp

# Vendor datasheet dense bf16 peaks (tensor cores, no sparsity) in FLOP/s, by a substring of jax's device_kind; the
# first match wins, so "H100 PCIe" precedes "H100" (SXM) and "TPU v5 lite" (v5e) precedes "TPU v5" (v5p).
DATASHEET_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
                  ("TPU v6 lite", 918e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12))


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip as its Cloud TPU datasheet gives it: dense bf16 FLOP/s, HBM bytes and bytes/s, and the
  bidirectional inter-chip interconnect (ICI) bytes/s of one chip."""
  name: str
  device_kind: str  # what jax.devices()[0].device_kind says of it
  bf16_flops: float
  hbm_bytes: float
  hbm_bandwidth: float
  ici_bandwidth: float
  source: str


# Sources: cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e} (system architecture tables), read 2026-12.
TPU_CHIPS = {
    "v4": Chip("v4", "TPU v4", 275e12, 32 * 2**30, 1200e9, 300e9, "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", "TPU v5 lite", 197e12, 16 * 2**30, 819e9, 400e9, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", "TPU v5", 459e12, 95 * 2**30, 2765e9, 600e9, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", "TPU v6 lite", 918e12, 32 * 2**30, 1640e9, 800e9, "cloud.google.com/tpu/docs/v6e"),
}


def tpu_chip(topology: str) -> Chip:
  """The chip of a topology name such as "v5e:2x4" (its part before the colon)."""
  name = topology.split(":")[0]
  if name not in TPU_CHIPS:
    raise KeyError(f"unknown TPU generation {name!r} (known: {', '.join(TPU_CHIPS)})")
  return TPU_CHIPS[name]


def datasheet_bf16_peak(device_kind: str) -> float | None:
  """The vendor's dense bf16 peak of one device of this kind, or None for a kind not in DATASHEET_BF16."""
  return next((peak for name, peak in DATASHEET_BF16 if name in device_kind), None)


def _accelerator() -> bool:
  return jax.default_backend() != "cpu"


def _best_seconds(fn, *args, reps: int, calls: int) -> float:
  """Fastest of `reps` timings of `calls` back-to-back calls (after a compiling call), per call."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / calls)
  return best


def matmul_peak_flops(dtype, sizes: tuple = (), reps: int = 5) -> float:
  """Best FLOP/s of a jitted square matmul of `dtype` operands accumulated in float32, as the model's products are
  (model/precision.py; a bf16 product rounded to bf16 misses the fast bf16 kernels on CPU) (default sizes:
  1024-3072 on CPU, 4096 and 8192 on accelerators, where 10 back-to-back calls per timing hide the dispatch)."""
  sizes = sizes or ((4096, 8192) if _accelerator() else (1024, 2048, 3072))
  matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  best = 0.0
  for n in sizes:
    a_NxN = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    b_NxN = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
    seconds = _best_seconds(matmul, a_NxN, b_NxN, reps=reps, calls=10 if _accelerator() else 1)
    best = max(best, 2 * n**3 / seconds)
  return best


def memory_bandwidth(num_bytes: int = 0, reps: int = 5) -> float:
  """Bytes/s that a jitted elementwise op streams through (the array read once and written once, as XLA's
  'bytes accessed' counts them) over a float32 array of `num_bytes` (default: 64 MiB on CPU, 1 GiB elsewhere,
  both far beyond the caches)."""
  num_bytes = num_bytes or (2**30 if _accelerator() else 2**26)
  x_N = jnp.ones((num_bytes // 4,), jnp.float32)
  seconds = _best_seconds(jax.jit(lambda x: x * 0.5 + 1.0), x_N, reps=reps, calls=10 if _accelerator() else 1)
  return 2 * num_bytes / seconds


def compiled_memory_bytes(compiled) -> int | None:
  """Bytes per device a compiled program holds while it runs (arguments, outputs not aliased to a donated
  argument, temporaries), from XLA's memory analysis; None where the backend gives none."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes +
          analysis.temp_size_in_bytes)


def compiled_cost(compiled) -> dict:
  """XLA's cost analysis of a compiled program per device: {"flops", "bytes_accessed", "transcendentals"}."""
  cost = compiled.cost_analysis()
  cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})  # a list in older jax
  return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
          "transcendentals": float(cost.get("transcendentals", 0.0))}


def device_memory_bytes() -> int | None:
  """What one device may hold: an accelerator's limit; on CPU the host's available memory shared by its devices."""
  device = jax.local_devices()[0]
  limit = (device.memory_stats() or {}).get("bytes_limit")
  if limit is None and device.platform == "cpu":
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // len(jax.local_devices())
  return limit


def resident_bytes() -> int:
  """This process's resident set now (Linux /proc; the peak so far elsewhere)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except OSError:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory_bytes() -> int:
  """The most this process has held: the largest device's peak in use on accelerators, the peak resident set on
  CPU (which includes the Python and XLA runtime)."""
  if _accelerator():
    return max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices())
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
