"""Preference tuning (config.task = "preference"): DPO, IPO and SimPO on (prompt, chosen, rejected) pairs.

A preference row [B, 2L] holds chosen responses in its first L columns and rejected ones in its last L, the two
responses of pair j at segment j + 1 of both halves (data/finetuning.preference_rows). The loss folds a batch into
[2B, L] (row 2b chosen, 2b + 1 rejected), sums each response's log-probability over its weighted tokens (response
and eos) and compares the pair; h below is the policy's log-ratio margin over the reference,
(log pi(c) - log ref(c)) - (log pi(r) - log ref(r)):
  dpo    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (Rafailov et al. 2023; eps > 0: conservative DPO)
  ipo    (h - 1 / (2 beta))^2                                        (Azar et al. 2023)
  simpo  -log sigmoid(beta log pi(c) / |c| - beta log pi(r) / |r| - gamma)   (Meng et al. 2024: no reference)
Rewards are beta (log pi(y) - log ref(y)) (SimPO: beta log pi(y) / |y|); the step's sums give the mean loss,
reward accuracy (chosen reward above rejected), chosen and rejected rewards and their margin over pairs.

The reference is the base run's parameters, frozen (`config.preference.reference`): "model" computes it each step
from the parameters that do not train (LoRA, IA3, prompt tuning: the same network with the adapters switched off,
no second copy) and a frozen copy of those that do (full: every parameter; freeze: the chosen leaves); "precomputed"
scores every row once before training (`precompute_reference`) into the batch key reference_logprobs_BxL.

Offers `LOSSES`, `check_config`, `pair_losses` (the formulas), `target_logprobs`, `fold`, `response_sums`,
`with_reference`, `reference_variables`, `make_loss`, `precompute_reference` and `stored_reference` (computed
once, kept in the workdir).
"""

import dataclasses
import functools
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ConfigError
from model.families import family
from train import distributed
from train import peft
from train.step import loss_chunks

LOSSES = ("dpo", "ipo", "simpo")
REFERENCES = ("model", "precomputed")
REFERENCE_KEY = "reference_logprobs_BxL"  # float32 [N, 2L]: the reference's log-probability of each target


