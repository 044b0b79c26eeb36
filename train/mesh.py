"""The device mesh (axes data, fsdp, tensor) and logical-axis rules -> NamedShardings."""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from model.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A mesh of shape (data, fsdp, tensor) from `config.mesh`; data=-1 takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  fsdp, tensor = mesh_cfg.fsdp, mesh_cfg.tensor
  data = mesh_cfg.data if mesh_cfg.data != -1 else len(devices) // max(fsdp * tensor, 1)
  size = data * fsdp * tensor
  # An explicit smaller mesh takes the first devices (single process only: hosts must all take part).
  if min(data, fsdp, tensor) < 1 or size > len(devices) or (size < len(devices) and
                                                             (mesh_cfg.data == -1 or jax.process_count() > 1)):
    raise ConfigError(f"config.mesh: data={mesh_cfg.data} x fsdp={fsdp} x tensor={tensor} does not fit "
                      f"the {len(devices)} available devices")
  devices = devices[:size]
  device_grid = np.asarray(devices).reshape(data, fsdp, tensor)
  return Mesh(device_grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _fit(spec: P, shape, mesh: Mesh) -> P:
  """Replicates the dimensions whose size does not divide by their mesh axes (e.g. 1 kv head, tensor=2)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[name] for name in names)
    fitted.append(axes if names and dim % size == 0 else None)
  return P(*fitted)


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
  """Rows of a [B, L] batch split over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def one_device_mesh() -> Mesh:
  """A 1x1x1 mesh on the first device (loading a run to generate, evaluate or export)."""
  return Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def config_rules(mesh_cfg) -> tuple:
  """config.mesh.rules as the tuple of (logical axis, mesh axes) pairs flax expects."""
  return tuple(tuple(rule) for rule in mesh_cfg.rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)
