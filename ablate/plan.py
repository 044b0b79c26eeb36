"""The ablation plan: its config (`ablation_defaults`, `load_ablation`, metric specs), runs and status files.

An ablation config (configs/ablations/*.py) names the entrypoint (pretrain | finetune) and its config file,
overrides shared by all runs, named variants and/or a grid, seeds and metrics (see ablation_defaults()).
`expand` makes its runs, `<variant>_seed<seed>` for every variant and seed; `read_status` tells whether a run
ended, and how.

Metrics are `[final|min|max|mean|median:]key` over the run's metrics.jsonl (final by default), or
`key@L`, the value `key` (loss, perplexity, bits_per_byte) of `python -m train.evaluate` at length L, or `key@data`,
its value on `eval_data` at the run's own settings (a classifier's accuracy, macro_f1 or loss on a labelled file
that training never read).

The statistics keys (primary, directions, min_effect, max_seeds, interval, ladder_floor) decide what the report
tests and claims: `direction`, `is_cost`, `primary_metrics` and `min_effect` read them.
"""

import itertools
import json
import os
import statistics

import ml_collections

from model.config import ConfigError

X_AXES = ("step", "train/tokens", "train/flops", "time")
DATA = "data"  # `key@data`: evaluated on eval_data at the run's settings, written to RUN/eval_data.json
AGGREGATES = {"final": lambda v: v[-1], "min": min, "max": max, "mean": statistics.fmean,
              "median": statistics.median}


def ablation_defaults() -> ml_collections.ConfigDict:
  """Every key of an ablation config with its default."""
  c = ml_collections.ConfigDict()
  c.entrypoint = "pretrain"          # pretrain | finetune (python -m train.<entrypoint>)
  c.config = ""                      # the experiment's config file, e.g. configs/shakespeare_char.py
  c.overrides = ()                   # "key=value" for every run, as --config.key=value ("{seed}": the run's seed)
  c.variants = {}                    # name -> tuple of "key=value" overrides; or ((name, overrides), ...) in order
  c.grid = {}                        # axis name -> (key, (values...)): a variant per combination; a tuple of keys
                                     # with tuples of values ties dials: ("model.num_layers", "model.d_model")
  c.ladder = ""                      # a grid axis of model sizes: the first metric is fitted against compute
  c.sweep = ()                       # (x axis, line axis) of the grid: sweep.png draws the first metric against
                                     # the x axis's values, a line per line-axis value, a panel per the other axes'
                                     # values, and results.md gives each line's best x (a learning-rate transfer)
  c.seeds = (0, 1, 2)
  c.seed_key = "train.seed"          # the runs of a seed share its data order (data.seed -1 follows train.seed)
  c.baseline = ""                    # the variant the others are compared with (default: the first)
  c.confidence = 0.95                # of the intervals (Student t: they agree with the t-tests)
  c.interval = "t"                   # t | bootstrap: a mean's interval; the bootstrap only from 20 seeds, labelled
  c.alpha = 0.05                     # a difference is significant when its Holm-adjusted p-value is below
  c.metrics = ("eval/loss",)         # see the module docstring; the first one is the bar chart's
  c.primary = ()                     # the metrics verdicts rest on (default: the first metric): Holm runs over
                                     # variants x these; the other metrics are exploratory (no verdict)
  c.directions = {}                  # metric spec or key -> "lower" | "higher" (better); default: DIRECTIONS
  c.min_effect = {}                  # metric spec -> the smallest difference that matters, in its units (or one
                                     # number for every metric): "equivalent" needs a TOST against ±it
  c.max_seeds = 10                   # --until_significant: seeds per variant at the last look
  c.ladder_floor = 0.0               # a ladder's fit L = a C^-b + c holds c at this below 5 sizes (fitted from 5)
  c.curve = "eval/loss"              # metrics.jsonl key plotted against x_axis
  c.speedup = False                  # results.md: each variant's speedup to the baseline's final curve value
                                     # (ablate/speedup.py: baseline x / the x it is reached at, seed by seed)
  c.x_axis = "step"                  # step | train/tokens | train/flops | time: what the runs are compared at; not
                                     # step: every metric is taken at the largest x all runs reached (equal cost)
  c.eval_lengths = ()                # lengths for `key@L` metrics (python -m train.evaluate --seq_len)
  c.eval_data = "run:validation"     # what train.evaluate scores (default: each run's held-out split); `key@data`
                                     # metrics read its scores of the final checkpoint
  c.eval_stride = 0                  # 0: disjoint windows; else tokens between window starts
  c.eval_max_bytes = 0               # evaluate at most this many bytes of eval_data (0: all)
  c.parallel = 1                     # runs at a time, each a subprocess
  return c


