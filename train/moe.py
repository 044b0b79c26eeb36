"""The trainer's side of a mixture of experts (model/moe.py): the auxiliary losses from the statistics the layers
sow, auxiliary-loss-free balancing of the router biases, and the metrics a run logs.

A loss function (train/step.token_loss) applies an MoE model with mutable=["moe"] and hands the statistics to
`loss_terms`: they join its sums as "moe" ({layer: sums}, added over microbatches, devices and steps as every sum
is) and "moe_loss_sum", the auxiliary losses in the sums' units: the weight sum times (moe_aux_loss x the mean over
layers of the Switch loss + router_z_loss x the mean over layers of the router's mean log(Z)^2), which the train step
adds to the cross entropy where it takes the gradient. `rebalance` moves each router bias by
moe_bias_update_rate x sign(mean load - the expert's load) after the optimizer's update (DeepSeek-V3: overloaded
experts are chosen less, underloaded more); the optimizer's own update of the bias (zero: no gradient reaches it) is
discarded. `summarize` turns the sums into metrics: per layer the share of pairs each expert got (min, max, and its
entropy over log E: 1 = uniform) and the share dropped; over all layers the Switch loss (1 = uniform), the router's
mean log(Z)^2 and entropy (nats) and the share dropped.

Offers `loss_terms`, `rebalancer`, `rebalance`, `summarize` and `check_config`.
"""

import functools
import math

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from model.config import ConfigError, ModelConfig

SOWN = "/mlp/stats"  # the path of a layer's statistics below its layer ("layer_1/mlp/stats/load")


def layer_stats(sown: dict) -> dict:
  """{"layer_1" (or "decoder/layer_1"): its statistics} of a sown "moe" collection."""
  flat = traverse_util.flatten_dict(sown, sep="/")
  layers = {}
  for path, value in flat.items():
    layer, _, name = path.rpartition(SOWN + "/")
    layers.setdefault(layer, {})[name] = value
  return layers


def loss_terms(cfg: ModelConfig, sown: dict, weight_sum) -> dict:
  """The entries an MoE model adds to a loss function's sums: "moe" and "moe_loss_sum" (see the module doc)."""
  layers = layer_stats(sown)
  mean = lambda name: sum(s[name] / jnp.maximum(s["tokens"], 1.0) for s in layers.values()) / max(len(layers), 1)
  penalty = 0.0
  if cfg.moe_aux_loss:
    penalty += cfg.moe_aux_loss * mean("aux_loss")
  if cfg.router_z_loss:
    penalty += cfg.router_z_loss * mean("z_loss")
  return {"moe": layers, "moe_loss_sum": penalty * weight_sum}


def rebalance(old_params, new_params, moe_sums: dict, rate: float):
  """`new_params` with each router bias at its value in `old_params` + rate * sign(mean load - load)."""
  old, new = (traverse_util.flatten_dict(p, sep="/") for p in (old_params, new_params))
  for layer, stats in moe_sums.items():
    key = f"{layer}/mlp/router_bias"
    if key in new:
      load_E = stats["load"]
      new[key] = old[key] + rate * jnp.sign(jnp.mean(load_E) - load_E)
  return traverse_util.unflatten_dict(new, sep="/")


def rebalancer(run):
  """The train step's `rebalance` of a pretraining Run whose model balances by bias, else None (a fine-tuning run
  keeps its base's biases)."""
  cfg = run.model.cfg
  if run.method is not None or cfg.mlp != "moe" or cfg.moe_bias_update_rate == 0:
    return None
  return functools.partial(rebalance, rate=cfg.moe_bias_update_rate)


def summarize(moe_sums: dict, prefix: str) -> dict:
  """Metrics of the summed statistics of every MoE layer (see the module doc), named prefix/moe/..."""
  metrics, totals = {}, {"pairs": 0.0, "dropped": 0.0, "tokens": 0.0}
  means = {"aux_loss": [], "z_loss": [], "entropy": []}
  for layer in sorted(moe_sums, key=_natural):
    stats = {name: np.asarray(value, np.float64) for name, value in moe_sums[layer].items()}
    load_E, tokens = stats["load"], max(float(stats["tokens"]), 1.0)
    pairs = max(float(load_E.sum()), 1.0)
    share_E = load_E / pairs
    entropy = -float(np.sum(share_E * np.log(np.maximum(share_E, 1e-30))))
    name = f"{prefix}/moe/{layer}"
    metrics.update({f"{name}/load_min": float(share_E.min()), f"{name}/load_max": float(share_E.max()),
                    f"{name}/load_entropy": entropy / math.log(len(load_E)),
                    f"{name}/dropped": float(stats["dropped"]) / pairs})
    totals["pairs"] += pairs
    totals["dropped"] += float(stats["dropped"])
    for key in means:
      means[key].append(float(stats[key]) / tokens)
  if not moe_sums:
    return metrics
  metrics.update({f"{prefix}/moe/aux_loss": float(np.mean(means["aux_loss"])),
                  f"{prefix}/moe/router_z_loss": float(np.mean(means["z_loss"])),
                  f"{prefix}/moe/router_entropy": float(np.mean(means["entropy"])),
                  f"{prefix}/moe/dropped": totals["dropped"] / max(totals["pairs"], 1.0)})
  return metrics


def _natural(layer: str):
  """layer_2 before layer_10: the path with its numbers as numbers."""
  return [int(part) if part.isdigit() else part for part in layer.replace("_", "/").split("/")]


def check_config(config) -> None:
  """ConfigError for settings that cannot go together across sections."""
  model = config.model
  if model.get("mlp") == "moe" and model.get("moe_bias_update_rate", 0) > 0 and \
      config.train.optimizer == "schedule_free_adamw":
    raise ConfigError("config.model.moe_bias_update_rate: schedule_free_adamw (config.train.optimizer) evaluates "
                      "parameters from its own iterates, which the bias balancing steps outside of; use another "
                      "optimizer or moe_bias_update_rate=0")
