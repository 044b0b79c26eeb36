"""Bad input gets one clear line: non-UTF-8 bytes (data.encoding_errors), odd JSON lines, corrupt tokenizer
files, a Hugging Face index whose shards lie outside the model directory; hypothesis feeds random files to the
sources and to prepare_lm_data, and nothing but a one-line DataError may come out.
"""

import json
import os
import tempfile
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from configs import base
from data.pipeline import prepare_lm_data, read_splits
from data.sources import BUILTIN_STDLIB, DataError, read_documents, read_records
from data.tokenizer import load_tokenizer, train_tokenizer
from model.config import ConfigError, ModelConfig
from model.hf import common as hf_common
from model.hf.common import ConversionError
from train import mesh as mesh_lib
from train.loop import check_train_config

PROPERTY = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def one_line(excinfo, *parts):
  """The error message is one line containing every part."""
  message = str(excinfo.value)
  assert "\n" not in message, message
  for part in parts:
    assert part in message, (part, message)


def data_config(train_path: str, **overrides):
  """A char-tokenizer data section, as a plain attribute object."""
  c = {"train_path": train_path, "val_path": "", "text_field": "text", "max_bytes": 0, "val_fraction": 0.25,
       "tokenizer": "char", "vocab_size": 0, "spm_model_type": "bpe", "tokenizer_train_chars": 1_000_000, "seed": 0,
       "target_len": 0, "encoding_errors": "strict"}
  return types.SimpleNamespace(**{**c, **overrides})


# Non-UTF-8 bytes.

def test_non_utf8_strict_names_file_byte_and_key(tmp_path):
  text = tmp_path / "corpus.txt"
  text.write_bytes(b"good line\nabc\xff\xfe rest\n")
  with pytest.raises(DataError) as excinfo:
    read_documents(str(text))
  one_line(excinfo, f"{text}: byte 13 (line 2) is not UTF-8 (0xff)", "data.encoding_errors")
  lines = tmp_path / "records.jsonl"
  lines.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
  for read in (lambda: read_documents(str(lines)), lambda: read_records(str(lines), ["text"])):
    with pytest.raises(DataError) as excinfo:
      read()
    one_line(excinfo, f"{lines}: byte 28 (line 2) is not UTF-8 (0xe9)")
  # A sequence cut at the end of the file is named at its first byte.
  (tmp_path / "corpus.txt").write_bytes("snow ☃".encode()[:-1])
  with pytest.raises(DataError) as excinfo:
    read_documents(str(text))
  one_line(excinfo, "byte 5 (line 1) is not UTF-8 (0xe2)")


def test_non_utf8_replace_and_ignore(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"abc\xff\xfedef")
  (tmp_path / "b.jsonl").write_bytes(b'{"text": "x\xffy", "label": 1}\n')
  assert read_documents(str(tmp_path), encoding_errors="replace") == ["abc\ufffd\ufffddef", "x\ufffdy"]
  assert read_documents(str(tmp_path), encoding_errors="ignore") == ["abcdef", "xy"]
  assert read_records(str(tmp_path), ["text"], encoding_errors="ignore") == [{"text": "xy", "label": 1}]
  for read in (lambda: read_documents(str(tmp_path), encoding_errors="surrogateescape"),
               lambda: read_records(str(tmp_path), ["text"], encoding_errors="")):
    with pytest.raises(DataError) as excinfo:
      read()
    one_line(excinfo, "data.encoding_errors", "strict, replace, ignore")


