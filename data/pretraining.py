"""Pretraining objectives: tokenized documents -> rows of the batch format (data/batch.py).

Offers `objective_rows` (the rows of causal_lm, prefix_lm, masked_lm or span_corruption), `special_tokens_for` (the
tokens an objective reserves in the tokenizer), `prefix_lm_rows` (T5's prefix LM: causal-LM rows whose segments
start with a bidirectional prefix of random length, no loss inside it), `masked_lm_rows` (BERT: packed rows, 15%
of tokens chosen, 80/10/10 mask/random/keep, optional whole-word masking), `span_corruption_rows` (T5: one chunk
per row, noise spans -> sentinels in the encoder, sentinel + span in the decoder), `reconstruct_span_corruption`,
`MASK_TOKEN` and `sentinel_tokens`. Names carry shapes: N rows, L = seq_len, T = stream tokens, S = segments,
I / J = encoder / decoder length.
"""

import numpy as np

from data.batch import Batch
from data.packing import document_stream, pack_documents, segments_and_positions
from data.sources import DataError
from data.tokenizer import Tokenizer

MASK_TOKEN = "<mask>"


def sentinel_tokens(n: int = 100) -> list[str]:
  """T5's sentinel names "<extra_id_0>" .. "<extra_id_{n-1}>"; span i of a row is replaced by the i-th."""
  return [f"<extra_id_{i}>" for i in range(n)]


def _round_at_random(rng: np.random.Generator, x_N: np.ndarray) -> np.ndarray:
  """floor(x) + 1 with probability frac(x): integers whose mean is x (an unbiased rounding)."""
  floor_N = np.floor(x_N)
  return (floor_N + (rng.random(x_N.shape) < x_N - floor_N)).astype(np.int64)


def prefix_lm_rows(token_lists: list[list[int]], seq_len: int, *, bos_id: int, eos_id: int, seed) -> Batch:
  """Prefix LM rows (T5, section 3.2.3): the causal-LM rows of pack_documents, each segment with a prefix; [N, L].

  A segment (a document's tokens in one row) of n inputs gets a prefix of its first p tokens, p uniform over 1..n
  (T5 splits a span at a uniform random point; p = 1 is a causal segment), marked 1 in prefix_BxL and attended
  bidirectionally. A target inside the prefix is visible to it, so its weight is 0: the loss is on the tokens
  after the prefix, the first of them predicted from the last prefix token (and on a row's last target, the
  next row's first token, which no input of the row sees). Deterministic for a seed.
  """
  rows = pack_documents(token_lists, seq_len, bos_id, eos_id)
  positions_NxL = rows["positions_BxL"]
  segment_T = np.cumsum(positions_NxL.ravel() == 0) - 1  # positions restart at 0 exactly where a segment starts
  length_S = np.bincount(segment_T)
  prefix_S = 1 + (np.random.default_rng(seed).random(len(length_S)) * length_S).astype(np.int64)
  prefix_NxL = (positions_NxL.ravel() < prefix_S[segment_T]).reshape(positions_NxL.shape)
  weights_NxL = rows["weights_BxL"].copy()
  weights_NxL[:, :-1] *= ~prefix_NxL[:, 1:]
  return dict(rows, weights_BxL=weights_NxL, prefix_BxL=prefix_NxL.astype(np.int32))


