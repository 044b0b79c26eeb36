"""Orbax CheckpointManager around the TrainState and the loader position (JSON)."""

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves {state, data} under WORKDIR/checkpoints/<step>; restores into given shardings."""

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

  def restore(self, step: int, state_like, shardings):
    """Returns (state, data_state) of `step`, laid out with `shardings`."""
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            state_like, shardings)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def close(self) -> None:
    self.manager.close()
