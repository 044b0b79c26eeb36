"""Predicts a pretraining run before it starts: parameters, FLOPs, memory per device and step time; given the workdir
of a finished run, sets the prediction beside what that run measured.

  python -m train.estimate --config=configs/X.py [--config.a.b=v ...] [--workdir=RUN] [--vocab_size=N]
      [--device_memory_gib=G] [--peak_tflops=T --bandwidth_gbs=B] [--json_out=PATH]

For a TPU slice this host does not have, `python -m train.compile --topology=...` compiles the same step with the
TPU compiler instead (memory a chip, collectives, a datasheet roofline). The run's train step is compiled, not run;
a matmul and a one-layer copy of the step run briefly to measure this device (train/hardware.py). Where each figure
comes from:
- parameters: `ModelConfig.num_params` (analytic), checked against the model's own tree (abstract, nothing allocated);
- FLOPs: `ModelConfig.train_flops` (PaLM appendix B: what runs log and bench/ divides by), and XLA's own count;
- memory per device: parameters, optimizer state and gradients from the train state's shapes, dtypes and shardings
  (exact); activations analytic, with and without remat (what the backward pass keeps: a count to compare settings
  by); and the step as XLA compiled it (arguments + outputs not donated + temporaries): the number the run's own check
  (train.loop.check_memory) tests before its first step, and the one predicted, because XLA plans every buffer the
  step holds where a count by hand misses fusion choices and float32 temporaries;
- on CPU, where the devices are the host, the whole process: what stays resident here after compiling the run's
  init and step and running the measurements (the runtime, its libraries and the compiled code: measured, they
  have no analytic form) + the step's buffers + the data (analytic: rows, text and token lists);
- step time: a roofline sum over XLA's cost analysis of the compiled step (a step that loops is costed as its flat
  microbatch, grad_accum times): its flops at the matmul peak measured here, plus its bytes accessed at the bandwidth
  that this run's own non-matmul kernels reach here, measured on a one-layer copy of its step (`kernel_bandwidth`).
  No constant is fitted to runs. A copy's bandwidth rather than a stream's, because on CPU XLA's kernels range from
  about 0.6 GB/s (transposes) to over 20 GB/s (elementwise ops on reused buffers): a single streaming figure put
  shakespeare_char's step at 0.5x or 1.7x of what it measured. Communication between devices is left out.
Offers `estimate`, `measured`, `activation_bytes`, `abstract_batch`, `default_vocab_size`, `per_device_bytes` and
`report`.
"""

import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from data.pretraining import objective_rows, special_tokens_for
from data.sources import DataError, resolve_paths
from data.tokenizer import CharTokenizer
from model.config import ModelConfig
from model.families import family
from train import hardware
from train import mesh as mesh_lib
from train import runs
from train.checkpoint import read_run_config
from train.cli import RunError, fail, parse_flags, run_reporting_errors
from train.loop import check_memory, check_train_config, jit_train_step
from train.metrics import read_metrics
from train.state import fresh_state
from train.step import token_loss

CHAR_VOCAB = 65 + 3  # a char tokenizer before its corpus is read: Shakespeare's characters + pad, bos, eos
# Corpus bytes per token, to size the data rows without tokenizing: one per character, about three for subword
# vocabularies of a few thousand pieces on English or code.
BYTES_PER_TOKEN = {"char": 1.0}
SUBWORD_BYTES_PER_TOKEN = 3.0
MIB = 2**20


def default_vocab_size(config) -> int:
  """The vocabulary a run of `config` will have, as far as the config says: CHAR_VOCAB for a char tokenizer (its
  size comes from the corpus), else data.vocab_size."""
  return CHAR_VOCAB if config.data.tokenizer == "char" else config.data.vocab_size


def abstract_batch(config, sharding=None) -> dict:
  """Shapes and dtypes of one global batch of `config.objective`, as its row builder makes them (a synthetic
  document through data.pretraining.objective_rows), each [train.batch_size, that key's length]."""
  seq_len = config.train.seq_len
  tokenizer = CharTokenizer("abcdefgh", special_tokens_for(config.objective))
  document = [3 + i % 8 for i in range(4 * seq_len + 8)]
  rows = objective_rows(config.objective, tokenizer, [document] * 4, seq_len, config.data, seed=0)
  return {key: jax.ShapeDtypeStruct((config.train.batch_size, value.shape[1]), value.dtype, sharding=sharding)
          for key, value in rows.items()}


