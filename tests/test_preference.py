"""Preference tuning: DPO / IPO / SimPO against their formulas and against a direct per-example computation on a
tiny model, the reference (adapters off = the base model; a frozen copy; precomputed), packing, bad records, the
evaluation metrics (KL, reward) and an ablation over beta and the loss.

One tiny char-level base run (test_finetune's: rope positions) and a classifier fine-tuned from it (the reward model) are made once
per module.
"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import ablate.plan
import ablate.runner
from configs.finetune import common
from data import finetuning
from data.sources import DataError
from data.tokenizer import CharTokenizer
from test_finetune import _base_config, _write_jsonl
from test_train import REPO, SEED, load_parts
from train import finetune as finetune_lib
from train import mesh as mesh_lib
from train import preference
from train import preference_eval
from train import runs
from train import tasks
from train.evaluate import classifier_scores
from train.pretrain import train_and_evaluate

GOOD = ["quick", "red", "brown"]
BAD = ["slow", "lazy", "old"]


def _pairs(rng, n, start=0):
  return [{"prompt": f"line {i}: the", "chosen": f" {rng.choice(GOOD)} fox.",
           "rejected": f" {rng.choice(BAD)} dog{'s' * int(rng.integers(3))}."} for i in range(start, start + n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """The base run, a classifier fine-tuned from it (label 1: a good word), and the pair files."""
  root = tmp_path_factory.mktemp("preference")
  base = str(root / "base")
  train_and_evaluate(_base_config(root, steps=20), base)
  rng = np.random.default_rng(0)
  files = {"root": root, "base": base,
           "train": _write_jsonl(root / "pairs.jsonl", _pairs(rng, 48)),
           "val": _write_jsonl(root / "pairs_val.jsonl", _pairs(rng, 16, start=100))}
  sentiment = [{"text": f"line {i}: the {w} fox.", "label": int(w in GOOD)} for i in range(120)
               for w in [rng.choice(GOOD + BAD)]]
  files["sentiment"] = _write_jsonl(root / "sentiment.jsonl", sentiment)
  classifier = common.get_config()
  classifier.init_from, classifier.task = base, "classify"
  classifier.data.update(train_path=files["sentiment"], val_fraction=0.2)
  classifier.peft.method = "full"
  classifier.train.update(steps=6, batch_size=8, seq_len=24, learning_rate=3e-3, warmup_steps=1, eval_every=6,
                          eval_batches=4, checkpoint_every=6, log_every=1, num_samples=0, seed=SEED)
  classifier.mesh.update(data=1, fsdp=1, tensor=1)
  files["reward"] = str(root / "reward")
  finetune_lib.finetune(classifier, files["reward"])
  return files


def pref_config(setup, method="lora", **preference_overrides):
  config = common.get_config()
  config.init_from, config.task = setup["base"], "preference"
  config.data.update(train_path=setup["train"], val_path=setup["val"])
  config.peft.update(method=method, lora_rank=2, lora_alpha=4.0, num_prompt_tokens=3, trainable=(r"_bias$",),
                     lora_targets=(r"attention/(query|value)$", r"mlp/w"))
  config.preference.update(**preference_overrides)
  config.train.update(steps=4, batch_size=8, seq_len=32, learning_rate=3e-3, warmup_steps=1, decay_steps=4,
                      eval_every=4, eval_batches=4, checkpoint_every=4, log_every=1, num_samples=0, seed=SEED)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  return config


def build(config):
  """(run with its reference, train rows, val rows) of a preference config, as train.finetune builds them."""
  runs.resolve_base(config)
  tokenizer, _ = runs.run_tokenizer(config.init_from, runs.read_run_config(config.init_from))
  train_rows, val_rows, _ = tasks.build_rows(config, tokenizer)
  run = runs.finetuning(config, mesh_lib.one_device_mesh(), None)
  return preference.with_reference(run, config), train_rows, val_rows


def moved(params, scale=0.05, seed=1):
  """The trainable tree moved away from step 0 (LoRA's B away from zero, IA3's scales from one, ...)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), max(len(leaves), 1))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def mean_loss(loss_fn, params, frozen, rows):
  sums = jax.jit(lambda p: loss_fn(p, frozen, rows, jax.random.PRNGKey(0), True))(params)
  return {k: float(v) for k, v in sums.items()}


