"""nanoGPT's documented CPU run of shakespeare_char (its README: ~1.88 val loss after 2000 iterations)."""

from configs import base


def get_config():
  config = base.get_config()
  config.data.train_path = "../shared/data/tinyshakespeare/input.txt"
  config.data.tokenizer = "char"
  config.data.val_fraction = 0.1      # first 90% of the text trains, the last 10% validates
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.d_model = 128
  config.model.max_len = 64
  config.model.position = "learned"
  config.model.activation = "gelu"    # nanoGPT uses exact GELU
  config.model.norm = "layernorm"
  config.model.norm_position = "pre"
  config.model.tie_embeddings = True
  config.model.use_bias = True
  config.model.dropout = 0.0
  config.train.seq_len = 64
  config.train.batch_size = 12
  config.train.steps = 2000
  config.train.learning_rate = 1e-3
  config.train.min_learning_rate = 1e-4
  config.train.warmup_steps = 100
  config.train.b1 = 0.9
  config.train.b2 = 0.99
  config.train.weight_decay = 0.1
  config.train.grad_clip = 1.0
  config.train.eval_every = 250
  config.train.eval_batches = 20      # nanoGPT's eval_iters=20
  config.train.checkpoint_every = 500
  config.train.sample_prompt = "\n"
  config.train.sample_tokens = 300
  return config
