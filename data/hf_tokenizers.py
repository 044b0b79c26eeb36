"""ablax tokenizers and Hugging Face tokenizer files, both ways: how a Hugging Face directory's tokenizer frames a
text, and an ablax tokenizer written as a tokenizer.json that transformers' AutoTokenizer loads to the same ids.

Offers `hf_framing` (the config.data.framing template of a Hugging Face directory, as transformers 5 frames a text:
tokenizer_config.json's add_bos_token / add_eos_token where set, else the tokenizer.json post-processor, else T5's
eos after a sentencepiece model alone) and `hf_files` (tokenizer.json text and tokenizer_config.json contents of a
sentencepiece, char or imported Hugging Face tokenizer, its framing as the post-processor; a ConversionError-like
DataError names what a tokenizer.json cannot represent).

A sentencepiece model becomes the pipeline transformers' own converters build for Llama and T5: the model's
normalization (none, or its precompiled character map), spaces as U+2581 (after a leading one where
add_dummy_prefix), no pre-tokenizer (sentencepiece reads the whole text at once), a BPE model whose merges rank
pairs by the merged piece's score (sentencepiece merges the best-scored pair first), or a Unigram model whose
special, byte and unused pieces never match text; byte fallback, and user-defined symbols as added tokens.
"""

import json
import os

import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, decoders, models, normalizers, processors

from data.sources import DataError
from data.tokenizer import (FRAMED_TEXT, HF_CONFIG_FILE, HF_FILE, SPM_FILE, CharTokenizer, HuggingFaceTokenizer,
                            SentencePieceTokenizer, Tokenizer)

SPACE = "\u2581"  # sentencepiece's visible space
PIECE = sentencepiece_model_pb2.ModelProto.SentencePiece
# A Unigram score no text ever prefers: special, byte and unused pieces are not matched against text.
NEVER_SCORE = -1e9
CHAR_SPECIALS = ("<pad>", "<s>", "</s>")  # names of a char tokenizer's ids 0, 1, 2 in its tokenizer.json


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: not readable JSON ({str(e).splitlines()[0]})") from None
  return value if isinstance(value, dict) else {}


def _name(value) -> str | None:
  """A special token entry of tokenizer_config.json: a string or an AddedToken object."""
  value = value.get("content") if isinstance(value, dict) else value
  return value if isinstance(value, str) and value else None


def _special_name(tokenizer: Tokenizer, config: dict, kind: str) -> str | None:
  """The name of the tokenizer's bos or eos (`kind`): tokenizer_config.json's, else the one ablax resolved (from
  special_tokens_map.json or config.json ids), else the sentencepiece model's own piece; None if it has none."""
  name = _name(config.get(f"{kind}_token"))
  if name is None and isinstance(tokenizer, HuggingFaceTokenizer):
    name = _name(tokenizer.tokenizer_config.get(f"{kind}_token"))
  if name is None and isinstance(tokenizer, SentencePieceTokenizer) and tokenizer.has_piece(kind):
    name = tokenizer.piece(getattr(tokenizer, f"{kind}_id"))
  return name


def _template(before: list[str], after: list[str]) -> str:
  names = [*before, FRAMED_TEXT, *after]
  spaced = [n for n in before + after if not n or any(c.isspace() for c in n)]
  if spaced:
    raise DataError(f"framing: special token {spaced[0]!r} holds a space; a framing template cannot name it")
  return " ".join(names)


def _post_processor_framing(tokenizer_json: str) -> str:
  """The template of tokenizer.json's post-processor: the special tokens it puts around a text's ids."""
  backend = tokenizers.Tokenizer.from_str(tokenizer_json)
  if backend.post_processor is None:
    return FRAMED_TEXT
  probe = "a b"
  plain = backend.encode(probe, add_special_tokens=False).ids
  framed = backend.encode(probe, add_special_tokens=True).ids
  at = next((i for i in range(len(framed) - len(plain) + 1) if framed[i:i + len(plain)] == plain), None)
  if at is None:
    raise DataError(f"{HF_FILE}: its post-processor changes a text's own ids; ablax frames texts only by adding "
                    "special tokens around them")
  return _template([backend.id_to_token(i) for i in framed[:at]],
                   [backend.id_to_token(i) for i in framed[at + len(plain):]])


