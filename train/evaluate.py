"""Evaluation entrypoint: a trained run on tasks (multiple choice, generation, classification), or its loss,
perplexity and bits per byte on a text corpus.

  python -m train.evaluate --workdir=RUN --task=sst2 [--task=gsm8k --task=my_task.yaml --limit=N --fewshot=N]
  python -m train.evaluate --workdir=runs/shakespeare_char --data=data.txt [--seq_len=N --stride=N ...]
  python -m train.evaluate --workdir=RUN --data=run:validation --seq_len=64 --seq_len=256 --stride=0

`--task` is a built-in task (configs/eval/) or a task file (train/eval_tasks.py lists its keys); each writes
WORKDIR/eval_<task>.json and a row of the printed table. `--data=run:validation` is the run's own held-out split
(its config.data rules); `--seq_len` may repeat (one result per length; --stride=0 means disjoint windows).

Offers `sliding_windows` and `evaluate_documents` (pure: model, params, texts -> metrics), `evaluate_classifier`,
`evaluate_task` and `run_tasks`. Every text token is scored once from its left context; past the first window,
with at least seq_len - stride tokens of it (Hugging Face's sliding window).
"""

import functools
import json
import math
import os
import time

import jax
import numpy as np
import tqdm
from absl import app, flags, logging

from data import finetuning
from data.batch import rows
from data.pipeline import read_splits
from data.sources import DataError, read_documents, read_records
from model.config import ConfigError
from model.families import family
from train import eval_tasks, preference_eval, tasks
from train import mesh as mesh_lib
from train.checkpoint import read_run_config
from train.cli import fail, parse_flags, run_reporting_errors
from train.likelihood import Scorer
from train.loop import evaluate
from train.runs import Loaded, load_run
from train.step import eval_step, weighted_cross_entropy
from train.workdir import write_atomic

TOOL = "train.evaluate"  # marks our JSON files: only those are ever overwritten
RUN_VALIDATION = "run:validation"
PREFERENCE_FIGURES = ("loss", "reward_accuracy", "chosen_reward", "rejected_reward", "reward_margin", "kl",
                      "sample_length", "reward")


def sliding_windows(num_targets: int, window: int, stride: int):
  """(begin, end, first_scored) per window over targets [0, num_targets); each target scored exactly once."""
  if not 0 < stride <= window:
    raise ValueError(f"stride {stride}: expected 0 < stride <= window ({window})")
  begin, scored_end = 0, 0
  while scored_end < num_targets:
    end = min(begin + window, num_targets)
    yield begin, end, scored_end
    begin, scored_end = begin + stride, end


@functools.partial(jax.jit, static_argnames=("model",))
def _row_nats_B(params, batch, *, model):
  """Weighted sum of the target tokens' negative log-likelihoods, per row."""
  logits_BxLxV = model.apply({"params": params}, batch, method="forward")
  return jax.vmap(weighted_cross_entropy)(logits_BxLxV, batch["targets_BxL"], batch["weights_BxL"])[0]


def evaluate_documents(model, params, tokenizer, texts, *, window: int, stride: int, batch_size: int,
                       progress: bool = True) -> dict:
  """Loss (nats per text token), perplexity and bits per byte of `texts`; bos is context, eos unscored."""
  if batch_size <= 0:
    raise ValueError(f"batch_size {batch_size}: expected a positive integer")
  texts = list(texts)
  # Stream [bos] + ids: input t predicts stream[t + 1], so the targets are exactly the text's ids.
  streams = [np.asarray([tokenizer.bos_id] + ids, np.int32) for ids in tokenizer.encode_batch(texts)]
  spans = [(d, *w) for d, s in enumerate(streams) for w in sliding_windows(len(s) - 1, window, stride)]
  num_tokens = sum(len(s) - 1 for s in streams)
  if not num_tokens:
    raise DataError(f"{len(streams)} documents hold no tokens to score")

  total_nats, pending = 0.0, None
  bar = tqdm.tqdm(total=len(spans), desc="eval", unit="window", dynamic_ncols=True, mininterval=1.0,
                  disable=not progress)
  for first in range(0, len(spans), batch_size):
    windows = spans[first:first + batch_size]
    windows += [(0, 0, 0, 0)] * (batch_size - len(windows))  # empty rows (all padding) keep the compiled shape
    batch = rows([streams[doc][begin:end] for doc, begin, end, _ in windows], window,
                 targets=[streams[doc][begin + 1:end + 1] for doc, begin, end, _ in windows],
                 weights=[[0.0] * (scored - begin) + [1.0] * (end - scored) for _, begin, end, scored in windows])
    nats_B = _row_nats_B(params, batch, model=model)
    if pending is not None:  # fetch the previous batch only after dispatching this one
      total_nats += float(np.sum(np.asarray(pending[0], np.float64)))
      bar.update(pending[1])
    pending = (nats_B, min(batch_size, len(spans) - first))
  total_nats += float(np.sum(np.asarray(pending[0], np.float64)))
  bar.update(pending[1])
  bar.close()

  num_bytes = sum(len(t.encode("utf-8")) for t in texts)
  loss = total_nats / num_tokens
  return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
          "bits_per_byte": total_nats / math.log(2) / max(num_bytes, 1),
          "tokens": num_tokens, "bytes": num_bytes, "documents": len(streams)}


