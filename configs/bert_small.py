"""A small BERT-style encoder pretrained by masked LM on the Wikipedia sample (CPU, minutes)."""

from configs import bert_base


def get_config():
  config = bert_base.get_config()
  config.data.max_bytes = 8_000_000
  config.data.vocab_size = 4096
  config.model.update(num_layers=4, d_model=192, num_heads=4, max_len=128, dtype="float32")
  config.train.update(seq_len=128, batch_size=16, steps=800, learning_rate=1e-3, min_learning_rate=1e-4,
                      warmup_steps=80, weight_decay=0.01, eval_every=200, eval_batches=20, checkpoint_every=400)
  return config