def test_preference_rows_by_hand():
  # Pair 1: "ab" -> chosen "c" [1 3 4 5 2], rejected "def" [1 3 4 6 7 8 2]; pair 2: "f" -> "g" [1 8 9 2], "h"
  # [1 8 10 2]. seq_len 8: pair 1 takes 4 chosen and 6 rejected columns; pair 2 (3 + 3) fits the chosen half but not
  # the rejected one, so it opens row 1. Chosen in columns 0-7, rejected in 8-15; a pair's segment is the same in both.
  tokenizer = CharTokenizer("abcdefgh")
  triples = [("ab", "c", "def"), ("f", "g", "h")]
  rows = finetuning.preference_rows(tokenizer, triples, seq_len=8)
  expected = {
      "inputs_BxL": [[1, 3, 4, 5, 0, 0, 0, 0, 1, 3, 4, 6, 7, 8, 0, 0], [1, 8, 9, 0, 0, 0, 0, 0, 1, 8, 10, 0, 0, 0, 0, 0]],
      "targets_BxL": [[3, 4, 5, 2, 0, 0, 0, 0, 3, 4, 6, 7, 8, 2, 0, 0], [8, 9, 2, 0, 0, 0, 0, 0, 8, 10, 2, 0, 0, 0, 0, 0]],
      "weights_BxL": [[0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0]],
      "segment_ids_BxL": [[1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0],
                          [1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0]],
      "positions_BxL": [[0, 1, 2, 3, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 0, 0], [0, 1, 2, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0]]}
  assert set(rows) == set(expected)
  for key, want in expected.items():
    np.testing.assert_array_equal(rows[key], want, err_msg=key)
  packed = finetuning.preference_rows(tokenizer, triples, seq_len=10)  # 4 + 3 and 6 + 3 columns: one row
  np.testing.assert_array_equal(packed["segment_ids_BxL"], [[1, 1, 1, 1, 2, 2, 2, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 0]])


# --- the formulas ---------------------------------------------------------------------------------------------------

def _log_sigmoid(x):
  return -np.log1p(np.exp(-x))


def test_losses_and_gradients_equal_their_formulas():
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = (rng.normal(-20, 3, 5) for _ in range(4))
  lc, lr = rng.integers(1, 9, 5).astype(float), rng.integers(1, 9, 5).astype(float)
  beta, eps, gamma = 0.3, 0.1, 0.7
  h = (pc - rc) - (pr - rr)
  expected = {"dpo": -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h),
              "ipo": (h - 1 / (2 * beta)) ** 2,
              "simpo": -_log_sigmoid(beta * pc / lc - beta * pr / lr - gamma)}
  for name, want in expected.items():
    loss, chosen, rejected = preference.pair_losses(name, pc, pr, rc, rr, lc, lr, beta=beta,
                                                    label_smoothing=eps if name == "dpo" else 0.0, gamma=gamma)
    np.testing.assert_allclose(np.asarray(loss), want, rtol=1e-6, err_msg=name)
    if name == "simpo":
      np.testing.assert_allclose(np.asarray(chosen), beta * pc / lc, rtol=1e-6)
    else:
      np.testing.assert_allclose(np.asarray(chosen - rejected), beta * h, rtol=1e-5)
  # d loss / d log pi(c) of DPO: -beta ((1 - eps) sigmoid(-beta h) - eps sigmoid(beta h)); of IPO: 2 (h - 1/(2 beta))
  sigmoid = lambda x: 1 / (1 + np.exp(-x))
  grad = jax.grad(lambda c: jnp.sum(preference.pair_losses("dpo", c, pr, rc, rr, lc, lr, beta=beta,
                                                           label_smoothing=eps)[0]))(jnp.asarray(pc))
  np.testing.assert_allclose(np.asarray(grad), -beta * ((1 - eps) * sigmoid(-beta * h) - eps * sigmoid(beta * h)),
                             rtol=1e-5)
  grad = jax.grad(lambda r: jnp.sum(preference.pair_losses("ipo", pc, r, rc, rr, lc, lr, beta=beta)[0]))(
      jnp.asarray(pr))
  np.testing.assert_allclose(np.asarray(grad), -2 * (h - 1 / (2 * beta)), rtol=1e-5)


# --- the loss on a tiny model ---------------------------------------------------------------------------------------

