"""The learning-rate sweep of the fair LoRA test (configs/ablations/lora_fair.py says how the two fit together):
every method at three learning rates, seed 0, scored on the 2,000 sentences held out of SST-2's train split.

  python -m ablate --config=configs/ablations/lora_fair_sweep.py --workdir=runs/ablate_lora_sweep
"""

from configs.ablations import lora_fair


def get_config():
  return lora_fair.base_config(
      variants=tuple(lora_fair.variant(name, lr) for name, (_, rates) in lora_fair.METHODS.items() for lr in rates),
      seeds=(0,), metrics=("eval/accuracy", "max:eval/accuracy", "accuracy@data", "median:train/tokens_per_sec"))
