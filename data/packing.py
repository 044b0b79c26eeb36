"""Packing: documents -> fixed-length rows of one token stream, with segment ids and positions.

Offers `document_stream` (every document as [bos] + ids, concatenated), `segments_and_positions` (of packed
rows) and `pack_documents` (causal-LM rows). Names carry shapes: N rows, L = seq_len, T stream tokens.
"""

import numpy as np

from data.batch import Batch
from data.sources import DataError


def document_stream(token_lists, bos_id: int):
  """Every document as [bos] + ids, concatenated: (tokens [T], document index of each token [T])."""
  lengths_D = np.array([len(ids) + 1 for ids in token_lists], dtype=np.int64)
  stream_T = np.empty(int(lengths_D.sum()), dtype=np.int32)
  for start, ids in zip(np.concatenate([[0], np.cumsum(lengths_D)[:-1]]), token_lists):
    stream_T[start] = bos_id
    stream_T[start + 1:start + 1 + len(ids)] = ids
  return stream_T, np.repeat(np.arange(len(token_lists)), lengths_D)


def segments_and_positions(doc_NxL):
  """Segment ids (1, 2, ... per row) and positions (0, 1, ... per segment) of packed rows, where a segment
  starts at the start of each row and wherever the document changes."""
  starts_NxL = np.ones_like(doc_NxL, dtype=bool)
  starts_NxL[:, 1:] = doc_NxL[:, 1:] != doc_NxL[:, :-1]
  col_NxL = np.broadcast_to(np.arange(doc_NxL.shape[1]), doc_NxL.shape)
  last_start_NxL = np.maximum.accumulate(np.where(starts_NxL, col_NxL, 0), axis=1)
  return np.cumsum(starts_NxL, axis=1).astype(np.int32), (col_NxL - last_start_NxL).astype(np.int32)


def pack_documents(token_lists: list[list[int]], seq_len: int, bos_id: int, eos_id: int | None = None) -> Batch:
  """Pack [bos] + ids (+ [eos]) of every document into N rows of seq_len; arrays [N, seq_len].

  Row r reads stream[r*seq_len : r*seq_len + seq_len + 1], so rows overlap by one token and no target is
  lost; the tail that does not fill a row is dropped. Weights are 0 where the target starts another document.
  """
  if eos_id is not None:  # the model learns to end a document, so generation can stop
    token_lists = [list(ids) + [eos_id] for ids in token_lists]
  total = sum(len(ids) + 1 for ids in token_lists)
  num_rows = (total - 1) // seq_len if total > 0 else 0
  if num_rows <= 0:
    raise DataError(f"the corpus has {total} tokens, fewer than seq_len+1 = {seq_len + 1}")
  stream_T, doc_T = document_stream(token_lists, bos_id)

  index_NxW = np.arange(num_rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]  # W = seq_len + 1
  window_NxW, doc_NxW = stream_T[index_NxW], doc_T[index_NxW]
  doc_NxL = doc_NxW[:, :-1]
  segment_ids_NxL, positions_NxL = segments_and_positions(doc_NxL)
  return {
      "inputs_BxL": window_NxW[:, :-1],
      "targets_BxL": window_NxW[:, 1:],
      "segment_ids_BxL": segment_ids_NxL,
      "positions_BxL": positions_NxL,
      "weights_BxL": (doc_NxL == doc_NxW[:, 1:]).astype(np.float32),
  }
