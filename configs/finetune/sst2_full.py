"""SST-2, full fine-tuning."""

from configs.finetune import sst2


def get_config():
  config = sst2.get_config()
  config.peft.method = "full"
  return config
