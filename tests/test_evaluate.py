"""Evaluation: bits per byte by hand, sliding windows vs direct forwards, batch independence, the CLI (corpora and
tasks)."""

import functools
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from data.sources import split_documents
from data.tokenizer import CharTokenizer
from model.config import ModelConfig
from model.families import build_model
from test_train import REPO, TEXT, load_parts, tiny_config
from train import eval_tasks
from train.evaluate import _output_path, evaluate_documents, sliding_windows
from train.likelihood import Scorer
from train.pretrain import train_and_evaluate

UNICODE = "Le café à Zürich: 日本語の本, naïve. "  # 1-, 2- and 3-byte characters


@pytest.fixture(scope="module")
def random_model():
  """A tiny randomly initialised char model whose vocabulary covers TEXT and UNICODE."""
  tokenizer = CharTokenizer(TEXT + UNICODE)
  model = build_model(ModelConfig(vocab_size=tokenizer.vocab_size, num_layers=2, d_model=32, num_heads=4,
                                  num_kv_heads=2, max_len=64))
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 1), np.int32))["params"])
  return model, params, tokenizer


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """(workdir, corpus, (model, params, tokenizer)) of a tiny char run: 3 steps, seq_len 16, max_len 32."""
  tmp_path = tmp_path_factory.mktemp("run")
  workdir = str(tmp_path / "run")
  config = tiny_config(tmp_path, steps=3, eval_every=3, checkpoint_every=3)
  train_and_evaluate(config, workdir)
  return workdir, str(tmp_path / "corpus.txt"), load_parts(workdir)[1:4]


@functools.partial(jax.jit, static_argnames=("model",))
def _forward(params, tokens_1xL, *, model):
  return model.apply({"params": params}, tokens_1xL)


def direct_nats(model, params, stream):
  """Sum of -log p(stream[t+1] | stream[:t+1]) from one full forward, in float64 numpy."""
  logits_LxV = np.asarray(_forward(params, np.asarray([stream[:-1]], np.int32), model=model)[0], np.float64)
  shifted_LxV = logits_LxV - logits_LxV.max(-1, keepdims=True)
  log_probs_LxV = shifted_LxV - np.log(np.sum(np.exp(shifted_LxV), -1, keepdims=True))
  return -float(np.sum(log_probs_LxV[np.arange(len(stream) - 1), stream[1:]]))


def evaluate(model_tuple, texts, window, stride, batch_size=4):
  model, params, tokenizer = model_tuple
  return evaluate_documents(model, params, tokenizer, texts, window=window, stride=stride,
                            batch_size=batch_size, progress=False)


def test_bits_per_byte_two_ways(random_model):
  model, params, tokenizer = random_model
  result = evaluate(random_model, [UNICODE], window=64, stride=64)
  ids = tokenizer.encode(UNICODE)
  num_bytes = len(UNICODE.encode("utf-8"))
  assert result["tokens"] == len(ids) < num_bytes == result["bytes"] and result["documents"] == 1
  from_loss = result["loss"] * result["tokens"] / math.log(2) / result["bytes"]
  by_hand = direct_nats(model, params, [tokenizer.bos_id] + ids) / math.log(2) / num_bytes
  assert result["bits_per_byte"] == pytest.approx(from_loss, rel=1e-9)
  assert result["bits_per_byte"] == pytest.approx(by_hand, rel=1e-5)
  assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)


def test_short_documents_equal_one_direct_forward(random_model):
  model, params, tokenizer = random_model
  texts = [TEXT[:40], UNICODE[:25], TEXT[100:103]]
  result = evaluate(random_model, texts, window=64, stride=16)
  streams = [[tokenizer.bos_id] + tokenizer.encode(t) for t in texts]
  expected = sum(direct_nats(model, params, s) for s in streams) / sum(len(s) - 1 for s in streams)
  assert result["tokens"] == 40 + 25 + 3
  assert result["loss"] == pytest.approx(expected, rel=1e-5)


