"""What an ablation will cost before it runs: the totals a dry run prints.

Each run's config is read as its entrypoint will read it (the config file and the run's overrides, through
ml-collections' own flag parser), so a bad override fails here, before anything runs. Steps and tokens are the runs'
own (tokens as the runs log `train/tokens`); FLOPs are `ModelConfig.train_flops`, as the runs log `train/flops`. The
time is train/estimate.py's prediction of one step of the first run (its compiled step, costed at the matmul peak
and kernel bandwidth measured here), scaled to every run by its FLOPs per step; evaluation is not counted.
Fine-tuning runs get FLOPs when their base run exists, and no time (the estimator predicts pretraining runs).

Offers `run_config`, `run_cost` and `describe`.
"""

import jax.numpy as jnp
from absl import flags
from ml_collections import config_flags

from model.config import ConfigError, ModelConfig
from train import estimate as estimate_lib
from train import hardware
from train import runs as runs_lib
from train.cli import RunError, flag_error

_SECONDS = 0.5  # the estimator measures its kernel bandwidth for 4 s and the peak 5 times; a dry run samples less


def run_config(ablation, run: dict):
  """The config a run's entrypoint reads: ablation.config with the run's overrides; a ConfigError naming the run."""
  argv = ["ablate", f"--config={ablation.config}", *[f"--config.{override}" for override in run["overrides"]]]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
  try:
    values(argv)
    config = values.config
    config.keys()  # loading is lazy
  except Exception as e:  # absl and ml-collections raise many kinds; each becomes one line
    raise ConfigError(f"run {run['name']}: {flag_error(e.__cause__ or e, argv)}") from None
  return config


def _lengths(config, entrypoint: str) -> tuple[int, int]:
  """(input length, decoder length or 0) of a run's rows."""
  if entrypoint == "pretrain":
    batch = estimate_lib.abstract_batch(config)
    return (batch["inputs_BxL"].shape[1],
            batch["decoder_inputs_BxL"].shape[1] if "decoder_inputs_BxL" in batch else 0)
  seq2seq = config.model.family == "encoder_decoder"
  return config.train.seq_len, (config.data.get("target_len", 0) or config.train.seq_len) if seq2seq else 0


def run_cost(ablation, run: dict) -> dict:
  """{steps, tokens, flops (None: unknown), config} of one run."""
  config = run_config(ablation, run)
  train = config.train
  flops_per_step = None
  if ablation.entrypoint == "finetune":
    try:
      runs_lib.resolve_base(config)
    except (ConfigError, RunError, FileNotFoundError, ValueError):  # the base run does not exist yet
      config = None
  lengths = _lengths(config, ablation.entrypoint) if config is not None else (train.seq_len, 0)
  if config is not None:
    vocab_size = estimate_lib.default_vocab_size(config)
    flops_per_step = train.batch_size * ModelConfig.from_config(config.model, vocab_size).train_flops(*lengths)
  return {"steps": train.steps, "tokens": train.steps * train.batch_size * sum(lengths),
          "flops": None if flops_per_step is None else train.steps * flops_per_step,
          "flops_per_step": flops_per_step, "config": config}


def _step_seconds(config) -> float:
  """train/estimate.py's step time of a pretraining config on this machine."""
  vocab_size = estimate_lib.default_vocab_size(config)
  peak = hardware.matmul_peak_flops(jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32, reps=2)
  bandwidth = estimate_lib.kernel_bandwidth(config, vocab_size, peak, seconds=_SECONDS)
  figures = estimate_lib.estimate(config, vocab_size, peak_flops=peak,
                                  bandwidth=bandwidth or hardware.memory_bandwidth())
  return figures["time"]["step_s"]


def _duration(seconds: float) -> str:
  hours, rest = divmod(int(round(seconds)), 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def describe(ablation, runs: list[dict]):
  """The dry run's closing lines, one at a time: runs, steps, tokens and FLOPs, then the estimated training time."""
  costs = [run_cost(ablation, run) for run in runs]
  steps, tokens = sum(c["steps"] for c in costs), sum(c["tokens"] for c in costs)
  known = all(c["flops"] is not None for c in costs)
  yield (f"{len(runs)} runs: {steps:,} steps, {tokens / 1e6:,.1f}M tokens, " +
         (f"{sum(c['flops'] for c in costs) / 1e12:,.1f} TFLOP (ModelConfig.train_flops, as the runs log train/flops)"
          if known else "FLOPs unknown until the base run exists"))
  if ablation.entrypoint != "pretrain":
    yield "time: not estimated (train/estimate.py predicts pretraining runs)"
    return
  try:
    step_s = _step_seconds(costs[0]["config"])
  except (ConfigError, RunError) as e:
    yield f"time: not estimated ({e})"
    return
  seconds = sum(c["steps"] * step_s * c["flops_per_step"] / costs[0]["flops_per_step"] for c in costs)
  yield (f"time: about {_duration(seconds)} of training, one run after another (train/estimate.py: {1e3 * step_s:.1f} "
         f"ms a step of {runs[0]['name']} on this machine, scaled by each run's FLOPs; evaluation not counted)")
