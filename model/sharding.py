"""Logical sharding without a mesh argument: `fit` (the rule that replicates what does not divide), `constrain`
(a sharding constraint on an activation, by logical axis names) and `by_rows` (a function of each device's rows).

The model names the axes of its key activations (embedding output, q/k/v, the MLP's hidden layer, logits); the
training code enters the mesh and the logical rules (`jax.sharding.use_abstract_mesh` and
`flax.linen.logical_axis_rules`) around the traced step, and `constrain` turns the names into a
`with_sharding_constraint` there. Outside such a context (generation, tests, one device) it does nothing.
Activation names: batch (rows), length, activation_embed (D of activations: replicated by default, while the
"embed" of parameters is sharded over fsdp), heads, kv_heads, kv, mlp, vocab; a mixture of experts' token buffers
[B, E, C, D]: batch_no_expert (their rows, off the expert axis) and expert.
"""

import math

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P


def fit(spec: P, shape, mesh_shape: dict) -> P:
  """`spec` with each dimension whose size does not divide by its mesh axes replicated instead (e.g. 1 kv head
  over tensor=2), and a mesh axis already used by an earlier dimension dropped."""
  fitted, used = [], set()
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = tuple(name for name in ((axes,) if isinstance(axes, str) else tuple(axes or ())) if name not in used)
    size = math.prod(mesh_shape[name] for name in names)
    keep = bool(names) and dim % size == 0
    fitted.append((names[0] if len(names) == 1 else names) if keep else None)
    used.update(names if keep else ())
  return P(*fitted)


def constrain(x, axes: tuple):
  """x constrained to the sharding its logical `axes` map to under the current mesh and rules (a no-op without
  them). Names without a rule are replicated."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or not rules:
    return x
  table = {name: tuple(axes) if isinstance(axes, list) else axes for name, axes in rules}
  spec = P(*(table.get(name) if name else None for name in axes))
  return jax.lax.with_sharding_constraint(x, fit(spec, x.shape, dict(mesh.shape)))


def by_rows(fn, rows: tuple, whole: tuple):
  """fn(*rows, *whole) computed a device's rows at a time: under a mesh and rules, a shard_map that splits the
  leading (batch) dim of every array in `rows` as the "batch" rule says and hands every device all of `whole`
  (GSPMD gathers what is sharded); fn's output is rows alike. Outside a mesh, fn itself. For a computation whose
  layout GSPMD cannot split by itself (a sort and grouped matmuls over each device's tokens: model/moe.py)."""
  mesh, rules = jax.sharding.get_abstract_mesh(), nn.get_logical_axis_rules()
  if mesh.empty or mesh.size == 1 or not rules:
    return fn(*rows, *whole)
  table = {name: tuple(axes) if isinstance(axes, list) else axes for name, axes in rules}
  row_spec = fit(P(table.get("batch")), rows[0].shape[:1], dict(mesh.shape))
  specs = (*(row_spec for _ in rows), *(jax.tree.map(lambda _: P(), x) for x in whole))
  args = (*rows, *whole)
  if not mesh.are_all_axes_auto:  # explicit axes: shard_map wants its inputs already laid out as it splits them
    args = jax.tree.map(jax.reshard, args, specs)
  return jax.shard_map(fn, in_specs=specs, out_specs=row_spec, check_vma=False)(*args)