def test_stride_equal_to_window_is_disjoint_chunks(random_model):
  model, params, tokenizer = random_model
  stream = [tokenizer.bos_id] + tokenizer.encode(TEXT[:150])  # 150 targets: 9 full chunks of 16 and one of 6
  nats = sum(direct_nats(model, params, stream[b:b + 17]) for b in range(0, 150, 16))
  result = evaluate(random_model, [TEXT[:150]], window=16, stride=16)
  assert result["tokens"] == 150
  assert result["loss"] == pytest.approx(nats / 150, rel=1e-5)


@pytest.mark.parametrize("num_targets, window, stride", [(1, 4, 4), (10, 4, 4), (10, 4, 1), (37, 16, 5),
                                                         (16, 16, 3), (17, 16, 16), (5, 16, 8)])
def test_sliding_windows_score_every_target_once(num_targets, window, stride):
  windows = list(sliding_windows(num_targets, window, stride))
  scored = [t for _, end, first in windows for t in range(first, end)]
  assert scored == list(range(num_targets))
  for i, (begin, end, first) in enumerate(windows):
    assert 0 < end - begin <= window and begin == i * stride and begin <= first
    assert first - begin >= min(window - stride, first)  # full overlap as context once available


@pytest.mark.parametrize("stride", [0, 17])
def test_stride_outside_the_window_is_refused(stride):
  with pytest.raises(ValueError, match="stride"):
    list(sliding_windows(10, 16, stride))


def test_overlapping_windows_score_each_target_once_after_12_tokens_of_context(random_model):
  model, params, tokenizer = random_model
  stream = [tokenizer.bos_id] + tokenizer.encode(TEXT[:150])
  # Window 16, stride 4: the first window scores targets 0..15; the window starting at 4k scores its last 4.
  nats = direct_nats(model, params, stream[:17])
  for begin in range(4, 150 - 12, 4):
    nats += direct_nats(model, params, stream[begin:begin + 17]) - direct_nats(model, params, stream[begin:begin + 13])
  sliding = evaluate(random_model, [TEXT[:150]], window=16, stride=4)
  disjoint = evaluate(random_model, [TEXT[:150]], window=16, stride=16)
  assert sliding["tokens"] == disjoint["tokens"] == 150
  assert sliding["loss"] == pytest.approx(nats / 150, rel=1e-5)
  assert abs(sliding["loss"] - disjoint["loss"]) > 1e-3


def test_results_do_not_depend_on_batch_size(random_model):
  texts = [TEXT[:200], UNICODE * 3, TEXT[500:510]]
  one, eight = (evaluate(random_model, texts, window=32, stride=8, batch_size=b) for b in (1, 8))
  assert [one[k] for k in ("tokens", "bytes", "documents")] == [eight[k] for k in ("tokens", "bytes", "documents")]
  for key in ("loss", "bits_per_byte"):
    assert one[key] == pytest.approx(eight[key], abs=1e-6, rel=0), key


def test_output_never_replaces_a_file_of_someone_else(tmp_path):
  record = {"tool": "train.evaluate", "step": 40, "data": "/d/corpus.txt"}
  path = str(tmp_path / "eval_corpus_L16.json")
  assert _output_path(path, record) == path
  (tmp_path / "eval_corpus_L16.json").write_text("my notes")
  (tmp_path / "eval_corpus_L16.1.json").write_text(json.dumps(dict(record, step=20)))
  assert _output_path(path, record) == str(tmp_path / "eval_corpus_L16.2.json")
  (tmp_path / "eval_corpus_L16.2.json").write_text(json.dumps(dict(record, loss=1.0)))
  assert _output_path(path, record) == str(tmp_path / "eval_corpus_L16.2.json")  # our own result: replaced


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "train.evaluate", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_writes_json(trained_run):
  workdir, corpus, model_tuple = trained_run
  result = _cli(f"--workdir={workdir}", f"--data={corpus}", "--stride=4", "--max_bytes=2000")
  assert result.returncode == 0, result.stderr
  with open(os.path.join(workdir, "eval_corpus_L16.json")) as f:
    record = json.load(f)
  assert {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "documents", "workdir", "step", "data",
          "seq_len", "stride"} <= set(record)
  assert (record["step"], record["seq_len"], record["stride"], record["documents"]) == (3, 16, 4, 1)
  assert record["tokens"] == record["bytes"] == 2000  # one ASCII document, cut to --max_bytes
  in_process = evaluate(model_tuple, [TEXT[:2000]], window=16, stride=4)
  assert record["loss"] == pytest.approx(in_process["loss"], rel=1e-5)
  assert "bits_per_byte" in result.stdout


