"""Parameter-efficient fine-tuning as transforms of the parameter tree (the model is never forked).

A method says which base parameters train, which new "adapter" parameters it adds, and how the model's
parameters are built from both (`effective`):
  full    every base parameter trains
  freeze  base parameters whose path ("layer_3/mlp/wi_bias") matches a `peft.trainable` regex train
  lora    W + (alpha / r) A B for kernels matching `peft.lora_targets`; A [in..., r], B [r, out...] = 0
          at init; `lora_dropout` drops input features of A (one mask per step, shared by the batch). Training
          never forms A B: the model adds (alpha / r) (x A) B beside each frozen kernel (the "lora" collection);
          only `merge` folds it into W
  ia3     learned rescaling of keys, values (their projection outputs) and the MLP hidden units, folded
          exactly into the key/value kernels and the rows of the MLP output kernel
  prompt  N trainable embeddings prepended to every input (the model's `prefix_NxD` argument)
`split` / `combine` move leaves between the trainable tree (optimizer, gradients) and the frozen one.
"""

import math
import re

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from model.config import ConfigError
from model.families import family

METHODS = ("full", "freeze", "lora", "ia3", "prompt")


def path_str(path) -> str:
  return "/".join(str(p) for p in path)


def split(params: dict, is_trainable) -> tuple[dict, dict]:
  """(trainable, frozen) nested dicts of the leaves whose path string is_trainable / is not."""
  flat = traverse_util.flatten_dict(params)
  trainable = {k: v for k, v in flat.items() if is_trainable(path_str(k))}
  frozen = {k: v for k, v in flat.items() if k not in trainable}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def combine(trainable: dict, frozen: dict) -> dict:
  """The full tree again (inverse of split)."""
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen),
                                       **traverse_util.flatten_dict(trainable)})


def _input_ndim(path: str) -> int:
  """Leading input dims of a kernel: the attention output [H, K, D] has two, every other kernel one."""
  return 2 if path.endswith("attention/out") else 1


