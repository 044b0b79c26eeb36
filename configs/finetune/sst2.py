"""SST-2 sentiment classification (GLUE): train split to train, dev (872 sentences) to evaluate.

The method comes from --config.peft.method (full | freeze | lora | ia3 | prompt); sst2_*.py pin one each.
"""

from configs.finetune import common


def get_config():
  config = common.get_config()
  config.task = "classify"
  config.data.train_path = "../shared/data/sst2/train.jsonl"
  config.data.val_path = "../shared/data/sst2/dev.jsonl"
  config.data.text_field = "text"
  config.data.label_field = "label"
  config.train.update(seq_len=64, batch_size=32, steps=600, learning_rate=1e-4, warmup_steps=50, eval_every=200)
  return config
