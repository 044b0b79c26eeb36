"""T5 (`T5ForConditionalGeneration`) <-> ablax encoder-decoder: relative position bias (one table per stack,
kept in block 0 by Hugging Face), unscaled attention logits, pre-RMSNorm without biases, ReLU (T5 v1.0) or
gated GELU (v1.1, flan) feed-forward.

T5 v1.0 ties the output head to the shared embedding and scales the decoder output by d_model**-0.5 first;
v1.1 has an untied head and no scaling. transformers >= 5 always reports tie_word_embeddings=true and keeps
the distinction in scale_decoder_outputs; older config.json files say tie_word_embeddings=false for v1.1.
`shared.weight`, `encoder.embed_tokens.weight`, `decoder.embed_tokens.weight` (and `lm_head.weight` when
tied) are one matrix: save_pretrained keeps one of them, other exports several copies, all accepted.
torch Linear stores weights [out, in]; ablax stores [in, ...out], so every matrix is transposed.
"""

import numpy as np

from model.config import ModelConfig
from model.hf.common import ConversionError, config_value

MODEL_TYPES = ("t5",)
# (gated, Hugging Face dense_act_fn) -> ablax activation
ACTIVATIONS = {(False, "relu"): "relu", (False, "gelu"): "gelu", (False, "gelu_new"): "gelu_tanh",
               (True, "gelu_new"): "geglu", (True, "silu"): "swiglu"}
EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# Block 0 of the decoder's cross-attention has no position bias; some old checkpoints still carry one.
UNUSED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)



def _activation(hf_config: dict) -> str:
  """ablax activation of T5's feed_forward_proj ("relu", "gated-gelu", ...), read as transformers does."""
  proj = hf_config.get("feed_forward_proj", "relu")
  parts = proj.split("-")
  gated = parts[0] == "gated" and len(parts) == 2
  act = "gelu_new" if proj == "gated-gelu" else parts[-1]
  if (gated, act) not in ACTIVATIONS or (len(parts) > 1 and not gated):
    raise ConversionError(f"config.json: feed_forward_proj {proj!r} is not supported "
                          "(supported: relu, gelu, gelu_new, gated-gelu, gated-silu)")
  return ACTIVATIONS[gated, act]


def scaled_and_tied(hf_config: dict) -> bool:
  """T5 v1.0 (tied head, decoder output scaled) rather than v1.1 (untied, unscaled)."""
  return bool(hf_config.get("scale_decoder_outputs", hf_config.get("tie_word_embeddings", True)))


def model_section(hf_config: dict) -> dict:
  """ablax config.model keys of a T5 config.json."""
  layers = config_value(hf_config, "num_layers", 6)
  if hf_config.get("num_decoder_layers") not in (None, layers):
    raise ConversionError(f"config.json: num_decoder_layers={hf_config['num_decoder_layers']} differs from "
                          f"num_layers={layers}; ablax's encoder and decoder have the same depth")
  tied = scaled_and_tied(hf_config)
  return {"family": "encoder_decoder", "num_layers": layers, "d_model": config_value(hf_config, "d_model", 512),
          "num_heads": config_value(hf_config, "num_heads", 8), "num_kv_heads": 0, "head_dim": config_value(hf_config, "d_kv", 64),
          "mlp_dim": config_value(hf_config, "d_ff", 2048), "activation": _activation(hf_config), "norm": "rmsnorm",
          "norm_position": "pre", "norm_eps": config_value(hf_config, "layer_norm_epsilon", 1e-6), "position": "relative",
          "relative_buckets": config_value(hf_config, "relative_attention_num_buckets", 32),
          "relative_max_distance": config_value(hf_config, "relative_attention_max_distance", 128),
          "max_len": hf_config.get("n_positions") or 512, "scale_attention": False, "use_bias": False,
          "tie_embeddings": tied, "scale_tied_logits": tied}


def vocab_size(hf_config: dict) -> int:
  return config_value(hf_config, "vocab_size", 32128)


