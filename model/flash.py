"""Fused attention kernels (flash attention: the [L, L] scores live only in the chip's fast memory, block by block),
as config.model.attention_impl chooses: `splash_attention` (TPU: Pallas's splash attention) and `cudnn_attention`
(GPU: cuDNN's flash attention for rows of one sequence, Pallas's Triton flash attention for packed rows).

Both compute what model/attention.einsum_attention computes for self-attention within segments, causal or
bidirectional, without a bias or dropout; they take and return the model's layout [B, L, H, K] (G <= H key/value
heads, head h reading key/value head h // R) and differentiate through the kernels' own backward passes. A token
attends the keys of its own segment id, so padding (segment 0) attends padding where einsum's mask lets it attend
nothing: its output differs, but no token of a segment reads it and its loss weight is 0.

Under a mesh (the abstract mesh and logical rules the training code enters, read as model/sharding.py reads them)
a Pallas kernel runs under shard_map, rows split as the "batch" rule says and heads as "kv_heads" (else "heads")
says; without one it is called directly. Where the program runs on CPUs the Pallas kernels run interpreted:
correct and slow (tests; `INTERPRET` forces either way).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as triton_attention
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from model.config import ConfigError
from model.precision import on_cpu
from model.sharding import fit

INTERPRET: bool | None = None  # None: interpret the Pallas kernels exactly when the program runs on CPUs
SPLASH_BLOCKS = (512, 256, 128)  # splash tiles along the sequence, largest first (a tile must divide the length)
TRITON_BLOCK = 128  # the Triton kernel's forward tile; the length is padded to a multiple of it


def interpret() -> bool:
  """Whether the Pallas kernels run in Pallas's interpreter (plain XLA operations) rather than compiled."""
  return on_cpu() if INTERPRET is None else INTERPRET


def _platform() -> str:
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform
  return jax.default_backend()


def _require(impl: str, platforms: tuple):
  """A kernel compiled for another accelerator than its own is a config error, not a lowering traceback."""
  platform = _platform()
  if platform != "cpu" and platform not in platforms:
    raise ConfigError(f"config.model.attention_impl: {impl} runs on {' / '.join(platforms)} (or interpreted on "
                      f"CPU), not on {platform}; use einsum or the kernel of that platform")


