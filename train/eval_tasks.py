"""Evaluation tasks: their definition, their examples and few-shot prompts, and how each kind is scored.

Offers `Task` (every key, its default and meaning in `TASK_KEYS`), `KINDS`, `builtin_tasks`, `load_task` (a built-in
name from configs/eval/, or a user's .py file with get_config() / .yaml file), `Example`, `examples` (records ->
prompts with few-shot shots drawn by a seed per example, so a prompt does not depend on --limit or on the order),
`evaluate_multiple_choice` and `evaluate_generation` (a Scorer from train/likelihood.py and train/scores.py's scores).
Prompts follow lm-evaluation-harness: description, then each shot as prompt + target_delimiter + answer followed by
fewshot_delimiter, then the example's prompt; a choice (or a generated answer) continues after target_delimiter.
"""

import dataclasses
import importlib.util
import os
import re

import numpy as np
import yaml

from data.finetuning import render
from data.sources import DataError, read_records
from model.config import ConfigError
from train import scores
from train.likelihood import Scorer

KINDS = ("multiple_choice", "generation", "classification")
BUILTIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "eval")

TASK_KEYS = {  # key: (default, meaning)
    "name": ("", "the task's name: results go to eval_<name>.json (default: the file's name)"),
    "kind": ("", "multiple_choice (log-likelihood of each choice) | generation | classification (a trained head)"),
    "data": ("", "JSONL examples: a file, glob or directory (classification: the run's text and label fields)"),
    "description": ("", "text before the shots and the prompt"),
    "prompt": ("", "str.format template over a record (a list of strings joins with spaces): the context"),
    "choices": ((), "multiple_choice: the choices, the same for every record ..."),
    "choices_field": ("", "multiple_choice: ... or the record field holding its list of choices"),
    "label_field": ("", "multiple_choice: the field of the gold choice, its index or its text"),
    "target_delimiter": (" ", "between the prompt and a choice, or a shot's answer"),
    "target": ("", "generation: template of the reference answer ..."),
    "references_field": ("", "generation: ... or the field holding a list of references (the best one counts)"),
    "fewshot": (0, "shots before each prompt"),
    "fewshot_data": ("", "JSONL the shots come from (default: data, the example itself excluded)"),
    "fewshot_seed": (1234, "the shots of example i are drawn by the generator seeded with (fewshot_seed, i)"),
    "fewshot_delimiter": ("\n\n", "after each shot"),
    "max_new_tokens": (64, "generation: tokens generated at most"),
    "until": (("\n\n",), "generation: stop strings; the answer ends before the first"),
    "beam": (1, "generation: 1 = greedy, more = beam search with this many beams"),
    "length_penalty": (1.0, "generation, beam search: a hypothesis scores sum(log p) / length**length_penalty"),
    "answer_regex": ("", "generation: exact match compares the first match (its group 1) of prediction and reference"),
    "metrics": ((), f"generation: reported scores, from {scores.GENERATION_METRICS} (default: all)"),
}


@dataclasses.dataclass(frozen=True)
class Task:
  """One evaluation task; see TASK_KEYS."""
  name: str
  kind: str
  data: str
  description: str = ""
  prompt: str = ""
  choices: tuple = ()
  choices_field: str = ""
  label_field: str = ""
  target_delimiter: str = " "
  target: str = ""
  references_field: str = ""
  fewshot: int = 0
  fewshot_data: str = ""
  fewshot_seed: int = 1234
  fewshot_delimiter: str = "\n\n"
  max_new_tokens: int = 64
  until: tuple = ("\n\n",)
  beam: int = 1
  length_penalty: float = 1.0
  answer_regex: str = ""
  metrics: tuple = ()

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


assert [f.name for f in dataclasses.fields(Task)] == list(TASK_KEYS)


def builtin_tasks() -> list[str]:
  """The names of the task files in configs/eval/."""
  return sorted(f[:-3] for f in os.listdir(BUILTIN_DIR) if f.endswith(".py") and not f.startswith("_"))


