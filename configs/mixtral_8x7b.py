"""Mixtral 8x7B's shape for accelerators: 32 layers, d_model 4096, 32 query heads over 8 key/value heads of 128,
8 SwiGLU experts of 14336 a layer with 2 a token (46.7B parameters, 12.9B active a token), RoPE base 1e6, RMSNorm,
vocabulary 32000, context 4096, bf16 compute, no biases, an untied output matrix. Sized for a v5p-128 slice: the
experts over an expert axis of 8 (tokens reach them by all-to-all: capacity 1.25 a row), fsdp over the other 16,
one 4096-token row a chip; `python -m train.compile` shows what fits where (docs/accelerators.md)."""

from configs import base


def get_config():
  config = base.get_config()
  config.data.train_path = "../shared/data/wikipedia_en_sample/train-*.jsonl"
  config.data.val_path = "../shared/data/wikipedia_en_sample/validation.jsonl"
  config.data.vocab_size = 32000
  config.model.update(num_layers=32, d_model=4096, num_heads=32, num_kv_heads=8, head_dim=128, mlp_dim=14336,
                      activation="swiglu", norm="rmsnorm", norm_eps=1e-5, position="rope", rope_theta=1e6,
                      max_len=4096, use_bias=False, tie_embeddings=False, dtype="bfloat16", scan_layers=True,
                      attention_impl="splash", mlp="moe", num_experts=8, experts_per_token=2,
                      moe_capacity_factor=1.25, moe_aux_loss=0.02)
  config.train.update(seq_len=4096, batch_size=128, steps=100_000, learning_rate=3e-4, min_learning_rate=3e-5,
                      warmup_steps=2000, weight_decay=0.1, eval_every=1000, checkpoint_every=1000)
  config.mesh.update(data=1, fsdp=16, expert=8)  # the 128 chips of a v5p-128
  return config
