"""Llama (`LlamaForCausalLM`) <-> ablax decoder: RoPE (rotate-half), pre-RMSNorm, SwiGLU, grouped-query
attention, no biases (or biases on every dense layer), untied or tied head.

torch Linear stores weights [out, in]; ablax stores [in, ...out], so every matrix is transposed.
"""

import numpy as np

from model.config import ModelConfig
from model.hf.common import PLAIN_DECODER, ConversionError, config_value, unbiased_score

MODEL_TYPES = ("llama",)
BUFFERS = ("self_attn.rotary_emb.inv_freq",)  # saved by some older versions



def _rope_theta(hf_config: dict) -> float:
  """The RoPE base; only unscaled ("default") RoPE is supported."""
  rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise ConversionError(f"config.json: rope_type {rope_type!r} is not supported (only unscaled RoPE)")
  return float(rope.get("rope_theta", hf_config.get("rope_theta", 10_000.0)))


def model_section(hf_config: dict) -> dict:
  """ablax config.model keys of a Llama config.json."""
  if hf_config.get("hidden_act", "silu") != "silu":
    raise ConversionError(f"config.json: hidden_act {hf_config['hidden_act']!r} is not supported (only silu)")
  attention_bias, mlp_bias = hf_config.get("attention_bias", False), hf_config.get("mlp_bias", False)
  if attention_bias != mlp_bias:
    raise ConversionError(f"config.json: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not "
                          "supported (ablax has biases on every dense layer or on none)")
  d_model, num_heads = config_value(hf_config, "hidden_size"), config_value(hf_config, "num_attention_heads")
  return {"family": "decoder", "num_layers": config_value(hf_config, "num_hidden_layers"), "d_model": d_model,
          "num_heads": num_heads, "num_kv_heads": hf_config.get("num_key_value_heads") or num_heads,
          "head_dim": hf_config.get("head_dim") or d_model // num_heads,
          "mlp_dim": config_value(hf_config, "intermediate_size"), "activation": "swiglu", "norm": "rmsnorm",
          "norm_position": "pre", "norm_eps": config_value(hf_config, "rms_norm_eps", 1e-6), "position": "rope",
          "max_len": config_value(hf_config, "max_position_embeddings", 2048), "rope_theta": _rope_theta(hf_config),
          "tie_embeddings": bool(hf_config.get("tie_word_embeddings", False)), "use_bias": bool(attention_bias)}


def vocab_size(hf_config: dict) -> int:
  return config_value(hf_config, "vocab_size")


def dense_mlp(tensors, cfg: ModelConfig, layer: str) -> dict:
  """The ablax MLP of Llama's gate_proj / up_proj / down_proj under the layer prefix `layer`."""
  d, f = cfg.d_model, cfg.mlp_dim
  linear = lambda name, out_dim, in_dim: tensors.take(layer + name + ".weight", (out_dim, in_dim)).T
  mlp = {"wi_gate": linear("mlp.gate_proj", f, d), "wi_up": linear("mlp.up_proj", f, d),
         "wo": linear("mlp.down_proj", d, f)}
  if cfg.use_bias:
    mlp["wi_gate_bias"] = tensors.take(layer + "mlp.gate_proj.bias", (f,))
    mlp["wi_up_bias"] = tensors.take(layer + "mlp.up_proj.bias", (f,))
    mlp["wo_bias"] = tensors.take(layer + "mlp.down_proj.bias", (d,))
  return mlp


def dense_mlp_to_hf(cfg: ModelConfig, mlp: dict, layer: str) -> dict:
  """Llama's MLP tensors of an ablax MLP under the layer prefix `layer`."""
  out = {layer + "mlp.gate_proj.weight": np.asarray(mlp["wi_gate"]).T, layer + "mlp.up_proj.weight":
         np.asarray(mlp["wi_up"]).T, layer + "mlp.down_proj.weight": np.asarray(mlp["wo"]).T}
  if cfg.use_bias:
    out.update({layer + "mlp.gate_proj.bias": mlp["wi_gate_bias"], layer + "mlp.up_proj.bias": mlp["wi_up_bias"],
                layer + "mlp.down_proj.bias": mlp["wo_bias"]})
  return out


