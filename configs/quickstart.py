"""The README's main job: a small GPT on the built-in corpus (Python standard library), minutes on 2 CPU cores."""

from configs import base


def get_config():
  config = base.get_config()
  config.data.train_path = "builtin:python_stdlib"
  config.data.max_bytes = 6_000_000
  config.data.vocab_size = 2048
  config.model.num_layers = 4
  config.model.d_model = 128
  config.model.num_heads = 4
  config.train.seq_len = 128
  config.train.batch_size = 16
  config.train.steps = 400
  config.train.learning_rate = 2e-3
  config.train.warmup_steps = 40
  config.train.eval_every = 100
  config.train.eval_batches = 10
  config.train.checkpoint_every = 200
  config.train.sample_prompt = "def "
  config.train.sample_tokens = 80
  return config
