"""Mixture of experts against a dense decoder at equal cost (issue 27), on the Wikipedia sample.

The dense model is the optimizer ablation's (configs/wiki_small.py narrowed to width 128: 4 layers, 4 heads, SwiGLU
MLP of 384, RoPE, 300 steps of 8 x 128 tokens, prepared corpus). Every MoE variant puts a mixture in all 4 layers
(dropless, softmax_topk, Switch load-balancing loss 0.01) and is held equal to it in one of two ways:
  equal active FLOPs a token  the experts a token uses add up to the dense MLP's 384: 8 experts of 192 with 2 a
                              token, 8 of 384 with 1, 16 of 128 with 2 plus one shared (3 x 128); so 4x, 8x and
                              5.7x the dense MLP's parameters
  equal total parameters      all the experts add up to the dense MLP's parameters: 8 of 48 (top-2 and top-1), 16
                              of 23 plus one shared (17 x 23 = 391 against 384); so a quarter, an eighth and 3/17 of
                              its FLOPs in the MLP
The router's [128, E] kernel adds 0.7-1.3% to a layer's MLP FLOPs (counted in train/flops). 3 seeds a variant; the
runs log the expert load of every layer (train/moe/layer_i/load_min, load_max, load_entropy; the figure:
`python -m ablate expert_load RUN_DIR --out=OUT.png`).

  python -m data.prepare --config=configs/wiki_small.py --out=data_prepared/wiki_small   # once
  python -m ablate --config=configs/ablations/moe.py --workdir=runs/ablate_moe
  python -m ablate report runs/ablate_moe --x_axis=train/flops --out=runs/ablate_moe/per_flop
  python -m ablate report runs/ablate_moe --x_axis=time --out=runs/ablate_moe/per_second

The first report compares the runs at equal steps (equal tokens), the second at the FLOPs the cheapest variant
reached, the third at the wall-clock seconds the fastest finished in (this machine's CPU: the dropless MoE runs its
tiled grouped matmuls, model/moe.py).
"""

import ml_collections

# The experiment every variant shares (the dense model of configs/ablations/optimizers.py at AdamW's default rate).
OVERRIDES = ("data.prepared=data_prepared/wiki_small", "model.d_model=128", "model.mlp_dim=384", "train.batch_size=8",
             "train.steps=300", "train.warmup_steps=30", "train.min_learning_rate=0.0", "train.eval_every=30",
             "train.eval_batches=10", "train.checkpoint_every=300", "train.num_samples=0")


def moe(experts: int, top: int, width: int, shared: int = 0) -> tuple:
  return ("model.mlp=moe", f"model.num_experts={experts}", f"model.experts_per_token={top}",
          f"model.mlp_dim={width}", f"model.shared_experts={shared}")


def get_config():
  c = ml_collections.ConfigDict()
  c.entrypoint = "pretrain"
  c.config = "configs/wiki_small.py"
  c.overrides = OVERRIDES
  c.variants = (("dense", ("model.mlp=dense",)),
                ("flops_8e_top2", moe(8, 2, 192)),
                ("flops_8e_top1", moe(8, 1, 384)),
                ("flops_16e_top2_shared1", moe(16, 2, 128, shared=1)),
                ("params_8e_top2", moe(8, 2, 48)),
                ("params_8e_top1", moe(8, 1, 48)),
                ("params_16e_top2_shared1", moe(16, 2, 23, shared=1)))
  c.baseline = "dense"
  c.seeds = (0, 1, 2)
  c.metrics = ("eval/loss", "min:eval/loss", "median:train/tokens_per_sec")
  c.primary = ("eval/loss",)
  c.parallel = 2
  return c