def to_ablax(hf_config: dict, tensors, cfg: ModelConfig, mlp=dense_mlp) -> dict:
  """The ablax parameter tree of Llama tensors; `mlp(tensors, cfg, layer prefix)` reads each layer's MLP (Llama's
  dense one, or Mixtral's experts)."""
  del hf_config
  d, h, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  params = {"embed": {"embedding": tensors.take("model.embed_tokens.weight", (cfg.vocab_size, d))},
            "final_norm": {"scale": tensors.take("model.norm.weight", (d,))}}
  if cfg.tie_embeddings:
    if "lm_head.weight" in tensors:  # some exports store the shared matrix twice
      head_VxD = tensors.take("lm_head.weight", (cfg.vocab_size, d))
      if not np.array_equal(head_VxD, params["embed"]["embedding"]):
        raise ConversionError(f"{tensors.where('lm_head.weight')}: tensor 'lm_head.weight' differs from "
                              "'model.embed_tokens.weight' but tie_word_embeddings is true")
  else:
    params["lm_head"] = tensors.take("lm_head.weight", (cfg.vocab_size, d)).T
  for i in range(cfg.num_layers):
    layer = f"model.layers.{i}."
    for buffer in BUFFERS:
      tensors.discard(layer + buffer)
    linear = lambda name, out_dim, in_dim: tensors.take(layer + name + ".weight", (out_dim, in_dim)).T
    attention = {"query": linear("self_attn.q_proj", h * k, d).reshape(d, h, k),
                 "key": linear("self_attn.k_proj", g * k, d).reshape(d, g, k),
                 "value": linear("self_attn.v_proj", g * k, d).reshape(d, g, k),
                 "out": linear("self_attn.o_proj", d, h * k).reshape(h, k, d)}
    if cfg.use_bias:
      for name, heads, hf_name in (("query", h, "q_proj"), ("key", g, "k_proj"), ("value", g, "v_proj")):
        attention[name + "_bias"] = tensors.take(f"{layer}self_attn.{hf_name}.bias", (heads * k,)).reshape(heads, k)
      attention["out_bias"] = tensors.take(layer + "self_attn.o_proj.bias", (d,))
    params[f"layer_{i}"] = {
        "attention": attention,
        "attention_norm": {"scale": tensors.take(layer + "input_layernorm.weight", (d,))},
        "mlp": mlp(tensors, cfg, layer),
        "mlp_norm": {"scale": tensors.take(layer + "post_attention_layernorm.weight", (d,))},
    }
  return params


def hf_config(cfg: ModelConfig) -> dict:
  """Llama config.json of an ablax model; ConversionError naming the first key Llama cannot express."""
  needed = {"family": "decoder", "position": "rope", "norm": "rmsnorm", "norm_position": "pre",
            "activation": "swiglu", **PLAIN_DECODER}
  for key, value in needed.items():
    if getattr(cfg, key) != value:
      raise ConversionError(f"config.model.{key}={getattr(cfg, key)!r}, Llama needs {value!r}")
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
          "hidden_act": "silu", "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps,
          "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
          "attention_bias": cfg.use_bias, "mlp_bias": cfg.use_bias, "attention_dropout": cfg.dropout,
          "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": None, "eos_token_id": None,
          "torch_dtype": "float32"}


def to_hf(cfg: ModelConfig, params: dict, mlp=dense_mlp_to_hf) -> dict:
  """HF tensor names -> arrays of a Llama checkpoint; `mlp(cfg, mlp params, layer prefix)` writes each layer's MLP
  (Llama's dense one, or Mixtral's experts)."""
  d, h, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  out = {"model.embed_tokens.weight": params["embed"]["embedding"], "model.norm.weight": params["final_norm"]["scale"]}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = np.asarray(params["lm_head"]).T
  for i in range(cfg.num_layers):
    layer, p = f"model.layers.{i}.", params[f"layer_{i}"]
    attention = p["attention"]
    out[layer + "self_attn.q_proj.weight"] = np.reshape(attention["query"], (d, h * k)).T
    out[layer + "self_attn.k_proj.weight"] = np.reshape(attention["key"], (d, g * k)).T
    out[layer + "self_attn.v_proj.weight"] = np.reshape(attention["value"], (d, g * k)).T
    out[layer + "self_attn.o_proj.weight"] = np.reshape(attention["out"], (h * k, d)).T
    out.update(mlp(cfg, p["mlp"], layer))
    if cfg.use_bias:
      for name, hf_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        out[f"{layer}self_attn.{hf_name}.bias"] = np.reshape(attention[name + "_bias"], (-1,))
      out[layer + "self_attn.o_proj.bias"] = attention["out_bias"]
    out[layer + "input_layernorm.weight"] = p["attention_norm"]["scale"]
    out[layer + "post_attention_layernorm.weight"] = p["mlp_norm"]["scale"]
  return {name: np.asarray(array) for name, array in out.items()}


def to_classifier(tensors: dict, kernel_DxC: np.ndarray, bias_C: np.ndarray,
                  architecture: str = "LlamaForSequenceClassification") -> tuple[str, dict]:
  """LlamaForSequenceClassification's tensors (or those of `architecture`, a class of the same layout): the model's
  without its LM head, and a bias-free score layer [C, D] that reads the last token that is not padding, as
  ablax's decoder head does."""
  unbiased_score(bias_C, architecture)
  body = {name: array for name, array in tensors.items() if name != "lm_head.weight"}
  return architecture, {**body, "score.weight": np.ascontiguousarray(kernel_DxC.T)}
