"""Orbax CheckpointManager around the TrainState and the loader position (JSON); a run's config.json and steps."""

import json
import os

import ml_collections
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves {state, data} under WORKDIR/checkpoints/<step>; restores into an abstract state's shardings."""

  def __init__(self, workdir: str, keep: int):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                         options=options, item_names=("state", "data"))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict) -> None:
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(data_state)))
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state):
    """Returns (state, data_state) of `step`, laid out as `abstract_state` (ShapeDtypeStructs with shardings)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def close(self) -> None:
    self.manager.close()


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config.json of a run directory."""
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path}: no such file; the workdir must be a run directory")
  with open(config_path) as f:
    return ml_collections.ConfigDict(json.load(f))


def resolve_step(workdir: str, step: int | None) -> int:
  """`step` if a checkpoint of it exists in workdir, the latest one for None (or -1)."""
  directory = os.path.join(workdir, "checkpoints")
  steps = sorted(int(name) for name in (os.listdir(directory) if os.path.isdir(directory) else [])
                 if name.isdigit())  # orbax names each finished checkpoint by its step
  chosen = steps[-1] if steps and step in (None, -1) else step
  if chosen not in steps:
    raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint for step {step} (have: {steps})")
  return chosen
