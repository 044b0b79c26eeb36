"""BERT (`BertForMaskedLM`) <-> ablax encoder: learned positions, post-LayerNorm, an embedding norm, and the
masked-LM head (dense, activation, LayerNorm, tied or untied output projection plus a vocabulary bias).

ablax has no token types: on import token_type_embeddings[0] is folded into the position table, which is
exact for inputs of token type 0 (the only kind ablax feeds); export writes zeros for the token types, so
ablax -> HF -> ablax is bit-exact. The pooler and the next-sentence head are not part of the masked LM and
are skipped. torch Linear stores weights [out, in]; ablax stores [in, ...out], so every matrix is transposed.
"""

import numpy as np

from model.config import ModelConfig
from model.hf.common import ConversionError, check_settings, choice, config_value

MODEL_TYPES = ("bert",)
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
UNUSED = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids")  # under the bert. prefix
UNUSED_HEADS = ("cls.seq_relationship.weight", "cls.seq_relationship.bias")       # next-sentence prediction
# BertForSequenceClassification reads [CLS] through its pooler, tanh(W x + b); ablax's head reads [CLS] itself. The
# export's pooler is POOLER_SCALE * identity, where tanh is linear to (1e-4 |x|)^2 / 3 relative (|x| < 10: 3e-7),
# and its classifier the head divided by POOLER_SCALE.
POOLER_SCALE = 1e-4



