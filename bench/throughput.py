"""Training throughput and MFU of one config on synthetic tokens.

  python bench/throughput.py --config=configs/shakespeare_char.py [--config.a.b=v ...] [--steps=20]
      [--warmup=3] [--vocab_size=N] [--json_out=PATH]

Builds the Run (model, optimizer, sharded state) and jitted train step exactly as train/loop.py does, times
`--steps` steps after `--warmup` (the first compiles), and divides the model FLOP/s (PaLM formula,
`ModelConfig.flops_per_token`) by a matmul peak measured in this process.
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from data.batch import rows  # noqa: E402
from train import mesh as mesh_lib  # noqa: E402
from train.hardware import matmul_peak_flops  # noqa: E402
from train import runs  # noqa: E402
from train.cli import run_reporting_errors  # noqa: E402
from train.loop import check_train_config, jit_train_step  # noqa: E402
from train.step import token_loss  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (the first one compiles).",
                               lower_bound=1)
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "Vocabulary size (0 = 65+3 for char configs, else "
                              "config.data.vocab_size).")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Also write the figures to this JSON file.")
flags.mark_flags_as_required(["config"])

def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int, sharding) -> dict:
  """Random tokens as one unpacked batch (one segment per row), placed with the batch sharding."""
  tokens = np.random.default_rng(seed).integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
  batch = rows(tokens[:, :-1], seq_len, targets=tokens[:, 1:], weights=np.ones((batch_size, seq_len), np.float32))
  return {k: jax.device_put(v, sharding) for k, v in batch.items()}


def benchmark(config, steps: int, warmup: int, vocab_size: int) -> dict:
  """Runs the timed steps and the matmul peaks; returns the figures."""
  train = config.train
  mesh = mesh_lib.make_mesh(config.mesh)
  check_train_config(config, mesh)
  if not vocab_size:
    vocab_size = 65 + 3 if config.data.tokenizer == "char" else config.data.vocab_size
  run = runs.pretraining(config, mesh, vocab_size)
  model, model_cfg = run.model, run.model.cfg
  state = run.init_state()
  batch_sharding = mesh_lib.batch_sharding(mesh)
  train_fn = jit_train_step(run, token_loss(model), train)
  batch = synthetic_batch(train.batch_size, train.seq_len, vocab_size, train.seed, batch_sharding)
  # The peak is measured before and after the steps: a large gap means another process shared the cores.
  peak_f32_before = matmul_peak_flops(jnp.float32)

  start = time.perf_counter()
  for i in range(warmup):
    state, metrics = train_fn(state, batch, run.frozen)
    jax.block_until_ready((state, metrics))
    if i == 0:
      compile_s = time.perf_counter() - start
  step_times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = train_fn(state, batch, run.frozen)
    jax.block_until_ready((state, metrics))
    step_times.append(time.perf_counter() - start)

  median_s = statistics.median(step_times)
  tokens_per_s = train.batch_size * train.seq_len / median_s
  model_flops = model_cfg.flops_per_token(train.seq_len) * tokens_per_s
  # Host "devices" share the same cores, so on CPU the peak of one device is the peak of the mesh.
  chips = 1 if jax.default_backend() == "cpu" else mesh.devices.size
  peak_f32_after = matmul_peak_flops(jnp.float32)
  peak_f32 = max(peak_f32_before, peak_f32_after) * chips
  figures = {
      "config": {"num_layers": model_cfg.num_layers, "d_model": model_cfg.d_model,
                 "num_heads": model_cfg.num_heads, "vocab_size": vocab_size, "dtype": model_cfg.dtype,
                 "batch_size": train.batch_size, "seq_len": train.seq_len, "grad_accum": train.grad_accum,
                 "mesh": dict(mesh.shape), "backend": jax.default_backend(), "steps": steps},
      "num_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
      "compile_and_first_step_s": compile_s,
      "ms_per_step_median": 1e3 * median_s,
      "ms_per_step_mean": 1e3 * statistics.mean(step_times),
      "ms_per_step_min": 1e3 * min(step_times),
      "tokens_per_s": tokens_per_s,
      "flops_per_token": model_cfg.flops_per_token(train.seq_len),
      "model_tflops_per_s": model_flops / 1e12,
      "peak_f32_matmul_gflops_per_s": peak_f32 / 1e9,
      "peak_f32_before_after_gflops_per_s": [round(peak_f32_before / 1e9), round(peak_f32_after / 1e9)],
      "mfu_f32": model_flops / peak_f32,
      "final_loss": float(metrics["loss_sum"] / metrics["weight_sum"]),
  }
  if model_cfg.dtype == "bfloat16":
    peak_bf16 = matmul_peak_flops(jnp.bfloat16) * chips
    figures["peak_bf16_matmul_gflops_per_s"] = peak_bf16 / 1e9
    figures["mfu_bf16"] = model_flops / peak_bf16
  return figures


def print_table(figures: dict) -> None:
  """One row per figure, aligned."""
  rows = [(key, json.dumps(value) if isinstance(value, (dict, list)) else value)
          for key, value in figures.items()]
  width = max(len(key) for key, _ in rows)
  for key, value in rows:
    text = f"{value:,.4g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else value
    print(f"{key:<{width}}  {text}")


def main(argv):
  del argv
  figures = run_reporting_errors(benchmark, _CONFIG.value, _STEPS.value, _WARMUP.value, _VOCAB.value)
  print_table(figures)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(figures, f, indent=2)


if __name__ == "__main__":
  app.run(main)
