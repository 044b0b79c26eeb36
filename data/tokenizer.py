"""Tokenizers: train, save, load; text <-> ids.

Offers `Tokenizer` (the interface), `SentencePieceTokenizer`, `CharTokenizer`, `HuggingFaceTokenizer` (a Hugging
Face `tokenizer.json`: byte-level BPE as GPT-2 and Llama 3, WordPiece as BERT, Unigram as T5), `train_tokenizer`,
`load_sentencepiece` (a model file, checked), `load_huggingface` (a Hugging Face directory's tokenizer and special
tokens) and `load_tokenizer`. A tokenizer also knows how its run frames a text (`frame`, config.data.framing):
ablax's own runs read [bos] + text, as pretraining opens every document; a run imported from Hugging Face reads a
text as its Hugging Face tokenizer frames it (GPT-2: the text alone; Llama: <s> + text). A workdir holds
`tokenizer.model` (sentencepiece) or `tokenizer.json`: ablax's char tokenizer ({"kind": "char", ...}) or, told
apart by its content, a Hugging Face one beside its `tokenizer_config.json` (both as transformers reads them).
"""

import io
import json
import os
from typing import Sequence

import sentencepiece as spm
import tokenizers

from data.sources import DataError

SPM_FILE = "tokenizer.model"
CHAR_FILE = "tokenizer.json"
HF_FILE = "tokenizer.json"  # the same name as CHAR_FILE: load_tokenizer tells them apart by content
HF_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_FILE = "special_tokens_map.json"  # older transformers versions wrote special tokens here
HF_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "cls_token", "sep_token")
# The model's vocabulary size, when its embedding has more rows than the tokenizer has tokens (e.g. T5: 32128 rows,
# 32100 tokens); an ablax key in tokenizer_config.json, which transformers keeps as an unused setting.
HF_VOCAB_KEY = "ablax_vocab_size"
MAX_LINE_CHARS = 4096  # longer lines are cut before sentencepiece training
FRAMED_TEXT = "$A"  # the text's place in a framing template, as in Hugging Face's TemplateProcessing


class Tokenizer:
  """Text <-> ids. encode adds no bos/eos; decode skips pad/bos/eos; frame puts a text's ids as its run reads them."""

  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  framing: str = ""  # config.data.framing: "" for ablax's [bos] + text, else a template such as "<s> $A"
  _around: tuple = ((), ())  # the ids before and after the text of a framing template

  def set_framing(self, template: str) -> None:
    """Frames texts by `template` (config.data.framing): "" is ablax's [bos] + text; otherwise the names of special
    tokens around one $A (the text), e.g. "$A" (GPT-2: nothing added) or "<s> $A" (Llama), as recorded at import."""
    if template:
      words = template.split()
      if words.count(FRAMED_TEXT) != 1:
        raise DataError(f"config.data.framing {template!r}: expected special token names around one {FRAMED_TEXT}")
      ids = []
      for word in words:
        try:
          ids.append(None if word == FRAMED_TEXT else self.token_id(word))
        except DataError as e:
          raise DataError(f"config.data.framing {template!r}: {e}") from None
      at = words.index(FRAMED_TEXT)
      self._around = (tuple(ids[:at]), tuple(ids[at + 1:]))
    self.framing = template

  @property
  def around(self) -> tuple[list[int], list[int]]:
    """(the ids before, the ids after) a text's own in its run's framing: ([bos], []) in ablax's own."""
    return (list(self._around[0]), list(self._around[1])) if self.framing else ([self.bos_id], [])

  def frame(self, ids: Sequence[int]) -> list[int]:
    """The ids of a text as its run reads them: [bos] + ids (ablax's own), or within its framing template."""
    before, after = self.around
    return [*before, *ids, *after]

  def encode_prompt(self, text: str) -> list[int]:
    """The ids a run generates from after `text`: the framed text, or bos alone where that is empty (an empty
    prompt of a run that adds nothing, as GPT-2's tokenizer; generation needs one token to start from)."""
    return self.frame(self.encode(text)) or [self.bos_id]

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
    self.eos_id = self._sp.eos_id()
    # Imported models may lack a bos (T5) or pad (Llama) piece: eos stands in, as for HuggingFaceTokenizer.
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else self.eos_id
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
    self.unk_id = self._sp.unk_id()

  @property
  def proto(self) -> bytes:
    """The serialized sentencepiece model."""
    return self._proto

  def piece(self, i: int) -> str:
    """The piece of id `i` (e.g. "<s>")."""
    return self._sp.id_to_piece(int(i))

  def has_piece(self, kind: str) -> bool:
    """Whether the model has its own "bos", "eos" or "pad" piece (else eos stands in)."""
    return getattr(self._sp, f"{kind}_id")() >= 0

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


