"""Attention heads at a fixed width, trained further: configs/ablations/heads.py with RoPE and 1200 steps, in bfloat16
compute (mixed precision: 1.7x faster here).

At 600 steps with learned positions (heads.py) every model is still in the regime where attention hardly
matters; RoPE trains faster (docs/ablations.md), and twice the steps reach the loss range where the heads
have to carry the context.

  python -m ablate --config=configs/ablations/heads_long.py --workdir=runs/ablate_heads_long
"""

from configs.ablations import heads


def get_config():
  c = heads.get_config()
  c.overrides = ("train.steps=1200", "train.eval_every=300", "train.checkpoint_every=1200",
                 "train.eval_batches=20", "train.num_samples=0", "model.position=rope", "model.dtype=bfloat16")
  c.seeds = (0, 1, 2)  # every difference is significant at 3 seeds (docs/ablations.md section 2b)
  return c