def hf_framing(hf_dir: str, tokenizer: Tokenizer, model_type: str | None = None) -> str:
  """The framing template (config.data.framing) of the tokenizer transformers' AutoTokenizer builds from `hf_dir`:
  what tokenizer(text)["input_ids"] adds around the text's ids. `tokenizer` is the one ablax imported from it."""
  config = _read_json(os.path.join(hf_dir, HF_CONFIG_FILE))
  if "add_bos_token" in config or "add_eos_token" in config:  # transformers rebuilds the post-processor from these
    before = [_special_name(tokenizer, config, "bos")] if config.get("add_bos_token") else []
    after = [_special_name(tokenizer, config, "eos")] if config.get("add_eos_token") else []
    return _template([n for n in before if n], [n for n in after if n])
  if isinstance(tokenizer, HuggingFaceTokenizer):
    return _post_processor_framing(tokenizer.tokenizer_json)
  if isinstance(tokenizer, SentencePieceTokenizer):  # a sentencepiece model alone: T5Tokenizer ends with eos
    t5 = config.get("tokenizer_class") in ("T5Tokenizer", "T5TokenizerFast") or model_type == "t5"
    return _template([], [tokenizer.piece(tokenizer.eos_id)]) if t5 else FRAMED_TEXT
  return ""


def _spm_pipeline(proto: bytes, where: str) -> tokenizers.Tokenizer:
  """A tokenizers.Tokenizer that encodes and decodes as the sentencepiece model `proto`; DataError naming a setting
  it cannot represent."""
  model = sentencepiece_model_pb2.ModelProto.FromString(proto)
  trainer, norm = model.trainer_spec, model.normalizer_spec
  kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(trainer.model_type)
  refusals = [(kind not in ("BPE", "UNIGRAM"), f"model_type {kind}"),
              (trainer.treat_whitespace_as_suffix, "treat_whitespace_as_suffix"),
              (norm.name not in ("identity", "") and not norm.precompiled_charsmap,
               f"normalization '{norm.name}' without a precompiled character map"),
              (not norm.escape_whitespaces, "escape_whitespaces false")]
  for refused, what in refusals:
    if refused:
      raise DataError(f"{where}: the sentencepiece {what} has no tokenizer.json form; export the weights without "
                      "it or convert the tokenizer by hand")
  pieces = list(model.pieces)
  vocab = {p.piece: i for i, p in enumerate(pieces)}
  unk_id = next((i for i, p in enumerate(pieces) if p.type == PIECE.UNKNOWN), None)
  if kind == "BPE":
    merges = []
    for p in sorted((p for p in pieces if p.type == PIECE.NORMAL and len(p.piece) > 1), key=lambda p: -p.score):
      splits = [(p.piece[:k], p.piece[k:]) for k in range(1, len(p.piece))]
      merges += sorted(((a, b) for a, b in splits if a in vocab and b in vocab), key=lambda ab: (vocab[ab[0]],
                                                                                                   vocab[ab[1]]))
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=pieces[unk_id].piece,
                                              fuse_unk=True, byte_fallback=trainer.byte_fallback))
  else:
    scored = [(p.piece, p.score if p.type == PIECE.NORMAL else NEVER_SCORE) for p in pieces]
    backend = tokenizers.Tokenizer(models.Unigram(scored, unk_id=unk_id, byte_fallback=trainer.byte_fallback))
  steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
  if norm.remove_extra_whitespaces:
    steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
  if norm.add_dummy_prefix:
    steps += [normalizers.Prepend(SPACE)]
  backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPACE)])
  strip = [decoders.Strip(content=" ", left=1, right=0)] if norm.add_dummy_prefix else []
  unknown = [decoders.Replace(pieces[unk_id].piece, trainer.unk_surface)] if unk_id is not None else []
  backend.decoder = decoders.Sequence([*unknown, decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                       decoders.Fuse(), *strip])
  # Control pieces are skipped when decoding, the unknown piece reads as its surface (" \u2047 "), as in
  # sentencepiece; user-defined symbols are matched in text before the model and decoded as their text.
  backend.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                              for p in pieces if p.type == PIECE.CONTROL])
  backend.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                      for p in pieces if p.type == PIECE.USER_DEFINED])
  return backend


