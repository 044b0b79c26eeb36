"""Training throughput and MFU of one config on synthetic tokens, or of a grid of model sizes and lengths.

  python bench/throughput.py --config=configs/shakespeare_char.py [--config.a.b=v ...] [--steps=20]
      [--warmup=3] [--vocab_size=N] [--profile=DIR] [--json_out=PATH]
  python bench/throughput.py --config=configs/gpt2_small.py --sweep [--sizes=2x128,4x256,6x384,8x512,12x768]
      [--seq_lens=64,128,256,512,1024] [--sweep_batch=8] [--steps=5 --warmup=2] [--json_out=PATH]

Builds the Run (model, optimizer, sharded state) and the train step exactly as train/loop.py compiles it
(`jit_train_step`), times `--steps` steps after `--warmup`, and divides the model FLOP/s (PaLM formula,
`ModelConfig.flops_per_token`) by the float32 and the bfloat16 matmul peaks measured in this process
(train/hardware.py), and by the vendor's dense bf16 peak where the device is a known accelerator. `--profile=DIR`
writes a JAX profiler trace of 3 more steps. `--sweep` runs each (layers x d_model, seq_len) cell in its own process
(a clean peak memory and compile time per cell; heads = d_model / 64) with the peaks measured once here, and prints
a markdown table.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from data.batch import rows  # noqa: E402
from train import hardware  # noqa: E402
from train import mesh as mesh_lib  # noqa: E402
from train import runs  # noqa: E402
from train.cli import fail, parse_flags, run_reporting_errors  # noqa: E402
from train.estimate import default_vocab_size  # noqa: E402
from train.loop import check_train_config, jit_train_step  # noqa: E402
from train.step import token_loss  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (the first one compiles).", lower_bound=1)
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "Vocabulary size (0 = 65+3 for char configs, else "
                              "config.data.vocab_size).")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Also write the figures to this JSON file.")
_PROFILE = flags.DEFINE_string("profile", "", "Write a JAX profiler trace of 3 steps after the timed ones here.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Benchmark every --sizes x --seq_lens cell, one process each.")
_SIZES = flags.DEFINE_list("sizes", ["2x128", "4x256", "6x384", "8x512", "12x768"],
                           "Sweep: model sizes as LAYERSxD_MODEL (GPT-2's ladder: about 1M to 124M parameters).")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["64", "128", "256", "512", "1024"], "Sweep: sequence lengths.")
_SWEEP_BATCH = flags.DEFINE_integer("sweep_batch", 8, "Sweep: rows per step.", lower_bound=1)
_PEAK_F32 = flags.DEFINE_float("peak_f32_gflops", 0.0, "Float32 matmul peak in GFLOP/s (0: measure it).")
_PEAK_BF16 = flags.DEFINE_float("peak_bf16_gflops", 0.0, "Bfloat16 matmul peak in GFLOP/s (0: measure it).")
flags.mark_flags_as_required(["config"])

PROFILE_STEPS = 3


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int, sharding) -> dict:
  """Random tokens as one unpacked batch (one segment per row), placed with the batch sharding."""
  tokens = np.random.default_rng(seed).integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
  batch = rows(tokens[:, :-1], seq_len, targets=tokens[:, 1:], weights=np.ones((batch_size, seq_len), np.float32))
  return {k: jax.device_put(v, sharding) for k, v in batch.items()}


def measure_peaks() -> dict:
  """The float32 and bfloat16 matmul peaks of one device, FLOP/s."""
  return {"f32": hardware.matmul_peak_flops(jnp.float32), "bf16": hardware.matmul_peak_flops(jnp.bfloat16)}


def benchmark(config, steps: int, warmup: int, vocab_size: int, peaks: dict | None = None,
              profile_dir: str = "") -> dict:
  """Compiles and times the train step, measures the peaks (unless given, FLOP/s by dtype); returns the figures."""
  train = config.train
  mesh = mesh_lib.make_mesh(config.mesh)
  check_train_config(config, mesh)
  vocab_size = vocab_size or default_vocab_size(config)
  run = runs.pretraining(config, mesh, vocab_size)
  model_cfg = run.model.cfg
  state = run.init_state()
  batch = synthetic_batch(train.batch_size, train.seq_len, vocab_size, train.seed, mesh_lib.batch_sharding(mesh))
  # The peaks are measured before and after the steps: a large gap means another process shared the cores.
  measured_before = None if peaks else measure_peaks()

  start = time.perf_counter()
  train_fn = jit_train_step(run, token_loss(run.model), train).lower(state, batch, run.frozen).compile()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    state, metrics = train_fn(state, batch, run.frozen)
    jax.block_until_ready((state, metrics))
  step_times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = train_fn(state, batch, run.frozen)
    jax.block_until_ready((state, metrics))
    step_times.append(time.perf_counter() - start)
  if profile_dir:
    with jax.profiler.trace(profile_dir):
      for _ in range(PROFILE_STEPS):
        state, metrics = train_fn(state, batch, run.frozen)
      jax.block_until_ready((state, metrics))

  median_s = statistics.median(step_times)
  tokens_per_s = train.batch_size * train.seq_len / median_s
  model_flops = model_cfg.flops_per_token(train.seq_len) * tokens_per_s
  # Host "devices" share the same cores, so on CPU the peak of one device is the peak of the mesh.
  chips = 1 if jax.default_backend() == "cpu" else mesh.devices.size
  if peaks is None:
    measured_after = measure_peaks()
    peaks = {dtype: max(measured_before[dtype], measured_after[dtype]) for dtype in measured_before}
  cost = hardware.compiled_cost(train_fn)
  kind = jax.devices()[0].device_kind
  figures = {
      "config": {"num_layers": model_cfg.num_layers, "d_model": model_cfg.d_model,
                 "num_heads": model_cfg.num_heads, "vocab_size": vocab_size, "dtype": model_cfg.dtype,
                 "remat": model_cfg.remat, "batch_size": train.batch_size, "seq_len": train.seq_len,
                 "grad_accum": train.grad_accum, "mesh": dict(mesh.shape), "backend": jax.default_backend(),
                 "device_kind": kind, "steps": steps},
      "num_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
      "compile_s": compile_s,
      "ms_per_step_median": 1e3 * median_s,
      "ms_per_step_mean": 1e3 * statistics.mean(step_times),
      "ms_per_step_min": 1e3 * min(step_times),
      "tokens_per_s": tokens_per_s,
      "flops_per_token": model_cfg.flops_per_token(train.seq_len),
      "model_tflops_per_s": model_flops / 1e12,
      "xla_gflops_per_step": chips * cost["flops"] / 1e9,
      "xla_gb_accessed_per_step": chips * cost["bytes_accessed"] / 1e9,
      "peak_f32_matmul_gflops_per_s": peaks["f32"] * chips / 1e9,
      "peak_bf16_matmul_gflops_per_s": peaks["bf16"] * chips / 1e9,
      "mfu_f32": model_flops / (peaks["f32"] * chips),
      "mfu_bf16": model_flops / (peaks["bf16"] * chips),
      "step_memory_mib": (hardware.compiled_memory_bytes(train_fn) or 0) / 2**20,
      # host resident set on CPU (the Python and XLA runtime included), the device's peak in use elsewhere
      "peak_memory_mib": hardware.peak_memory_bytes() / 2**20,
      "final_loss": float(metrics["loss_sum"] / metrics["weight_sum"]),
  }
  if measured_before is not None:
    figures["peak_f32_before_after_gflops_per_s"] = [round(measured_before["f32"] / 1e9),
                                                     round(measured_after["f32"] / 1e9)]
  datasheet = hardware.datasheet_bf16_peak(kind)
  if datasheet and jax.default_backend() != "cpu":
    figures["datasheet_bf16_tflops_per_s"] = datasheet * chips / 1e12
    figures["mfu_datasheet_bf16"] = model_flops / (datasheet * chips)
  return figures


def print_table(figures: dict) -> None:
  """One row per figure, aligned."""
  lines = [(key, json.dumps(value) if isinstance(value, (dict, list)) else value)
           for key, value in figures.items()]
  width = max(len(key) for key, _ in lines)
  for key, value in lines:
    text = f"{value:,.4g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else value
    print(f"{key:<{width}}  {text}")


def _size(text: str) -> tuple[int, int]:
  layers, _, d_model = text.lower().partition("x")
  if not (layers.isdigit() and d_model.isdigit() and int(d_model) % 64 == 0):
    fail(f"--sizes: expected LAYERSxD_MODEL with d_model a multiple of 64 (heads of 64), got {text!r}")
  return int(layers), int(d_model)


def sweep() -> list[dict]:
  """Each (size, seq_len) cell in its own process, with this process's peaks, printed as a markdown row when done;
  a failed cell (out of memory, say) is recorded with its error and the sweep goes on."""
  cells = [(_size(s), int(n)) for s in _SIZES.value for n in _SEQ_LENS.value]
  print(f"sweep: {len(cells)} cells; measuring the matmul peaks once", flush=True)
  peaks = measure_peaks()
  print("\n| " + " | ".join(SWEEP_COLUMNS) + " |\n|" + "---|" * len(SWEEP_COLUMNS), flush=True)
  passed = [a for a in sys.argv[1:] if a.startswith(("--config", "--vocab_size", "--steps", "--warmup"))]
  results = []
  for (layers, d_model), seq_len in cells:
    cell = {"num_layers": layers, "d_model": d_model, "seq_len": seq_len}
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "cell.json")
      command = [sys.executable, os.path.abspath(__file__), *passed,
                 f"--config.model.num_layers={layers}", f"--config.model.d_model={d_model}",
                 f"--config.model.num_heads={d_model // 64}", "--config.model.head_dim=0",
                 "--config.model.num_kv_heads=0", "--config.model.mlp_dim=0",
                 f"--config.model.max_len={max(seq_len, 1)}", f"--config.train.seq_len={seq_len}",
                 f"--config.train.batch_size={_SWEEP_BATCH.value}", "--config.train.grad_accum=1",
                 f"--peak_f32_gflops={peaks['f32'] / 1e9}", f"--peak_bf16_gflops={peaks['bf16'] / 1e9}",
                 f"--json_out={out}"]
      done = subprocess.run(command, capture_output=True, text=True)
      if done.returncode == 0 and os.path.exists(out):
        with open(out) as f:
          cell.update(json.load(f))
      else:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        cell["error"] = lines[-1][:200] if lines else f"exit status {done.returncode}"
    results.append(cell)
    print(sweep_row(cell), flush=True)
  return results


SWEEP_COLUMNS = ("layers x d_model", "params (M)", "seq_len", "tokens/s", "ms/step", "MFU f32", "MFU bf16",
                 "peak memory (MiB)", "compile (s)")


def sweep_row(cell: dict) -> str:
  """One markdown table row of a sweep cell."""
  size = f"{cell['num_layers']}x{cell['d_model']}"
  if "error" in cell:
    return f"| {size} | | {cell['seq_len']} | {cell['error']} | | | | | |"
  values = (size, f"{cell['num_params'] / 1e6:.2f}", cell["seq_len"], f"{cell['tokens_per_s']:,.0f}",
            f"{cell['ms_per_step_median']:,.1f}", f"{cell['mfu_f32']:.3f}", f"{cell['mfu_bf16']:.3f}",
            f"{cell['peak_memory_mib']:,.0f}", f"{cell['compile_s']:.1f}")
  return "| " + " | ".join(map(str, values)) + " |"


def main(argv):
  del argv
  if _SWEEP.value:
    figures = sweep()
  else:
    given = _PEAK_F32.value and _PEAK_BF16.value
    peaks = {"f32": _PEAK_F32.value * 1e9, "bf16": _PEAK_BF16.value * 1e9} if given else None
    figures = run_reporting_errors(benchmark, _CONFIG.value, _STEPS.value, _WARMUP.value, _VOCAB.value, peaks,
                                   _PROFILE.value)
    print_table(figures)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(figures, f, indent=2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