def _read_definition(spec: str) -> tuple[dict, str]:
  """(the keys a task file defines, its default name): a built-in name, a .py file with get_config(), or .yaml."""
  path = os.path.join(BUILTIN_DIR, f"{spec}.py") if spec in builtin_tasks() else spec
  if not path.endswith((".py", ".yaml", ".yml")):
    raise ConfigError(f"--task={spec}: not a built-in task ({', '.join(builtin_tasks())}) nor a .py / .yaml file")
  if not os.path.isfile(path):
    raise ConfigError(f"--task={spec}: no such file")
  name = os.path.splitext(os.path.basename(path))[0]
  try:
    if path.endswith(".py"):
      module_spec = importlib.util.spec_from_file_location(f"ablax_task_{name}", path)
      module = importlib.util.module_from_spec(module_spec)
      module_spec.loader.exec_module(module)
      definition = module.get_config()
      definition = definition.to_dict() if hasattr(definition, "to_dict") else definition
    else:
      with open(path) as f:
        definition = yaml.safe_load(f)
  except Exception as e:  # noqa: BLE001  (a user's file: any failure is one line naming it)
    raise ConfigError(f"--task={spec}: cannot load this task file ({type(e).__name__}: {e})".splitlines()[0]) from None
  if not isinstance(definition, dict):
    raise ConfigError(f"--task={spec}: expected a mapping of task keys, got {type(definition).__name__}")
  return definition, name


def _checked(spec: str, values: dict) -> dict:
  """Task keys with their defaults' types (lists become tuples); an unknown key or a wrong type is a ConfigError."""
  unknown = sorted(set(values) - set(TASK_KEYS))
  if unknown:
    raise ConfigError(f"--task={spec}: unknown task key '{unknown[0]}' (keys: {', '.join(TASK_KEYS)})")
  out = {}
  for key, value in values.items():
    default = TASK_KEYS[key][0]
    if isinstance(default, tuple) and isinstance(value, (list, tuple)):
      value = tuple(value)
    elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if type(value) is not type(default):
      raise ConfigError(f"--task={spec}: key '{key}' is {value!r}; expected a {type(default).__name__}")
    out[key] = value
  return out


def load_task(spec: str, **overrides) -> Task:
  """The task of a built-in name or a file, with `overrides` (keys of TASK_KEYS whose value is not None) applied."""
  definition, name = _read_definition(spec)
  values = _checked(spec, {"name": name, **definition, **{k: v for k, v in overrides.items() if v is not None}})
  task = Task(**{"kind": "", "data": "", **values})
  problems = []
  if not re.fullmatch(r"[\w.-]+", task.name):
    problems.append(f"name {task.name!r}: letters, digits, '_', '-' and '.' only (it names eval_<name>.json)")
  if task.kind not in KINDS:
    problems.append(f"kind '{task.kind}': expected one of {', '.join(KINDS)}")
  if not task.data:
    problems.append("data: a JSONL path is required")
  if task.kind == "multiple_choice" and not (task.prompt and task.label_field and bool(task.choices) ^
                                             bool(task.choices_field)):
    problems.append("multiple_choice needs prompt, label_field and one of choices / choices_field")
  if task.kind == "generation" and not (task.prompt and bool(task.target) ^ bool(task.references_field)):
    problems.append("generation needs prompt and one of target / references_field")
  bad = [m for m in task.metrics if m not in scores.GENERATION_METRICS]
  if bad:
    problems.append(f"metrics {bad}: expected names from {', '.join(scores.GENERATION_METRICS)}")
  for key in ("fewshot", "max_new_tokens", "beam"):
    if getattr(task, key) < (0 if key == "fewshot" else 1):
      problems.append(f"{key} {getattr(task, key)}: out of range")
  if problems:
    raise ConfigError(f"--task={spec}: {problems[0]}")
  return task


@dataclasses.dataclass(frozen=True)
class Example:
  """One prompt to score: its context (description, shots, prompt), and the choices and gold index (multiple
  choice) or the references (generation)."""
  context: str
  choices: tuple = ()
  gold: int = -1
  references: tuple = ()


def _fields(record: dict) -> dict:
  """The record with lists of strings joined by spaces (SciTLDR's source sentences), for templates."""
  return {k: " ".join(v) if isinstance(v, list) and all(isinstance(x, str) for x in v) else v
          for k, v in record.items()}


