"""Does a learning rate tuned on a narrow model transfer to wider ones? The standard parametrization against µP
(model/parametrization.py; Yang et al., Tensor Programs V, 2021), widths 64 to 512.

Char-level tinyshakespeare (configs/shakespeare_char.py), 2 layers of 4 heads (the head width grows with the model),
d_model 64, 128, 256, 512 (0.11M, 0.41M, 1.6M, 6.4M parameters), 500 steps of 12 x 64 characters in bfloat16,
the peak learning rate swept in factors of 2 from 2^-12 to 2^-5, 3 seeds; µP's base width is 64. sweep.png draws
the final validation loss against the learning rate, a curve per width, SP beside µP; results.md gives each width's
best rate.

The µP arm takes its base model's multipliers (tuned at width 64 by configs/ablations/mup_base_tune.py) as the
config's argument; SP keeps the defaults and is tuned per width by the rate alone. Without an argument µP has the
defaults too, and at width 64 the two arms are the same model (docs/ablations.md, section 5):

  python -m ablate --config=configs/ablations/mup_transfer.py --workdir=runs/ablate_mup
  python -m ablate --config=configs/ablations/mup_transfer.py:output=8,init=2.83,attn=2.83,embed_lr=1,vector_lr=1 \\
      --workdir=runs/ablate_mup_tuned
"""

import ml_collections

from configs.ablations.mup_base_tune import MULTIPLIERS, OVERRIDES, parse_multipliers


def get_config(multipliers: str = ""):
  c = ml_collections.ConfigDict()
  c.entrypoint = "pretrain"
  c.config = "configs/shakespeare_char.py"
  c.overrides = OVERRIDES
  tuned = parse_multipliers(multipliers)
  if tuned:  # the multipliers ride with the parametrization: only the µP arm takes them
    keys = ("model.parametrization",) + tuple(MULTIPLIERS[name] for name in tuned)
    param = (keys, (("sp",) + (1.0,) * len(tuned), ("mup",) + tuple(tuned.values())))
  else:
    param = ("model.parametrization", ("sp", "mup"))
  c.grid = {"param": param,
            "width": ("model.d_model", (64, 128, 256, 512)),
            "lr": ("train.learning_rate", tuple(2.0 ** k for k in range(-12, -4)))}
  c.sweep = ("lr", "width")
  c.seeds = (0, 1, 2)
  c.metrics = ("eval/loss", "median:train/tokens_per_sec")
  c.parallel = 2
  return c
