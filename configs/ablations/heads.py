"""Attention heads at a fixed width (Vaswani et al., 2017, Table 3 rows A).

Char-level tinyshakespeare, 4 layers, d_model 128 (nanoGPT's CPU model) with 1, 2, 4, 8 and 16 heads
(head width 128 / heads), same steps, data and seeds.

  python -m ablate --config=configs/ablations/heads.py --workdir=runs/ablate_heads
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.entrypoint = "pretrain"
  c.config = "configs/shakespeare_char.py"
  c.overrides = ("train.steps=600", "train.eval_every=200", "train.checkpoint_every=600", "train.eval_batches=20",
                 "train.num_samples=0")
  c.grid = {"heads": ("model.num_heads", (1, 2, 4, 8, 16))}
  c.seeds = tuple(range(6))  # power calculation in docs/ablations.md section 2
  c.baseline = "heads=8"  # the paper's base model
  c.metrics = ("eval/loss", "min:eval/loss", "median:train/tokens_per_sec")
  c.parallel = 2
  return c
