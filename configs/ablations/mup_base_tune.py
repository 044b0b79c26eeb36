"""Tuning µP's base model at its base width, with the learning rate, as Tensor Programs V does (Yang et al., 2021):
the multipliers of model/parametrization.py at width 64, the base of configs/ablations/mup_transfer.py (the same
char-level tinyshakespeare runs: 2 layers of 4 heads, 500 steps of 12 x 64 characters in bfloat16, one seed).

Two stages, each a grid with the peak rate at 2^-8 .. 2^-5 (section 5's best base rates were 2^-7 and 2^-6):
  1. the forward's multipliers: output (alpha_output on the logits) 1 / 8 / 32, hidden init std x 1 / 2.83,
     attention x 1 / 2.83 (8 and 2.83 = sqrt(8) are what width 512's SP model has against width 64's): 48 runs;
  2. given stage 1's best, the per-class rate multipliers: embeddings (and an untied readout) and vector-like
     parameters (norm scales, biases) x 0.25 / 1 / 4 each: 36 runs.

  python -m ablate --config=configs/ablations/mup_base_tune.py --workdir=runs/ablate_mup_base
  python -m ablate --config=configs/ablations/mup_base_tune.py:output=8,init=2.83,attn=2.83 \\
      --workdir=runs/ablate_mup_base_rates

The argument after ':' names the settings stage 1 chose (keys of MULTIPLIERS); sweep.png draws the validation loss
against the rate, a line per output (stage 1) or embedding-rate (stage 2) multiplier, a panel per the other axes;
results.md gives each line's best rate. Take the best cell to configs/ablations/mup_transfer.py's argument.
"""

import ml_collections

from configs.ablations import parse_numbers


# The experiment of section 5 (docs/ablations.md), shared with mup_transfer.py.
OVERRIDES = ("train.steps=500", "train.warmup_steps=50", "train.min_learning_rate=0.0", "train.eval_every=500",
             "train.checkpoint_every=500", "train.eval_batches=20", "train.num_samples=0", "model.num_layers=2",
             "model.num_heads=4", "model.dtype=bfloat16", "model.base_width=64")
# Short names of the base model's multipliers (config.model.mup_*), as the config argument gives them.
MULTIPLIERS = {"output": "model.mup_output_mult", "init": "model.mup_init_mult", "attn": "model.mup_attn_mult",
               "embed_lr": "model.mup_embed_lr_mult", "vector_lr": "model.mup_vector_lr_mult"}


def parse_multipliers(text: str) -> dict:
  """{short name: value} of "output=8,init=2.83,..."; a ValueError naming what is wrong."""
  found = parse_numbers(text, MULTIPLIERS)
  for name, value in found.items():
    if not value > 0:
      raise ValueError(f"--config argument {name}={value:g}: expected a positive multiplier")
  return found


def get_config(multipliers: str = ""):
  c = ml_collections.ConfigDict()
  c.entrypoint = "pretrain"
  c.config = "configs/shakespeare_char.py"
  chosen = parse_multipliers(multipliers)
  c.overrides = OVERRIDES + ("model.d_model=64", "model.parametrization=mup") + tuple(
      f"{MULTIPLIERS[name]}={value}" for name, value in chosen.items())
  lr = ("train.learning_rate", tuple(2.0 ** k for k in range(-8, -4)))
  if not chosen:
    c.grid = {"output": (MULTIPLIERS["output"], (1.0, 8.0, 32.0)), "init": (MULTIPLIERS["init"], (1.0, 2.83)),
              "attn": (MULTIPLIERS["attn"], (1.0, 2.83)), "lr": lr}
    c.sweep = ("lr", "output")
  else:
    c.grid = {"embed_lr": (MULTIPLIERS["embed_lr"], (0.25, 1.0, 4.0)),
              "vector_lr": (MULTIPLIERS["vector_lr"], (0.25, 1.0, 4.0)), "lr": lr}
    c.sweep = ("lr", "embed_lr")
  c.seeds = (0,)
  c.metrics = ("eval/loss", "median:train/tokens_per_sec")
  c.parallel = 2
  return c
