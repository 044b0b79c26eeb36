"""Fine-tuning rows: records -> rows of the batch format (data/batch.py), one builder per kind of task.

Offers `render` (a str.format template over a record), `instruct_rows` (prompt -> response rows with the loss on
the response only, packed or one example per row, the prompt optionally a prefix LM's prefix), `seq2seq_rows`
(prompt to an encoder, response to a decoder), `preference_rows` (a prompt with a chosen and a rejected response,
the two side by side in one row), `classify_rows` (text rows plus an int label per row),
`label_vocabulary` / `encode_labels` (label values <-> class ids) and `split_records` (train / val).
"""

import numpy as np

from data import batch as batch_lib
from data.batch import Batch
from data.sources import DataError, split_documents
from data.tokenizer import Tokenizer


def render(template: str, record: dict) -> str:
  """`template.format_map(record)`; a placeholder naming a field the record lacks is a DataError."""
  try:
    return template.format_map(record)
  except KeyError as e:
    fields = ", ".join(map(str, record)) or "none"
    raise DataError(f"template field '{e.args[0]}' not in record (fields: {fields})") from None
  except (IndexError, ValueError, AttributeError) as e:  # "{}", "{0}", a bad format spec, "{x.y}"
    raise DataError(f"template {template[:60]!r}: {e} (use {{field}}, and {{{{ }}}} for a literal brace)") from None


def _instruct_stream(tokenizer: Tokenizer, prompt_ids: list[int], response_ids: list[int],
                     seq_len: int) -> tuple[list[int], int]:
  """(what the run's framing puts before a text ([bos] in ablax's own runs) + prompt + response + [eos], cut to
  seq_len + 1 tokens; the number of tokens before the response)."""
  before = tokenizer.around[0]
  excess = len(before) + len(prompt_ids) + len(response_ids) + 1 - (seq_len + 1)
  if excess > 0:
    # Drop the start of the prompt first (the end of a prompt is nearest the answer); if even the
    # response does not fit, keep bos and the response's first part (the eos is lost).
    prompt_ids = prompt_ids[min(excess, len(prompt_ids)):]
  stream = (before + list(prompt_ids) + list(response_ids) + [tokenizer.eos_id])[:seq_len + 1]
  return stream, len(before) + len(prompt_ids)


def _response_weights(stream: list[int], num_prompt: int) -> list[float]:
  """The loss weight of each target of `stream` (its num_prompt first tokens: [bos] + the prompt): 1 on the response
  and the eos."""
  # Target j is stream[j + 1]; stream[:k] is [bos] + the prompt, so targets j >= k - 1 count (the first response
  # token has no context to be predicted from when nothing precedes it: a run that adds no bos, an empty prompt).
  return [0.0] * max(num_prompt - 1, 0) + [1.0] * (len(stream) - max(num_prompt, 1))


def instruct_rows(tokenizer: Tokenizer, pairs: list[tuple[str, str]], seq_len: int, pack: bool = True,
                  prompt_as_prefix: bool = False) -> Batch:
  """Rows of (prompt, response) examples, loss only on response tokens and eos; arrays [N, seq_len].

  Each example is [bos] + prompt + response + [eos] (an imported run's framing puts its own tokens, or none,
  where [bos] is: Tokenizer.around): inputs = stream[:-1], targets = stream[1:], weight 1 where the target is a
  response token or the eos. An example over seq_len + 1 tokens loses the start of its prompt; if the response
  alone is too long, the stream is [bos] + the response's first seq_len tokens.
  pack=True puts whole examples greedily, in order, into rows (never across two rows), each its own segment
  (ids 1, 2, ...; positions from 0); pack=False gives one example per row. prompt_as_prefix marks [bos] + prompt
  in prefix_BxL (a prefix LM reads the prompt bidirectionally). Padding is 0 everywhere.
  """
  if not pairs:
    raise DataError("instruction data: no (prompt, response) pairs")
  if seq_len < 1:
    raise DataError(f"seq_len {seq_len}: expected a positive length")
  prompts_ids = tokenizer.encode_batch([p for p, _ in pairs])
  responses_ids = tokenizer.encode_batch([r for _, r in pairs])
  streams, num_prompts, row_of = [], [], []
  row, used = -1, seq_len  # no row open yet
  for prompt_ids, response_ids in zip(prompts_ids, responses_ids):
    stream, num_prompt = _instruct_stream(tokenizer, prompt_ids, response_ids, seq_len)
    length = len(stream) - 1  # tokens the example takes in a row
    if not pack or used + length > seq_len:
      row, used = row + 1, 0
    streams.append(stream)
    num_prompts.append(num_prompt)
    row_of.append(row)
    used += length
  weights = [_response_weights(s, k) for s, k in zip(streams, num_prompts)]
  prefix_lengths = list(num_prompts) if prompt_as_prefix else None
  return batch_lib.rows([s[:-1] for s in streams], seq_len, targets=[s[1:] for s in streams], weights=weights,
                        row_of=row_of, prefix_lengths=prefix_lengths)


