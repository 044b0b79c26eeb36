"""One stable run serving several budgets (Hägele et al. 2024, their figure of cooldowns branched from one run):
AdamW at a constant rate, cooled down (WSD, 1 - sqrt over the last 20%) from three of its checkpoints, against cosine
runs of those lengths, on the experiment of configs/ablations/optimizers.py (its best AdamW rate R).

  python -m ablate --config=configs/ablations/wsd_branches.py:R --workdir=runs/ablate_wsd_stable
  python -m ablate --config=configs/ablations/wsd_branches.py:R,branches --workdir=runs/ablate_wsd_branches

The first runs the stable phase (constant after warmup, to step 240, a checkpoint every 60) and cosine runs of 150
and 225 steps; the second branches from the stable run of the same seed at steps 120, 180, 240 into cooldowns that
end at 150, 225, 300 (optimizers.py's adamw_wsd_sqrt is the 300-step run trained without a branch, and its cosine
run the 300-step cosine). Seeds 1, 2, 3 as optimizers.py's second stage.
"""

import ml_collections

from configs.ablations import optimizers

BUDGETS = (150, 225, 300)
STABLE = "runs/ablate_wsd_stable/runs/constant_seed{seed}"


def get_config(argument: str = "0.004"):
  rate, _, stage = argument.partition(",")
  if stage not in ("", "branches"):
    raise ValueError(f"--config argument {argument!r}: expected RATE or RATE,branches")
  c = ml_collections.ConfigDict()
  c.entrypoint = "pretrain"
  c.config = "configs/wiki_small.py"
  c.overrides = optimizers.OVERRIDES + ("train.optimizer=adamw", f"train.learning_rate={float(rate)}",
                                        "train.keep_checkpoints=5")
  if not stage:
    c.variants = (("constant", ("train.schedule=constant", "train.steps=240", "train.checkpoint_every=60")),
                  *((f"cosine_{steps}", (f"train.steps={steps}", f"train.checkpoint_every={steps}"))
                    for steps in BUDGETS[:-1]))
  else:
    c.variants = tuple((f"branch_{steps}", (
        "train.schedule=wsd", "train.decay_shape=sqrt", f"train.steps={steps}", f"train.decay_steps={steps}",
        f"train.checkpoint_every={steps}", f"train.branch_from={STABLE}", f"train.branch_step={steps - steps // 5}"))
        for steps in BUDGETS)
  c.seeds = (1, 2, 3)
  c.metrics = ("eval/loss",)
  c.parallel = 2
  return c
