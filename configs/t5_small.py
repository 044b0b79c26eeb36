"""T5-small-sized (about 60M) encoder-decoder pretrained by span corruption, for accelerators."""

from configs import base


def get_config():
  config = base.get_config()
  config.objective = "span_corruption"
  config.data.train_path = "../shared/data/wikipedia_en_sample/train-*.jsonl"
  config.data.val_path = "../shared/data/wikipedia_en_sample/validation.jsonl"
  config.data.vocab_size = 32000
  config.model.update(family="encoder_decoder", num_layers=6, d_model=512, num_heads=8, mlp_dim=2048,
                      position="rope", norm="rmsnorm", use_bias=False, activation="gelu", dtype="bfloat16")
  config.train.update(seq_len=512, batch_size=128, steps=100_000, learning_rate=1e-3, min_learning_rate=1e-5,
                      warmup_steps=10_000, weight_decay=0.0, eval_every=2000, checkpoint_every=5000, num_samples=0)
  return config