def load_ablation(config) -> ml_collections.ConfigDict:
  """The ablation config filled with defaults; a key that is not an ablation key is a ConfigError."""
  values = ablation_defaults().to_dict()
  given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  for key in given:
    if key not in values:
      raise ConfigError(f"config.{key}: not an ablation key (known: {', '.join(values)})")
  merged = ml_collections.ConfigDict(dict(values, **given))
  if merged.entrypoint not in ("pretrain", "finetune"):
    raise ConfigError(f"config.entrypoint: expected pretrain or finetune, got {merged.entrypoint!r}")
  if not merged.config:
    raise ConfigError("config.config: name the experiment's config file, e.g. configs/shakespeare_char.py")
  if not merged.variants and not merged.grid:
    raise ConfigError("config.variants / config.grid: the ablation has no variants")
  for spec in merged.metrics:
    aggregate, _, length = parse_metric(spec)
    if aggregate not in AGGREGATES:
      raise ConfigError(f"config.metrics: {spec!r}: expected one of {', '.join(AGGREGATES)} before ':'")
    if length is not None and length != DATA and length not in tuple(merged.eval_lengths):
      raise ConfigError(f"config.metrics: {spec!r} needs {length} in config.eval_lengths "
                        f"{tuple(merged.eval_lengths)}")
  if merged.ladder and merged.ladder not in dict(merged.grid):
    raise ConfigError(f"config.ladder: {merged.ladder!r} is not a grid axis ({', '.join(dict(merged.grid))})")
  sweep = tuple(merged.sweep) if isinstance(merged.sweep, (tuple, list)) else (merged.sweep,)
  if sweep and (len(sweep) != 2 or any(axis not in dict(merged.grid) for axis in sweep)):
    raise ConfigError(f"config.sweep: expected two grid axes ({', '.join(dict(merged.grid))}), got "
                      f"{sweep}")
  for axis, (key, values) in dict(merged.grid).items():
    if isinstance(key, (tuple, list)) and any(not isinstance(v, (tuple, list)) or len(v) != len(key) for v in values):
      raise ConfigError(f"config.grid.{axis}: a tuple of {len(key)} keys takes tuples of {len(key)} values")
  if merged.x_axis not in X_AXES:
    raise ConfigError(f"config.x_axis: expected one of {', '.join(X_AXES)}, got {merged.x_axis!r}")
  for key in ("confidence", "alpha"):
    if not 0 < merged[key] < 1:
      raise ConfigError(f"config.{key}: expected a number in (0, 1), got {merged[key]}")
  _check_statistics(merged)
  baseline(merged)
  return merged


def _check_statistics(merged) -> None:
  """The statistics keys: primary metrics among the metrics, a direction for every metric, min_effect, max_seeds."""
  if merged.interval not in ("t", "bootstrap"):
    raise ConfigError(f"config.interval: expected t or bootstrap, got {merged.interval!r}")
  for spec in merged.primary:
    if spec not in merged.metrics:
      raise ConfigError(f"config.primary: {spec!r} is not in config.metrics {tuple(merged.metrics)}")
  for name, way in dict(merged.directions).items():
    if way not in ("lower", "higher"):
      raise ConfigError(f"config.directions.{name}: expected 'lower' or 'higher', got {way!r}")
  for spec in merged.metrics:
    if direction(spec, merged.directions) is None:
      raise ConfigError(f"config.directions: no known direction for metric {spec!r}; add {{{spec!r}: 'lower'}} "
                        "or 'higher'")
  effects = merged.min_effect if isinstance(merged.min_effect, (int, float)) else dict(merged.min_effect)
  for spec, value in (effects.items() if isinstance(effects, dict) else [("", effects)]):
    if spec and spec not in merged.metrics:
      raise ConfigError(f"config.min_effect: {spec!r} is not in config.metrics {tuple(merged.metrics)}")
    if not isinstance(value, (int, float)) or value <= 0:
      raise ConfigError(f"config.min_effect{'.' + spec if spec else ''}: expected a positive number, got {value!r}")
  if merged.max_seeds < max(2, len(merged.seeds)):
    raise ConfigError(f"config.max_seeds: expected at least max(2, the {len(merged.seeds)} seeds), got "
                      f"{merged.max_seeds}")