def masked_lm_rows(token_lists: list[list[int]], seq_len: int, *, bos_id: int, eos_id: int, mask_id: int,
                   special_ids, vocab_size: int, seed, mask_rate: float = 0.15,
                   whole_word_starts=None) -> Batch:
  """BERT rows: packed [bos] + ids + [eos] streams with ~mask_rate of the tokens corrupted; arrays [N, L].

  Row r is stream[r*L : (r+1)*L] (no shift, no overlap; the tail that does not fill a row is dropped);
  segment_ids number the documents of a row from 1 and positions restart at each document and each row.
  In each row, k of its n candidate tokens (neither bos, eos, pad nor any of special_ids) are chosen, with
  k = mask_rate * n rounded up or down at random so that the share is unbiased. Of the chosen, 80% become
  mask_id, 10% a token drawn uniformly from the ids in [0, vocab_size) outside special_ids (it may equal the
  original), 10% stay. targets = the original tokens, weights = 1.0 exactly at chosen positions. Static and
  deterministic for a seed (anything np.random.default_rng takes).
  whole_word_starts (a function id -> bool, or a bool array [V]) marks ids that begin a word (sentencepiece:
  pieces starting with a space); then whole words are chosen (a word also begins after a special token and
  at the start of a row), in random order until the next word would take the count further from k.
  """
  if seq_len < 1:
    raise DataError(f"seq_len {seq_len}: expected a positive length")
  lengths_D = np.array([len(ids) + 2 for ids in token_lists], dtype=np.int64)
  total = int(lengths_D.sum())
  num_rows = total // seq_len
  if num_rows <= 0:
    raise DataError(f"the corpus has {total} tokens, fewer than seq_len = {seq_len}")
  stream_T, doc_T = document_stream([list(ids) + [eos_id] for ids in token_lists], bos_id)
  targets_NxL = stream_T[:num_rows * seq_len].reshape(num_rows, seq_len)
  doc_NxL = doc_T[:num_rows * seq_len].reshape(num_rows, seq_len)
  segment_ids_NxL, positions_NxL = segments_and_positions(doc_NxL)

  special_S = np.unique(np.asarray(list(special_ids) + [bos_id, eos_id, mask_id], dtype=np.int64))
  candidate_NxL = ~np.isin(targets_NxL, special_S)
  if not candidate_NxL.any():
    raise DataError(f"the corpus has no tokens to mask in its {total} tokens (only bos, eos and special tokens)")
  # Choice units ("words"): each candidate token alone, or runs of candidates that form whole words.
  unit_start_NxL = candidate_NxL.copy()
  if whole_word_starts is not None:
    if callable(whole_word_starts):
      begins_V = np.array([bool(whole_word_starts(i)) for i in range(vocab_size)])
    else:
      begins_V = np.asarray(whole_word_starts, dtype=bool)
    continues_NxL = np.zeros_like(candidate_NxL)
    continues_NxL[:, 1:] = candidate_NxL[:, :-1] & ~begins_V[targets_NxL[:, 1:]]
    unit_start_NxL &= ~continues_NxL
  rng = np.random.default_rng(seed)
  budget_N = _round_at_random(rng, mask_rate * candidate_NxL.sum(1))
  # Unit u covers the candidates from its start up to the next start; order units by (row, random key).
  unit_T = np.cumsum(unit_start_NxL.ravel()) - 1
  unit_row_U = np.nonzero(unit_start_NxL)[0]
  unit_len_U = np.bincount(unit_T[candidate_NxL.ravel()], minlength=len(unit_row_U))
  order_U = np.lexsort((rng.random(len(unit_row_U)), unit_row_U))
  cum_U = np.cumsum(unit_len_U[order_U])
  row_first_N = np.searchsorted(unit_row_U[order_U], np.arange(num_rows))  # first unit of each row in order_U
  before_U = cum_U - unit_len_U[order_U] - np.concatenate([[0], cum_U])[row_first_N][unit_row_U[order_U]]
  # Take a unit while the count before it plus half of it stays under the budget (nearest to the budget).
  chosen_U = np.zeros(len(unit_row_U), dtype=bool)
  chosen_U[order_U] = before_U + unit_len_U[order_U] / 2 < budget_N[unit_row_U[order_U]]
  chosen_NxL = candidate_NxL & chosen_U[np.maximum(unit_T, 0)].reshape(num_rows, seq_len)

  # 80% mask, 10% random token, 10% unchanged.
  num_chosen = int(chosen_NxL.sum())
  action_C = rng.random(num_chosen)
  replacements_R = np.setdiff1d(np.arange(vocab_size), special_S)
  random_C = replacements_R[rng.integers(0, len(replacements_R), num_chosen)]
  inputs_NxL = targets_NxL.copy()
  inputs_NxL[chosen_NxL] = np.where(action_C < 0.8, mask_id,
                                    np.where(action_C < 0.9, random_C, targets_NxL[chosen_NxL]))
  return {
      "inputs_BxL": inputs_NxL.astype(np.int32),
      "targets_BxL": targets_NxL.astype(np.int32),
      "positions_BxL": positions_NxL,
      "segment_ids_BxL": segment_ids_NxL,
      "weights_BxL": chosen_NxL.astype(np.float32),
  }


