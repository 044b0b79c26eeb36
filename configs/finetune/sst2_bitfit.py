"""SST-2, BitFit: only biases (and the classification head) train."""

from configs.finetune import sst2


def get_config():
  config = sst2.get_config()
  config.peft.method = "freeze"
  config.peft.trainable = (r"_bias$", r"norm/bias$")
  config.train.learning_rate = 1e-3
  return config
