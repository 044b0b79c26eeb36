"""The loader: config.data -> tokenizer and prepared rows, then deterministic, resumable, per-process batches.

Offers `read_splits` (train / validation documents of config.data), `prepare_lm_data` (config -> tokenizer,
train rows, val rows for causal_lm, masked_lm or span_corruption) and `Loader`.
"""

import os

import numpy as np

from data import batch as batch_lib
from data.batch import Batch
from data.pretraining import objective_rows, special_tokens_for
from data.sources import DataError, read_documents, split_documents
from data.tokenizer import (CHAR_FILE, SPM_FILE, CharTokenizer, SentencePieceTokenizer, Tokenizer,
                            load_tokenizer, train_tokenizer)


def read_splits(data_config) -> tuple[list[str], list[str]]:
  """(train documents, validation documents) of `config.data`: val_path, else val_fraction held out."""
  c = data_config
  train_docs = read_documents(c.train_path, c.text_field, c.max_bytes, c.encoding_errors)
  if c.val_path:
    val_docs = read_documents(c.val_path, c.text_field, c.max_bytes, c.encoding_errors)
  else:
    train_docs, val_docs = split_documents(train_docs, c.val_fraction)
  if not val_docs:
    raise DataError(f"data path '{c.train_path}': the validation split is empty "
                    f"(set data.val_path or data.val_fraction > 0)")
  return train_docs, val_docs


def prepare_lm_data(data_config, seq_len: int, workdir: str | None, objective: str = "causal_lm"
                    ) -> tuple[Tokenizer, Batch, Batch]:
  """Read, split, tokenize (loading or training the tokenizer) and make `objective` rows: (tok, train, val).

  causal_lm: pack_documents; masked_lm: masked_lm_rows (static masks, seed data.seed, validation seed
  + 1); span_corruption: span_corruption_rows with input_len = seq_len and target_len = data.target_len or
  a quarter of seq_len rounded up to a multiple of 8. The tokenizer reserves special_tokens_for(objective).
  """
  c = data_config
  special_tokens = special_tokens_for(objective)
  train_docs, val_docs = read_splits(c)
  tokenizer = _tokenizer_for(c, train_docs, val_docs, workdir, special_tokens)
  seed = c.seed
  splits = {}
  for i, (name, path, docs) in enumerate((("train", c.train_path, train_docs),
                                          ("validation", c.val_path or c.train_path, val_docs))):
    try:
      splits[name] = objective_rows(objective, tokenizer, tokenizer.encode_batch(docs), seq_len, c, seed + i)
    except DataError as e:
      raise DataError(f"{name} data '{path}': {e}") from None
  return tokenizer, splits["train"], splits["validation"]


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


class Loader:
  """Deterministic, resumable iterator of fixed-shape batches over packed rows."""

  def __init__(self, rows: Batch, batch_size: int, seed: int, shuffle: bool = True,
               process_index: int = 0, process_count: int = 1):
    self.rows = rows
    self.num_rows = batch_lib.num_rows(rows)
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

  def __next__(self) -> Batch:
    """The next batch, this process' slice: each value [batch_size // process_count, seq_len]."""
    # Global positions of this process' slice in the infinite concatenation of epoch orders.
    flat_B = self.epoch * self.num_rows + self.index + self.local_offset + np.arange(self.local_batch_size)
    epochs_B, within_B = np.divmod(flat_B, self.num_rows)
    rows_B = np.empty(self.local_batch_size, dtype=np.int64)
    for e in np.unique(epochs_B):
      rows_B[epochs_B == e] = self._order(int(e))[within_B[epochs_B == e]]
    self.epoch, self.index = divmod(self.epoch * self.num_rows + self.index + self.batch_size, self.num_rows)
    return batch_lib.take(self.rows, rows_B)

  def get_state(self) -> dict:
    """JSON-able position: the next batch starts at row `index` of epoch `epoch`'s order."""
    return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_rows": self.num_rows}

  def set_state(self, state: dict) -> None:
    """Continue from a position saved by get_state (same seed and row count)."""
    if state.get("seed") != self.seed or state.get("num_rows") != self.num_rows:
      raise DataError(f"data state (seed {state.get('seed')}, {state.get('num_rows')} rows) does not match "
                      f"this loader (seed {self.seed}, {self.num_rows} rows)")
    self.epoch, self.index = int(state["epoch"]), int(state["index"])
