"""SST-2, LoRA on the query and value projections (rank from --config.peft.lora_rank)."""

from configs.finetune import sst2


def get_config():
  config = sst2.get_config()
  config.peft.method = "lora"
  config.peft.lora_rank = 8
  config.peft.lora_alpha = 16.0
  config.train.learning_rate = 1e-3
  return config