def splash_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, causal: bool, divisor: float | None):
  """Self-attention through Pallas's splash attention (TPU). `segment_ids_BxL` None: one sequence a row.

  Queries are divided by `divisor` before the kernel (it has no scale of its own); the length is padded to a
  multiple of the tile, the padding in segment 0."""
  _require("splash", ("tpu",))
  if divisor is not None:
    q_BxLxHxK = q_BxLxHxK / jnp.asarray(divisor, q_BxLxHxK.dtype)
  length = q_BxLxHxK.shape[1]
  block = min(SPLASH_BLOCKS, key=lambda b: (-(-length // b) * b, -b))  # the least padding, then the largest tile
  local = functools.partial(_splash_local, causal, block, interpret())
  return _over_mesh(local, q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, block)


def cudnn_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, causal: bool, divisor: float | None):
  """Self-attention on GPUs. Without segment ids (one sequence a row): cuDNN's flash attention through
  jax.nn.dot_product_attention, causal by `is_causal` and no mask (a mask would become a dense bias there). With
  them: Pallas's Triton kernel, which masks by segment id itself (cuDNN's query / key lengths describe one
  sequence a row, not several). On CPUs both cases take the Triton kernel, interpreted: cuDNN does not trace there.
  """
  _require("cudnn", ("gpu", "cuda"))
  scale = 1.0 / (divisor or 1.0)
  if segment_ids_BxL is None and not interpret():
    return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, scale=scale, is_causal=causal,
                                        implementation="cudnn")
  local = functools.partial(_triton_local, causal, scale, interpret())
  return _over_mesh(local, q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, TRITON_BLOCK)


def _over_mesh(local, q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, multiple: int):
  """`local`(q [B, L, G, R, K], k, v [B, L, G, K], segment ids [B, L]) over the rows and heads of the mesh in
  context (directly without one), the length padded to a multiple of `multiple`. Returns [B, L, H, K]."""
  batch, length, h, k = q_BxLxHxK.shape
  g = k_BxLxGxK.shape[2]
  padded = -(-length // multiple) * multiple
  if padded != length:
    pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))
    if segment_ids_BxL is None:  # padding must not be attended: it gets segment 0, the tokens segment 1
      segment_ids_BxL = jnp.ones((batch, length), jnp.int32)
    q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL = map(pad, (q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL))
  q_BxLxGxRxK = q_BxLxHxK.reshape(batch, padded, g, h // g, k)
  args = (q_BxLxGxRxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
  mesh, rules = jax.sharding.get_abstract_mesh(), nn.get_logical_axis_rules()
  if mesh.empty or mesh.size == 1 or not rules:
    out_BxLxGxRxK = local(*args)
  else:
    q_spec, kv_spec = _specs(q_BxLxGxRxK.shape, dict(mesh.shape), rules)
    specs = (q_spec, kv_spec, kv_spec, P(q_spec[0]))
    if not mesh.are_all_axes_auto:  # explicit axes: shard_map wants its inputs already laid out as it splits them
      args = tuple(None if x is None else jax.reshard(x, s) for x, s in zip(args, specs))
    out_BxLxGxRxK = jax.shard_map(local, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)
  return out_BxLxGxRxK.reshape(batch, padded, h, k)[:, :length]


def _specs(q_shape, mesh_shape: dict, rules):
  """PartitionSpecs of q [B, L, G, R, K] and of k, v [B, L, G, K]: rows by the "batch" rule, the key/value
  groups by "kv_heads"; where G does not divide (G = 1: MQA), the heads of a group by "heads" instead."""
  table = {name: tuple(axes) if isinstance(axes, list) else axes for name, axes in rules}
  batch, length, g, r, _ = q_shape
  kv_spec = fit(P(table.get("batch"), None, table.get("kv_heads")), (batch, length, g), mesh_shape)
  heads = None if kv_spec[2] is not None else table.get("heads")
  q_spec = fit(P(kv_spec[0], None, kv_spec[2], heads), (batch, length, g, r), mesh_shape)
  return q_spec, kv_spec


def _splash_local(causal, block, interpreted, q_BxLxGxRxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL):
  """Splash attention of this device's rows: one kernel over the H = G R heads, vmapped over the rows."""
  batch, length, g, r, k = q_BxLxGxRxK.shape
  q_BxHxLxK = q_BxLxGxRxK.reshape(batch, length, g * r, k).transpose(0, 2, 1, 3)
  k_BxGxLxK, v_BxGxLxK = k_BxLxGxK.transpose(0, 2, 1, 3), v_BxLxGxK.transpose(0, 2, 1, 3)
  kernel = _splash_kernel(g * r, length, causal, block, interpreted)
  if segment_ids_BxL is None:
    out_BxHxLxK = jax.vmap(kernel)(q_BxHxLxK, k_BxGxLxK, v_BxGxLxK)
  else:
    row = lambda q, k, v, ids: kernel(q, k, v, segment_ids=splash.SegmentIds(q=ids, kv=ids))
    out_BxHxLxK = jax.vmap(row)(q_BxHxLxK, k_BxGxLxK, v_BxGxLxK, segment_ids_BxL)
  return out_BxHxLxK.transpose(0, 2, 1, 3).reshape(batch, length, g, r, k)


def _splash_kernel(heads: int, length: int, causal: bool, block: int, interpreted: bool):
  """The splash kernel of `heads` query heads over rows of `length`, made in each trace (it holds arrays); splash
  caches the numpy work of its block masks itself.

  Given H query heads and G key/value heads, splash's multi-head kernel lets head h read key/value head
  h // (H / G) (GQA; G = 1 is its MQA case) in forward and backward, without repeating keys and values. Its
  residuals carry the name "attention_out", which remat policies can save (model/transformer.REMAT_POLICIES)."""
  head_mask = (splash_mask.CausalMask if causal else splash_mask.FullMask)((length, length))
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=True)
  return splash.make_splash_mha(splash_mask.MultiHeadMask([head_mask] * heads), block_sizes=sizes, head_shards=1,
                                q_seq_shards=1, residual_checkpoint_name="attention_out", interpret=interpreted)


def _triton_local(causal, scale, interpreted, q_BxLxGxRxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL):
  """Pallas's Triton flash attention of this device's rows; its kernel wants as many key/value heads as query
  heads, so each group's keys and values are repeated for its R heads (their gradients summed back)."""
  batch, length, g, r, k = q_BxLxGxRxK.shape
  q_BxLxHxK = q_BxLxGxRxK.reshape(batch, length, g * r, k)
  k_BxLxHxK, v_BxLxHxK = jnp.repeat(k_BxLxGxK, r, axis=2), jnp.repeat(v_BxLxGxK, r, axis=2)
  out_BxLxHxK = triton_attention.mha(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segment_ids_BxL, sm_scale=scale,
                                     causal=causal, interpret=interpreted)
  return out_BxLxHxK.reshape(batch, length, g, r, k)