def per_device_bytes(abstract_tree, shardings) -> int:
  """Bytes of the leaves' shards on one device."""
  leaves = jax.tree.leaves(abstract_tree)
  return sum(math.prod(sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x, sharding in zip(leaves, jax.tree.leaves(shardings)))


def activation_bytes(cfg: ModelConfig, rows: int, length: int, target_length: int = 0, remat: bool = False) -> float:
  """What the backward pass keeps of `rows` examples, by hand: per token and layer the residual stream and norm
  outputs (4 D), queries, keys, values and the attention output ((2 H + 2 G) K), the MLP's input and activated
  widths (2 F, gated 3 F) in the compute dtype, and the float32 softmax (H per key); once per stack the [L, S]
  mask; the float32 logits and their gradient (2 V per token). With remat a layer keeps its input alone, its
  own activations are rebuilt one layer at a time (the policy "full"; "dots" policies keep more). An encoder-decoder's
  decoder reads `target_length` tokens and adds cross-attention to each layer. A mixture of experts keeps the widths
  of the experts a token is sent to (and the shared ones) and a copy of its input per expert, averaged over the
  layers. Dropout masks are left out."""
  d, h, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  width = jnp.dtype(cfg.compute_dtype).itemsize
  experts = cfg.experts_per_token
  mlp_widths = [((experts + cfg.shared_experts) * cfg.mlp_dim, experts * d) if cfg.moe_layer(i) else (cfg.mlp_dim, 0)
                for i in range(cfg.num_layers)]
  mlp_kept = sum((3 if cfg.gated else 2) * f + copies for f, copies in mlp_widths) / cfg.num_layers

  def layer(keys: int, cross_keys: int = 0) -> float:
    """Bytes one layer keeps per token."""
    kept = 4 * d + (2 * h + 2 * g) * k + mlp_kept
    if cross_keys:  # a norm, queries and output per token; the source's keys and values shared out over the tokens
      kept += 2 * d + 2 * h * k + 2 * g * k * cross_keys / max(keys, 1)
    return kept * width + 4 * h * (keys + cross_keys)

  stacks = [(length, length, layer(length))]  # (tokens, keys a token's masks cover, bytes a layer keeps per token)
  if family(cfg).seq2seq:
    stacks.append((target_length, target_length + length, layer(target_length, length)))
  total = 0.0
  for tokens, keys, per_layer in stacks:
    total += rows * tokens * (keys + 2 * d * width)  # boolean masks, the final norm's input and output
    kept_layers = cfg.num_layers * d * width + per_layer if remat else cfg.num_layers * per_layer
    total += rows * tokens * kept_layers
  return total + rows * stacks[-1][0] * 2 * cfg.vocab_size * 4


def data_bytes(config, batch: dict) -> float:
  """What the data holds in memory, sized from the corpus' bytes (no tokenizer is run): the rows (train and
  validation, in the batch format), the text, and the token lists the rows were built from, which the allocator
  keeps (a Python list: 8 bytes a token, 32 more for ids of 256 and up, which Python does not cache). A prepared
  corpus is memory-mapped and counted as nothing."""
  data = config.data
  if data.prepared:
    return 0.0
  try:
    size = sum(os.path.getsize(path) for path in resolve_paths(data.train_path))
  except (DataError, OSError):
    return 0.0
  if data.max_bytes:
    size = min(size, data.max_bytes)
  tokens = size / BYTES_PER_TOKEN.get(data.tokenizer, SUBWORD_BYTES_PER_TOKEN)
  row_bytes = sum(jnp.dtype(x.dtype).itemsize * x.shape[1] for x in batch.values()) / config.train.seq_len
  list_bytes = 8 + (32 if default_vocab_size(config) > 256 else 0)
  return size + tokens * (row_bytes + list_bytes)


def flat_config(config, rows: int = 0, layers: int = 0):
  """A copy of `config` whose step holds no loop (XLA's cost analysis counts a loop's body once): one microbatch
  (grad_accum 1), the layers not scanned; `rows` and `layers`, if given, shrink the batch and the depth."""
  flat = config.copy_and_resolve_references()
  flat.train.batch_size = rows or config.train.batch_size // config.train.grad_accum
  flat.train.grad_accum = 1
  if flat.model.get("scan_layers"):
    flat.model.scan_layers = False
  if layers:
    flat.model.num_layers = layers
  return flat


def _compiled_step(config, vocab_size: int, run=None):
  """(run, compiled train step) of `config` on its mesh, compiled from shapes alone."""
  run = run or runs.pretraining(config, mesh_lib.make_mesh(config.mesh), vocab_size)
  batch = abstract_batch(config, mesh_lib.batch_sharding(run.mesh))
  step = jit_train_step(run, token_loss(run.model, z_loss=config.train.z_loss), config.train)
  return run, step.lower(run.abstract_state(), batch, run.frozen).compile()


def kernel_bandwidth(config, vocab_size: int, peak_flops: float, seconds: float = 4.0,
                     budget_s: float = 0.5) -> float | None:
  """Bytes/s that the run's own kernels beyond its matmuls move on this device: XLA's bytes accessed by a one-layer
  copy of the run's train step (its width, lengths, vocabulary and optimizer; its microbatch, halved while the copy
  would take over `budget_s` at the peak) over that step's mean time beyond its flops at `peak_flops`; None where
  the copy is compute-bound. The mean of `seconds` of steps (at least 5), as a run's tokens/s is a mean over its
  logging interval: on a shared machine both take in the stalls."""
  mesh = mesh_lib.make_mesh(config.mesh)
  parallel = mesh_lib.data_parallel_size(mesh)
  rows = config.train.batch_size // config.train.grad_accum
  small = flat_config(config, rows, layers=1)
  cfg = ModelConfig.from_config(small.model, vocab_size)
  lengths = [x.shape[1] for key, x in abstract_batch(small).items() if key.endswith("inputs_BxL")]
  while rows % (2 * parallel) == 0 and rows * cfg.train_flops(*lengths) > budget_s * peak_flops:
    rows //= 2
  small = flat_config(config, rows, layers=1)
  run, step = _compiled_step(small, vocab_size)
  state = run.init_state()
  batch = {key: jnp.ones(x.shape, x.dtype, device=x.sharding)
           for key, x in abstract_batch(small, mesh_lib.batch_sharding(mesh)).items()}
  for _ in range(2):
    state, metrics = step(state, batch, run.frozen)
  jax.block_until_ready((state, metrics))
  start, steps = time.perf_counter(), 0
  while steps < 5 or (time.perf_counter() - start < seconds and steps < 500):
    state, metrics = step(state, batch, run.frozen)
    jax.block_until_ready((state, metrics))
    steps += 1
  cost = hardware.compiled_cost(step)
  serial = mesh.devices.size if jax.default_backend() == "cpu" else 1
  beyond = (time.perf_counter() - start) / steps - serial * cost["flops"] / peak_flops
  return serial * cost["bytes_accessed"] / beyond if beyond > 0 else None


def estimate(config, vocab_size: int = 0, device_memory: int | None = None, peak_flops: float = 0.0,
             bandwidth: float = 0.0) -> dict:
  """The prediction for a pretraining config (see the module docstring); `device_memory`, `peak_flops` (FLOP/s) and
  `bandwidth` (bytes/s) replace what this device has or measures. Returns JSON-able figures, bytes per device."""
  train = config.train
  mesh = mesh_lib.make_mesh(config.mesh)
  check_train_config(config, mesh)
  vocab_size = vocab_size or default_vocab_size(config)
  run = runs.pretraining(config, mesh, vocab_size)
  cfg = run.model.cfg
  devices, platform = mesh.devices.size, jax.default_backend()
  batch = abstract_batch(config, mesh_lib.batch_sharding(mesh))
  lengths = (batch["inputs_BxL"].shape[1],
             batch["decoder_inputs_BxL"].shape[1] if "decoder_inputs_BxL" in batch else 0)

  state = run.abstract_state()
  model_params = sum(x.size for x in jax.tree.leaves(state.params))
  params = per_device_bytes(state.params, run.shardings.params)
  optimizer = per_device_bytes(state.opt_state, run.shardings.opt_state)
  gradients = params * (2 if train.grad_accum > 1 else 1)  # accumulating microbatches adds the running sum
  rows = train.batch_size // train.grad_accum // mesh_lib.data_parallel_size(mesh)
  tensor = mesh.shape["tensor"]  # heads and MLP widths split over it: their activations too (roughly)
  activations = {remat: activation_bytes(cfg, rows, *lengths, remat=remat) / tensor for remat in (False, True)}

  if platform == "cpu":  # compile the run's init too: its code stays resident like the step's
    init = lambda rng: fresh_state(run.init_params(rng, run.base), run.tx, rng)
    jax.jit(init, out_shardings=run.shardings).lower(jax.random.PRNGKey(run.seed)).compile()
  _, compiled = _compiled_step(config, vocab_size, run)
  step_memory = hardware.compiled_memory_bytes(compiled)
  analysis = compiled.memory_analysis()
  limit = device_memory or hardware.device_memory_bytes()
  try:
    check_memory(compiled, mesh, limit)
    warning = None
  except RunError as e:  # the run would refuse to start
    warning = str(e)

  flat = train.grad_accum == 1 and not config.model.get("scan_layers")
  # A step that loops (microbatches, scanned layers) is costed as one flat microbatch, grad_accum times.
  cost = hardware.compiled_cost(compiled if flat else _compiled_step(flat_config(config), vocab_size)[1])
  cost = {key: value * train.grad_accum for key, value in cost.items()}
  # Forced host devices share the cores: on CPU the mesh runs its programs one core-pool after another.
  serial = devices if platform == "cpu" else 1
  compute_dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
  peak_flops = peak_flops or hardware.matmul_peak_flops(compute_dtype)
  bandwidth = bandwidth or kernel_bandwidth(config, vocab_size, peak_flops) or hardware.memory_bandwidth()
  # The measurements ran programs, which starts the runtime's threads as a run's first step does; their arrays
  # are freed, so what stays resident is the runtime, the libraries and the compiled code.
  runtime = hardware.resident_bytes()
  flops, bytes_accessed = serial * cost["flops"], serial * cost["bytes_accessed"]  # one device's (CPU: the host's)
  compute_s, memory_s = flops / peak_flops, bytes_accessed / bandwidth
  step_s = compute_s + memory_s
  model_flops = train.batch_size * cfg.train_flops(*lengths)
  tokens_per_step = train.batch_size * train.seq_len  # as the loop counts train/tokens_per_sec

  figures = {
      "config": {"family": cfg.family, "num_layers": cfg.num_layers, "d_model": cfg.d_model,
                 "num_heads": cfg.num_heads, "vocab_size": vocab_size, "dtype": cfg.dtype, "remat": cfg.remat,
                 "batch_size": train.batch_size, "lengths": [n for n in lengths if n], "grad_accum": train.grad_accum,
                 "mesh": dict(mesh.shape)},
      "device": {"platform": platform, "kind": jax.devices()[0].device_kind, "count": devices},
      "parameters": {"analytic": cfg.num_params(), "model": model_params, "active": cfg.num_params(active=True)},
      "flops": {"per_token": model_flops / tokens_per_step, "per_step": model_flops,
                "xla_per_step": cost["flops"] * devices},
      "memory": {"params": params, "param_dtype": cfg.param_dtype, "optimizer": optimizer, "gradients": gradients,
                 "activations": activations[cfg.remat], "activations_no_remat": activations[False],
                 "activations_remat": activations[True], "step": step_memory,
                 "step_arguments": analysis.argument_size_in_bytes if analysis else None,
                 "step_temporaries": analysis.temp_size_in_bytes if analysis else None,
                 "device_limit": limit, "fits": warning is None},
      "time": {"peak_flops": peak_flops, "bandwidth": bandwidth, "flops": flops, "bytes_accessed": bytes_accessed,
               "compute_s": compute_s, "memory_s": memory_s, "step_s": step_s,
               "tokens_per_s": tokens_per_step / step_s, "ideal_step_s": model_flops / (peak_flops * devices / serial)},
      "warning": warning,
  }
  if platform == "cpu":
    data = data_bytes(config, batch)
    figures["process"] = {"runtime": runtime, "step": step_memory or 0, "data": data,
                          "peak": runtime + (step_memory or 0) + data}
  return figures


def measured(workdir: str, warmup: int = 1) -> dict:
  """What a finished run measured: step time and tokens/s (median of the logged intervals after the first
  `warmup`, which hold the compilation) and its peak memory, if it logged one."""
  config = read_run_config(workdir)
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file; the workdir must hold a run's metrics")
  records = [r for r in read_metrics(path) if "train/tokens_per_sec" in r]
  rates = [r["train/tokens_per_sec"] for r in records[warmup:]]
  if not rates:
    raise DataError(f"{path}: {len(records)} logged intervals, none after the first {warmup} (compilation); "
                    "run more steps or log more often (config.train.log_every)")
  tokens_per_s = statistics.median(rates)
  peaks = [r["memory/peak_bytes"] for r in records if "memory/peak_bytes" in r]
  return {"tokens_per_s": tokens_per_s, "step_s": config.train.batch_size * config.train.seq_len / tokens_per_s,
          "intervals": len(rates), "peak_memory": max(peaks) if peaks else None}


def _size(num_bytes) -> str:
  if num_bytes is None:
    return "?"
  return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / MIB:.1f} MiB"


