"""Preference tuning (DPO by default; IPO, SimPO by --config.preference.loss) on JSONL records with a prompt, a chosen
and a rejected response. Give the data and the base run:

  python -m train.finetune --config=configs/finetune/preference.py --workdir=runs/dpo \
      --config.init_from=runs/sft --config.data.train_path=pairs.jsonl --config.data.val_path=pairs_val.jsonl
"""

from configs.finetune import common


def get_config():
  config = common.get_config()
  config.task = "preference"
  config.data.val_fraction = 0.05
  config.peft.method = "lora"       # the reference is the base with the adapters off: no second copy of the weights
  config.peft.lora_targets = (r"attention/(query|key|value|out)$", r"mlp/w")
  config.preference.update(loss="dpo", beta=0.1)
  config.train.update(seq_len=128, batch_size=16, steps=500, learning_rate=5e-4, min_learning_rate=5e-5,
                      warmup_steps=50, eval_every=100, eval_batches=20)
  return config
