"""Step time and memory of LoRA fine-tuning against full fine-tuning of the same model on the same batch.

  python bench/peft_step.py --config=configs/wiki_small.py [--config.a.b=v ...] [--steps=20] [--warmup=3]
      [--methods=full,lora] [--lora_rank=8] [--lora_targets=REGEX,...] [--json_out=PATH]

A randomly initialised model of the (pretraining) config is written as a step-0 base run in a temporary directory.
Each method then runs in a process of its own (so the resident set it reports is its own): it builds its Run with
train/runs.py `finetuning` (task lm), jits the step as train/loop.py does, compiles it (not timed), runs `--warmup`
steps and times `--steps` more on one synthetic batch [train.batch_size, train.seq_len], each ended with
`block_until_ready`. Reported per method: the median ms/step, XLA's memory analysis of the compiled step
(arguments, outputs, temporaries; total = their sum less the donated aliases) and cost analysis (FLOPs, bytes
accessed), the growth of the process's peak memory over its start (host resident set on CPU, the device's peak on
accelerators) and the trainable parameters.
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
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs.finetune import common  # noqa: E402
from data.batch import rows  # noqa: E402
from train import hardware  # noqa: E402
from train import mesh as mesh_lib  # noqa: E402
from train import runs  # noqa: E402
from train import tasks  # noqa: E402
from train import workdir as workdir_lib  # noqa: E402
from train.cli import run_reporting_errors  # noqa: E402
from train.loop import jit_train_step  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pretraining config file (configs/*.py): the model, "
                                          "batch and mesh.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps per method.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after the compile.", lower_bound=0)
_METHODS = flags.DEFINE_list("methods", ["full", "lora"], "PEFT methods to measure (config.peft.method).")
_RANK = flags.DEFINE_integer("lora_rank", 8, "config.peft.lora_rank (alpha = 2 rank).", lower_bound=1)
_TARGETS = flags.DEFINE_list("lora_targets", [r"attention/(query|value)$"], "config.peft.lora_targets.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Also write the figures to this JSON file.")
_BASE = flags.DEFINE_string("base_dir", "", "Internal: the base run a child process measures against.")
flags.mark_flags_as_required(["config"])


def write_base(config, workdir: str) -> None:
  """A random model of `config` as a step-0 run without a tokenizer (token ids only)."""
  config.data.tokenizer = "none"
  run = runs.pretraining(config, mesh_lib.one_device_mesh(), config.data.vocab_size)
  workdir_lib.prepare_workdir(config, workdir)
  runs.write_initial_checkpoint(workdir, config, jax.device_get(run.init_state().params))


def finetuning_config(config, method: str, base_dir: str):
  """The fine-tuning config of `method` on the base run, with the pretraining config's batch and mesh."""
  ft = common.get_config()
  ft.init_from, ft.task = base_dir, "lm"
  ft.peft.update(method=method, lora_rank=_RANK.value, lora_alpha=2.0 * _RANK.value,
                 lora_targets=tuple(_TARGETS.value))
  ft.train.update(batch_size=config.train.batch_size, seq_len=config.train.seq_len,
                  grad_accum=config.train.grad_accum)
  ft.mesh.update(dict(config.mesh))
  runs.resolve_base(ft)
  return ft


