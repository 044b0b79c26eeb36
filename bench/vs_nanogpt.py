"""ablax against nanoGPT (eager PyTorch on the CPU) on the same model, batch and length, in one sitting.

  python bench/vs_nanogpt.py --nanogpt_dir=/tmp/nanoGPT [--configs=shakespeare_char,wide] [--steps=60]
      [--dtypes=float32,bfloat16] [--rounds=2] [--json_out=PATH]

nanoGPT is not part of ablax: clone it anywhere and prepare its shakespeare_char data once
(`python data/shakespeare_char/prepare.py`, with input.txt copied from ../shared/data/tinyshakespeare to skip the
download). Each round runs, per config, nanoGPT's `train.py --device=cpu --compile=False` and then ablax's
`python -m train.pretrain` per dtype, through the commands a user types, so both pay their whole loop (data,
logging, optimizer). Step time: nanoGPT's median logged iteration time after 10 iterations; ablax's median of
its logged train/tokens_per_sec intervals after step 10 (the final step, which checkpoints, is left out).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {  # nanoGPT's names; both run with biases and no dropout, as configs/shakespeare_char.py
    "shakespeare_char": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
    "wide": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=16),
}


def nanogpt_ms(nanogpt_dir: str, shape: dict, steps: int, out_dir: str) -> float:
  args = [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
          "--eval_iters=1", "--eval_interval=1000000", "--log_interval=1", f"--max_iters={steps}",
          f"--lr_decay_iters={steps}", "--dropout=0.0", "--bias=True", "--always_save_checkpoint=False",
          f"--out_dir={out_dir}", *(f"--{k}={v}" for k, v in shape.items())]
  out = subprocess.run(args, cwd=nanogpt_dir, capture_output=True, text=True, check=True).stdout
  times = [float(t) for i, t in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", out) if int(i) >= 10]
  return statistics.median(times)


def ablax_ms(shape: dict, dtype: str, steps: int, workdir: str) -> float:
  shutil.rmtree(workdir, ignore_errors=True)
  args = [sys.executable, "-m", "train.pretrain", "--config=configs/shakespeare_char.py", f"--workdir={workdir}",
          f"--config.model.num_layers={shape['n_layer']}", f"--config.model.num_heads={shape['n_head']}",
          f"--config.model.d_model={shape['n_embd']}", f"--config.model.max_len={shape['block_size']}",
          f"--config.train.seq_len={shape['block_size']}", f"--config.train.batch_size={shape['batch_size']}",
          f"--config.model.dtype={dtype}", f"--config.train.steps={steps}", "--config.train.eval_every=1000000",
          "--config.train.eval_batches=1", "--config.train.num_samples=0", "--config.train.log_every=10"]
  subprocess.run(args, cwd=ROOT, capture_output=True, check=True)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  rates = [r["train/tokens_per_sec"] for r in records if 10 < r["step"] < steps]
  return 1e3 * shape["batch_size"] * shape["block_size"] / statistics.median(rates)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--nanogpt_dir", required=True)
  parser.add_argument("--configs", default="shakespeare_char,wide")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--json_out", default="")
  args = parser.parse_args()
  if not os.path.exists(os.path.join(args.nanogpt_dir, "data", "shakespeare_char", "train.bin")):
    sys.exit(f"error: {args.nanogpt_dir}/data/shakespeare_char/train.bin: not found; run nanoGPT's "
             "data/shakespeare_char/prepare.py first")
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for round_index in range(args.rounds):
      for name in args.configs.split(","):
        row = {"round": round_index, "config": name,
               "nanogpt_ms": nanogpt_ms(args.nanogpt_dir, CONFIGS[name], args.steps, os.path.join(tmp, "nano"))}
        for dtype in args.dtypes.split(","):
          row[f"ablax_{dtype}_ms"] = ablax_ms(CONFIGS[name], dtype, args.steps, os.path.join(tmp, "ablax"))
          row[f"ratio_{dtype}"] = row[f"ablax_{dtype}_ms"] / row["nanogpt_ms"]
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        results.append(row)
  print(f"\n| config | round | nanoGPT ms/step | " + " | ".join(f"ablax {d} ms/step | ratio {d}"
                                                         for d in args.dtypes.split(",")) + " |")
  print("|---|---|---|" + "---|---|" * len(args.dtypes.split(",")))
  for row in results:
    cells = " | ".join(f"{row[f'ablax_{d}_ms']:.1f} | {row[f'ratio_{d}']:.2f}" for d in args.dtypes.split(","))
    print(f"| {row['config']} | {row['round']} | {row['nanogpt_ms']:.1f} | {cells} |")
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