# Which way is better, by a metric key's last component (eval/loss -> loss): the name itself, or a name that
# starts with it and "_" (peak_memory_bytes), or ends with "_" and it (macro_f1, step_ms).
DIRECTIONS = {
    **dict.fromkeys(("loss", "nll", "ppl", "perplexity", "bits_per_byte", "error_rate", "error", "peak_memory",
                     "memory", "flops", "params", "time", "wall_s", "seconds", "ms", "latency"), "lower"),
    **dict.fromkeys(("accuracy", "acc", "f1", "rouge", "rougel", "bleu", "exact_match", "reward",
                     "tokens_per_sec", "throughput", "mfu"), "higher")}
# Cost counters: a function of the config, not of the seed; shown without a test.
COST_KEYS = ("flops", "tokens", "params", "num_params")


def direction(spec: str, overrides=None) -> str | None:
  """"lower" or "higher" (better) for a metric spec: config.directions by spec or key, else DIRECTIONS; None if
  neither knows it."""
  overrides = dict(overrides or {})
  key = parse_metric(spec)[1]
  if spec in overrides or key in overrides:
    return overrides.get(spec, overrides.get(key))
  name = key.rsplit("/", 1)[-1].lower()
  for word in sorted(DIRECTIONS, key=len, reverse=True):
    if name == word or name.startswith(word + "_") or name.endswith("_" + word):
      return DIRECTIONS[word]
  return None


def is_cost(spec: str) -> bool:
  """Whether a metric is a cost counter (train/flops, train/tokens, ...): deterministic, never tested."""
  return parse_metric(spec)[1].rsplit("/", 1)[-1] in COST_KEYS


def primary_metrics(ablation) -> list[str]:
  """The metrics the verdicts rest on: config.primary, default the first metric."""
  return list(ablation.primary) or list(ablation.metrics[:1])


def min_effect(ablation, spec: str) -> float | None:
  """The smallest difference that matters on `spec` (config.min_effect), None if not given."""
  if isinstance(ablation.min_effect, (int, float)):
    return float(ablation.min_effect) or None
  return dict(ablation.min_effect).get(spec)


def parse_metric(spec: str) -> tuple[str, str, int | str | None]:
  """(aggregate, key, evaluation length, DATA or None) of a metric spec such as "min:eval/loss", "loss@256" or
  "accuracy@data"."""
  if "@" in spec and (spec.rsplit("@", 1)[1].isdigit() or spec.endswith("@" + DATA)):
    key, length = spec.rsplit("@", 1)
    return "final", key, length if length == DATA else int(length)
  aggregate, _, key = spec.rpartition(":")
  return aggregate or "final", key, None


def _format(value) -> str:
  """A value as --config.key=value reads it."""
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return str(value)


def variants(ablation) -> list[tuple[str, tuple]]:
  """(name, overrides) of every variant in order: the named ones, then the grid product."""
  found = [(name, tuple(overrides)) for name, overrides in dict(ablation.variants).items()]  # pairs keep order
  for combination in _grid(ablation):
    if combination:
      name = ",".join(f"{axis}={value_name(v)}" for axis, _, v in combination)
      found.append((name, tuple(override for _, key, v in combination for override in _overrides(key, v))))
  names = [name for name, _ in found]
  if len(set(names)) != len(names):
    raise ConfigError(f"config.variants / config.grid: duplicate variant names {names}")
  for name in names:  # a variant's name names its run directory and log file
    if "/" in name or name.startswith("."):
      raise ConfigError(f"config.variants / config.grid: variant name {name!r} cannot name a run directory (a '/' "
                        f"or a leading '.'); expected a name without them")
  return found


