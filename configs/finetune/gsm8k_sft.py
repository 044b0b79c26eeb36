"""GSM8K supervised fine-tuning: question -> worked answer, loss on the answer only."""

from configs.finetune import common


def get_config():
  config = common.get_config()
  config.task = "instruct"
  config.data.train_path = "../shared/data/gsm8k/train.jsonl"
  config.data.val_path = "../shared/data/gsm8k/test.jsonl"
  config.data.prompt_template = "Question: {question}\nAnswer: "
  config.data.response_field = "answer"
  config.peft.method = "lora"
  config.peft.lora_targets = (r"attention/(query|key|value|out)$", r"mlp/w")
  config.train.update(seq_len=256, batch_size=16, steps=1000, learning_rate=5e-4, eval_every=200, eval_batches=20)
  return config