def evaluate_classifier(workdir: str, data: str, *, step: int | None = None, batch_size: int = 32,
                        max_records: int = 0) -> dict:
  """Loss, accuracy and macro-F1 of a classification run on a JSONL file with the run's text/label fields."""
  loaded = load_run(workdir, step)
  if loaded.run.labels is None:
    raise ConfigError(f"{workdir}: not a classification run (config.task={loaded.run.config.task!r})")
  return classifier_scores(loaded, data, batch_size=batch_size, max_records=max_records)


def classifier_scores(loaded: Loaded, data: str, *, batch_size: int = 32, max_records: int = 0) -> dict:
  """evaluate_classifier's scores of a loaded classification run."""
  run, config = loaded.run, loaded.run.config
  records = read_records(data, [config.data.text_field, config.data.label_field], max_records,
                         config.data.encoding_errors)
  eval_rows = finetuning.classify_rows(
      run.tokenizer, [str(r[config.data.text_field]) for r in records],
      finetuning.encode_labels([str(r[config.data.label_field]) for r in records], run.labels), config.train.seq_len)
  eval_fn = jax.jit(functools.partial(eval_step, loss_fn=tasks.make_loss("classify", run)))
  metrics = evaluate(eval_fn, loaded.trainable, run.frozen, eval_rows, batch_size, len(records),
                     mesh_lib.batch_sharding(run.mesh))
  return {"loss": metrics["eval/loss"], "accuracy": metrics["eval/accuracy"], "macro_f1": metrics["eval/macro_f1"],
          "examples": len(records), "step": loaded.step}


def evaluate_task(loaded: Loaded, task: eval_tasks.Task, *, limit: int = 0, batch_size: int = 32,
                  progress: bool = False) -> dict:
  """The task's mean scores (`metrics`), example count, seconds and each example's results (`per_example`);
  `progress`: a progress bar of the requests on stderr."""
  start = time.time()
  if task.kind == "classification":
    result = classifier_scores(loaded, task.data, batch_size=batch_size, max_records=limit)
    metrics, per_example, count = {k: result[k] for k in ("accuracy", "macro_f1", "loss")}, [], result["examples"]
  else:
    scorer = Scorer(loaded.run.model, loaded.params, loaded.run.tokenizer, batch_size=batch_size,
                    prefix=tasks.prompt_as_prefix(loaded.run.config), progress=progress)
    items = eval_tasks.examples(task, limit)
    run_kind = (eval_tasks.evaluate_multiple_choice if task.kind == "multiple_choice"
                else eval_tasks.evaluate_generation)
    metrics, per_example = run_kind(task, scorer, items)
    count = len(items)
  return {"metrics": metrics, "examples": count, "seconds": round(time.time() - start, 1), "per_example": per_example}


def run_tasks(workdir: str, specs: list[str], *, step: int | None = None, limit: int = 0, batch_size: int = 32,
              output: str | None = None, progress: bool = False, **overrides) -> list[dict]:
  """Evaluates the run in `workdir` on each task (a built-in name or a task file; `overrides`: task keys), writes
  WORKDIR/eval_<task>.json (or `output`, one task) and prints a table; returns the records. `progress`: a progress
  bar per task on stderr."""
  if limit < 0:
    raise ConfigError(f"--limit={limit}: expected 0 (all) or a positive number of examples")
  if output and len(specs) > 1:
    raise ConfigError("--output names one file: give one --task with it")
  task_list = [eval_tasks.load_task(spec, **overrides) for spec in specs]  # every definition checked first
  loaded = load_run(workdir, step)
  for task in task_list:  # refused before any task runs
    if task.kind == "classification" and loaded.run.labels is None:
      raise ConfigError(f"--task={task.name}: a classification task needs a classification run; {workdir} has "
                        f"config.task={loaded.run.config.get('task', 'none')!r}")
    if task.kind != "classification" and not family(loaded.run.model.cfg).generates:
      raise ConfigError(f"--task={task.name}: {workdir} is a {loaded.run.model.cfg.family} run, which predicts no "
                        f"next token; it takes classification tasks only")
  records = []
  for task in task_list:
    result = evaluate_task(loaded, task, limit=limit, batch_size=batch_size, progress=progress)
    record = dict(tool=TOOL, workdir=os.path.abspath(workdir), step=int(loaded.step), data=f"task:{task.name}",
                  task=task.as_dict(), limit=limit, **result)
    path = _output_path(output or os.path.join(workdir, f"eval_{task.name}.json"), record)
    write_atomic(path, json.dumps(record, indent=2))
    print(f"{task.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()) +
          f" ({result['examples']} examples, {result['seconds']} s) -> {path}")
    records.append(record)
  _print_table(workdir, records)
  return records