@pytest.mark.parametrize("arg, expected", [("--data=/nonexistent/eval.txt", "no files match"),
                                           ("--seq_len=64", "--seq_len=64 exceeds config.model.max_len=32")])
def test_cli_user_errors_are_one_line(trained_run, arg, expected):
  workdir, corpus, _ = trained_run
  result = _cli(f"--workdir={workdir}", f"--data={corpus}", arg)
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 1
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr


def test_cli_scores_the_runs_validation_split_at_several_lengths(trained_run):
  workdir, corpus, model_tuple = trained_run
  result = _cli(f"--workdir={workdir}", "--data=run:validation", "--seq_len=8", "--seq_len=16", "--stride=0")
  assert result.returncode == 0, result.stderr
  held_out = split_documents([TEXT], 0.1)[1]  # tiny_config holds out the last 10% of its one document
  for seq_len in (8, 16):
    with open(os.path.join(workdir, f"eval_validation_L{seq_len}.json")) as f:
      record = json.load(f)
    assert (record["seq_len"], record["stride"], record["tokens"]) == (seq_len, seq_len, len(held_out[0]))
    in_process = evaluate(model_tuple, held_out, window=seq_len, stride=seq_len)
    assert record["loss"] == pytest.approx(in_process["loss"], rel=1e-5)


def _task_file(tmp_path, **keys):
  """A multiple-choice YAML task over 6 records of the run's characters: which word follows "the"."""
  data = tmp_path / "which.jsonl"
  data.write_text("".join(json.dumps({"text": f"line {i}: the", "label": i % 2}) + "\n" for i in range(6)))
  definition = dict(kind="multiple_choice", data=str(data), prompt="{text}", choices=["quick", "slow"],
                    label_field="label", **keys)
  (tmp_path / "which.yaml").write_text(json.dumps(definition))
  return str(tmp_path / "which.yaml")


def test_cli_evaluates_a_task(trained_run, tmp_path):
  workdir, _, (model, params, tokenizer) = trained_run
  task_file = _task_file(tmp_path, fewshot=1)
  result = _cli(f"--workdir={workdir}", f"--task={task_file}", "--limit=4")
  assert result.returncode == 0, result.stderr
  with open(os.path.join(workdir, "eval_which.json")) as f:
    record = json.load(f)
  assert (record["step"], record["examples"], record["limit"], record["task"]["fewshot"]) == (3, 4, 4, 1)
  task = eval_tasks.load_task(task_file)
  means, per_example = eval_tasks.evaluate_multiple_choice(task, Scorer(model, params, tokenizer),
                                                           eval_tasks.examples(task, 4))
  assert record["metrics"] == pytest.approx(means, abs=1e-9)
  for ours, theirs in zip(record["per_example"], per_example):
    assert ours["loglikelihoods"] == pytest.approx(theirs["loglikelihoods"], rel=1e-6)
  table = [line for line in result.stdout.splitlines() if line.startswith("| which")]
  assert [line.split("|")[5].strip() for line in table] == ["acc", "acc_norm", "acc_bytes"]


@pytest.mark.parametrize("args, expected", [
    (["--task=no_such_task"], "--task=no_such_task: not a built-in task"),
    (["--task=sst2", "--data=x.txt"], "give --data=CORPUS"),
    ([], "give --data=CORPUS"),
    (["--task=sst2_classify"], "a classification task needs a classification run"),
    (["--task={task}", "--limit=-1"], "--limit=-1"),
])
def test_cli_task_errors_are_one_line(trained_run, tmp_path, args, expected):
  workdir = trained_run[0]
  result = _cli(f"--workdir={workdir}", *[a.format(task=_task_file(tmp_path)) for a in args])
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 1
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
