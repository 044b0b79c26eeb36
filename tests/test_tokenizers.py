"""Hugging Face tokenizers in ablax: tiny GPT-2-style byte-level BPE, Llama-3-style tokenizer.json, BERT WordPiece
and T5 sentencepiece (Unigram) tokenizers, trained here with `tokenizers` / `sentencepiece` and saved with
transformers, give through data.tokenizer.load_tokenizer the ids transformers gives and decode as it decodes, on
unicode-heavy text; special tokens come from the Hugging Face files; a saved one reloads (in ablax and in
transformers) alike; ablax's char tokenizer.json still loads; broken files are one-line errors naming the file.
"""

import io
import json
import os
import random
import shutil

import pytest
import sentencepiece as spm
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

transformers = pytest.importorskip("transformers")

from data.sources import DataError  # noqa: E402
from data.tokenizer import (CharTokenizer, HuggingFaceTokenizer, SentencePieceTokenizer,  # noqa: E402
                            load_huggingface, load_sentencepiece, load_tokenizer, train_tokenizer)

KINDS = ("gpt2", "llama3", "bert", "t5")
WORDS = ("the", "fox", "café", "naïve", "Übermaß", "señor", "façade", "東京", "日本語", "你好世界", "한국어", "😀",
         "🚀✨", "👍🏽", "def", "return", "x_1", "Ölçü", "Ångström", "don't", "it's", "123", "4567", "α+β", "→", "ﬁne")
# Accents, CJK, emoji (with a skin tone and a ZWJ family), code with tabs and repeated spaces, blank lines.
TEXT = ("Héllo  wörld!\tCafé naïve — 東京で日本語を話す、你好。 😀🚀 👍🏽 👨‍👩‍👧 ﬁne Ångström\n\n"
        "def f(x):\n\tif x  >  1:\n\t\treturn  x  *  2   # done\n    print( 'it''s' , x )  \n  trailing   spaces   ")
TEXTS = (TEXT, "", " ", "a", "\n\n\t  ", "🙂", "don't STOP 12345678 über", "  leading and trailing  ")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def corpus_lines(n: int = 400, seed: int = 0) -> list[str]:
  """Generated training text: word salad over WORDS and small Python functions with tabs and double spaces."""
  rng = random.Random(seed)
  lines = []
  for i in range(n):
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
    if i % 3 == 0:
      lines.append(f"def f_{i}(x):\n\tif x  >  {i}:\n\t\treturn  x * 2  # {words}")
    else:
      lines.append(words + ("." if i % 2 else f", {rng.choice(WORDS)}!"))
  return lines


def _byte_level_bpe(vocab_size: int, specials: list[str], pre_tokenizer, ignore_merges: bool = False) -> Tokenizer:
  tokenizer = Tokenizer(models.BPE(ignore_merges=ignore_merges))
  tokenizer.pre_tokenizer = pre_tokenizer
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.train_from_iterator(corpus_lines(), trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  return tokenizer


def build_tokenizer(kind: str, directory: str):
  """Trains a tiny tokenizer of `kind` and saves it with transformers into `directory`; returns transformers'
  AutoTokenizer of that directory."""
  if kind == "gpt2":  # GPT2Tokenizer: byte-level BPE, <|endoftext|> for bos, eos and unk, no pad
    tokenizer = _byte_level_bpe(500, ["<|endoftext|>"], pre_tokenizers.ByteLevel(add_prefix_space=False))
    merges = [tuple(m) for m in json.loads(tokenizer.to_str())["model"]["merges"]]
    transformers.GPT2Tokenizer(vocab=tokenizer.get_vocab(), merges=merges).save_pretrained(directory)
  elif kind == "llama3":  # Llama 3: a split regex, then byte-level BPE that keeps whole-word tokens; bos template
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer = _byte_level_bpe(600, specials, pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), ignore_merges=True)
    bos = ("<|begin_of_text|>", tokenizer.token_to_id("<|begin_of_text|>"))
    template = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[bos],
                                             pair="<|begin_of_text|> $A <|begin_of_text|> $B:1")
    tokenizer.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>",
                                         eos_token="<|end_of_text|>").save_pretrained(directory)
  elif kind == "bert":  # BertTokenizer: lower-cased WordPiece, [CLS] ... [SEP]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(corpus_lines(), trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    transformers.BertTokenizer(vocab=tokenizer.get_vocab()).save_pretrained(directory)
  elif kind == "t5":  # a sentencepiece unigram model as T5's spiece.model, converted by transformers' T5Tokenizer
    source = spm_t5_dir(directory + "_spiece")
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(directory)
  else:
    raise ValueError(kind)
  return transformers.AutoTokenizer.from_pretrained(directory)


