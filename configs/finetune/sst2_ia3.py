"""SST-2, (IA)^3: learned rescaling of keys, values and MLP hidden units."""

from configs.finetune import sst2


def get_config():
  config = sst2.get_config()
  config.peft.method = "ia3"
  config.train.learning_rate = 3e-3
  return config
