"""GPT-2 small (124M) for accelerators: 12 layers, 12 heads, d_model 768, context 1024, bf16 compute."""

from configs import base


def get_config():
  config = base.get_config()
  config.data.train_path = "../shared/data/wikipedia_en_sample/train-*.jsonl"
  config.data.val_path = "../shared/data/wikipedia_en_sample/validation.jsonl"
  config.data.vocab_size = 32768
  config.model.num_layers = 12
  config.model.num_heads = 12
  config.model.d_model = 768
  config.model.max_len = 1024
  config.model.activation = "gelu_tanh"  # GPT-2's gelu_new
  config.model.dtype = "bfloat16"
  config.train.seq_len = 1024
  config.train.batch_size = 64
  config.train.steps = 20_000
  config.train.learning_rate = 6e-4
  config.train.min_learning_rate = 6e-5
  config.train.warmup_steps = 700
  config.train.b2 = 0.95
  config.train.eval_every = 1000
  config.train.checkpoint_every = 2000
  return config
