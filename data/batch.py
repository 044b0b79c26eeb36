"""The batch: one format that every objective and task produces and every step, loss and decoder reads.

Offers `Batch` (the declared keys), `WEIGHT_KEYS`, `num_rows`, `take` (rows by index) and `rows` (the one
constructor of padded rows). A set of N prepared rows is a Batch too; the loader takes batches from it.
Keys carry shapes: B rows, L the length of the key's own stream (an encoder-decoder's decoder stream has its
own length).
"""

from typing import Sequence, TypedDict

import numpy as np


class Batch(TypedDict, total=False):
  """Arrays of one batch (numpy on the host, jax on devices); padding is 0 with segment id 0."""
  inputs_BxL: np.ndarray               # int32 token ids (an encoder-decoder's encoder input)
  targets_BxL: np.ndarray              # int32 the token each position predicts
  weights_BxL: np.ndarray              # float32 loss weight: 0 on padding, prompts, unchosen masked-LM positions
  positions_BxL: np.ndarray            # int32 position in its segment, from 0
  segment_ids_BxL: np.ndarray          # int32 1, 2, ... per packed example; attention never crosses segments
  prefix_BxL: np.ndarray               # int32 prefix LM: 1 on a segment's leading tokens, attended bidirectionally
  decoder_inputs_BxL: np.ndarray       # encoder-decoder: the decoder's stream, keys as above
  decoder_targets_BxL: np.ndarray
  decoder_weights_BxL: np.ndarray
  decoder_positions_BxL: np.ndarray
  decoder_segment_ids_BxL: np.ndarray
  labels_B: np.ndarray                 # int32 class ids (classification)
  reference_logprobs_BxL: np.ndarray   # float32 preference: the reference's log-probability of each target


WEIGHT_KEYS = ("weights_BxL", "decoder_weights_BxL")


def num_rows(batch: Batch) -> int:
  return len(next(iter(batch.values())))


def take(batch: Batch, index) -> Batch:
  """The rows at `index` (an int array or a slice) of every key."""
  return {key: value[index] for key, value in batch.items()}


def rows(tokens: Sequence[Sequence[int]], length: int, *, targets=None, weights=None, row_of=None,
         left: bool = False, pad_id: int = 0, prefix: str = "", prefix_lengths=None) -> Batch:
  """Examples laid into rows of `length`: inputs, positions (from 0), segment ids, and targets / weights if given
  (one sequence per example, as long as its tokens).

  One example per row, right-padded (`left`: right-aligned, for prompts that continue together); or `row_of[i]`
  names example i's row, so several examples share a row in order, each its own segment (ids 1, 2, ...).
  `prefix_lengths[i]`, if given, is the number of example i's first tokens marked 1 in prefix_BxL (a prefix LM).
  Padding is `pad_id` in inputs and targets, 0 elsewhere. Keys start with `prefix` ("decoder_").
  """
  row_of = np.arange(len(tokens)) if row_of is None else np.asarray(row_of)
  num = int(row_of.max()) + 1 if len(tokens) else 0
  fields = {"inputs": (tokens, np.int32, pad_id), "positions": (None, np.int32, 0),
            "segment_ids": (None, np.int32, 0), "targets": (targets, np.int32, pad_id),
            "weights": (weights, np.float32, 0), "prefix": (prefix_lengths, np.int32, 0)}
  fields = {key: spec for key, spec in fields.items() if key in ("positions", "segment_ids") or spec[0] is not None}
  out = {key: np.full((num, length), fill, dtype) for key, (_, dtype, fill) in fields.items()}
  used, segment = np.zeros(num, np.int64), np.zeros(num, np.int32)
  for i, (row, example) in enumerate(zip(row_of, tokens)):
    n = len(example)
    if used[row] + n > length:
      raise ValueError(f"row {row}: {used[row] + n} tokens do not fit a row of {length}")
    if prefix_lengths is not None and not 0 <= prefix_lengths[i] <= n:
      raise ValueError(f"example {i}: a prefix of {prefix_lengths[i]} tokens in {n} tokens")
    start = length - n if left else used[row]
    columns = slice(start, start + n)
    segment[row] += 1
    out["positions"][row, columns] = np.arange(n)
    out["segment_ids"][row, columns] = segment[row]
    for key in ("inputs", "targets", "weights"):
      if key in out:
        out[key][row, columns] = fields[key][0][i]
    if prefix_lengths is not None:
      out["prefix"][row, start:start + prefix_lengths[i]] = 1
    used[row] += n
  return {f"{prefix}{key}_BxL": value for key, value in out.items()}
