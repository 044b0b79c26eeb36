"""SwiGLU against GELU as the model grows (Shazeer, 2020): a size ladder with fitted laws, at equal steps and at
equal FLOPs.

Char-level tinyshakespeare (configs/shakespeare_char.py) at five sizes tied to one dial, layers and width
together: (1, 32), (1, 64), (2, 96), (3, 128), (4, 160) (five sizes: enough to fit the floor c, ablate/scaling.py); 600 steps of 12 x 64 characters; MLP width 4 d_model for both,
so SwiGLU's third matrix costs it 1.5x the MLP's FLOPs. The report fits L(C) = a C^-b + c per activation over
its sizes and seeds and projects it to 10x the compute; rebuild it at equal FLOPs with

  python -m ablate --config=configs/ablations/ladder_swiglu.py --workdir=runs/ablate_ladder
  python -m ablate report runs/ablate_ladder --x_axis=train/flops --out=runs/ablate_ladder/equal_flops
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.entrypoint = "pretrain"
  c.config = "configs/shakespeare_char.py"
  c.overrides = ("train.steps=600", "train.eval_every=50", "train.checkpoint_every=600", "train.eval_batches=20",
                 "train.num_samples=0", "model.num_heads=4")
  c.grid = {"size": (("model.num_layers", "model.d_model"), ((1, 32), (1, 64), (2, 96), (3, 128), (4, 160))),
            "act": ("model.activation", ("gelu", "swiglu"))}
  c.ladder = "size"
  c.seeds = (0, 1, 2)
  c.metrics = ("eval/loss", "final:train/flops", "median:train/tokens_per_sec")
  c.parallel = 2
  return c
