"""Parameter-efficient fine-tuning (Hu et al., LoRA, 2021): LoRA ranks against full fine-tuning and BitFit.

SST-2 on the small Wikipedia decoder of docs/finetuning.md (make it first:
`python -m train.pretrain --config=configs/wiki_small.py --workdir=runs/wiki_small`, ~10 min on 2 cores).
LoRA adapts every dense kernel (query, key, value, out, MLP) with alpha = 2 * rank (a constant update
scale); each method keeps its own learning rate; 200 steps of 32 sentences, dev accuracy every 50.

  python -m ablate --config=configs/ablations/lora_ranks.py --workdir=runs/ablate_lora
"""

import ml_collections

LORA = ("peft.method=lora", "peft.lora_targets=('attention/(query|key|value|out)$', 'mlp/w')",
        "train.learning_rate=0.002")


def get_config():
  c = ml_collections.ConfigDict()
  c.entrypoint = "finetune"
  c.config = "configs/finetune/sst2.py"
  c.overrides = ("init_from=runs/wiki_small", "train.steps=200", "train.eval_every=50",
                 "train.checkpoint_every=200", "train.log_every=20")
  c.variants = (("full", ("peft.method=full", "train.learning_rate=0.0002")),
                ("bitfit", ("peft.method=freeze", "peft.trainable=('_bias$',)", "train.learning_rate=0.001")),
                *[(f"lora_r{r}", (*LORA, f"peft.lora_rank={r}", f"peft.lora_alpha={2 * r}"))
                  for r in (1, 2, 4, 8, 16, 64)])
  c.seeds = (0, 1, 2)
  c.metrics = ("eval/accuracy", "eval/macro_f1", "eval/loss", "median:train/tokens_per_sec")
  c.curve = "eval/accuracy"
  c.parallel = 2
  return c