def spm_t5_dir(directory: str, extra_ids: int = 100) -> str:
  """A directory holding only T5's files of a tiny sentencepiece unigram model: spiece.model (pad 0, eos 1, unk 2,
  no bos, T5's default normalization) and a tokenizer_config.json naming T5Tokenizer with `extra_ids` sentinels."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_lines()), model_writer=model, vocab_size=240,
                                 model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
                                 minloglevel=2)
  os.makedirs(directory)
  with open(os.path.join(directory, "spiece.model"), "wb") as f:
    f.write(model.getvalue())
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "T5Tokenizer", "extra_ids": extra_ids}, f)
  return directory


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """kind -> (directory, transformers' tokenizer)."""
  root = tmp_path_factory.mktemp("tokenizers")
  return {kind: (str(root / kind), build_tokenizer(kind, str(root / kind))) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_ids_and_decoding_match_transformers(built, kind):
  directory, theirs = built[kind]
  ours = load_tokenizer(directory)
  assert isinstance(ours, HuggingFaceTokenizer) and ours.vocab_size == len(theirs)
  for text in TEXTS:
    ids = theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.encode(text) == ids, (kind, text)
    assert ours.decode(ours.encode(text)) == theirs.decode(ids, skip_special_tokens=True), (kind, text)
  assert ours.encode_batch(list(TEXTS)) == [ours.encode(t) for t in TEXTS]
  assert len(ours.encode(TEXT)) < len(TEXT.encode())  # it learned merges: fewer tokens than bytes
  if kind in ("gpt2", "llama3"):  # byte-level BPE is lossless
    assert ours.decode(ours.encode(TEXT)) == TEXT


@pytest.mark.parametrize("kind, bos, eos, pad", [
    ("gpt2", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>"),  # no pad token: eos pads
    ("llama3", "<|begin_of_text|>", "<|end_of_text|>", "<|end_of_text|>"),
    ("bert", "[CLS]", "[SEP]", "[PAD]"),
    ("t5", "</s>", "</s>", "<pad>"),  # no bos: eos opens documents
])
def test_special_tokens_come_from_the_hf_files(built, kind, bos, eos, pad):
  directory, theirs = built[kind]
  ours = load_tokenizer(directory)
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == tuple(theirs.convert_tokens_to_ids([bos, eos, pad]))
  special = [ours.bos_id, ours.eos_id, ours.pad_id]
  assert ours.decode(special + ours.encode("the fox") + special) == theirs.decode(
      special + theirs("the fox", add_special_tokens=False)["input_ids"] + special, skip_special_tokens=True)
  if kind == "bert":
    assert ours.token_id("<mask>") == theirs.convert_tokens_to_ids("[MASK]")
  if kind == "t5":
    assert ours.token_id("<extra_id_0>") == theirs.convert_tokens_to_ids("<extra_id_0>")
    assert ours.token_id("<extra_id_9>") == theirs.convert_tokens_to_ids("<extra_id_9>")
  if kind != "bert":
    with pytest.raises(DataError, match="no special token '<mask>'"):
      ours.token_id("<mask>")
  with pytest.raises(DataError, match="no special token 'fox'"):  # a vocabulary word is not a special token
    ours.token_id("fox")


def test_special_tokens_from_special_tokens_map_or_config_json(built, tmp_path):
  """As the hub's gpt2: a tokenizer_config.json naming no special token; the ids come from special_tokens_map.json
  (older transformers) or from the model's config.json."""
  source, theirs = built["gpt2"]
  eot = theirs.convert_tokens_to_ids("<|endoftext|>")
  directory = str(tmp_path / "gpt2")
  shutil.copytree(source, directory)
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"model_max_length": 1024}, f)
  with pytest.raises(DataError, match="tokenizer_config.json: no eos_token or sep_token"):
    load_tokenizer(directory)
  ours = load_huggingface(directory, {"bos_token_id": eot, "eos_token_id": [eot, 3], "pad_token_id": None})
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (eot, eot, eot)
  with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
    json.dump({"eos_token": {"content": "<|endoftext|>", "special": True}, "bos_token": "<|endoftext|>"}, f)
  assert (load_tokenizer(directory).bos_id, load_tokenizer(directory).eos_id) == (eot, eot)
  ours.save(str(tmp_path / "saved"))  # the names found are written out, for the run and for transformers
  again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
  assert (again.bos_token, again.eos_token) == ("<|endoftext|>", "<|endoftext|>")


@pytest.mark.parametrize("kind", KINDS)
def test_a_saved_tokenizer_reloads_alike(built, kind, tmp_path):
  """save -> load_tokenizer keeps ids, special ids and a model vocabulary larger than the tokenizer's (an
  embedding padded past it); transformers reads the saved directory with the same ids."""
  directory, theirs = built[kind]
  ours = load_tokenizer(directory)
  ours.set_model_vocab_size(ours.num_tokens + 28)
  ours.save(str(tmp_path))
  again = load_tokenizer(str(tmp_path))
  assert again.encode(TEXT) == ours.encode(TEXT) and again.decode(ours.encode(TEXT)) == ours.decode(ours.encode(TEXT))
  assert (again.vocab_size, again.num_tokens) == (ours.num_tokens + 28, ours.num_tokens)
  assert (again.bos_id, again.eos_id, again.pad_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
  assert ours.decode([again.num_tokens + 3] + ours.encode("the fox")) == ours.decode(ours.encode("the fox"))
  reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert reloaded(TEXT, add_special_tokens=False)["input_ids"] == theirs(TEXT, add_special_tokens=False)["input_ids"]
  with pytest.raises(DataError, match="ablax_vocab_size 10 is below the"):
    ours.set_model_vocab_size(10)


def test_t5_spiece_model_alone_gives_transformers_ids(tmp_path):
  """A T5 directory with only spiece.model (older checkpoints): ablax reads it with sentencepiece, transformers
  converts it; the ids agree (decode differs on unknown pieces: sentencepiece writes ' ⁇ ', transformers skips
  <unk>). T5 has no bos piece: eos stands in."""
  directory = spm_t5_dir(str(tmp_path / "t5"))
  theirs = transformers.AutoTokenizer.from_pretrained(directory)
  ours = load_sentencepiece(os.path.join(directory, "spiece.model"))
  for text in TEXTS:
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], text
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 1, 0)