class Method:
  """One PEFT method, configured by `config.peft`."""

  def __init__(self, peft_cfg, model_cfg):
    self.cfg, self.model_cfg, self.name = peft_cfg, model_cfg, peft_cfg.method
    if self.name not in METHODS:
      raise ConfigError(f"config.peft.method: expected one of {', '.join(METHODS)}, got {self.name!r}")
    for key in ("trainable", "lora_targets"):
      for pattern in peft_cfg[key]:
        try:
          re.compile(pattern)
        except re.error as e:
          raise ConfigError(f"config.peft.{key}: bad regex {pattern!r} ({e})") from None
    if self.name == "lora" and peft_cfg.lora_rank <= 0:
      raise ConfigError(f"config.peft.lora_rank: expected a positive integer, got {peft_cfg.lora_rank}")
    if self.name in ("ia3", "prompt") and family(model_cfg).seq2seq:
      raise ConfigError(f"config.peft.method: {self.name} is implemented for decoder and encoder models only")
    if self.name == "prompt" and peft_cfg.num_prompt_tokens <= 0:
      raise ConfigError(f"config.peft.num_prompt_tokens: expected a positive integer, "
                        f"got {peft_cfg.num_prompt_tokens}")

  def base_trainable(self, path: str) -> bool:
    """Whether a base parameter trains."""
    if self.name == "full":
      return True
    if self.name == "freeze":
      return any(re.search(p, path) for p in self.cfg.trainable)
    return False

  def lora_paths(self, base: dict) -> list[str]:
    """The kernels LoRA adapts; `base` holds parameters or their logical axes (a PartitionSpec per leaf)."""
    flat = {path_str(k): v for k, v in traverse_util.flatten_dict(base).items()}
    paths = [p for p, v in flat.items() if len(getattr(v, "shape", v)) >= 2 and not p.endswith("embedding")
             and any(re.search(t, p) for t in self.cfg.lora_targets)]
    if not paths:
      raise ConfigError(f"config.peft.lora_targets: {list(self.cfg.lora_targets)} match no kernel")
    return sorted(paths)

  def init_adapters(self, rng, base: dict) -> dict:
    """The new trainable parameters (flat dict keyed by path strings; empty for full and freeze)."""
    cfg, d = self.cfg, self.model_cfg.d_model
    if self.name == "lora":
      flat = {path_str(k): v for k, v in traverse_util.flatten_dict(base).items()}
      adapters = {}
      for i, path in enumerate(self.lora_paths(base)):
        shape, n_in = flat[path].shape, _input_ndim(path)
        fan_in = math.prod(shape[:n_in])
        a = jax.random.normal(jax.random.fold_in(rng, i), (*shape[:n_in], cfg.lora_rank)) / jnp.sqrt(fan_in)
        adapters[path.replace("/", ".")] = {"a": a, "b": jnp.zeros((cfg.lora_rank, *shape[n_in:]))}
      return adapters
    if self.name == "ia3":
      g, k, f = self.model_cfg.num_kv_heads, self.model_cfg.head_dim, self.model_cfg.mlp_dim
      return {f"layer_{i}": {"key": jnp.ones((g, k)), "value": jnp.ones((g, k)), "mlp": jnp.ones((f,))}
              for i in range(self.model_cfg.num_layers)}
    if self.name == "prompt":
      return {"prompt": 0.02 * jax.random.normal(rng, (cfg.num_prompt_tokens, d))}
    return {}

  def adapter_axes(self, base_axes: dict) -> dict:
    """Logical axis names (PartitionSpecs) of init_adapters' tree, from the base parameters' names: LoRA's A
    keeps its kernel's input axes, B its output axes; IA3 scales keys / values [G, K] and MLP units [F]."""
    if self.name == "lora":
      flat = {path_str(k): v for k, v in traverse_util.flatten_dict(base_axes).items()}
      adapters = {}
      for path in self.lora_paths(base_axes):
        names, n_in = tuple(flat[path]), _input_ndim(path)
        adapters[path.replace("/", ".")] = {"a": P(*names[:n_in], None), "b": P(None, *names[n_in:])}
      return adapters
    if self.name == "ia3":
      return {f"layer_{i}": {"key": P("kv_heads", "kv"), "value": P("kv_heads", "kv"), "mlp": P("mlp")}
              for i in range(self.model_cfg.num_layers)}
    if self.name == "prompt":
      return {"prompt": P(None, "embed")}
    return {}

  def effective(self, base: dict, adapters: dict, rng=None, deterministic: bool = True):
    """(the model.apply variables, extra model.apply kwargs) from the base tree and the adapters. LoRA hands the
    kernels over unchanged and its factors as the "lora" collection, nested like the kernels' paths (model/layers.py
    `linear` adds (x A) B); A carries the scale alpha / r and, in training, the dropout mask."""
    if self.name == "lora":
      lora = {}
      for i, (name, ab) in enumerate(sorted(adapters.items())):  # name: the kernel's path with dots
        a = ab["a"]
        if self.cfg.lora_dropout > 0 and not deterministic and rng is not None:
          # Dropping input features of x before x A is dropping rows of A: one [in..., 1] mask, not [B, L, in...].
          keep = jax.random.bernoulli(jax.random.fold_in(rng, 7919 + i), 1 - self.cfg.lora_dropout,
                                      a.shape[:-1] + (1,))
          a = jnp.where(keep, a / (1 - self.cfg.lora_dropout), 0.0)
        lora[tuple(name.split("."))] = {"a": a * (self.cfg.lora_alpha / self.cfg.lora_rank), "b": ab["b"]}
      return {"params": base, "lora": traverse_util.unflatten_dict(lora)}, {}
    if self.name == "ia3":
      base = jax.tree.map(lambda x: x, base)  # a copy to edit
      for layer, scales in adapters.items():
        attention, mlp = base[layer]["attention"], base[layer]["mlp"]
        for name in ("key", "value"):
          attention[name] = attention[name] * scales[name][None]
          if name + "_bias" in attention:
            attention[name + "_bias"] = attention[name + "_bias"] * scales[name]
        mlp["wo"] = mlp["wo"] * scales["mlp"][:, None]
      return {"params": base}, {}
    if self.name == "prompt":
      return {"params": base}, {"prefix_NxD": adapters["prompt"]}
    return {"params": base}, {}

  def merge(self, base: dict, adapters: dict) -> dict:
    """Plain model parameters with the adapters folded in (export, inference at no extra cost)."""
    if self.name == "prompt":
      raise ConfigError("config.peft.method: prompt tuning adds input embeddings and cannot be merged")
    if self.name == "lora":
      flat = traverse_util.flatten_dict(base)
      for name, ab in adapters.items():
        key = tuple(name.split("."))
        delta = jnp.tensordot(ab["a"], ab["b"], axes=1) * (self.cfg.lora_alpha / self.cfg.lora_rank)
        flat[key] = flat[key] + delta.astype(flat[key].dtype)
      return traverse_util.unflatten_dict(flat)
    return self.effective(base, adapters)[0]["params"]
