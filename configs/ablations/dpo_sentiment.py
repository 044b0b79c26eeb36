"""The preference runs of the controlled-sentiment reproduction (Rafailov et al. 2023, Fig. 2 left), at ablax's scale:
DPO at several beta, IPO and SimPO from one SFT policy on SST-2 sentences, 3 seeds, each evaluated on held-out
prompts for reward (the SST-2 classifier's P(positive)) and KL to the SFT policy at every evaluation.

bench/dpo_sentiment.py makes what this reads (the SFT run, the reward model, the pairs) in its OUT directory and
runs it; the argument is OUT, and OUT,smoke for its tiny smoke size:

  python -m ablate --config=configs/ablations/dpo_sentiment.py:runs/dpo_sentiment --workdir=runs/dpo_sentiment/ablation
"""

import ml_collections

# name: overrides. The DPO betas bracket the paper's 0.05-5 frontier sweep where a small model moves; IPO's tau and
# SimPO's (beta, gamma) are their papers' usual values.
VARIANTS = (
    ("dpo_beta0.05", ("preference.loss=dpo", "preference.beta=0.05")),
    ("dpo_beta0.1", ("preference.loss=dpo", "preference.beta=0.1")),
    ("dpo_beta0.5", ("preference.loss=dpo", "preference.beta=0.5")),
    ("dpo_beta2", ("preference.loss=dpo", "preference.beta=2.0")),
    ("ipo_beta0.5", ("preference.loss=ipo", "preference.beta=0.5")),
    ("simpo_beta2", ("preference.loss=simpo", "preference.beta=2.0", "preference.gamma=1.0")),
)
SIZES = {  # steps, eval_every, held-out prompts sampled at each evaluation, seeds, variants
    "full": dict(steps=300, eval_every=50, eval_prompts=256, seeds=(0, 1, 2), variants=[n for n, _ in VARIANTS]),
    "smoke": dict(steps=6, eval_every=3, eval_prompts=8, seeds=(0, 1),
                  variants=["dpo_beta0.1", "ipo_beta0.5", "simpo_beta2"]),
}


def get_config(arg: str = "runs/dpo_sentiment") -> ml_collections.ConfigDict:
  out, _, size = arg.partition(",")
  size = SIZES[size or "full"]
  c = ml_collections.ConfigDict()
  c.entrypoint = "finetune"
  c.config = "configs/finetune/preference.py"
  c.overrides = (f"init_from={out}/sft", f"data.train_path={out}/pairs/train.jsonl",
                 f"data.val_path={out}/pairs/val.jsonl", f"preference.reward_from={out}/reward",
                 f"preference.eval_prompts={size['eval_prompts']}", "preference.sample_tokens=24",
                 "train.seq_len=64", "train.batch_size=16", f"train.steps={size['steps']}",
                 f"train.eval_every={size['eval_every']}", f"train.checkpoint_every={size['steps']}",
                 "train.eval_batches=8", "train.warmup_steps=2" if size["steps"] < 50 else "train.warmup_steps=30")
  c.variants = tuple((name, overrides) for name, overrides in VARIANTS if name in size["variants"])
  c.seeds = size["seeds"]
  c.metrics = ("reward@data", "kl@data", "eval/reward_accuracy", "eval/reward_margin")
  c.directions = {"kl@data": "lower"}
  c.curve = "eval/reward"
  c.parallel = 1
  return c