def _span_counts(raw_len: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
  """(noise tokens, noise spans) of a chunk of raw_len tokens; each at least 1, spans at most min(noise, rest)."""
  num_noise = min(max(int(round(raw_len * noise_density)), 1), raw_len - 1)
  num_spans = max(int(round(num_noise / mean_span_length)), 1)
  return num_noise, min(num_spans, num_noise, raw_len - num_noise)


def _span_raw_len(input_len: int, target_len: int, noise_density: float, mean_span_length: float) -> int:
  """The largest chunk length whose corrupted input fits input_len and target fits target_len (0 if none)."""
  best = 0
  for raw_len in range(2, input_len + target_len + 1):  # non-noise <= input_len, noise <= target_len
    num_noise, num_spans = _span_counts(raw_len, noise_density, mean_span_length)
    if raw_len - num_noise + num_spans + 1 <= input_len and num_noise + num_spans + 1 <= target_len:
      best = raw_len
  return best


def _random_segmentation(rng: np.random.Generator, num_rows: int, num_items: int,
                         num_segments: int) -> np.ndarray:
  """Lengths [N, num_segments], each >= 1 and summing to num_items: a uniform random composition per row."""
  keys_NxC = rng.random((num_rows, num_items - 1))
  cuts_NxS = np.sort(np.argsort(keys_NxC, axis=1)[:, :num_segments - 1], axis=1) + 1
  bounds_NxS = np.concatenate([np.zeros((num_rows, 1), np.int64), cuts_NxS,
                               np.full((num_rows, 1), num_items)], axis=1)
  return np.diff(bounds_NxS, axis=1)


def span_corruption_rows(token_lists: list[list[int]], *, input_len: int, target_len: int, eos_id: int,
                         pad_id: int, sentinel_ids, seed, noise_density: float = 0.15,
                         mean_span_length: float = 3.0) -> Batch:
  """T5 rows: one chunk of the ids + [eos] stream per row, noise spans -> sentinels; [N, I] and [N, J] arrays.

  The chunk length R is the largest whose encoder input (non-noise tokens, one sentinel per noise span, eos)
  fits I = input_len and whose decoder target (per span: its sentinel then its tokens; then eos) fits
  J = target_len, with round(R * noise_density) noise tokens in max(1, round(noise / mean_span_length))
  spans. Each chunk alternates non-noise, noise, ..., noise spans with random lengths (deterministic for a
  seed). Encoder: inputs, positions, segment_ids (1 on tokens); decoder: decoder_targets, decoder_inputs
  ([pad_id] + targets[:-1], T5's start token), decoder_positions, decoder_segment_ids, decoder_weights.
  Padding is pad_id in token arrays and 0 elsewhere; the tail of the stream that does not fill a chunk is
  dropped.
  """
  raw_len = _span_raw_len(input_len, target_len, noise_density, mean_span_length)
  if raw_len == 0:
    raise DataError(f"span corruption: input_len {input_len} / target_len {target_len} are too short "
                    f"for any chunk (noise_density {noise_density}, mean_span_length {mean_span_length})")
  num_noise, num_spans = _span_counts(raw_len, noise_density, mean_span_length)
  sentinel_S = np.asarray(list(sentinel_ids), dtype=np.int64)
  if len(sentinel_S) < num_spans:
    raise DataError(f"span corruption: {num_spans} noise spans per chunk of {raw_len} tokens but only "
                    f"{len(sentinel_S)} sentinel ids")
  stream_T = np.fromiter((t for ids in token_lists for t in [*ids, eos_id]), dtype=np.int64)
  num_rows = len(stream_T) // raw_len
  if num_rows <= 0:
    raise DataError(f"the corpus has {len(stream_T)} tokens, fewer than one span-corruption chunk "
                    f"of {raw_len} tokens (input_len {input_len})")
  chunks_NxR = stream_T[:num_rows * raw_len].reshape(num_rows, raw_len)

  # Span k of a row (0-based) is non-noise for even k, noise span k // 2 for odd k.
  rng = np.random.default_rng(seed)
  noise_NxS = _random_segmentation(rng, num_rows, num_noise, num_spans)
  nonnoise_NxS = _random_segmentation(rng, num_rows, raw_len - num_noise, num_spans)
  span_lengths_Nx2S = np.stack([nonnoise_NxS, noise_NxS], axis=2).reshape(num_rows, 2 * num_spans)
  span_starts_Nx2S = np.cumsum(span_lengths_Nx2S, axis=1) - span_lengths_Nx2S
  marks_NxR = np.zeros((num_rows, raw_len), np.int64)
  marks_NxR[np.arange(num_rows)[:, None], span_starts_Nx2S[:, 1:]] = 1  # span 0 starts at 0
  span_NxR = np.cumsum(marks_NxR, axis=1)
  noise_NxR = span_NxR % 2 == 1
  first_NxR = np.zeros_like(noise_NxR)  # first token of a noise span
  first_NxR[np.arange(num_rows)[:, None], span_starts_Nx2S[:, 1::2]] = True
  sentinel_NxR = sentinel_S[span_NxR // 2]  # for noise tokens: the sentinel of their span

  # Encoder: a non-noise token sits after the sentinels of the noise spans before it; a span's sentinel
  # takes the place of its first token, after the non-noise tokens before it.
  enc_len, dec_len = raw_len - num_noise + num_spans, num_noise + num_spans  # without eos
  rows_NxR = np.broadcast_to(np.arange(num_rows)[:, None], (num_rows, raw_len))
  nonnoise_before_NxR = np.cumsum(~noise_NxR, axis=1) - ~noise_NxR
  enc_NxI = np.full((num_rows, input_len), pad_id, np.int64)
  keep = ~noise_NxR
  enc_NxI[rows_NxR[keep], (nonnoise_before_NxR + span_NxR // 2)[keep]] = chunks_NxR[keep]
  enc_NxI[rows_NxR[first_NxR], (nonnoise_before_NxR + span_NxR // 2)[first_NxR]] = sentinel_NxR[first_NxR]
  enc_NxI[:, enc_len] = eos_id
  # Decoder: noise token j sits after the noise tokens before it and the sentinels of spans up to its own.
  noise_before_NxR = np.cumsum(noise_NxR, axis=1) - noise_NxR
  dec_index_NxR = noise_before_NxR + span_NxR // 2 + 1
  dec_NxJ = np.full((num_rows, target_len), pad_id, np.int64)
  dec_NxJ[rows_NxR[noise_NxR], dec_index_NxR[noise_NxR]] = chunks_NxR[noise_NxR]
  dec_NxJ[rows_NxR[first_NxR], dec_index_NxR[first_NxR] - 1] = sentinel_NxR[first_NxR]
  dec_NxJ[:, dec_len] = eos_id

  def tokens_mask(num_real: int, length: int) -> np.ndarray:
    """[N, length] int32: 1 on the first num_real columns."""
    return np.broadcast_to((np.arange(length) < num_real).astype(np.int32), (num_rows, length)).copy()

  enc_seg_NxI, dec_seg_NxJ = tokens_mask(enc_len + 1, input_len), tokens_mask(dec_len + 1, target_len)
  dec_inputs_NxJ = np.concatenate([np.full((num_rows, 1), pad_id, np.int64), dec_NxJ[:, :-1]], axis=1)
  return {
      "inputs_BxL": enc_NxI.astype(np.int32),
      "positions_BxL": (np.arange(input_len) * enc_seg_NxI).astype(np.int32),
      "segment_ids_BxL": enc_seg_NxI,
      "decoder_inputs_BxL": dec_inputs_NxJ.astype(np.int32),
      "decoder_targets_BxL": dec_NxJ.astype(np.int32),
      "decoder_positions_BxL": (np.arange(target_len) * dec_seg_NxJ).astype(np.int32),
      "decoder_segment_ids_BxL": dec_seg_NxJ,
      "decoder_weights_BxL": dec_seg_NxJ.astype(np.float32),
  }


def reconstruct_span_corruption(inputs_row, targets_row, sentinel_ids, eos_id: int) -> list[int]:
  """The original chunk of one span-corruption row: each sentinel in inputs replaced by its target span."""
  def until_last_eos(row) -> list[int]:
    """The row's tokens before its final eos (an eos inside the chunk is an ordinary token)."""
    row = [int(t) for t in row]
    return row[:len(row) - 1 - row[::-1].index(eos_id)]

  sentinels = {int(s) for s in sentinel_ids}
  spans, current = {}, None
  for t in until_last_eos(targets_row):
    if t in sentinels:
      current = spans.setdefault(t, [])
    elif current is None:
      raise DataError(f"span corruption targets start with {t}, not a sentinel")
    else:
      current.append(t)
  chunk = []
  for t in until_last_eos(inputs_row):
    chunk.extend(spans[t] if t in sentinels else [t])
  return chunk


def special_tokens_for(objective: str) -> list[str]:
  """The special tokens `objective` needs reserved in the tokenizer."""
  tokens = {"causal_lm": [], "prefix_lm": [], "masked_lm": [MASK_TOKEN], "span_corruption": sentinel_tokens(100)}
  if objective not in tokens:
    raise DataError(f"objective '{objective}': expected one of {', '.join(tokens)}")
  return tokens[objective]


def _span_target_len(data_config, seq_len: int) -> int:
  """data.target_len, else seq_len / 4 rounded up to a multiple of 8 (T5's 512 -> 128 >= the 114 it needs)."""
  quarter = max(1, -(-seq_len // 4))
  return data_config.target_len or -(-quarter // 8) * 8


def objective_rows(objective: str, tokenizer: Tokenizer, token_lists: list[list[int]], seq_len: int,
              data_config, seed: int) -> Batch:
  """Rows of `objective` from tokenized documents."""
  if objective == "causal_lm":
    return pack_documents(token_lists, seq_len, tokenizer.bos_id, tokenizer.eos_id)
  if objective == "prefix_lm":
    return prefix_lm_rows(token_lists, seq_len, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, seed=seed)
  if objective == "masked_lm":
    mask_id = tokenizer.token_id(MASK_TOKEN)
    special_ids = [tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, mask_id]
    return masked_lm_rows(token_lists, seq_len, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                          mask_id=mask_id, special_ids=special_ids, vocab_size=tokenizer.vocab_size, seed=seed)
  return span_corruption_rows(token_lists, input_len=seq_len, target_len=_span_target_len(data_config, seq_len),
                              eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                              sentinel_ids=[tokenizer.token_id(t) for t in sentinel_tokens(100)], seed=seed)