def _grid(ablation):
  """Every combination of the grid's axes: a tuple of (axis, key, value)."""
  axes = [(axis, key, tuple(values)) for axis, (key, values) in dict(ablation.grid).items()]
  return itertools.product(*[[(axis, key, v) for v in values] for axis, key, values in axes])


def value_name(value) -> str:
  return "x".join(map(_format, value)) if isinstance(value, (tuple, list)) else _format(value)


def _overrides(key, value) -> list[str]:
  """key=value, or one override per key of a tied axis."""
  if isinstance(key, (tuple, list)):
    return [f"{k}={_format(v)}" for k, v in zip(key, value)]
  return [f"{key}={_format(value)}"]


def grid_cells(ablation) -> dict:
  """{variant: {axis: value}} of the grid's variants."""
  return {",".join(f"{axis}={value_name(v)}" for axis, _, v in combination): {axis: v for axis, _, v in combination}
          for combination in _grid(ablation) if combination}


def ladder_groups(ablation) -> dict:
  """{variant: its group}: the variant's name without the ladder axis (ablation.ladder)."""
  groups = {}
  for combination in _grid(ablation):
    name = ",".join(f"{axis}={value_name(v)}" for axis, _, v in combination)
    groups[name] = ",".join(f"{axis}={value_name(v)}" for axis, _, v in combination if axis != ablation.ladder) or "all"
  return groups


def references(ablation) -> dict:
  """{variant: the variant it is compared with, None for a baseline}: the baseline for every variant, or with a
  ladder, the baseline's setting of the other axes at the variant's own size."""
  reference = baseline(ablation)
  if not ablation.ladder:
    return {name: None if name == reference else reference for name, _ in variants(ablation)}
  groups, size_of = ladder_groups(ablation), {}
  for combination in _grid(ablation):
    name = ",".join(f"{axis}={value_name(v)}" for axis, _, v in combination)
    size_of[name] = next(value_name(v) for axis, _, v in combination if axis == ablation.ladder)
  base_group = groups[reference]
  same = {(groups[name], size_of[name]): name for name in groups}
  return {name: None if groups[name] == base_group else same[(base_group, size_of[name])] for name in groups}


def baseline(ablation) -> str:
  names = [name for name, _ in variants(ablation)]
  if ablation.baseline and ablation.baseline not in names:
    raise ConfigError(f"config.baseline: {ablation.baseline!r} is not a variant ({', '.join(names)})")
  return ablation.baseline or names[0]


def expand(ablation, extra: dict | None = None) -> list[dict]:
  """Runs seed by seed, every variant of a seed before the next seed (interleaved, so a slow drift of a shared
  machine hits all variants alike), then `extra` {variant: [seeds]} added by --until_significant; each run is
  {name, variant, seed, overrides}, "{seed}" in an override replaced by the run's seed (a branch of the same seed's
  run of another ablation: train.branch_from=runs/stable/runs/constant_seed{seed})."""
  overrides_of = dict(variants(ablation))
  order = [(name, seed) for seed in ablation.seeds for name in overrides_of]
  order += [(name, seed) for name, seeds in (extra or {}).items() for seed in seeds if seed not in ablation.seeds]
  return [{"name": f"{name}_seed{seed}", "variant": name, "seed": seed,
           "overrides": tuple(o.replace("{seed}", str(seed)) for o in (*ablation.overrides, *overrides_of[name]))
           + (f"{ablation.seed_key}={seed}",)}
          for name, seed in order]


def extra_seeds(workdir: str) -> dict:
  """{variant: [seeds]} that --until_significant added (WORKDIR/extra_seeds.json)."""
  path = os.path.join(workdir, "extra_seeds.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def status_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, "status", f"{name}.json")


def read_status(workdir: str, name: str) -> dict | None:
  """{"status": done | failed, "wall_s", ...} of a run that ended, None if it never ended."""
  path = status_path(workdir, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)