def check_config(config) -> None:
  """ConfigErrors of config.preference and what the task needs of the model and the method."""
  p = config.preference
  checks = (("loss", p.loss in LOSSES, f"one of {', '.join(LOSSES)}"),
            ("beta", _number(p.beta) and p.beta > 0, "a positive number"),
            ("label_smoothing", _number(p.label_smoothing) and 0 <= p.label_smoothing < 0.5, "a number in [0, 0.5)"),
            ("gamma", _number(p.gamma), "a number"),
            ("reference", p.reference in REFERENCES, f"one of {', '.join(REFERENCES)}"),
            ("eval_prompts", isinstance(p.eval_prompts, int) and p.eval_prompts >= 0, "an integer >= 0"),
            ("sample_tokens", not p.eval_prompts or isinstance(p.sample_tokens, int) and
             0 < p.sample_tokens < config.train.seq_len, f"an integer in [1, train.seq_len={config.train.seq_len})"),
            ("sample_temperature", _number(p.sample_temperature) and p.sample_temperature >= 0, "a number >= 0"))
  for key, valid, expected in checks:
    if not valid:
      raise ConfigError(f"config.preference.{key}: expected {expected}, got {p[key]!r}")
  if p.reward_from and not os.path.isfile(os.path.join(p.reward_from, "config.json")):
    raise ConfigError(f"config.preference.reward_from: {p.reward_from!r} is not a run directory (no config.json)")
  if p.label_smoothing and p.loss != "dpo":
    raise ConfigError(f"config.preference.label_smoothing: conservative DPO's; loss {p.loss!r} takes none (set 0)")
  if config.model.family != "decoder":
    raise ConfigError(f"config.task: 'preference' needs a decoder; the base run is a {config.model.family}")
  if p.eval_prompts and config.peft.method == "prompt":
    raise ConfigError("config.preference.eval_prompts: sampling decodes with merged weights, which prompt tuning "
                      "has none of (set 0)")
  if p.eval_prompts and jax.process_count() > 1:
    raise ConfigError("config.preference.eval_prompts: sampling runs in one process (set 0 in a multi-process job)")
  if p.eval_prompts and p.reference == "precomputed" and config.peft.method in ("full", "freeze"):
    raise ConfigError("config.preference.eval_prompts: eval/kl needs the reference model, which "
                      "reference='precomputed' does not keep beside a full or freeze run (set reference='model')")


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def pair_losses(loss: str, policy_c, policy_r, reference_c, reference_r, length_c, length_r, *, beta: float,
                label_smoothing: float = 0.0, gamma: float = 0.0):
  """(loss, chosen reward, rejected reward) of each pair from the summed log-probabilities of its chosen (c) and
  rejected (r) responses under the policy and the reference, and their lengths in tokens (SimPO); any shape."""
  if loss == "simpo":
    chosen = beta * policy_c / jnp.maximum(length_c, 1)
    rejected = beta * policy_r / jnp.maximum(length_r, 1)
    return -jax.nn.log_sigmoid(chosen - rejected - gamma), chosen, rejected
  chosen, rejected = beta * (policy_c - reference_c), beta * (policy_r - reference_r)
  if loss == "ipo":
    h = (policy_c - reference_c) - (policy_r - reference_r)
    return jnp.square(h - 1 / (2 * beta)), chosen, rejected
  logits = chosen - rejected
  return (-(1 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(-logits),
          chosen, rejected)


def target_logprobs(model, variables, extra: dict, batch, rng, deterministic: bool):
  """log p(target) at every position [B, L] float32. Where a row's logits would exceed step.LOGITS_PER_ROW the head
  runs a piece of the sequence at a time, rematerialised in the backward pass (as step.token_loss does)."""
  targets_BxL = batch["targets_BxL"]

  def logprobs(logits_BxCxV, targets_BxC):
    logits_BxCxV = logits_BxCxV.astype(jnp.float32)
    target_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    return target_BxC - jax.nn.logsumexp(logits_BxCxV, axis=-1)

  batch_size, length = targets_BxL.shape
  chunks = loss_chunks(length, model.cfg.vocab_size)
  if chunks == 1:
    logits_BxLxV = model.apply(variables, batch, deterministic, rngs={"dropout": rng}, method="forward", **extra)
    return logprobs(logits_BxLxV, targets_BxL)
  hidden_BxLxD = model.apply(variables, batch, deterministic, rngs={"dropout": rng}, method="forward_hidden", **extra)
  piece = jax.checkpoint(lambda h, t: logprobs(model.apply(variables, h, method="head"), t))
  split = lambda x: jnp.moveaxis(x.reshape(batch_size, chunks, -1, *x.shape[2:]), 1, 0)  # [N, B, C, ...]
  logprobs_NxBxC = jax.lax.map(lambda xs: piece(*xs), (split(hidden_BxLxD), split(targets_BxL)))
  return jnp.moveaxis(logprobs_NxBxC, 0, 1).reshape(batch_size, length)


def fold(batch):
  """A preference batch [B, 2L] as [2B, L] rows: row 2b the chosen half of row b, row 2b + 1 its rejected half."""
  return {key: value.reshape(value.shape[0] * 2, value.shape[1] // 2) for key, value in batch.items()}


def response_sums(values_2BxL, segment_ids_2BxL):
  """Per pair, the sums of `values` over each response's tokens: (chosen [B, L], rejected [B, L]); pair j of a
  row is column j (segment j + 1), columns with no pair hold 0."""
  length = values_2BxL.shape[1]
  sums_2BxS = jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=length + 1))(values_2BxL, segment_ids_2BxL)
  return sums_2BxS[0::2, 1:], sums_2BxS[1::2, 1:]


def with_reference(run, config):
  """The Run with its frozen reference parameters, which reference='model' reads at every step and eval/kl at every
  evaluation: frozen["reference"] holds the base parameters that train, as loaded (empty for adapter methods, whose
  reference is the frozen base alone); a full or freeze run with reference='precomputed' keeps no copy."""
  if config.preference.reference != "model" and jax.tree.leaves(run.base):
    return run
  return dataclasses.replace(run, frozen={**run.frozen, "reference": run.base},
                             frozen_shardings={**run.frozen_shardings, "reference": run.shardings.params["base"]})


def reference_variables(frozen) -> dict:
  """The model.apply variables of the reference: the base parameters as loaded, no adapters."""
  return {"params": peft.combine(frozen["reference"], frozen["base"])}


def make_loss(run, cfg):
  """The loss function of train/step.py for config.preference `cfg` on a fine-tuning Run."""
  if not family(run.model.cfg).generates or family(run.model.cfg).seq2seq:
    raise ConfigError(f"config.task: 'preference' needs a decoder; the base run is a {run.model.cfg.family}")
  model = run.model

  def loss_fn(params, frozen, batch, rng, deterministic):
    rows = fold(batch)
    weights_2BxL, segment_ids_2BxL = rows["weights_BxL"], rows["segment_ids_BxL"]
    variables, extra = run.model_params(params, frozen, rng, deterministic)
    policy_c, policy_r = response_sums(target_logprobs(model, variables, extra, rows, rng, deterministic)
                                       * weights_2BxL, segment_ids_2BxL)
    length_c, length_r = response_sums(weights_2BxL, segment_ids_2BxL)
    reference_c = reference_r = jnp.zeros_like(policy_c)
    if cfg.loss != "simpo":
      if REFERENCE_KEY in rows:
        reference_2BxL = rows[REFERENCE_KEY]
      else:
        reference_2BxL = jax.lax.stop_gradient(target_logprobs(model, reference_variables(frozen), {}, rows, rng,
                                                               True))
      reference_c, reference_r = response_sums(reference_2BxL * weights_2BxL, segment_ids_2BxL)
    loss_BxP, chosen_BxP, rejected_BxP = pair_losses(cfg.loss, policy_c, policy_r, reference_c, reference_r,
                                                     length_c, length_r, beta=cfg.beta,
                                                     label_smoothing=cfg.label_smoothing, gamma=cfg.gamma)
    pair_BxP = ((length_c > 0) & (length_r > 0)).astype(jnp.float32)  # 0 on empty columns and on eval filler rows
    return {"loss_sum": jnp.sum(loss_BxP * pair_BxP), "weight_sum": jnp.sum(pair_BxP),
            "reward_accuracy_sum": jnp.sum((chosen_BxP > rejected_BxP) * pair_BxP),
            "chosen_reward_sum": jnp.sum(chosen_BxP * pair_BxP),
            "rejected_reward_sum": jnp.sum(rejected_BxP * pair_BxP),
            "reward_margin_sum": jnp.sum((chosen_BxP - rejected_BxP) * pair_BxP)}
  return loss_fn


@functools.partial(jax.jit, static_argnames=("model",))
def _reference_logprobs(variables, rows, *, model):
  folded = fold(rows)
  logprobs_2BxL = target_logprobs(model, variables, {}, folded, jax.random.PRNGKey(0), True) * folded["weights_BxL"]
  return logprobs_2BxL.reshape(rows["targets_BxL"].shape)


def precompute_reference(run, rows, batch_size: int):
  """`rows` with REFERENCE_KEY: the base model's log-probability of every weighted target (0 elsewhere), computed
  once, `batch_size` rows at a time."""
  variables = {"params": peft.combine(run.base, run.frozen["base"])}  # the base run's parameters, no adapters
  num = len(rows["targets_BxL"])
  out = np.zeros(rows["targets_BxL"].shape, np.float32)
  for start in range(0, num, batch_size):
    index = np.minimum(np.arange(start, start + batch_size), num - 1)  # the last batch repeats a row: one shape
    part = {key: rows[key][index] for key in ("inputs_BxL", "targets_BxL", "weights_BxL", "positions_BxL",
                                              "segment_ids_BxL")}
    values = np.asarray(_reference_logprobs(variables, part, model=run.model))
    out[start:start + batch_size] = values[:min(batch_size, num - start)]
  return {**rows, REFERENCE_KEY: out}


REFERENCE_FILE = "reference_logprobs.npz"  # in a run's workdir: precompute_reference's values of its train / val rows


def stored_reference(run, workdir: str, train_rows, val_rows, batch_size: int):
  """(train_rows, val_rows) with REFERENCE_KEY, read from WORKDIR/reference_logprobs.npz when it was computed for
  these rows and this base (a resumed run), else computed and written there."""
  digest = hashlib.sha256(run.base_fingerprint.encode())
  for rows in (train_rows, val_rows):
    for key in sorted(rows):
      digest.update(key.encode() + np.ascontiguousarray(rows[key]).tobytes())
  path = os.path.join(workdir, REFERENCE_FILE)
  if os.path.exists(path):
    with np.load(path) as saved:
      if str(saved["digest"]) == digest.hexdigest():
        return {**train_rows, REFERENCE_KEY: saved["train"]}, {**val_rows, REFERENCE_KEY: saved["val"]}
  train_rows, val_rows = (precompute_reference(run, rows, batch_size) for rows in (train_rows, val_rows))
  if distributed.is_writer():
    temporary = path + ".tmp.npz"
    np.savez(temporary, digest=digest.hexdigest(), train=train_rows[REFERENCE_KEY], val=val_rows[REFERENCE_KEY])
    os.replace(temporary, path)
  return train_rows, val_rows
