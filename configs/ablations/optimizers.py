"""Optimizers and schedules on the Wikipedia sample (issue 26): AdamW, Muon, Lion and Adafactor under a cosine
schedule, and AdamW under WSD with a 20% cooldown (linear and 1 - sqrt), at equal tokens.

The model is configs/wiki_small.py narrowed to width 128 (4 layers, 4 heads, SwiGLU 384, RoPE, 1.4M parameters
with the 4,096-token embedding) for 300 steps of 8 x 128 tokens (0.3M tokens, about 2 min a run at two runs at a
time on 2 cores): the size this machine trains ~50 times in an hour, not the issue's 10-minute model. Every schedule warms up
over 30 steps and decays to 0; weight decay 0.1 (decoupled, times the rate) everywhere. Two stages:

  python -m data.prepare --config=configs/wiki_small.py --out=data_prepared/wiki_small
  python -m ablate --config=configs/ablations/optimizers.py --workdir=runs/ablate_opt_sweep
  python -m ablate --config=configs/ablations/optimizers.py:adamw=R,muon=R,lion=R,adafactor=R --workdir=runs/ablate_opt

1. the peak rate per optimizer, 2^-10 .. 2^-7, seed 0, on the validation split (sweep.png, results.md's best rate),
   and beyond the edge where the best sat on it (`optimizers.py:edges`, --workdir=runs/ablate_opt_sweep_edges);
2. each optimizer at its best rate on fresh seeds 1, 2, 3 (the sweep's seed is not reused, so the selection does
   not bias the comparison); the eval loss every 30 steps gives the steps each run needs to reach AdamW's final loss
   (results.md's speedup table, ablate/speedup.py).
"""

import ml_collections

from configs.ablations import parse_numbers

OPTIMIZERS = ("adamw", "muon", "lion", "adafactor")
# Beyond the sweep's edges, where its best rate sat on them (muon at 2^-7, lion at 2^-10).
EDGES = (("muon", 2.0 ** -6), ("muon", 2.0 ** -5), ("lion", 2.0 ** -11), ("lion", 2.0 ** -12))
# The experiment every optimizer and schedule run shares (also configs/ablations/wsd_branches.py).
OVERRIDES = ("data.prepared=data_prepared/wiki_small", "model.d_model=128", "model.mlp_dim=384", "train.batch_size=8",
             "train.steps=300", "train.warmup_steps=30", "train.min_learning_rate=0.0", "train.eval_every=30",
             "train.eval_batches=10", "train.checkpoint_every=300", "train.num_samples=0")


def parse_rates(text: str) -> dict:
  """{optimizer: rate} of "adamw=0.004,muon=0.004,..."; a ValueError naming what is wrong."""
  rates = parse_numbers(text, OPTIMIZERS)
  if rates and set(rates) != set(OPTIMIZERS):
    raise ValueError(f"--config argument {text!r}: give a rate for each of {', '.join(OPTIMIZERS)}")
  return rates


def get_config(rates: str = ""):
  c = ml_collections.ConfigDict()
  c.entrypoint = "pretrain"
  c.config = "configs/wiki_small.py"
  c.overrides = OVERRIDES
  chosen = {} if rates == "edges" else parse_rates(rates)
  if rates == "edges":  # the sweep's best rate sat at its edge: two more rates beyond it
    c.variants = tuple((f"lr={rate},opt={name}", (f"train.optimizer={name}", f"train.learning_rate={rate}"))
                       for name, rate in EDGES)
    c.sweep = ()
    c.seeds = (0,)
  elif not chosen:
    c.grid = {"opt": ("train.optimizer", OPTIMIZERS),
              "lr": ("train.learning_rate", tuple(2.0 ** k for k in range(-10, -6)))}
    c.sweep = ("lr", "opt")
    c.seeds = (0,)
  else:
    rate = lambda name: f"train.learning_rate={chosen[name]}"
    c.variants = (("adamw", ("train.optimizer=adamw", rate("adamw"))),
                  ("adamw_wsd_linear", ("train.optimizer=adamw", rate("adamw"), "train.schedule=wsd",
                                        "train.decay_shape=linear")),
                  ("adamw_wsd_sqrt", ("train.optimizer=adamw", rate("adamw"), "train.schedule=wsd",
                                      "train.decay_shape=sqrt")),
                  *((name, (f"train.optimizer={name}", rate(name))) for name in OPTIMIZERS[1:]))
    c.seeds = (1, 2, 3)
    c.speedup = True
  c.metrics = ("eval/loss", "min:eval/loss", "median:train/tokens_per_sec")
  c.parallel = 2
  return c