def measure(config, method: str, base_dir: str) -> dict:
  """One method's figures, in this process."""
  start_bytes = hardware.peak_memory_bytes()
  ft = finetuning_config(config, method, base_dir)
  mesh = mesh_lib.make_mesh(ft.mesh)
  run = runs.finetuning(ft, mesh, labels=None, require_tokenizer=False)
  state = run.init_state()
  train = ft.train
  tokens = np.random.default_rng(0).integers(1, run.model.cfg.vocab_size, (train.batch_size, train.seq_len + 1))
  batch = rows(tokens[:, :-1], train.seq_len, targets=tokens[:, 1:],
               weights=np.ones((train.batch_size, train.seq_len), np.float32))
  batch = {k: jax.device_put(v, mesh_lib.batch_sharding(mesh)) for k, v in batch.items()}
  step = jit_train_step(run, tasks.make_loss("lm", run), train).lower(state, batch, run.frozen).compile()
  times = []
  for i in range(_WARMUP.value + _STEPS.value):
    start = time.perf_counter()
    state, metrics = step(state, batch, run.frozen)
    jax.block_until_ready((state, metrics))
    if i >= _WARMUP.value:
      times.append(time.perf_counter() - start)
  analysis, cost = step.memory_analysis(), hardware.compiled_cost(step)
  mib = lambda n: n / 2**20
  return {
      "method": method,
      "trainable_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
      "frozen_params": int(sum(x.size for x in jax.tree.leaves(run.frozen))),
      "ms_per_step_median": 1e3 * statistics.median(times),
      "ms_per_step_min": 1e3 * min(times),
      "xla_argument_mib": mib(analysis.argument_size_in_bytes) if analysis else None,
      "xla_output_mib": mib(analysis.output_size_in_bytes) if analysis else None,
      "xla_alias_mib": mib(analysis.alias_size_in_bytes) if analysis else None,
      "xla_temp_mib": mib(analysis.temp_size_in_bytes) if analysis else None,
      "xla_total_mib": mib(hardware.compiled_memory_bytes(step) or 0),
      "xla_gflops": cost["flops"] / 1e9,
      "xla_gb_accessed": cost["bytes_accessed"] / 1e9,
      "peak_growth_mib": mib(hardware.peak_memory_bytes() - start_bytes),
      "final_loss": float(metrics["loss_sum"] / metrics["weight_sum"]),
  }


def table(results: list[dict]) -> str:
  columns = [("method", "method", "{}"), ("trainable", "trainable_params", "{:,}"),
             ("ms/step (median)", "ms_per_step_median", "{:.1f}"), ("ms/step (min)", "ms_per_step_min", "{:.1f}"),
             ("XLA args MiB", "xla_argument_mib", "{:.1f}"), ("XLA out MiB", "xla_output_mib", "{:.1f}"),
             ("XLA temp MiB", "xla_temp_mib", "{:.1f}"), ("XLA total MiB", "xla_total_mib", "{:.1f}"),
             ("peak growth MiB", "peak_growth_mib", "{:.0f}"), ("XLA GFLOP", "xla_gflops", "{:.1f}"),
             ("XLA GB accessed", "xla_gb_accessed", "{:.2f}")]
  lines = ["| " + " | ".join(name for name, _, _ in columns) + " |", "|" + "---|" * len(columns)]
  for r in results:
    lines.append("| " + " | ".join("-" if r[key] is None else fmt.format(r[key]) for _, key, fmt in columns) + " |")
  return "\n".join(lines)


def main(config) -> None:
  if _BASE.value:  # a child: one method, its figures as the last line of stdout
    print(json.dumps(measure(config, _METHODS.value[0], _BASE.value)))
    return
  with tempfile.TemporaryDirectory() as tmp:
    base_dir = os.path.join(tmp, "base")
    write_base(config, base_dir)
    results = []
    for method in _METHODS.value:
      argv = [a for a in sys.argv[1:] if not a.startswith(("--methods", "--json_out", "--base_dir"))]
      child = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, f"--methods={method}",
                              f"--base_dir={base_dir}"], capture_output=True, text=True)
      if child.returncode:
        raise RuntimeError(f"{method}: the measuring process failed:\n{child.stderr[-3000:]}")
      results.append(json.loads(child.stdout.strip().splitlines()[-1]))
  by_method = {r["method"]: r for r in results}
  figures = {"config": {"num_layers": config.model.num_layers, "d_model": config.model.d_model,
                        "vocab_size": config.data.vocab_size, "dtype": config.model.dtype,
                        "batch_size": config.train.batch_size, "seq_len": config.train.seq_len,
                        "lora_rank": _RANK.value, "lora_targets": _TARGETS.value, "steps": _STEPS.value,
                        "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind},
             "results": results}
  print(table(results))
  if {"full", "lora"} <= set(by_method):
    full, lora = by_method["full"], by_method["lora"]
    figures["lora_over_full"] = {key: lora[key] / full[key] for key in ("ms_per_step_median", "xla_total_mib",
                                                                        "peak_growth_mib", "xla_gflops") if full[key]}
    print("lora / full: " + ", ".join(f"{k} {v:.2f}" for k, v in figures["lora_over_full"].items()))
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(figures, f, indent=2)


if __name__ == "__main__":
  app.run(lambda argv: run_reporting_errors(main, _CONFIG.value))
