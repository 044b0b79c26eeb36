"""SST-2, prompt tuning with 20 virtual tokens."""

from configs.finetune import sst2


def get_config():
  config = sst2.get_config()
  config.peft.method = "prompt"
  config.peft.num_prompt_tokens = 20
  config.train.learning_rate = 3e-2
  return config