def _token_name(value) -> str | None:
  """The content of a special token entry of tokenizer_config.json: a string or an AddedToken object."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) and value else None


def _cleanup_spaces(text: str) -> str:
  """transformers' clean_up_tokenization: no space before punctuation and English contractions."""
  for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
    text = text.replace(spaced, joined)
  return text


class HuggingFaceTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json` run by the `tokenizers` library, as transformers runs it: encode adds no
  special tokens, decode skips them (and cleans up spaces where tokenizer_config.json asks, BPE excepted).

  Special tokens are named in `config` (tokenizer_config.json's keys, kept as `tokenizer_config`); bos, eos or pad
  not named there come from the ids in `model_config` (the model's config.json). bos is bos_token, else cls_token
  (BERT), else eos; eos is eos_token, else sep_token; pad is pad_token, else eos (GPT-2 has none; padding never
  reaches the loss or attention). ablax's "<mask>" is mask_token. `source`: the directory, named in messages.
  """

  def __init__(self, tokenizer_json: str, config: dict, source: str, model_config: dict | None = None):
    self._json_path, self._config_path = os.path.join(source, HF_FILE), os.path.join(source, HF_CONFIG_FILE)
    try:
      self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # the Rust side raises a plain Exception
      raise DataError(f"{self._json_path}: not a Hugging Face tokenizer ({str(e).splitlines()[0]})") from None
    self._tokenizer.no_truncation()  # some files carry truncation or padding; transformers turns both off too
    self._tokenizer.no_padding()
    self._json, self.tokenizer_config = tokenizer_json, dict(config)
    for key in ("bos_token", "eos_token", "pad_token"):
      i = (model_config or {}).get(key + "_id")
      i = i[0] if isinstance(i, list) and i else i  # Llama 3.1 lists several eos ids
      name = self._tokenizer.id_to_token(i) if type(i) is int and i >= 0 else None
      if _token_name(self.tokenizer_config.get(key)) is None and name is not None:
        self.tokenizer_config[key] = name
    self._added_ids = set(self._tokenizer.get_added_tokens_decoder())
    self.num_tokens = max(self._tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    self.vocab_size = self.num_tokens
    if HF_VOCAB_KEY in self.tokenizer_config:
      self.set_model_vocab_size(self.tokenizer_config[HF_VOCAB_KEY])
    ids = {key: self._special_id(key) for key in HF_SPECIAL_KEYS}
    eos = ids["eos_token"] if ids["eos_token"] is not None else ids["sep_token"]
    if eos is None:
      raise DataError(f"{self._config_path}: no eos_token or sep_token (ablax ends every document with one)")
    self.eos_id = eos
    self.bos_id = next(i for i in (ids["bos_token"], ids["cls_token"], eos) if i is not None)
    self.pad_id = ids["pad_token"] if ids["pad_token"] is not None else eos
    self._mask_id = ids["mask_token"]
    cleanup = bool(self.tokenizer_config.get("clean_up_tokenization_spaces", False))
    self._cleanup = cleanup and type(self._tokenizer.model).__name__ != "BPE"  # as transformers 5

  @property
  def tokenizer_json(self) -> str:
    """The tokenizer.json text, as read."""
    return self._json

  def _special_id(self, key: str) -> int | None:
    """The id of the special token config[key] names; None if it names none."""
    name = _token_name(self.tokenizer_config.get(key))
    if name is None:
      return None
    i = self._tokenizer.token_to_id(name)
    if i is None:
      raise DataError(f"{self._config_path}: {key} {name!r} is not a token of {HF_FILE}")
    return i

  def set_model_vocab_size(self, vocab_size) -> None:
    """Makes vocab_size the model's, whose embedding may have more rows than the tokenizer has tokens."""
    if not isinstance(vocab_size, int) or vocab_size < self.num_tokens:
      raise DataError(f"{self._config_path}: {HF_VOCAB_KEY} {vocab_size!r} is below the "
                      f"{self.num_tokens} tokens of {HF_FILE}")
    self.vocab_size = vocab_size
    self.tokenizer_config.pop(HF_VOCAB_KEY, None)
    if vocab_size > self.num_tokens:
      self.tokenizer_config[HF_VOCAB_KEY] = vocab_size

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, without special tokens."""
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """Ids of each text (in parallel), without special tokens."""
    return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`, skipping special tokens and ids past the tokenizer's (a larger embedding's)."""
    text = self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
    return _cleanup_spaces(text) if self._cleanup else text

  def token_id(self, token: str) -> int:
    """The id of an added (special) token; ablax's "<mask>" is the tokenizer's mask_token."""
    if token == "<mask>" and self._mask_id is not None:
      return self._mask_id
    i = self._tokenizer.token_to_id(token)
    if i is None or i not in self._added_ids:
      raise DataError(f"tokenizer: no special token '{token}' in {self._json_path}")
    return i

  def save(self, directory: str) -> None:
    """Write `tokenizer.json` (as read) and `tokenizer_config.json` (special tokens resolved) into `directory`."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, HF_FILE), "w", encoding="utf-8") as f:
      f.write(self._json)
    with open(os.path.join(directory, HF_CONFIG_FILE), "w", encoding="utf-8") as f:
      json.dump(self.tokenizer_config, f, indent=2, ensure_ascii=False)
      f.write("\n")


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
  if kind == "huggingface":
    raise DataError(f"tokenizer 'huggingface' is not trained: it comes with a model (python -m train.hf import), "
                    f"as {HF_FILE} in the workdir")
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