def _direct_rows(tokenizer, records):
  """Every response of `records` in its own right-padded row, as [bos] + prompt + response + [eos], built here
  without the package's row builders: (inputs [2N, T], targets [2N, T], response mask [2N, T]); rows 2n, 2n + 1
  are record n's chosen and rejected."""
  streams, starts = [], []
  for r in records:
    for key in ("chosen", "rejected"):
      prompt = tokenizer.encode(r["prompt"])
      streams.append([tokenizer.bos_id] + prompt + tokenizer.encode(r[key]) + [tokenizer.eos_id])
      starts.append(len(prompt))  # target j predicts stream[j + 1]: the response starts at target len(prompt)
  width = max(map(len, streams)) - 1
  inputs, targets, mask = (np.zeros((len(streams), width), dtype) for dtype in (np.int32, np.int32, np.float32))
  for n, (stream, start) in enumerate(zip(streams, starts)):
    inputs[n, :len(stream) - 1], targets[n, :len(stream) - 1] = stream[:-1], stream[1:]
    mask[n, start:len(stream) - 1] = 1.0
  return inputs, targets, mask


def test_loss_and_gradients_equal_a_direct_computation_on_a_tiny_model(setup):
  """DPO (with label smoothing: its loss and gradients) and SimPO (lengths, no reference: its loss) from packed rows
  equal the formulas applied to log-probabilities summed here, one response a row, with LoRA moved off zero."""
  config = pref_config(setup, "lora", loss="dpo", beta=0.5, label_smoothing=0.1, gamma=0.3)
  run, _, val_rows = build(config)
  records = [json.loads(line) for line in open(setup["val"])]
  params = moved(run.init_state().params)
  inputs, targets, mask = _direct_rows(run.tokenizer, records)
  batch = {"inputs_BxL": inputs, "positions_BxL": np.broadcast_to(np.arange(inputs.shape[1]), inputs.shape),
           "segment_ids_BxL": np.ones_like(inputs)}

  def sequence_logprobs(variables, extra):
    logits = run.model.apply(variables, batch, True, method="forward", **extra)
    token = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token * mask, axis=1)  # [2N]

  def direct(params, cfg):
    policy = sequence_logprobs(*run.model_params(params, run.frozen))
    reference = sequence_logprobs(preference.reference_variables(run.frozen), {})
    lengths = mask.sum(1)
    losses = preference.pair_losses(cfg.loss, policy[0::2], policy[1::2], reference[0::2], reference[1::2],
                                    lengths[0::2], lengths[1::2], beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                                    gamma=cfg.gamma)[0]
    return jnp.mean(losses)

  for loss in ("dpo", "simpo"):
    cfg = ml_collections.ConfigDict(dict(config.preference, loss=loss, label_smoothing=0.1 if loss == "dpo" else 0.0))
    loss_fn = preference.make_loss(run, cfg)
    sums = mean_loss(loss_fn, params, run.frozen, val_rows)
    assert sums["weight_sum"] == len(records)
    want = float(jax.jit(lambda p: direct(p, cfg))(params))
    assert sums["loss_sum"] / sums["weight_sum"] == pytest.approx(want, rel=1e-5), loss
  cfg = config.preference
  loss_fn = preference.make_loss(run, cfg)
  packed_grads = jax.jit(jax.grad(lambda p: loss_fn(p, run.frozen, val_rows, jax.random.PRNGKey(0), True)["loss_sum"]
                                  / len(records)))(params)
  direct_grads = jax.jit(jax.grad(lambda p: direct(p, cfg)))(params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(packed_grads), jax.tree.leaves(direct_grads)):
    b = np.asarray(b)  # float32 sums in another order: agreement to 1e-4 of each leaf's largest gradient
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-3, atol=1e-4 * np.abs(b).max(), err_msg=str(path))
  assert any(np.abs(np.asarray(g)).max() > 1e-4 for g in jax.tree.leaves(packed_grads))


@pytest.mark.parametrize("method", ["lora", "ia3", "full", "freeze"])
def test_at_step_0_the_policy_is_the_reference(setup, method):
  """DPO's loss is log 2 with zero rewards and margins, and the sampled KL is 0, before the first update."""
  config = pref_config(setup, method, eval_prompts=4, sample_tokens=6)
  run, _, val_rows = build(config)
  params = run.init_state().params
  sums = mean_loss(preference.make_loss(run, config.preference), params, run.frozen, val_rows)
  assert sums["loss_sum"] / sums["weight_sum"] == pytest.approx(math.log(2), abs=1e-5)
  for key in ("chosen_reward_sum", "rejected_reward_sum", "reward_margin_sum"):
    assert abs(sums[key]) < 1e-4, key
  if method in ("ia3", "freeze"):  # sampling as in lora / full: its cost once each
    return
  prompts = preference_eval.eval_prompts(config, tasks.preference_records(config.data)[1], 4)
  metrics = preference_eval.sample_metrics(run, params, run.frozen, prompts, config.preference, 32, 0)
  assert abs(metrics["eval/kl"]) < 1e-4 and metrics["eval/sample_length"] > 0
  # Moved off the reference: the loss and the KL move too (the test can fail).
  moved_metrics = preference_eval.sample_metrics(run, moved(params, 0.3), run.frozen, prompts, config.preference, 32,
                                                 0)
  assert abs(moved_metrics["eval/kl"]) > 1e-3


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt"])
def test_the_adapter_off_reference_is_the_base_model_exactly(setup, method):
  config = pref_config(setup, method)
  run, _, val_rows = build(config)
  assert jax.tree.leaves(run.frozen["reference"]) == []  # no second copy of any weight
  _, _, base_params, _, _ = load_parts(setup["base"])
  rows = preference.fold(val_rows)
  forward = jax.jit(lambda variables, extra: run.model.apply(variables, rows, True, method="forward", **extra))
  reference = forward(preference.reference_variables(run.frozen), {})
  assert np.array_equal(np.asarray(reference), np.asarray(forward({"params": base_params}, {})))
  policy = forward(*run.model_params(moved(run.init_state().params), run.frozen))
  assert not np.allclose(np.asarray(policy), np.asarray(reference), atol=1e-3)