def _print_table(workdir: str, records: list[dict]) -> None:
  """One row per task and score."""
  print(f"\n{workdir} step {records[0]['step']}")
  print(f"| {'task':<14} | {'kind':<15} | {'shots':>5} | {'examples':>8} | {'score':<12} | {'value':>7} |")
  print(f"|{'-' * 16}|{'-' * 17}|{'-' * 7}|{'-' * 10}|{'-' * 14}|{'-' * 9}|")
  for r in records:
    for key, value in r["metrics"].items():
      print(f"| {r['task']['name']:<14} | {r['task']['kind']:<15} | {r['task']['fewshot']:>5} | {r['examples']:>8} | "
            f"{key:<12} | {value:>7.4f} |")


def _first_bytes(texts: list[str], max_bytes: int) -> list[str]:
  """The texts cut to `max_bytes` UTF-8 bytes in all (0: whole); read_documents keeps a long document whole."""
  if max_bytes <= 0:
    return texts
  kept, left = [], max_bytes
  for text in texts:
    if left <= 0:
      break
    data = text.encode("utf-8")[:left]
    kept.append(data.decode("utf-8", errors="ignore"))  # drops a character cut in half
    left -= len(data)
  return kept


def _output_path(path: str, record: dict) -> str:
  """`path`, or path.1, .2 ... (before the extension) when it holds a file not ours for this step and data."""
  stem, ext = os.path.splitext(path)
  for i in range(1000):
    candidate = path if i == 0 else f"{stem}.{i}{ext}"
    if not os.path.exists(candidate):
      return candidate
    try:
      with open(candidate) as f:
        old = json.load(f)
    except (OSError, ValueError):
      continue
    if isinstance(old, dict) and all(old.get(k) == record[k] for k in ("tool", "step", "data")):
      return candidate
  raise ConfigError(f"--output={path}: 1000 files of this name exist already; pass another --output")


