"""The device mesh (axes data, fsdp, expert, tensor; several slices) and logical-axis rules -> NamedShardings, and
the context in which the model's activation constraints act. The expert axis holds a mixture of experts' experts
(model/moe.py) and splits the batch like data elsewhere; with no mixture it is one more data-parallel axis."""

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from model import sharding
from model.config import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # expert last: moving a row's tokens to their experts crosses it alone


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A mesh of shape (data, fsdp, expert, tensor) from `config.mesh`; data=-1 takes the remaining devices. The
  devices are laid out by jax.make_mesh, which knows the physical topology (TPU torus, GPU NVLink islands); with
  `mesh_cfg.slices` > 1 the data axis spans slices (TPU slices, or GPU hosts) joined over the data-center
  network, the fsdp, expert and tensor axes staying within a slice (a hybrid mesh)."""
  devices = list(jax.devices() if devices is None else devices)
  fsdp, expert, tensor, slices = mesh_cfg.fsdp, mesh_cfg.get("expert", 1), mesh_cfg.tensor, mesh_cfg.get("slices", 1)
  data = mesh_cfg.data if mesh_cfg.data != -1 else len(devices) // max(fsdp * expert * tensor, 1)
  size = data * fsdp * expert * tensor
  # An explicit smaller mesh takes the first devices (single process only: hosts must all take part).
  if min(data, fsdp, expert, tensor) < 1 or size > len(devices) or (
      size < len(devices) and (mesh_cfg.data == -1 or jax.process_count() > 1)):
    raise ConfigError(f"config.mesh: data={mesh_cfg.data} x fsdp={fsdp} x expert={expert} x tensor={tensor} does "
                      f"not fit the {len(devices)} available devices")
  if slices < 1 or data % slices:
    raise ConfigError(f"config.mesh.slices: {slices} must be >= 1 and divide the data axis ({data})")
  devices = devices[:size]
  shape, axis_types = (data, fsdp, expert, tensor), (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if slices > 1:
    granule = {"process_is_granule": not hasattr(devices[0], "slice_index") or devices[0].slice_index is None}
    device_grid = mesh_utils.create_hybrid_device_mesh((data // slices, fsdp, expert, tensor), (slices, 1, 1, 1),
                                                       devices, **granule)
    return Mesh(device_grid, MESH_AXES, axis_types=axis_types)
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  except (ValueError, NotImplementedError):  # a subset of a topology's devices has no physical layout to follow
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def _fit(spec: P, shape, mesh: Mesh) -> P:
  """Replicates the dimensions whose size does not divide by their mesh axes (e.g. 1 kv head, tensor=2)."""
  return sharding.fit(spec, shape, dict(mesh.shape))


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules):
  """The mesh and logical rules under which the model's activation constraints (model/sharding.py) act; entered
  inside a traced step."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    yield


def logical_shardings(axes_tree, shapes_tree, mesh: Mesh, rules):
  """NamedShardings from a tree of PartitionSpecs of logical axis names and a tree of the leaves' shapes."""
  def to_sharding(logical_spec, leaf):
    mesh_spec = nn.logical_to_mesh_axes(tuple(logical_spec), rules)
    return NamedSharding(mesh, _fit(mesh_spec, leaf.shape, mesh))

  return jax.tree.map(to_sharding, axes_tree, shapes_tree, is_leaf=lambda x: isinstance(x, P))


def tree_shardings(boxed_tree, mesh: Mesh, rules):
  """NamedShardings for a tree whose leaves are nn.LogicallyPartitioned (abstract or concrete)."""
  return logical_shardings(nn.get_partition_spec(boxed_tree), nn.meta.unbox(boxed_tree), mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows of a [B, L] batch split over the data-parallel axes (those the mesh has)."""
  return NamedSharding(mesh, P(tuple(axis for axis in BATCH_AXES if axis in mesh.shape)))


def one_device_mesh() -> Mesh:
  """A 1x1x1x1 mesh on the first device (loading a run to generate, evaluate or export)."""
  return Mesh(np.asarray(jax.devices()[:1]).reshape((1,) * len(MESH_AXES)), MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def config_rules(mesh_cfg) -> tuple:
  """config.mesh.rules as the tuple of (logical axis, mesh axes) pairs flax expects."""
  return tuple(tuple(rule) for rule in mesh_cfg.rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)
