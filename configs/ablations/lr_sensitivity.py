"""Learning-rate sensitivity with and without QK-norm and z-loss (Wortsman et al. 2023, "Small-scale proxies for
large-scale Transformer training instabilities"): the final loss against the peak rate over three decades, at two
widths, on the experiment of configs/ablations/optimizers.py cut to 2 layers and 200 steps (AdamW, cosine).

  python -m ablate --config=configs/ablations/lr_sensitivity.py --workdir=runs/ablate_lr_sensitivity

sweep.png draws eval loss against the rate, a line per stability setting, a panel per width. Wortsman et al.'s
LR sensitivity, the mean over the rates of min(L(rate), L(0)) - min over rates of L, is computed from results.csv
(L(0) = ln 4096 = 8.318, the loss of a uniform prediction: what a diverged run, stopped by train.nonfinite, counts
as).
"""

import ml_collections

from configs.ablations import optimizers

RATES = tuple(round(10.0 ** (k / 2), 6) for k in range(-7, 0))  # 3.2e-4 .. 3.2e-1


def get_config():
  c = ml_collections.ConfigDict()
  c.entrypoint = "pretrain"
  c.config = "configs/wiki_small.py"
  c.overrides = optimizers.OVERRIDES + ("model.num_layers=2", "train.steps=200", "train.warmup_steps=20",
                                        "train.eval_every=200", "train.checkpoint_every=200")
  c.grid = {"width": (("model.d_model", "model.mlp_dim"), ((64, 192), (128, 384))),
            "stab": (("model.qk_norm", "train.z_loss"), ((False, 0.0), (True, 0.0), (True, 1e-4))),
            "lr": ("train.learning_rate", RATES)}
  c.sweep = ("lr", "stab")
  c.seeds = (0,)
  c.metrics = ("eval/loss",)
  c.parallel = 2
  return c
