"""Compiles a run's train step for a TPU topology on any host, nothing run: does it fit, and how fast could it be.

  pip install -e ".[tpu]"    # libtpu: the TPU compiler, which runs on a CPU host without a TPU
  python -m train.compile --config=configs/gpt2_small.py --topology=v5e:2x4 --config.mesh.fsdp=8 \
      [--num_slices=N] [--dump_hlo=DIR] [--json_out=PATH] [--vocab_size=V]

The step is the very one training runs (train.loop.jit_train_step: the same jit, shardings and donation) over a
mesh of the topology's abstract devices, lowered with abstract inputs and compiled by the real TPU compiler
(MaxText's train_compile). Per chip it prints: parameters + optimizer state (from the state's shardings), the
compiler's arguments / outputs / temporaries and their total against the chip's HBM; the compiler's FLOPs and bytes;
the collectives in the compiled HLO (count and bytes); compile time; and a roofline step time (the largest of FLOPs
at the datasheet bf16 peak, bytes at the HBM bandwidth, collective bytes at the ICI bandwidth:
train/hardware.TPU_CHIPS) with the MFU it implies (ModelConfig.train_flops, PaLM's count, per chip), beside the step
with nothing overlapped (their sum): a range, not a measurement. XLA's bytes accessed counts every fusion's operands
and outputs, an upper bound of HBM traffic; its FLOPs leave out Mosaic kernels, so compute time takes the larger of
XLA's and the model's. XLA costs a loop's body once, so a step that loops (scan_layers, grad_accum) is costed from
loop-free copies of 1 and 2 layers, extrapolated to its depth. The last line says `fits` or `does not fit` (exit
status 0 or 2); what does not fit names the knobs.

train.estimate predicts a run on the devices of this host (measured peaks, CPU memory included); this command
answers the same question for a TPU slice you do not have, from the TPU compiler itself.
"""

import os

# Before jax is imported: libtpu must not look for a TPU or its metadata server, and several compiling processes
# (tests, a sweep) must not stop at libtpu's lockfile.
for _key, _value in (("TPU_SKIP_MDS_QUERY", "1"), ("JAX_PLATFORMS", "cpu"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
  os.environ.setdefault(_key, _value)

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from model.config import ConfigError, ModelConfig  # noqa: E402
from train import hardware  # noqa: E402
from train import mesh as mesh_lib  # noqa: E402
from train import runs  # noqa: E402
from train.cli import parse_flags, run_reporting_errors  # noqa: E402
from train.estimate import abstract_batch, default_vocab_size, flat_config, per_device_bytes  # noqa: E402
from train.loop import check_train_config, jit_train_step  # noqa: E402
from train.step import token_loss  # noqa: E402

GIB = 2**30
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
KNOBS = ("lower config.train.batch_size (or raise config.train.grad_accum), set config.model.remat=True "
         "(config.model.remat_policy=full keeps least), shard over more chips (config.mesh.fsdp, config.mesh.tensor), "
         "or config.model.attention_impl=splash (no [L, L] scores)")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8}


def tpu_devices(topology: str, num_slices: int = 1) -> list:
  """The abstract devices of a TPU topology such as "v5e:2x4" (num_slices copies joined over the data-center
  network); needs libtpu (`pip install -e ".[tpu]"`)."""
  try:
    import libtpu  # noqa: F401  (only to say what is missing)
  except ImportError as e:
    raise ConfigError("--topology: compiling for a TPU needs libtpu: pip install -e \".[tpu]\"") from e
  from jax.experimental import topologies
  try:
    hardware.tpu_chip(topology)
    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs).devices)
  except (KeyError, ValueError, RuntimeError) as e:
    raise ConfigError(f"--topology={topology}: not a TPU topology libtpu knows (e.g. v5e:2x4, v5p:4x4x4, "
                      f"v6e:8x8; {str(e).splitlines()[0][:120]})") from e


def _array_bytes(shape: str, total: bool = False) -> int:
  """Bytes of the largest array in an HLO shape string such as "(bf16[8,768]{1,0}, bf16[64,768]{1,0})" (`total`:
  of all of them)."""
  sizes = [0]
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape):
    count = 1
    for dim in filter(None, dims.split(",")):
      count *= int(dim)
    sizes.append(count * _DTYPE_BYTES.get(dtype, 4))
  return sum(sizes) if total else max(sizes)