def _time(seconds: float) -> str:
  return f"{seconds:.2f} s" if seconds >= 1 else f"{1e3 * seconds:.1f} ms"


def report(figures: dict, measured_figures: dict | None = None) -> str:
  """The prediction as aligned lines, and a predicted / measured table when a run's figures are given."""
  c, p, f, m, t = (figures[key] for key in ("config", "parameters", "flops", "memory", "time"))
  device = figures["device"]
  mesh = " ".join(f"{k}={v}" for k, v in c["mesh"].items())
  same = "= the model's tree" if p["analytic"] == p["model"] else f"the model's tree has {p['model']:,}"
  remat_now = "remat on" if c["remat"] else "remat off"
  active = p.get("active", p["analytic"])  # a mixture of experts: the parameters a token uses
  active = f"; {active:,} active a token (the experts it is sent to)" if active != p["analytic"] else ""
  lines = [
      ("run", f"{c['family']} {c['num_layers']} layers x d_model {c['d_model']} ({c['num_heads']} heads), vocab "
              f"{c['vocab_size']:,}, {c['dtype']}; batch {c['batch_size']} x {'+'.join(map(str, c['lengths']))}"
              f", grad_accum {c['grad_accum']}; mesh {mesh}; {device['count']} {device['platform']} device(s) "
              f"({device['kind']})"),
      ("parameters", f"{p['analytic']:,} (analytic, {same}){active}"),
      ("FLOPs", f"{f['per_token'] / 1e6:,.2f} M per token, {f['per_step'] / 1e9:,.2f} G per step (6N + attention); "
                f"XLA counts {f['xla_per_step'] / 1e9:,.2f} G per step"),
      ("memory / device", f"parameters {_size(m['params'])} ({m['param_dtype']}), optimizer state "
                          f"{_size(m['optimizer'])} (AdamW moments), gradients {_size(m['gradients'])}"),
      ("", f"activations {_size(m['activations_no_remat'])} without remat, {_size(m['activations_remat'])} with "
           f"(analytic; {remat_now})"),
      ("", f"the step as compiled {_size(m['step'])} (arguments {_size(m['step_arguments'])}, temporaries "
           f"{_size(m['step_temporaries'])}; XLA); a device holds {_size(m['device_limit'])}: "
           f"{'fits' if m['fits'] else 'does NOT fit'}"),
  ]
  if "process" in figures:
    proc = figures["process"]
    lines.append(("process (CPU)", f"{_size(proc['peak'])} peak resident = runtime and compiler "
                                   f"{_size(proc['runtime'])} (measured here) + step {_size(proc['step'])} + data "
                                   f"{_size(proc['data'])} (analytic)"))
  lines += [
      ("step time", f"{_time(t['step_s'])} = {t['flops'] / 1e9:,.2f} GFLOP at {t['peak_flops'] / 1e9:,.0f} GFLOP/s "
                    f"({_time(t['compute_s'])}) + {t['bytes_accessed'] / 1e9:,.2f} GB at {t['bandwidth'] / 1e9:,.1f} "
                    f"GB/s ({_time(t['memory_s'])}); {t['tokens_per_s']:,.0f} tokens/s"),
      ("", f"at the matmul peak alone {_time(t['ideal_step_s'])} (the bound of MFU 1)"),
  ]
  width = max(len(name) for name, _ in lines)
  out = [f"{name:<{width}}  {text}" for name, text in lines]
  if measured_figures:
    predicted_memory = figures.get("process", {}).get("peak", m["step"])
    rows = [("step time (ms)", 1e3 * t["step_s"], 1e3 * measured_figures["step_s"]),
            ("tokens/s", t["tokens_per_s"], measured_figures["tokens_per_s"]),
            ("peak memory (MiB)", predicted_memory / MIB if predicted_memory else None,
             measured_figures["peak_memory"] / MIB if measured_figures["peak_memory"] else None)]
    out.append("")
    out.append(f"{'':<18}  {'predicted':>10}  {'measured':>10}  {'ratio':>6}")
    for name, predicted_value, measured_value in rows:
      ratio = f"{predicted_value / measured_value:.2f}" if predicted_value and measured_value else "-"
      cells = [f"{v:,.0f}" if v else "-" for v in (predicted_value, measured_value)]
      out.append(f"{name:<18}  {cells[0]:>10}  {cells[1]:>10}  {ratio:>6}")
  return "\n".join(out)


