"""Fine-tuning tasks (`config.task`): their data rows, the classification head and the loss functions.

  lm        continued pretraining on text (packed causal-LM rows)
  instruct  prompt/response pairs from JSONL, loss on response tokens (and eos) only; an encoder-decoder
            reads the prompt with its encoder and generates the response with its decoder; a decoder with
            config.data.prompt_as_prefix reads the prompt as a prefix LM's bidirectional prefix
  classify  text/label pairs from JSONL; a linear head on a pooled hidden state (the family's `pooling`)
  preference  prompt / chosen / rejected triples from JSONL, the prompt rendered as instruct renders it; DPO, IPO
            or SimPO (train/preference.py)
A loss function has the signature train/step.py expects and returns sums (the host divides).
`check_sources(config)` checks the task's data as far as it can before a run writes anything;
`prompt_as_prefix(config)` says whether a run's decoder reads a prompt as a bidirectional prefix (generation);
`preference_records`, `render_prompt` and `preference_rows` read a preference run's records and build its
prompts and rows.
"""

import string

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from data import finetuning
from data.packing import pack_documents
from data.pipeline import check_sources as check_text_sources
from data.pipeline import read_splits
from data.sources import probe, read_records
from model.config import ConfigError
from model.families import FAMILIES, family
from train import preference
from train.step import token_loss

TASKS = ("lm", "instruct", "classify", "preference")
HEAD_AXES = {"kernel": P("embed", None), "bias": P(None)}  # logical axes of init_head's tree


def _check_task(config) -> None:
  """ConfigErrors of config.task and the keys that depend on it."""
  task, as_prefix = config.task, bool(config.data.get("prompt_as_prefix", False))
  if task not in TASKS:
    raise ConfigError(f"config.task: expected one of {', '.join(TASKS)}, got {task!r}")
  if as_prefix and task != "instruct":
    raise ConfigError(f"config.data.prompt_as_prefix: only the instruct task has a prompt (config.task is {task!r})")
  if as_prefix and FAMILIES[config.model.family].seq2seq:
    raise ConfigError("config.data.prompt_as_prefix: an encoder-decoder reads the prompt with its encoder already")
  if task == "preference":
    preference.check_config(config)


def check_sources(config) -> None:
  """The errors that build_rows would raise on config.task and config.data, as far as the start of each file
  tells (a ConfigError, or the DataError of data.sources.probe)."""
  _check_task(config)
  data = config.data
  if config.task == "lm":
    check_text_sources(data)
    return
  for path in (data.train_path, data.val_path):
    if path:  # with max_records, reading may stop in the first file: only that one is surely read
      probe(path, data.encoding_errors, max_bytes=1 if data.max_records else 0, records=True)


def build_rows(config, tokenizer):
  """(train_rows, val_rows, label vocabulary or None) for config.task from config.data."""
  data, seq_len, task = config.data, config.train.seq_len, config.task
  _check_task(config)
  as_prefix = bool(data.get("prompt_as_prefix", False))
  if task == "lm":
    pack = lambda docs: pack_documents(tokenizer.encode_batch(docs), seq_len, tokenizer.bos_id, tokenizer.eos_id)
    train, val = read_splits(data)
    return pack(train), pack(val), None

  if task == "preference":
    train, val = preference_records(data)
    return preference_rows(config, tokenizer, train), preference_rows(config, tokenizer, val), None
  fields = ([data.text_field, data.label_field] if task == "classify" else
            sorted(set(_template_fields(data.prompt_template)) | {data.response_field}))
  train = read_records(data.train_path, fields, data.max_records, data.encoding_errors)
  val = read_records(data.val_path, fields, data.max_records, data.encoding_errors) if data.val_path else None
  if val is None:
    train, val = finetuning.split_records(train, data.val_fraction)
  pairs = lambda records: [(finetuning.render(data.prompt_template, r), str(r[data.response_field]))
                           for r in records]
  if task == "instruct" and FAMILIES[config.model.family].seq2seq:  # the prompt to the encoder
    rows = lambda records: finetuning.seq2seq_rows(tokenizer, pairs(records), seq_len, data.target_len or seq_len)
    return rows(train), rows(val), None
  if task == "instruct":
    pack = config.peft.method != "prompt"  # a prompt-tuning prefix belongs to exactly one example per row
    rows = lambda records: finetuning.instruct_rows(tokenizer, pairs(records), seq_len, pack=pack,
                                                    prompt_as_prefix=as_prefix)
    return rows(train), rows(val), None
  labels = finetuning.label_vocabulary([r[data.label_field] for r in train])
  rows = lambda records: finetuning.classify_rows(
      tokenizer, [str(r[data.text_field]) for r in records],
      finetuning.encode_labels([r[data.label_field] for r in records], labels), seq_len)
  return rows(train), rows(val), labels


def prompt_as_prefix(config) -> bool:
  """Whether the run of `config` reads a prompt as a bidirectional prefix: a prefix_lm pretraining run, or an
  instruct fine-tuning run with config.data.prompt_as_prefix."""
  return config.get("objective") == "prefix_lm" or bool(config.data.get("prompt_as_prefix", False))


