"""FLOP and token counts: ModelConfig.train_flops against XLA's own count of the compiled forward pass (an
independent count), by hand on a tiny model, and the cumulative train/tokens and train/flops a run logs."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from model.config import ModelConfig
from model.families import build_model, init_params
from test_train import tiny_config
from train.pretrain import train_and_evaluate


def _xla_forward_flops(cfg: ModelConfig, *lengths) -> float:
  model = build_model(cfg)
  params = nn.meta.unbox(init_params(model, jax.random.PRNGKey(0)))
  inputs = [jnp.zeros((4, n), jnp.int32) for n in lengths]
  args = inputs if len(inputs) == 1 else (inputs[0], None, None, inputs[1])
  cost = jax.jit(lambda p, *a: model.apply({"params": p}, *a)).lower(params, *args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"] / 4  # per example


@pytest.mark.parametrize("family, lengths, options", [
    ("decoder", (128,), {}), ("decoder", (128,), {"activation": "swiglu", "num_kv_heads": 2}),
    ("decoder", (96,), {"tie_embeddings": False}), ("encoder", (128,), {"head_transform": True}),
    ("encoder_decoder", (128, 32), {"num_kv_heads": 2}), ("encoder_decoder", (64, 96), {}),
    # A mixture of experts counts the experts a token uses: capacity 1.0 gives an expert exactly its share of slots
    # (the dropless CPU path also multiplies padding rows and gathers kernels by a one-hot product).
    ("decoder", (128,), {"mlp": "moe", "num_experts": 4, "experts_per_token": 2, "moe_capacity_factor": 1.0,
                         "activation": "swiglu", "shared_experts": 1}),
    ("encoder_decoder", (64, 32), {"mlp": "moe", "num_experts": 8, "experts_per_token": 1, "moe_every": 2,
                                   "moe_capacity_factor": 1.0})])
def test_train_flops_are_three_forward_passes_as_xla_counts_them(family, lengths, options):
  cfg = ModelConfig(**{"vocab_size": 1024, "num_layers": 2, "d_model": 256, "num_heads": 4, "num_kv_heads": 4,
                       "head_dim": 64, "mlp_dim": 1024, "max_len": 256, "position": "rope", "family": family,
                       **options})
  # XLA also counts the elementwise work (activations, softmax, norms) that the matmul count leaves out.
  assert 1.0 <= _xla_forward_flops(cfg, *lengths) / (cfg.train_flops(*lengths) / 3) < 1.06


def test_train_flops_by_hand():
  cfg = ModelConfig(vocab_size=10, num_layers=1, d_model=4, num_heads=2, num_kv_heads=1, head_dim=2, mlp_dim=8)
  # One block: q and o 4x(2x2) each, k and v 4x(1x2) each, MLP 4x8 twice; the head 10x4.
  block, head = (16 + 16) + (8 + 8) + (32 + 32), 40
  assert cfg.train_flops(3) == 6 * (block + head) * 3 + 12 * 2 * 2 * 3 * 3
  t5 = ModelConfig(**{**cfg.__dict__, "family": "encoder_decoder"})
  # Encoder over 3 tokens; decoder over 2 (its cross-attention's q and o too), the cross keys and values over 3.
  assert t5.train_flops(3, 2) == (6 * block * 3 + 48 * 3 * 3 + 6 * (block + 32 + head) * 2 + 6 * 16 * 3 +
                                  48 * (2 * 2 + 2 * 3))


def test_a_run_logs_its_cumulative_tokens_and_flops(tmp_path):
  config = tiny_config(tmp_path, steps=3)
  train_and_evaluate(config, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  cfg = ModelConfig.from_config(config.model, 43)  # the char vocabulary of TEXT
  for r in records:
    assert r["train/tokens"] == r["step"] * 8 * 16
    assert r["train/flops"] == pytest.approx(r["step"] * 8 * cfg.train_flops(16))
  assert os.path.exists(tmp_path / "run" / "config.json")