def collectives(hlo_text: str) -> dict:
  """{op: {"count", "bytes"}} of the collectives in a compiled HLO module (the async -start halves counted, the
  -done halves not; bytes = the largest array each one produces, or all the arrays of an all-to-all in its tuple
  form, one a peer). A while loop's body counts once, so the caller multiplies a scanned stack's share by its trip
  count where it needs totals."""
  found = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
  pattern = re.compile(r"=\s*(\S.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
  for line in hlo_text.splitlines():
    match = pattern.search(line)
    if match:
      op, tuple_all_to_all = match.group(2), match.group(2) == "all-to-all" and not match.group(3)
      found[op]["count"] += 1
      found[op]["bytes"] += _array_bytes(match.group(1), total=tuple_all_to_all)
  return found


def _exhausted(error: Exception) -> str | None:
  """The compiler's one-line reason when it refused a program that does not fit in HBM, else None."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text and "exceeds" not in text.lower():
    return None
  lines = [line.strip() for line in text.splitlines() if "exceed" in line.lower() or "RESOURCE_EXHAUSTED" in line]
  return (lines[0] if lines else text.splitlines()[0])[:300]


def _compile(config, devices, vocab_size: int):
  """(run, lowered, compiled or the compiler's exception) of the config's train step on a mesh of `devices`."""
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  check_train_config(config, mesh)
  run = runs.pretraining(config, mesh, vocab_size)
  step = jit_train_step(run, token_loss(run.model, z_loss=config.train.z_loss), config.train)
  lowered = step.lower(run.abstract_state(), abstract_batch(config, mesh_lib.batch_sharding(mesh)), run.frozen)
  try:
    return run, lowered, lowered.compile()
  except Exception as e:  # the TPU compiler refuses a program larger than HBM
    if _exhausted(e) is None:
      raise
    return run, lowered, e


def _cost(compiled) -> dict:
  """The compiler's FLOPs and bytes and the collectives of one compiled step."""
  return {**hardware.compiled_cost(compiled), "collectives": collectives(compiled.as_text())}


def _flat_cost(config, devices, vocab_size: int) -> dict:
  """The cost of the config's step as if it held no loop: XLA counts a loop's body once, so a scanned stack (or
  accumulated microbatches) is costed from loop-free copies of 1 and 2 layers, extrapolated linearly to the depth
  and multiplied by grad_accum. (The loss's chunk loop stays: its head products are counted once, so compute
  time is taken from the larger of XLA's FLOPs and the model's.)"""
  costs = [_cost(_compile(flat_config(config, layers=n), devices, vocab_size)[2]) for n in (1, 2)]
  layers, accum = config.model.num_layers, config.train.grad_accum
  extrapolate = lambda one, two: accum * (one + (layers - 1) * (two - one))
  flat = {key: extrapolate(costs[0][key], costs[1][key]) for key in ("flops", "bytes_accessed")}
  flat["collectives"] = {op: {key: extrapolate(costs[0]["collectives"][op][key], costs[1]["collectives"][op][key])
                              for key in ("count", "bytes")} for op in COLLECTIVES}
  return flat


def compile_for_tpu(config, topology: str, vocab_size: int = 0, num_slices: int = 1, dump_hlo: str = ""):
  """Compiles the config's train step for `topology`: (the figures `report` prints, the compiled step or None
  where the compiler refused it)."""
  chip = hardware.tpu_chip(topology)
  devices = tpu_devices(topology, num_slices)
  vocab_size = vocab_size or default_vocab_size(config)
  model_cfg = ModelConfig.from_config(config.model, vocab_size)
  start = time.perf_counter()
  run, lowered, compiled = _compile(config, devices, vocab_size)
  compile_s = time.perf_counter() - start
  abstract_state = run.abstract_state()
  state_bytes = per_device_bytes(abstract_state, run.shardings)
  params_bytes = per_device_bytes(abstract_state.params, run.shardings.params)
  figures = {
      "topology": topology, "num_slices": num_slices, "chips": len(devices), "chip": chip.name,
      "mesh": dict(run.mesh.shape), "batch_size": config.train.batch_size, "seq_len": config.train.seq_len,
      "remat": config.model.remat and config.model.remat_policy, "attention_impl": config.model.attention_impl,
      "params": model_cfg.num_params(), "params_bytes_per_chip": params_bytes,
      "opt_state_bytes_per_chip": state_bytes - params_bytes, "hbm_bytes": chip.hbm_bytes, "compile_s": compile_s,
  }
  if isinstance(compiled, Exception):
    figures.update(fits=False, reason=_exhausted(compiled))
    return figures, None
  hlo = compiled.as_text()
  if dump_hlo:
    os.makedirs(dump_hlo, exist_ok=True)
    with open(os.path.join(dump_hlo, "train_step.hlo.txt"), "w") as f:
      f.write(hlo)
  loops = config.model.scan_layers or config.train.grad_accum > 1
  cost = _flat_cost(config, devices, vocab_size) if loops else _cost(compiled)
  memory = compiled.memory_analysis()
  tokens_per_chip = config.train.batch_size * config.train.seq_len / len(devices)
  model_flops = model_cfg.train_flops(config.train.seq_len) / config.train.seq_len * tokens_per_chip
  times = {"compute_s": max(cost["flops"], model_flops) / chip.bf16_flops,
           "memory_s": cost["bytes_accessed"] / chip.hbm_bandwidth,
           "collective_s": sum(c["bytes"] for c in cost["collectives"].values()) / chip.ici_bandwidth}
  step_s = max(times.values())
  figures.update(
      fits=True, argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
      alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
      total_bytes=hardware.compiled_memory_bytes(compiled), xla_flops=cost["flops"],
      bytes_accessed=cost["bytes_accessed"], collectives=cost["collectives"], cost_from_flat_copies=loops,
      model_flops_per_chip=model_flops, **times, step_s=step_s, bound=max(times, key=times.get).removesuffix("_s"),
      mfu=model_flops / (step_s * chip.bf16_flops), serial_step_s=sum(times.values()),
      mfu_serial=model_flops / (sum(times.values()) * chip.bf16_flops), mosaic_kernels=hlo.count("tpu_custom_call"))
  return figures, compiled


def report(figures: dict) -> str:
  """The figures as the lines the command prints; the last says `fits` or `does not fit`."""
  f = figures
  mesh = " x ".join(f"{name}={size}" for name, size in f["mesh"].items())
  lines = [f"{f['topology']} ({f['chips']} chips of {f['chip']}, HBM {f['hbm_bytes'] / GIB:.2f} GiB each), "
           f"mesh {mesh}; {f['params'] / 1e6:,.1f}M parameters, batch {f['batch_size']} x {f['seq_len']}, "
           f"attention {f['attention_impl']}, remat {f['remat'] or 'off'}",
           f"per chip: parameters {f['params_bytes_per_chip'] / GIB:.2f} GiB + optimizer state "
           f"{f['opt_state_bytes_per_chip'] / GIB:.2f} GiB",
           f"lower + compile {f['compile_s']:.1f} s"]
  if not f["fits"]:
    lines += [f"compiler: {f['reason']}",
              f"does not fit: {KNOBS}"]
    return "\n".join(lines)
  lines += [
      f"compiled, per chip: arguments {f['argument_bytes'] / GIB:.2f} GiB, outputs {f['output_bytes'] / GIB:.2f} GiB "
      f"({f['alias_bytes'] / GIB:.2f} aliased to donated inputs), temporaries {f['temp_bytes'] / GIB:.2f} GiB; "
      f"total {f['total_bytes'] / GIB:.2f} GiB of {f['hbm_bytes'] / GIB:.2f} GiB HBM",
      f"compiler cost per chip{' (loop-free 1- and 2-layer copies, extrapolated)' * f['cost_from_flat_copies']}: "
      f"{f['xla_flops'] / 1e12:.2f} TFLOP, {f['bytes_accessed'] / 1e9:.2f} GB accessed; model "
      f"{f['model_flops_per_chip'] / 1e12:.2f} TFLOP (6N + attention)",
      "collectives: " + ", ".join(f"{op} {c['count']} x ({c['bytes'] / 2**20:,.1f} MiB)"
                                  for op, c in f["collectives"].items() if c["count"]) or "collectives: none",
      f"roofline step {f['step_s'] * 1e3:.1f} ms ({f['bound']}-bound: compute {f['compute_s'] * 1e3:.1f} ms, "
      f"HBM {f['memory_s'] * 1e3:.1f} ms, ICI {f['collective_s'] * 1e3:.1f} ms), MFU {f['mfu']:.1%}; with nothing "
      f"overlapped {f['serial_step_s'] * 1e3:.1f} ms, MFU {f['mfu_serial']:.1%}",
      f"fits: {f['total_bytes'] / GIB:.2f} GiB a chip of {f['hbm_bytes'] / GIB:.2f} GiB"]
  return "\n".join(lines)


def main(argv):
  del argv
  config = FLAGS.config
  figures, _ = run_reporting_errors(compile_for_tpu, config, FLAGS.topology, FLAGS.vocab_size, FLAGS.num_slices,
                                    FLAGS.dump_hlo)
  print(report(figures))
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(figures, f, indent=2)
  sys.exit(0 if figures["fits"] else 2)


if __name__ == "__main__":
  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
  flags.DEFINE_string("topology", "v5e:2x4", "TPU topology: GENERATION:SHAPE, e.g. v5e:2x4, v5p:4x4x4, v6e:8x8.")
  flags.DEFINE_integer("num_slices", 1, "Slices joined over the data-center network (config.mesh.slices).")
  flags.DEFINE_integer("vocab_size", 0, "Vocabulary size (0: the config's data.vocab_size).")
  flags.DEFINE_string("dump_hlo", "", "Write the compiled HLO to DIR/train_step.hlo.txt.")
  flags.DEFINE_string("json_out", "", "Also write the figures to this JSON file.")
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=parse_flags)
