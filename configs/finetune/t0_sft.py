"""Multi-task instruction tuning on a sample of P3 / T0 prompts (prompt -> completion)."""

from configs.finetune import common


def get_config():
  config = common.get_config()
  config.task = "instruct"
  config.data.train_path = "../shared/data/t0_instructions_sample/t0_train_sample.jsonl"
  config.data.val_fraction = 0.05
  config.data.prompt_template = "{prompt}\n"
  config.data.response_field = "completion"
  config.peft.method = "full"
  config.train.update(seq_len=256, batch_size=16, steps=1000, learning_rate=1e-4, eval_every=200, eval_batches=20)
  return config
