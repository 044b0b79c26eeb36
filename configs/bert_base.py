"""BERT-base (110M): a bidirectional encoder pretrained by masked language modelling, for accelerators."""

from configs import base


def get_config():
  config = base.get_config()
  config.objective = "masked_lm"
  config.data.train_path = "../shared/data/wikipedia_en_sample/train-*.jsonl"
  config.data.val_path = "../shared/data/wikipedia_en_sample/validation.jsonl"
  config.data.vocab_size = 30522
  config.model.update(family="encoder", num_layers=12, d_model=768, num_heads=12, max_len=512,
                      position="learned", norm_position="post", activation="gelu", norm_eps=1e-12,
                      dtype="bfloat16")
  config.train.update(seq_len=128, batch_size=256, steps=100_000, learning_rate=1e-4, min_learning_rate=0.0,
                      warmup_steps=10_000, weight_decay=0.01, b2=0.999, eval_every=2000, checkpoint_every=5000,
                      num_samples=0)
  return config
