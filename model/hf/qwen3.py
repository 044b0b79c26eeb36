"""Qwen3 (`Qwen3ForCausalLM`) <-> ablax decoder with QK-norm: Llama's layout (model/hf/llama.py) plus an RMSNorm
of each head's queries and keys over the head dim before RoPE (`self_attn.q_norm` / `k_norm`, a scale [head_dim]:
config.model.qk_norm with qk_norm_scope "head"). Qwen3's MLP has no biases and ablax has biases on every dense
layer or on none, so only `attention_bias: false` maps; sliding-window layers are refused.
"""

import dataclasses

import numpy as np

from model.config import ModelConfig
from model.hf import llama
from model.hf.common import PLAIN_DECODER, ConversionError

MODEL_TYPES = ("qwen3",)
# Qwen3Config's defaults where they differ from Llama's (a config.json may leave them out).
DEFAULTS = {"head_dim": 128, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


def model_section(hf_config: dict) -> dict:
  """ablax config.model keys of a Qwen3 config.json."""
  if hf_config.get("attention_bias", False):
    raise ConversionError("config.json: attention_bias=true is not supported (Qwen3's MLP has no biases, and ablax "
                          "has biases on every dense layer or on none)")
  sliding = [kind for kind in hf_config.get("layer_types") or () if kind != "full_attention"]
  if hf_config.get("use_sliding_window", False) or sliding:
    raise ConversionError("config.json: use_sliding_window / layer_types: sliding-window attention is not supported")
  section = llama.model_section({**DEFAULTS, **hf_config})
  return {**section, "qk_norm": True, "qk_norm_scope": "head"}


def vocab_size(hf_config: dict) -> int:
  return llama.vocab_size(hf_config)


def to_ablax(hf_config: dict, tensors, cfg: ModelConfig) -> dict:
  """The ablax parameter tree of Qwen3 tensors."""
  params = llama.to_ablax(hf_config, tensors, cfg)
  for i in range(cfg.num_layers):
    attention, layer = params[f"layer_{i}"]["attention"], f"model.layers.{i}.self_attn."
    attention["query_norm"] = {"scale": tensors.take(layer + "q_norm.weight", (cfg.head_dim,))}
    attention["key_norm"] = {"scale": tensors.take(layer + "k_norm.weight", (cfg.head_dim,))}
  return params


def hf_config(cfg: ModelConfig) -> dict:
  """Qwen3 config.json of an ablax model; ConversionError naming the first key Qwen3 cannot express."""
  needed = {"family": "decoder", "position": "rope", "norm": "rmsnorm", "norm_position": "pre",
            "activation": "swiglu", "use_bias": False, **PLAIN_DECODER, "qk_norm": True, "qk_norm_scope": "head"}
  for key, value in needed.items():
    if getattr(cfg, key) != value:
      raise ConversionError(f"config.model.{key}={getattr(cfg, key)!r}, Qwen3 needs {value!r}")
  config = llama.hf_config(dataclasses.replace(cfg, qk_norm=False))
  del config["mlp_bias"]
  full = ["full_attention"] * cfg.num_layers
  return {**config, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False,
          "sliding_window": None, "max_window_layers": cfg.num_layers, "layer_types": full}


def to_hf(cfg: ModelConfig, params: dict) -> dict:
  """HF tensor names -> arrays of a Qwen3 checkpoint."""
  out = llama.to_hf(cfg, params)
  for i in range(cfg.num_layers):
    attention, layer = params[f"layer_{i}"]["attention"], f"model.layers.{i}.self_attn."
    out[layer + "q_norm.weight"] = np.asarray(attention["query_norm"]["scale"])
    out[layer + "k_norm.weight"] = np.asarray(attention["key_norm"]["scale"])
  return out


def to_classifier(tensors: dict, kernel_DxC, bias_C) -> tuple[str, dict]:
  """Qwen3ForSequenceClassification's tensors: Llama's layout (the last non-padding token, a bias-free score)."""
  return llama.to_classifier(tensors, kernel_DxC, bias_C, "Qwen3ForSequenceClassification")
