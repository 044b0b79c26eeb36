"""A small T5-style encoder-decoder pretrained by span corruption on the Wikipedia sample (CPU, minutes)."""

from configs import t5_small


def get_config():
  config = t5_small.get_config()
  config.data.max_bytes = 8_000_000
  config.data.vocab_size = 4096
  config.model.update(num_layers=3, d_model=192, num_heads=4, mlp_dim=512, dtype="float32")
  config.train.update(seq_len=128, batch_size=16, steps=800, learning_rate=2e-3, min_learning_rate=2e-4,
                      warmup_steps=80, eval_every=200, eval_batches=20, checkpoint_every=400)
  return config
