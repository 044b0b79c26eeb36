"""Mixtral import and export (model/hf/mixtral.py): a tiny random MixtralForCausalLM (grouped-query attention,
head_dim != d_model / heads, every weight perturbed) gives ablax's logits within 1e-4 on a padded batch, from the
Hub's layout and from transformers 5's fused one; export -> import is exact and transformers loads the export with
nothing missing or unexpected; a native ablax MoE exports with its logits; what Mixtral lacks is refused.
"""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model.config import ModelConfig  # noqa: E402
from model.families import build_model, init_params  # noqa: E402
from model.hf import common as hf_common  # noqa: E402
from model.hf import llama, mixtral  # noqa: E402
from test_hf import _padded_batch  # noqa: E402

TOLERANCE = 1e-4


def _mixtral(vocab_size=97, experts=4, top=2):
  torch.manual_seed(0)
  config = transformers.MixtralConfig(vocab_size=vocab_size, hidden_size=48, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      num_local_experts=experts, num_experts_per_tok=top, max_position_embeddings=128,
                                      rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=False)
  model = transformers.MixtralForCausalLM(config)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _max_diff(cfg, params, hf_model):
  tokens, mask, positions = _padded_batch(cfg.vocab_size)
  with torch.no_grad():
    expected = hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                        position_ids=torch.tensor(positions)).logits.numpy()
  model = build_model(cfg)
  logits = jax.jit(lambda p: model.apply({"params": p}, tokens, positions, mask.astype(np.int32)))(params)
  return float(np.abs(np.asarray(logits) - expected)[mask == 1].max())


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  root = tmp_path_factory.mktemp("mixtral")
  hf_model = _mixtral()
  hf_model.save_pretrained(root / "hub", safe_serialization=True)
  return root, hf_model, hf_common.import_params(str(root / "hub"))


def test_mixtral_imports_with_transformers_logits(imported):
  _, hf_model, (_, section, cfg, params) = imported
  assert section["mlp"] == "moe" and cfg.num_experts == 4 and cfg.experts_per_token == 2 and cfg.num_kv_heads == 2
  assert params["layer_1"]["mlp"]["wi_up"].shape == (4, 48, 32)
  diff = _max_diff(cfg, params, hf_model)
  print(f"mixtral: max |logits ablax - transformers| = {diff:.2e}")
  assert diff <= TOLERANCE


def test_the_fused_layout_imports_alike(imported):
  """transformers 5's in-memory names (gate_up_proj [E, 2F, D], down_proj, mlp.gate) give the same tree."""
  root, hf_model, (hf_config, _, cfg, params) = imported
  (root / "fused").mkdir()
  save_file({name: t.numpy() for name, t in hf_model.state_dict().items()}, str(root / "fused" / "model.safetensors"))
  hf_common.write_json(hf_config, str(root / "fused" / "config.json"))
  _, _, _, fused = hf_common.import_params(str(root / "fused"))
  for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_export_round_trips_and_loads_in_transformers(imported, tmp_path):
  _, hf_model, (_, _, cfg, params) = imported
  hf_config, tensors = hf_common.export_tensors(cfg, params)
  assert hf_config["architectures"] == ["MixtralForCausalLM"]
  assert tensors.keys() == {name for name in _hub_names(hf_model)}
  out = tmp_path / "export"
  out.mkdir()
  hf_common.write_safetensors(tensors, str(out / "model.safetensors"))
  hf_common.write_json(hf_config, str(out / "config.json"))
  _, _, again_cfg, again = hf_common.import_params(str(out))
  assert again_cfg == cfg
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  loaded, info = transformers.MixtralForCausalLM.from_pretrained(str(out), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  for (name, theirs), ours in zip(loaded.state_dict().items(), hf_model.state_dict().values()):
    np.testing.assert_array_equal(theirs.numpy(), ours.numpy(), err_msg=name)


def _hub_names(hf_model):
  """The tensor names save_pretrained writes (the Hub's layout)."""
  cfg = hf_model.config
  names = {n for n in hf_model.state_dict() if ".mlp." not in n}
  for i in range(cfg.num_hidden_layers):
    names.add(f"model.layers.{i}.block_sparse_moe.gate.weight")
    names.update(f"model.layers.{i}.block_sparse_moe.experts.{j}.{w}.weight" for j in range(cfg.num_local_experts)
                 for w in ("w1", "w2", "w3"))
  return names


def test_a_native_moe_exports_as_mixtral_with_its_logits(tmp_path):
  """ablax's own init (random weights), 8 experts top-3: transformers computes ablax's logits; Llama refuses it."""
  cfg = ModelConfig(vocab_size=61, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=24,
                    max_len=64, position="rope", norm="rmsnorm", activation="swiglu", use_bias=False,
                    tie_embeddings=False, mlp="moe", num_experts=8, experts_per_token=3)
  params = nn.meta.unbox(init_params(build_model(cfg), jax.random.key(0), 4))
  params = jax.tree.map(lambda x: np.asarray(x) + 0.05 * np.random.default_rng(0).standard_normal(x.shape), params)
  hf_config, tensors = hf_common.export_tensors(cfg, params)
  hf_common.write_safetensors(tensors, str(tmp_path / "model.safetensors"))
  hf_common.write_json(hf_config, str(tmp_path / "config.json"))
  loaded = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert _max_diff(cfg, jax.tree.map(np.float32, params), loaded) <= TOLERANCE
  with pytest.raises(hf_common.ConversionError, match="config.model.mlp='moe', Llama needs 'dense'"):
    llama.hf_config(cfg)


@pytest.mark.parametrize("change, message", [
    ({"shared_experts": 1}, "config.model.shared_experts=1, Mixtral needs 0"),
    ({"moe_every": 2}, "config.model.moe_every=2, Mixtral needs 1"),
    ({"router": "sigmoid_topk"}, "config.model.router='sigmoid_topk', Mixtral needs 'softmax_topk'"),
    ({"moe_bias_update_rate": 0.01}, "config.model.moe_bias_update_rate=0.01, Mixtral needs 0.0"),
    ({"experts_per_token": 1}, "config.model.experts_per_token=1, Mixtral needs at least 2"),
    ({"mlp": "dense"}, "config.model.mlp='dense', Mixtral needs 'moe'")])
def test_what_mixtral_lacks_is_refused(change, message):
  cfg = ModelConfig(vocab_size=61, num_layers=2, d_model=32, num_heads=4, position="rope", norm="rmsnorm",
                    activation="swiglu", use_bias=False, mlp="moe", num_experts=4)
  with pytest.raises(hf_common.ConversionError, match=message):
    mixtral.hf_config(dataclasses.replace(cfg, **change))
  for bad, text in (({"num_experts_per_tok": 1}, "num_experts_per_tok=1 is not supported"),
                    ({"sliding_window": 64}, "sliding_window=64 is not supported")):
    with pytest.raises(hf_common.ConversionError, match=text):
      mixtral.model_section({"model_type": "mixtral", "hidden_size": 32, "num_attention_heads": 4,
                             "num_hidden_layers": 2, "intermediate_size": 16, **bad})
