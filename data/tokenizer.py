"""Tokenizers: train, save, load; text <-> ids.

Offers `Tokenizer` (the interface), `SentencePieceTokenizer`, `CharTokenizer`, `train_tokenizer`,
`load_sentencepiece` (a model file, checked) and `load_tokenizer`. A workdir holds `tokenizer.model`
(sentencepiece) or `tokenizer.json` (char).
"""

import io
import json
import os
from typing import Sequence

import sentencepiece as spm

from data.sources import DataError

SPM_FILE = "tokenizer.model"
CHAR_FILE = "tokenizer.json"
MAX_LINE_CHARS = 4096  # longer lines are cut before sentencepiece training


class Tokenizer:
  """Text <-> ids. encode adds no bos/eos; decode skips pad/bos/eos."""

  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, without bos/eos."""
    raise NotImplementedError

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """Ids of each text, without bos/eos."""
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`, skipping pad/bos/eos."""
    raise NotImplementedError

  def token_id(self, token: str) -> int:
    """The id of a special token reserved at training (e.g. a mask token)."""
    raise NotImplementedError

  def save(self, directory: str) -> None:
    """Write the tokenizer file into `directory`."""
    raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model (bpe or unigram) with byte fallback; lossless on any text without U+2581."""

  def __init__(self, model_proto: bytes):
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id = self._sp.pad_id()
    self.bos_id = self._sp.bos_id()
    self.eos_id = self._sp.eos_id()

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, without bos/eos."""
    return self._sp.encode(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """Ids of each text (encoded on 2 threads), without bos/eos."""
    return self._sp.encode(list(texts), num_threads=2)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; pad/bos/eos are control pieces, which sentencepiece skips."""
    return self._sp.decode([int(i) for i in ids])

  def token_id(self, token: str) -> int:
    """The id of a special token reserved at training (e.g. a mask token)."""
    i = self._sp.piece_to_id(token)
    if i == self._sp.unk_id() and token != self._sp.id_to_piece(i):
      raise DataError(f"tokenizer: no special token '{token}' (reserve it with special_tokens at training)")
    return i

  def save(self, directory: str) -> None:
    """Write `tokenizer.model` into `directory`."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, SPM_FILE), "wb") as f:
      f.write(self._proto)


class CharTokenizer(Tokenizer):
  """Character-level: 0=pad 1=bos 2=eos, then the characters, then any special tokens."""

  def __init__(self, chars: str, special_tokens: Sequence[str] = ()):
    self.chars = "".join(sorted(set(chars)))
    self.special_tokens = list(special_tokens)
    self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
    self._char_to_id = {c: i + 3 for i, c in enumerate(self.chars)}
    self._pieces = ["", "", ""] + list(self.chars) + self.special_tokens
    self.vocab_size = len(self._pieces)

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, without bos/eos; an unknown character is a DataError."""
    try:
      return [self._char_to_id[c] for c in text]
    except KeyError as e:
      raise DataError(f"char tokenizer: character {e.args[0]!r} (U+{ord(e.args[0]):04X}) "
                      f"is not in its vocabulary of {len(self.chars)} characters") from None

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`, skipping pad/bos/eos."""
    return "".join(self._pieces[int(i)] for i in ids)

  def token_id(self, token: str) -> int:
    """The id of a special token reserved at training (e.g. a mask token)."""
    if token not in self.special_tokens:
      raise DataError(f"tokenizer: no special token '{token}' (reserve it with special_tokens at training)")
    return 3 + len(self.chars) + self.special_tokens.index(token)

  def save(self, directory: str) -> None:
    """Write `tokenizer.json` into `directory`."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CHAR_FILE), "w", encoding="utf-8") as f:
      json.dump({"kind": "char", "chars": self.chars, "special_tokens": self.special_tokens}, f)


def _training_lines(texts: list[str], max_chars: int) -> list[str]:
  """Non-empty lines of `texts` in order, each cut to MAX_LINE_CHARS, at most `max_chars` in total."""
  lines, total = [], 0
  for text in texts:
    for line in text.split("\n"):
      line = line[:MAX_LINE_CHARS]
      if not line.strip():
        continue
      if total + len(line) > max_chars:
        return lines
      lines.append(line)
      total += len(line)
  return lines


def _train_sentencepiece(texts, vocab_size, model_type, max_chars, seed, special_tokens) -> SentencePieceTokenizer:
  """Train a lossless sentencepiece model in memory."""
  if model_type not in ("bpe", "unigram"):
    raise DataError(f"spm_model_type '{model_type}': expected 'bpe' or 'unigram'")
  lines = _training_lines(texts, max_chars)
  if not lines:
    raise DataError("tokenizer: the training texts are empty")
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model,
        vocab_size=vocab_size, model_type=model_type,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, user_defined_symbols=list(special_tokens),
        byte_fallback=True, character_coverage=0.9995, split_digits=True,
        # Keep text as is so decode(encode(s)) == s: code indentation, repeated spaces, leading space.
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        input_sentence_size=0, shuffle_input_sentence=False,  # 0: all (a count of 100 or fewer is refused)
        max_sentence_length=4 * MAX_LINE_CHARS, num_threads=2, minloglevel=2)
  except RuntimeError as e:
    reason = str(e).splitlines()[0].split("] ")[-1] or str(e).strip()  # drop sentencepiece's source location
    raise DataError(f"tokenizer: sentencepiece {model_type} with vocab_size {vocab_size} "
                    f"failed on {len(lines)} lines: {reason}") from None
  return SentencePieceTokenizer(model.getvalue())


def train_tokenizer(texts: list[str], kind: str, vocab_size: int, model_type: str = "bpe",
                    max_chars: int = 20_000_000, seed: int = 0,
                    special_tokens: Sequence[str] = ()) -> Tokenizer:
  """Train a "sentencepiece" or "char" tokenizer on `texts` (char ignores vocab_size)."""
  if kind == "sentencepiece":
    return _train_sentencepiece(texts, vocab_size, model_type, max_chars, seed, special_tokens)
  if kind == "char":
    return CharTokenizer("".join(set("".join(texts))), special_tokens)
  raise DataError(f"tokenizer '{kind}': expected 'sentencepiece' or 'char'")


def load_sentencepiece(path: str) -> SentencePieceTokenizer:
  """The sentencepiece model in file `path`; a DataError naming it when it is empty, truncated or corrupt."""
  try:
    with open(path, "rb") as f:
      tokenizer = SentencePieceTokenizer(f.read())
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
  except RuntimeError:  # sentencepiece's message only names its own source line
    raise DataError(f"{path}: not a sentencepiece model (truncated or corrupt); delete it or use a fresh "
                    "workdir to train a new tokenizer") from None
  if tokenizer.vocab_size == 0:  # an empty file parses as a model without pieces
    raise DataError(f"{path}: not a sentencepiece model (no pieces); delete it or use a fresh workdir "
                    "to train a new tokenizer")
  return tokenizer


def load_tokenizer(directory: str) -> Tokenizer:
  """The tokenizer saved in `directory` (tokenizer.model or tokenizer.json)."""
  spm_path, char_path = os.path.join(directory, SPM_FILE), os.path.join(directory, CHAR_FILE)
  if os.path.isfile(spm_path):
    return load_sentencepiece(spm_path)
  if os.path.isfile(char_path):
    try:
      with open(char_path, encoding="utf-8") as f:
        spec = json.load(f)
      tokens = spec.get("special_tokens", []) if isinstance(spec, dict) else None
      if (not isinstance(spec, dict) or spec.get("kind") != "char" or not isinstance(spec.get("chars"), str)
          or not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens)):
        raise ValueError("expected {\"kind\": \"char\", \"chars\": \"...\", \"special_tokens\": [...]}")
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
      raise DataError(f"{char_path}: not a char tokenizer ({str(e).splitlines()[0]})") from None
    return CharTokenizer(spec["chars"], spec.get("special_tokens", ()))
  raise DataError(f"workdir '{directory}': no {SPM_FILE} or {CHAR_FILE}")