def preference_records(data) -> tuple[list[dict], list[dict]]:
  """The (train, val) records of a preference run's config.data; each holds the prompt field, the template's other
  fields and non-empty chosen and rejected strings (else a DataError naming file:line)."""
  fields = sorted({data.prompt_field, data.chosen_field, data.rejected_field} |
                  set(_template_fields(data.prompt_template)) - {"prompt"})
  train, val = (read_records(path, fields, data.max_records, data.encoding_errors,
                             nonempty=(data.chosen_field, data.rejected_field)) if path else None
                for path in (data.train_path, data.val_path))
  return (train, val) if val is not None else finetuning.split_records(train, data.val_fraction)


def render_prompt(data, record: dict) -> str:
  """A preference record's prompt: config.data.prompt_template over the record, where {prompt} is its
  data.prompt_field."""
  return finetuning.render(data.prompt_template, {**record, "prompt": record[data.prompt_field]})


def preference_rows(config, tokenizer, records: list[dict]):
  """The preference rows of `records` ([N, 2 * seq_len]; one pair a row under prompt tuning)."""
  data = config.data
  triples = [(render_prompt(data, r), str(r[data.chosen_field]), str(r[data.rejected_field])) for r in records]
  return finetuning.preference_rows(tokenizer, triples, config.train.seq_len, pack=config.peft.method != "prompt")


def _template_fields(template: str) -> list[str]:
  return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def init_head(rng, d_model: int, num_classes: int) -> dict:
  return {"kernel": 0.02 * jax.random.normal(rng, (d_model, num_classes)), "bias": jnp.zeros((num_classes,))}


def pool(hidden_BxLxD, segment_ids_BxL, pooling: str):
  """One vector per row: the last non-padding token (decoders: it has seen the whole text), the first
  token (encoders: [bos] plays BERT's [CLS]) or the mean over non-padding tokens. [B, D] float32."""
  hidden_BxLxD = hidden_BxLxD.astype(jnp.float32)
  if pooling == "last":
    last_B = jnp.sum(segment_ids_BxL > 0, axis=1) - 1
    return hidden_BxLxD[jnp.arange(hidden_BxLxD.shape[0]), last_B]
  if pooling == "first":
    return hidden_BxLxD[:, 0]
  mask_BxLx1 = (segment_ids_BxL > 0)[..., None]
  return jnp.sum(hidden_BxLxD * mask_BxLx1, axis=1) / jnp.maximum(jnp.sum(mask_BxLx1, axis=1), 1)


def head_logits(head: dict, pooled_BxD, model_family: str):
  """[B, C] logits of the linear head. A decoder's bias gets no gradient, so it stays at its initial zero: GPT-2's
  and Llama's score layers have none, and a decoder's classification run exports to them exactly."""
  bias_C = jax.lax.stop_gradient(head["bias"]) if model_family == "decoder" else head["bias"]
  return pooled_BxD @ head["kernel"] + bias_C[None]


def classify_loss(model, model_params, num_classes: int):
  """Cross entropy of a linear head on the pooled `features` of the model (an encoder-decoder's encoder)."""
  def loss_fn(params, frozen, batch, rng, deterministic):
    variables, extra = model_params(params, frozen, rng, deterministic)
    hidden_BxLxD = model.apply(variables, batch, deterministic, rngs={"dropout": rng}, method="features", **extra)
    pooled_BxD = pool(hidden_BxLxD, batch["segment_ids_BxL"], family(model.cfg).pooling)
    logits_BxC = head_logits(params["head"], pooled_BxD, model.cfg.family)
    labels_B, example_weight_B = batch["labels_B"], jnp.max(batch["weights_BxL"], axis=1)  # 0 on filler rows
    loss_B = jax.nn.logsumexp(logits_BxC, axis=-1) - jnp.take_along_axis(logits_BxC, labels_B[:, None], 1)[:, 0]
    predicted_B = jnp.argmax(logits_BxC, axis=-1)
    confusion_CxC = (jax.nn.one_hot(labels_B, num_classes) * example_weight_B[:, None]).T @ jax.nn.one_hot(
        predicted_B, num_classes)
    return {"loss_sum": jnp.sum(loss_B * example_weight_B), "weight_sum": jnp.sum(example_weight_B),
            "correct_sum": jnp.sum((predicted_B == labels_B) * example_weight_B), "confusion": confusion_CxC}
  return loss_fn


def make_loss(task: str, run, z_loss: float = 0.0):
  """The loss of `task` for a fine-tuning Run (train/runs.py); `z_loss` as in token_loss (token tasks only)."""
  if task == "classify":
    if z_loss:
      raise ConfigError(f"config.train.z_loss: {z_loss} acts on token logits; the classify task's loss has none "
                        "(set 0)")
    return classify_loss(run.model, run.model_params, len(run.labels))
  if not family(run.model.cfg).generates:
    raise ConfigError(f"config.task: {task!r} needs a decoder; an encoder fine-tunes on 'classify'")
  if task == "preference":
    if z_loss:
      raise ConfigError(f"config.train.z_loss: {z_loss}: the preference losses take none (set 0)")
    return preference.make_loss(run, run.config.preference)
  return token_loss(run.model, run.model_params, z_loss)
