"""Mixtral (`MixtralForCausalLM`) <-> ablax decoder with a mixture of experts in every layer: Llama's attention,
norms and embeddings (model/hf/llama.py), and a router of softmax_topk with the top probabilities renormalised
(config.model.router) over num_local_experts SwiGLU experts, dropless.

An expert j of layer i is `model.layers.i.block_sparse_moe.experts.j.w1` (gate [F, D]), `w3` (up [F, D]) and `w2`
(down [D, F]); the router `block_sparse_moe.gate` [E, D]: the layout of the Hub's checkpoints and of what
transformers 5 saves. transformers 5's in-memory layout (`mlp.experts.gate_up_proj` [E, 2F, D],
`mlp.experts.down_proj` [E, D, F], `mlp.gate.weight`) is read too. ablax stacks the experts: wi_gate, wi_up [E, D, F],
wo [E, F, D], router [D, E].

Refused: top-1 routing (transformers gates the one expert by 1, ablax by its probability, as the Switch
Transformer), sliding-window attention, and, on export, what Mixtral lacks (shared experts, dense layers between
mixtures, a sigmoid router, balancing biases). A model trained with a capacity factor exports as it is and runs
dropless in transformers. transformers' router_aux_loss_coef multiplies X times ablax's Switch loss (it counts a
token's X choices against 1), so moe_aux_loss = X * router_aux_loss_coef.
"""

import dataclasses

import numpy as np

from model.config import ModelConfig
from model.hf import llama
from model.hf.common import PLAIN_DECODER, ConversionError, config_value

MODEL_TYPES = ("mixtral",)
# MixtralConfig's defaults where they differ from Llama's (a config.json may leave them out).
DEFAULTS = {"max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
            "tie_word_embeddings": False, "num_local_experts": 8, "num_experts_per_tok": 2,
            "router_aux_loss_coef": 0.001}


def model_section(hf_config: dict) -> dict:
  """ablax config.model keys of a Mixtral config.json."""
  hf_config = {**DEFAULTS, **hf_config}
  if hf_config.get("sliding_window") is not None:
    raise ConversionError(f"config.json: sliding_window={hf_config['sliding_window']} is not supported "
                          "(sliding-window attention)")
  experts, top = config_value(hf_config, "num_local_experts"), config_value(hf_config, "num_experts_per_tok")
  if top < 2:
    raise ConversionError(f"config.json: num_experts_per_tok={top} is not supported (transformers gates a single "
                          "expert by 1, ablax by its probability)")
  section = llama.model_section(hf_config)
  return {**section, "mlp": "moe", "num_experts": experts, "experts_per_token": top, "router": "softmax_topk",
          "moe_every": 1, "shared_experts": 0, "moe_capacity_factor": 0.0,
          "moe_aux_loss": top * float(hf_config["router_aux_loss_coef"])}


def vocab_size(hf_config: dict) -> int:
  return llama.vocab_size(hf_config)


def experts(tensors, cfg: ModelConfig, layer: str) -> dict:
  """The ablax mixture of experts of one layer's Mixtral tensors (the Hub's layout or transformers 5's)."""
  d, f, e = cfg.d_model, cfg.mlp_dim, cfg.num_experts
  hub = layer + "block_sparse_moe."
  if hub + "gate.weight" in tensors:
    stack = lambda name, shape: np.stack([tensors.take(f"{hub}experts.{j}.{name}.weight", shape).T for j in range(e)])
    return {"router": tensors.take(hub + "gate.weight", (e, d)).T, "wi_gate": stack("w1", (f, d)),
            "wi_up": stack("w3", (f, d)), "wo": stack("w2", (d, f))}
  fused = layer + "mlp."
  gate_up_ExGxD = tensors.take(fused + "experts.gate_up_proj", (e, 2 * f, d))
  return {"router": tensors.take(fused + "gate.weight", (e, d)).T,
          "wi_gate": gate_up_ExGxD[:, :f].transpose(0, 2, 1), "wi_up": gate_up_ExGxD[:, f:].transpose(0, 2, 1),
          "wo": tensors.take(fused + "experts.down_proj", (e, d, f)).transpose(0, 2, 1)}


def experts_to_hf(cfg: ModelConfig, moe: dict, layer: str) -> dict:
  """One layer's Mixtral tensors (the Hub's layout) of an ablax mixture of experts."""
  hub = layer + "block_sparse_moe."
  out = {hub + "gate.weight": np.asarray(moe["router"]).T}
  for j in range(cfg.num_experts):
    for ours, theirs in (("wi_gate", "w1"), ("wi_up", "w3"), ("wo", "w2")):
      out[f"{hub}experts.{j}.{theirs}.weight"] = np.asarray(moe[ours][j]).T
  return out


def to_ablax(hf_config: dict, tensors, cfg: ModelConfig) -> dict:
  """The ablax parameter tree of Mixtral tensors."""
  return llama.to_ablax(hf_config, tensors, cfg, mlp=experts)


def hf_config(cfg: ModelConfig) -> dict:
  """Mixtral config.json of an ablax model; ConversionError naming the first key Mixtral cannot express."""
  needed = {"family": "decoder", "position": "rope", "norm": "rmsnorm", "norm_position": "pre",
            "activation": "swiglu", "use_bias": False, **PLAIN_DECODER, "mlp": "moe", "moe_every": 1,
            "shared_experts": 0, "router": "softmax_topk", "moe_bias_update_rate": 0.0}
  for key, value in needed.items():
    if getattr(cfg, key) != value:
      raise ConversionError(f"config.model.{key}={getattr(cfg, key)!r}, Mixtral needs {value!r}")
  if cfg.experts_per_token < 2:
    raise ConversionError(f"config.model.experts_per_token={cfg.experts_per_token}, Mixtral needs at least 2 "
                          "(it gates a single expert by 1)")
  config = llama.hf_config(dataclasses.replace(cfg, mlp="dense"))
  for key in ("attention_bias", "mlp_bias"):
    del config[key]
  return {**config, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
          "num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.experts_per_token,
          "router_aux_loss_coef": cfg.moe_aux_loss / cfg.experts_per_token, "router_jitter_noise": 0.0,
          "output_router_logits": False, "sliding_window": None}


def to_hf(cfg: ModelConfig, params: dict) -> dict:
  """HF tensor names -> arrays of a Mixtral checkpoint."""
  return llama.to_hf(cfg, params, mlp=experts_to_hf)


def to_classifier(tensors: dict, kernel_DxC, bias_C) -> tuple[str, dict]:
  """MixtralForSequenceClassification's tensors: Llama's layout (the last non-padding token, a bias-free score)."""
  return llama.to_classifier(tensors, kernel_DxC, bias_C, "MixtralForSequenceClassification")
