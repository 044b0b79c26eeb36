"""The table of docs/accelerators.md: models x TPU topologies compiled by `python -m train.compile` (one process each).

  pip install -e ".[tpu]"
  python bench/tpu_table.py [--only=NAME,...] [--out=DIR] > table.md

Each row is one compile (nothing runs on a TPU); its figures go to DIR/NAME.json and a markdown row to stdout.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

GPT2_XL = ["--config.model.num_layers=48", "--config.model.d_model=1600", "--config.model.num_heads=25"]
LONG = ["--config.train.seq_len=4096", "--config.model.max_len=4096"]
MOE_SMALL = ["--config.model.mlp=moe", "--config.model.num_experts=8", "--config.model.experts_per_token=2",
             "--config.train.batch_size=32"]  # 8 experts of 3072 a layer: 521M parameters, 181M active
# (name, config, topology, overrides): the knobs that made a row fit are its overrides.
ROWS = [
    ("gpt2-124M shipped, v5e-8", "gpt2_small", "v5e:2x4", ["--config.mesh.fsdp=8"]),
    ("gpt2-124M 32x1024 a chip, v5e-8", "gpt2_small", "v5e:2x4", ["--config.mesh.fsdp=8",
                                                                  "--config.train.batch_size=256"]),
    ("gpt2-124M 32x1024 a chip remat, v5e-8", "gpt2_small", "v5e:2x4", [
        "--config.mesh.fsdp=8", "--config.train.batch_size=256", "--config.model.remat=True",
        "--config.model.remat_policy=dots"]),
    ("gpt2-124M T=4096 einsum, v5e-8", "gpt2_small", "v5e:2x4", ["--config.mesh.fsdp=8",
                                                                 "--config.train.batch_size=8", *LONG]),
    ("gpt2-124M T=4096 splash, v5e-8", "gpt2_small", "v5e:2x4", [
        "--config.mesh.fsdp=8", "--config.train.batch_size=8", *LONG, "--config.model.attention_impl=splash"]),
    ("llama2-7B einsum, v5p-64", "llama2_7b", "v5p:4x4x4", []),
    ("llama2-7B splash, v5p-64", "llama2_7b", "v5p:4x4x4", ["--config.model.attention_impl=splash"]),
    ("llama2-7B splash remat, v5e-256", "llama2_7b", "v5e:16x16", [
        "--config.mesh.fsdp=256", "--config.train.batch_size=256", "--config.model.attention_impl=splash",
        "--config.model.remat=True"]),
    ("llama2-7B splash, v6e-64", "llama2_7b", "v6e:8x8", ["--config.model.attention_impl=splash"]),
    ("llama2-7B splash remat, v6e-64", "llama2_7b", "v6e:8x8", ["--config.model.attention_impl=splash",
                                                               "--config.model.remat=True"]),
    ("llama2-7B splash remat, v5e-8", "llama2_7b", "v5e:2x4", [
        "--config.mesh.fsdp=8", "--config.train.batch_size=8", "--config.model.attention_impl=splash",
        "--config.model.remat=True"]),
    ("gpt2-1.5B remat, v5e-8", "gpt2_small", "v5e:2x4", [
        *GPT2_XL, "--config.mesh.fsdp=8", "--config.train.batch_size=16", "--config.model.remat=True"]),
    ("gpt2-1.5B, v5p-64", "gpt2_small", "v5p:4x4x4", [*GPT2_XL, "--config.mesh.fsdp=64",
                                                      "--config.train.batch_size=512"]),
    # mixtures of experts (issue 27): tokens to their experts by all-to-all (capacity) or kernels to the tokens
    ("gpt2-124M 8 experts top-2, capacity 1.25, v5e-8", "gpt2_small", "v5e:2x4", [
        *MOE_SMALL, "--config.model.moe_capacity_factor=1.25", "--config.mesh.expert=8"]),
    ("gpt2-124M 8 experts top-2, dropless, v5e-8", "gpt2_small", "v5e:2x4", [*MOE_SMALL, "--config.mesh.fsdp=8"]),
    ("mixtral-8x7B shape, capacity 1.25, v5p-128", "mixtral_8x7b", "v5p:4x4x8", []),
    ("mixtral-8x7B shape, capacity 1.25, remat, v5p-128", "mixtral_8x7b", "v5p:4x4x8", ["--config.model.remat=True"]),
    # per-chip memory against fsdp (the rest of the 8 chips data-parallel)
    *((f"gpt2-1.5B remat fsdp={n}, v5e-8", "gpt2_small", "v5e:2x4", [
        *GPT2_XL, f"--config.mesh.fsdp={n}", "--config.train.batch_size=16", "--config.model.remat=True"])
      for n in (2, 4)),
]


def row(name: str, figures: dict, overrides: list) -> str:
  knobs = " ".join(o.removeprefix("--config.") for o in overrides if "num_layers" not in o and "d_model" not in o
                   and "num_heads" not in o) or "as shipped"
  f = figures
  if not f["fits"]:
    need = re.search(r"\(([\d.]+[GM])\) exceeds available HBM \(([\d.]+[GM])\)", f["reason"])
    said = f"{need.group(1)} of temporaries > {need.group(2)}" if need else f["reason"][:90]
    return f"| {name} | {knobs} | - | does not fit ({said}) | - | - | {f['compile_s']:.0f} |"
  serial = f" - {f['mfu_serial']:.0%}" if "mfu_serial" in f else ""
  return (f"| {name} | {knobs} | {f['total_bytes'] / 2**30:.2f} / {f['hbm_bytes'] / 2**30:.0f} | fits | "
          f"{f['step_s'] * 1e3:,.0f} ({f['bound']}) | {f['mfu']:.0%}{serial} | {f['compile_s']:.0f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="")
  parser.add_argument("--out", default="/tmp/tpu_table")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  print("| model, topology | knobs | GiB a chip (of HBM) | verdict | roofline ms/step | MFU (roofline - serial) | "
        "compile s |\n"
        "|---|---|---|---|---|---|---|", flush=True)
  for name, config, topology, overrides in ROWS:
    if args.only and not any(key in name for key in args.only.split(",")):
      continue
    path = os.path.join(args.out, name.replace(" ", "_").replace(",", "").replace("/", "-") + ".json")
    # Every stack scanned: compiled once per block (minutes, not tens of minutes, on a CPU host); train.compile
    # costs it from loop-free copies.
    command = [sys.executable, "-m", "train.compile", f"--config=configs/{config}.py", f"--topology={topology}",
               "--vocab_size=50304" if config == "gpt2_small" else "--vocab_size=32000", f"--json_out={path}",
               "--config.model.scan_layers=True", *overrides]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if not os.path.exists(path) or done.returncode not in (0, 2):
      tail = (done.stderr.strip().splitlines() or ["?"])[-1][:150]
      print(f"| {name} | failed after {time.perf_counter() - start:.0f} s: {tail} |||||||", flush=True)
      continue
    with open(path) as f:
      print(row(name, json.load(f), overrides), flush=True)


if __name__ == "__main__":
  main()
