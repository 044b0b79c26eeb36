"""From config.data to a tokenizer and rows: raw text tokenized at start, or a corpus prepared once.

Offers `check_sources` (what can be checked of config.data's sources before a run writes anything),
`read_splits` (train / validation documents of config.data), `prepare_lm_data` (config -> tokenizer,
train rows, val rows for causal_lm, prefix_lm, masked_lm or span_corruption), `tokenizer_for` (a workdir's tokenizer, or
one trained and saved) and `prepared_data` (data.prepared: one prepared corpus or a mixture of several).
"""

import os
import shutil

import numpy as np

from data.batch import Batch
from data.loader import Mixture
from data.prepared import PreparedRows, file_sha256, read_manifest
from data.pretraining import objective_rows, special_tokens_for
from data.sources import DataError, probe, read_documents, split_documents
from data.tokenizer import (CHAR_FILE, SPM_FILE, CharTokenizer, HuggingFaceTokenizer, SentencePieceTokenizer,
                            Tokenizer, load_tokenizer, train_tokenizer)


def check_sources(data_config) -> None:
  """The DataError that reading config.data's sources would raise, as far as the start of each file tells
  (sources.probe), or a prepared corpus's manifest; cheap enough to run before a run writes anything."""
  c = data_config
  if getattr(c, "prepared", ""):
    for directory, _ in _prepared_spec(c.prepared):
      read_manifest(directory)
    return
  probe(c.train_path, c.encoding_errors, c.max_bytes)
  if c.val_path:
    probe(c.val_path, c.encoding_errors, c.max_bytes)


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

  causal_lm: pack_documents; prefix_lm: prefix_lm_rows (prefixes drawn with the seed of the masks); masked_lm:
  masked_lm_rows (static masks, seed data.seed, validation seed + 1); span_corruption: span_corruption_rows with
  input_len = seq_len and target_len = data.target_len or a quarter of seq_len rounded up to a multiple of 8. The tokenizer reserves special_tokens_for(objective).
  """
  c = data_config
  special_tokens = special_tokens_for(objective)
  train_docs, val_docs = read_splits(c)
  tokenizer = tokenizer_for(c, train_docs, val_docs, workdir, special_tokens)
  seed = max(c.seed, 0)  # -1 (the order follows train.seed): the corruption keeps seed 0
  splits = {}
  for i, (name, path, docs) in enumerate((("train", c.train_path, train_docs),
                                          ("validation", c.val_path or c.train_path, val_docs))):
    try:
      splits[name] = objective_rows(objective, tokenizer, tokenizer.encode_batch(docs), seq_len, c, seed + i)
    except DataError as e:
      raise DataError(f"{name} data '{path}': {e}") from None
  return tokenizer, splits["train"], splits["validation"]


def tokenizer_for(config, train_docs: list[str], val_docs: list[str], workdir: str | None,
                   special_tokens: list[str] | tuple = ()) -> Tokenizer:
  """The workdir's saved tokenizer if any (framing texts by config.framing: an imported run's samples read their
  prompts as its Hugging Face tokenizer frames them), else one trained on the train docs (and saved to workdir)."""
  if workdir and any(os.path.isfile(os.path.join(workdir, f)) for f in (SPM_FILE, CHAR_FILE)):
    tokenizer = load_tokenizer(workdir, getattr(config, "framing", ""))
    expected = {"sentencepiece": SentencePieceTokenizer, "char": CharTokenizer,
                "huggingface": HuggingFaceTokenizer}.get(config.tokenizer)
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


def _prepared_spec(spec: str) -> list[tuple[str, float]]:
  """"DIR" or "DIR1=0.9,DIR2=0.1" -> [(directory, weight)]."""
  corpora = []
  for part in (p.strip() for p in spec.split(",") if p.strip()):
    directory, _, weight = part.rpartition("=") if "=" in part else (part, "", "1")
    try:
      corpora.append((directory, float(weight)))
    except ValueError:
      raise DataError(f"data.prepared: {part!r}: expected DIR or DIR=WEIGHT") from None
  if not corpora:
    raise DataError("data.prepared: no corpus named")
  return corpora


def prepared_data(data_config, seq_len: int, workdir: str | None, max_val_rows: int):
  """(tokenizer, train source, validation rows) of data.prepared: one corpus (DIR) or a mixture (DIR=WEIGHT,...).

  Every corpus must have the same tokenizer, which is copied into the workdir (a workdir holding another one is
  refused). Validation: the first max_val_rows rows of the first corpus' validation split.
  """
  corpora = _prepared_spec(data_config.prepared)
  manifests = [read_manifest(directory) for directory, _ in corpora]
  first, tokenizer_file = corpora[0][0], manifests[0]["tokenizer"]["file"]
  for (directory, _), manifest in zip(corpora[1:], manifests[1:]):
    if manifest["tokenizer"]["sha256"] != manifests[0]["tokenizer"]["sha256"]:
      raise DataError(f"data.prepared: {directory} and {first} have different tokenizers; a mixture needs one")
  if workdir:
    saved = os.path.join(workdir, tokenizer_file)
    if not os.path.exists(saved):
      shutil.copy(os.path.join(first, tokenizer_file), saved)
    elif file_sha256(saved) != manifests[0]["tokenizer"]["sha256"]:
      raise DataError(f"{saved}: not the tokenizer of {first}; use a fresh workdir for this corpus")
  tokenizer = load_tokenizer(first)
  sources = [PreparedRows(directory, "train", seq_len, manifest) for (directory, _), manifest in
             zip(corpora, manifests)]
  train = sources[0] if len(sources) == 1 else Mixture(
      sources, [weight for _, weight in corpora], [os.path.basename(os.path.normpath(d)) for d, _ in corpora])
  validation = PreparedRows(first, "validation", seq_len, manifests[0])
  return tokenizer, train, validation.take(np.arange(min(validation.num_rows, max_val_rows)))
