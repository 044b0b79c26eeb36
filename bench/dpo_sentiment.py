"""The controlled-sentiment experiment of the DPO paper (Rafailov et al. 2023, Fig. 2 left: reward against
KL(pi || pi_ref)) at ablax's scale, on SST-2 sentences instead of IMDb reviews.

  python bench/dpo_sentiment.py --out=runs/dpo_sentiment            # the real size: hours on 2 CPU cores
  python bench/dpo_sentiment.py --out=/tmp/dpo_smoke --size=smoke    # every stage at a tiny size: minutes

Stages, in order; each is skipped when its output exists, so the same command resumes (--stage=NAME runs one):
  sft     python -m train.pretrain on the SST-2 training sentences (configs/wiki_small.py's model): the SFT policy,
          which is also pi_ref
  reward  python -m train.finetune --config=configs/finetune/sst2_full.py from the SFT run: the reward model,
          P(positive | text); its dev accuracy (872 GLUE dev sentences) goes into the report
  pairs   prompts = the first 2-8 tokens of SST-2 sentences (training sentences for the training pairs; test
          sentences, which nothing trained on, for the held-out prompts); K samples per prompt from the SFT policy
          (temperature 1), scored by the reward model; every two samples of a prompt with different rewards are a
          pair, the higher one chosen
  runs    python -m ablate --config=configs/ablations/dpo_sentiment.py:OUT: DPO at several beta, IPO and SimPO, 3 seeds;
          every evaluation samples the held-out prompts for eval/reward and eval/kl
  bon     best-of-N from the SFT policy on the same held-out prompts (N = 1, 2, 4, ...), one draw per seed; its KL is
          log N - (N - 1) / N (Stiennon et al. 2020; an upper bound, Beirami et al. 2024)
  report  OUT/frontier.png (mean reward against KL: every run at every evaluation, and best-of-N) and OUT/report.md
          (each method's final reward, KL, reward minus best-of-N's at that KL, and reward accuracy: mean and 95% t
          interval over seeds, ablate.stats)
"""

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ablate.stats import t_interval  # noqa: E402  (after the path: run as a script from anywhere)
from configs.ablations import dpo_sentiment as ablation_config  # noqa: E402
from train.preference_eval import RewardModel, sample  # noqa: E402
from train.runs import load_run  # noqa: E402

SST2 = "../shared/data/sst2"
SIZES = {
    # SFT: model overrides and steps; reward model steps; pairs: training prompts, held-out prompts (= the
    # ablation's eval_prompts), samples per prompt, new tokens; best-of-N: the largest N
    "full": dict(sft_model=("data.max_bytes=0",), sft_steps=1000, reward_steps=600, reward_records=0, train_prompts=2000,
                 val_prompts=ablation_config.SIZES["full"]["eval_prompts"], samples=4, tokens=24, bon=64),
    "smoke": dict(sft_model=("model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.mlp_dim=64",
                             "data.vocab_size=512", "data.max_bytes=200000"),
                  sft_steps=20, reward_steps=10, reward_records=400, train_prompts=24,
                  val_prompts=ablation_config.SIZES["smoke"]["eval_prompts"], samples=3, tokens=24, bon=4),
}
SEEDS = {"full": (0, 1, 2), "smoke": (0, 1)}


