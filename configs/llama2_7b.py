"""Llama-2 7B's shape for accelerators: 32 layers, d_model 4096, 32 heads, SwiGLU 11008, RoPE, RMSNorm, vocabulary
32000, context 4096, bf16 compute, no biases, an untied output matrix. Sized for a TPU pod slice (one 4096-token
row a chip on v5p-64: batch 64, fsdp over every chip); `python -m train.compile` shows what fits where
(docs/accelerators.md)."""

from configs import base


def get_config():
  config = base.get_config()
  config.data.train_path = "../shared/data/wikipedia_en_sample/train-*.jsonl"
  config.data.val_path = "../shared/data/wikipedia_en_sample/validation.jsonl"
  config.data.vocab_size = 32000
  config.model.update(num_layers=32, d_model=4096, num_heads=32, mlp_dim=11008, activation="swiglu",
                      norm="rmsnorm", norm_eps=1e-5, position="rope", rope_theta=10_000.0, max_len=4096,
                      use_bias=False, tie_embeddings=False, dtype="bfloat16", scan_layers=True)
  config.train.update(seq_len=4096, batch_size=64, steps=100_000, learning_rate=3e-4, min_learning_rate=3e-5,
                      warmup_steps=2000, weight_decay=0.1, eval_every=1000, checkpoint_every=1000)
  config.mesh.update(data=1, fsdp=64)  # ZeRO-3 over the 64 chips of a v5p-64; set fsdp to the chip count elsewhere
  return config