def test_packed_and_padded_rows_give_the_same_loss(setup):
  config = pref_config(setup, "lora")
  config.train.seq_len = 96  # three pairs a row
  run, _, packed = build(config)
  records = [json.loads(line) for line in open(setup["val"])]
  config.peft.method = "prompt"  # one pair a row
  padded = tasks.preference_rows(config, run.tokenizer, records)
  assert len(padded["inputs_BxL"]) == len(records) > 2 * len(packed["inputs_BxL"])
  assert packed["inputs_BxL"].shape[1] == 2 * config.train.seq_len
  params = moved(run.init_state().params)
  loss_fn = preference.make_loss(run, config.preference)
  a, b = mean_loss(loss_fn, params, run.frozen, packed), mean_loss(loss_fn, params, run.frozen, padded)
  assert a.keys() == b.keys()
  for key in a:
    assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), key


def test_precomputed_reference_equals_the_model_and_is_stored_once(setup, tmp_path):
  config = pref_config(setup, "full")
  run, train_rows, val_rows = build(config)
  params = moved(run.init_state().params, 0.01)
  live = mean_loss(preference.make_loss(run, config.preference), params, run.frozen, val_rows)
  config.preference.reference = "precomputed"
  stored_run = preference.with_reference(runs.finetuning(config, mesh_lib.one_device_mesh(), None), config)
  assert "reference" not in stored_run.frozen  # no copy of the base beside full fine-tuning
  _, stored = preference.stored_reference(stored_run, str(tmp_path), train_rows, val_rows, 8)
  assert stored[preference.REFERENCE_KEY].shape == val_rows["targets_BxL"].shape
  precomputed = mean_loss(preference.make_loss(stored_run, config.preference), params, stored_run.frozen, stored)
  for key in live:
    assert precomputed[key] == pytest.approx(live[key], rel=1e-5, abs=1e-5), key
  path = os.path.join(tmp_path, preference.REFERENCE_FILE)
  with np.load(path) as saved:  # read back, not recomputed, for the same rows
    marked = {"train": saved["train"] + 1.0, "val": saved["val"], "digest": saved["digest"]}
  np.savez(path, **marked)
  again, _ = preference.stored_reference(stored_run, str(tmp_path), train_rows, val_rows, 8)
  np.testing.assert_array_equal(again[preference.REFERENCE_KEY], marked["train"])


# --- data and config errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("record, expected", [
    ({"prompt": "a", "chosen": " b"}, r"bad.jsonl:2: no field 'rejected' \(fields: prompt, chosen\)"),
    ({"prompt": "a", "chosen": " b", "rejected": "  "}, r"bad.jsonl:2: field 'rejected' should be a non-empty string"),
    ({"prompt": "a", "chosen": 3, "rejected": "c"}, r"bad.jsonl:2: field 'chosen' should be a non-empty string"),
])
def test_bad_records_name_file_and_line(setup, tmp_path, record, expected):
  path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "chosen": " y", "rejected": " z"}, record])
  config = pref_config(setup)
  config.data.train_path = path
  with pytest.raises(DataError, match=expected):
    tasks.preference_records(config.data)