def main(argv):
  del argv
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if config is None and not workdir:
    fail("--config: a config file is required (or --workdir of a run, to read its config.json)")
  if workdir and not os.path.isdir(workdir):
    fail(f"--workdir={workdir}: {'a file' if os.path.exists(workdir) else 'no such directory'}; name a finished "
         "run's directory")
  if config is None:
    config = run_reporting_errors(read_run_config, workdir)
  vocab_size = flags.FLAGS.vocab_size
  if workdir and not vocab_size:
    _, vocab_size = run_reporting_errors(runs.run_tokenizer, workdir, config, required=False)
  gib = flags.FLAGS.device_memory_gib
  figures = run_reporting_errors(estimate, config, vocab_size, int(gib * 2**30) if gib else None,
                                 flags.FLAGS.peak_tflops * 1e12, flags.FLAGS.bandwidth_gbs * 1e9)
  measured_figures = run_reporting_errors(measured, workdir) if workdir else None
  if figures["warning"]:
    print(f"warning: {figures['warning']}", file=sys.stderr)
  print(report(figures, measured_figures))
  if flags.FLAGS.json_out:
    with open(flags.FLAGS.json_out, "w") as f:
      json.dump({"predicted": figures, "measured": measured_figures}, f, indent=2)


if __name__ == "__main__":  # flags only here: tests import this module
  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py); default: RUN/config.json.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "A finished run: its measured step time and memory beside the prediction.")
  flags.DEFINE_integer("vocab_size", 0, "Vocabulary size (0: the run's tokenizer with --workdir, else "
                       f"data.vocab_size, or {CHAR_VOCAB} for a char tokenizer).")
  flags.DEFINE_float("device_memory_gib", 0.0, "Memory of one device in GiB (0: what this device has).")
  flags.DEFINE_float("peak_tflops", 0.0, "Matmul peak in TFLOP/s (0: measure it here in the compute dtype).")
  flags.DEFINE_float("bandwidth_gbs", 0.0, "Memory bandwidth in GB/s (0: measure it here).")
  flags.DEFINE_string("json_out", "", "Also write the figures to this JSON file.")
  app.run(main, flags_parser=parse_flags)