def test_encoding_errors_from_the_config(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_bytes(b"abcdefgh\xff" * 20)
  with pytest.raises(DataError) as excinfo:
    prepare_lm_data(data_config(str(path)), seq_len=8, workdir=None)
  one_line(excinfo, f"{path}: byte 8", "not UTF-8")
  tokenizer, train, _ = prepare_lm_data(data_config(str(path), encoding_errors="replace"), seq_len=8, workdir=None)
  assert "\ufffd" in tokenizer.chars and train["inputs_BxL"].shape[1] == 8
  tokenizer, _, _ = prepare_lm_data(data_config(str(path), encoding_errors="ignore"), seq_len=8, workdir=None)
  assert tokenizer.chars == "abcdefgh"
  with pytest.raises(DataError) as excinfo:
    read_splits(data_config(str(tmp_path / "x.txt"), val_path=str(path), encoding_errors="wrong"))
  one_line(excinfo, "data.encoding_errors 'wrong'")


def test_newlines_and_line_numbers_as_text_mode_reads_them(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"one\r\ntwo\rthree\n")
  (tmp_path / "b.jsonl").write_bytes(b'{"text": "x"}\r\n\r\n{"text": "sep\xe2\x80\xa8arated"}\n{"text": 3}\n')
  with pytest.raises(DataError) as excinfo:
    read_documents(str(tmp_path))
  one_line(excinfo, f"{tmp_path / 'b.jsonl'}:4: field 'text' should be a string")
  assert read_documents(f"{tmp_path}/a.txt") == ["one\ntwo\nthree\n"]
  assert read_records(f"{tmp_path}/b.jsonl", ["text"])[1] == {"text": "sep\u2028arated"}


def test_builtin_corpus_reads_under_strict():
  docs = read_documents(BUILTIN_STDLIB, encoding_errors="strict")
  assert len(docs) > 500 and not any("\ufffd" in d for d in docs)


# JSON lines.

def test_json_lines_that_python_cannot_parse(tmp_path):
  path = tmp_path / "deep.jsonl"
  path.write_text('{"text": "ok"}\n' + "[" * 100_000 + "\n")
  with pytest.raises(DataError) as excinfo:
    read_records(str(path), ["text"])
  one_line(excinfo, f"{path}:2: invalid JSON")
  path.write_text('{"text": "ok", "n": ' + "9" * 5000 + "}\n")
  with pytest.raises(DataError) as excinfo:
    read_documents(str(path))
  one_line(excinfo, f"{path}:1: invalid JSON", "integer")


def test_empty_jsonl_among_others_is_skipped(tmp_path):
  (tmp_path / "a.jsonl").write_text("")
  (tmp_path / "b.jsonl").write_text('{"text": "kept", "label": "x"}\n\n')
  (tmp_path / "c.jsonl").write_text("\n  \n")
  assert read_documents(str(tmp_path)) == ["kept"]
  assert read_records(str(tmp_path), ["text", "label"]) == [{"text": "kept", "label": "x"}]
  (tmp_path / "b.jsonl").write_text('{"text": "  "}\n')
  with pytest.raises(DataError) as excinfo:
    read_documents(str(tmp_path))
  one_line(excinfo, "the corpus is empty (3 files, no text)")
  (tmp_path / "b.jsonl").write_text("")
  with pytest.raises(DataError) as excinfo:
    read_records(str(tmp_path), ["text"])
  one_line(excinfo, "no records (3 JSONL files, all blank)")


# Tokenizer files.

def test_load_tokenizer_corrupt_sentencepiece(tmp_path):
  with open(os.__file__, encoding="utf-8") as f:
    tokenizer = train_tokenizer([f.read()], "sentencepiece", vocab_size=400)
  tokenizer.save(str(tmp_path))
  path = tmp_path / "tokenizer.model"
  proto = path.read_bytes()
  assert load_tokenizer(str(tmp_path)).encode("import os") == tokenizer.encode("import os")
  for broken in (b"", b"\x00", proto[:10], proto[:len(proto) // 2], proto[:-1], b"not a model \xff" * 10):
    path.write_bytes(broken)
    with pytest.raises(DataError) as excinfo:
      load_tokenizer(str(tmp_path))
    one_line(excinfo, f"{path}: not a sentencepiece model")


def test_sentencepiece_trains_on_few_lines():
  lines = [f"line {i} of a short text about tokenizers" for i in range(5)]
  tokenizer = train_tokenizer(lines, "sentencepiece", vocab_size=300)
  assert tokenizer.decode(tokenizer.encode(lines[3])) == lines[3]
  with pytest.raises(DataError) as excinfo:
    train_tokenizer(lines, "sentencepiece", vocab_size=100)
  one_line(excinfo, "failed on 5 lines: Vocabulary size is smaller than required_chars")


def test_load_tokenizer_bad_char_json(tmp_path):
  path = tmp_path / "tokenizer.json"
  for content in (b"[1, 2]", b'{"kind": "char", "chars": "ab\xff"}', b'{"kind": "bpe", "chars": "ab"}',
                  b'{"kind": "char", "chars": "ab", "special_tokens": "<mask>"}', b'{"kind": "char", "chars": '):
    path.write_bytes(content)
    with pytest.raises(DataError) as excinfo:
      load_tokenizer(str(tmp_path))
    one_line(excinfo, f"{path}: not a char tokenizer")


# Hugging Face checkpoints.

def hf_dir(root, weight_map: dict) -> str:
  """A model directory with config.json, one tiny shard and an index with `weight_map`."""
  model = os.path.join(root, "model")
  os.makedirs(model)
  with open(os.path.join(model, "config.json"), "w") as f:
    json.dump({"model_type": "gpt2"}, f)
  save_file({"wte.weight": np.zeros((2, 2), np.float32)}, os.path.join(model, "model-1.safetensors"))
  with open(os.path.join(model, hf_common.SAFETENSORS_INDEX), "w") as f:
    json.dump({"weight_map": weight_map}, f)
  return model


def test_hf_shards_stay_inside_the_model_directory(tmp_path):
  save_file({"secret": np.ones(3, np.float32)}, str(tmp_path / "outside.safetensors"))
  model = hf_dir(tmp_path / "ok", {"wte.weight": "model-1.safetensors", "h.0": "./model-1.safetensors"})
  _, tensors = hf_common.read_hf_dir(model)
  assert list(tensors.arrays) == ["wte.weight"] and tensors.where("wte.weight").endswith("model-1.safetensors")
  index = os.path.join("model", hf_common.SAFETENSORS_INDEX)
  for i, shard in enumerate(["../../outside.safetensors", str(tmp_path / "outside.safetensors"), "link.safetensors",
                             "sub/../../../outside.safetensors"]):
    model = hf_dir(tmp_path / str(i), {"wte.weight": "model-1.safetensors", "secret": shard})
    os.symlink(tmp_path / "outside.safetensors", os.path.join(model, "link.safetensors"))
    with pytest.raises(ConversionError) as excinfo:
      hf_common.read_hf_dir(model)
    one_line(excinfo, index, f"shard '{shard}' is outside the model directory")


def test_hf_index_and_shard_errors(tmp_path):
  model = hf_dir(tmp_path / "missing", {"wte.weight": "model-2.safetensors"})
  with pytest.raises(ConversionError) as excinfo:
    hf_common.read_hf_dir(model)
  one_line(excinfo, hf_common.SAFETENSORS_INDEX, "shard 'model-2.safetensors' is missing")
  model = hf_dir(tmp_path / "corrupt", {"wte.weight": "model-1.safetensors"})
  shard = os.path.join(model, "model-1.safetensors")
  with open(shard, "r+b") as f:
    f.truncate(20)
  with pytest.raises(ConversionError) as excinfo:
    hf_common.read_hf_dir(model)
  one_line(excinfo, f"{shard}: not a safetensors file")
  index = os.path.join(model, hf_common.SAFETENSORS_INDEX)
  for content, part in (("{", "not valid JSON"), ('{"weight_map": {"a": 3}}', "expected a \"weight_map\""),
                        ("[]", "expected a \"weight_map\"")):
    with open(index, "w") as f:
      f.write(content)
    with pytest.raises(ConversionError) as excinfo:
      hf_common.read_hf_dir(model)
    one_line(excinfo, index, part)


# Random input: nothing escapes but a one-line DataError.

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)
JSON_LINES = st.one_of(
    st.fixed_dictionaries({"text": st.text(min_size=1, max_size=40)}, optional={"label": JSON_VALUES}),
    st.fixed_dictionaries({"text": JSON_VALUES}),             # a text that may not be a string
    st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3),  # fields missing
    JSON_VALUES,                                              # not an object
).flatmap(lambda obj: st.sampled_from([json.dumps(obj), json.dumps(obj, ensure_ascii=False)]))
LINES = st.one_of(JSON_LINES.map(str.encode), st.sampled_from([b"", b"   ", b"{", b'{"text": "a"', b"\xff\xfe"]),
                  st.text(max_size=20).map(str.encode), st.binary(max_size=20))
FILES = st.lists(st.tuples(st.sampled_from([".txt", ".jsonl"]),
                           st.one_of(st.binary(max_size=100), st.text(max_size=100).map(str.encode),
                                     st.lists(LINES, max_size=6).map(b"\n".join))),
                 min_size=1, max_size=4)


def check_only_data_errors(fn):
  """Runs fn; a DataError must be one line, anything else fails the test by propagating."""
  try:
    return fn()
  except DataError as e:
    assert "\n" not in str(e), str(e)


@PROPERTY
@given(files=FILES, encoding_errors=st.sampled_from(["strict", "replace", "ignore"]),
       objective=st.sampled_from(["causal_lm", "masked_lm", "span_corruption"]), seq_len=st.integers(1, 6))
@example(files=[(".txt", b"x")], encoding_errors="strict", objective="masked_lm", seq_len=1)  # train split ""
@example(files=[(".jsonl", b'{"\\n": null}')], encoding_errors="strict", objective="causal_lm", seq_len=1)
def test_random_files_give_data_errors_only(files, encoding_errors, objective, seq_len):
  with tempfile.TemporaryDirectory() as directory:
    for i, (ext, content) in enumerate(files):
      with open(os.path.join(directory, f"f{i}{ext}"), "wb") as f:
        f.write(content)
    check_only_data_errors(lambda: read_documents(directory, encoding_errors=encoding_errors))
    check_only_data_errors(lambda: read_records(directory, ["text"], encoding_errors=encoding_errors))
    config = data_config(directory, encoding_errors=encoding_errors)
    check_only_data_errors(lambda: prepare_lm_data(config, seq_len, workdir=None, objective=objective))


@PROPERTY
@given(content=st.binary(max_size=60) | st.text(max_size=30).map(str.encode))
def test_strict_names_the_first_bad_byte(content):
  with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, "corpus.txt")
    with open(path, "wb") as f:
      f.write(content)
    try:
      text = content.decode("utf-8")
    except UnicodeDecodeError as e:
      with pytest.raises(DataError) as excinfo:
        read_documents(path)
      one_line(excinfo, f"{path}: byte {e.start} ", f"(0x{content[e.start]:02x})")
      replaced = content.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
      assert read_documents(path, encoding_errors="replace") == [replaced]  # U+FFFD is not blank
    else:
      if text.strip():
        assert read_documents(path) == [text.replace("\r\n", "\n").replace("\r", "\n")]