def _choices_and_gold(task: Task, record: dict) -> tuple[tuple, int]:
  choices = task.choices or record.get(task.choices_field)
  if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) for c in choices):
    raise DataError(f"task {task.name}: choices {choices!r}: expected a list of strings")
  label = record.get(task.label_field)
  if isinstance(label, str) and label in choices:
    return tuple(choices), list(choices).index(label)
  if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(choices):
    return tuple(choices), label
  raise DataError(f"task {task.name}: label {label!r} ({task.label_field}) is neither a choice nor an index of one")


def _references(task: Task, record: dict) -> tuple:
  if not task.references_field:
    return (render(task.target, _fields(record)),)
  references = record.get(task.references_field)
  if not isinstance(references, list) or not references or not all(isinstance(r, str) for r in references):
    raise DataError(f"task {task.name}: {task.references_field} {str(references)[:60]}: expected a list of strings")
  return tuple(references)


def _answer(task: Task, record: dict) -> str:
  """A shot's answer: its gold choice, or its first reference."""
  if task.kind == "multiple_choice":
    choices, gold = _choices_and_gold(task, record)
    return choices[gold]
  return _references(task, record)[0]


def _fields_used(task: Task) -> list[str]:
  if task.kind == "multiple_choice":
    return [f for f in (task.label_field, task.choices_field) if f]
  return [task.references_field] if task.references_field else []


def examples(task: Task, limit: int = 0) -> list[Example]:
  """The task's examples (the first `limit`, 0: all), each prompt preceded by its `fewshot` shots."""
  records = read_records(task.data, _fields_used(task))
  pool = records if not task.fewshot_data else read_records(task.fewshot_data, _fields_used(task))
  candidates = len(pool) - (0 if task.fewshot_data else 1)
  if task.fewshot > candidates:
    raise DataError(f"task {task.name}: {task.fewshot} shots from {candidates} records")
  out = []
  for i, record in enumerate(records[:limit or None]):
    shots = ""
    if task.fewshot:
      rng = np.random.default_rng([task.fewshot_seed, i])
      drawn = rng.choice(candidates, task.fewshot, replace=False)
      drawn = [int(j) + (j >= i and not task.fewshot_data) for j in drawn]  # skip the example itself
      shots = "".join(render(task.prompt, _fields(pool[j])) + task.target_delimiter + _answer(task, pool[j]) +
                      task.fewshot_delimiter for j in drawn)
    context = task.description + shots + render(task.prompt, _fields(record))
    if task.kind == "multiple_choice":
      choices, gold = _choices_and_gold(task, record)
      out.append(Example(context, choices, gold))
    else:
      out.append(Example(context, references=_references(task, record)))
  return out


def evaluate_multiple_choice(task: Task, scorer: Scorer, items: list[Example]) -> tuple[dict, list[dict]]:
  """(acc, acc_norm, acc_bytes; each example's log-likelihoods and scores): every choice, after target_delimiter,
  scored as the continuation of the context."""
  pairs = [(ex.context, task.target_delimiter + choice) for ex in items for choice in ex.choices]
  results = iter(scorer.loglikelihood(pairs))
  lls = [[next(results)[0] for _ in ex.choices] for ex in items]
  means, per_example = scores.choice_scores(lls, [list(ex.choices) for ex in items], [ex.gold for ex in items])
  return means, [dict(s, gold=ex.gold, loglikelihoods=ll) for ex, ll, s in zip(items, lls, per_example)]


def evaluate_generation(task: Task, scorer: Scorer, items: list[Example]) -> tuple[dict, list[dict]]:
  """(mean scores; each example's prediction and scores): generated from the context, its leading whitespace
  dropped, cut at the first stop string."""
  predictions = scorer.generate([ex.context for ex in items], max_new_tokens=task.max_new_tokens, until=task.until,
                                beam=task.beam, length_penalty=task.length_penalty, strip=True)
  metrics = task.metrics or (("exact_match",) if task.answer_regex else scores.GENERATION_METRICS)
  means, per_example = scores.generation_scores(predictions, [list(ex.references) for ex in items], metrics,
                                                task.answer_regex)
  return means, [dict(s, prediction=p) for p, s in zip(predictions, per_example)]
