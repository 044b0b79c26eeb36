"""Several processes as one job (jax.distributed): joining it, and the few things one process does for all.

  python -m train.pretrain ... --coordinator_address=HOST:PORT --num_processes=N --process_id=I
  python -m train.pretrain ... --distributed    # SLURM, Cloud TPU or Open MPI: found from the environment

Every process runs the same command; together they form one mesh of all their devices. Process 0 writes the
run's small files (config.json, tokenizer, run_info.json, metrics, samples) and holds the workdir's lock; every
process reads its own slice of each batch, and orbax writes each process's shards of a checkpoint. Offers
`define_flags`, `initialize`, `is_writer`, `barrier`, `writer_first`, `agree` and `gather`.
"""

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils


def define_flags() -> None:
  """The command-line flags of a multi-process job (entrypoints only)."""
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, to join a job of several processes.")
  flags.DEFINE_integer("num_processes", None, "Processes in the job (with --coordinator_address).")
  flags.DEFINE_integer("process_id", None, "This process' index in the job, 0 to num_processes - 1.")
  flags.DEFINE_bool("distributed", False, "Join a job whose processes the cluster (SLURM, TPU, Open MPI) names.")


def initialize() -> None:
  """Joins the job the flags describe (nothing to do for one process); call before anything touches a device."""
  f = flags.FLAGS
  if not (f.coordinator_address or f.distributed):
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices of several processes
  jax.distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)


def is_writer() -> bool:
  """Whether this process writes the run's files."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process of the job reaches the barrier of this name."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def writer_first(name: str, fn):
  """fn() on process 0, then on the others (which then read what process 0 wrote, e.g. a tokenizer)."""
  if is_writer():
    result = fn()
    barrier(name)
    return result
  barrier(name)
  return fn()


def agree(flag: bool) -> bool:
  """True on every process when it is True on any (e.g. a SIGTERM that reached some of them)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def gather(tree):
  """Every leaf whole on every process, as numpy arrays (the parameters to sample from on the host)."""
  return jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), tree)
