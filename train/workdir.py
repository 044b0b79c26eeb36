"""A run's workdir: its config.json is written once; a rerun must match it (resume), never overwrite it."""

import json
import os

from model.config import ConfigError

# Keys that may differ when a run is resumed: they change how long or how often, not what is trained
# (the mesh may change too: a checkpoint restores into any sharding).
RESUMABLE_KEYS = ("train.steps", "train.eval_every", "train.eval_batches", "train.checkpoint_every",
                  "train.keep_checkpoints", "train.log_every", "train.num_samples", "train.sample_tokens",
                  "train.sample_temperature", "train.sample_top_k", "train.sample_prompt")


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def prepare_workdir(config, workdir: str) -> None:
  """Creates workdir and saves config.json, or checks that an existing run was made with this config."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json())
  if os.path.exists(path):
    with open(path) as f:
      saved = _flatten(json.load(f))
    differing = [k for k, v in _flatten(current).items()
                 if k not in RESUMABLE_KEYS and not k.startswith("mesh.") and saved.get(k, v) != v]
    if differing:
      key = differing[0]
      raise ConfigError(f"{path}: this workdir holds a run made with config.{key}={saved[key]!r}, "
                        f"not {_flatten(current)[key]!r}; resume with the same config or use another --workdir")
  with open(path, "w") as f:
    json.dump(current, f, indent=2)