def _config_values():
  """(section, key, a strategy of values of the key's type) for every scalar key of configs/base.py."""
  keys = []
  for section, values in base.get_config().items():
    if not hasattr(values, "items"):
      continue
    for key, value in values.items():
      if isinstance(value, bool):
        keys.append((section, key, st.booleans()))
      elif isinstance(value, int):
        keys.append((section, key, st.integers(-10**6, 10**6)))
      elif isinstance(value, float):
        keys.append((section, key, st.floats(allow_nan=True, allow_infinity=True)))
      elif isinstance(value, str):
        keys.append((section, key, st.text(max_size=12)))
  return keys


CONFIG_VALUES = _config_values()


@PROPERTY
@given(st.lists(st.sampled_from(range(len(CONFIG_VALUES))).flatmap(
    lambda i: st.tuples(st.just(i), CONFIG_VALUES[i][2])), max_size=4))
def test_random_config_values_give_config_errors_only(overrides):
  """Any values of the right types for any keys: the checks a run makes before writing anything accept them or
  raise the project's one-line ConfigError / DataError, nothing else."""
  config = base.get_config()
  config.mesh.update(data=1, fsdp=1, tensor=1)
  for index, value in overrides:
    section, key, _ = CONFIG_VALUES[index]
    config[section][key] = value
  try:
    mesh = mesh_lib.make_mesh(config.mesh)
    check_train_config(config, mesh)
    ModelConfig.from_config(config.model, 100)
  except (ConfigError, DataError) as e:
    assert "\n" not in str(e)