def model_section(hf_config: dict) -> dict:
  """ablax config.model keys of a BERT config.json."""
  unsupported = {"position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False}
  check_settings(hf_config, unsupported)
  activation = choice(hf_config, "hidden_act", "gelu", ACTIVATIONS)
  return {"family": "encoder", "num_layers": config_value(hf_config, "num_hidden_layers"),
          "d_model": config_value(hf_config, "hidden_size"), "num_heads": config_value(hf_config, "num_attention_heads"),
          "num_kv_heads": 0, "head_dim": 0, "mlp_dim": config_value(hf_config, "intermediate_size"),
          "activation": activation, "norm": "layernorm", "norm_position": "post",
          "norm_eps": config_value(hf_config, "layer_norm_eps", 1e-12), "position": "learned",
          "max_len": config_value(hf_config, "max_position_embeddings"), "use_bias": True, "embed_norm": True,
          "head_transform": True, "head_bias": True,
          "tie_embeddings": bool(hf_config.get("tie_word_embeddings", True))}


def vocab_size(hf_config: dict) -> int:
  return config_value(hf_config, "vocab_size")


def _norm(tensors, name: str, d: int) -> dict:
  return {"scale": tensors.take(name + ".weight", (d,)), "bias": tensors.take(name + ".bias", (d,))}


def _same_or_error(tensors, name: str, shape: tuple, expected: np.ndarray, other: str) -> None:
  """Takes an alias of a tied tensor if the checkpoint stores it; it must equal the tensor it is tied to."""
  if name in tensors and not np.array_equal(tensors.take(name, shape), expected):
    raise ConversionError(f"{tensors.where(name)}: tensor '{name}' differs from '{other}' but BERT ties them")


def to_ablax(hf_config: dict, tensors, cfg: ModelConfig) -> dict:
  """The ablax parameter tree of BertForMaskedLM tensors (or BertForPreTraining's, heads it lacks skipped)."""
  v, d, h, k, f = cfg.vocab_size, cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
  p = "bert."
  for name in UNUSED:
    tensors.discard(p + name)
  for name in UNUSED_HEADS:
    tensors.discard(name)
  embedding_VxD = tensors.take(p + "embeddings.word_embeddings.weight", (v, d))
  types = hf_config.get("type_vocab_size", 2)
  position_LxD = tensors.take(p + "embeddings.position_embeddings.weight", (cfg.max_len, d))
  if types:
    position_LxD = position_LxD + tensors.take(p + "embeddings.token_type_embeddings.weight", (types, d))[0]
  params = {"embed": {"embedding": embedding_VxD}, "position_embedding": position_LxD,
            "embed_norm": _norm(tensors, p + "embeddings.LayerNorm", d)}
  for i in range(cfg.num_layers):
    layer = f"{p}encoder.layer.{i}."
    linear = lambda name, out_dim, in_dim: tensors.take(layer + name + ".weight", (out_dim, in_dim)).T
    bias = lambda name, size: tensors.take(layer + name + ".bias", (size,))
    attention = {"out": linear("attention.output.dense", d, h * k).reshape(h, k, d),
                 "out_bias": bias("attention.output.dense", d)}
    for name in ("query", "key", "value"):
      attention[name] = linear(f"attention.self.{name}", h * k, d).reshape(d, h, k)
      attention[name + "_bias"] = bias(f"attention.self.{name}", h * k).reshape(h, k)
    params[f"layer_{i}"] = {
        "attention": attention,
        "attention_norm": _norm(tensors, layer + "attention.output.LayerNorm", d),
        "mlp": {"wi": linear("intermediate.dense", f, d), "wi_bias": bias("intermediate.dense", f),
                "wo": linear("output.dense", d, f), "wo_bias": bias("output.dense", d)},
        "mlp_norm": _norm(tensors, layer + "output.LayerNorm", d),
    }
  head = "cls.predictions."
  params["head_transform"] = tensors.take(head + "transform.dense.weight", (d, d)).T
  params["head_transform_bias"] = tensors.take(head + "transform.dense.bias", (d,))
  params["head_norm"] = _norm(tensors, head + "transform.LayerNorm", d)
  params["head_bias"] = tensors.take(head + "bias", (v,))
  _same_or_error(tensors, head + "decoder.bias", (v,), params["head_bias"], head + "bias")
  if cfg.tie_embeddings:  # save_pretrained drops the tied copy; other exports keep it
    _same_or_error(tensors, head + "decoder.weight", (v, d), embedding_VxD, p + "embeddings.word_embeddings.weight")
  else:
    params["lm_head"] = tensors.take(head + "decoder.weight", (v, d)).T
  return params


def hf_config(cfg: ModelConfig) -> dict:
  """BERT config.json of an ablax model; ConversionError naming the first key BERT cannot express."""
  needed = {"family": "encoder", "position": "learned", "norm": "layernorm", "norm_position": "post",
            "use_bias": True, "embed_norm": True, "head_transform": True, "head_bias": True,
            "scale_attention": True, "scale_tied_logits": False, "num_kv_heads": cfg.num_heads,
            "head_dim": cfg.d_model // cfg.num_heads, "qk_norm": False, "mlp": "dense"}
  for key, value in needed.items():
    if getattr(cfg, key) != value:
      raise ConversionError(f"config.model.{key}={getattr(cfg, key)!r}, BERT needs {value!r}")
  hidden_act = {ours: theirs for theirs, ours in ACTIVATIONS.items()}
  if cfg.activation not in hidden_act:
    raise ConversionError(f"config.model.activation={cfg.activation!r}, BERT needs one of {', '.join(hidden_act)}")
  return {"architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "intermediate_size": cfg.mlp_dim, "hidden_act": hidden_act[cfg.activation],
          "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
          "max_position_embeddings": cfg.max_len, "type_vocab_size": 2, "layer_norm_eps": cfg.norm_eps,
          "position_embedding_type": "absolute", "tie_word_embeddings": cfg.tie_embeddings, "pad_token_id": 0,
          "torch_dtype": "float32"}


def to_hf(cfg: ModelConfig, params: dict) -> dict:
  """HF tensor names -> arrays of a BertForMaskedLM checkpoint (a tied decoder weight is not stored)."""
  d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
  p, head = "bert.", "cls.predictions."
  norm = lambda name, tree: {name + ".weight": tree["scale"], name + ".bias": tree["bias"]}
  out = {p + "embeddings.word_embeddings.weight": params["embed"]["embedding"],
         p + "embeddings.position_embeddings.weight": params["position_embedding"],
         p + "embeddings.token_type_embeddings.weight": np.zeros((2, d), np.float32),
         **norm(p + "embeddings.LayerNorm", params["embed_norm"]),
         head + "transform.dense.weight": np.asarray(params["head_transform"]).T,
         head + "transform.dense.bias": params["head_transform_bias"],
         **norm(head + "transform.LayerNorm", params["head_norm"]),
         head + "bias": params["head_bias"]}
  if not cfg.tie_embeddings:
    out[head + "decoder.weight"] = np.asarray(params["lm_head"]).T
  for i in range(cfg.num_layers):
    layer, tree = f"{p}encoder.layer.{i}.", params[f"layer_{i}"]
    attention, mlp = tree["attention"], tree["mlp"]
    for name in ("query", "key", "value"):
      out[f"{layer}attention.self.{name}.weight"] = np.reshape(attention[name], (d, h * k)).T
      out[f"{layer}attention.self.{name}.bias"] = np.reshape(attention[name + "_bias"], (h * k,))
    out[layer + "attention.output.dense.weight"] = np.reshape(attention["out"], (h * k, d)).T
    out[layer + "attention.output.dense.bias"] = attention["out_bias"]
    out.update(norm(layer + "attention.output.LayerNorm", tree["attention_norm"]))
    out[layer + "intermediate.dense.weight"] = np.asarray(mlp["wi"]).T
    out[layer + "intermediate.dense.bias"] = mlp["wi_bias"]
    out[layer + "output.dense.weight"] = np.asarray(mlp["wo"]).T
    out[layer + "output.dense.bias"] = mlp["wo_bias"]
    out.update(norm(layer + "output.LayerNorm", tree["mlp_norm"]))
  return {name: np.asarray(array) for name, array in out.items()}


def to_classifier(tensors: dict, kernel_DxC: np.ndarray, bias_C: np.ndarray) -> tuple[str, dict]:
  """BertForSequenceClassification's tensors: the encoder's without the masked-LM head, a pooler that passes
  [CLS]'s state on scaled by POOLER_SCALE, and the classifier (the head, scaled back)."""
  d = kernel_DxC.shape[0]
  body = {name: array for name, array in tensors.items() if not name.startswith("cls.")}
  return "BertForSequenceClassification", {
      **body, "bert.pooler.dense.weight": POOLER_SCALE * np.eye(d, dtype=np.float32),
      "bert.pooler.dense.bias": np.zeros(d, np.float32),
      "classifier.weight": np.ascontiguousarray(kernel_DxC.T / POOLER_SCALE), "classifier.bias": bias_C}
