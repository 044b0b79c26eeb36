"""From documents to fixed-shape batches: pack token streams into rows, iterate them resumably.

Offers `pack_documents` (causal-LM rows), `Loader` (deterministic, resumable, per-process batches),
`special_tokens_for` (the tokens an objective reserves in the tokenizer) and `prepare_lm_data` (config ->
tokenizer, train rows, val rows for causal_lm, masked_lm or span_corruption).
"""

import os

import numpy as np

from data.objectives import (MASK_TOKEN, document_stream, masked_lm_rows, segments_and_positions, sentinel_tokens,
                             span_corruption_rows)
from data.sources import DataError, read_documents, split_documents
from data.tokenizer import (CHAR_FILE, SPM_FILE, CharTokenizer, SentencePieceTokenizer, Tokenizer,
                            load_tokenizer, train_tokenizer)


def pack_documents(token_lists: list[list[int]], seq_len: int, bos_id: int,
                   eos_id: int | None = None) -> dict[str, np.ndarray]:
  """Pack [bos] + ids (+ [eos]) of every document into N rows of seq_len; arrays [N, seq_len].

  Row r reads stream[r*seq_len : r*seq_len + seq_len + 1], so rows overlap by one token and no target is
  lost; the tail that does not fill a row is dropped. Weights are 0 where the target starts another document.
  """
  if eos_id is not None:  # the model learns to end a document, so generation can stop
    token_lists = [list(ids) + [eos_id] for ids in token_lists]
  lengths_D = np.array([len(ids) + 1 for ids in token_lists], dtype=np.int64)
  total = int(lengths_D.sum())
  num_rows = (total - 1) // seq_len if total > 0 else 0
  if num_rows <= 0:
    raise DataError(f"the corpus has {total} tokens, fewer than seq_len+1 = {seq_len + 1}")
  stream_T, doc_T = document_stream(token_lists, bos_id)

  index_NxW = np.arange(num_rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]  # W = seq_len + 1
  window_NxW, doc_NxW = stream_T[index_NxW], doc_T[index_NxW]
  doc_NxL = doc_NxW[:, :-1]
  segment_ids_NxL, positions_NxL = segments_and_positions(doc_NxL)
  return {
      "inputs": window_NxW[:, :-1],
      "targets": window_NxW[:, 1:],
      "segment_ids": segment_ids_NxL,
      "positions": positions_NxL,
      "weights": (doc_NxL == doc_NxW[:, 1:]).astype(np.float32),
  }


class Loader:
  """Deterministic, resumable iterator of fixed-shape batches over packed rows."""

  def __init__(self, rows: dict[str, np.ndarray], batch_size: int, seed: int, shuffle: bool = True,
               process_index: int = 0, process_count: int = 1):
    self.rows = rows
    self.num_rows = len(next(iter(rows.values())))
    if self.num_rows == 0:
      raise DataError("loader: no rows to iterate")
    if batch_size <= 0 or batch_size % process_count:
      raise DataError(f"loader: batch_size {batch_size} should be a positive multiple of "
                      f"the process count {process_count}")
    self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
    self.local_batch_size = batch_size // process_count
    self.local_offset = process_index * self.local_batch_size
    self.epoch, self.index = 0, 0
    self._orders = {}  # epoch -> row order, for at most three neighbouring epochs

  def _order(self, epoch: int) -> np.ndarray:
    """Row order of `epoch`."""
    if epoch not in self._orders:
      if self.shuffle:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
      else:
        order = np.arange(self.num_rows)
      self._orders = {e: o for e, o in self._orders.items() if abs(e - epoch) <= 1}
      self._orders[epoch] = order
    return self._orders[epoch]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    """The next batch, this process' slice: each value [batch_size // process_count, seq_len]."""
    # Global positions of this process' slice in the infinite concatenation of epoch orders.
    flat_B = self.epoch * self.num_rows + self.index + self.local_offset + np.arange(self.local_batch_size)
    epochs_B, within_B = np.divmod(flat_B, self.num_rows)
    rows_B = np.empty(self.local_batch_size, dtype=np.int64)
    for e in np.unique(epochs_B):
      rows_B[epochs_B == e] = self._order(int(e))[within_B[epochs_B == e]]
    self.epoch, self.index = divmod(self.epoch * self.num_rows + self.index + self.batch_size, self.num_rows)
    return {k: v[rows_B] for k, v in self.rows.items()}

  def get_state(self) -> dict:
    """JSON-able position: the next batch starts at row `index` of epoch `epoch`'s order."""
    return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_rows": self.num_rows}

  def set_state(self, state: dict) -> None:
    """Continue from a position saved by get_state (same seed and row count)."""
    if state.get("seed") != self.seed or state.get("num_rows") != self.num_rows:
      raise DataError(f"data state (seed {state.get('seed')}, {state.get('num_rows')} rows) does not match "
                      f"this loader (seed {self.seed}, {self.num_rows} rows)")
    self.epoch, self.index = int(state["epoch"]), int(state["index"])


def special_tokens_for(objective: str) -> list[str]:
  """The special tokens `objective` needs reserved in the tokenizer."""
  tokens = {"causal_lm": [], "masked_lm": [MASK_TOKEN], "span_corruption": sentinel_tokens(100)}
  if objective not in tokens:
    raise DataError(f"objective '{objective}': expected one of {', '.join(tokens)}")
  return tokens[objective]


