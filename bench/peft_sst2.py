"""Fine-tunes one pretrained run on SST-2 with every PEFT method and prints a markdown table.

  python bench/peft_sst2.py --base=runs/wiki_small --out=runs/peft_sst2 [--steps=300]

Each method runs as its own `python -m train.finetune` process, so its peak resident memory (from
os.wait4) is its own. Step time is the median over the logged intervals after the first (compilation).
A finished run is not repeated: its metrics are read back.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHODS = {  # name: (config file, extra overrides)
    "full": ("sst2_full.py", ["--config.train.learning_rate=2e-4"]),
    "freeze (BitFit)": ("sst2_bitfit.py", []),
    # alpha fixed across ranks (Hu et al.): with Adam, alpha = 2 r would also scale the first update with the rank
    "lora r=4": ("sst2_lora.py", ["--config.peft.lora_rank=4", "--config.peft.lora_alpha=8"]),
    "lora r=16": ("sst2_lora.py", ["--config.peft.lora_rank=16", "--config.peft.lora_alpha=8"]),
    "prompt (20 tokens)": ("sst2_prompt.py", []),
    "ia3": ("sst2_ia3.py", []),
}


def run(name: str, config: str, overrides: list, base: str, out: str, steps: int) -> dict:
  workdir = os.path.join(out, name.split(" (")[0].replace(" ", "_").replace("=", ""))
  command = [sys.executable, "-m", "train.finetune", f"--config=configs/finetune/{config}", f"--workdir={workdir}",
             f"--config.init_from={base}", f"--config.train.steps={steps}", f"--config.train.eval_every={steps}",
             f"--config.train.checkpoint_every={steps}", "--config.train.log_every=25", *overrides]
  peak_rss_mb = None
  if not os.path.exists(os.path.join(workdir, "checkpoints", str(steps))):
    with open(os.path.join(out, f"{os.path.basename(workdir)}.log"), "w") as log:
      process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
      _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
      raise SystemExit(f"{name}: failed, see {log.name}")
    with open(os.path.join(workdir, "peak_memory.json"), "w") as f:
      json.dump({"peak_rss_mb": usage.ru_maxrss / 1024}, f)
  if os.path.exists(os.path.join(workdir, "peak_memory.json")):
    with open(os.path.join(workdir, "peak_memory.json")) as f:
      peak_rss_mb = json.load(f)["peak_rss_mb"]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  with open(os.path.join(workdir, "run_info.json")) as f:
    info = json.load(f)
  with open(os.path.join(workdir, "config.json")) as f:
    train = json.load(f)["train"]
  tokens_per_step = train["batch_size"] * train["seq_len"]
  step_ms = statistics.median(1e3 * tokens_per_step / r["train/tokens_per_sec"] for r in records[1:])
  final = [r for r in records if "eval/accuracy" in r][-1]
  return {"method": name, "dev_accuracy": final["eval/accuracy"], "dev_macro_f1": final["eval/macro_f1"],
          "trainable_params": info["trainable_params"], "trainable_share": info["trainable_share"],
          "peak_rss_mb": peak_rss_mb, "step_ms": step_ms, "command": " ".join(command[1:])}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--base", required=True, help="pretrained run directory")
  parser.add_argument("--out", required=True, help="directory for the fine-tuning runs")
  parser.add_argument("--steps", type=int, default=300)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  rows = [run(name, config, overrides, args.base, args.out, args.steps)
          for name, (config, overrides) in METHODS.items()]
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(rows, f, indent=2)
  print("| method | SST-2 dev accuracy | macro-F1 | trainable params | share | peak RSS (MB) | step (ms) |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    rss = "n/a" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
    print(f"| {r['method']} | {r['dev_accuracy']:.4f} | {r['dev_macro_f1']:.4f} | {r['trainable_params']:,} | "
          f"{100 * r['trainable_share']:.3f}% | {rss} | {r['step_ms']:.0f} |")


if __name__ == "__main__":
  main()
