"""Compile time of a run's train step, with and without scan over layers, at several depths.

  python bench/compile.py [--config=configs/gpt2_small.py] [--layers=12,24] [--json_out=PATH]

Traces, lowers and compiles the train step exactly as a run does (train.loop.jit_train_step) for one row of 128
tokens (the batch size barely changes compile time); nothing is run. A scanned stack is traced and compiled once
per block, so its compile time stays flat with depth while the unrolled one grows.
"""

import argparse
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train import mesh as mesh_lib  # noqa: E402
from train import runs  # noqa: E402
from train.estimate import abstract_batch  # noqa: E402
from train.loop import jit_train_step  # noqa: E402
from train.step import token_loss  # noqa: E402


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def compile_seconds(config) -> tuple[float, float]:
  """(trace + lower seconds, compile seconds) of the config's train step."""
  mesh = mesh_lib.make_mesh(config.mesh)
  run = runs.pretraining(config, mesh, config.data.vocab_size)
  step = jit_train_step(run, token_loss(run.model), config.train)
  batch = abstract_batch(config, mesh_lib.batch_sharding(mesh))
  start = time.perf_counter()
  lowered = step.lower(run.abstract_state(), batch, run.frozen)
  traced = time.perf_counter()
  lowered.compile()
  return traced - start, time.perf_counter() - traced


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/gpt2_small.py")
  parser.add_argument("--layers", default="12,24")
  parser.add_argument("--json_out", default="")
  args = parser.parse_args()
  results = []
  print("| layers | scan_layers | trace + lower s | compile s | total s |\n|---|---|---|---|---|")
  for layers in map(int, args.layers.split(",")):
    for scan in (True, False):
      config = load_config(args.config)
      config.model.update(num_layers=layers, scan_layers=scan)
      config.train.update(batch_size=1, seq_len=128, grad_accum=1)
      config.mesh.update(data=1, fsdp=1, tensor=1)
      trace_s, compile_s = compile_seconds(config)
      results.append({"layers": layers, "scan_layers": scan, "trace_s": trace_s, "compile_s": compile_s})
      print(f"| {layers} | {scan} | {trace_s:.1f} | {compile_s:.1f} | {trace_s + compile_s:.1f} |", flush=True)
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