def run(command: list[str], log: str) -> float:
  """Runs a command from the repository root with its output to `log`; its wall seconds. Exits on failure."""
  start = time.time()
  print(f"$ {' '.join(command)}  > {log}", flush=True)
  with open(log, "a") as f:
    code = subprocess.call(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
  if code:
    raise SystemExit(f"failed ({code}); see {log}")
  return time.time() - start


def _metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def stage_sft(out: str, size: dict) -> None:
  command = [sys.executable, "-m", "train.pretrain", "--config=configs/wiki_small.py", f"--workdir={out}/sft",
             f"--config.data.train_path={SST2}/train.jsonl", f"--config.data.val_path={SST2}/dev.jsonl",
             "--config.train.seq_len=64", "--config.train.batch_size=32",
             f"--config.train.steps={size['sft_steps']}", f"--config.train.eval_every={max(size['sft_steps'] // 4, 1)}",
             f"--config.train.checkpoint_every={size['sft_steps']}", "--config.train.sample_prompt=this movie",
             *[f"--config.{o}" for o in size["sft_model"]]]
  run(command, f"{out}/logs/sft.log")


def stage_reward(out: str, size: dict) -> None:
  command = [sys.executable, "-m", "train.finetune", "--config=configs/finetune/sst2_full.py",
             f"--workdir={out}/reward", f"--config.init_from={out}/sft", f"--config.train.steps={size['reward_steps']}",
             f"--config.train.eval_every={size['reward_steps']}", f"--config.train.checkpoint_every={size['reward_steps']}",
             f"--config.data.max_records={size['reward_records']}", "--config.train.learning_rate=2e-4"]
  run(command, f"{out}/logs/reward.log")


def _prompts(tokenizer, path: str, count: int, seed: int) -> list[str]:
  """`count` prompts: the first 2-8 tokens (uniform) of sentences of `path` in a seeded order, each with at least
  one token after it."""
  with open(path) as f:
    texts = [json.loads(line)["text"] for line in f if line.strip()]
  rng = np.random.default_rng(seed)
  prompts = []
  for index in rng.permutation(len(texts)):
    ids, cut = tokenizer.encode(texts[index]), int(rng.integers(2, 9))
    if len(ids) > cut:
      prompts.append(tokenizer.decode(ids[:cut]))
    if len(prompts) == count:
      break
  return prompts


def _samples(loaded, prompts: list[str], size: dict, seed: int, reward_model) -> tuple[list[str], np.ndarray]:
  """(continuation text, reward) of one sample per prompt from the loaded run (temperature 1)."""
  tokenizer = loaded.run.tokenizer
  drawn = sample(loaded.run.model, loaded.params, tokenizer, prompts, max_new_tokens=size["tokens"], seq_len=64,
                 seed=seed)
  special = (tokenizer.bos_id, tokenizer.eos_id)
  full = [tokenizer.decode([t for t in s + ids if t not in special]) for s, ids in drawn]
  heads = [tokenizer.decode([t for t in s if t not in special]) for s, _ in drawn]
  continuations = [f[len(h):] if f.startswith(h) else tokenizer.decode([t for t in ids if t not in special])
                   for f, h, (_, ids) in zip(full, heads, drawn)]
  return continuations, reward_model(full)


def stage_pairs(out: str, size: dict) -> None:
  sft, reward_model = load_run(f"{out}/sft"), RewardModel(f"{out}/reward", "1")
  os.makedirs(f"{out}/pairs", exist_ok=True)
  summary = {}
  for split, source, count in (("train", "train", size["train_prompts"]), ("val", "test", size["val_prompts"])):
    prompts = _prompts(sft.run.tokenizer, f"{SST2}/{source}.jsonl", count, seed=0 if split == "train" else 1)
    drawn = [_samples(sft, prompts, size, 1000 * k + (split == "val"), reward_model) for k in range(size["samples"])]
    records = []
    for n, prompt in enumerate(prompts):
      scored = sorted(((float(rewards[n]), texts[n]) for texts, rewards in drawn), reverse=True)
      records += [{"prompt": prompt, "chosen": a, "rejected": b, "chosen_reward": ra, "rejected_reward": rb}
                  for i, (ra, a) in enumerate(scored) for rb, b in scored[i + 1:] if ra > rb and a.strip() and b.strip()]
    with open(f"{out}/pairs/{split}.jsonl", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
    summary[split] = {"prompts": len(prompts), "pairs": len(records),
                      "mean_sft_reward": float(np.mean([r for _, rewards in drawn for r in rewards]))}
    print(f"pairs {split}: {summary[split]}", flush=True)
  with open(f"{out}/pairs/summary.json", "w") as f:
    json.dump(summary, f, indent=2)


def stage_runs(out: str, size_name: str) -> None:
  arg = out if size_name == "full" else f"{out},{size_name}"
  run([sys.executable, "-m", "ablate", f"--config=configs/ablations/dpo_sentiment.py:{arg}",
       f"--workdir={out}/ablation"], f"{out}/logs/ablation.log")


def _held_out_prompts(out: str) -> list[str]:
  """The held-out prompts in the order the runs sample them (the first distinct prompts of pairs/val.jsonl)."""
  with open(f"{out}/pairs/val.jsonl") as f:
    return list(dict.fromkeys(json.loads(line)["prompt"] for line in f if line.strip()))


def stage_bon(out: str, size: dict, seeds) -> None:
  sft, reward_model = load_run(f"{out}/sft"), RewardModel(f"{out}/reward", "1")
  prompts = _held_out_prompts(out)
  result = {}
  for seed in seeds:
    rewards = np.stack([_samples(sft, prompts, size, 10_000 * (seed + 1) + k, reward_model)[1]
                        for k in range(size["bon"])], axis=1)  # [prompts, N]
    sizes = [2 ** i for i in range(int(np.log2(size["bon"])) + 1)]
    result[str(seed)] = {str(n): float(np.mean(rewards[:, :n].max(axis=1))) for n in sizes}
    print(f"best-of-N seed {seed}: {result[str(seed)]}", flush=True)
  with open(f"{out}/bon.json", "w") as f:
    json.dump(result, f, indent=2)


def _interval(values) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "—"
  interval = t_interval(values)
  return f"{np.mean(values):.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "") + \
      f" (n={len(values)})"


def stage_report(out: str) -> None:
  points = collections.defaultdict(lambda: collections.defaultdict(list))  # variant -> step -> [(kl, reward)]
  final = collections.defaultdict(lambda: collections.defaultdict(list))  # variant -> metric -> values over seeds
  seeds = collections.defaultdict(list)  # variant -> the seed of each final value
  for name in sorted(os.listdir(f"{out}/ablation/runs")):
    variant = re.sub(r"_seed\d+$", "", name)
    records = [r for r in _metrics(f"{out}/ablation/runs/{name}") if "eval/kl" in r]
    for r in records:
      points[variant][r["step"]].append((r["eval/kl"], r["eval/reward"]))
    path = f"{out}/ablation/runs/{name}/eval_data.json"
    if records and os.path.exists(path):
      with open(path) as f:
        held_out = json.load(f)
      for key in ("reward", "kl", "reward_accuracy"):
        final[variant][key].append(held_out.get(key))
      seeds[variant].append(re.search(r"(\d+)$", name).group(1))
  with open(f"{out}/bon.json") as f:
    bon = json.load(f)
  sizes = sorted({int(n) for by_seed in bon.values() for n in by_seed})
  bon_kl = [np.log(n) - (n - 1) / n for n in sizes]
  bon_reward = [[bon[s][str(n)] for s in bon] for n in sizes]

  def gap_to_bon(variant):
    """Per seed: the run's reward minus best-of-N's (same seed: stage bon draws the runs' seeds) at the run's KL,
    interpolated linearly in KL; past the largest N its reward, so that the gap's magnitude there is a lower bound."""
    gaps = []
    for seed, reward, kl in zip(seeds[variant], final[variant]["reward"], final[variant]["kl"]):
      if reward is None or kl is None:
        continue
      gaps.append(reward - float(np.interp(kl, bon_kl, [bon[seed][str(n)] for n in sizes])))
    return gaps

  figure, axes = plt.subplots(figsize=(7, 5))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for color, (variant, by_step) in zip(colors * 3, sorted(points.items())):
    everything = [p for step in by_step.values() for p in step]
    axes.scatter(*zip(*everything), s=8, alpha=0.3, color=color)
    means = [np.mean(by_step[step], axis=0) for step in sorted(by_step)]
    axes.plot(*zip(*means), marker="o", ms=3, color=color, label=variant)
  axes.plot(bon_kl, [np.mean(r) for r in bon_reward], marker="s", color="black", label="best-of-N (SFT)")
  axes.set_xlabel("KL(pi || pi_ref), nats per sample (held-out prompts)")
  axes.set_ylabel("mean reward P(positive)")
  axes.set_title("Controlled sentiment on SST-2 prompts: reward against KL")
  axes.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(f"{out}/frontier.png", dpi=120)

  reward_info = _metrics(f"{out}/reward")
  accuracy = next(r["eval/accuracy"] for r in reversed(reward_info) if "eval/accuracy" in r)
  with open(f"{out}/pairs/summary.json") as f:
    pairs = json.load(f)
  lines = [f"# DPO controlled sentiment (SST-2 prompts) — {out}", "",
           f"Reward model: SST-2 dev accuracy {accuracy:.4f}. Pairs: {pairs['train']['pairs']} from "
           f"{pairs['train']['prompts']} training prompts, {pairs['val']['pairs']} held out from "
           f"{pairs['val']['prompts']} prompts; the SFT policy's mean reward {pairs['val']['mean_sft_reward']:.3f} "
           "on the held-out prompts.", "",
           "Final checkpoint on the held-out prompts: mean and 95% t interval over seeds.", "",
           "Reward minus best-of-N's at the same KL: per seed, best-of-N's curve interpolated linearly in KL "
           f"(past KL {bon_kl[-1]:.2f}, best-of-{sizes[-1]}'s reward: marked >=, the gap's size a lower bound).", "",
           "| method | reward | KL (nats) | reward - best-of-N at its KL | reward accuracy (held-out pairs) |",
           "|---|---|---|---|---|"]
  for variant, values in sorted(final.items()):
    beyond = ">= " if any(kl is not None and kl > bon_kl[-1] for kl in values["kl"]) else ""
    lines.append(f"| {variant} | {_interval(values['reward'])} | {_interval(values['kl'])} | "
                 f"{beyond}{_interval(gap_to_bon(variant))} | {_interval(values['reward_accuracy'])} |")
  for n, kl, rewards in zip(sizes, bon_kl, bon_reward):
    lines.append(f"| best-of-{n} (SFT) | {_interval(rewards)} | {kl:.3f} (analytic) | 0 | — |")
  lines += ["", "![frontier](frontier.png)", ""]
  with open(f"{out}/report.md", "w") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="directory of every run and the report")
  parser.add_argument("--size", choices=sorted(SIZES), default="full")
  parser.add_argument("--stage", choices=("all", "sft", "reward", "pairs", "runs", "bon", "report"), default="all")
  args = parser.parse_args()
  out, size, seeds = os.path.abspath(args.out), SIZES[args.size], SEEDS[args.size]
  os.makedirs(f"{out}/logs", exist_ok=True)
  done = {"sft": os.path.exists(f"{out}/sft/checkpoints/{size['sft_steps']}"),
          "reward": os.path.exists(f"{out}/reward/checkpoints/{size['reward_steps']}"),
          "pairs": os.path.exists(f"{out}/pairs/summary.json"), "runs": False,  # ablate skips finished runs itself
          "bon": os.path.exists(f"{out}/bon.json"), "report": False}
  stages = {"sft": lambda: stage_sft(out, size), "reward": lambda: stage_reward(out, size),
            "pairs": lambda: stage_pairs(out, size), "runs": lambda: stage_runs(out, args.size),
            "bon": lambda: stage_bon(out, size, seeds), "report": lambda: stage_report(out)}
  timings = {}
  for name, stage in stages.items():
    if args.stage not in ("all", name) or (args.stage == "all" and done[name]):
      continue
    start = time.time()
    stage()
    timings[name] = round(time.time() - start, 1)
    print(f"stage {name}: {timings[name]} s", flush=True)
  with open(f"{out}/timings.json", "a") as f:
    f.write(json.dumps(timings) + "\n")


if __name__ == "__main__":
  main()