def _attention(tensors, prefix: str, d: int, h: int, k: int) -> dict:
  linear = lambda name, out_dim, in_dim: tensors.take(f"{prefix}.{name}.weight", (out_dim, in_dim)).T
  return {"query": linear("q", h * k, d).reshape(d, h, k), "key": linear("k", h * k, d).reshape(d, h, k),
          "value": linear("v", h * k, d).reshape(d, h, k), "out": linear("o", d, h * k).reshape(h, k, d)}


def _mlp(tensors, prefix: str, cfg: ModelConfig) -> dict:
  d, f = cfg.d_model, cfg.mlp_dim
  linear = lambda name, out_dim, in_dim: tensors.take(f"{prefix}.{name}.weight", (out_dim, in_dim)).T
  if cfg.gated:
    return {"wi_gate": linear("wi_0", f, d), "wi_up": linear("wi_1", f, d), "wo": linear("wo", d, f)}
  return {"wi": linear("wi", f, d), "wo": linear("wo", d, f)}


def _stack(tensors, name: str, cfg: ModelConfig) -> dict:
  """One of the two stacks; the decoder's blocks have cross-attention (layer.1) before the MLP."""
  d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
  scale = lambda prefix: {"scale": tensors.take(prefix + ".weight", (d,))}
  stack = {"relative_bias": tensors.take(f"{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                                         (cfg.relative_buckets, h)),
           "final_norm": scale(f"{name}.final_layer_norm")}
  mlp_index = 2 if name == "decoder" else 1
  for i in range(cfg.num_layers):
    block = f"{name}.block.{i}.layer"
    layer = {"attention": _attention(tensors, f"{block}.0.SelfAttention", d, h, k),
             "attention_norm": scale(f"{block}.0.layer_norm"),
             "mlp": _mlp(tensors, f"{block}.{mlp_index}.DenseReluDense", cfg),
             "mlp_norm": scale(f"{block}.{mlp_index}.layer_norm")}
    if name == "decoder":
      layer["cross_attention"] = _attention(tensors, f"{block}.1.EncDecAttention", d, h, k)
      layer["cross_attention_norm"] = scale(f"{block}.1.layer_norm")
    stack[f"layer_{i}"] = layer
  return stack


def to_ablax(hf_config: dict, tensors, cfg: ModelConfig) -> dict:
  """The ablax parameter tree of T5ForConditionalGeneration tensors."""
  del hf_config
  v, d = cfg.vocab_size, cfg.d_model
  for name in UNUSED:
    tensors.discard(name)
  present = [name for name in EMBEDDINGS if name in tensors]
  if not present:
    raise ConversionError(f"{tensors.source}: missing tensor 'shared.weight' (expected shape {(v, d)})")
  embedding_VxD = tensors.take(present[0], (v, d))
  aliases = present[1:] + (["lm_head.weight"] if cfg.tie_embeddings and "lm_head.weight" in tensors else [])
  for name in aliases:
    if not np.array_equal(tensors.take(name, (v, d)), embedding_VxD):
      raise ConversionError(f"{tensors.where(name)}: tensor '{name}' differs from '{present[0]}' but T5 "
                            "ties them")
  params = {"embed": {"embedding": embedding_VxD}, "encoder": _stack(tensors, "encoder", cfg),
            "decoder": _stack(tensors, "decoder", cfg)}
  if not cfg.tie_embeddings:
    # An unscaled head still tied in torch (transformers >= 5 ties by default) is saved without lm_head.
    head_VxD = tensors.take("lm_head.weight", (v, d)) if "lm_head.weight" in tensors else embedding_VxD
    params["decoder"]["lm_head"] = head_VxD.T
  return params


def hf_config(cfg: ModelConfig) -> dict:
  """T5 config.json of an ablax model; ConversionError naming the first key T5 cannot express."""
  needed = {"family": "encoder_decoder", "position": "relative", "norm": "rmsnorm", "norm_position": "pre",
            "use_bias": False, "scale_attention": False, "embed_norm": False, "head_transform": False,
            "head_bias": False, "num_kv_heads": cfg.num_heads, "scale_tied_logits": cfg.tie_embeddings,
            "qk_norm": False, "mlp": "dense"}
  for key, value in needed.items():
    if getattr(cfg, key) != value:
      raise ConversionError(f"config.model.{key}={getattr(cfg, key)!r}, T5 needs {value!r}")
  projections = {ours: ("gated-" if gated else "") + ("gelu" if (gated, act) == (True, "gelu_new") else act)
                 for (gated, act), ours in ACTIVATIONS.items()}
  if cfg.activation not in projections:
    raise ConversionError(f"config.model.activation={cfg.activation!r}, T5 needs one of {', '.join(projections)}")
  return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": cfg.vocab_size,
          "d_model": cfg.d_model, "d_kv": cfg.head_dim, "d_ff": cfg.mlp_dim, "num_layers": cfg.num_layers,
          "num_decoder_layers": cfg.num_layers, "num_heads": cfg.num_heads,
          "relative_attention_num_buckets": cfg.relative_buckets,
          "relative_attention_max_distance": cfg.relative_max_distance, "dropout_rate": cfg.dropout,
          "layer_norm_epsilon": cfg.norm_eps, "feed_forward_proj": projections[cfg.activation],
          "tie_word_embeddings": cfg.tie_embeddings, "is_encoder_decoder": True, "pad_token_id": 0,
          "eos_token_id": 1, "decoder_start_token_id": 0, "torch_dtype": "float32"}