def test_char_and_hugging_face_tokenizer_json_are_told_apart(built, tmp_path):
  char = train_tokenizer(["abc"], "char", vocab_size=0)
  char.save(str(tmp_path / "char"))
  assert isinstance(load_tokenizer(str(tmp_path / "char")), CharTokenizer)
  assert isinstance(load_tokenizer(built["bert"][0]), HuggingFaceTokenizer)
  assert not isinstance(load_tokenizer(built["bert"][0]), (CharTokenizer, SentencePieceTokenizer))
  with pytest.raises(DataError, match="tokenizer 'huggingface' is not trained"):
    train_tokenizer(["abc"], "huggingface", vocab_size=100)


@pytest.mark.parametrize("file, content, message", [
    ("tokenizer.json", '{"model": {"type": "BPE", "vocab": 3}}', "tokenizer.json: not a Hugging Face tokenizer"),
    ("tokenizer.json", '{"model": ', "tokenizer.json: not a char tokenizer"),
    ("tokenizer_config.json", '{"eos_token": ', "tokenizer_config.json: not a tokenizer config"),
    ("tokenizer_config.json", '["</s>"]', "tokenizer_config.json: not a tokenizer config (expected a JSON object"),
    ("tokenizer_config.json", '{"eos_token": "</s>", "pad_token": "<nope>"}',
     "tokenizer_config.json: pad_token '<nope>' is not a token of tokenizer.json"),
    ("tokenizer_config.json", '{"eos_token": "</s>", "ablax_vocab_size": 3}',
     "tokenizer_config.json: ablax_vocab_size 3 is below the"),
    ("special_tokens_map.json", "{", "special_tokens_map.json: not a special tokens map"),
])
def test_broken_files_are_one_line_errors_naming_the_file(built, tmp_path, file, content, message):
  directory = str(tmp_path / "t5")
  shutil.copytree(built["t5"][0], directory)
  with open(os.path.join(directory, file), "w") as f:
    f.write(content)
  with pytest.raises(DataError) as excinfo:
    load_tokenizer(directory)
  assert "\n" not in str(excinfo.value) and os.path.join(directory, file) + ": " in str(excinfo.value)
  assert message in str(excinfo.value), str(excinfo.value)