def _option(config, name: str, default):
  """config.name, or `default` when the config lacks it or it is falsy (ConfigDict or a plain namespace)."""
  return getattr(config, name, default) or default


def _tokenizer_for(config, train_docs: list[str], val_docs: list[str], workdir: str | None,
                   special_tokens: list[str] | tuple = ()) -> Tokenizer:
  """The workdir's saved tokenizer if any, else one trained on the train docs (and saved to workdir)."""
  if workdir and any(os.path.isfile(os.path.join(workdir, f)) for f in (SPM_FILE, CHAR_FILE)):
    tokenizer = load_tokenizer(workdir)
    expected = {"sentencepiece": SentencePieceTokenizer, "char": CharTokenizer}.get(config.tokenizer)
    if expected is not None and not isinstance(tokenizer, expected):
      raise DataError(f"workdir '{workdir}': its saved tokenizer is not '{config.tokenizer}' as configured")
    if config.tokenizer == "sentencepiece" and tokenizer.vocab_size != config.vocab_size:
      raise DataError(f"workdir '{workdir}': its saved tokenizer has vocab_size {tokenizer.vocab_size}, "
                      f"the config says {config.vocab_size}")
    for token in special_tokens:
      try:
        tokenizer.token_id(token)
      except DataError:
        raise DataError(f"workdir '{workdir}': its saved tokenizer lacks the special token '{token}' "
                        f"this objective needs (use a fresh workdir)") from None
    return tokenizer
  # A char vocabulary also covers the validation text, so that no validation character is unknown.
  texts = train_docs + val_docs if config.tokenizer == "char" else train_docs
  tokenizer = train_tokenizer(texts, config.tokenizer, config.vocab_size, model_type=config.spm_model_type,
                              max_chars=config.tokenizer_train_chars, special_tokens=special_tokens)
  if workdir:
    tokenizer.save(workdir)
  return tokenizer


def _span_target_len(data_config, seq_len: int) -> int:
  """data.target_len, else seq_len / 4 rounded up to a multiple of 8 (T5's 512 -> 128 >= the 114 it needs)."""
  quarter = max(1, -(-seq_len // 4))
  return int(_option(data_config, "target_len", -(-quarter // 8) * 8))


def _rows_for(objective: str, tokenizer: Tokenizer, token_lists: list[list[int]], seq_len: int,
              data_config, seed: int) -> dict[str, np.ndarray]:
  """Rows of `objective` from tokenized documents."""
  if objective == "causal_lm":
    return pack_documents(token_lists, seq_len, tokenizer.bos_id, tokenizer.eos_id)
  if objective == "masked_lm":
    mask_id = tokenizer.token_id(MASK_TOKEN)
    special_ids = [tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, mask_id]
    return masked_lm_rows(token_lists, seq_len, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                          mask_id=mask_id, special_ids=special_ids, vocab_size=tokenizer.vocab_size, seed=seed)
  return span_corruption_rows(token_lists, input_len=seq_len, target_len=_span_target_len(data_config, seq_len),
                              eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                              sentinel_ids=[tokenizer.token_id(t) for t in sentinel_tokens(100)], seed=seed)


def read_splits(data_config) -> tuple[list[str], list[str]]:
  """(train documents, validation documents) of `config.data`: val_path, else val_fraction held out."""
  c = data_config
  train_docs = read_documents(c.train_path, c.text_field, c.max_bytes)
  if c.val_path:
    val_docs = read_documents(c.val_path, c.text_field, c.max_bytes)
  else:
    train_docs, val_docs = split_documents(train_docs, c.val_fraction)
  if not val_docs:
    raise DataError(f"data path '{c.train_path}': the validation split is empty "
                    f"(set data.val_path or data.val_fraction > 0)")
  return train_docs, val_docs


def prepare_lm_data(data_config, seq_len: int, workdir: str | None, objective: str = "causal_lm"
                    ) -> tuple[Tokenizer, dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Read, split, tokenize (loading or training the tokenizer) and make `objective` rows: (tok, train, val).

  causal_lm: pack_documents; masked_lm: masked_lm_rows (static masks, seed data.seed or 0, validation seed
  + 1); span_corruption: span_corruption_rows with input_len = seq_len and target_len = data.target_len or
  a quarter of seq_len rounded up to a multiple of 8. The tokenizer reserves special_tokens_for(objective).
  """
  c = data_config
  special_tokens = special_tokens_for(objective)
  train_docs, val_docs = read_splits(c)
  tokenizer = _tokenizer_for(c, train_docs, val_docs, workdir, special_tokens)
  seed = int(_option(c, "seed", 0))
  splits = {}
  for i, (name, path, docs) in enumerate((("train", c.train_path, train_docs),
                                          ("validation", c.val_path or c.train_path, val_docs))):
    try:
      splits[name] = _rows_for(objective, tokenizer, tokenizer.encode_batch(docs), seq_len, c, seed + i)
    except DataError as e:
      raise DataError(f"{name} data '{path}': {e}") from None
  return tokenizer, splits["train"], splits["validation"]