def _stack_to_hf(cfg: ModelConfig, name: str, stack: dict) -> dict:
  d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
  out = {f"{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight": stack["relative_bias"],
         f"{name}.final_layer_norm.weight": stack["final_norm"]["scale"]}

  def attention(prefix, tree):
    for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
      out[f"{prefix}.{theirs}.weight"] = np.reshape(tree[ours], (d, h * k)).T
    out[f"{prefix}.o.weight"] = np.reshape(tree["out"], (h * k, d)).T

  mlp_index = 2 if name == "decoder" else 1
  for i in range(cfg.num_layers):
    block, layer = f"{name}.block.{i}.layer", stack[f"layer_{i}"]
    attention(f"{block}.0.SelfAttention", layer["attention"])
    out[f"{block}.0.layer_norm.weight"] = layer["attention_norm"]["scale"]
    if name == "decoder":
      attention(f"{block}.1.EncDecAttention", layer["cross_attention"])
      out[f"{block}.1.layer_norm.weight"] = layer["cross_attention_norm"]["scale"]
    mlp, prefix = layer["mlp"], f"{block}.{mlp_index}.DenseReluDense"
    if cfg.gated:
      out[f"{prefix}.wi_0.weight"] = np.asarray(mlp["wi_gate"]).T
      out[f"{prefix}.wi_1.weight"] = np.asarray(mlp["wi_up"]).T
    else:
      out[f"{prefix}.wi.weight"] = np.asarray(mlp["wi"]).T
    out[f"{prefix}.wo.weight"] = np.asarray(mlp["wo"]).T
    out[f"{block}.{mlp_index}.layer_norm.weight"] = layer["mlp_norm"]["scale"]
  return out


def to_hf(cfg: ModelConfig, params: dict) -> dict:
  """HF tensor names -> arrays of a T5ForConditionalGeneration checkpoint (tied copies not stored)."""
  out = {"shared.weight": params["embed"]["embedding"], **_stack_to_hf(cfg, "encoder", params["encoder"]),
         **_stack_to_hf(cfg, "decoder", params["decoder"])}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = np.asarray(params["decoder"]["lm_head"]).T
  return {name: np.asarray(array) for name, array in out.items()}


def to_classifier(tensors: dict, kernel_DxC: np.ndarray, bias_C: np.ndarray) -> tuple[str, dict]:
  """Refused: T5ForSequenceClassification reads the decoder's state at the last eos through a dense + tanh layer;
  an encoder-decoder run's head reads the mean of the encoder's states."""
  raise ConversionError("a T5 classification run: T5ForSequenceClassification classifies the decoder's state at "
                        "the last eos through dense + tanh, ablax's head the mean of the encoder's states; no "
                        "Hugging Face class computes it")
