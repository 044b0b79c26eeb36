"""Does a learning rate tuned on a narrow model transfer to wider ones? The standard parametrization against µP
(model/parametrization.py; Yang et al., Tensor Programs V, 2021), widths 64 to 512.

Char-level tinyshakespeare (configs/shakespeare_char.py), 2 layers of 4 heads (the head width grows with the model),
d_model 64, 128, 256, 512 (0.11M, 0.41M, 1.6M, 6.4M parameters), 500 steps of 12 x 64 characters in bfloat16,
the peak learning rate swept in factors of 2 from 2^-11 to 2^-4; µP's base width is 64, where the two parametrizations are the same model. sweep.png draws the final validation
loss against the learning rate, a curve per width, SP beside µP; results.md gives each width's best rate.

  python -m ablate --config=configs/ablations/mup_transfer.py --workdir=runs/ablate_mup
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.entrypoint = "pretrain"
  c.config = "configs/shakespeare_char.py"
  c.overrides = ("train.steps=500", "train.warmup_steps=50", "train.min_learning_rate=0.0", "train.eval_every=500",
                 "train.checkpoint_every=500", "train.eval_batches=20", "train.num_samples=0", "model.num_layers=2",
                 "model.num_heads=4", "model.dtype=bfloat16", "model.base_width=64")
  c.grid = {"param": ("model.parametrization", ("sp", "mup")),
            "width": ("model.d_model", (64, 128, 256, 512)),
            "lr": ("train.learning_rate", tuple(2.0 ** k for k in range(-11, -3)))}
  c.sweep = ("lr", "width")
  c.seeds = (0,)
  c.metrics = ("eval/loss", "median:train/tokens_per_sec")
  c.parallel = 2
  return c
