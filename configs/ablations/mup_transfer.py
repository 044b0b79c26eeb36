"""Does a learning rate tuned on a narrow model transfer to wider ones? The standard parametrization against µP
(model/parametrization.py; Yang et al., Tensor Programs V, 2021), widths 64 to 512.

Char-level tinyshakespeare (configs/shakespeare_char.py), 2 layers of 4 heads (the head width grows with the model),
d_model 64, 128, 256, 512 (0.11M, 0.41M, 1.6M, 6.4M parameters), 500 steps of 12 x 64 characters in bfloat16;
µP's base width is 64. Three modes, by the config's argument:

  python -m ablate --config=configs/ablations/mup_transfer.py --workdir=runs/ablate_mup
      the grid: SP and µP at every width, the peak rate in factors of 2 from 2^-12 to 2^-5, 3 seeds (192 runs);
      sweep.png draws the final validation loss against the rate, a curve per width, SP beside µP. With the base
      model's multipliers as the argument (output=8,init=2.83,... as configs/ablations/mup_base_tune.py chose them)
      only the µP arm takes them; SP keeps the defaults and is tuned per width by the rate alone.
  python -m ablate --config=configs/ablations/mup_transfer.py:MULTIPLIERS,lr=R,sweep=1 --workdir=runs/ablate_mup_512
      the widest width's selection, seed 0: SP at 2^-13 .. 2^-10 (its best at 512 was 2^-11, section 5) and µP at
      R / 2, R, 2 R, where R is the rate tuned at the base with the multipliers (7 runs).
  python -m ablate --config=configs/ablations/mup_transfer.py:MULTIPLIERS,lr=R,sp_lr=S --workdir=runs/ablate_mup_final
      the comparison on fresh seeds 1, 2, 3: SP at width 512 at its own best rate S against µP at 64, 128, 256
      and 512, all at the transferred R (15 runs; the baseline is SP at 512).
"""

import ml_collections

from configs.ablations import parse_numbers
from configs.ablations.mup_base_tune import MULTIPLIERS, OVERRIDES

WIDTHS = (64, 128, 256, 512)


def _mup(tuned: dict, width: int, rate: float) -> tuple:
  return ("model.parametrization=mup", f"model.d_model={width}", f"train.learning_rate={rate}") + tuple(
      f"{MULTIPLIERS[name]}={value}" for name, value in tuned.items())


def _sp(width: int, rate: float) -> tuple:
  return ("model.parametrization=sp", f"model.d_model={width}", f"train.learning_rate={rate}")


def get_config(argument: str = ""):
  c = ml_collections.ConfigDict()
  c.entrypoint = "pretrain"
  c.config = "configs/shakespeare_char.py"
  c.overrides = OVERRIDES
  found = parse_numbers(argument, tuple(MULTIPLIERS) + ("lr", "sp_lr", "sweep"))
  for name, value in found.items():
    if not value > 0:
      raise ValueError(f"--config argument {name}={value:g}: expected a positive number")
  tuned = {name: value for name, value in found.items() if name in MULTIPLIERS}
  rates = {name: value for name, value in found.items() if name not in MULTIPLIERS}
  if ("sweep" in rates or "sp_lr" in rates) and "lr" not in rates:
    raise ValueError(f"--config argument {argument!r}: sweep=1 and sp_lr=S need lr=R, the rate tuned at the base")
  if "sweep" in rates:
    rate = rates["lr"]
    c.variants = tuple((f"sp,lr=2^{k}", _sp(WIDTHS[-1], 2.0 ** k)) for k in range(-13, -9)) + tuple(
        (f"mup,lr={name}", _mup(tuned, WIDTHS[-1], rate * factor)) for name, factor in
        (("R*0.5", 0.5), ("R", 1.0), ("R*2", 2.0)))
    c.seeds = (0,)
  elif "sp_lr" in rates:
    c.variants = ((f"sp_{WIDTHS[-1]}", _sp(WIDTHS[-1], rates["sp_lr"])),) + tuple(
        (f"mup_{width}", _mup(tuned, width, rates["lr"])) for width in WIDTHS)
    c.baseline = f"sp_{WIDTHS[-1]}"
    c.primary = ("eval/loss",)
    c.seeds = (1, 2, 3)
  else:
    if tuned:  # the multipliers ride with the parametrization: only the µP arm takes them
      keys = ("model.parametrization",) + tuple(MULTIPLIERS[name] for name in tuned)
      param = (keys, (("sp",) + (1.0,) * len(tuned), ("mup",) + tuple(tuned.values())))
    else:
      param = ("model.parametrization", ("sp", "mup"))
    c.grid = {"param": param,
              "width": ("model.d_model", WIDTHS),
              "lr": ("train.learning_rate", tuple(2.0 ** k for k in range(-12, -4)))}
    c.sweep = ("lr", "width")
    c.seeds = (0, 1, 2)
  c.metrics = ("eval/loss", "median:train/tokens_per_sec")
  c.parallel = 2
  return c