def define_flags() -> None:
  """The command-line flags; defined only when run as a program, so importing never clashes with other CLIs."""
  flags.DEFINE_string("workdir", None, "Run directory with config.json, tokenizer and checkpoints.")
  flags.DEFINE_string("data", None, "Text file, glob, directory or JSONL (as data.train_path), or "
                      f"{RUN_VALIDATION} for the run's own held-out split.")
  flags.DEFINE_multi_string("task", None, "Evaluation task, may repeat: a built-in name (configs/eval/: "
                            f"{', '.join(eval_tasks.builtin_tasks())}) or a task file (.py with get_config(), .yaml).")
  flags.DEFINE_integer("limit", 0, "--task: evaluate the first N examples (0: all).")
  flags.DEFINE_integer("fewshot", None, "--task: shots per prompt (default: the task's).")
  flags.DEFINE_integer("fewshot_seed", None, "--task: seed of the shots drawn (default: the task's).")
  flags.DEFINE_integer("beam", None, "--task, generation: beam size, 1 = greedy (default: the task's).")
  flags.DEFINE_string("field", "text", "JSONL field holding the text.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_multi_integer("seq_len", None, "Window length, may repeat (default: config.train.seq_len).")
  flags.DEFINE_integer("stride", None, "Tokens between window starts (default: seq_len // 2; 0: seq_len).")
  flags.DEFINE_integer("batch_size", None, "Windows (--data, default 8) or requests (--task, default 32) per "
                       "forward pass.")
  flags.DEFINE_integer("max_bytes", 0, "Read at most about this many bytes (0: all).")
  flags.DEFINE_string("output", None, "JSON file (default: WORKDIR/eval_<data stem>_L<seq_len>.json or "
                      "WORKDIR/eval_<task>.json).")
  flags.mark_flags_as_required(["workdir"])


def run(workdir: str, data: str, *, field: str = "text", step: int | None = None, seq_len: int | None = None,
        stride: int | None = None, batch_size: int = 8, max_bytes: int = 0, output: str | None = None) -> dict:
  """Evaluates the run in `workdir` on `data`; prints a table and writes the JSON record.

  A classification fine-tuning run is scored by accuracy and macro-F1 on the JSONL records of `data`
  (its own text and label fields), a preference run on its pairs and samples for its prompts
  (train/preference_eval.evaluate_records); every other run by loss, perplexity and bits per byte.
  """
  if read_run_config(workdir).get("task") == "classify":
    result = evaluate_classifier(workdir, data, step=step, batch_size=batch_size)
    return _write(result, workdir, data, output, "classify", {}, ("loss", "accuracy", "macro_f1"), ("examples",))
  if read_run_config(workdir).get("task") == "preference":
    result = preference_eval.evaluate_records(workdir, None if data == RUN_VALIDATION else data, step=step,
                                              batch_size=batch_size)
    return _write(result, workdir, data, output, "preference", {}, [k for k in PREFERENCE_FIGURES if k in result],
                  ("examples",))
  loaded = load_run(workdir, step)
  config, model, params, tokenizer, step = (loaded.run.config, loaded.run.model, loaded.params, loaded.run.tokenizer,
                                            loaded.step)
  fam = family(model.cfg)
  if not fam.generates or fam.seq2seq:  # an encoder's position t sees token t; an encoder-decoder needs an input
    raise ConfigError(f"--data scores a decoder's next-token loss; {workdir} is a {model.cfg.family} run: evaluate it "
                      "on a task (--task)")
  seq_len = config.train.seq_len if seq_len is None else seq_len
  stride = max(1, seq_len // 2) if stride is None else stride or seq_len
  for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
    if value <= 0:
      raise ConfigError(f"--{name}={value}: expected a positive integer")
  if not 0 < stride <= seq_len:
    raise ConfigError(f"--stride={stride}: expected 0 < stride <= --seq_len={seq_len}")
  if config.model.position == "learned" and seq_len > config.model.max_len:
    raise ConfigError(f"--seq_len={seq_len} exceeds config.model.max_len={config.model.max_len} "
                      "of the run's learned position table")
  if data == RUN_VALIDATION:
    texts = _first_bytes(read_splits(config.data)[1], max_bytes)
  else:
    texts = _first_bytes(read_documents(data, field, max_bytes, config.data.encoding_errors), max_bytes)
  result = evaluate_documents(model, params, tokenizer, texts, window=seq_len, stride=stride,
                              batch_size=batch_size)
  result["step"] = step
  return _write(result, workdir, data, output, f"L{seq_len}", {"seq_len": seq_len, "stride": stride},
                ("loss", "perplexity", "bits_per_byte"), ("tokens", "bytes", "documents"))


def _write(result: dict, workdir: str, data: str, output, suffix: str, settings: dict, figures, counts) -> dict:
  """Prints the result and writes it as JSON (default WORKDIR/eval_<data stem>_<suffix>.json)."""
  record = dict(result, tool=TOOL, workdir=os.path.abspath(workdir), step=int(result["step"]),
                data=os.path.abspath(data) if os.path.exists(data) else data, **settings)
  stem = "validation" if data == RUN_VALIDATION else os.path.splitext(os.path.basename(data.rstrip("/")))[0]
  path = _output_path(output or os.path.join(workdir, f"eval_{stem or 'data'}_{suffix}.json"), record)
  write_atomic(path, json.dumps(record, indent=2))
  print(f"{workdir} step {record['step']} on {data}" + "".join(f", {k} {v}" for k, v in settings.items()))
  for key in figures:
    print(f"  {key + ' ':<14}{result[key]:.4f}")
  for key in counts:
    print(f"  {key + ' ':<14}{result[key]}")
  print(f"wrote {path}")
  return record


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  f = flags.FLAGS
  if bool(f.data) == bool(f.task):
    fail("give --data=CORPUS (loss, perplexity, bits per byte) or --task=NAME (a task), one of the two")
  if f.task:
    run_reporting_errors(run_tasks, f.workdir, f.task, step=f.step, limit=f.limit, batch_size=f.batch_size or 32,
                         output=f.output, progress=True, fewshot=f.fewshot, fewshot_seed=f.fewshot_seed, beam=f.beam)
    return
  if f.output and f.seq_len and len(f.seq_len) > 1:
    fail("--output names one file: give one --seq_len with it")
  for seq_len in f.seq_len or [None]:
    run_reporting_errors(run, f.workdir, f.data, field=f.field, step=f.step, seq_len=seq_len, stride=f.stride,
                         batch_size=f.batch_size or 8, max_bytes=f.max_bytes, output=f.output)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