def preference_rows(tokenizer: Tokenizer, triples: list[tuple[str, str, str]], seq_len: int,
                    pack: bool = True) -> Batch:
  """Rows of (prompt, chosen, rejected) examples; arrays [N, 2 * seq_len]: the first seq_len columns hold chosen
  streams, the last seq_len the rejected ones, each laid out as instruct_rows lays out a (prompt, response) pair.

  A row holds pair j as segment j + 1 of both halves, so a loss that folds the row into its two halves ([2N,
  seq_len]: chosen, rejected) finds the two responses of a pair at the same segment id. pack=True puts whole pairs
  greedily, in order, into rows while both halves fit; pack=False gives one pair per row (a prompt-tuning prefix
  belongs to one example per row).
  """
  if not triples:
    raise DataError("preference data: no (prompt, chosen, rejected) triples")
  if seq_len < 1:
    raise DataError(f"seq_len {seq_len}: expected a positive length")
  prompts_ids = tokenizer.encode_batch([p for p, _, _ in triples])
  chosen_ids = tokenizer.encode_batch([c for _, c, _ in triples])
  rejected_ids = tokenizer.encode_batch([r for _, _, r in triples])
  halves = {"chosen": [], "rejected": []}  # (stream, tokens before the response) per pair
  row_of, row, used = [], -1, (seq_len, seq_len)  # no row open yet
  for prompt_ids, chosen, rejected in zip(prompts_ids, chosen_ids, rejected_ids):
    pair = [_instruct_stream(tokenizer, prompt_ids, response, seq_len) for response in (chosen, rejected)]
    lengths = [len(stream) - 1 for stream, _ in pair]
    if not pack or any(u + n > seq_len for u, n in zip(used, lengths)):
      row, used = row + 1, (0, 0)
    used = tuple(u + n for u, n in zip(used, lengths))
    row_of.append(row)
    halves["chosen"].append(pair[0])
    halves["rejected"].append(pair[1])
  built = []
  for examples in halves.values():
    weights = [_response_weights(s, k) for s, k in examples]
    built.append(batch_lib.rows([s[:-1] for s, _ in examples], seq_len, targets=[s[1:] for s, _ in examples],
                                weights=weights, row_of=row_of))
  return {key: np.concatenate([built[0][key], built[1][key]], axis=1) for key in built[0]}


def seq2seq_rows(tokenizer: Tokenizer, pairs: list[tuple[str, str]], input_len: int, target_len: int) -> Batch:
  """Encoder-decoder rows, one example per row: the framed prompt ([bos] + prompt in ablax's own runs, prompt +
  </s> in an imported T5) to the encoder [N, input_len], the response +
  eos as decoder targets [N, target_len] (decoder_inputs start with the pad id, T5's start token); both
  are cut to fit, keeping their start; weights are 1 on every target."""
  if not pairs:
    raise DataError("seq2seq data: no (input, target) pairs")
  sources = [tokenizer.frame(ids)[:input_len] for ids in tokenizer.encode_batch([p for p, _ in pairs])]
  targets = [(ids + [tokenizer.eos_id])[:target_len] for ids in tokenizer.encode_batch([t for _, t in pairs])]
  decoder = batch_lib.rows([[tokenizer.pad_id] + t[:-1] for t in targets], target_len, targets=targets,
                           weights=[[1.0] * len(t) for t in targets], prefix="decoder_")
  return {**batch_lib.rows(sources, input_len), **decoder}


def classify_rows(tokenizer: Tokenizer, texts: list[str], labels: list[int], seq_len: int) -> Batch:
  """One text per row, framed by its run ([bos] + ids in ablax's own; [CLS] + ids + [SEP] in an imported BERT), its
  ids cut to fit seq_len, right-padded with the pad id; arrays [N, seq_len], labels [N]."""
  if not texts:
    raise DataError("classification data: no texts")
  if len(texts) != len(labels):
    raise DataError(f"classification data: {len(texts)} texts but {len(labels)} labels")
  if seq_len < 1:
    raise DataError(f"seq_len {seq_len}: expected a positive length")
  before, after = tokenizer.around
  room = max(seq_len - len(before) - len(after), 0)
  tokens = [tokenizer.frame(ids[:room])[:seq_len] for ids in tokenizer.encode_batch(list(texts))]
  rows = batch_lib.rows(tokens, seq_len, weights=[[1.0] * len(t) for t in tokens], pad_id=tokenizer.pad_id)
  return {**rows, "labels_B": np.asarray(labels, np.int32)}


def label_vocabulary(values: list) -> list:
  """The sorted distinct label values (ints numerically, strings lexically)."""
  distinct = set(values)
  if not distinct:
    raise DataError("labels: no label values")
  try:
    return sorted(distinct)
  except TypeError:
    kinds = ", ".join(sorted({type(v).__name__ for v in distinct}))
    raise DataError(f"labels: values of mixed types ({kinds}); make them all ints or all strings") from None


def encode_labels(values: list, vocabulary: list) -> np.ndarray:
  """Class ids int32 [N]: the index of each value in `vocabulary`; an unknown value is a DataError."""
  index = {v: i for i, v in enumerate(vocabulary)}
  ids_N = np.empty(len(values), np.int32)
  for n, v in enumerate(values):
    if v not in index:
      shown = ", ".join(map(repr, vocabulary[:20])) + (", ..." if len(vocabulary) > 20 else "")
      raise DataError(f"label {v!r} (record {n}) is not in the label vocabulary ({shown})")
    ids_N[n] = index[v]
  return ids_N


def split_records(records: list, val_fraction: float) -> tuple[list, list]:
  """Deterministic (train, val) split: every n-th record (n = round(1 / val_fraction)) goes to val."""
  if val_fraction > 0 and len(records) < 2:
    raise DataError(f"{len(records)} record(s): too few to split off a validation set")
  # split_documents only splits inside a document when given one; with two or more it takes any items.
  return split_documents(records, val_fraction)