def test_bad_record_on_the_command_line_is_one_line_and_exit_1(setup, tmp_path):
  path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "chosen": " y", "rejected": ""}])
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, "-m", "train.finetune", "--config=configs/finetune/preference.py",
                           f"--workdir={tmp_path / 'run'}", f"--config.init_from={setup['base']}",
                           f"--config.data.train_path={path}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [f"error: {path}:1: field 'rejected' should be a non-empty string, "
                                                "got ''"]
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("overrides, expected", [
    ({"loss": "kto"}, "config.preference.loss: expected one of dpo, ipo, simpo"),
    ({"beta": 0.0}, "config.preference.beta: expected a positive number"),
    ({"loss": "ipo", "label_smoothing": 0.1}, "config.preference.label_smoothing: conservative DPO's"),
    ({"reference": "copy"}, "config.preference.reference: expected one of model, precomputed"),
    ({"reward_from": "/nonexistent"}, "config.preference.reward_from: '/nonexistent' is not a run directory"),
    ({"eval_prompts": 2, "sample_tokens": 32}, r"config.preference.sample_tokens: expected an integer in \[1, train.seq_len=32\)"),
])
def test_config_errors_name_the_key(setup, tmp_path, overrides, expected):
  with pytest.raises(ablate.plan.ConfigError, match=expected):
    finetune_lib.finetune(pref_config(setup, **overrides), str(tmp_path / "run"))


# --- metrics, the reward model, train.evaluate and ablate ----------------------------------------------------------

def test_the_reward_model_agrees_with_the_classifier(setup):
  """RewardModel's P(label 1) > 0.5 exactly where the classifier predicts 1: its accuracy is train.evaluate's."""
  reward = preference_eval.RewardModel(setup["reward"], "1")
  records = [json.loads(line) for line in open(setup["sentiment"])]
  probabilities = reward([r["text"] for r in records])
  assert probabilities.shape == (len(records),) and np.all((probabilities > 0) & (probabilities < 1))
  accuracy = np.mean((probabilities > 0.5) == np.asarray([r["label"] for r in records], bool))
  scores = classifier_scores(reward.loaded, setup["sentiment"])
  assert accuracy == pytest.approx(scores["accuracy"], abs=1e-9)
  with pytest.raises(ablate.plan.ConfigError, match="config.preference.reward_label: '2' is not a label"):
    preference_eval.RewardModel(setup["reward"], "2")


ABLATION = """
from configs.finetune import common
from data import finetuning

def get_config():
  config = common.get_config()
  config.init_from, config.task = {base!r}, "preference"
  config.data.update(train_path={train!r}, val_path={val!r})
  config.peft.update(method="lora", lora_rank=2, lora_alpha=4.0)
  config.preference.update(eval_prompts=4, sample_tokens=6, reward_from={reward!r})
  config.train.update(steps=3, batch_size=8, seq_len=32, learning_rate=3e-3, warmup_steps=1, eval_every=3,
                      eval_batches=2, checkpoint_every=3, log_every=1, num_samples=0)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  return config
"""


def test_an_ablation_over_beta_and_the_loss_reads_reward_at_data(setup, tmp_path):
  experiment = tmp_path / "experiment.py"
  experiment.write_text(ABLATION.format(base=setup["base"], train=setup["train"], val=setup["val"],
                                        reward=setup["reward"]))
  ablation = ablate.plan.load_ablation(ml_collections.ConfigDict(dict(
      entrypoint="finetune", config=str(experiment), seeds=(0,), parallel=2,
      grid={"loss": ("preference.loss", ("dpo", "ipo")), "beta": ("preference.beta", (0.5,))},
      metrics=("reward@data", "eval/reward_accuracy", "kl@data"), directions={"kl@data": "lower"})))
  workdir = str(tmp_path / "ablation")
  assert ablate.runner.run_ablation(ablation, workdir) == 0
  variants = dict(ablate.plan.variants(ablation))
  assert sorted(variants) == ["beta=0.5,loss=dpo", "beta=0.5,loss=ipo"]
  for variant in variants:
    run_dir = os.path.join(workdir, "runs", f"{variant}_seed0")
    with open(os.path.join(run_dir, "eval_data.json")) as f:
      record = json.load(f)
    assert 0 < record["reward"] < 1 and math.isfinite(record["kl"]) and record["examples"] == 16
    with open(os.path.join(run_dir, "config.json")) as f:
      assert json.load(f)["preference"]["loss"] == variant[-3:]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
      last = [json.loads(line) for line in f][-1]
    assert {"eval/reward_accuracy", "eval/reward_margin", "eval/kl", "eval/reward"} <= set(last)
    with open(os.path.join(workdir, "logs", f"{variant}_seed0.log")) as f:
      assert "eval reward_accuracy" in f.read()  # the terminal line
  with open(os.path.join(workdir, "results.md")) as f:
    report = f.read()
  assert "**reward@data** (higher is better; primary" in report and "| beta=0.5,loss=ipo | " in report