def _read_json(path: str, what: str, required: bool = True):
  """The JSON object in `path` (None if absent and not `required`); a DataError naming the file otherwise."""
  if not required and not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    raise DataError(f"{path}: not {what} ({str(e).splitlines()[0]})") from None
  if not isinstance(value, dict):
    raise DataError(f"{path}: not {what} (expected a JSON object, got {type(value).__name__})")
  return value


def load_huggingface(directory: str, model_config: dict | None = None, tokenizer_json: str | None = None
                     ) -> HuggingFaceTokenizer:
  """The Hugging Face tokenizer in `directory`: tokenizer.json (or its text `tokenizer_json`), its special tokens
  from tokenizer_config.json, else special_tokens_map.json, else the ids in `model_config` (config.json)."""
  if tokenizer_json is None:
    path = os.path.join(directory, HF_FILE)
    try:
      with open(path, encoding="utf-8") as f:
        tokenizer_json = f.read()
    except (OSError, ValueError) as e:
      raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
  config = _read_json(os.path.join(directory, HF_CONFIG_FILE), "a tokenizer config", required=False) or {}
  special = _read_json(os.path.join(directory, HF_SPECIAL_FILE), "a special tokens map", required=False) or {}
  for key in HF_SPECIAL_KEYS:
    if _token_name(config.get(key)) is None and _token_name(special.get(key)) is not None:
      config[key] = _token_name(special.get(key))
  return HuggingFaceTokenizer(tokenizer_json, config, directory, model_config)


def load_tokenizer(directory: str, framing: str = "") -> Tokenizer:
  """The tokenizer saved in `directory` (tokenizer.model, or tokenizer.json: ablax's char or a Hugging Face one),
  framing texts by `framing` (config.data.framing; Tokenizer.set_framing)."""
  tokenizer = _load_tokenizer(directory)
  tokenizer.set_framing(framing)
  return tokenizer


def _load_tokenizer(directory: str) -> Tokenizer:
  spm_path, char_path = os.path.join(directory, SPM_FILE), os.path.join(directory, CHAR_FILE)
  if os.path.isfile(spm_path):
    return load_sentencepiece(spm_path)
  if not os.path.isfile(char_path):
    raise DataError(f"workdir '{directory}': no {SPM_FILE} or {CHAR_FILE}")
  try:
    with open(char_path, encoding="utf-8") as f:
      text = f.read()
    spec = json.loads(text)
    huggingface = isinstance(spec, dict) and "model" in spec and "kind" not in spec
    tokens = spec.get("special_tokens", []) if isinstance(spec, dict) else None
    if not huggingface and (not isinstance(spec, dict) or spec.get("kind") != "char"
                            or not isinstance(spec.get("chars"), str) or not isinstance(tokens, list)
                            or not all(isinstance(t, str) for t in tokens)):
      raise ValueError("expected {\"kind\": \"char\", \"chars\": \"...\", \"special_tokens\": [...]}")
  except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    raise DataError(f"{char_path}: not a char tokenizer nor a Hugging Face one ({str(e).splitlines()[0]})") from None
  if huggingface:
    return load_huggingface(directory, tokenizer_json=text)
  return CharTokenizer(spec["chars"], spec.get("special_tokens", ()))
