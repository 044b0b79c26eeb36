"""Fine-tunes a pretrained encoder-decoder on SciTLDR (abstract -> TL;DR) and reports ROUGE on dev.

  python bench/scitldr.py --base=runs/t5_tiny --out=runs/scitldr [--steps=400 --beam=4 --max_dev=0]

SciTLDR's `source` is a list of sentences and `target` a list of TL;DRs: the script writes JSONL with
{"prompt": joined source, "response": first target} for training and scores generations against every
dev target with train/scores.py (ROUGE: rouge-score, the targets' best ROUGE-1 counts, as SciTLDR's own
evaluation; EM / F1: SQuAD's, the best target counts).
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.decode import beam_search  # noqa: E402
from train.runs import load_run  # noqa: E402
from train.scores import generation_scores  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "scitldr_a")


def convert(split: str, out: str) -> list[dict]:
  records = []
  with open(os.path.join(DATA, f"{split}.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      records.append({"prompt": " ".join(r["source"]), "response": r["target"][0], "references": r["target"]})
  with open(os.path.join(out, f"{split}.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return records


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--base", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--beam", type=int, default=4)
  parser.add_argument("--max_dev", type=int, default=0)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  convert("train", args.out)
  dev = convert("dev", args.out)[:args.max_dev or None]
  workdir = os.path.join(args.out, "run")
  start = time.time()
  subprocess.run([sys.executable, "-m", "train.finetune", "--config=configs/finetune/common.py", f"--workdir={workdir}",
                  f"--config.init_from={args.base}", "--config.task=instruct", "--config.peft.method=full",
                  f"--config.data.train_path={args.out}/train.jsonl", f"--config.data.val_path={args.out}/dev.jsonl",
                  "--config.data.prompt_template={prompt}", "--config.data.target_len=48",
                  "--config.train.seq_len=256", "--config.train.batch_size=16", f"--config.train.steps={args.steps}",
                  "--config.train.learning_rate=1e-3", f"--config.train.eval_every={args.steps}",
                  "--config.train.eval_batches=10", f"--config.train.checkpoint_every={args.steps}"],
                 check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  train_s = time.time() - start
  loaded = load_run(workdir)
  model, params, tokenizer = loaded.run.model, loaded.params, loaded.run.tokenizer
  start = time.time()
  predictions = []
  for i in range(0, len(dev), 16):
    prompts = [[tokenizer.bos_id] + tokenizer.encode(r["prompt"])[:255] for r in dev[i:i + 16]]
    ids = beam_search(model, params, prompts, beam_size=args.beam, max_new_tokens=48, eos_id=tokenizer.eos_id)
    predictions += [tokenizer.decode(row) for row in ids]
  result = dict(generation_scores(predictions, [r["references"] for r in dev])[0], dev_examples=len(dev),
                finetune_seconds=round(train_s), generate_seconds=round(time.time() - start), beam=args.beam)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(dict(result, examples=[{"prediction": p, "reference": r["references"][0]}
                                     for p, r in zip(predictions[:5], dev)]), f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
