"""GPT-2 (`GPT2LMHeadModel`) <-> ablax decoder: learned positions, pre-LayerNorm, GELU (tanh), tied head.

HF's Conv1D stores weights [in, out] (ablax's layout, no transpose); c_attn fuses q|k|v along `out`.
"""

import numpy as np

from model.config import ModelConfig
from model.hf.common import PLAIN_DECODER, ConversionError, check_settings, choice, config_value, unbiased_score

MODEL_TYPES = ("gpt2",)
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers older versions saved



def model_section(hf_config: dict) -> dict:
  """ablax config.model keys of a GPT-2 config.json."""
  unsupported = {"scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False, "scale_attn_weights": True}
  check_settings(hf_config, unsupported)
  activation = choice(hf_config, "activation_function", "gelu_new", ACTIVATIONS)
  d_model = config_value(hf_config, "n_embd")
  return {"family": "decoder", "num_layers": config_value(hf_config, "n_layer"), "d_model": d_model,
          "num_heads": config_value(hf_config, "n_head"), "num_kv_heads": 0, "head_dim": 0,
          "mlp_dim": hf_config.get("n_inner") or 4 * d_model, "activation": activation,
          "norm": "layernorm", "norm_position": "pre", "norm_eps": config_value(hf_config, "layer_norm_epsilon", 1e-5),
          "position": "learned", "max_len": config_value(hf_config, "n_positions"), "tie_embeddings": True,
          "use_bias": True}


def vocab_size(hf_config: dict) -> int:
  return config_value(hf_config, "vocab_size")


def to_ablax(hf_config: dict, tensors, cfg: ModelConfig) -> dict:
  """The ablax parameter tree of GPT-2 tensors (with or without the `transformer.` prefix)."""
  del hf_config
  p = "transformer." if "transformer.wte.weight" in tensors else ""
  d, h, k, f = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
  embedding_VxD = tensors.take(f"{p}wte.weight", (cfg.vocab_size, d))
  if "lm_head.weight" in tensors:  # tied: some exports store the shared matrix twice
    head_VxD = tensors.take("lm_head.weight", (cfg.vocab_size, d))
    if not np.array_equal(head_VxD, embedding_VxD):
      raise ConversionError(f"{tensors.where('lm_head.weight')}: tensor 'lm_head.weight' differs from "
                            f"'{p}wte.weight' but GPT-2 ties them")
  params = {"embed": {"embedding": embedding_VxD},
            "position_embedding": tensors.take(f"{p}wpe.weight", (cfg.max_len, d)),
            "final_norm": {"scale": tensors.take(f"{p}ln_f.weight", (d,)), "bias": tensors.take(f"{p}ln_f.bias", (d,))}}
  for i in range(cfg.num_layers):
    layer = f"{p}h.{i}."
    for buffer in BUFFERS:
      tensors.discard(layer + buffer[1:])
    qkv_Dx3HK = tensors.take(layer + "attn.c_attn.weight", (d, 3 * h * k))
    qkv_bias_3HK = tensors.take(layer + "attn.c_attn.bias", (3 * h * k,))
    attention = {}
    for j, name in enumerate(("query", "key", "value")):
      attention[name] = qkv_Dx3HK[:, j * h * k:(j + 1) * h * k].reshape(d, h, k)
      attention[name + "_bias"] = qkv_bias_3HK[j * h * k:(j + 1) * h * k].reshape(h, k)
    attention["out"] = tensors.take(layer + "attn.c_proj.weight", (h * k, d)).reshape(h, k, d)
    attention["out_bias"] = tensors.take(layer + "attn.c_proj.bias", (d,))
    params[f"layer_{i}"] = {
        "attention": attention,
        "attention_norm": {"scale": tensors.take(layer + "ln_1.weight", (d,)),
                           "bias": tensors.take(layer + "ln_1.bias", (d,))},
        "mlp": {"wi": tensors.take(layer + "mlp.c_fc.weight", (d, f)),
                "wi_bias": tensors.take(layer + "mlp.c_fc.bias", (f,)),
                "wo": tensors.take(layer + "mlp.c_proj.weight", (f, d)),
                "wo_bias": tensors.take(layer + "mlp.c_proj.bias", (d,))},
        "mlp_norm": {"scale": tensors.take(layer + "ln_2.weight", (d,)),
                     "bias": tensors.take(layer + "ln_2.bias", (d,))},
    }
  return params


def hf_config(cfg: ModelConfig) -> dict:
  """GPT-2 config.json of an ablax model; ConversionError naming the first key GPT-2 cannot express."""
  needed = {"family": "decoder", "position": "learned", "norm": "layernorm", "norm_position": "pre",
            "tie_embeddings": True, "use_bias": True, "num_kv_heads": cfg.num_heads,
            "head_dim": cfg.d_model // cfg.num_heads, **PLAIN_DECODER}
  for key, value in needed.items():
    if getattr(cfg, key) != value:
      raise ConversionError(f"config.model.{key}={getattr(cfg, key)!r}, GPT-2 needs {value!r}")
  if cfg.activation not in ("gelu_tanh", "gelu"):
    raise ConversionError(f"config.model.activation={cfg.activation!r}, GPT-2 needs gelu_tanh or gelu")
  return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
          "n_positions": cfg.max_len, "n_embd": cfg.d_model, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
          "n_inner": cfg.mlp_dim, "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
          "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
          "attn_pdrop": cfg.dropout, "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": None,
          "torch_dtype": "float32"}


def to_hf(cfg: ModelConfig, params: dict) -> dict:
  """HF tensor names -> arrays of a GPT-2 checkpoint (the tied lm_head is not stored)."""
  d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
  out = {"transformer.wte.weight": params["embed"]["embedding"],
         "transformer.wpe.weight": params["position_embedding"],
         "transformer.ln_f.weight": params["final_norm"]["scale"],
         "transformer.ln_f.bias": params["final_norm"]["bias"]}
  for i in range(cfg.num_layers):
    layer, p = f"transformer.h.{i}.", params[f"layer_{i}"]
    attention = p["attention"]
    names = ("query", "key", "value")
    out[layer + "attn.c_attn.weight"] = np.concatenate([np.reshape(attention[n], (d, h * k)) for n in names], 1)
    out[layer + "attn.c_attn.bias"] = np.concatenate([np.reshape(attention[n + "_bias"], (h * k,)) for n in names])
    out[layer + "attn.c_proj.weight"] = np.reshape(attention["out"], (h * k, d))
    out[layer + "attn.c_proj.bias"] = attention["out_bias"]
    out[layer + "ln_1.weight"], out[layer + "ln_1.bias"] = p["attention_norm"]["scale"], p["attention_norm"]["bias"]
    out[layer + "ln_2.weight"], out[layer + "ln_2.bias"] = p["mlp_norm"]["scale"], p["mlp_norm"]["bias"]
    out[layer + "mlp.c_fc.weight"], out[layer + "mlp.c_fc.bias"] = p["mlp"]["wi"], p["mlp"]["wi_bias"]
    out[layer + "mlp.c_proj.weight"], out[layer + "mlp.c_proj.bias"] = p["mlp"]["wo"], p["mlp"]["wo_bias"]
  return {name: np.asarray(array) for name, array in out.items()}


def to_classifier(tensors: dict, kernel_DxC: np.ndarray, bias_C: np.ndarray) -> tuple[str, dict]:
  """GPT2ForSequenceClassification's tensors: the transformer's and a bias-free score layer [C, D], which reads the
  last token that is not padding, as ablax's decoder head does."""
  unbiased_score(bias_C, "GPT2ForSequenceClassification")
  return "GPT2ForSequenceClassification", {**tensors, "score.weight": np.ascontiguousarray(kernel_DxC.T)}
