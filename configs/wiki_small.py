"""A small GPT pretrained on the Wikipedia sample: the base model of the fine-tuning table (CPU, ~10 min)."""

from configs import base


def get_config():
  config = base.get_config()
  config.data.train_path = "../shared/data/wikipedia_en_sample/train-*.jsonl"
  config.data.val_path = "../shared/data/wikipedia_en_sample/validation.jsonl"
  config.data.max_bytes = 8_000_000
  config.data.vocab_size = 4096
  config.model.update(num_layers=4, d_model=192, num_heads=4, max_len=128, position="rope", norm="rmsnorm",
                      activation="swiglu", use_bias=True, mlp_dim=512)
  config.train.update(seq_len=128, batch_size=16, steps=800, learning_rate=2e-3, min_learning_rate=2e-4,
                      warmup_steps=80, eval_every=200, eval_batches=20, checkpoint_every=400,
                      sample_prompt="The history of")
  return config