def _char_pipeline(tokenizer: CharTokenizer, where: str) -> tokenizers.Tokenizer:
  """A tokenizers.Tokenizer of a char tokenizer: one token per character; pad, bos and eos as CHAR_SPECIALS."""
  clash = sorted(set(CHAR_SPECIALS) & set(tokenizer.special_tokens))
  if clash:
    raise DataError(f"{where}: special token {clash[0]!r} is also the name the export gives a pad/bos/eos token")
  vocab = {name: i for i, name in enumerate(CHAR_SPECIALS)}
  vocab.update({c: i + 3 for i, c in enumerate(tokenizer.chars)})
  vocab.update({t: tokenizer.token_id(t) for t in tokenizer.special_tokens})
  # An unknown character is an error in ablax; here it meets an unknown-token name that is not in the vocabulary,
  # which the tokenizers library refuses too.
  backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unknown character>"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  backend.decoder = decoders.Fuse()
  backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                              for t in [*CHAR_SPECIALS, *tokenizer.special_tokens]])
  return backend


def _framing_processor(tokenizer: Tokenizer, names: dict) -> processors.TemplateProcessing:
  """The post-processor that frames a text as `tokenizer` does (ablax's own: bos first)."""
  template = tokenizer.framing or f"{names['bos_token']} {FRAMED_TEXT}"
  words = template.split()
  ids = tokenizer.frame([])
  specials = [w for w in words if w != FRAMED_TEXT]
  return processors.TemplateProcessing(single=" ".join(w if w == FRAMED_TEXT else f"{w}:0" for w in words),
                                       special_tokens=list(dict.fromkeys(zip(specials, ids))))


def hf_files(tokenizer: Tokenizer, where: str) -> tuple[str, dict]:
  """(tokenizer.json text, tokenizer_config.json contents) that transformers' AutoTokenizer loads to `tokenizer`'s
  ids and decoded text, framing a text as the run does (tokenizer(text) = tokenizer.frame(tokenizer.encode(text)));
  `where` names the run in a DataError when the tokenizer has no such form."""
  if isinstance(tokenizer, HuggingFaceTokenizer):
    return tokenizer.tokenizer_json, dict(tokenizer.tokenizer_config)
  if isinstance(tokenizer, SentencePieceTokenizer):
    backend = _spm_pipeline(tokenizer.proto, os.path.join(where, SPM_FILE))
    name = tokenizer.piece
    # No unk_token: transformers would skip it when decoding, where sentencepiece writes its surface.
    names = {"bos_token": name(tokenizer.bos_id), "eos_token": name(tokenizer.eos_id),
             "pad_token": name(tokenizer.pad_id)}
  elif isinstance(tokenizer, CharTokenizer):
    backend = _char_pipeline(tokenizer, where)
    names = dict(zip(("pad_token", "bos_token", "eos_token"), CHAR_SPECIALS))
  else:
    raise DataError(f"{where}: a {type(tokenizer).__name__} has no tokenizer.json form")
  backend.post_processor = _framing_processor(tokenizer, names)
  # split_special_tokens: a special token's name typed in a text is text, as in ablax; no cleanup of spaces.
  config = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "clean_up_tokenization_spaces": False,
            "split_special_tokens": True}
  return backend.to_str(), config
