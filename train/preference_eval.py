"""What a preference run is measured on beyond its pairs: samples on held-out prompts, their KL to the reference and
a reward model's score (Rafailov et al. 2023, Fig. 2: reward against KL(pi || pi_ref)).

Offers `RewardModel` (a classification run's P(label) of texts), `sample` (continuations of prompts from merged
weights, with a KV cache), `sample_metrics` (eval/kl, eval/reward, eval/sample_length), `eval_prompts` (the
rendered prompts of a preference split), `prepare` (a fine-tuning run's reference, rows and evaluation hook) and
`evaluate_records` (what train.evaluate --data writes for a preference run). KL is the Monte Carlo estimate of the sequence-level KL: the mean over prompts of sum_t log pi(y_t | x, y_<t)
- log pi_ref(y_t | x, y_<t) on one sample y ~ pi per prompt (unbiased at temperature 1, which the samples use by
default; the eos a sample ends with counts as one of its tokens).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from data import batch as batch_lib
from data import finetuning
from data.sources import read_records
from model import decode
from model.config import ConfigError
from model.families import family
from train import preference
from train import mesh as mesh_lib
from train import tasks
from train.loop import evaluate
from train.runs import load_run
from train.step import eval_step


class RewardModel:
  """A classification fine-tuning run (`workdir`) scoring texts by the probability of class `label`."""

  def __init__(self, workdir: str, label: str):
    self.loaded = load_run(workdir)
    run = self.loaded.run
    if run.labels is None:
      raise ConfigError(f"config.preference.reward_from: {workdir} is not a classification run "
                        f"(config.task={run.config.get('task')!r})")
    labels = [str(x) for x in run.labels]
    if str(label) not in labels:
      raise ConfigError(f"config.preference.reward_label: {label!r} is not a label of {workdir} ({', '.join(labels)})")
    self.index, self.seq_len = labels.index(str(label)), run.config.train.seq_len
    self._probabilities = jax.jit(functools.partial(_class_probabilities, run=run))

  def __call__(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """P(label | text) of each text, float64 [N]."""
    run, out = self.loaded.run, []
    rows = finetuning.classify_rows(run.tokenizer, texts, [0] * len(texts), self.seq_len)
    rows.pop("labels_B")
    for start in range(0, len(texts), batch_size):
      index = np.minimum(np.arange(start, start + batch_size), len(texts) - 1)  # one compiled shape
      probabilities_BxC = self._probabilities(self.loaded.trainable, batch_lib.take(rows, index))
      out.append(np.asarray(probabilities_BxC, np.float64)[:min(batch_size, len(texts) - start), self.index])
    return np.concatenate(out)


def _class_probabilities(params, batch, *, run):
  variables, extra = run.model_params(params, run.frozen)
  hidden_BxLxD = run.model.apply(variables, batch, True, method="features", **extra)
  pooled_BxD = tasks.pool(hidden_BxLxD, batch["segment_ids_BxL"], family(run.model.cfg).pooling)
  return jax.nn.softmax(tasks.head_logits(params["head"], pooled_BxD, run.model.cfg.family), axis=-1)


def sample(model, params, tokenizer, prompts: list[str], *, max_new_tokens: int, seq_len: int,
           temperature: float = 1.0, seed: int = 0, batch_size: int = 64) -> list[tuple[list[int], list[int]]]:
  """(prompt stream, sampled ids) per prompt: the prompt framed as a fine-tuning row frames it ([bos] + prompt in
  ablax's own runs) and cut to its last seq_len - max_new_tokens tokens, then up to max_new_tokens tokens from
  `params` (a plain parameter tree: adapters merged), ending with the eos when one was drawn."""
  before = tokenizer.around[0]
  room = seq_len - max_new_tokens - len(before)
  streams = [before + ids[max(len(ids) - room, 0):] for ids in tokenizer.encode_batch(prompts)]
  streams = [s or [tokenizer.bos_id] for s in streams]  # a run that frames with nothing: start from bos
  out = []
  for start in range(0, len(streams), batch_size):
    part = streams[start:start + batch_size]
    new = decode.generate(model, params, part, max_new_tokens=max_new_tokens,
                          sampling=decode.Sampling(temperature=temperature), seed=seed + start,
                          eos_id=tokenizer.eos_id)
    out += [(s, ids + [tokenizer.eos_id] if len(ids) < max_new_tokens else ids) for s, ids in zip(part, new)]
  return out


@functools.partial(jax.jit, static_argnames=("run",))
def _log_ratios(params, frozen, batch, *, run):
  """Per row, the summed log pi - log pi_ref of the weighted targets [B]."""
  rng = jax.random.PRNGKey(0)
  variables, extra = run.model_params(params, frozen, rng, True)
  policy_BxL = preference.target_logprobs(run.model, variables, extra, batch, rng, True)
  reference_BxL = preference.target_logprobs(run.model, preference.reference_variables(frozen), {}, batch, rng, True)
  return jnp.sum((policy_BxL - reference_BxL) * batch["weights_BxL"], axis=1)


def sample_metrics(run, params, frozen, prompts: list[str], cfg, seq_len: int, seed: int,
                   reward_model: RewardModel | None = None, batch_size: int = 64) -> dict:
  """eval/kl, eval/sample_length (tokens, eos included) and, with a reward model, eval/reward (its mean P(label)
  of prompt + sample) over one sample per prompt; `params` is the trainable tree, `frozen` with its reference."""
  samples = sample(run.model, run.merge(params), run.tokenizer, prompts, max_new_tokens=cfg.sample_tokens,
                   seq_len=seq_len, temperature=cfg.sample_temperature, seed=seed, batch_size=batch_size)
  streams = [s + ids for s, ids in samples]
  rows = batch_lib.rows([s[:-1] for s in streams], seq_len, targets=[s[1:] for s in streams],
                        weights=[[0.0] * (len(s) - 1) + [1.0] * len(ids) for s, ids in samples])
  ratios = []
  for start in range(0, len(streams), batch_size):
    index = np.minimum(np.arange(start, start + batch_size), len(streams) - 1)
    ratios.append(np.asarray(_log_ratios(params, frozen, batch_lib.take(rows, index), run=run), np.float64)
                  [:min(batch_size, len(streams) - start)])
  metrics = {"eval/kl": float(np.mean(np.concatenate(ratios))),
             "eval/sample_length": float(np.mean([len(ids) for _, ids in samples]))}
  if reward_model is not None:
    texts = [run.tokenizer.decode([t for t in s + ids if t not in (run.tokenizer.bos_id, run.tokenizer.eos_id)])
             for s, ids in samples]
    metrics["eval/reward"] = float(np.mean(reward_model(texts)))
  return metrics


def eval_prompts(config, records: list[dict], limit: int = 0) -> list[str]:
  """The rendered prompts of preference records (config.data's template and prompt field), the first `limit`
  (0: all) distinct ones in order."""
  seen = {}
  for record in records:
    seen.setdefault(tasks.render_prompt(config.data, record), None)
  prompts = list(seen)
  return prompts[:limit] if limit else prompts


def evaluate_records(workdir: str, data: str | None, *, step: int | None = None, batch_size: int = 32) -> dict:
  """A preference run on the records of a JSONL file `data` (None: the run's validation split): loss, reward
  accuracy, rewards and margin of its pairs (when its records hold the chosen and rejected fields), and KL, sample
  length and reward (config.preference.reward_from) of one sample for each of its prompts."""
  loaded = load_run(workdir, step)
  config = loaded.run.config
  run = preference.with_reference(loaded.run, config)
  records = (read_records(data, [config.data.prompt_field], 0, config.data.encoding_errors) if data else
             tasks.preference_records(config.data)[1])
  fields = (config.data.chosen_field, config.data.rejected_field)
  result = {"examples": len(records), "step": loaded.step}
  if all(field in r for r in records for field in fields):
    rows = tasks.preference_rows(config, loaded.run.tokenizer, records)
    if config.preference.reference == "precomputed":
      rows = preference.precompute_reference(run, rows, batch_size)
    eval_fn = jax.jit(functools.partial(eval_step, loss_fn=preference.make_loss(run, config.preference)))
    metrics = evaluate(eval_fn, loaded.trainable, run.frozen, rows, batch_size, len(records),
                       mesh_lib.batch_sharding(run.mesh))
    result.update({key.split("/", 1)[1]: value for key, value in metrics.items()})
  if "reference" in run.frozen and config.peft.method != "prompt":
    reward_model = RewardModel(config.preference.reward_from, config.preference.reward_label) \
        if config.preference.reward_from else None
    metrics = sample_metrics(run, loaded.trainable, run.frozen, eval_prompts(config, records), config.preference,
                             config.train.seq_len, config.train.seed, reward_model)
    result.update({key.split("/", 1)[1]: value for key, value in metrics.items()})
  return result


def prepare(config, workdir: str, run, train_rows, val_rows):
  """(run with its reference, train rows, val rows, the loop's extra_eval or None) of a preference fine-tuning run:
  reference='precomputed' adds the reference's log-probabilities to the rows (train/preference.stored_reference);
  preference.eval_prompts > 0 samples that many of the validation prompts at each evaluation."""
  cfg = config.preference
  run = preference.with_reference(run, config)
  if cfg.reference == "precomputed":
    train_rows, val_rows = preference.stored_reference(run, workdir, train_rows, val_rows, config.train.batch_size)
  if not cfg.eval_prompts:
    return run, train_rows, val_rows, None
  prompts = eval_prompts(config, tasks.preference_records(config.data)[1], cfg.eval_prompts)
  reward_model = RewardModel(cfg.reward_from, cfg.reward_label) if cfg.reward_from else None
  return run, train_rows, val_rows, lambda params: sample_metrics(
      run, params, run.frozen, prompts, cfg, config.train.seq_len, config.train.seed, reward_model)
